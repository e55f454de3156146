"""Attention, rotary position embedding and the timestep embedding: the only place they live.

`attention` is the one switch point for attention backends: every block of the MM-DiT calls it,
so a faster kernel plugs in here (`register_attention_backend`) and nowhere else. Built in:
"sdpa" (torch picks the kernel), and "flash", "cudnn", "efficient", "math", which force one of
torch's scaled-dot-product kernels (`set_attention_backend(name, device, dtype)` checks that it
runs there). The profiler (`python -m flux_bench.profile`) shows which kernel ran.
`observe_attention(fn)` lets a reader see the rotated q and k of every attention call without
changing it (`python -m infer.explain` computes attention probabilities beside the fused kernel).
"""

import math
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q, k, v: [B, H, L, D] -> [B, H, L, D]. No mask: FLUX attends to every token."""
    return F.scaled_dot_product_attention(q, k, v)


def forced_sdpa(kernel: SDPBackend) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """sdpa restricted to one of torch's kernels (an error, not a silent fallback, if it cannot run)."""
    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel([kernel]):
            return F.scaled_dot_product_attention(q, k, v)
    return fn


_BACKENDS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "sdpa": sdpa,
    "flash": forced_sdpa(SDPBackend.FLASH_ATTENTION),
    "cudnn": forced_sdpa(SDPBackend.CUDNN_ATTENTION),
    "efficient": forced_sdpa(SDPBackend.EFFICIENT_ATTENTION),
    "math": forced_sdpa(SDPBackend.MATH),
}
ATTENTION_BACKENDS = tuple(_BACKENDS)
_backend = "sdpa"
_observer: Callable[[Tensor, Tensor], None] | None = None


def register_attention_backend(name: str, fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
    """Add a backend: fn(q, k, v) with [B, H, L, D] tensors, returning [B, H, L, D]."""
    _BACKENDS[name] = fn


def set_attention_backend(name: str, device: "torch.device | str | None" = None, dtype: torch.dtype | None = None,
                          head_dim: int = 128) -> None:
    """Route every attention through backend `name`. With a device (and dtype), first check that it
    runs there at FLUX's head size, and say so plainly if not (e.g. flash needs a GPU and bf16/fp16)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; registered: {sorted(_BACKENDS)}")
    if device is not None:
        q = torch.zeros(1, 1, 16, head_dim, device=device, dtype=dtype or torch.float32)
        try:
            _BACKENDS[name](q, q, q)
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
            raise ValueError(f"attention backend {name!r} cannot run on {torch.device(device)} in "
                             f"{dtype or torch.float32}: {reason}. Use 'sdpa' to let torch choose.") from None
    _backend = name


def attention_backend() -> str:
    return _backend


@contextmanager
def observe_attention(fn: Callable[[Tensor, Tensor], None]) -> Iterator[None]:
    """Within the block, fn(q, k) sees the rotated q, k [B, H, L, D] of every attention call, just
    before the backend runs on them; fn must not modify them. One observer at a time."""
    global _observer
    if _observer is not None:
        raise RuntimeError("attention is already observed (one observer at a time)")
    _observer = fn
    try:
        yield
    finally:
        _observer = None


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """Rotate q and k by `pe`, attend, and merge the heads.

    q, k, v: [B, H, L, D]; pe: [B, 1, L, D/2, 2, 2] -> [B, L, H*D]
    """
    q, k = apply_rope(q, k, pe)
    if _observer is not None:  # a reader (observe_attention); the attention below is unchanged
        _observer(q, k)
    x = _BACKENDS[_backend](q, k, v)
    return rearrange(x, "B H L D -> B L (H D)")


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotation matrices for one id axis.

    pos: [B, L] positions -> [B, L, dim/2, 2, 2], where pair j turns by the angle pos * theta^(-2j/dim).
    Computed in float64 and returned in float32, so large positions keep their precision.
    """
    assert dim % 2 == 0
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta**scale)  # [dim/2]
    angle = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)  # [B, L, dim/2]
    out = torch.stack([torch.cos(angle), -torch.sin(angle), torch.sin(angle), torch.cos(angle)], dim=-1)
    return rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2).float()


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of q and k, in float32 (an fp32 island), then
    cast back. xq, xk: [B, H, L, D]; freqs_cis: [B, 1, L, D/2, 2, 2]."""
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)  # [B, H, L, D/2, 1, 2]
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]  # [B, H, L, D/2, 2]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t (sigma in [0, 1], or the raw guidance scale), cos first.

    t is multiplied by `time_factor` (1000) in its own dtype, as BFL does: guidance 30 in bf16 is
    embedded as 29952. The frequencies and the product are float32; the result has t's dtype.
    t: [B] -> [B, dim]
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        emb = emb.to(t)
    return emb
