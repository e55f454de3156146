"""The mixture of LoRA experts (ICEdit-MoE): E LoRA experts on one linear layer, one per token.

    e = argmax_e (R x)_e  per token (top-1);   y = W x + b + s * B_e (A_e x)
    A [E, r, in], B [E, out, r], R [E, in] (the router), s = scale * alpha / r

ICEdit puts 4 experts on the unfused output layers of each block's MLP (img_mlp.2 and linear2;
diffusers' ff.net.2 and proj_out). The layer computes through `flux_kernels.lora_moe.lora_moe_linear`:
the fused Triton kernel on CUDA (or under TRITON_INTERPRET=1), its torch reference elsewhere. With
top-1 routing the router receives no gradient (see the kernel). Unlike a plain LoRA, routed
experts cannot be folded into the weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from .adapted import AdaptedLinear

if TYPE_CHECKING:
    from .fp8 import FP8Linear


class LoRAMoELinear(AdaptedLinear):
    """A linear layer with LoRA experts and their token router."""

    is_moe = True

    def __init__(self, base: nn.Linear | FP8Linear, A: Tensor, B: Tensor, route: Tensor, alpha: float | None = None):
        """A [E, r, in], B [E, out, r], route [E, in] (lora_files checks a file's shapes); alpha defaults to r."""
        super().__init__(base)
        r = A.shape[1]
        # One entry each, "experts": the parameter names checkpoints and files use (<layer>.lora_A.experts),
        # the same as a plain LoRA's parts (<layer>.lora_A.0).
        self.lora_A = nn.ParameterDict({"experts": nn.Parameter(A, requires_grad=A.requires_grad)})
        self.lora_B = nn.ParameterDict({"experts": nn.Parameter(B, requires_grad=B.requires_grad)})
        self.lora_route = nn.Parameter(route, requires_grad=route.requires_grad)
        self.alpha_scale = (alpha if alpha is not None else r) / r  # alpha / r (self.scale is applied on top)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A["experts"], self.lora_B["experts"], self.lora_route]

    def forward(self, x: Tensor) -> Tensor:
        from flux_kernels.lora_moe import lora_moe_linear  # Triton is imported only where MoE layers exist
        A, B, R = (t.to(x.dtype) for t in self.adapter_parameters())
        return lora_moe_linear(x, self.weight, self.bias, A, B, R, scale=self.scale * self.alpha_scale,
                               base_out=self.base(x) if self.fp8 else None)
