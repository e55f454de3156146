"""The FLUX MM-DiT (rectified-flow transformer), parameter names = the BFL checkpoint keys.

    img [B, L, in] --img_in--> [B, L, D]          txt [B, T, 4096] --txt_in--> [B, T, D]
    vec = time_in(emb(t)) + guidance_in(emb(g)) + vector_in(y)          [B, D]
    adaLN: every block's (shift, scale, gate) vectors = lin(SiLU(vec))  [B, 1, k D]
    19 x DoubleStreamBlock: separate weights per stream, one joint attention over [txt; img]
    38 x SingleStreamBlock: one stream x = [txt; img], attention and MLP in parallel
    final_layer(x[:, T:], its adaLN) -> velocity [B, L, 64]

The adaLN vectors and the rotary table depend only on (t, guidance, pooled text) and on the
position ids, all known before sampling starts: `Flux.precompute` makes them for every step of an
edit at once (one GEMM per block over all steps instead of one per step: the modulation weights,
a quarter of the model, are read once per edit), and `forward(..., pre=...)` takes them.

Exact maths (and the traps) in docs/flux.md sections 1 and 2.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .config import FluxParams
from .errors import WeightsError
from .loading import (WEIGHTS_HELP, Checkpoint, Rule, cat_rows, count_blocks, load_state, open_checkpoint,
                      read_config, swap_halves)
from .ops import attention, rope, timestep_embedding


class EmbedND(nn.Module):
    """Position ids [B, L, n_axes] -> rotations [B, 1, L, head_dim/2, 2, 2], axes concatenated."""

    def __init__(self, dim: int, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, axes_dim

    def forward(self, ids: Tensor) -> Tensor:
        emb = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return emb.unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + 1e-6) in float32, back to x's dtype, times a learned scale."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Only a container of weights (qkv, norm, proj): the joint attention runs in the block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


@dataclass
class ModulationOut:
    shift: Tensor  # [B, 1, D]
    scale: Tensor
    gate: Tensor

    def apply(self, x_normed: Tensor) -> Tensor:
        return (1 + self.scale) * x_normed + self.shift


def modulation_outs(mod: Tensor, n: int) -> list[ModulationOut]:
    """[B, 1, 3n D] adaLN vectors -> n (shift, scale, gate) triples, in the checkpoint's order."""
    c = mod.chunk(3 * n, dim=-1)
    return [ModulationOut(*c[3 * j:3 * j + 3]) for j in range(n)]


