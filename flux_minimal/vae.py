"""The FLUX VAE (AutoEncoder), parameter names = the keys of BFL's `ae.safetensors`.

    x [B, 3, H, W] in [-1, 1] --encoder--> moments [B, 32, H/8, W/8] = (mean | logvar)
    z = scale * (mean - shift)             [B, 16, H/8, W/8]   posterior mean (or a sample)
    decoder(z / scale + shift)  ->  x      [B, 3, H, W], unclamped (the pipeline clamps to [-1, 1])

Large inputs are processed in pieces so memory stays bounded (`AutoEncoder.max_pixels`): a batch is
cut into chunks (exact), and one image too large by itself goes through overlapping tiles blended
linearly (approximate, since GroupNorm and the mid-block attention then see one tile, not the
image; tests/test_vae.py measures the error). Exact maths in docs/flux.md section 4.
"""

import json
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import AutoEncoderParams
from .errors import FluxMinimalError, WeightsError
from .loading import WEIGHTS_HELP, Checkpoint, Rule, count_blocks, load_state, open_checkpoint, read_config


class GroupNorm(nn.GroupNorm):
    """GroupNorm(eps 1e-6) with its statistics in float32 (an fp32 island), back to x's dtype."""

    def __init__(self, num_groups: int, channels: int):
        super().__init__(num_groups, channels, eps=1e-6, affine=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResnetBlock(nn.Module):
    """x + conv2(swish(norm2(conv1(swish(norm1(x)))))), through a 1x1 `nin_shortcut` when C changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; q, k, v, proj_out are 1x1 convs (BFL)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = GroupNorm(groups, channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        h = self.norm(x)
        q, k, v = (rearrange(p(h), "B C H W -> B 1 (H W) C") for p in (self.q, self.k, self.v))
        # Not ops.attention: no rope, one head of dim C (512), beyond flash kernels; SDPA picks a
        # memory-efficient or math kernel, softmax statistics in float32. Scale 1/sqrt(C).
        h = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        h = rearrange(h, "B 1 (H W) C -> B C H W", H=H, W=W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Zero padding on the right and bottom only (LDM/BFL): output pixel i sees inputs 2i..2i+2.
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # [B, C, H, W] -> [B, C, H/2, W/2]


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # -> [B, C, 2H, 2W]


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _level(channels: list[int], groups: int) -> nn.Module:
    """One resolution: ResNets channels[0] -> channels[1] -> ... as `block`; the caller adds the
    `downsample` (encoder) or `upsample` (decoder) that ends every level but one."""
    level = nn.Module()
    level.block = nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(channels, channels[1:]))
    return level


class Encoder(nn.Module):
    """[B, 3, H, W] -> moments [B, 2*z, H/8, W/8]; levels 0..3 at 128, 256, 512, 512 channels."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        chans = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c_in = p.ch
        for i, c in enumerate(chans):
            level = _level([c_in] + [c] * p.num_res_blocks, p.num_groups)
            if i != len(chans) - 1:
                level.downsample = Downsample(c)
            self.down.append(level)
            c_in = c
        self.mid = MidBlock(c_in, p.num_groups)
        self.norm_out = GroupNorm(p.num_groups, c_in)
        self.conv_out = nn.Conv2d(c_in, 2 * p.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # [B, 128, H, W]
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))  # [B, 2z, H/8, W/8]


