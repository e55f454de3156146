"""The fast paths of the denoising loop: regional compilation and CUDA graphs.

    pipe = ICEditPipeline.from_pretrained(..., device="cuda", compile=True, cuda_graphs=True)
    python -m infer.edit ... --compile --cuda-graphs      # the same from the command line

Regional compilation (`compile_blocks`): torch.compile each transformer block instead of the
whole model. The 19 double blocks run one code object, and so do the 38 single blocks, so dynamo
traces and Inductor compiles one graph per kind of block (its weights are graph inputs) and every
block of that kind reuses it: compile time is that of two blocks, not of 57. Inductor fuses what
runs between the GEMMs (RMSNorm, RoPE, modulation, gates, GELU) into a few kernels.

CUDA graphs (`GraphedDenoiser`): one denoising step is captured once per shape and replayed, so the
~1,500 kernel launches of a step cost one launch. A graph reads and writes fixed addresses, so the
step is written over static buffers: the latent, the conditioning, every step's adaLN vectors
(`sampling.precompute_steps`, [S, B, 1, k D]), the sigmas, and a step counter on the device that selects the
step's row. Nothing in the step may wait for the host (no `.item()`, no `nonzero`, no bincount:
flux_kernels/lora_moe.py groups tokens without them). On a CPU the same step runs eagerly over the same
buffers: that is how the tests check it against `sampling.denoise`.
"""

import time
from collections import OrderedDict
from dataclasses import replace
from typing import Callable

import torch

from flux_minimal.mmdit import Flux
from flux_minimal.sampling import Conditioning, DenoiseState, StepInputs, precompute_steps


def compile_blocks(flux: Flux, **options) -> int:
    """Compile every block's `forward` in place (torch.compile); returns how many. The first forward
    pays the compile time (see `first_call_seconds` in the pipeline's report).

    The blocks' `forward`, not the modules (`nn.Module.compile` compiles `_call_impl`, hooks
    included): with offload="blocks" each block's hooks swap its weights in and out (infer/offload.py),
    and traced hooks would give one graph per block and hit dynamo's recompile limit. Here the hooks
    run eagerly around the compiled forward, which sees the weights as graph inputs."""
    blocks = [*flux.double_blocks, *flux.single_blocks]
    for block in blocks:
        block.forward = torch.compile(block.forward, **options)
    return len(blocks)


class GraphedDenoiser:
    """`sampling.denoise` for one FLUX on one device, with the step captured as a CUDA graph once per
    (batch, image tokens, text tokens, steps); eager over the same static buffers on a CPU.

    Memory: the captures share one memory pool (nothing a capture allocates outlives it: the static
    buffers are allocated before), so a graph's activations are reserved once for all of them, and at
    most `max_graphs` stay captured (least recently used out: the early filter's M-candidate graph
    does not keep M steps of activations for the life of the process).
    A graph holds the addresses of the DiT's weights: whoever moves the weights (offload="model"
    sends the DiT away while the text encoders run) must call `drop()` first."""

    def __init__(self, flux: Flux, max_graphs: int = 2):
        self.flux, self.max_graphs = flux, max_graphs
        self.graphs: OrderedDict[tuple, "_Captured"] = OrderedDict()
        self.pool = None  # torch.cuda.graph_pool_handle(), made at the first capture
        self.captures = 0

    def drop(self) -> None:
        """Forget every captured graph (their memory returns to the allocator)."""
        self.graphs.clear()

    @torch.no_grad()
    def denoise(self, state: DenoiseState, cond: Conditioning, guidance: float, stop: int | None = None,
                callback: Callable[[DenoiseState], None] | None = None) -> DenoiseState:
        stop = len(state.timesteps) - 1 if stop is None else stop
        B = state.x.shape[0]
        c = cond.expand(B)
        key = (B, state.x.shape[1], c.txt.shape[1], len(state.timesteps), c.img_cond is not None)
        if key in self.graphs:
            self.graphs.move_to_end(key)
        else:
            while len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
            if self.pool is None and state.x.is_cuda:
                self.pool = torch.cuda.graph_pool_handle()
            self.graphs[key] = _Captured(self.flux, state, c, self.pool)
            self.captures += 1
        return self.graphs[key].run(state, c, guidance, stop, callback)


class _Captured:
    """Static buffers and (on CUDA) the graph of one step over them."""

    def __init__(self, flux: Flux, state: DenoiseState, c: Conditioning, pool=None):
        self.flux, dev = flux, state.x.device
        self.dtype = flux.compute_dtype
        self.x, self.x0 = state.x.clone(), state.x.clone()  # [B, L, 64] float32
        self.img_cond = None if c.img_cond is None else c.img_cond.clone()
        self.txt, self.img_ids, self.txt_ids = c.txt.clone(), c.img_ids.clone(), c.txt_ids.clone()
        self.sigmas = torch.tensor(state.timesteps, dtype=torch.float32, device=dev)  # [S + 1]
        self.i = torch.zeros(1, dtype=torch.int64, device=dev)
        g = torch.zeros(state.x.shape[0], device=dev)
        self.pre = precompute_steps(flux, self.sigmas[:-1], c.vec, g, c.txt_ids, c.img_ids)  # shapes only, for now
        self.graph, self.pool = None, pool
        self.capture_seconds = 0.0
        if dev.type == "cuda":
            self._capture()

    def _step(self) -> None:
        """x <- x + (sigma[i+1] - sigma[i]) v, x0 <- x - sigma[i] v, over the static buffers."""
        i = self.i
        pre = self.pre.step(i)
        t_cur, t_prev = self.sigmas.index_select(0, i), self.sigmas.index_select(0, i + 1)  # [1]
        inp = self.x if self.img_cond is None else torch.cat([self.x, self.img_cond], dim=-1)
        v = self.flux(img=inp.to(self.dtype), img_ids=self.img_ids, txt=self.txt, txt_ids=self.txt_ids,
                      timesteps=None, y=None, pe=pre.pe, adaln=pre.adaln).float()
        self.x0.copy_(self.x - t_cur * v)
        self.x.add_((t_prev - t_cur) * v)

    def _capture(self) -> None:
        t0 = time.perf_counter()
        x = self.x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream (Triton and cuBLAS set up)
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self._step()
        self.x.copy_(x)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0

    def run(self, state: DenoiseState, c: Conditioning, guidance: float, stop: int,
            callback: Callable[[DenoiseState], None] | None) -> DenoiseState:
        # This edit's inputs into the static buffers (the same shapes by construction of the key).
        g = torch.full((state.x.shape[0],), guidance, device=state.x.device)
        sigmas = torch.tensor(state.timesteps, dtype=torch.float32).to(self.sigmas.device, non_blocking=True)
        fresh: StepInputs = precompute_steps(self.flux, sigmas[:-1], c.vec, g, c.txt_ids, c.img_ids)
        for dst, src in zip([self.pre.pe, *self.pre.adaln], [fresh.pe, *fresh.adaln]):
            dst.copy_(src)
        for dst, src in ((self.x, state.x), (self.sigmas, sigmas), (self.txt, c.txt), (self.img_ids, c.img_ids),
                         (self.txt_ids, c.txt_ids), (self.img_cond, c.img_cond)):
            if dst is not None:
                dst.copy_(src)
        B = state.x.shape[0]
        for i in range(state.step, stop):
            self.i.fill_(i)
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            state = replace(state, x=self.x.clone(), x0=self.x0.clone(), step=i + 1, nfe=state.nfe + B)
            if callback is not None:
                callback(state)
        return state

