"""LoRA and mixture-of-LoRA-experts adapters on our (BFL-named, fused) FLUX, and their files.

A LoRA adds s * B (A x) to a linear layer, A [r, in], B [out, r], s = scale * alpha / r.
Our DiT fuses layers that diffusers keeps apart (img_attn.qkv = [to_q; to_k; to_v] rows,
single_blocks.N.linear1 = [to_q; to_k; to_v; proj_mlp]). A LoRA on one of those is a LoRA on a
row block ("part") of the fused layer, so `LoRALinear` holds one (A, B) pair per part:

    y = W x + b;  y[rows of part j] += s_j * B_j (A_j x)        (one matmul for all A_j together)

The mixture of LoRA experts (ICEdit-MoE) sits on unfused layers (img_mlp.2, linear2):
    e = argmax(R x) per token;  y = W x + b + s * B_e (A_e x)
computed by `flux_kernels.lora_moe.lora_moe_linear` (the fused Triton kernel on CUDA, its torch
reference elsewhere). With top-1 routing the router receives no gradient (see the kernel).

Files: the official diffusers/peft layout (`transformer.<diffusers module>.lora_A.weight`,
`lora_B.weight`, MoE `lora_A.expert_i.weight`, `lora_B.expert_i.weight`, `lora_route.weight`)
is mapped onto our modules through the same table that loads diffusers checkpoints
(mmdit.FLUX_FROM_DIFFUSERS). Our own format is the adapters' state dict under our names:
`<module>.lora_A.<part>`, `<module>.lora_B.<part>`, `<module>.alpha.<part>` (MoE: `<module>.lora_A`
[E, r, in], `<module>.lora_B` [E, out, r], `<module>.lora_route` [E, in]).
"""

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import WeightsError
from .fp8 import FP8Linear, fp8_linear
from .loading import Checkpoint, swap_halves
from .mmdit import FLUX_FROM_DIFFUSERS, Flux

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


@dataclass(frozen=True)
class Target:
    """Where a diffusers module lives in our model: row block `part` of `n_parts` of `module`."""

    module: str  # e.g. double_blocks.3.img_attn.qkv
    part: int
    n_parts: int
    swap: bool = False  # diffusers' norm_out is (scale, shift); ours (shift, scale): swap B's halves


@dataclass(frozen=True)
class _Entry:
    diffusers: str  # diffusers module template, e.g. "transformer_blocks.{i}.attn.to_k"
    ours: str  # our module template, e.g. "double_blocks.{i}.img_attn.qkv"
    part: int
    n_parts: int
    swap: bool

    @staticmethod
    def regex(template: str) -> re.Pattern:
        return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


# The LoRA view of the checkpoint table: each diffusers linear layer is part j of one of ours.
_TABLE = [_Entry(src[: -len(".{w}")], rule.target[: -len(".{w}")], j, len(rule.sources), rule.combine is swap_halves)
          for rule in FLUX_FROM_DIFFUSERS if rule.target.endswith(".{w}")  # (norm scales are not linears)
          for j, src in enumerate(rule.sources)]


def diffusers_target(name: str) -> Target | None:
    """`transformer_blocks.3.attn.to_k` -> Target('double_blocks.3.img_attn.qkv', part 1 of 3)."""
    for e in _TABLE:
        m = e.regex(e.diffusers).match(name)
        if m:
            return Target(e.ours.format(**m.groupdict()), e.part, e.n_parts, e.swap)
    return None


def diffusers_name(module: str, part: int) -> str:
    """The inverse: ('double_blocks.3.img_attn.qkv', 1) -> 'transformer_blocks.3.attn.to_k'."""
    for e in _TABLE:
        m = e.regex(e.ours).match(module)
        if m and e.part == part:
            return e.diffusers.format(**m.groupdict())
    raise KeyError(f"{module} part {part} has no diffusers name")


def n_parts(module: str) -> int:
    """How many diffusers layers our `module` fuses (qkv: 3, linear1: 4, others: 1)."""
    for e in _TABLE:
        if e.regex(e.ours).match(module):
            return e.n_parts
    return 1


