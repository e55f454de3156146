"""Small helpers shared by the tests (oracles are imported by the tests themselves)."""

import torch
from torch import Tensor, nn


def rel_err(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@torch.no_grad()
def randomize_(module: nn.Module, std: float = 0.2, seed: int = 0) -> nn.Module:
    """Fill every parameter with N(0, std) noise: zero-initialised layers (adaLN, LoRA B) would
    otherwise hide bugs behind zeros; norm scales get 1 + noise."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
        if name.endswith(("scale", "norm.weight", "norm1.weight", "norm2.weight")) and p.ndim == 1:
            noise = noise + 1.0
        p.copy_(noise.to(p.dtype))
    return module
