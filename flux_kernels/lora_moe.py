"""Top-1 routed LoRA-MoE linear layer (ICEdit's MoE-LoRA on `ff.net.2` and `proj_out`).

The math, for x [T, K], W [N, K], b [N] or None, A [E, r, K], B [E, N, r], R [E, K], scale s:

    logits = x R^T                       [T, E]
    e_t    = topk(logits_t, k=1)         the token's expert; softmax over one kept logit = 1.0
    y_t    = W x_t + b + s * B_e (A_e x_t)

Backward (g_t = B_e^T dy_t is the LoRA-down of the output gradient):

    dx_t = W^T dy_t + s * A_e^T g_t      dA_e = s * sum_{t: e_t = e} g_t x_t^T
    dW   = dy^T x,  db = sum_t dy_t      dB_e = s * sum_{t: e_t = e} dy_t h_t^T,  h_t = A_e x_t
    dR   = 0: with k = 1 the routing weight is softmax([v]) = 1.0 whatever v is, so the official
           layer's router gets an exactly zero gradient; we return zeros, as autograd does there.

Tie rule. The official layer routes with torch.topk(logits, k=1); torch does not promise which
index topk returns on ties (on CPU a row of four equal logits gives index 2, where argmax would
give 0). We keep topk, the official semantics, and both paths here call the same `route` on the
same tensor, so the kernel and the reference always pick the same expert.

Design (why it is shaped like this):
1. Routing in torch (`route`): a [T, K] x [K, E] GEMM and a top-1. Shared with the reference, so
   the routing decision is bit-identical on every device; ~0.1% of the FLOPs, one more read of x.
2. Tokens grouped by expert (`_group_by_expert`): a stable argsort of e, per-expert segments, and
   a tile table of at most T // BLOCK_T + E tiles, each holding up to BLOCK_T tokens of ONE expert.
   All torch ops on the device, no host sync, so the grid size is known without reading counts.
3. `_lora_down_kernel`: h = A_e x for each tile, a [BLOCK_T, K] x [K, r] dot with the tokens'
   rows gathered through the sort order. Each token does only its own expert's work (the
   reference does all E). K is split across programs (deterministic fp32 partials, summed in
   torch) so that the ~T / 64 tiles still fill the GPU while streaming x once.
4. `_lora_up_kernel`: y[rows] += s * h B_e^T per tile, one [BLOCK_T, r] x [r, BLOCK_N] dot. By
   default the base y = x W^T + b comes from cuBLAS (torch.addmm) and this kernel is a cheap
   in-place epilogue pass over y (reads and writes T x N once). With `fuse_base=True` the same
   kernel computes the base GEMM itself over the grouped rows and adds the LoRA term before its
   single store (the "GEMM with a LoRA epilogue" design). cuBLAS is the default because a Triton
   GEMM with gathered rows is unlikely to beat cuBLAS on Hopper without tuning we have not been
   able to do (nor is there an L2 tile swizzle yet); flux_bench/lora_moe.py times both, and
   FUSE_BASE_GEMM should be set to the winner once the README's table is filled.
5. Backward reuses the same kernels: g = B_e^T dy (down, over N), dx = dy W + s g A_e (up, over K),
   and `_lora_wgrad_kernel` for dA_e and dB_e: per expert, a sum over its tokens of outer
   products, as [BLOCK, BLOCK_T] x [BLOCK_T, BLOCK] dots; token ranges may be split across
   programs (fp32 partials). dW and db are plain torch matmul / sum, only when required.
All dots accumulate in fp32; outputs and the stored h, g are in x's dtype (the reference rounds
h to x's dtype too). fp32 inputs use IEEE dots unless torch allows TF32 for matmuls.

One switch point: `lora_moe_linear` runs the Triton path when x is on CUDA or when
TRITON_INTERPRET=1 (the tests run the kernels on the CPU that way), else the reference.
Layouts: the official checkpoint's per-expert keys stack into A = stack(lora_A.expert_i.weight)
[E, r, K], B = stack(lora_B.expert_i.weight) [E, N, r], R = lora_route.weight [E, K]; any strides
work (they are kernel arguments), but contiguous last dims are what make the loads fast.
All of x, W, b, A, B, R must share one dtype: fp32, bf16 or fp16.
"""

from __future__ import annotations