def part_rows(linear: nn.Linear, n_parts: int, hidden: int) -> list[tuple[int, int]]:
    """Row ranges of a fused layer's parts: equal `hidden`-sized blocks, the last taking the rest
    (qkv: D, D, D; linear1: D, D, D, mlp_hidden)."""
    if n_parts == 1:
        return [(0, linear.out_features)]
    starts = [j * hidden for j in range(n_parts)] + [linear.out_features]
    return list(zip(starts[:-1], starts[1:]))


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight` and `bias`, same keys) with LoRA parts or LoRA experts."""

    def __init__(self, base: "nn.Linear | FP8Linear", rows: list[tuple[int, int]]):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.fp8 = isinstance(base, FP8Linear)  # an FP8 base weight: its scales come along
        if self.fp8:
            self.register_buffer("weight_scale", base.weight_scale, persistent=False)
        self.rows = rows  # the row range of each part
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.scales: dict[str, float] = {}  # part -> alpha / r (the user's scale is applied on top)
        self.scale = 1.0
        self.lora_route: nn.Parameter | None = None  # set for MoE: lora_A/lora_B hold "experts"
        self.merged = False

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The adapters' dtype: the weight's, or for an FP8 weight the compute dtype (the bias's; bf16)."""
        if not self.fp8:
            return self.weight.dtype
        return self.bias.dtype if self.bias is not None else torch.bfloat16

    @property
    def is_moe(self) -> bool:
        return self.lora_route is not None

    def add_part(self, part: int, A: Tensor, B: Tensor, alpha: float | None = None) -> None:
        r = A.shape[0]
        self.lora_A[str(part)] = nn.Parameter(A, requires_grad=A.requires_grad)
        self.lora_B[str(part)] = nn.Parameter(B, requires_grad=B.requires_grad)
        self.scales[str(part)] = (alpha if alpha is not None else r) / r

    def set_experts(self, A: Tensor, B: Tensor, route: Tensor, alpha: float | None = None) -> None:
        """A [E, r, in], B [E, out, r], route [E, in]."""
        if self.lora_A:
            raise WeightsError("a layer cannot hold both a plain LoRA and LoRA experts")
        self.add_part("experts", A, B, alpha)
        self.scales["experts"] = (alpha if alpha is not None else A.shape[1]) / A.shape[1]
        self.lora_route = nn.Parameter(route, requires_grad=route.requires_grad)

    def delta_weight(self, part: str) -> Tensor:
        """The plain LoRA part as a weight update [rows, in], in float32."""
        return self.scale * self.scales[part] * (self.lora_B[part].float() @ self.lora_A[part].float())

    def base(self, x: Tensor) -> Tensor:
        """x W^T + b, from the FP8 weight and its scales when the base is FP8."""
        return fp8_linear(x, self.weight, self.weight_scale, self.bias) if self.fp8 else F.linear(x, self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.is_moe:
            from flux_kernels.lora_moe import lora_moe_linear  # Triton is imported only where MoE layers exist
            A, B, R = (t.to(x.dtype) for t in (self.lora_A["experts"], self.lora_B["experts"], self.lora_route))
            return lora_moe_linear(x, self.weight, self.bias, A, B, R, scale=self.scale * self.scales["experts"],
                                   base_out=self.base(x) if self.fp8 else None)
        y = self.base(x)
        if self.merged or not self.lora_A:
            return y
        parts = sorted(self.lora_A, key=lambda p: self.rows[int(p)][0])
        h = F.linear(x, torch.cat([self.lora_A[p] for p in parts]).to(x.dtype))  # [..., sum of ranks]
        pieces, r0, at = [], 0, 0  # the update [..., out]: each part's rows, zeros where none
        for p in parts:
            r, (start, end) = self.lora_A[p].shape[0], self.rows[int(p)]
            if start > at:
                pieces.append(y.new_zeros(*y.shape[:-1], start - at))
            pieces.append((self.scale * self.scales[p]) * F.linear(h[..., r0:r0 + r], self.lora_B[p].to(x.dtype)))
            r0, at = r0 + r, end
        if at < self.out_features:
            pieces.append(y.new_zeros(*y.shape[:-1], self.out_features - at))
        return y + torch.cat(pieces, dim=-1)


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise WeightsError(f"the model has no module {name!r} (is this LoRA for a deeper/other FLUX?)") from None


def lora_layer(model: Flux, module: str, n_parts: int) -> LoRALinear:
    """The LoRALinear at `module`, installing it over the plain nn.Linear on first use."""
    layer = _get(model, module)
    if isinstance(layer, LoRALinear):
        return layer
    if not isinstance(layer, (nn.Linear, FP8Linear)):
        raise WeightsError(f"{module} is a {type(layer).__name__}, not a linear layer: it cannot take a LoRA")
    new = LoRALinear(layer, part_rows(layer, n_parts, model.params.hidden_size))
    parent, _, child = module.rpartition(".")
    setattr(_get(model, parent) if parent else model, child, new)
    return new


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter parameter (A, B, routers), in a fixed order."""
    return [p for layer in lora_layers(model).values()
            for p in [*layer.lora_A.values(), *layer.lora_B.values(), *([layer.lora_route] if layer.is_moe else [])]]


# ---- creating adapters (training) ------------------------------------------------------------------

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
    g = torch.Generator().manual_seed(seed)
    moe = set(expand_targets(model, MOE_TARGETS)) if experts else set()
    params = []
    for name in expand_targets(model, targets):
        t = diffusers_target(name)
        layer = lora_layer(model, t.module, t.n_parts)
        device = layer.weight.device
        start, end = layer.rows[t.part]
        if name in moe:
            A = torch.randn(experts, rank, layer.in_features, generator=g) / rank
            B = torch.zeros(experts, end - start, rank)
            bound = 1 / math.sqrt(layer.in_features)
            R = torch.empty(experts, layer.in_features).uniform_(-bound, bound, generator=g)
            layer.set_experts(*(p.to(device, dtype).requires_grad_() for p in (A, B, R)), alpha=alpha)
            params += [layer.lora_A["experts"], layer.lora_B["experts"], layer.lora_route]
        else:
            A = torch.randn(rank, layer.in_features, generator=g) / rank
            B = torch.zeros(end - start, rank)
            layer.add_part(t.part, A.to(device, dtype).requires_grad_(), B.to(device, dtype).requires_grad_(), alpha)
            params += [layer.lora_A[str(t.part)], layer.lora_B[str(t.part)]]
    return params


# ---- files ---------------------------------------------------------------------------------------

_OFFICIAL = re.compile(r"^(?:transformer\.|base_model\.model\.)?(?P<mod>.+?)\."
                       r"(?:(?P<kind>lora_A|lora_B)(?:\.expert_(?P<e>\d+))?\.weight|(?P<route>lora_route)\.weight"
                       r"|(?P<alpha>alpha))$")
_OURS = re.compile(r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B|alpha)\.(?P<part>\d+|experts)$|^(?P<rmod>.+)\.lora_route$")


def _listing(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _open_lora(path: Path) -> Checkpoint:
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        preferred = [f for f in files if f.name == "pytorch_lora_weights.safetensors"]
        if not files:
            raise WeightsError(f"{path} holds no .safetensors LoRA file (expected pytorch_lora_weights.safetensors)")
        if len(files) > 1 and not preferred:
            raise WeightsError(f"{path} holds several .safetensors files; pass one of them: {[f.name for f in files]}")
        path = (preferred or files)[0]
    return Checkpoint([path])


@dataclass
class _Found:
    """The keys of one adapted (layer, part), whichever file layout they came from."""

    A: dict[int, str] = field(default_factory=dict)  # expert index (0 for a plain LoRA) -> key
    B: dict[int, str] = field(default_factory=dict)
    alpha: str | None = None
    route: str | None = None
    moe: bool = False
    stacked: bool = False  # our MoE files keep the experts in one [E, ...] tensor (A[0], B[0])


def _find_ours(keys: list[str]) -> tuple[dict[Target, _Found], list[str]]:
    """Our format: `<module>.lora_A.<part>` / `.lora_B.<part>` / `.alpha.<part>` (part "experts" for
    MoE, stacked) and `<module>.lora_route`."""
    found, unknown = {}, []
    for k in keys:
        m = _OURS.match(k)
        if m is None:
            unknown.append(k)
            continue
        mod = m["mod"] or m["rmod"]
        moe = m["rmod"] is not None or m["part"] == "experts"
        f = found.setdefault(Target(mod, 0 if moe else int(m["part"]), n_parts(mod)), _Found())
        f.moe, f.stacked = f.moe or moe, f.stacked or moe
        if m["rmod"]:
            f.route = k
        elif m["kind"] == "alpha":
            f.alpha = k
        else:
            getattr(f, m["kind"][-1])[0] = k
    return found, unknown


def _find_official(keys: list[str]) -> tuple[dict[Target, _Found], list[str]]:
    """The official diffusers/peft layout: `transformer.<diffusers module>.lora_A.weight` (or
    `.lora_A.expert_<i>.weight`), `.lora_route.weight`, `.alpha`, mapped through the checkpoint table."""
    found, unknown = {}, []
    for k in keys:
        m = _OFFICIAL.match(k)
        target = diffusers_target(m["mod"]) if m else None
        if target is None:
            unknown.append(k)
            continue
        f = found.setdefault(target, _Found())
        if m["route"]:
            f.route, f.moe = k, True
        elif m["alpha"]:
            f.alpha = k
        else:
            getattr(f, m["kind"][-1])[int(m["e"] or 0)] = k
            f.moe = f.moe or m["e"] is not None
    return found, unknown


def _set_experts(ckpt: Checkpoint, layer: LoRALinear, module: str, f: _Found, alpha: float | None) -> str | None:
    """Install LoRA experts; returns what is wrong with them, if anything."""
    def get(key: str) -> Tensor:
        return ckpt.tensor(key).to(layer.weight.device, layer.adapter_dtype)
    idx = sorted(f.A)
    if idx != list(range(len(idx))) or sorted(f.B) != idx:
        return f"{module}: experts {idx} are incomplete (need lora_A and lora_B of 0..N-1)"
    if f.route is None:
        return f"{module}: LoRA experts without a lora_route"
    if f.stacked:
        A, B = get(f.A[0]), get(f.B[0])
    else:
        A, B = torch.stack([get(f.A[i]) for i in idx]), torch.stack([get(f.B[i]) for i in idx])
    R = get(f.route)
    if (A.shape[2] != layer.in_features or B.shape[1] != layer.out_features or A.shape[1] != B.shape[2]
            or tuple(R.shape) != (A.shape[0], layer.in_features)):
        return (f"{module}: experts A {list(A.shape)}, B {list(B.shape)}, route {list(R.shape)} do not fit a "
                f"layer of {layer.in_features} -> {layer.out_features}")
    layer.set_experts(A, B, R, alpha)
    return None


def _plain_part(ckpt: Checkpoint, target: Target, f: _Found, rows: tuple[int, int], in_features: int
                ) -> tuple[Tensor, Tensor] | str:
    """One plain LoRA part's (A, B) as stored (B's halves swapped where diffusers' order differs),
    checked against the rows it adapts; or what is wrong with it."""
    if set(f.A) != {0} or set(f.B) != {0}:
        have = [n for n, d in (("lora_A", f.A), ("lora_B", f.B)) if d]
        return f"{target.module} part {target.part}: needs both lora_A and lora_B, has {have}"
    A, B = ckpt.tensor(f.A[0]), ckpt.tensor(f.B[0])
    start, end = rows
    if A.shape[1] != in_features or B.shape[0] != end - start or A.shape[0] != B.shape[1]:
        return (f"{f.A[0]}: A {list(A.shape)} and B {list(B.shape)} do not fit {target.module} "
                f"(rows {start}:{end} of {in_features} inputs)")
    return A, swap_halves([B]) if target.swap else B


def _add_part(ckpt: Checkpoint, layer: LoRALinear, target: Target, f: _Found, alpha: float | None) -> str | None:
    """Install one plain LoRA part; returns what is wrong with it, if anything."""
    part = _plain_part(ckpt, target, f, layer.rows[target.part], layer.in_features)
    if isinstance(part, str):
        return part
    A, B = (t.to(layer.weight.device, layer.adapter_dtype) for t in part)
    layer.add_part(target.part, A, B, alpha)
    return None


def _read(path: "str | Path") -> tuple[Checkpoint, dict[Target, _Found]]:
    """A LoRA file's adapted (layer, part)s, whichever layout; unknown keys are an error."""
    ckpt = _open_lora(Path(path))
    keys = ckpt.keys()
    ours = all(_OURS.match(k) for k in keys) and not any(k.startswith("transformer.") for k in keys)
    found, unknown = (_find_ours if ours else _find_official)(keys)
    if unknown:
        raise WeightsError(f"{ckpt.name}: {len(unknown)} key(s) are not LoRA weights of the FLUX transformer "
                           f"(a LoRA for another base model, or for the text encoders?): {_listing(unknown)}")
    return ckpt, found


def load_lora(model: Flux, path: "str | Path", scale: float = 1.0, only_moe: bool = False) -> dict[str, LoRALinear]:
    """Load a LoRA or MoE-LoRA file (official diffusers/peft layout, or ours) onto `model`.

    Official files: rank from the shapes, alpha = rank unless an `.alpha` key is present, the number
    of experts from the `expert_i` suffixes. `scale` multiplies every adapter's output. Returns the
    adapted layers. Any key that does not fit raises a WeightsError listing the first offenders.
    only_moe: skip the plain parts (an FP8 load has already added them to the weights:
    `plain_lora_updates`).
    """
    ckpt, found = _read(path)
    loaded, problems = {}, []
    for target, f in found.items():
        if only_moe and not f.moe:
            continue
        layer = lora_layer(model, target.module, target.n_parts)
        alpha = float(ckpt.tensor(f.alpha).item()) if f.alpha else None
        problem = (_set_experts(ckpt, layer, target.module, f, alpha) if f.moe
                   else _add_part(ckpt, layer, target, f, alpha))
        if problem:
            problems.append(problem)
            continue
        layer.scale = scale
        loaded[target.module] = layer
    if problems:
        raise WeightsError(f"{ckpt.name} does not fit this model ({len(problems)} problem(s)): {_listing(problems, 3)}. "
                           f"Is it a LoRA for FLUX.1 Fill [dev] (ICEdit)?")
    return loaded


def plain_lora_updates(model: Flux, path: "str | Path", scale: float = 1.0
                       ) -> dict[str, list[tuple[int, int, Tensor, Tensor, float]]]:
    """The plain LoRA parts of a file, for adding to the weights while they load (FP8 quantizes each
    weight as it is read, so the LoRA must be in it first): {our module: [(first row, end row, A, B,
    s)]}, the update of rows [first, end) being s * B @ A. A and B stay in the file (memory-mapped).
    `model` may be on the meta device: only its shapes are read. MoE parts are left out."""
    ckpt, found = _read(path)
    out, problems = {}, []
    for target, f in found.items():
        if f.moe:
            continue
        layer = _get(model, target.module)
        rows = part_rows(layer, target.n_parts, model.params.hidden_size)[target.part]
        part = _plain_part(ckpt, target, f, rows, layer.in_features)
        if isinstance(part, str):
            problems.append(part)
            continue
        A, B = part
        r = A.shape[0]
        alpha = float(ckpt.tensor(f.alpha).item()) if f.alpha else r
        out.setdefault(target.module, []).append((*rows, A, B, scale * alpha / r))
    if problems:
        raise WeightsError(f"{ckpt.name} does not fit this model ({len(problems)} problem(s)): {_listing(problems, 3)}. "
                           f"Is it a LoRA for FLUX.1 Fill [dev] (ICEdit)?")
    return out


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
        if layer.is_moe or layer.merged == (sign > 0):
            continue
        if layer.fp8:
            raise WeightsError(f"{name} has FP8 weights: a LoRA is merged into them while they load "
                               f"(load_flux(..., fp8=True, lora=...)), not after, which would round twice")
        for p in layer.lora_A:
            start, end = layer.rows[int(p)]
            w = layer.weight[start:end]
            w.copy_((w.float() + sign * layer.delta_weight(p)).to(w.dtype))
        layer.merged = sign > 0


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters in our format: `<module>.lora_A.<part>`, `.lora_B.<part>`, `.alpha.<part>`, `.lora_route`."""
    out = {}
    for name, layer in lora_layers(model).items():
        for p in layer.lora_A:
            out[f"{name}.lora_A.{p}"] = layer.lora_A[p].detach()
            out[f"{name}.lora_B.{p}"] = layer.lora_B[p].detach()
            r = layer.lora_A[p].shape[-2]
            out[f"{name}.alpha.{p}"] = torch.tensor(layer.scales[p] * r)
        if layer.is_moe:
            out[f"{name}.lora_route"] = layer.lora_route.detach()
    return out


def official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters in the official diffusers/peft layout (alpha folded into B, so alpha = rank)."""
    return official_from_ours(lora_state_dict(model))


def official_from_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our format -> the official layout (`transformer.<diffusers module>.lora_A.weight`, ...)."""
    out = {}
    for key, A in state.items():
        m = _OURS.match(key)
        if m is None or m["kind"] != "lora_A":
            continue
        name, p = m["mod"], m["part"]
        r = A.shape[-2]
        alpha = state.get(f"{name}.alpha.{p}")
        B = state[f"{name}.lora_B.{p}"] * ((float(alpha) if alpha is not None else r) / r)
        if p == "experts":
            base = "transformer." + diffusers_name(name, 0)
            for e in range(A.shape[0]):
                out[f"{base}.lora_A.expert_{e}.weight"] = A[e].contiguous()
                out[f"{base}.lora_B.expert_{e}.weight"] = B[e].contiguous()
            out[f"{base}.lora_route.weight"] = state[f"{name}.lora_route"].contiguous()
        else:
            base = "transformer." + diffusers_name(name, int(p))
            out[f"{base}.lora_A.weight"] = A.contiguous()
            out[f"{base}.lora_B.weight"] = (swap_halves([B]) if diffusers_target(base[12:]).swap else B).contiguous()
    return out
