"""Memory modes for GPUs smaller than the whole model (bf16: DiT 23.8 GB, T5 9.5 GB, CLIP 0.25 GB).

    none    everything on the GPU                                   peak ~ 34 GB + activations
    model   one big model on the GPU at a time: the text encoders   peak ~ DiT 23.8 GB + VAE
            visit it to encode, then the DiT                          + activations
    blocks  as `model`, and the DiT keeps only as many blocks        peak ~ fits the card
            resident as fit; the others visit it one at a time

A module that "visits" keeps its weights in host memory (pinned when possible) and gets device
copies for its turn; leaving the GPU only drops those copies, so nothing is ever copied back.
Streamed blocks are prefetched: while block i computes, block i+1 is copied on a side CUDA stream
(`BlockStream`), so the copies hide behind the compute as far as PCIe bandwidth allows.
weights.md gives the peak of each mode for a 512x1024 diptych.
"""

import torch
from torch import nn



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


class BlockStream:
    """Blocks that visit the device in turn, each for its own forward (hooks), the next one copied
    on a side stream while the current one computes (CUDA; on a CPU they simply visit)."""

    def __init__(self, blocks: list[nn.Module], device: torch.device):
        self.device = torch.device(device)
        self.visitors = [Visitor([b], self.device) for b in blocks]
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.copied: dict[int, torch.cuda.Event] = {}  # prefetched block -> its copy's completion
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda m, args, i=i: self.enter(i))
            block.register_forward_hook(lambda m, args, out, i=i: self.visitors[i].leave())

    def fetch(self, i: int) -> None:
        v = self.visitors[i]
        if v.visiting:
            return
        if self.side is None:
            v.arrive()
            return
        with torch.cuda.stream(self.side):
            v.arrive()  # asynchronous copies from pinned memory, queued on the side stream
            self.copied[i] = torch.cuda.Event()
            self.copied[i].record(self.side)

    def enter(self, i: int) -> None:
        self.fetch(i)
        done = self.copied.pop(i, None)
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)  # the compute stream waits for the copy, the host does not
            for t in self.visitors[i].tensors:
                t.data.record_stream(compute)  # memory made on the side stream, used on this one
        self.fetch((i + 1) % len(self.visitors))  # the next block (the first again for the next step)


def offload_dit(model: nn.Module, device: torch.device, budget_bytes: float = float("inf")) -> Visitor:
    """Host-resident FLUX: its blocks stay with the rest while they fit in `budget_bytes`; every
    other block visits the device for its own forward only, the next one prefetched (BlockStream).
    Returns the visitor of the resident part, which the pipeline sends away while the text
    encoders run."""
    resident, streamed, used = [m for n, m in model.named_children() if n not in ("double_blocks", "single_blocks")], [], 0
    for block in [*model.double_blocks, *model.single_blocks]:
        size = nbytes(block)
        if used + size <= budget_bytes:
            resident.append(block)
            used += size
        else:
            streamed.append(block)
    if streamed:
        BlockStream(streamed, device)  # lives on in the blocks' hooks
    return Visitor(resident, device)


def block_budget(device: torch.device, headroom_gib: float = 4.0) -> int:
    """Bytes of DiT blocks that may stay on `device`: its free memory minus a headroom for the
    activations, the VAE and the CUDA workspace."""
    free = torch.cuda.mem_get_info(device)[0] if torch.device(device).type == "cuda" else 0
    return max(0, int(free - headroom_gib * 2**30))