class Decoder(nn.Module):
    """[B, z, h, w] -> [B, 3, 8h, 8w]. `up[i]` is level i (3 = lowest resolution), run from 3 down
    to 0, with num_res_blocks + 1 ResNets each."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        chans = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.z_channels, chans[-1], 3, padding=1)
        self.mid = MidBlock(chans[-1], p.num_groups)
        levels, c_in = [], chans[-1]
        for i in reversed(range(len(chans))):
            level = _level([c_in] + [chans[i]] * (p.num_res_blocks + 1), p.num_groups)
            if i != 0:
                level.upsample = Upsample(chans[i])
            levels.insert(0, level)  # so that up[i] is level i
            c_in = chans[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = GroupNorm(p.num_groups, c_in)
        self.conv_out = nn.Conv2d(c_in, p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # [B, 512, h, w]
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, 3, 8h, 8w]


# ---- large inputs: overlapping tiles, blended linearly ------------------------------------------------

def _starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis of length n: every tile is full-size, the last one flush with the end."""
    if n <= tile:
        return [0]
    return list(range(0, n - tile, tile - overlap)) + [n - tile]


def _ramp(n: int, ramp: int, first: bool, last: bool) -> Tensor:
    """Blend weights along one tile axis: 1 inside, rising linearly over `ramp` samples on each side
    that borders another tile. Two complementary ramps sum to exactly 1; all weights are > 0."""
    w = torch.ones(n)
    r = torch.arange(1, ramp + 1, dtype=torch.float32) / (ramp + 1)
    if not first:
        w[:ramp] = r
    if not last:
        w[n - ramp:] = torch.minimum(w[n - ramp:], r.flip(0))
    return w


def tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, factor: Fraction) -> Tensor:
    """fn on overlapping `tile` x `tile` windows of x [B, C, H, W] (stride tile - overlap), the
    outputs blended with linear ramps over the overlaps. fn maps [B, C, h, w] to
    [B, C', h*factor, w*factor]; the result is float32 [B, C', H*factor, W*factor]."""
    H, W = x.shape[-2:]
    out = weight = None
    ramp = int(overlap * factor)
    for top in _starts(H, tile, overlap):
        for left in _starts(W, tile, overlap):
            y = fn(x[..., top:top + tile, left:left + tile]).float()
            th, tw = y.shape[-2:]
            if out is None:
                out = y.new_zeros(*y.shape[:2], int(H * factor), int(W * factor))
                weight = y.new_zeros(int(H * factor), int(W * factor))
            w = (_ramp(th, ramp, top == 0, top + tile >= H)[:, None] *
                 _ramp(tw, ramp, left == 0, left + tile >= W)[None, :]).to(y.device)  # [th, tw]
            t0, l0 = int(top * factor), int(left * factor)
            out[..., t0:t0 + th, l0:l0 + tw] += y * w
            weight[t0:t0 + th, l0:l0 + tw] += w
    return out / weight


