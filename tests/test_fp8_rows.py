"""The fused per-row FP8 quantization kernel (flux_kernels/fp8_rows.py) against its eager torch
reference, under TRITON_INTERPRET=1, and how fp8_linear uses it.

Tolerance: none. Both sides compute the row's amax, the scale amax / 448 and x / s in float32 and
round to e4m3 to nearest even, so scales and codes must agree bit for bit; the brute-force
nearest-e4m3 search of tests/test_fp8.py checks the reference's rounding itself.
"""

import pytest
import torch

import flux_minimal.fp8 as fp8
from flux_kernels.fp8_rows import FP8, quantize_rows, quantize_rows_ref


def rows(T: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of very different sizes, with values at every e4m3 binade, subnormals and exact ties."""
    g = torch.Generator().manual_seed(T * 1000 + K)
    x = torch.randn(T, K, generator=g) * torch.logspace(-4, 3, T)[:, None]
    x[0] = 0.0  # an all-zero row: the smallest scale, zeros out
    if K >= 4:
        x[1, :4] = torch.tensor([448.0, -84.0, 125.8, 2.0 ** -9])  # amax, a tie (80 | 88), a carry, a subnormal
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,K,block", [(7, 100, 32), (3, 1024, 1024), (5, 33, 16)])
def test_quantize_rows_bit_for_bit(T, K, block, dtype):
    x = rows(T, K, dtype)
    q, s = quantize_rows(x, block_k=block)
    q_ref, s_ref = quantize_rows_ref(x)
    assert q.dtype == FP8 and s.shape == (T, 1) and s.dtype == torch.float32
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_quantize_rows_takes_row_strides_and_refuses_column_strides():
    x = rows(6, 64, torch.bfloat16)
    q, s = quantize_rows(x[::2])  # every other row: a row stride of 128
    assert torch.equal(q.view(torch.uint8), quantize_rows_ref(x[::2])[0].view(torch.uint8))
    with pytest.raises(ValueError, match="unit stride"):
        quantize_rows(x.t())


def test_fp8_linear_quantizes_with_the_kernel_and_reraises_out_of_memory(monkeypatch):
    """Where the FP8 GEMM runs (stood in for here, with the CPU's operations), the activations come
    from quantize_rows; an out-of-memory error leaves the FP8 GEMM on, other failures turn it off."""
    x = rows(4, 32, torch.bfloat16)[1:]  # 3 rows, every one non-zero
    w = torch.randn(16, 32) / 4
    q, scale = fp8.quantize(w)
    calls = []

    def scaled_mm(xq, qt, scale_a, scale_b, bias, out_dtype):
        calls.append((xq, scale_a))
        return ((xq.float() * scale_a) @ (qt.float() * scale_b)).to(out_dtype)
    monkeypatch.setattr(fp8, "scaled_mm_ok", lambda x, q: fp8._scaled_mm_failed is None)
    monkeypatch.setattr(fp8, "_scaled_mm_failed", None)
    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    y = fp8.fp8_linear(x, q, scale, None)
    xq, sx = quantize_rows_ref(x)
    assert torch.equal(calls[0][0].view(torch.uint8), xq.view(torch.uint8)) and torch.equal(calls[0][1], sx)
    assert torch.equal(y, scaled_mm(xq, q.t(), sx, scale[None, :], None, x.dtype))

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(torch, "_scaled_mm", oom)
    with pytest.raises(torch.OutOfMemoryError):
        fp8.fp8_linear(x, q, scale, None)
    assert fp8._scaled_mm_failed is None  # still on

    def unsupported(*a, **k):
        raise RuntimeError("rowwise scaling is not supported on this GPU")
    monkeypatch.setattr(torch, "_scaled_mm", unsupported)
    y = fp8.fp8_linear(x, q, scale, None)  # falls back: the dequantized weight
    assert fp8._scaled_mm_failed.startswith("rowwise scaling")
    assert torch.equal(y, torch.nn.functional.linear(x, fp8.dequantize(q, scale, x.dtype)))