import functools
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from flux_kernels.launch import on_device

FUSE_BASE_GEMM = False  # default for the Triton path: cuBLAS base GEMM + Triton LoRA epilogue


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def route(x2d: Tensor, router: Tensor) -> tuple[Tensor, Tensor]:
    """Official top-1 routing: (kept logit, expert index), each [T, 1]. Ties: whatever
    torch.topk(k=1) returns on this device; both paths call this, so they always agree."""
    logits = F.linear(x2d, router)  # (T, E)
    return torch.topk(logits, k=1, dim=-1)


def lora_moe_linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                        lora_B: Tensor, router: Tensor, scale: float = 1.0) -> Tensor:
    """The oracle, as the official layer computes it: every expert densely for every token, masked
    by the routing weights (one 1.0 per token). The router gets a zero gradient (softmax of one)."""
    _check_args(x, weight, bias, lora_A, lora_B, router, dtypes=(*_KERNEL_DTYPES, torch.float64))
    x2 = x.reshape(-1, x.shape[-1])  # (T, K)
    top_val, top_idx = route(x2, router)
    gate = torch.zeros(x2.shape[0], router.shape[0], dtype=top_val.dtype, device=x.device)
    gate = gate.scatter(-1, top_idx, torch.softmax(top_val, dim=-1))  # (T, E), one 1.0 per row
    y = F.linear(x2, weight, bias)
    for i in range(lora_A.shape[0]):
        y = y + gate[:, i:i + 1] * (scale * F.linear(F.linear(x2, lora_A[i]), lora_B[i]))
    return y.reshape(*x.shape[:-1], weight.shape[0])


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_args(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                router: Tensor, dtypes: tuple[torch.dtype, ...] = _KERNEL_DTYPES) -> None:
    K, (N, Kw), (E, r, Ka), (Eb, Nb, rb), (Er, Kr) = (x.shape[-1], weight.shape, lora_A.shape,
                                                       lora_B.shape, router.shape)
    if not (K == Kw == Ka == Kr and N == Nb and E == Eb == Er and r == rb):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}, "
                         f"router {tuple(router.shape)}; want [..,K], [N,K], [E,r,K], [E,N,r], [E,K]")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    tensors = [t for t in (x, weight, bias, lora_A, lora_B, router) if t is not None]
    if len({t.dtype for t in tensors}) != 1 or x.dtype not in dtypes:
        raise TypeError(f"x, weight, bias, lora_A, lora_B, router must share one dtype among "
                        f"{dtypes}, got {[t.dtype for t in tensors]}")


@dataclass
class _Groups:
    """Tokens grouped by expert. Positions index `order`; a tile is [start, end) of one expert."""
    order: Tensor        # (T,) int64 token ids, stably sorted by expert
    seg_start: Tensor    # (E,) int32 first position of each expert's tokens in `order`
    seg_end: Tensor      # (E,) int32 one past the last
    tile_expert: Tensor  # (n_tiles,) int32 (padding tiles: E - 1 with start == end)
    tile_start: Tensor   # (n_tiles,) int32
    tile_end: Tensor     # (n_tiles,) int32
    block_t: int


