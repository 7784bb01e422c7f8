"""Float64 step-by-step reference for the ISSM scan (SPEC.md section 3).

An explicit loop over time, vectorised over (batch, head, headdim, dstate) only; nothing here
chunks, calls a cumulative op or shares code with the kernels. Differentiable with ordinary
autograd (no in-place writes into tensors that need gradients), so the tests take gradients
through it.

    delta_t[h,n] = clamp(phi(dt_t[h,n] + dt_bias[h,n]), lo, hi)     phi = softplus or identity
    s_t[h,p,n]   = exp(delta_t[h,n]*A[h,n]) * s_{t-1}[h,p,n] + delta_t[h,n]*B_t[g,n]*x_t[h,p]
    y_t[h,p]     = sum_n C_t[g,n]*s_t[h,p,n] + D[h(,p)]*x_t[h,p]
    out          = y * silu(z)  (z given)  else  y

with g = h // (nheads // ngroups). softplus is the identity above 20 (torch's threshold) and
the clamp passes no gradient outside [lo, hi].

Sequences: s_{-1} = initial_states (or 0) at the start of each batch row. With seq_idx, the
state is reset to 0 before step t wherever seq_idx[t] != seq_idx[t-1] (as mamba_ssm does; the
initial state continues the row's first sequence). With cu_seqlens (batch 1, sequences packed
along L), every sequence starts from its own initial_states[i] (or 0), and final_states[i] is
the state after its last step (its initial state when it is empty).
"""

import torch
import torch.nn.functional as F

__all__ = ["issm_chunk_scan"]

_F64 = torch.float64


def _as64(t):
    return None if t is None else t.to(_F64)


def _scan_rows(x, delta, A, B, C, D, z, h0, seq_idx):
    """The recurrence over x (b, L, H, P) from h0 (b, H, P, N); seq_idx (b, L) or None.
    Returns out (b, L, H, P) and the last state (b, H, P, N)."""
    b, L, H, P = x.shape
    G = B.shape[2]
    rep = H // G
    Bh = B.repeat_interleave(rep, dim=2)  # (b, L, H, N)
    Ch = C.repeat_interleave(rep, dim=2)
    if D is None:
        Dv = torch.zeros(H, P, dtype=_F64, device=x.device)
    else:
        Dv = D if D.dim() == 2 else D[:, None].expand(H, P)
    s = h0
    outs = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(_F64)  # (b,)
            s = s * keep[:, None, None, None]
        d = delta[:, t]  # (b, H, N)
        s = torch.exp(d * A)[:, :, None, :] * s + (d * Bh[:, t])[:, :, None, :] * x[:, t, :, :, None]
        y = (s * Ch[:, t][:, :, None, :]).sum(-1) + Dv * x[:, t]
        if z is not None:
            y = y * F.silu(z[:, t])
        outs.append(y)
    out = torch.stack(outs, 1) if L else x.new_zeros(b, 0, H, P)
    return out, s


def issm_chunk_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                    cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """Reference ISSM scan. Shapes: x (b, L, H, P); dt (b, L, H, N); A (H, N); B, C (b, L, G, N);
    D (H, P) or (H,); z like x; dt_bias (H, N) or (H,); initial_states (b, H, P, N), or
    (nseq, H, P, N) with cu_seqlens (nseq + 1,) offsets (then b == 1); seq_idx (b, L).
    Returns ``(out, final_states)`` in float64: out (b, L, H, P), final_states (b or nseq, H, P, N)."""
    b, L, H, P = x.shape
    N = B.shape[-1]
    assert H % B.shape[2] == 0, "nheads must be a multiple of ngroups"
    assert tuple(dt.shape) == (b, L, H, N) and tuple(A.shape) == (H, N) and C.shape == B.shape
    x64, dt64, A64, B64, C64, D64, z64 = map(_as64, (x, dt, A, B, C, D, z))
    v = dt64
    if dt_bias is not None:
        bias = _as64(dt_bias)
        v = v + (bias if bias.dim() == 2 else bias[:, None])
    if dt_softplus:
        v = F.softplus(v)  # threshold 20: the identity above it
    delta = torch.clamp(v, min=float(dt_limit[0]), max=float(dt_limit[1]))

    nseq = b if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_states is None:
        h0 = torch.zeros(nseq, H, P, N, dtype=_F64, device=x.device)
    else:
        assert tuple(initial_states.shape) == (nseq, H, P, N)
        h0 = _as64(initial_states)
    if cu_seqlens is None:
        return _scan_rows(x64, delta, A64, B64, C64, D64, z64, h0, seq_idx)

    assert b == 1, "cu_seqlens packs the sequences into one batch row"
    cu = [int(c) for c in cu_seqlens.tolist()]
    assert cu[0] == 0 and cu[-1] == L
    outs, finals = [], []
    for i in range(nseq):
        sl = slice(cu[i], cu[i + 1])
        out_i, s_i = _scan_rows(x64[:, sl], delta[:, sl], A64, B64[:, sl], C64[:, sl], D64,
                                None if z64 is None else z64[:, sl], h0[i:i + 1],
                                None if seq_idx is None else seq_idx[:, sl])
        outs.append(out_i)
        finals.append(s_i)
    out = torch.cat(outs, 1) if outs else x64.new_zeros(1, 0, H, P)
    final = torch.cat(finals, 0) if finals else x64.new_zeros(0, H, P, N)
    return out, final