class Modulation(nn.Module):
    """adaLN: lin(SiLU(vec)) -> [B, 1, k D], read as (shift, scale, gate) once (k = 3) or twice (k = 6)."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> Tensor:
        return self.lin(nn.functional.silu(vec))[:, None, :]


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        for s in ("img", "txt"):  # two streams, identical shapes, separate weights
            setattr(self, f"{s}_mod", Modulation(hidden_size, double=True))
            setattr(self, f"{s}_norm1", _layer_norm(hidden_size))
            setattr(self, f"{s}_attn", SelfAttention(hidden_size, num_heads, qkv_bias))
            setattr(self, f"{s}_norm2", _layer_norm(hidden_size))
            setattr(self, f"{s}_mlp", nn.Sequential(
                nn.Linear(hidden_size, mlp_hidden_dim, bias=True),
                nn.GELU(approximate="tanh"),
                nn.Linear(mlp_hidden_dim, hidden_size, bias=True),
            ))

    def _qkv(self, attn: SelfAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = rearrange(attn.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = attn.norm(q, k, v)
        return q, k, v

    def adaln(self, vec: Tensor) -> Tensor:
        """[B, D] -> [B, 1, 12 D]: img_mod's two (shift, scale, gate) triples, then txt_mod's."""
        return torch.cat((self.img_mod(vec), self.txt_mod(vec)), dim=-1)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor | None, pe: Tensor,
                mod: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """img [B, L, D], txt [B, T, D], vec [B, D] or its precomputed mod = self.adaln(vec)
        [B, 1, 12 D], pe the rotary table. (The adaLN is computed here, in the block's own forward,
        so that wrappers of the block, FSDP or offloading, have its weights in place.)"""
        img_mod1, img_mod2, txt_mod1, txt_mod2 = modulation_outs(self.adaln(vec) if mod is None else mod, 4)

        img_q, img_k, img_v = self._qkv(self.img_attn, img_mod1.apply(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self._qkv(self.txt_attn, txt_mod1.apply(self.txt_norm1(txt)))

        # joint attention over the concatenated sequence, text first
        q = torch.cat((txt_q, img_q), dim=2)  # [B, H, T+L, D]
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe=pe)  # [B, T+L, H*D]
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(img_mod2.apply(self.img_norm2(img)))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(txt_mod2.apply(self.txt_norm2(txt)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention and MLP: linear1 makes [q k v | mlp_in], linear2 reads [attn | gelu(mlp)]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = _layer_norm(hidden_size)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def adaln(self, vec: Tensor) -> Tensor:
        """[B, D] -> [B, 1, 3 D]: one (shift, scale, gate) triple."""
        return self.modulation(vec)

    def forward(self, x: Tensor, vec: Tensor | None, pe: Tensor, mod: Tensor | None = None) -> Tensor:
        """x [B, T+L, D], vec [B, D] or its precomputed mod = self.adaln(vec) [B, 1, 3 D], pe the
        rotary table."""
        (mod,) = modulation_outs(self.adaln(vec) if mod is None else mod, 1)
        qkv, mlp = torch.split(self.linear1(mod.apply(self.pre_norm(x))),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe)  # [B, T+L, D]
        out = self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))
        return x + mod.gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def adaln(self, vec: Tensor) -> Tensor:
        """[B, D] -> [B, 1, 2 D]: shift, then scale (diffusers' norm_out: scale first)."""
        return self.adaLN_modulation(vec)[:, None, :]

    def forward(self, x: Tensor, mod: Tensor) -> Tensor:
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


@dataclass
class StepInputs:
    """What every denoising step of one edit shares or knows in advance (`Flux.precompute`):
    the rotary table and, for each of S steps, every block's adaLN vectors."""

    pe: Tensor  # [B, 1, T+L, head_dim/2, 2, 2] float32
    adaln: list[Tensor]  # per double block, single block, then the final layer: [S, B, 1, k D]

    def step(self, i: int | Tensor) -> "StepInputs":
        """Step i's inputs (i an int, or a 1-element device tensor: CUDA graphs replay it)."""
        if isinstance(i, Tensor):
            return StepInputs(self.pe, [m.index_select(0, i)[0] for m in self.adaln])
        return StepInputs(self.pe, [m[i] for m in self.adaln])


class Flux(nn.Module):
    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        p = params
        self.in_channels, self.out_channels = p.in_channels, p.out_channels
        self.hidden_size, self.num_heads = p.hidden_size, p.num_heads
        self.pe_embedder = EmbedND(dim=p.head_dim, theta=p.theta, axes_dim=p.axes_dim)
        self.img_in = nn.Linear(p.in_channels, p.hidden_size, bias=True)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        self.guidance_in = MLPEmbedder(256, p.hidden_size) if p.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias) for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single_blocks))
        self.final_layer = LastLayer(p.hidden_size, p.out_channels)
        self.gradient_checkpointing = False  # recompute each block in backward (training)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype activations run in: the weights', or with FP8 weights the biases' (bf16)."""
        return self.img_in.bias.dtype

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def embed_vec(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None) -> Tensor:
        """The conditioning vector [B, D] from sigma [B], pooled CLIP [B, vec_in_dim], guidance [B]."""
        # Everything enters in the weights' dtype; sigma and guidance are rounded to it before the
        # x1000 of the embedding, as in BFL and diffusers (guidance 30 in bf16 -> 29952).
        dtype = self.compute_dtype
        vec = self.time_in(timestep_embedding(timesteps.to(dtype), 256))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this model is guidance-distilled: pass `guidance` (e.g. 50.0 for ICEdit)")
            vec = vec + self.guidance_in(timestep_embedding(guidance.to(dtype), 256))
        return vec + self.vector_in(y.to(dtype))

    def adaln(self, vec: Tensor) -> list[Tensor]:
        """Every block's adaLN vectors, then the final layer's: [N, 1, k D] each for vec [N, D]."""
        return [b.adaln(vec) for b in (*self.double_blocks, *self.single_blocks, self.final_layer)]

    def rope(self, txt_ids: Tensor, img_ids: Tensor) -> Tensor:
        """The rotary table of the joint sequence [txt; img]: [B, 1, T+L, head_dim/2, 2, 2] float32."""
        return self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

    @torch.no_grad()
    def precompute(self, timesteps: Tensor, y: Tensor, guidance: Tensor | None, txt_ids: Tensor,
                   img_ids: Tensor) -> StepInputs:
        """The inputs of S steps at once: timesteps [S] sigmas, y [B, vec_in_dim], guidance [B].
        Row s * B + b of each batched GEMM is step s of sample b; the maths is the per-step path's."""
        S, B = timesteps.shape[0], y.shape[0]
        vec = self.embed_vec(timesteps[:, None].expand(S, B).reshape(-1), y.repeat(S, 1),
                             None if guidance is None else guidance.repeat(S))  # [S B, D]
        adaln = [m.unflatten(0, (S, B)) for m in self.adaln(vec)]  # [S, B, 1, k D] each
        return StepInputs(self.rope(txt_ids, img_ids), adaln)

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor | None,
                y: Tensor | None, guidance: Tensor | None = None, pre: StepInputs | None = None) -> Tensor:
        """img [B, L, in_channels], img_ids [B, L, 3], txt [B, T, context_in_dim], txt_ids [B, T, 3],
        timesteps sigma in [0, 1] [B], y pooled CLIP [B, vec_in_dim], guidance raw scale [B]
        -> velocity [B, L, out_channels]. With `pre` (one step of `precompute`), timesteps, y and
        guidance are not read, and neither are the ids."""
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(f"img and txt must be [B, L, C]; got {tuple(img.shape)} and {tuple(txt.shape)}")
        dtype = self.compute_dtype
        if pre is None:  # each block makes its adaLN vectors from vec in its own forward
            vec = self.embed_vec(timesteps, y, guidance)
            pe, mods = self.rope(txt_ids, img_ids), [None] * (len(self.double_blocks) + len(self.single_blocks))
            mods.append(self.final_layer.adaln(vec))
        else:
            vec, pe, mods = None, pre.pe, pre.adaln
        img, txt = self.img_in(img.to(dtype)), self.txt_in(txt.to(dtype))
        mods = iter(mods)

        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, pe, next(mods))
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = self._run(block, x, vec, pe, next(mods))
        return self.final_layer(x[:, txt.shape[1]:], next(mods))  # [B, L, out_channels]


