"""LoRA on our (BFL-named, fused) FLUX: the layer, fresh adapters for training, merging.

A LoRA adds s * B (A x) to a linear layer, A [r, in], B [out, r], s = scale * alpha / r.
Our DiT fuses layers that diffusers keeps apart (img_attn.qkv = [to_q; to_k; to_v] rows,
single_blocks.N.linear1 = [to_q; to_k; to_v; proj_mlp]). A LoRA on one of those is a LoRA on a
row block ("part") of the fused layer, so `LoRALinear` holds one (A, B) pair per part:

    y = W x + b;  y[rows of part j] += s_j * B_j (A_j x)        (one matmul for all A_j together)

`add_lora` puts fresh adapters on ICEdit's targets (named in diffusers' terms, mapped through
flux_keys), LoRA experts (moe.py) on its MoE targets. Files, ours and the official layout: lora_files.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapted import AdaptedLinear, install, module_at
from .errors import WeightsError
from .flux_keys import Target, diffusers_target
from .moe import LoRAMoELinear

if TYPE_CHECKING:
    from .fp8 import FP8Linear
    from .mmdit import Flux

# The official ICEdit targets (diffusers names, {i} a block index); nothing on the text stream.
OFFICIAL_TARGETS = [
    "x_embedder",
    "transformer_blocks.{i}.norm1.linear", "transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k",
    "transformer_blocks.{i}.attn.to_v", "transformer_blocks.{i}.attn.to_out.0", "transformer_blocks.{i}.ff.net.2",
    "single_transformer_blocks.{i}.norm.linear", "single_transformer_blocks.{i}.attn.to_q",
    "single_transformer_blocks.{i}.attn.to_k", "single_transformer_blocks.{i}.attn.to_v",
    "single_transformer_blocks.{i}.proj_mlp", "single_transformer_blocks.{i}.proj_out",
]
MOE_TARGETS = ["transformer_blocks.{i}.ff.net.2", "single_transformer_blocks.{i}.proj_out"]  # 'ff.net', 'proj_out'


def part_rows(linear: nn.Module, n_parts: int, hidden: int) -> list[tuple[int, int]]:
    """Row ranges of a fused layer's parts: equal `hidden`-sized blocks, the last taking the rest
    (qkv: D, D, D; linear1: D, D, D, mlp_hidden)."""
    if n_parts == 1:
        return [(0, linear.out_features)]
    starts = [j * hidden for j in range(n_parts)] + [linear.out_features]
    return list(zip(starts[:-1], starts[1:]))


class LoRALinear(AdaptedLinear):
    """A linear layer with a plain LoRA on some of its parts (row blocks)."""

    is_moe = False

    def __init__(self, base: nn.Linear | FP8Linear, rows: list[tuple[int, int]]):
        super().__init__(base)
        self.rows = rows  # the row range of each part
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()  # part ("0", "1", ...) -> A, B
        self.scales: dict[str, float] = {}  # part -> alpha / r (self.scale is applied on top)
        self.merged = False

    def add_part(self, part: int, A: Tensor, B: Tensor, alpha: float | None = None) -> None:
        """A [r, in], B [rows of the part, r]; alpha defaults to r."""
        r = A.shape[0]
        self.lora_A[str(part)] = nn.Parameter(A, requires_grad=A.requires_grad)
        self.lora_B[str(part)] = nn.Parameter(B, requires_grad=B.requires_grad)
        self.scales[str(part)] = (alpha if alpha is not None else r) / r

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [*self.lora_A.values(), *self.lora_B.values()]

    def delta_weight(self, part: str) -> Tensor:
        """The part's update of the weight [rows, in], in float32."""
        return self.scale * self.scales[part] * (self.lora_B[part].float() @ self.lora_A[part].float())

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # [..., out]
        if self.merged or not self.lora_A:
            return y
        parts = sorted(self.lora_A, key=lambda p: self.rows[int(p)][0])
        h = F.linear(x, torch.cat([self.lora_A[p] for p in parts]).to(x.dtype))  # [..., sum of ranks]
        r0 = 0
        for p in parts:  # each part's update onto its own rows: y[..., start:end] += s_j B_j h_j
            r, (start, end) = self.lora_A[p].shape[0], self.rows[int(p)]
            update = (self.scale * self.scales[p]) * F.linear(h[..., r0:r0 + r], self.lora_B[p].to(x.dtype))
            y.narrow(-1, start, end - start).add_(update)  # (a view: `y[..., a:b] +=` would copy it back)
            r0 += r
        return y


