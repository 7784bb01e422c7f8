"""HSTU pointwise-SiLU attention on jagged sequences, dense and with NSA-style block-sparse
attention (SPEC.md section 6): a drop-in for the seed's `triton_hstu_attention_with_bsa`,
`TritonHSTUBSAAttention` and `GateModel` (import twin ssm_ext.compat.hstu_bsa), plus the dense
HSTU attention `hstu_attention`.

Jagged layout: q, k (T, H*attention_dim), v, u (T, H*linear_dim), sequence b on rows
x_offsets[b] .. x_offsets[b+1]-1. The attention is always causal and never padded; n =
invalid_attn_mask.size(-1) (>= the longest sequence) divides the weights, and only its size
is used. attn_mask (B or 1, n, n), optional, multiplies the weights (1 = attend).
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._ops import ops

__all__ = ["triton_hstu_attention_with_bsa", "hstu_attention", "triton_block_sparse_attn", "GateModel",
           "TritonHSTUBSAAttention", "jagged_to_padded", "padded_to_jagged"]


def _padded_rows(x_offsets, total, n):
    """Row b*n + (t - x_offsets[b]) of the (B*n)-row padded layout for each jagged row t."""
    x_offsets = x_offsets.to(torch.int64)
    t = torch.arange(total, device=x_offsets.device)
    # b = the last b with x_offsets[b] <= t (x_offsets[0] = 0, so b >= 0; empty sequences are
    # skipped). Searched in the whole x_offsets, not in the slice x_offsets[1:]: Inductor's Triton
    # searchsorted lowering before pytorch/pytorch#182344 ignores a boundary tensor's storage
    # offset and searched x_offsets[0:B], silently shifting every row one sequence on (the
    # compiled padded_q / padded_k came out wrong on CUDA while out and the gradients, which map
    # back through the same rows, stayed right).
    b = torch.searchsorted(x_offsets, t, right=True) - 1
    return b * n + t - x_offsets[b]


def jagged_to_padded(values, x_offsets, n, rows=None):
    """(T, ...) jagged -> (B, n, ...) zero-padded (differentiable), like fbgemm's
    jagged_to_padded_dense. Sequences must not be longer than n."""
    batch = x_offsets.shape[0] - 1
    rows = _padded_rows(x_offsets, values.shape[0], n) if rows is None else rows
    flat = values.new_zeros((batch * n,) + tuple(values.shape[1:])).index_put((rows,), values)
    return flat.view((batch, n) + tuple(values.shape[1:]))


def padded_to_jagged(padded, x_offsets, rows=None):
    """(B, n, ...) padded -> (T, ...) jagged: each sequence's first rows (differentiable)."""
    batch, n = padded.shape[:2]
    rows = _padded_rows(x_offsets, int(x_offsets[-1]), n) if rows is None else rows
    return padded.reshape((batch * n,) + tuple(padded.shape[2:]))[rows]


class GateModel(nn.Module):
    """Linear -> ReLU -> Linear(3) -> Sigmoid over the last dim. forward(x (..., in_features))
    returns (g_cmp, g_slc, g_swa), each x.shape[:-1], as the seed's model.GateModel does."""

    def __init__(self, in_features: int, hidden_dim: int = 64):
        super().__init__()
        self.mlp1 = nn.Linear(in_features=in_features, out_features=hidden_dim)
        self.atv1 = nn.ReLU()
        self.mlp2 = nn.Linear(in_features=hidden_dim, out_features=3)
        self.atv2 = nn.Sigmoid()

    def forward(self, x):
        return self.atv2(self.mlp2(self.atv1(self.mlp1(x)))).unbind(dim=-1)


def _check_widths(num_heads, attention_dim, linear_dim, q, v):
    if q.dim() != 2 or q.shape[1] != num_heads * attention_dim:
        raise ValueError(f"q must be (T, num_heads * attention_dim) = (T, {num_heads * attention_dim}), "
                         f"got {tuple(q.shape)}")
    if v.dim() != 2 or v.shape[1] != num_heads * linear_dim:
        raise ValueError(f"v must be (T, num_heads * linear_dim) = (T, {num_heads * linear_dim}), "
                         f"got {tuple(v.shape)}")


def _common(attention_dim, x_offsets, invalid_attn_mask, alpha, attn_mask):
    """x_offsets as int64, n, alpha (default 1/sqrt(attention_dim)) and attn_mask as a 3-D float
    tensor (a 2-D mask is shared by every sequence; a bool mask becomes 0/1)."""
    n = invalid_attn_mask.shape[-1]
    alpha = 1.0 / math.sqrt(attention_dim) if alpha is None else float(alpha)
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if not attn_mask.is_floating_point():
            attn_mask = attn_mask.to(torch.float32)
    return x_offsets.to(torch.int64), n, alpha, attn_mask


