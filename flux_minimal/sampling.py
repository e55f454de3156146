"""Rectified-flow sampling for FLUX Fill, shared by inference and training.

    noise  [B, 16, H/8, W/8] (seeded CPU generator) --pack--> x [B, L, 64], L = (H/16)(W/16)
    cond   masked image latent (64) + pixel mask 8x8-unshuffled (256) = img_cond [1, L, 320]
Sizes are FLUX's, whose VAE downsamples 8x (`down`); a VAE that downsamples d x gives latents
H/d x W/d, tokens of 2d x 2d pixels and a mask of 4d^2 channels (the miniature model: d = 4).
    loop   v = flux(cat(x, img_cond), ids, txt, vec, t, guidance);  x <- x + (t_prev - t) v
    x_t = (1 - t) x0 + t noise, so v ~ noise - x0, t = 1 is pure noise and x0 = x_t - t v.

Nothing about latents is written twice: training uses the same noise, packing, ids and
conditioning, and the objective is `flow_matching_mse` (`train/train.py`, the mini recipe).
"""

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import torch
from einops import rearrange
from torch import Tensor

if TYPE_CHECKING:
    from .mmdit import Flux


def get_noise(seeds: list[int], height: int, width: int, channels: int = 16, down: int = 8) -> Tensor:
    """One noise per seed, [len(seeds), 16, H/down, W/down] float32 (H and W are pixel sizes, multiples
    of 2*down; `down` is the VAE's downsampling factor, 8 for FLUX's).

    Drawn on the CPU in float32 from `torch.Generator().manual_seed(seed)`, so a seed gives the same
    image on any device and in any dtype. Candidate i of a batch is exactly the noise of its own seed.
    """
    shape = (1, channels, 2 * math.ceil(height / (2 * down)), 2 * math.ceil(width / (2 * down)))
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(s), dtype=torch.float32)
                      for s in seeds])


def pack(x: Tensor) -> Tensor:
    """Latent image -> token sequence: [B, C, H, W] -> [B, (H/2)(W/2), 4C]."""
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(x: Tensor, height: int, width: int, down: int = 8) -> Tensor:
    """Token sequence -> latent image: [B, L, 4C] -> [B, C, H/down, W/down] for pixel sizes H, W."""
    return rearrange(x, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=math.ceil(height / (2 * down)),
                     w=math.ceil(width / (2 * down)), ph=2, pw=2)


def image_ids(batch: int, height: int, width: int, device=None, down: int = 8) -> Tensor:
    """Position ids (0, row, col) of the packed tokens, row-major like `pack`: [B, L, 3] float32."""
    h, w = math.ceil(height / (2 * down)), math.ceil(width / (2 * down))
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1)


def pack_mask(mask: Tensor, down: int = 8) -> Tensor:
    """Pixel mask [B, 1, H, W] (1 = generate) -> [B, L, 256]: each 8x8 pixel block becomes 64
    channels (index ph*8 + pw), then 2x2 packing like the latents. The mask is never resized.
    (A d x d block and 4d^2 channels for a VAE that downsamples d x.)"""
    mask = rearrange(mask[:, 0], "b (h ph) (w pw) -> b (ph pw) h w", ph=down, pw=down)  # [B, down^2, H/down, W/down]
    return pack(mask)


def fill_conditioning(vae, image: Tensor, mask: Tensor) -> Tensor:
    """FLUX Fill's conditioning: cat(pack(vae.encode(image * (1 - mask))), pack_mask(mask)).

    image [B, 3, H, W] in [-1, 1]; mask [B, 1, H, W] in {0, 1}, 1 where the model generates.
    Returns img_cond [B, L, 320] in float32; the model input is cat(x [B, L, 64], img_cond).
    (With a VAE that downsamples d x: [B, L, 64 + 4d^2].)
    """
    masked = image * (1 - mask)  # the hole becomes 0: mid-gray
    latent = vae.encode(masked.to(next(vae.parameters()).dtype)).float()  # [B, 16, H/8, W/8]
    return torch.cat([pack(latent), pack_mask(mask.float().to(latent.device), vae_down(vae))], dim=-1)


