"""Per-row FP8 quantization of activations, in one pass (the input side of the FP8 GEMM).

For x [T, K] in bf16 / fp16 / fp32 (flux_minimal/fp8.py, `fp8_linear` on CUDA):

    s_t = max(max_k |x[t, k]| / 448, 1e-12)              [T, 1] float32   (448: e4m3's largest)
    q_t = round_e4m3(clamp(x_t / s_t, -448, 448))        [T, K] float8_e4m3fn, round to nearest even

`quantize_rows_ref` is the torch reference: six eager kernels (abs, amax, float, div, clamp, cast)
with a float32 copy of x between them; for a `linear2` input of 2560 x 15360 that is ~1.3 GB of
memory traffic around an FP8 GEMM that reads 0.1 GB. `quantize_rows` is one Triton program per
row: it reads the row twice (amax, then scale and cast; the second read mostly hits L2) and writes
one byte per element, with no float32 temporary in memory.

The interpreter's float8 cast rounds wrongly (a carry out of the mantissa is lost: 125.8 -> 64
instead of 128; tested in triton 3.9). Under TRITON_INTERPRET=1 the kernel therefore rounds to the
e4m3 grid in float32 first (`_round_e4m3`: the same round-to-nearest-even the hardware cast does),
so that the cast only meets exact values and the tests compare bit for bit; compiled for a GPU it
casts directly.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

from flux_kernels.launch import on_device

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_SCALE = 1e-12  # an all-zero row: any scale gives zeros; this one keeps the division finite


def quantize_rows_ref(x2: Tensor) -> tuple[Tensor, Tensor]:
    """x2 [T, K] -> (q [T, K] float8_e4m3fn, s [T, 1] float32), x2 ~ q * s. The eager reference."""
    s = (x2.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp(min=MIN_SCALE)
    return (x2.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), s


@triton.jit
def _round_e4m3(v):
    """fp32 v with |v| <= 448 -> the nearest e4m3 value (ties to even), still in fp32."""
    a = tl.abs(v)
    e = tl.maximum((a.to(tl.int32, bitcast=True) >> 23) - 127, -6)  # floor(log2 a); subnormals share 2^-6's
    q = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # e4m3's spacing there: 2^(e - 3)
    r = ((a / q + 8388608.0) - 8388608.0) * q  # to a multiple of q: fp32's add rounds to even below 2^23
    return tl.where(v < 0, -r, r)


@triton.jit
def _quantize_rows_kernel(x_ptr, stride_xt, q_ptr, stride_qt, s_ptr, K,
                          BLOCK_K: tl.constexpr, EXACT_ROUND: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: T * K may pass 2^31
    x_row, q_row = x_ptr + row * stride_xt, q_ptr + row * stride_qt
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # pass 1: the row's absolute maximum
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK_K):  # pass 2: scale, clamp, cast
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(x / s, -448.0), 448.0)
        if EXACT_ROUND:
            v = _round_e4m3(v)
        tl.store(q_row + offs, v.to(q_ptr.dtype.element_ty), mask=offs < K)


def quantize_rows(x2: Tensor, block_k: int = 1024) -> tuple[Tensor, Tensor]:
    """`quantize_rows_ref` in one Triton pass (CUDA, or the CPU under TRITON_INTERPRET=1).
    x2 [T, K] with a unit stride along K."""
    if x2.ndim != 2 or x2.stride(1) != 1:
        raise ValueError(f"quantize_rows wants a [T, K] tensor with unit stride along K, got "
                         f"{list(x2.shape)} with strides {list(x2.stride())}")
    T, K = x2.shape
    q = torch.empty(T, K, dtype=FP8, device=x2.device)
    s = torch.empty(T, 1, dtype=torch.float32, device=x2.device)
    if T:
        interpreting = not x2.is_cuda
        with on_device(x2):
            _quantize_rows_kernel[(T,)](x2, x2.stride(0), q, q.stride(0), s, K,
                                        BLOCK_K=min(block_k, triton.next_power_of_2(K)),
                                        EXACT_ROUND=interpreting, num_warps=4)
    return q, s
