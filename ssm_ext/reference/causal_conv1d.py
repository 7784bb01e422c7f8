"""Float64 step-by-step reference for the causal depthwise conv1d family (SPEC.md section 1).

Everything is computed in float64 with explicit loops over time and taps (vectorised over
batch and channels only).  Nothing here calls ``F.conv1d`` or shares code with the kernels.
All functions are differentiable with ordinary autograd (no in-place writes into tensors
that need gradients), so the tests can take gradients through them.

Semantics (from API_causal_conv1d.txt):

* ``xe = concat(initial_states or zeros, x)`` along L (``W - 1`` leading entries).
* ``pre[t] = bias + sum_k w[k] * xe[t + k] * [seq(t + k - (W - 1)) == seq(t)]`` where
  ``seq(i)`` for ``i < 0`` is ``seq(0)`` (initial states continue the first sequence).
* ``out[t] = act(pre[t])``, and ``out[t] = 0`` where ``seq_idx[t] < 0``.
* ``final_states[j] = xe[L + j] if seq(L + j - (W - 1)) == seq(L - 1) else 0`` for ``j < W - 1``.
"""

import torch

__all__ = ["causal_conv1d", "causal_conv1d_update", "causal_conv1d_varlen_states"]

_F64 = torch.float64


def _check_activation(activation):
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def _silu(v):
    return v * torch.sigmoid(v)