class AutoEncoder(nn.Module):
    # Memory budget: one encoder/decoder call sees at most this many image pixels (batch x H x W).
    # A larger batch is cut into chunks (exact); one larger image goes through tiles of `tile_size`
    # pixels (approximate). Measured peaks at the FLUX size (CPU, 512x512, above the weights): decode
    # 4.3 kB/pixel in fp32, 2.9 in bf16; encode 3.1 in fp32. So 2 Mpx ~ 9 GB (fp32), a 1024-px tile ~ 4.5 GB.
    max_pixels: int = 2048 * 1024
    tile_size: int = 1024  # tile edge in image pixels when tiling kicks in; overlap is a quarter
    logvar_range = (-30.0, 20.0)  # clamp before exp(0.5 logvar), as diffusers (BFL: none)

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor, self.shift_factor = params.scale_factor, params.shift_factor

    def encode(self, x: Tensor, *, sample: bool = False, generator: torch.Generator | None = None,
               tile: int | None = None) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] (H, W multiples of 8) -> latents scale*(z - shift),
        float32 [B, 16, H/8, W/8]. z is the posterior mean, or with sample=True mean + std * noise,
        the noise drawn with `generator` (on its device, in float32) and logvar clamped to [-30, 20].
        tile: None tiles only images above `max_pixels`, 0 never, N uses N-pixel tiles (N % 32 == 0)."""
        p, f = self.params, self.params.downsample
        if x.ndim != 4 or x.shape[1] != p.in_channels:
            raise ValueError(f"expected images [B, {p.in_channels}, H, W], got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        if H % f or W % f:
            raise FluxMinimalError(f"image size {W}x{H} (WxH) is not a multiple of {f}: the VAE halves it "
                                   f"{f.bit_length() - 1} times. Resize or crop it first (FLUX needs multiples "
                                   f"of {2 * f}, e.g. {W // (2 * f) * 2 * f}x{H // (2 * f) * 2 * f}).")
        weight = self.encoder.conv_in.weight
        x = x.to(device=weight.device, dtype=weight.dtype)
        moments = self._in_pieces(self.encoder, x, tile, px_per_unit=1, factor=Fraction(1, f))
        mean, logvar = moments.chunk(2, dim=1)  # the posterior, in float32 whatever the weights (fp32 island)
        if sample:
            std = torch.exp(0.5 * logvar.clamp(*self.logvar_range))
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32,
                                device=generator.device if generator is not None else mean.device)
            mean = mean + std * noise.to(mean.device)
        return self.scale_factor * (mean - self.shift_factor)

    def decode(self, z: Tensor, *, tile: int | None = None) -> Tensor:
        """Latents [B, 16, h, w] (as encode returns them) -> images float32 [B, 3, 8h, 8w], nominally
        in [-1, 1] but not clamped (the pipeline clamps). tile: as in encode, in image pixels."""
        p = self.params
        if z.ndim != 4 or z.shape[1] != p.z_channels:
            raise ValueError(f"expected latents [B, {p.z_channels}, h, w], got {tuple(z.shape)}")
        weight = self.decoder.conv_in.weight
        z = (z.float() / self.scale_factor + self.shift_factor).to(device=weight.device, dtype=weight.dtype)
        return self._in_pieces(self.decoder, z, tile, px_per_unit=p.downsample, factor=Fraction(p.downsample))

    def _in_pieces(self, fn: nn.Module, x: Tensor, tile: int | None, px_per_unit: int, factor: Fraction) -> Tensor:
        """fn(x), with the batch in chunks of at most `max_pixels` image pixels and each image in tiles
        when asked (tile > 0) or when it alone exceeds the budget (tile None). x is [B, C, h, w], one
        unit of h and w being px_per_unit image pixels."""
        f = self.params.downsample
        if tile is not None and (tile < 0 or tile % (4 * f)):
            raise FluxMinimalError(f"tile={tile}: use None (automatic), 0 (never tile) or a positive multiple "
                                   f"of {4 * f} pixels (the overlap, a quarter tile, must fall on the latent grid).")
        pixels = x.shape[-2] * x.shape[-1] * px_per_unit**2  # of one image
        if tile is None:
            tile = self.tile_size if pixels > self.max_pixels else 0
        t = tile // px_per_unit  # tile edge in units of x
        tiling = t > 0 and max(x.shape[-2:]) > t
        chunk = max(1, self.max_pixels // (min(pixels, tile * tile) if tiling else pixels))  # images per call
        return torch.cat([tiled(fn, xs, t, t // 4, factor) if tiling else fn(xs).float() for xs in x.split(chunk)])


# ---- loading ------------------------------------------------------------------------------------------

def linear_as_conv1x1(ts: list[Tensor]) -> Tensor:
    """diffusers keeps the attention projections as Linear [C, C]; BFL as 1x1 conv [C, C, 1, 1]."""
    return ts[0][:, :, None, None]


_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_from_diffusers(levels: int = 4) -> list[Rule]:
    """diffusers AutoencoderKL keys onto ours (docs/flux.md 4.5); {i} is a ResNet within a level.
    The decoder's levels are numbered the other way round: our up.{n} is diffusers' up_blocks.{levels-1-n}.
    conv_in and conv_out keep their names (no rule)."""
    resnets = [(f"encoder.down.{n}.block.{{i}}", f"encoder.down_blocks.{n}.resnets.{{i}}") for n in range(levels)]
    resnets += [(f"decoder.up.{n}.block.{{i}}", f"decoder.up_blocks.{levels - 1 - n}.resnets.{{i}}")
                for n in range(levels)]
    convs = [(f"encoder.down.{n}.downsample.conv", f"encoder.down_blocks.{n}.downsamplers.0.conv")
             for n in range(levels - 1)]
    convs += [(f"decoder.up.{n}.upsample.conv", f"decoder.up_blocks.{levels - 1 - n}.upsamplers.0.conv")
              for n in range(1, levels)]
    rules = []
    for side in ("encoder", "decoder"):
        resnets += [(f"{side}.mid.block_1", f"{side}.mid_block.resnets.0"),
                    (f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")]
        convs += [(f"{side}.norm_out", f"{side}.conv_norm_out"),
                  (f"{side}.mid.attn_1.norm", f"{side}.mid_block.attentions.0.group_norm")]
        for ours, theirs in _ATTN.items():
            a, b = f"{side}.mid.attn_1.{ours}", f"{side}.mid_block.attentions.0.{theirs}"
            rules += [Rule(f"{a}.weight", f"{b}.weight", linear_as_conv1x1), Rule(f"{a}.bias", f"{b}.bias")]
    rules += [Rule(f"{a}.{ours}.{{w}}", f"{b}.{theirs}.{{w}}") for a, b in resnets for ours, theirs in _RESNET.items()]
    rules += [Rule(f"{a}.{{w}}", f"{b}.{{w}}") for a, b in convs]
    return rules


VAE_FROM_DIFFUSERS = vae_from_diffusers(4)  # the FLUX VAE's four levels

AE_NAMES = ("ae.safetensors",)
CONFIG_KEY = "flux_minimal.config"  # safetensors metadata of files we write: the full configuration
DIFFUSERS_SINGLE = ("diffusion_pytorch_model.safetensors",)
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_PROBE = "encoder.down_blocks.0.resnets.0.conv1.weight"  # a key only a diffusers VAE has


def _require_vae(ckpt: Checkpoint, probe: str) -> None:
    if probe not in ckpt or "decoder.conv_in.weight" not in ckpt:
        raise WeightsError(f"{ckpt.name} is not a FLUX VAE checkpoint: it has no {probe} / decoder.conv_in.weight "
                           f"(its keys start {ckpt.keys()[:3]}). Pass ae.safetensors or the vae/ folder. "
                           f"{WEIGHTS_HELP}")
    if "quant_conv.weight" in ckpt or "post_quant_conv.weight" in ckpt:
        raise WeightsError(f"{ckpt.name} has quant_conv weights: it is a Stable Diffusion-family VAE, not the FLUX "
                           f"VAE (16 latent channels, no quant convs). Use FLUX.1-Fill-dev's ae.safetensors or vae/. "
                           f"{WEIGHTS_HELP}")


def ae_params_from_bfl(ckpt: Checkpoint) -> AutoEncoderParams:
    """Infer the configuration of an ae.safetensors from its shapes. GroupNorm is 32 groups (fixed in
    BFL's code); scale and shift are FLUX's, as the file does not hold them. A file we wrote ourselves
    (`save_vae`) carries its whole configuration in the safetensors metadata, which wins."""
    _require_vae(ckpt, "encoder.conv_in.weight")
    meta = ckpt.files[0].metadata.get(CONFIG_KEY)
    if meta:
        return AutoEncoderParams(**json.loads(meta))
    keys = ckpt.keys()
    ch, in_channels = ckpt.shape("encoder.conv_in.weight")[:2]
    levels = count_blocks(keys, "encoder.down")
    try:
        ch_mult = tuple(ckpt.shape(f"encoder.down.{n}.block.0.conv1.weight")[0] // ch for n in range(levels))
    except KeyError as e:
        raise WeightsError(f"{ckpt.name}: missing {e} (needed to infer the VAE's configuration). "
                           f"{WEIGHTS_HELP}") from None
    out_ch = ckpt.shape("decoder.conv_out.weight")[0] if "decoder.conv_out.weight" in ckpt else 3
    return AutoEncoderParams(in_channels=in_channels, ch=ch, out_ch=out_ch, ch_mult=ch_mult,
                             num_res_blocks=count_blocks(keys, "encoder.down.0.block"),
                             z_channels=ckpt.shape("decoder.conv_in.weight")[1], num_groups=32)


def ae_params_from_diffusers(cfg: dict, where: Path) -> AutoEncoderParams:
    """An AutoencoderKL config.json; missing scale/shift take diffusers' defaults (0.18215, none)."""
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL" or "block_out_channels" not in cfg:
        raise WeightsError(f"{where}/config.json describes a {cfg.get('_class_name', 'unknown model')}, not an "
                           f"AutoencoderKL: is this the vae/ folder? {WEIGHTS_HELP}")
    boc = list(cfg["block_out_channels"])
    if any(c % boc[0] for c in boc):
        raise WeightsError(f"{where}/config.json: block_out_channels {boc} are not multiples of the first.")
    return AutoEncoderParams(
        in_channels=cfg.get("in_channels", 3), ch=boc[0], out_ch=cfg.get("out_channels", 3),
        ch_mult=tuple(c // boc[0] for c in boc), num_res_blocks=cfg.get("layers_per_block", 1),
        z_channels=cfg.get("latent_channels", 4), scale_factor=cfg.get("scaling_factor", 0.18215),
        shift_factor=cfg.get("shift_factor") or 0.0, num_groups=cfg.get("norm_num_groups", 32))


def find_vae(path: str | Path) -> tuple[Checkpoint, AutoEncoderParams, list[Rule]]:
    """Resolve any accepted layout to (checkpoint, configuration, key rules)."""
    path = Path(path)
    if path.is_dir() and (path / "vae").is_dir():  # a Hugging Face snapshot root
        path = path / "vae"
    elif path.is_dir() and (path / AE_NAMES[0]).is_file():  # a BFL snapshot root
        path = path / AE_NAMES[0]
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder. {WEIGHTS_HELP}")
    if path.is_dir():
        ckpt, folder = open_checkpoint(path, DIFFUSERS_SINGLE, DIFFUSERS_INDEX), path
    else:
        ckpt, folder = Checkpoint([path]), path.parent
        if DIFFUSERS_PROBE not in ckpt:
            return ckpt, ae_params_from_bfl(ckpt), []
    cfg = read_config(folder)  # a diffusers VAE, a folder or its file: the config sits beside the weights
    if cfg is None:
        raise WeightsError(f"{folder} has diffusers VAE weights but no config.json. {WEIGHTS_HELP}")
    params = ae_params_from_diffusers(cfg, folder)
    _require_vae(ckpt, DIFFUSERS_PROBE)
    return ckpt, params, vae_from_diffusers(len(params.ch_mult))


def save_vae(vae: AutoEncoder, path: str | Path) -> None:
    """Write an ae.safetensors (BFL names) with the configuration in its metadata."""
    from .files import save_safetensors
    save_safetensors(vae.state_dict(), path, metadata={CONFIG_KEY: json.dumps(asdict(vae.params))})


def load_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> AutoEncoder:
    """Load the FLUX VAE from BFL's `ae.safetensors` (configuration inferred from the shapes), a
    diffusers `vae/` folder (its config.json read), or a snapshot root holding either. Tensors are
    viewed from a memory map; dtype=None keeps the file's dtype (fp32 for FLUX)."""
    ckpt, params, rules = find_vae(path)
    with torch.device("meta"):
        model = AutoEncoder(params)
    return load_state(model, ckpt, rules, device=device, dtype=dtype, what="FLUX VAE").eval()
