"""LoRA and LoRA-MoE files: reading both layouts onto our model, writing ours and the official one.

The official diffusers/peft layout names diffusers modules:
    transformer.<diffusers module>.lora_A.weight, .lora_B.weight, .alpha (optional)
    MoE: .lora_A.expert_<i>.weight, .lora_B.expert_<i>.weight, .lora_route.weight
and is mapped onto our modules and their parts through the checkpoint's key table (flux_keys).
Our own format is the adapters' state under our names:
    <module>.lora_A.<part>, <module>.lora_B.<part>, <module>.alpha.<part>
    MoE: <module>.lora_A.experts [E, r, in], .lora_B.experts [E, out, r], .alpha.experts, .lora_route [E, in]

`load_lora` installs a file's adapters (lora.LoRALinear, moe.LoRAMoELinear); `plain_lora_updates`
reads its plain parts for adding to weights as they load (FP8: flux_loading.load_flux).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .adapted import AdaptedLinear, adapter_dtype, install, linear_at, module_at
from .errors import WeightsError
from .flux_keys import Target, diffusers_name, diffusers_target, n_parts
from .loading import Checkpoint, swap_halves
from .lora import LoRALinear, lora_layer, lora_layers, part_rows
from .moe import LoRAMoELinear

if TYPE_CHECKING:
    from .mmdit import Flux

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


# ---- reading: which keys adapt which (layer, part) ---------------------------------------------------

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
    `.lora_A.expert_<i>.weight`), `.lora_route.weight`, `.alpha`, mapped through the key table."""
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


def _read(path: str | Path) -> tuple[Checkpoint, dict[Target, _Found]]:
    """A LoRA file's adapted (layer, part)s, whichever layout; unknown keys are an error."""
    ckpt = _open_lora(Path(path))
    keys = ckpt.keys()
    ours = all(_OURS.match(k) for k in keys) and not any(k.startswith("transformer.") for k in keys)
    found, unknown = (_find_ours if ours else _find_official)(keys)
    if unknown:
        raise WeightsError(f"{ckpt.name}: {len(unknown)} key(s) are not LoRA weights of the FLUX transformer "
                           f"(a LoRA for another base model, or for the text encoders?): {_listing(unknown)}")
    return ckpt, found


def _alpha(ckpt: Checkpoint, f: _Found) -> float | None:
    return float(ckpt.tensor(f.alpha).item()) if f.alpha else None


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


def _experts(ckpt: Checkpoint, module: str, f: _Found, layer: nn.Module) -> tuple[Tensor, Tensor, Tensor] | str:
    """LoRA experts (A [E, r, in], B [E, out, r], route [E, in]) as stored, checked against the
    linear layer they adapt; or what is wrong with them."""
    idx = sorted(f.A)
    if idx != list(range(len(idx))) or sorted(f.B) != idx:
        return f"{module}: experts {idx} are incomplete (need lora_A and lora_B of 0..N-1)"
    if f.route is None:
        return f"{module}: LoRA experts without a lora_route"
    if f.stacked:
        A, B = ckpt.tensor(f.A[0]), ckpt.tensor(f.B[0])
    else:
        A, B = torch.stack([ckpt.tensor(f.A[i]) for i in idx]), torch.stack([ckpt.tensor(f.B[i]) for i in idx])
    R = ckpt.tensor(f.route)
    if (A.shape[2] != layer.in_features or B.shape[1] != layer.out_features or A.shape[1] != B.shape[2]
            or tuple(R.shape) != (A.shape[0], layer.in_features)):
        return (f"{module}: experts A {list(A.shape)}, B {list(B.shape)}, route {list(R.shape)} do not fit a "
                f"layer of {layer.in_features} -> {layer.out_features}")
    return A, B, R


# ---- installing ------------------------------------------------------------------------------------

def _add_part(ckpt: Checkpoint, model: Flux, target: Target, f: _Found) -> tuple[LoRALinear, str | None]:
    """Install one plain LoRA part; returns its layer and what is wrong with the part, if anything."""
    layer = lora_layer(model, target.module, target.n_parts)
    part = _plain_part(ckpt, target, f, layer.rows[target.part], layer.in_features)
    if isinstance(part, str):
        return layer, part
    A, B = (t.to(layer.weight.device, adapter_dtype(layer)) for t in part)
    layer.add_part(target.part, A, B, _alpha(ckpt, f))
    return layer, None


def _add_experts(ckpt: Checkpoint, model: Flux, target: Target, f: _Found) -> tuple[LoRAMoELinear | None, str | None]:
    """Install LoRA experts; returns their layer and what is wrong with them, if anything."""
    experts = _experts(ckpt, target.module, f, linear_at(model, target.module))
    if isinstance(experts, str):
        return None, experts
    alpha = _alpha(ckpt, f)
    layer = install(model, target.module, lambda lin: LoRAMoELinear(
        lin, *(t.to(lin.weight.device, adapter_dtype(lin)) for t in experts), alpha))
    return layer, None


def load_lora(model: Flux, path: str | Path, scale: float = 1.0, only_moe: bool = False) -> dict[str, AdaptedLinear]:
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
        layer, problem = (_add_experts if f.moe else _add_part)(ckpt, model, target, f)
        if problem:
            problems.append(problem)
            continue
        layer.scale = scale
        loaded[target.module] = layer
    if problems:
        raise WeightsError(f"{ckpt.name} does not fit this model ({len(problems)} problem(s)): {_listing(problems, 3)}. "
                           f"Is it a LoRA for FLUX.1 Fill [dev] (ICEdit)?")
    return loaded


def plain_lora_updates(model: Flux, path: str | Path, scale: float = 1.0
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
        layer = module_at(model, target.module)
        rows = part_rows(layer, target.n_parts, model.params.hidden_size)[target.part]
        part = _plain_part(ckpt, target, f, rows, layer.in_features)
        if isinstance(part, str):
            problems.append(part)
            continue
        A, B = part
        r = A.shape[0]
        alpha = _alpha(ckpt, f)
        alpha = r if alpha is None else alpha
        out.setdefault(target.module, []).append((*rows, A, B, scale * alpha / r))
    if problems:
        raise WeightsError(f"{ckpt.name} does not fit this model ({len(problems)} problem(s)): {_listing(problems, 3)}. "
                           f"Is it a LoRA for FLUX.1 Fill [dev] (ICEdit)?")
    return out


# ---- writing ---------------------------------------------------------------------------------------

def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters in our format: `<module>.lora_A.<part>`, `.lora_B.<part>`, `.alpha.<part>`;
    experts as part "experts" ([E, ...] tensors) and `<module>.lora_route`."""
    out = {}
    for name, layer in lora_layers(model).items():
        if isinstance(layer, LoRAMoELinear):
            A = layer.lora_A["experts"]  # [E, r, in]
            out[f"{name}.lora_A.experts"] = A.detach()
            out[f"{name}.lora_B.experts"] = layer.lora_B["experts"].detach()
            out[f"{name}.alpha.experts"] = torch.tensor(layer.alpha_scale * A.shape[1])
            out[f"{name}.lora_route"] = layer.lora_route.detach()
            continue
        for p, A in layer.lora_A.items():  # A [r, in]
            out[f"{name}.lora_A.{p}"] = A.detach()
            out[f"{name}.lora_B.{p}"] = layer.lora_B[p].detach()
            out[f"{name}.alpha.{p}"] = torch.tensor(layer.scales[p] * A.shape[0])
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