def _gates(gate_model, padded_q, x_offsets, rows, total, num_heads):
    """(T, H, 3) gate values: gate_model itself when it is a tensor, else gate_model(padded_q),
    either a (g_cmp, g_slc, g_swa) tuple of (B, n, H) or one (B, n, H, 3), taken back to the
    jagged rows."""
    if isinstance(gate_model, torch.Tensor):
        if tuple(gate_model.shape) != (total, num_heads, 3):
            raise ValueError(f"gate_model given as a tensor must have shape (T, num_heads, 3) = "
                             f"{(total, num_heads, 3)}, got {tuple(gate_model.shape)}")
        return gate_model
    g = gate_model(padded_q)
    if isinstance(g, (tuple, list)):
        g = torch.stack(tuple(g), dim=-1)
    if tuple(g.shape) != tuple(padded_q.shape[:3]) + (3,):
        raise ValueError(f"gate_model(padded_q) must give (B, n, H, 3) values or three (B, n, H) tensors, "
                         f"got shape {tuple(g.shape)}")
    return padded_to_jagged(g, x_offsets, rows)


def _hstu_bsa(num_heads, attention_dim, linear_dim, q, k, v, u, x_offsets, invalid_attn_mask, gate_model,
              block_counts, block_size, window_size, alpha, attn_mask):
    _check_widths(num_heads, attention_dim, linear_dim, q, v)
    x_offsets, n, alpha, attn_mask = _common(attention_dim, x_offsets, invalid_attn_mask, alpha, attn_mask)
    # the selection comes first: it also checks x_offsets against n before the padding uses them
    block_idx = ops.hstu_bsa_topk(q.detach(), k.detach(), x_offsets, n, num_heads, alpha, block_size,
                                  block_counts)
    total = q.shape[0]
    rows = _padded_rows(x_offsets, total, n)
    padded_q = jagged_to_padded(q, x_offsets, n, rows).view(-1, n, num_heads, attention_dim)
    padded_k = jagged_to_padded(k, x_offsets, n, rows).view(-1, n, num_heads, attention_dim)
    gates = _gates(gate_model, padded_q, x_offsets, rows, total, num_heads)
    out = ops.hstu_bsa_fwd(q, k, v, u, gates, block_idx, x_offsets, n, num_heads, alpha, block_size, window_size,
                           attn_mask)
    return out, padded_q, padded_k


def triton_hstu_attention_with_bsa(num_heads: int, attention_dim: int, linear_dim: int, q, k, v, u, x_offsets,
                                   invalid_attn_mask, gate_model, block_counts: int = 4, block_size: int = 32,
                                   window_size: int = 0, alpha: Optional[float] = None, attn_mask=None):
    """HSTU attention with block-sparse attention on jagged input (SPEC.md section 6).

    q, k: (T, num_heads * attention_dim); v, u: (T, num_heads * linear_dim); x_offsets (B+1).
    invalid_attn_mask: only its size n = invalid_attn_mask.size(-1) is used (>= longest sequence).
    gate_model: a module mapping padded_q (B, n, H, attention_dim) to gates in (0, 1), as three
    (B, n, H) tensors (GateModel) or one (B, n, H, 3); or the gate values as a (T, H, 3) tensor.
    alpha: logit scale, default 1/sqrt(attention_dim). attn_mask: optional (B or 1, n, n), 1 = attend.
    Returns (attn_output (T, num_heads * linear_dim), padded_q, padded_k (B, n, H, attention_dim)).
    Differentiable in q, k, v, u and the gates (so gate_model's parameters); the selected blocks
    are constants for the gradient."""
    return _hstu_bsa(num_heads, attention_dim, linear_dim, q, k, v, u, x_offsets, invalid_attn_mask, gate_model,
                     block_counts, block_size, window_size, alpha, attn_mask)


def hstu_attention(num_heads: int, attention_dim: int, linear_dim: int, q, k, v, x_offsets, invalid_attn_mask,
                   alpha: Optional[float] = None, attn_mask=None):
    """Dense causal HSTU attention, out(t) = sum_{j <= t} silu(alpha q_t.k_j) / n * mask(t, j) v_j,
    on jagged input (same arguments as triton_hstu_attention_with_bsa, no u, no sparsity).
    Returns (attn_output (T, num_heads * linear_dim), padded_q, padded_k)."""
    _check_widths(num_heads, attention_dim, linear_dim, q, v)
    x_offsets, n, alpha, attn_mask = _common(attention_dim, x_offsets, invalid_attn_mask, alpha, attn_mask)
    out = ops.hstu_attn_fwd(q, k, v, x_offsets, n, num_heads, alpha, attn_mask)
    rows = _padded_rows(x_offsets, q.shape[0], n)
    padded_q = jagged_to_padded(q, x_offsets, n, rows).view(-1, n, num_heads, attention_dim)
    padded_k = jagged_to_padded(k, x_offsets, n, rows).view(-1, n, num_heads, attention_dim)
    return out, padded_q, padded_k