def encode_fill_example(vae, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """A training example of Fill (an ICEdit diptych with the right half masked, or any inpainting):
    x0 = pack(vae.encode(image)) [B, L, 64], the latent the model learns to produce, and its
    conditioning img_cond [B, L, 320] (`fill_conditioning`), both float32. image [B, 3, H, W] in
    [-1, 1]; mask [B, 1, H, W] (or [1, 1, H, W]), 1 where the model generates."""
    x0 = pack(vae.encode(image.to(next(vae.parameters()).dtype)).float())
    return x0, fill_conditioning(vae, image, mask.expand(image.shape[0], -1, -1, -1))


def vae_down(vae) -> int:
    """The VAE's downsampling factor (8 for FLUX's); 8 for objects that do not say."""
    params = getattr(vae, "params", None)
    return params.downsample if params is not None else 8


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> Callable[[float], float]:
    m = (y2 - y1) / (x2 - x1)
    return lambda x: m * x + (y1 - m * x1)


def get_schedule(num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15,
                 shift: bool = True) -> list[float]:
    """num_steps + 1 sigmas from 1 to 0. FLUX's exponential time shift: mu goes linearly from
    base_shift at 256 tokens to max_shift at 4096 (not clamped outside), and
    sigma(t) = e^mu / (e^mu + 1/t - 1), which spends more steps at high noise for larger images."""
    timesteps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps[:-1] = time_shift(mu, 1.0, timesteps[:-1])  # t = 0 stays 0
    return timesteps.tolist()


@dataclass
class Conditioning:
    """Everything the model sees besides x and t, with batch 1 (shared by all candidates) or B."""

    img_ids: Tensor  # [1|B, L, 3]
    txt: Tensor  # [1|B, T, 4096]
    txt_ids: Tensor  # [1|B, T, 3]
    vec: Tensor  # [1|B, 768]
    img_cond: Tensor | None = None  # [1|B, L, 320] for Fill; None for a plain text-to-image FLUX

    @classmethod
    def of(cls, txt: Tensor, vec: Tensor, img_cond: Tensor | None, height: int, width: int,
           down: int = 8) -> "Conditioning":
        """The conditioning of B images of height x width pixels: their token positions, the prompt
        embeddings txt [B, T, d] with FLUX's all-zero text ids, the pooled vec [B, d'] and img_cond."""
        B, dev = txt.shape[0], txt.device
        return cls(image_ids(B, height, width, dev, down), txt, torch.zeros(B, txt.shape[1], 3, device=dev), vec, img_cond)

    def expand(self, batch: int) -> "Conditioning":
        """Views with batch `batch`: the candidates share one copy of text and conditioning."""
        def e(t):
            return None if t is None else t.expand(batch, *t.shape[1:])
        return Conditioning(e(self.img_ids), e(self.txt), e(self.txt_ids), e(self.vec), e(self.img_cond))


@dataclass
class DenoiseState:
    """The sampler's state after `step` of the len(timesteps) - 1 Euler steps."""

    x: Tensor  # [B, L, 64] float32, the latent at sigma = timesteps[step]
    timesteps: list[float]
    step: int = 0
    x0: Tensor | None = None  # [B, L, 64] predicted clean latent x_t - t v of the last model call
    nfe: int = 0  # function evaluations so far, counted per sample: a step of a batch of M counts M

    @property
    def done(self) -> bool:
        return self.step == len(self.timesteps) - 1

    def select(self, index: int | list[int]) -> "DenoiseState":
        """The state of some candidates only, to resume them (e.g. the tournament's winner)."""
        idx = [index] if isinstance(index, int) else index
        return replace(self, x=self.x[idx], x0=None if self.x0 is None else self.x0[idx])


@dataclass
class StepInputs:
    """What every denoising step of one edit shares or knows in advance (`precompute_steps`):
    the rotary table and, for each of S steps, every block's adaLN vectors."""

    pe: Tensor  # [B, 1, T+L, head_dim/2, 2, 2] float32
    adaln: list[Tensor]  # per double block, single block, then the final layer: [S, B, 1, k D]

    def step(self, i: int | Tensor) -> "StepInputs":
        """Step i's inputs (i an int, or a 1-element device tensor: CUDA graphs replay it)."""
        if isinstance(i, Tensor):
            return StepInputs(self.pe, [m.index_select(0, i)[0] for m in self.adaln])
        return StepInputs(self.pe, [m[i] for m in self.adaln])


@torch.no_grad()
def precompute_steps(model: "Flux", timesteps: Tensor, y: Tensor, guidance: Tensor | None, txt_ids: Tensor,
                     img_ids: Tensor) -> StepInputs:
    """The model inputs of S steps made at once: timesteps [S] sigmas, y [B, vec_in_dim], guidance [B].

    The adaLN vectors depend only on (t, guidance, pooled text) and the rotary table only on the
    ids, all known before the first step: one GEMM per block over all steps instead of one per step
    (the modulation weights, a quarter of the model, are read once per edit). Row s * B + b of each
    batched GEMM is step s of sample b; the maths is the per-step path's."""
    S, B = timesteps.shape[0], y.shape[0]
    vec = model.embed_vec(timesteps[:, None].expand(S, B).reshape(-1), y.repeat(S, 1),
                          None if guidance is None else guidance.repeat(S))  # [S B, D]
    adaln = [m.unflatten(0, (S, B)) for m in model.adaln(vec)]  # [S, B, 1, k D] each
    return StepInputs(model.rope(txt_ids, img_ids), adaln)


def _precomputable(model, device: torch.device) -> bool:
    """A FLUX whose weights all sit on `device` (not block-streamed from host memory)."""
    return (all(hasattr(model, f) for f in ("embed_vec", "adaln", "rope"))
            and all(p.device == device for p in model.parameters()))


@torch.no_grad()
def denoise(model, state: DenoiseState, cond: Conditioning, guidance: float, stop: int | None = None,
            callback: Callable[[DenoiseState], None] | None = None, precompute: bool = True) -> DenoiseState:
    """Euler steps from state.step up to `stop` (default: the end). Resuming the returned state
    later continues exactly where it stopped.

    The latent stays float32 between steps (an fp32 island; the model runs in its own dtype).
    BFL does the update in bf16 and diffusers rounds the latent to bf16 after each step; float32
    removes that drift and costs nothing next to the transformer.
    With `precompute` (and a FLUX on one device), every step's adaLN vectors and the rotary table
    are made before the first step (`precompute_steps`); nothing in a step then waits for the host.
    """
    start, stop = state.step, len(state.timesteps) - 1 if stop is None else stop
    x, x0, B = state.x, state.x0, state.x.shape[0]
    c = cond.expand(B)
    dtype = getattr(model, "compute_dtype", None) or next(model.parameters()).dtype
    g = torch.full((B,), guidance, device=x.device)
    pre = None
    if precompute and stop > start and _precomputable(model, x.device):
        # every step of the schedule, whatever the range: a resumed run then uses the very same
        # vectors (one GEMM of the same shape) and continues bit for bit
        sigmas = torch.tensor(state.timesteps[:-1], dtype=torch.float32).to(x.device, non_blocking=True)
        pre = precompute_steps(model, sigmas, c.vec, g, c.txt_ids, c.img_ids)
    for i in range(start, stop):
        t_cur, t_prev = state.timesteps[i], state.timesteps[i + 1]
        t = torch.full((B,), t_cur, device=x.device) if pre is None else None  # (pre holds what t gives)
        made = {} if pre is None else {"pe": pre.pe, "adaln": pre.step(i).adaln}
        inp = x if c.img_cond is None else torch.cat([x, c.img_cond], dim=-1)
        v = model(img=inp.to(dtype), img_ids=c.img_ids, txt=c.txt, txt_ids=c.txt_ids, timesteps=t, y=c.vec,
                  guidance=g, **made).float()
        x0 = x - t_cur * v
        x = x + (t_prev - t_cur) * v
        state = replace(state, x=x, x0=x0, step=i + 1, nfe=state.nfe + B)
        if callback is not None:
            callback(state)
    return state


def noisy_sample(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t noise, t [B] broadcast over [B, L, C]: the forward process for training."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def flow_matching_mse(model, x0: Tensor, noise: Tensor, t: Tensor, cond: Conditioning, guidance: Tensor,
                      dtype: torch.dtype | None = None, per_token: bool = False) -> Tensor:
    """The training objective of FLUX and ICEdit (rectified flow), per sample: the model's velocity
    at x_t = (1 - t) x0 + t noise against the target noise - x0, as a mean squared error [B] in
    float32 ([B, L] with per_token). x0, noise [B, L, 64]; t, guidance [B]; cond as at inference
    (Fill: img_cond is cat'ed to x_t). Shared by fine-tuning (train/train.py), the mini recipe's
    base stage and its quick experiments (mini_world/quick.py)."""
    x_t = noisy_sample(x0, noise, t)
    inp = x_t if cond.img_cond is None else torch.cat([x_t, cond.img_cond], dim=-1)
    v = model(img=inp.to(dtype or x_t.dtype), img_ids=cond.img_ids, txt=cond.txt, txt_ids=cond.txt_ids, timesteps=t,
              y=cond.vec, guidance=guidance)
    err = (v.float() - (noise - x0)).square().mean(dim=-1)  # [B, L]
    return err if per_token else err.mean(dim=1)