# ---- loading ------------------------------------------------------------------------------------

# diffusers' FluxTransformer2DModel keys onto ours. Fused BFL weights are row concatenations of
# diffusers' separate projections; the final norm's halves are swapped (docs/flux.md section 3.2).
FLUX_FROM_DIFFUSERS = [
    Rule("img_in.{w}", "x_embedder.{w}"),
    Rule("txt_in.{w}", "context_embedder.{w}"),
    Rule("time_in.in_layer.{w}", "time_text_embed.timestep_embedder.linear_1.{w}"),
    Rule("time_in.out_layer.{w}", "time_text_embed.timestep_embedder.linear_2.{w}"),
    Rule("guidance_in.in_layer.{w}", "time_text_embed.guidance_embedder.linear_1.{w}"),
    Rule("guidance_in.out_layer.{w}", "time_text_embed.guidance_embedder.linear_2.{w}"),
    Rule("vector_in.in_layer.{w}", "time_text_embed.text_embedder.linear_1.{w}"),
    Rule("vector_in.out_layer.{w}", "time_text_embed.text_embedder.linear_2.{w}"),
    Rule("double_blocks.{i}.img_mod.lin.{w}", "transformer_blocks.{i}.norm1.linear.{w}"),
    Rule("double_blocks.{i}.txt_mod.lin.{w}", "transformer_blocks.{i}.norm1_context.linear.{w}"),
    Rule("double_blocks.{i}.img_attn.qkv.{w}", ("transformer_blocks.{i}.attn.to_q.{w}",
         "transformer_blocks.{i}.attn.to_k.{w}", "transformer_blocks.{i}.attn.to_v.{w}"), cat_rows),
    Rule("double_blocks.{i}.txt_attn.qkv.{w}", ("transformer_blocks.{i}.attn.add_q_proj.{w}",
         "transformer_blocks.{i}.attn.add_k_proj.{w}", "transformer_blocks.{i}.attn.add_v_proj.{w}"), cat_rows),
    Rule("double_blocks.{i}.img_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_q.weight"),
    Rule("double_blocks.{i}.img_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_k.weight"),
    Rule("double_blocks.{i}.txt_attn.norm.query_norm.scale", "transformer_blocks.{i}.attn.norm_added_q.weight"),
    Rule("double_blocks.{i}.txt_attn.norm.key_norm.scale", "transformer_blocks.{i}.attn.norm_added_k.weight"),
    Rule("double_blocks.{i}.img_attn.proj.{w}", "transformer_blocks.{i}.attn.to_out.0.{w}"),
    Rule("double_blocks.{i}.txt_attn.proj.{w}", "transformer_blocks.{i}.attn.to_add_out.{w}"),
    Rule("double_blocks.{i}.img_mlp.0.{w}", "transformer_blocks.{i}.ff.net.0.proj.{w}"),
    Rule("double_blocks.{i}.img_mlp.2.{w}", "transformer_blocks.{i}.ff.net.2.{w}"),
    Rule("double_blocks.{i}.txt_mlp.0.{w}", "transformer_blocks.{i}.ff_context.net.0.proj.{w}"),
    Rule("double_blocks.{i}.txt_mlp.2.{w}", "transformer_blocks.{i}.ff_context.net.2.{w}"),
    Rule("single_blocks.{i}.modulation.lin.{w}", "single_transformer_blocks.{i}.norm.linear.{w}"),
    Rule("single_blocks.{i}.linear1.{w}", ("single_transformer_blocks.{i}.attn.to_q.{w}",
         "single_transformer_blocks.{i}.attn.to_k.{w}", "single_transformer_blocks.{i}.attn.to_v.{w}",
         "single_transformer_blocks.{i}.proj_mlp.{w}"), cat_rows),
    Rule("single_blocks.{i}.norm.query_norm.scale", "single_transformer_blocks.{i}.attn.norm_q.weight"),
    Rule("single_blocks.{i}.norm.key_norm.scale", "single_transformer_blocks.{i}.attn.norm_k.weight"),
    Rule("single_blocks.{i}.linear2.{w}", "single_transformer_blocks.{i}.proj_out.{w}"),
    Rule("final_layer.linear.{w}", "proj_out.{w}"),
    Rule("final_layer.adaLN_modulation.1.{w}", "norm_out.linear.{w}", swap_halves),
]

