"""Causal depthwise conv1d: a drop-in for Dao-AILab's `causal_conv1d` package.

Same names and arguments as `causal_conv1d.causal_conv1d_interface` and
`causal_conv1d.causal_conv1d_varlen`; runs on CPU and CUDA; traceable by torch.compile.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ._ops import ops

__all__ = [
    "causal_conv1d_fn",
    "causal_conv1d_update",
    "causal_conv1d_varlen_states",
    "causal_conv1d_ref",
    "causal_conv1d_update_ref",
    "CausalConv1d",
]


def _silu_flag(activation) -> bool:
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
    final_states_out: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
):
    """x: (batch, dim, seqlen), L- or D-contiguous; weight: (dim, width); bias: (dim,);
    seq_idx: (batch, seqlen) int32; initial_states: (batch, dim, width - 1);
    final_states_out: (batch, dim, width - 1), written when given.
    Returns out (batch, dim, seqlen), or (out, final_states) if return_final_states."""
    silu = _silu_flag(activation)
    out, final_states = ops.causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states,
                                              return_final_states, silu)
    if not return_final_states:
        return out
    if final_states_out is not None:
        if final_states_out.shape != final_states.shape:
            raise ValueError(f"final_states_out must have shape {tuple(final_states.shape)} "
                             f"(batch, dim, width - 1), got {tuple(final_states_out.shape)}")
        with torch.no_grad():
            final_states_out.copy_(final_states)
        return out, final_states_out
    return out, final_states


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """Decode step. x: (batch, dim) or (batch, dim, seqlen); conv_state (pool, dim, state_len),
    updated in place (a circular buffer when cache_seqlens (batch,) int32 is given);
    conv_state_indices (batch,) int32 picks pool rows, negative = padding (output 0)."""
    silu = _silu_flag(activation)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (batch, dim) or (batch, dim, seqlen), got shape {tuple(x.shape)}")
    unsqueeze = x.dim() == 2
    out = ops.causal_conv1d_update(x.unsqueeze(-1) if unsqueeze else x, conv_state, weight, bias,
                                   silu, cache_seqlens, conv_state_indices)
    return out.squeeze(-1) if unsqueeze else out


def causal_conv1d_varlen_states(x: torch.Tensor, cu_seqlens: torch.Tensor, state_len: int) -> torch.Tensor:
    """x: (total_tokens, dim); cu_seqlens: (batch + 1,) sorted offsets from 0.
    Returns (batch, dim, state_len): each sequence's last state_len inputs, zero-padded on the left."""
    return ops.causal_conv1d_varlen_states(x, cu_seqlens, state_len)


class CausalConv1d(torch.nn.Module):
    """Depthwise causal conv over (batch, dim, seqlen) with an optional decode step."""

    def __init__(self, dim, width=4, bias=True, activation="silu", device=None, dtype=None):
        super().__init__()
        self.activation = activation
        self.weight = torch.nn.Parameter(torch.empty(dim, width, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.empty(dim, device=device, dtype=dtype)) if bias else None
        bound = width ** -0.5
        torch.nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x, seq_idx=None, initial_states=None):
        return causal_conv1d_fn(x, self.weight, self.bias, seq_idx, initial_states,
                                activation=self.activation)

    def step(self, x, conv_state, cache_seqlens=None, conv_state_indices=None):
        return causal_conv1d_update(x, conv_state, self.weight, self.bias, self.activation,
                                    cache_seqlens, conv_state_indices)


# Pure-PyTorch versions with the original package's names and behaviour.

def causal_conv1d_ref(x, weight, bias=None, initial_states=None, return_final_states=False,
                      final_states_out=None, activation=None):
    silu = _silu_flag(activation)
    dtype_in = x.dtype
    x = x.to(weight.dtype)
    seqlen = x.shape[-1]
    dim, width = weight.shape
    if initial_states is None:
        out = F.conv1d(x, weight.unsqueeze(1), bias, padding=width - 1, groups=dim)
    else:
        x = torch.cat([initial_states.to(weight.dtype), x], dim=-1)
        out = F.conv1d(x, weight.unsqueeze(1), bias, padding=0, groups=dim)
    out = out[..., :seqlen]
    out = (F.silu(out) if silu else out).to(dtype_in)
    if not return_final_states:
        return out
    final_states = F.pad(x, (width - 1 - x.shape[-1], 0)).to(dtype_in)
    if final_states_out is not None:
        final_states_out.copy_(final_states)
        final_states = final_states_out
    return out, final_states


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
    silu = _silu_flag(activation)
    dtype_in = x.dtype
    unsqueeze = x.dim() == 2
    if unsqueeze:
        x = x.unsqueeze(-1)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    state_len = conv_state.shape[-1]
    if cache_seqlens is None:
        x_new = torch.cat([conv_state, x], dim=-1).to(weight.dtype)
        conv_state.copy_(x_new[:, :, -state_len:])
    else:
        width_idx = torch.arange(-(width - 1), 0, dtype=torch.long, device=x.device)[None] + cache_seqlens[:, None]
        width_idx = torch.remainder(width_idx, state_len)[:, None].expand(-1, dim, -1)
        x_new = torch.cat([conv_state.gather(2, width_idx), x], dim=-1).to(weight.dtype)
        copy_idx = torch.arange(seqlen, dtype=torch.long, device=x.device)[None] + cache_seqlens[:, None]
        copy_idx = torch.remainder(copy_idx, state_len)[:, None].expand(-1, dim, -1)
        conv_state.scatter_(2, copy_idx, x)
    out = F.conv1d(x_new, weight.unsqueeze(1), bias, padding=0, groups=dim)[:, :, -seqlen:]
    if unsqueeze:
        out = out.squeeze(-1)
    return (F.silu(out) if silu else out).to(dtype_in)
