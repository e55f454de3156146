"""FP8 weights for the DiT's linear layers: float8_e4m3fn, one scale per output channel.

    w [N, K]  ->  q = round_e4m3(w / s[:, None]),  s = max_k |w[n, k]| / 448      (448: e4m3's largest)
    y = x W^T + b  ~  (x q^T) * s + b

Half the bytes of bf16 (the 12B DiT: ~12 GB instead of 24), e4m3's 3 mantissa bits: a relative
error of ~2^-4 per weight at worst, averaging out over the K terms of each dot product.

How a layer computes (`fp8_linear`):
- CUDA with compute capability >= 8.9 (Ada, Hopper): `torch._scaled_mm`, the tensor cores' FP8 GEMM,
  with the activations quantized per row (s_x = max |x_row| / 448) in one Triton pass
  (flux_kernels/fp8_rows.py) and the weights' per-channel scales; out in the activations' dtype.
  Rowwise scaling needs a recent torch and GPU: if the first call fails, the layer says why once
  and dequantizes from then on (an out-of-memory error is raised as it is, not taken for that).
- Elsewhere (CPU, older GPUs): the weight is dequantized to the activations' dtype for the call
  (one layer at a time; the model stays in FP8).

Where the weights come from (`flux_loading.load_flux(..., fp8=True)`): each linear weight is quantized
as it is read from the file, so a bf16 checkpoint never sits in memory whole; a plain LoRA is
added to its weight first (merging after quantizing would round twice). Files whose weights are
already float8 (the single-file FP8 FLUX checkpoints) load as they are, with their per-tensor or
per-channel `weight_scale` / `scale_weight` when present, 1 otherwise.
"""

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .loading import Checkpoint, Rule, load_state

FP8 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_KEYS = ("weight_scale", "scale_weight")  # per-layer scale names in FP8 checkpoint files
_scaled_mm_failed: str | None = None  # why torch._scaled_mm failed here, once it has


def quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [N, K] (any float dtype) -> (q [N, K] float8_e4m3fn, scale [N] float32), w ~ q * scale[:, None].
    Computed in float32, one layer at a time; an all-zero row gets scale 1."""
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return w.div(scale[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(FP8), scale


def dequantize(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """q [N, K] float8, scale [N] -> [N, K] in `dtype` (the product taken in float32)."""
    return (q.float() * scale[:, None]).to(dtype)


def scaled_mm_ok(x: Tensor, q: Tensor) -> bool:
    """Whether torch._scaled_mm can take this call: a CUDA tensor on sm_89 or newer, bf16/fp16
    activations, K and N multiples of 16 (the FP8 GEMM's alignment)."""
    return (_scaled_mm_failed is None and x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)
            and x.dtype in (torch.bfloat16, torch.float16) and q.shape[0] % 16 == 0 and q.shape[1] % 16 == 0)


def fp8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """x [..., K] @ (q * scale)^T + bias -> [..., N] in x's dtype. The FP8 GEMM where it can run;
    if it fails here (e.g. rowwise scaling unsupported by this torch or GPU), dequantizing from
    then on, said once."""
    global _scaled_mm_failed
    if scaled_mm_ok(x, q):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(1) != 1:
            x2 = x2.contiguous()
        from flux_kernels.fp8_rows import quantize_rows  # Triton is imported only where the FP8 GEMM runs
        xq, sx = quantize_rows(x2)  # [T, K] e4m3, [T, 1] float32: one fused pass
        try:
            y = torch._scaled_mm(xq, q.t(), scale_a=sx, scale_b=scale[None, :], bias=bias, out_dtype=x.dtype)
            return y.reshape(*x.shape[:-1], q.shape[0])
        except torch.OutOfMemoryError:
            raise  # transient, and the dequantizing fallback would need more memory, not less
        except RuntimeError as e:
            _scaled_mm_failed = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"note: the FP8 GEMM (torch._scaled_mm) cannot run here ({_scaled_mm_failed}); "
                  f"dequantizing each layer instead")
    return F.linear(x, dequantize(q, scale, x.dtype), bias)