def _group_by_expert(expert: Tensor, num_experts: int, block_t: int) -> _Groups:
    T, E = expert.shape[0], num_experts
    order = torch.argsort(expert, stable=True)
    # counts per expert as a scatter-add: bincount's output size depends on max(expert), so on CUDA
    # it reads it back to the host (a sync per call) and torch.compile cannot trace it.
    counts = torch.zeros(E, dtype=torch.int64, device=expert.device).scatter_add_(0, expert, torch.ones_like(expert))
    seg_end = counts.cumsum(0)
    seg_start = seg_end - counts
    tiles = (counts + block_t - 1) // block_t                     # (E,) tiles per expert
    tiles_end = tiles.cumsum(0)
    # sum_e ceil(c_e / BT) <= T // BT + E, and every tile holds >= 1 token: a sync-free bound.
    n_tiles = min(T // block_t + E, T)
    j = torch.arange(n_tiles, device=expert.device)
    te = torch.searchsorted(tiles_end, j, right=True)              # E for padding tiles
    valid = te < E
    te = te.clamp(max=E - 1)
    start = seg_start[te] + (j - (tiles_end[te] - tiles[te])) * block_t
    end = torch.minimum(start + block_t, seg_end[te])
    end = torch.where(valid, end, start)
    i32 = torch.int32
    return _Groups(order, seg_start.to(i32), seg_end.to(i32), te.to(i32), start.to(i32),
                   end.to(i32), block_t)


@triton.jit
def _mm(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. UPCAST (interpreter only): its tl.dot misreads bf16 (stored as uint16); the
    fp32 product of two bf16/fp16 values is exact, so upcasting does the same maths."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tile_rows(tile, order_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, BLOCK_T: tl.constexpr):
    """One tile of the grouping: its expert, its [start, end) in the sorted order, and its tokens
    (the rows to gather, masked past `end`)."""
    e = tl.load(tile_expert_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    pos = start + tl.arange(0, BLOCK_T)
    row_mask = pos < end
    tok = tl.load(order_ptr + pos, mask=row_mask, other=0).to(tl.int64)  # gathered rows
    return e, start, end, row_mask, tok


@triton.jit
def _gather_dot(acc, inp_ptr, stride_it, stride_id, tok, row_mask, w_ptr, stride_wd, stride_wc, offs_c, c_mask,
                d_lo, d_hi, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + inp[tok, d_lo:d_hi] @ w[d_lo:d_hi, offs_c]: the tile's gathered rows times a weight
    slice, over the reduction in BLOCK_D steps (no step when d_hi <= d_lo)."""
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d_hi
        a = tl.load(inp_ptr + tok[:, None] * stride_it + offs_d[None, :] * stride_id,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)      # (BT, BD)
        w = tl.load(w_ptr + offs_d[:, None] * stride_wd + offs_c[None, :] * stride_wc,
                    mask=d_mask[:, None] & c_mask[None, :], other=0.0)        # (BD, BC)
        acc = _mm(a, w, acc, UPCAST, PRECISION)
    return acc


@triton.jit
def _lora_down_kernel(
    inp_ptr, stride_it, stride_id,        # (T, D) activations: x (fwd) or dy (bwd)
    w_ptr, stride_we, stride_wr, stride_wd,  # (E, R, D) down weight: A, or B^T per expert (bwd)
    part_ptr, stride_ps, stride_pt,       # (S, T, R) fp32 partial sums, one slice per D-split
    order_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,  # _Groups
    D, R, d_per_split,                    # reduction size, rank, reduction length per split
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # part[s, t, :] = sum_{d in split s} inp[t, d] * w[e_t, :, d]   for the tokens t of one tile
    tile = tl.program_id(0)
    split = tl.program_id(1)
    e, start, end, row_mask, tok = _tile_rows(tile, order_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R  # r < 16 or not a power of two: padded with zeros
    d_lo = split * d_per_split
    d_hi = tl.minimum(d_lo + d_per_split, D)
    d_hi = tl.where(end > start, d_hi, d_lo)  # padding tiles skip the loop
    acc = _gather_dot(tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32), inp_ptr, stride_it, stride_id, tok, row_mask,
                      w_ptr + e.to(tl.int64) * stride_we, stride_wd, stride_wr, offs_r, r_mask, d_lo, d_hi,
                      BLOCK_D, UPCAST, PRECISION)
    tl.store(part_ptr + split * stride_ps + tok[:, None] * stride_pt + offs_r[None, :], acc,
             mask=row_mask[:, None] & r_mask[None, :])


@triton.jit
def _lora_up_kernel(
    h_ptr, stride_ht, stride_hr,          # (T, R) LoRA-down activations: h (fwd) or g (bwd)
    u_ptr, stride_ue, stride_ur, stride_uo,  # (E, R, O) up weight: B^T per expert, or A (bwd)
    out_ptr, stride_ot, stride_oo,        # (T, O) read-modify-write unless HAS_BASE
    inp_ptr, stride_it, stride_id,        # (T, D) base GEMM input x (fwd) or dy (bwd): HAS_BASE
    wb_ptr, stride_bd, stride_bo,         # (D, O) base weight W^T (fwd) or W (bwd): HAS_BASE
    bias_ptr,                             # (O,): HAS_BIAS
    order_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,  # _Groups
    O, R, D, scale,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BASE: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # out[t, o] = (HAS_BASE ? inp[t] @ wb[:, o] + bias[o] : out[t, o]) + scale * h[t] @ u[e_t, :, o]
    pid_o = tl.program_id(0)  # fastest: neighbouring programs share the tile's rows
    tile = tl.program_id(1)
    e, start, end, row_mask, tok = _tile_rows(tile, order_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr, BLOCK_T)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = offs_o < O
    out_ptrs = out_ptr + tok[:, None] * stride_ot + offs_o[None, :] * stride_oo
    out_mask = row_mask[:, None] & o_mask[None, :]
    if HAS_BASE:
        d_end = tl.where(end > start, D, 0)  # padding tiles skip the loop
        acc = _gather_dot(tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32), inp_ptr, stride_it, stride_id, tok,
                          row_mask, wb_ptr, stride_bd, stride_bo, offs_o, o_mask, 0, d_end, BLOCK_D, UPCAST, PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    else:
        acc = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    h = tl.load(h_ptr + tok[:, None] * stride_ht + offs_r[None, :] * stride_hr,
                mask=row_mask[:, None] & r_mask[None, :], other=0.0)          # (BT, BR)
    u = tl.load(u_ptr + e.to(tl.int64) * stride_ue + offs_r[:, None] * stride_ur
                + offs_o[None, :] * stride_uo, mask=r_mask[:, None] & o_mask[None, :], other=0.0)
    lora = _mm(h, u, tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32), UPCAST, PRECISION)
    acc += scale * lora
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _lora_wgrad_kernel(
    p_ptr, stride_pt, stride_pa,          # (T, DA): g (for dA) or dy (for dB)
    q_ptr, stride_qt, stride_qb,          # (T, DB): x (for dA) or h (for dB)
    part_ptr, stride_ps, stride_pe, stride_pda,  # (S, E, DA, DB) fp32 partials, last dim contiguous
    order_ptr, seg_start_ptr, seg_end_ptr,     # _Groups
    DA, DB, num_splits, scale,
    BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # part[s, e, a, b] = scale * sum_{t of expert e, in token chunk s} p[t, a] * q[t, b]
    pid_ab = tl.program_id(0)
    e = tl.program_id(1)
    split = tl.program_id(2)
    num_b = tl.cdiv(DB, BLOCK_B)
    offs_a = (pid_ab // num_b) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = (pid_ab % num_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    a_mask = offs_a < DA
    b_mask = offs_b < DB
    seg_lo = tl.load(seg_start_ptr + e)
    seg_hi = tl.load(seg_end_ptr + e)
    chunk = tl.cdiv(tl.cdiv(seg_hi - seg_lo, num_splits), BLOCK_T) * BLOCK_T
    lo = seg_lo + split * chunk
    hi = tl.minimum(lo + chunk, seg_hi)
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for p0 in range(lo, hi, BLOCK_T):  # empty experts: no iterations, zeros stored
        pos = p0 + tl.arange(0, BLOCK_T)
        t_mask = pos < hi
        tok = tl.load(order_ptr + pos, mask=t_mask, other=0).to(tl.int64)
        p = tl.load(p_ptr + tok[:, None] * stride_pt + offs_a[None, :] * stride_pa,
                    mask=t_mask[:, None] & a_mask[None, :], other=0.0)        # (BT, BA)
        q = tl.load(q_ptr + tok[:, None] * stride_qt + offs_b[None, :] * stride_qb,
                    mask=t_mask[:, None] & b_mask[None, :], other=0.0)        # (BT, BB)
        acc = _mm(tl.trans(p), q, acc, UPCAST, PRECISION)
    tl.store(part_ptr + split * stride_ps + e * stride_pe + offs_a[:, None] * stride_pda
             + offs_b[None, :], acc * scale, mask=a_mask[:, None] & b_mask[None, :])


@dataclass(frozen=True)
class Blocks:
    t: int = 64          # tokens per tile (shared by the down and up kernels: one tile table)
    d_down: int = 128    # reduction block of the down kernel
    o: int = 128         # output columns per program of the up kernel
    d_base: int = 64     # reduction block of the fused base GEMM (fuse_base=True)
    wg_a: int = 64       # wgrad output block, rows
    wg_b: int = 128      # wgrad output block, columns
    wg_t: int = 32       # wgrad token block (the dot's reduction)
    num_warps: int = 4
    num_stages: int = 3


# Untuned starting points for CUDA (used until flux_bench/gpu_check.py has tuned this GPU model and
# written its choice into TUNED, keyed by torch.cuda.get_device_name). The interpreter gets 16 and
# 32 (tl.dot needs >= 16), so that the tests' tiny shapes still loop, split and mask.
_CUDA_BLOCKS = Blocks()
_INTERPRET_BLOCKS = Blocks(t=16, d_down=32, o=32, d_base=16, wg_a=16, wg_b=32, wg_t=16)
TUNED = Path(__file__).with_name("lora_moe_tuned.json")  # {device name: {field of Blocks: value}}
_forced: Blocks | None = None  # use_blocks(...): what an autotune is timing


@functools.lru_cache(maxsize=None)
def tuned_blocks(device_name: str, path: Path = TUNED) -> Blocks | None:
    """The blocks tuned for this GPU model, if `path` has them (read once per process: call
    tuned_blocks.cache_clear() after writing it)."""
    if not path.is_file():
        return None
    entry = json.loads(path.read_text()).get(device_name)
    return None if entry is None else Blocks(**entry)


def _blocks(device: torch.device) -> Blocks:
    if _forced is not None:
        return _forced
    if _interpreting() or device.type != "cuda":
        return _INTERPRET_BLOCKS
    return tuned_blocks(torch.cuda.get_device_name(device)) or _CUDA_BLOCKS


@contextmanager
def use_blocks(blocks: Blocks):
    """Launch every kernel with `blocks` inside the context (an autotune's candidates)."""
    global _forced
    saved, _forced = _forced, blocks
    try:
        yield
    finally:
        _forced = saved


def _num_splits(programs: int, max_splits: int, device: torch.device) -> int:
    """How many ways to split a reduction so that ~2 programs per SM run; 2 under the
    interpreter, so that the tests exercise the split path."""
    if _interpreting() or device.type != "cuda":
        return max(1, min(2, max_splits))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, max(programs, 1)), max_splits))


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 \
        and not _interpreting() else "ieee"


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _launch_opts(bl: Blocks) -> dict:
    return dict(num_warps=bl.num_warps, num_stages=bl.num_stages)


def _down(inp: Tensor, w: Tensor, g: _Groups) -> Tensor:
    """out[t] = w[e_t] @ inp[t] for inp (T, D), w (E, R, D) (any strides) -> (T, R) in inp.dtype."""
    T, D = inp.shape
    R = w.shape[1]
    bl = _blocks(inp.device)
    n_tiles = g.tile_expert.shape[0]
    splits = _num_splits(n_tiles, triton.cdiv(D, bl.d_down), inp.device)
    d_per_split = triton.cdiv(triton.cdiv(D, splits), bl.d_down) * bl.d_down
    splits = triton.cdiv(D, d_per_split)
    part = torch.empty(splits, T, R, device=inp.device, dtype=torch.float32)  # every row written
    with on_device(inp):
        _lora_down_kernel[(n_tiles, splits)](
            inp, inp.stride(0), inp.stride(1),
            w, w.stride(0), w.stride(1), w.stride(2),
            part, part.stride(0), part.stride(1),
            g.order, g.tile_expert, g.tile_start, g.tile_end,
            D, R, d_per_split,
            BLOCK_T=g.block_t, BLOCK_D=bl.d_down, BLOCK_R=_block_r(R),
            UPCAST=_interpreting(), PRECISION=_precision(inp.dtype), **_launch_opts(bl))
    return part.sum(0).to(inp.dtype) if splits > 1 else part[0].to(inp.dtype)


def _up(h: Tensor, u: Tensor, g: _Groups, scale: float, out: Tensor | None = None,
        base: tuple[Tensor, Tensor, Tensor | None] | None = None) -> Tensor:
    """out[t] += scale * u[e_t]^T h[t] for h (T, R), u (E, R, O). Either in place on `out` (T, O),
    or with base = (inp (T, D), wb (D, O), bias (O,) or None): out = inp @ wb + bias + LoRA."""
    T, R = h.shape
    O = u.shape[2]
    bl = _blocks(h.device)
    if base is not None:
        inp, wb, bias = base
        out = torch.empty(T, O, device=h.device, dtype=h.dtype)
    else:
        inp, wb, bias = out, out.t(), None  # unused placeholders (HAS_BASE=False)
    n_tiles = g.tile_expert.shape[0]
    with on_device(h):
        _lora_up_kernel[(triton.cdiv(O, bl.o), n_tiles)](
            h, h.stride(0), h.stride(1),
            u, u.stride(0), u.stride(1), u.stride(2),
            out, out.stride(0), out.stride(1),
            inp, inp.stride(0), inp.stride(1),
            wb, wb.stride(0), wb.stride(1),
            bias if bias is not None else out,
            g.order, g.tile_expert, g.tile_start, g.tile_end,
            O, R, inp.shape[1], float(scale),
            BLOCK_T=g.block_t, BLOCK_O=bl.o, BLOCK_R=_block_r(R), BLOCK_D=bl.d_base,
            HAS_BASE=base is not None, HAS_BIAS=bias is not None,
            UPCAST=_interpreting(), PRECISION=_precision(h.dtype), **_launch_opts(bl))
    return out


def _wgrad(p: Tensor, q: Tensor, g: _Groups, scale: float, num_experts: int) -> Tensor:
    """out[e] = scale * sum_{t of e} p[t] q[t]^T for p (T, DA), q (T, DB) -> (E, DA, DB)."""
    DA, DB, E = p.shape[1], q.shape[1], num_experts
    bl = _blocks(p.device)
    block_a, block_b = bl.wg_a, bl.wg_b
    if DA < DB:  # the rank side gets the small block: (r, K) for dA, (N, r) for dB
        block_a = _block_r(DA) if DA <= 64 else block_a
    else:
        block_b = _block_r(DB) if DB <= 64 else block_b
    programs = triton.cdiv(DA, block_a) * triton.cdiv(DB, block_b)
    max_splits = triton.cdiv(p.shape[0], bl.wg_t * E) if p.shape[0] else 1
    splits = _num_splits(programs * E, min(8, max(1, max_splits)), p.device)
    part = torch.empty(splits, E, DA, DB, device=p.device, dtype=torch.float32)
    with on_device(p):
        _lora_wgrad_kernel[(programs, E, splits)](
            p, p.stride(0), p.stride(1),
            q, q.stride(0), q.stride(1),
            part, part.stride(0), part.stride(1), part.stride(2),
            g.order, g.seg_start, g.seg_end,
            DA, DB, splits, float(scale),
            BLOCK_T=bl.wg_t, BLOCK_A=block_a, BLOCK_B=block_b,
            UPCAST=_interpreting(), PRECISION=_precision(p.dtype), **_launch_opts(bl))
    return part.sum(0).to(p.dtype) if splits > 1 else part[0].to(p.dtype)


class LoRAMoELinearFunction(torch.autograd.Function):
    """x (T, K) -> (T, N); gradients for x, weight, bias, lora_A, lora_B as needed; router: zeros."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                lora_B: Tensor, router: Tensor, scale: float, fuse_base: bool) -> Tensor:
        E = lora_A.shape[0]
        with torch.no_grad():
            expert = route(x, router)[1][:, 0]  # (T,) the reference's decision, same call
        g = _group_by_expert(expert, E, _blocks(x.device).t)
        h = _down(x, lora_A, g)  # (T, r) = A_e x
        if fuse_base:
            y = _up(h, lora_B.transpose(1, 2), g, scale, base=(x, weight.t(), bias))
        else:
            y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
            y = _up(h, lora_B.transpose(1, 2), g, scale, out=y)
        ctx.save_for_backward(x, weight, lora_A, lora_B, h, router, g.order, g.seg_start,
                              g.seg_end, g.tile_expert, g.tile_start, g.tile_end)
        ctx.scale, ctx.fuse_base, ctx.block_t = scale, fuse_base, g.block_t
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight, lora_A, lora_B, h, router, *groups = ctx.saved_tensors
        g = _Groups(*groups, block_t=ctx.block_t)
        need_x, need_w, need_b, need_a, need_bb, need_r = ctx.needs_input_grad[:6]
        s, E = ctx.scale, lora_A.shape[0]
        dy = dy.contiguous()
        dx = dw = db = da = dbb = dr = None
        if need_x or need_a:
            gd = _down(dy, lora_B.transpose(1, 2), g)  # (T, r) = B_e^T dy
        if need_x:
            if ctx.fuse_base:
                dx = _up(gd, lora_A, g, s, base=(dy, weight, None))
            else:
                dx = _up(gd, lora_A, g, s, out=dy @ weight)
        if need_a:
            da = _wgrad(gd, x, g, s, E)       # (E, r, K)
        if need_bb:
            dbb = _wgrad(dy, h, g, s, E)      # (E, N, r)
        if need_w:
            dw = dy.t() @ x
        if need_b:
            db = dy.sum(0)
        if need_r:
            dr = torch.zeros_like(router)  # top-1: softmax over one logit is constant 1.0
        return dx, dw, db, da, dbb, dr, None, None


def lora_moe_linear_triton(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                           lora_B: Tensor, router: Tensor, scale: float = 1.0,
                           fuse_base: bool = FUSE_BASE_GEMM) -> Tensor:
    """The Triton path of `lora_moe_linear` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _check_args(x, weight, bias, lora_A, lora_B, router)
    x2 = x.reshape(-1, x.shape[-1])  # (T, K)
    if x2.shape[0] == 0:
        return lora_moe_linear_ref(x, weight, bias, lora_A, lora_B, router, scale)
    y = LoRAMoELinearFunction.apply(x2, weight, bias, lora_A, lora_B, router, scale, fuse_base)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def lora_moe_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor,
                    lora_B: Tensor, router: Tensor, scale: float = 1.0, base_out: Tensor | None = None) -> Tensor:
    """y = x W^T + b + scale * B_e (A_e x), e = top-1 of x R^T per token (ICEdit MoE-LoRA).

    x [..., K], weight [N, K], bias [N] or None, lora_A [E, r, K], lora_B [E, N, r],
    router [E, K], all one dtype (fp32, bf16, fp16). Returns [..., N] in x's dtype.
    The router receives a zero gradient, exactly like the official top-1 layer.
    The switch point: Triton kernels when x is on CUDA or TRITON_INTERPRET=1, else the reference.
    base_out: x W^T + b computed elsewhere ([..., N] in x's dtype, e.g. by an FP8 GEMM); the
    weight may then be of any dtype (only its shape is read) and the LoRA term is added to
    base_out in place. Inference only (no gradients).
    """
    if base_out is not None:
        return _add_lora_moe(x, base_out, lora_A, lora_B, router, scale)
    if x.is_cuda or _interpreting():
        return lora_moe_linear_triton(x, weight, bias, lora_A, lora_B, router, scale)
    return lora_moe_linear_ref(x, weight, bias, lora_A, lora_B, router, scale)


@torch.no_grad()
def _add_lora_moe(x: Tensor, base_out: Tensor, lora_A: Tensor, lora_B: Tensor, router: Tensor,
                  scale: float) -> Tensor:
    """base_out + scale * B_e (A_e x) (in place when base_out is contiguous): the same kernels, or the
    reference's maths, without the base GEMM."""
    if x.requires_grad or lora_A.requires_grad or lora_B.requires_grad:
        raise ValueError("lora_moe_linear(base_out=...) is for inference: its inputs must not require grad")
    N, K = base_out.shape[-1], x.shape[-1]
    _check_args(x, torch.empty(N, K, dtype=x.dtype, device="meta"), None, lora_A, lora_B, router)
    if tuple(base_out.shape) != (*x.shape[:-1], N) or base_out.dtype != x.dtype:
        raise ValueError(f"base_out must be {[*x.shape[:-1], N]} in {x.dtype}, got {list(base_out.shape)} {base_out.dtype}")
    x2, y = x.reshape(-1, K), base_out.reshape(-1, N)
    if x2.shape[0] == 0:
        return base_out
    expert = route(x2, router)[1][:, 0]
    if x.is_cuda or _interpreting():
        g = _group_by_expert(expert, lora_A.shape[0], _blocks(x.device).t)
        _up(_down(x2, lora_A, g), lora_B.transpose(1, 2), g, scale, out=y)
    else:  # each expert on its own tokens (a host sync per expert: the CPU path)
        for e in range(lora_A.shape[0]):
            rows = (expert == e).nonzero()[:, 0]
            y.index_add_(0, rows, scale * F.linear(F.linear(x2[rows], lora_A[e]), lora_B[e]))
    return y.reshape(base_out.shape)