def lora_layer(model: Flux, module: str, n_parts: int) -> LoRALinear:
    """The LoRALinear at `module`, installing it over the plain linear layer on first use."""
    layer = module_at(model, module)
    if isinstance(layer, LoRALinear):
        return layer
    return install(model, module, lambda lin: LoRALinear(lin, part_rows(lin, n_parts, model.params.hidden_size)))


def lora_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Every adapted layer by name: plain LoRA (LoRALinear) and experts (LoRAMoELinear)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter parameter (A, B, routers), in a fixed order."""
    return [p for layer in lora_layers(model).values() for p in layer.adapter_parameters()]


# ---- fresh adapters (training) ---------------------------------------------------------------------

def expand_targets(model: Flux, targets: list[str]) -> list[str]:
    """Official target templates -> concrete diffusers module names for this model's depth."""
    names = []
    for t in targets:
        n = model.params.depth if t.startswith("transformer_blocks") else model.params.depth_single_blocks
        names += [t.format(i=i) for i in range(n)] if "{i}" in t else [t]
    return names


def add_lora(model: Flux, rank: int = 32, alpha: float | None = None, targets: list[str] = OFFICIAL_TARGETS,
             experts: int = 0, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[nn.Parameter]:
    """Fresh trainable adapters (ICEdit's recipe): A ~ N(0, 1/r) ("gaussian" init), B = 0, so the
    model starts unchanged. experts > 0 puts LoRA experts with a router on the MoE targets
    (ff.net.2, proj_out; router init like nn.Linear's). Returns the new parameters."""
    g = torch.Generator().manual_seed(seed)  # one stream, drawn target by target in order
    moe = set(expand_targets(model, MOE_TARGETS)) if experts else set()
    params = []
    for name in expand_targets(model, targets):
        t = diffusers_target(name)
        if name in moe:
            params += _fresh_experts(model, t.module, experts, rank, alpha, dtype, g)
        else:
            params += _fresh_part(model, t, rank, alpha, dtype, g)
    return params


def _fresh_part(model: Flux, t: Target, rank: int, alpha: float | None, dtype: torch.dtype,
                g: torch.Generator) -> list[nn.Parameter]:
    layer = lora_layer(model, t.module, t.n_parts)
    start, end = layer.rows[t.part]
    A = torch.randn(rank, layer.in_features, generator=g) / rank
    B = torch.zeros(end - start, rank)
    device = layer.weight.device
    layer.add_part(t.part, A.to(device, dtype).requires_grad_(), B.to(device, dtype).requires_grad_(), alpha)
    return [layer.lora_A[str(t.part)], layer.lora_B[str(t.part)]]


def _fresh_experts(model: Flux, module: str, experts: int, rank: int, alpha: float | None, dtype: torch.dtype,
                   g: torch.Generator) -> list[nn.Parameter]:
    base = module_at(model, module)
    A = torch.randn(experts, rank, base.in_features, generator=g) / rank
    B = torch.zeros(experts, base.out_features, rank)
    bound = 1 / math.sqrt(base.in_features)
    R = torch.empty(experts, base.in_features).uniform_(-bound, bound, generator=g)
    A, B, R = (p.to(base.weight.device, dtype).requires_grad_() for p in (A, B, R))
    return install(model, module, lambda lin: LoRAMoELinear(lin, A, B, R, alpha)).adapter_parameters()


# ---- merging (inference) ---------------------------------------------------------------------------

def merge_lora(model: nn.Module) -> None:
    """Fold every plain LoRA into its base weight (zero inference overhead). MoE layers route per
    token and cannot be folded: they stay as they are."""
    _fold(model, +1)


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora (exact in float32; within one rounding of the weight dtype otherwise)."""
    _fold(model, -1)


@torch.no_grad()
def _fold(model: nn.Module, sign: int) -> None:
    for name, layer in lora_layers(model).items():
        if not isinstance(layer, LoRALinear) or layer.merged == (sign > 0):
            continue
        if layer.fp8:
            raise WeightsError(f"{name} has FP8 weights: a LoRA is merged into them while they load "
                               f"(load_flux(..., fp8=True, lora=...)), not after, which would round twice")
        for p in layer.lora_A:
            start, end = layer.rows[int(p)]
            w = layer.weight[start:end]
            w.copy_((w.float() + sign * layer.delta_weight(p)).to(w.dtype))
        layer.merged = sign > 0
