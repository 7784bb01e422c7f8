"""Float64 reference for the gated RMSNorm (SPEC.md section 3, mamba_ssm layernorm_gated).

    norm_before_gate=True:  out = rmsnorm(x) * silu(z)
    norm_before_gate=False: out = rmsnorm(x * silu(z))
    rmsnorm(u) = u / sqrt(mean(u^2) + eps) * weight (+ bias), the mean taken per group of
    group_size consecutive channels (default: all of them).

Written from the formula, vectorised over rows; differentiable with ordinary autograd.
"""

import torch
import torch.nn.functional as F

__all__ = ["rmsnorm_gated"]

_F64 = torch.float64


def rmsnorm_gated(x, weight, bias=None, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    """x (..., dim); weight, bias (dim,); z like x. Returns the float64 output (..., dim)."""
    dim = x.shape[-1]
    gs = dim if group_size is None else group_size
    assert dim % gs == 0, "group_size must divide the last dim"
    u = x.to(_F64)
    gate = None if z is None else F.silu(z.to(_F64))
    if gate is not None and not norm_before_gate:
        u = u * gate
    ug = u.reshape(*u.shape[:-1], dim // gs, gs)
    rstd = 1.0 / torch.sqrt(ug.square().mean(-1, keepdim=True) + eps)
    out = (ug * rstd).reshape(u.shape) * weight.to(_F64)
    if bias is not None:
        out = out + bias.to(_F64)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out
