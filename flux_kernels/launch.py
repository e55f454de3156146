"""What every kernel launch in this folder shares."""

from contextlib import nullcontext

import torch
from torch import Tensor


def on_device(t: Tensor):
    """Triton launches on the *current* CUDA device, not on its arguments': enter the tensor's
    device around a launch (a pipeline on cuda:1 while the current device is 0 would otherwise run
    GPU-1 pointers on GPU 0). A no-op off CUDA (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()
