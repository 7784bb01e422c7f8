"""Float64 step-by-step reference for HSTU attention, dense and block-sparse (SPEC.md section 6).

Loops over sequences, heads and queries, vectorised over keys and features only; nothing is
shared with the kernels. Differentiable with ordinary autograd (outputs are assembled with
stack/cat, never written in place), so the tests use it as the gradient reference; the
selected block indices are constants.

Jagged inputs: q, k (T, H*dqk), v, u (T, H*dv), x_offsets (B+1). For sequence b, head h,
query t, key j (positions within the sequence), n the padded length:

    w(t, j) = silu(alpha * q_t . k_j) / n * mask(t, j),  j <= t
    kbar_c, vbar_c = means of k, v over block c (block_size keys)
    o_cmp(t) = sum over complete blocks c with (c+1)*BS-1 <= t of silu(alpha q_t . kbar_c) / n * vbar_c
    selection: score(c) = silu(alpha q_t . kbar_c) over complete blocks, the block holding t
        forced in; the best block_counts (ties to the lower index; fewer if fewer exist)
    o_slc(t) = sum over selected blocks, keys j <= t, of w(t, j) v_j
    o_swa(t) = sum over t - window_size < j <= t of w(t, j) v_j   (off when window_size == 0)
    out(t) = u_t * (g_cmp o_cmp + g_slc o_slc + g_swa o_swa)
"""
import math

import torch

__all__ = ["pad", "unpad", "select_blocks", "hstu_attention", "hstu_bsa"]

_F64 = torch.float64


def _silu(x):
    return x * torch.sigmoid(x)