def causal_conv1d(x, weight, bias=None, seq_idx=None, initial_states=None, activation=None):
    """Reference causal depthwise conv1d.

    x: (b, D, L) any float dtype / strides; weight: (D, W); bias: (D,) or None;
    seq_idx: (b, L) integer or None; initial_states: (b, D, W-1) or None.
    Returns ``(out, final_states)``, both float64: out (b, D, L), final_states (b, D, W-1).
    """
    silu = _check_activation(activation)
    assert x.dim() == 3, "x must be (b, D, L)"
    assert weight.dim() == 2, "weight must be (D, W)"
    b, D, L = x.shape
    W = weight.shape[1]
    assert weight.shape[0] == D and W >= 2
    x64 = x.to(_F64)
    w64 = weight.to(_F64)
    if initial_states is None:
        init = torch.zeros(b, D, W - 1, dtype=_F64, device=x.device)
    else:
        assert tuple(initial_states.shape) == (b, D, W - 1)
        init = initial_states.to(_F64)
    xe = torch.cat([init, x64], dim=2)  # (b, D, W - 1 + L); xe[:, :, i] = x[i - (W - 1)]

    if seq_idx is None:
        seq = torch.zeros(b, L, dtype=torch.long, device=x.device)
    else:
        assert tuple(seq_idx.shape) == (b, L)
        seq = seq_idx.to(torch.long)
    if L > 0:
        # seqe[:, i] = seq(i - (W - 1)) with seq(negative) = seq(0)
        seqe = torch.cat([seq[:, :1].expand(b, W - 1), seq], dim=1)
    else:
        seqe = torch.zeros(b, W - 1, dtype=torch.long, device=x.device)

    if bias is not None:
        assert tuple(bias.shape) == (D,)
        b64 = bias.to(_F64)

    outs = []
    for t in range(L):
        acc = torch.zeros(b, D, dtype=_F64, device=x.device)
        if bias is not None:
            acc = acc + b64[None, :]
        cur = seq[:, t]
        for k in range(W):
            same = (seqe[:, t + k] == cur).to(_F64)  # (b,)
            acc = acc + w64[None, :, k] * xe[:, :, t + k] * same[:, None]
        if silu:
            acc = _silu(acc)
        acc = acc * (cur >= 0).to(_F64)[:, None]
        outs.append(acc)
    if L > 0:
        out = torch.stack(outs, dim=2)
    else:
        out = torch.zeros(b, D, 0, dtype=_F64, device=x.device)

    finals = []
    for j in range(W - 1):
        if L > 0:
            same = (seqe[:, L + j] == seq[:, L - 1]).to(_F64)
            finals.append(xe[:, :, L + j] * same[:, None])
        else:
            # No token: the state is unchanged (the last W-1 entries of xe are the initial states).
            finals.append(xe[:, :, L + j])
    final_states = torch.stack(finals, dim=2) if W > 1 else xe[:, :, :0]
    return out, final_states


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None,
                         cache_seqlens=None, conv_state_indices=None):
    """Reference decode step (Dao-AILab ``causal_conv1d_update`` semantics).

    x: (b, D) or (b, D, l); conv_state: (B_pool, D, S) with S >= W - 1 (pool rows picked by
    ``conv_state_indices``, else row i for batch i); cache_seqlens: (b,) or None.

    Without cache_seqlens the state shifts left by l and x is appended
    (``new = concat(state, x)[-S:]``); the W-1 inputs before token 0 are ``state[S-(W-1):]``.
    With cache_seqlens the state is a circular buffer: the W-1 inputs before token 0 are read
    at ``(c - (W-1) + i) % S`` and token t is written at ``(c + t) % S`` (in order of t).
    A negative conv_state_indices entry gives output 0 and leaves the state untouched.

    Does not mutate its inputs. Returns ``(out, new_conv_state)``: out float64 shaped like x,
    new_conv_state float64 (the whole pool).
    """
    silu = _check_activation(activation)
    squeeze = x.dim() == 2
    x64 = x.to(_F64)
    if squeeze:
        x64 = x64.unsqueeze(-1)
    b, D, l = x64.shape
    W = weight.shape[1]
    w64 = weight.to(_F64)
    b64 = bias.to(_F64) if bias is not None else None
    pool = conv_state.detach().to(_F64).clone()
    S = pool.shape[2]
    assert pool.shape[1] == D and S >= W - 1

    rows_out = []
    for i in range(b):
        row = i if conv_state_indices is None else int(conv_state_indices[i])
        if row < 0:
            rows_out.append(torch.zeros(D, l, dtype=_F64, device=x.device))
            continue
        st = pool[row]  # (D, S)
        xi = x64[i]  # (D, l)
        if cache_seqlens is None:
            prev = st[:, S - (W - 1):]
            new = torch.cat([st, xi], dim=1)[:, -S:] if S > 0 else st
        else:
            c = int(cache_seqlens[i])
            prev = torch.stack([st[:, (c - (W - 1) + j) % S] for j in range(W - 1)], dim=1) \
                if W > 1 else st[:, :0]
            new = st.clone()
            for t in range(l):
                new[:, (c + t) % S] = xi[:, t]
        window = torch.cat([prev, xi], dim=1)  # (D, W - 1 + l)
        cols = []
        for t in range(l):
            acc = torch.zeros(D, dtype=_F64, device=x.device)
            if b64 is not None:
                acc = acc + b64
            for k in range(W):
                acc = acc + w64[:, k] * window[:, t + k]
            if silu:
                acc = _silu(acc)
            cols.append(acc)
        rows_out.append(torch.stack(cols, dim=1) if l > 0
                        else torch.zeros(D, 0, dtype=_F64, device=x.device))
        pool[row] = new.detach()
    out = torch.stack(rows_out, dim=0) if b > 0 else torch.zeros(0, D, l, dtype=_F64, device=x.device)
    if squeeze:
        out = out.squeeze(-1)
    return out, pool


def causal_conv1d_varlen_states(x, cu_seqlens, state_len):
    """Reference: x (total, D), cu_seqlens (nseq + 1,) -> (nseq, D, state_len) float64 with
    ``out[i, :, -n:] = x[end - n:end].T``, ``n = min(len_i, state_len)``, the rest 0."""
    total, D = x.shape
    cu = [int(v) for v in cu_seqlens.tolist()]
    nseq = len(cu) - 1
    out = torch.zeros(nseq, D, state_len, dtype=_F64, device=x.device)
    x64 = x.detach().to(_F64)
    for i in range(nseq):
        start, end = cu[i], cu[i + 1]
        n = min(end - start, state_len)
        for j in range(n):
            # position state_len - n + j holds token end - n + j
            out[i, :, state_len - n + j] = x64[end - n + j]
    return out
