"""ISSM chunked scan (SPEC.md section 3): a drop-in for DEST3D's `ISSM_chunk_scan_combined`
(ssm_ext.compat.issm_triton), with the gated RMSNorm that ISSM layers use after it.

Gated linear attention with a per-state decay: per head h, state n, group g,
    delta_t = clamp(phi(dt_t + dt_bias), lo, hi)        phi = softplus if dt_softplus
    s_t = exp(delta_t*A) * s_{t-1} + delta_t*B_t x_t,   y_t = C_t . s_t + D x_t,   out = y * silu(z).
Any seqlen, fp32/fp16/bf16 inputs with fp32 accumulation, results independent of chunk_size;
gradients for x, dt, A, B, C, D, z, dt_bias and initial_states."""
from typing import Optional, Tuple

import torch

from ._ops import ops
from .norm import RMSNormGated, rmsnorm_fn

__all__ = ["ISSM_chunk_scan_combined", "rmsnorm_fn", "RMSNormGated"]


def ISSM_chunk_scan_combined(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, chunk_size: int = 256, D: Optional[torch.Tensor] = None,
                             z: Optional[torch.Tensor] = None, dt_bias: Optional[torch.Tensor] = None,
                             initial_states: Optional[torch.Tensor] = None,
                             seq_idx: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                             dt_softplus: bool = False, dt_limit: Tuple[float, float] = (0.0, float("inf")),
                             return_final_states: bool = False):
    """x (batch, seqlen, nheads, headdim); dt (batch, seqlen, nheads, dstate); A (nheads, dstate);
    B, C (batch, seqlen, ngroups, dstate); D (nheads, headdim) or (nheads,); z like x;
    dt_bias (nheads, dstate) or (nheads,); initial_states (batch, nheads, headdim, dstate);
    seq_idx (batch, seqlen) int32: the state is reset to 0 where it changes;
    cu_seqlens (nseq + 1,) int32/int64 offsets of sequences packed into batch row 0 (batch 1):
    each starts from initial_states[i] (then (nseq, nheads, headdim, dstate)) or 0.
    chunk_size is a tuning hint (> 0); results do not depend on it.
    Returns out (like x), or (out, final_states (batch or nseq, nheads, headdim, dstate) fp32)."""
    try:
        lo, hi = dt_limit
    except (TypeError, ValueError):
        raise ValueError(f"dt_limit must be a pair (lo, hi), got {dt_limit!r}") from None
    out, final_states, _ = ops.issm_fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx,
                                     cu_seqlens, dt_softplus, float(lo), float(hi), return_final_states)
    return (out, final_states) if return_final_states else out
