"""First-order scan h_t = a_t*h_{t-1} + b_t*x_t, y_t = c_t*h_t over (B, L, D): a drop-in for
Quick SSM's `scan` and `SSM` layer (ssm_ext.quick_ssm) and accelerated-scan's `scan`
(ssm_ext.compat.accelerated_scan). State in fp32 whatever the input dtype; any L; any strides."""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._ops import ops

__all__ = ["scan", "scan_step", "RMSNorm", "SSM"]

_BACKENDS = ("auto", "cpu", "cuda", "torch")


def scan(x, a, b, c, *, block_l: int = 256, checkpoint: bool = True, tile_b: Optional[int] = None,
         tile_d: Optional[int] = None, backend: str = "auto", out_dtype: Optional[torch.dtype] = None,
         initial_state: Optional[torch.Tensor] = None, return_final_state: bool = False):
    """x, a, b, c: (B, L, D); b or c may be None (= 1). initial_state: (B, D).
    checkpoint=True keeps no (B, L, D) state for the backward (it is recomputed); False keeps h.
    block_l, tile_b, tile_d are accepted for compatibility with Quick SSM and not needed.
    backend: "auto" (the kernel of x's device), "cpu", "cuda", or "torch" (the float64 reference).
    Returns y (B, L, D) in out_dtype (default x.dtype), and the final state (B, D) fp32 if asked."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend in ("cpu", "cuda") and x.device.type != backend:
        raise ValueError(f"backend={backend!r} but x is on {x.device}")
    if backend == "torch":
        from .reference.scan import scan as reference_scan
        y, final = reference_scan(x, a, b, c, initial_state)
        y = y.to(out_dtype or x.dtype)
        final = final.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    else:
        y, final = ops.scan_fwd(x, a, b, c, initial_state, not checkpoint, out_dtype)[:2]
    return (y, final) if return_final_state else y


def scan_step(h, x_t, a_t, b_t=None, c_t=None):
    """One decode step on (B, D) tensors: h_t = a_t*h + b_t*x_t (fp32), y_t = c_t*h_t (x_t's dtype);
    b_t or c_t None means 1. Returns (y_t, h_t)."""
    u = x_t.float() if b_t is None else b_t.float() * x_t.float()
    h = a_t.float() * h.float() + u
    y = h if c_t is None else c_t.float() * h
    return y.to(x_t.dtype), h


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype=torch.float32, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


class SSM(nn.Module):
    """Quick SSM's layer: RMSNorm; a = sigmoid(A_proj x), input B_proj x, output gate
    silu(C_proj_a x) * C_proj_b x, input gate sigmoid(D_proj x); out_proj(scan) + residual."""

    def __init__(self, hidden_size: int, state_size_mult: float = 1.0, eps: float = 1e-5,
                 dtype: torch.dtype = torch.float32, device=None, compute_dtype: torch.dtype = torch.float16,
                 use_residual: bool = True, use_norm: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        self.state_size_dim = int(hidden_size * state_size_mult)
        self.compute_dtype = compute_dtype
        self.use_residual = use_residual
        self.use_norm = use_norm
        n, kw = self.state_size_dim, dict(device=device, dtype=dtype)
        self.A_proj = nn.Linear(hidden_size, n, bias=True, **kw)
        self.B_proj = nn.Linear(hidden_size, n, bias=False, **kw)
        self.C_proj_a = nn.Linear(hidden_size, n, bias=False, **kw)
        self.C_proj_b = nn.Linear(hidden_size, n, bias=False, **kw)
        self.D_proj = nn.Linear(hidden_size, n, bias=False, **kw)
        self.out_proj = nn.Linear(n, hidden_size, bias=True, **kw)
        self.pre_norm = RMSNorm(hidden_size, eps=eps, dtype=dtype, device=device) if use_norm else nn.Identity()

    def forward(self, x, *, block_l: int = 256, checkpoint: bool = True, tile_b: Optional[int] = None,
                tile_d: Optional[int] = None, backend: str = "auto", scan_out_dtype: Optional[torch.dtype] = None):
        xn = self.pre_norm(x)
        cd = self.compute_dtype
        a = torch.sigmoid(self.A_proj(xn)).to(cd)
        xin = self.B_proj(xn).to(cd)
        c = (F.silu(self.C_proj_a(xn)) * self.C_proj_b(xn)).to(cd)
        d = torch.sigmoid(self.D_proj(xn)).to(cd)
        h = scan(xin, a, d, c, block_l=block_l, checkpoint=checkpoint, tile_b=tile_b, tile_d=tile_d,
                 backend=backend, out_dtype=scan_out_dtype or self.out_proj.weight.dtype)
        y = self.out_proj(h.to(self.out_proj.weight.dtype))
        return y + x if self.use_residual else y
