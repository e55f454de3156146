"""Small helpers shared by the tests (oracles are imported by the tests themselves)."""

import threading

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


# ---- a stub OpenAI-compatible chat server (the `stub` fixture in conftest.py) ----

class Stub:
    """What the server does: `reply(request_json, n)` -> (status, body, delay_s); n counts from 0."""

    def __init__(self):
        self.requests: list[dict] = []  # {"path", "headers", "body"}
        self.reply = lambda body, n: (200, chat("1"), 0.0)
        self.stop = threading.Event()


def chat(text: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