BFL_NAMES = ("flux1-fill-dev.safetensors", "flux1-dev.safetensors")
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_SINGLE = ("diffusion_pytorch_model.safetensors",)
COMFY_PREFIX = "model.diffusion_model."


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """(16, 56, 56) for FLUX's head_dim 128; the same proportions (d/8, 7d/16, 7d/16) otherwise."""
    a0 = head_dim // 8
    return a0, (head_dim - a0) // 2, (head_dim - a0) // 2


def flux_params_from_bfl(ckpt: Checkpoint) -> FluxParams:
    """Infer the configuration of a BFL single file from its tensor shapes."""
    keys = ckpt.keys()
    if "img_in.weight" not in ckpt:
        raise WeightsError(f"{ckpt.name} has no img_in.weight: it is not a FLUX transformer checkpoint. "
                           f"{WEIGHTS_HELP}")
    hidden, in_channels = ckpt.shape("img_in.weight")
    depth, depth_single = count_blocks(keys, "double_blocks"), count_blocks(keys, "single_blocks")
    norm_key = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    head_dim = ckpt.shape(norm_key)[0]
    mlp_hidden = (ckpt.shape("double_blocks.0.img_mlp.0.weight")[0] if depth
                  else ckpt.shape("single_blocks.0.linear1.weight")[0] - 3 * hidden)
    return FluxParams(
        in_channels=in_channels, out_channels=ckpt.shape("final_layer.linear.weight")[0],
        vec_in_dim=ckpt.shape("vector_in.in_layer.weight")[1], context_in_dim=ckpt.shape("txt_in.weight")[1],
        hidden_size=hidden, mlp_ratio=mlp_hidden / hidden, num_heads=hidden // head_dim, depth=depth,
        depth_single_blocks=depth_single, axes_dim=default_axes_dim(head_dim),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in ckpt or depth == 0,
        guidance_embed="guidance_in.in_layer.weight" in ckpt)


