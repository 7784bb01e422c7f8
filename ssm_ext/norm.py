"""Gated RMSNorm with mamba_ssm `layernorm_gated` semantics (SPEC.md section 3):
`rmsnorm_fn` and the `RMSNormGated` module (DEST3D's `issm_triton.layernorm_gated.RMSNorm`).

norm_before_gate=True: out = rmsnorm(x) * silu(z); False: out = rmsnorm(x * silu(z)); the
mean of squares is taken per group of group_size channels (default: all). Statistics in fp32
(fp64 for fp64 input); out in x's dtype; runs on CPU and CUDA; traceable by torch.compile."""
from typing import Optional

import torch

from ._ops import ops

__all__ = ["rmsnorm_fn", "RMSNormGated"]


def rmsnorm_fn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               z: Optional[torch.Tensor] = None, eps: float = 1e-6, group_size: Optional[int] = None,
               norm_before_gate: bool = True) -> torch.Tensor:
    """x (..., hidden_size); weight, bias (hidden_size,); z like x (the gate) or None."""
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim (..., hidden_size), got a 0-D tensor")
    gs = x.shape[-1] if group_size is None else group_size
    out, _ = ops.rmsnorm_gated_fwd(x, weight, bias, z, eps, gs, norm_before_gate)
    return out


class RMSNormGated(torch.nn.Module):
    """weight initialised to ones, no bias; forward(x, z=None)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def reset_parameters(self):
        torch.nn.init.ones_(self.weight)

    def forward(self, x, z=None):
        return rmsnorm_fn(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                          norm_before_gate=self.norm_before_gate)

    def extra_repr(self):
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")