class FP8Linear(nn.Module):
    """A linear layer whose `weight` is float8_e4m3fn with a float32 `weight_scale` per output
    channel (a buffer, not in checkpoints); the bias stays in the compute dtype. Inference only."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype | None = None,
                 device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device), requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, device=device), persistent=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 per-channel"


def fp8_linears(model: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> dict[str, FP8Linear]:
    """Replace every nn.Linear of a meta-device `model` (except `skip(name)`) by an FP8Linear of the
    same shape; returns them by name. Done before loading, so the model never holds the wide weights."""
    swapped = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and not skip(name):
            new = FP8Linear(m.in_features, m.out_features, m.bias is not None, dtype=m.weight.dtype, device="meta")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            swapped[name] = new
    return swapped


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the weights (and scales) of the model's linear layers: what --fp8 halves."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, FP8Linear)):
            total += m.weight.numel() * m.weight.element_size()
            if isinstance(m, FP8Linear):
                total += m.weight_scale.numel() * m.weight_scale.element_size()
    return total


# Keys of FP8 checkpoint files that carry scales, not weights (ComfyUI's "scaled fp8" and its successors).
FP8_FILE_KEYS = (rf"\.({'|'.join(SCALE_KEYS)}|input_scale|scale_input)$", r"^scaled_fp8$")


def load_fp8(model: nn.Module, ckpt: Checkpoint, rules: list[Rule] = (), *, device, dtype: torch.dtype, what: str,
             ignore: tuple[str, ...] = (), updates: dict | None = None, rows: int = 256) -> nn.Module:
    """`loading.load_state` for a meta-device `model` whose linear layers become FP8Linear: each
    weight is quantized as it is read (in float32, `rows` rows at a time), after adding its plain
    LoRA `updates` ({layer: [(first row, end row, A, B, s)]}, lora_files.plain_lora_updates). Weights
    already in float8 are kept, with the file's scales. Everything else takes `dtype`. Host memory
    peaks near the FP8 model plus one file tensor (its mapped pages are dropped once converted)."""
    layers, updates, scales = fp8_linears(model), updates or {}, {}

    def convert(key: str, t: Tensor) -> Tensor:
        name, _, leaf = key.rpartition(".")
        if leaf != "weight" or name not in layers:
            return t.to(device, dtype if t.is_floating_point() else t.dtype)
        file_scale = _file_scale(ckpt, name, t.shape[0]) if t.dtype in (FP8, torch.float8_e5m2) else None
        if t.dtype == FP8 and name not in updates:  # already e4m3: as it is
            scales[name] = file_scale
            return t.to(device)
        N = t.shape[0]
        q, scale = torch.empty(t.shape, dtype=FP8), torch.empty(N)
        for r0 in range(0, N, rows):  # in row chunks: float32 temporaries of `rows` rows, not of the layer
            r1 = min(N, r0 + rows)
            w = t[r0:r1].float() if file_scale is None else t[r0:r1].float() * file_scale[r0:r1, None]
            for start, end, A, B, s in updates.get(name, ()):  # the LoRA rows that fall in this chunk
                a, b = max(start, r0), min(end, r1)
                if a < b:
                    w[a - r0:b - r0] += s * (B[a - start:b - start].float() @ A.float())
            q[r0:r1], scale[r0:r1] = quantize(w)
        scales[name] = scale
        return q.to(device)

    load_state(model, ckpt, rules, device=device, dtype=dtype, what=what, convert=convert, ignore=ignore + FP8_FILE_KEYS)
    for name, layer in layers.items():
        layer.weight_scale = scales[name].to(device)
    return model


def _file_scale(ckpt: Checkpoint, layer: str, rows: int) -> Tensor:
    """An FP8 file's scale for `layer` as [rows] float32: per channel or per tensor, 1 when absent."""
    for name in SCALE_KEYS:
        if f"{layer}.{name}" in ckpt:
            return ckpt.tensor(f"{layer}.{name}").float().reshape(-1).expand(rows).clone()
    return torch.ones(rows)


@torch.no_grad()
def quantize_linears(model: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> dict[str, FP8Linear]:
    """Quantize a model already in memory: every nn.Linear (except `skip(name)`) becomes an FP8Linear
    holding its quantized weight, one layer at a time (each wide weight is freed as its layer is
    done). For models built in memory (benchmarks, tests); files load quantized with load_fp8."""
    before = dict(model.named_modules())
    swapped = fp8_linears(model, skip)
    for name, new in swapped.items():
        old = before.pop(name)  # the last reference to the wide layer once this turn ends
        q, scale = quantize(old.weight)
        new.weight = nn.Parameter(q.to(old.weight.device), requires_grad=False)
        new.weight_scale = scale.to(old.weight.device)
        new.bias = None if old.bias is None else nn.Parameter(old.bias.detach(), requires_grad=False)
    return swapped
