"""A linear layer that carries an adapter beside its own weight: what LoRA (lora.py) and the
mixture of LoRA experts (moe.py) have in common.

`AdaptedLinear` takes the place of a model's nn.Linear or FP8Linear and keeps its `weight` and
`bias`, the same tensors under the same keys, so a checkpoint loads the same with or without
adapters; an FP8 weight keeps its per-channel scales. `install` puts one in place.
"""

from typing import Callable, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import WeightsError
from .fp8 import FP8, FP8Linear, fp8_linear


def adapter_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype of adapters on a linear layer: its weight's, or for an FP8 weight the compute dtype
    (the bias's; bf16 without one)."""
    if layer.weight.dtype != FP8:
        return layer.weight.dtype
    return layer.bias.dtype if layer.bias is not None else torch.bfloat16


class AdaptedLinear(nn.Linear):
    """An nn.Linear (same `weight` and `bias`, same keys) over which a subclass adds an adapter."""

    def __init__(self, base: "nn.Linear | FP8Linear"):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.fp8 = isinstance(base, FP8Linear)  # an FP8 base weight: its scales come along
        if self.fp8:
            self.register_buffer("weight_scale", base.weight_scale, persistent=False)
        self.scale = 1.0  # the user's scale of the adapter's output

    def base(self, x: Tensor) -> Tensor:
        """x W^T + b, from the FP8 weight and its scales when the base is FP8."""
        return fp8_linear(x, self.weight, self.weight_scale, self.bias) if self.fp8 else F.linear(x, self.weight, self.bias)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The adapter's parameters, in a fixed order (the optimizer's)."""
        raise NotImplementedError


def module_at(model: nn.Module, name: str) -> nn.Module:
    """The submodule `name`, or a WeightsError saying the adapter does not fit this model."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise WeightsError(f"the model has no module {name!r} (is this LoRA for a deeper/other FLUX?)") from None


def linear_at(model: nn.Module, name: str) -> "nn.Linear | FP8Linear":
    """The linear layer `name` (adapted or not), or a WeightsError saying why it cannot take a LoRA."""
    layer = module_at(model, name)
    if not isinstance(layer, (nn.Linear, FP8Linear)):
        raise WeightsError(f"{name} is a {type(layer).__name__}, not a linear layer: it cannot take a LoRA")
    return layer


A = TypeVar("A", bound=AdaptedLinear)


def install(model: nn.Module, module: str, make: Callable[["nn.Linear | FP8Linear"], A]) -> A:
    """Replace the linear layer at `module` by make(that layer); returns the new layer. A layer
    takes one adapter: a plain LoRA (whose parts may come one by one) or one set of experts."""
    layer = linear_at(model, module)
    if isinstance(layer, AdaptedLinear):
        raise WeightsError(f"{module} already carries a {type(layer).__name__}: a layer cannot hold both a plain "
                           f"LoRA and LoRA experts, nor two sets of experts")
    new = make(layer)
    parent, _, child = module.rpartition(".")
    setattr(module_at(model, parent) if parent else model, child, new)
    return new