def _heads(x, s, e, num_heads):
    """Rows s..e-1 of a jagged (T, H*d) tensor as float64 (L, H, d)."""
    return x[s:e].to(_F64).reshape(e - s, num_heads, x.shape[1] // num_heads)


def _bounds(x_offsets):
    o = [int(v) for v in x_offsets.tolist()]
    return list(zip(o[:-1], o[1:]))


def _alpha(alpha, dqk):
    return 1.0 / math.sqrt(dqk) if alpha is None else alpha


def pad(x, x_offsets, n, num_heads):
    """Jagged (T, H*d) -> padded float64 (B, n, H, d), zeros past each sequence's end."""
    out = []
    for s, e in _bounds(x_offsets):
        rows = _heads(x, s, e, num_heads)
        out.append(torch.cat([rows, rows.new_zeros(n - (e - s), *rows.shape[1:])]))
    return torch.stack(out)


def unpad(x, x_offsets):
    """Padded (B, n, ...) -> jagged (T, ...): each sequence's first rows."""
    return torch.cat([x[b, : e - s] for b, (s, e) in enumerate(_bounds(x_offsets))])


def _mask(attn_mask, b, L):
    if attn_mask is None:
        return None
    return attn_mask[0 if attn_mask.shape[0] == 1 else b, :L, :L].to(_F64)


def _block_means(x, block_size):
    """(L, d) -> (L // block_size, d): the mean over each complete block."""
    nb = x.shape[0] // block_size
    return x[: nb * block_size].reshape(nb, block_size, x.shape[1]).mean(1)


def select_blocks(q, k, x_offsets, num_heads, block_size, block_counts, alpha=None):
    """Indices (T, H, block_counts) int32 of each query's selected blocks, best first, -1 padded."""
    alpha = _alpha(alpha, q.shape[1] // num_heads)
    out = torch.full((q.shape[0], num_heads, block_counts), -1, dtype=torch.int32)
    with torch.no_grad():
        for s, e in _bounds(x_offsets):
            qs, ks = _heads(q, s, e, num_heads), _heads(k, s, e, num_heads)
            for h in range(num_heads):
                kbar = _block_means(ks[:, h], block_size)
                for t in range(e - s):
                    own = t // block_size
                    # blocks before the own one are complete; the own block is forced in
                    scores = [_silu(alpha * (qs[t, h] @ kbar[c])).item() for c in range(own)] + [math.inf]
                    order = sorted(range(own + 1), key=lambda c: (-scores[c], c))[:block_counts]
                    out[s + t, h, : len(order)] = torch.tensor(order, dtype=torch.int32)
    return out


def _weights(q_t, keys, alpha, n, mask_row):
    w = _silu(alpha * (keys @ q_t)) / n
    return w if mask_row is None else w * mask_row


def hstu_attention(q, k, v, x_offsets, n, num_heads, alpha=None, attn_mask=None):
    """Dense causal HSTU attention: out (T, H*dv) float64, out(t) = sum_{j <= t} w(t, j) v_j."""
    alpha = _alpha(alpha, q.shape[1] // num_heads)
    rows = []
    for b, (s, e) in enumerate(_bounds(x_offsets)):
        qs, ks, vs = (_heads(x, s, e, num_heads) for x in (q, k, v))
        mask = _mask(attn_mask, b, e - s)
        for t in range(e - s):
            heads = []
            for h in range(num_heads):
                w = _weights(qs[t, h], ks[: t + 1, h], alpha, n, None if mask is None else mask[t, : t + 1])
                heads.append(w @ vs[: t + 1, h])
            rows.append(torch.cat(heads))
    return torch.stack(rows) if rows else v.new_zeros(0, v.shape[1], dtype=_F64)


def hstu_bsa(q, k, v, u, gates, x_offsets, n, num_heads, block_size, block_counts, window_size=0,
             alpha=None, attn_mask=None, block_idx=None):
    """Block-sparse HSTU attention. gates (T, H, 3): g_cmp, g_slc, g_swa; u None means 1.
    block_idx (T, H, S) overrides the selection (entries < 0 are empty).
    Returns (out (T, H*dv) float64, block_idx (T, H, S) int32)."""
    alpha = _alpha(alpha, q.shape[1] // num_heads)
    if block_idx is None:
        block_idx = select_blocks(q, k, x_offsets, num_heads, block_size, block_counts, alpha)
    bs = block_size
    rows = []
    for b, (s, e) in enumerate(_bounds(x_offsets)):
        qs, ks, vs = (_heads(x, s, e, num_heads) for x in (q, k, v))
        us = None if u is None else _heads(u, s, e, num_heads)
        g = gates[s:e].to(_F64)
        mask = _mask(attn_mask, b, e - s)
        for t in range(e - s):
            heads = []
            for h in range(num_heads):
                m = None if mask is None else mask[t, : t + 1]
                w = _weights(qs[t, h], ks[: t + 1, h], alpha, n, m)   # (t+1,) over keys 0..t
                vt = vs[: t + 1, h]
                complete = (t + 1) // bs                                # blocks with (c+1)*bs-1 <= t
                kbar = _block_means(ks[:, h], bs)[:complete]
                vbar = _block_means(vs[:, h], bs)[:complete]
                o_cmp = (_silu(alpha * (kbar @ qs[t, h])) / n) @ vbar
                o_slc = vt.new_zeros(vt.shape[1])
                for c in block_idx[s + t, h].tolist():
                    if c >= 0 and c * bs <= t:
                        j = slice(c * bs, min((c + 1) * bs, t + 1))
                        o_slc = o_slc + w[j] @ vt[j]
                o_swa = vt.new_zeros(vt.shape[1])
                if window_size > 0:
                    j = slice(max(0, t - window_size + 1), t + 1)
                    o_swa = w[j] @ vt[j]
                a = g[t, h, 0] * o_cmp + g[t, h, 1] * o_slc + g[t, h, 2] * o_swa
                heads.append(a if us is None else us[t, h] * a)
            rows.append(torch.cat(heads))
    out = torch.stack(rows) if rows else v.new_zeros(0, v.shape[1], dtype=_F64)
    return out, block_idx