def triton_block_sparse_attn(q, k, v, u, g_cmp, g_slc, g_swa, block_counts: int, block_size: int,
                             window_size: int = 0, scale: Optional[float] = None):
    """The seed's padded entry point: q, k (B, T, H, attention_dim), v, u (B, T, H, linear_dim),
    gates (B, T, H) (g_swa may be None: no window branch), every sequence T long (n = T).
    scale is the logit scale alpha (default 1/sqrt(attention_dim)).
    Returns (o (B, T, H, linear_dim) = u * attention, block_indices (B, H, T, block_counts))."""
    batch, length, heads, dqk = q.shape
    dv = v.shape[-1]
    x_offsets = torch.arange(batch + 1, device=q.device, dtype=torch.int64) * length
    alpha = 1.0 / math.sqrt(dqk) if scale is None else float(scale)
    if g_swa is None:
        g_swa = torch.zeros_like(g_cmp)
    gates = torch.stack([g_cmp, g_slc, g_swa], dim=-1).reshape(batch * length, heads, 3)
    qf, kf = q.reshape(batch * length, heads * dqk), k.reshape(batch * length, heads * dqk)
    block_idx = ops.hstu_bsa_topk(qf.detach(), kf.detach(), x_offsets, length, heads, alpha, block_size,
                                  block_counts)
    out = ops.hstu_bsa_fwd(qf, kf, v.reshape(batch * length, heads * dv), u.reshape(batch * length, heads * dv),
                           gates, block_idx, x_offsets, length, heads, alpha, block_size, window_size, None)
    return out.view(batch, length, heads, dv), block_idx.view(batch, length, heads, -1).permute(0, 2, 1, 3)


class TritonHSTUBSAAttention(nn.Module):
    """The HSTU layer with block-sparse attention (SPEC.md section 6), on jagged x (T, embedding_dim):
    normed = layer_norm(x); u, v, q, k = split(silu(normed @ uvqk + uvqk_bias));
    a = block-sparse attention (without u); out = x + o(dropout(u * layer_norm(a)))."""

    def __init__(self, embedding_dim: int, linear_hidden_dim: int, attention_dim: int, num_heads: int,
                 block_counts: int = 4, block_size: int = 32, window_size: int = 0, dropout_ratio: float = 0.0,
                 epsilon: float = 1e-6):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.linear_hidden_dim = linear_hidden_dim
        self.attention_dim = attention_dim
        self.num_heads = num_heads
        self.block_counts = block_counts
        self.block_size = block_size
        self.window_size = window_size
        self.dropout_ratio = dropout_ratio
        self.epsilon = epsilon
        width = 2 * num_heads * (linear_hidden_dim + attention_dim)
        self.uvqk = nn.Parameter(torch.empty(embedding_dim, width).normal_(mean=0, std=0.02))
        self.uvqk_bias = nn.Parameter(torch.zeros(width))
        self.o = nn.Linear(linear_hidden_dim * num_heads, embedding_dim)
        nn.init.xavier_uniform_(self.o.weight)
        self.norm_weight = nn.Parameter(torch.ones(embedding_dim))
        self.norm_bias = nn.Parameter(torch.zeros(embedding_dim))

    def forward(self, x, x_offsets, invalid_attn_mask, gate_model, attn_mask=None):
        """x (T, embedding_dim) jagged. Returns (out (T, embedding_dim), padded_q, padded_k)."""
        dl, da, h = self.linear_hidden_dim, self.attention_dim, self.num_heads
        normed = F.layer_norm(x, [self.embedding_dim], self.norm_weight, self.norm_bias, eps=self.epsilon)
        uvqk = F.silu(normed @ self.uvqk + self.uvqk_bias)
        u, v, q, k = torch.split(uvqk, [dl * h, dl * h, da * h, da * h], dim=1)
        a, padded_q, padded_k = _hstu_bsa(h, da, dl, q, k, v, None, x_offsets, invalid_attn_mask, gate_model,
                                          self.block_counts, self.block_size, self.window_size, None, attn_mask)
        a = F.layer_norm(a, [dl * h], eps=self.epsilon)
        out = x + self.o(F.dropout(u * a, p=self.dropout_ratio, training=self.training))
        return out, padded_q, padded_k
