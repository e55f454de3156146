"""Memory modes for GPUs smaller than the whole model (bf16: DiT 23.8 GB, T5 9.5 GB, CLIP 0.25 GB).

    none    everything on the GPU                                   peak ~ 34 GB + activations
    model   one big model on the GPU at a time: the text encoders   peak ~ DiT 23.8 GB + VAE
            visit it to encode, then the DiT                          + activations
    blocks  as `model`, and the DiT keeps only as many blocks        peak ~ fits the card
            resident as fit; the others visit it one at a time

A module that "visits" keeps its weights in host memory (pinned when possible) and gets device
copies for its turn; leaving the GPU only drops those copies, so nothing is ever copied back.
weights.md gives the peak of each mode for a 512x1024 diptych.
"""

import torch
from torch import nn

OFFLOAD_MODES = ("none", "model", "blocks")


class Visitor:
    """Modules whose weights live in host memory and visit `device` on demand."""

    def __init__(self, modules: list[nn.Module], device: torch.device, pin: bool = True):
        self.device = torch.device(device)
        self.tensors = [t for m in modules for t in [*m.parameters(), *m.buffers()]]
        self.host = []
        for t in self.tensors:
            h = t.detach().to("cpu")
            if pin and self.device.type == "cuda":
                try:
                    h = h.pin_memory()  # pinned: fast, asynchronous host-to-device copies
                except RuntimeError:  # pinning fails when host memory is short: stay pageable
                    pass
            self.host.append(h)
            t.data = h
        self.visiting = False

    def arrive(self) -> None:
        if not self.visiting:
            for t, h in zip(self.tensors, self.host):
                t.data = h.to(self.device, non_blocking=True)
            self.visiting = True

    def leave(self) -> None:
        """Drop the device copies (the host copies are the weights: nothing is copied back)."""
        if self.visiting:
            for t, h in zip(self.tensors, self.host):
                t.data = h
            self.visiting = False


def nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def offload_dit(model: nn.Module, device: torch.device, budget_bytes: float = float("inf")) -> Visitor:
    """Host-resident FLUX: its blocks stay with the rest while they fit in `budget_bytes`; every
    other block visits the device for its own forward only (hooks). Returns the visitor of the
    resident part, which the pipeline sends away while the text encoders run."""
    resident, used = [m for n, m in model.named_children() if n not in ("double_blocks", "single_blocks")], 0
    for block in [*model.double_blocks, *model.single_blocks]:
        size = nbytes(block)
        if used + size <= budget_bytes:
            resident.append(block)
            used += size
            continue
        v = Visitor([block], device)
        block.register_forward_pre_hook(lambda m, args, v=v: v.arrive())
        block.register_forward_hook(lambda m, args, out, v=v: v.leave())
    return Visitor(resident, device)


def block_budget(device: torch.device, headroom_gib: float = 4.0) -> int:
    """Bytes of DiT blocks that may stay on `device`: its free memory minus a headroom for the
    activations, the VAE and the CUDA workspace."""
    free = torch.cuda.mem_get_info(device)[0] if torch.device(device).type == "cuda" else 0
    return max(0, int(free - headroom_gib * 2**30))