def flux_params_from_diffusers(cfg: dict) -> FluxParams:
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    return FluxParams(
        in_channels=cfg["in_channels"], out_channels=cfg.get("out_channels") or cfg["in_channels"],
        vec_in_dim=cfg["pooled_projection_dim"], context_in_dim=cfg["joint_attention_dim"],
        hidden_size=heads * head_dim, num_heads=heads, depth=cfg["num_layers"],
        depth_single_blocks=cfg["num_single_layers"],
        axes_dim=tuple(cfg.get("axes_dims_rope") or default_axes_dim(head_dim)),
        guidance_embed=cfg.get("guidance_embeds", False))


def find_flux(path: str | Path) -> tuple[Checkpoint, FluxParams, list[Rule]]:
    """Resolve any accepted layout to (checkpoint, configuration, key rules)."""
    path = Path(path)
    if path.is_dir() and (path / "transformer").is_dir():  # a Hugging Face snapshot root
        path = path / "transformer"
    if path.is_dir():  # a snapshot root with a BFL single file beside the folders (Fill first)
        bfl = [path / n for n in BFL_NAMES if (path / n).is_file()] or \
              sorted(path.glob("flux1-*.safetensors"), key=lambda f: ("fill" not in f.name, f.name))
        if bfl:
            path = bfl[0]
    if path.is_dir():
        ckpt = open_checkpoint(path, DIFFUSERS_SINGLE, DIFFUSERS_INDEX)
        cfg = read_config(path)
        if cfg is None:
            raise WeightsError(f"{path} has diffusers weights but no config.json. {WEIGHTS_HELP}")
        return ckpt, flux_params_from_diffusers(cfg), FLUX_FROM_DIFFUSERS
    if not path.exists():
        raise WeightsError(f"{path}: no such file or folder. {WEIGHTS_HELP}")
    ckpt = Checkpoint([path], prefix=COMFY_PREFIX)
    return ckpt, flux_params_from_bfl(ckpt), []


def load_flux(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
              fp8: bool = False, lora: "str | Path | None" = None, lora_scale: float = 1.0) -> Flux:
    """Load the FLUX transformer from a BFL single file (`flux1-fill-dev.safetensors`, also with a
    `model.diffusion_model.` prefix), a diffusers `transformer/` folder (sharded or not), or a
    snapshot root holding either. dtype=None keeps the file's dtype.

    fp8=True: every linear weight becomes float8_e4m3fn with a scale per output channel
    (flux_minimal/fp8.py), quantized as it is read, one tensor at a time; the rest (norms, biases)
    and the compute take `dtype` (default bf16). `lora`: a plain LoRA added to the weights before
    they are quantized (its MoE parts, if any, go on afterwards: lora.load_lora(..., only_moe=True)).
    Files already in float8 load as they are, with their scales when present."""
    ckpt, params, rules = find_flux(path)
    with torch.device("meta"):
        model = Flux(params)
    float8 = [k for k in ckpt.keys() if ckpt.dtype(k) in (torch.float8_e4m3fn, torch.float8_e5m2)]
    if not fp8:
        if float8:
            raise WeightsError(f"{ckpt.name} holds FP8 weights ({float8[0]}, ...): load it with fp8=True (--fp8)")
        if lora is not None:
            raise ValueError("load_flux(lora=...) merges while quantizing (fp8=True); otherwise use lora.load_lora")
        return load_state(model, ckpt, rules, device=device, dtype=dtype, what="FLUX transformer").eval()
    from .fp8 import load_fp8
    from .lora import plain_lora_updates
    updates = plain_lora_updates(model, lora, lora_scale) if lora is not None else {}
    load_fp8(model, ckpt, rules, device=device, dtype=dtype or torch.bfloat16, what="FLUX transformer",
             updates=updates)
    return model.eval()


def require_fill(model: Flux, path: str | Path = "the checkpoint", down: int = 8) -> None:
    """ICEdit needs FLUX.1 Fill (384 input channels); say so plainly when given another FLUX.
    (`down`: the VAE's downsampling factor; a Fill model takes 64 + 64 + 4 down^2 channels.)"""
    n = model.params.in_channels
    if n != 128 + 4 * down * down:
        kind = {64: "FLUX.1 [dev] (or schnell)", 128: "FLUX.1 Canny/Depth [dev]"}.get(n, f"a {n}-channel FLUX")
        raise WeightsError(f"{path} is {kind}: its img_in takes {n} channels, but ICEdit inpaints with "
                           f"FLUX.1 Fill [dev], which takes 384 (noisy latent 64 + masked image 64 + mask 256). "
                           f"Download black-forest-labs/FLUX.1-Fill-dev. {WEIGHTS_HELP}")
