"""Loads the compiled ops and registers their fake (meta) kernels and autograd formulas."""
import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.ssm_ext.*)

ops = torch.ops.ssm_ext


def has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("ssm_ext::causal_conv1d_fwd", "CUDA")


# ---------------------------------------------------------------- causal conv1d

def _conv_channel_last(x):
    # Mirrors is_channel_last in csrc/causal_conv1d/causal_conv1d.cpp.
    return x.stride(2) != 1 and x.stride(1) == 1


def _empty_in_layout(x, b, d, l, channel_last):
    if channel_last:
        return x.new_empty(b, l, d).transpose(1, 2)
    return x.new_empty(b, d, l)


@torch.library.register_fake("ssm_ext::causal_conv1d_fwd")
def _(x, weight, bias, seq_idx, initial_states, return_final_states, silu):
    b, d, l = x.shape
    cl = _conv_channel_last(x)
    out = _empty_in_layout(x, b, d, l, cl)
    final = _empty_in_layout(x, b, d, weight.shape[1] - 1, cl) if return_final_states else x.new_empty(0)
    return out, final


@torch.library.register_fake("ssm_ext::causal_conv1d_bwd")
def _(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu):
    b, d, l = x.shape
    cl = _conv_channel_last(x)
    dx = _empty_in_layout(x, b, d, l, cl)
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format)
    dbias = torch.empty_like(bias, memory_format=torch.contiguous_format) if bias is not None else weight.new_empty(0)
    dinit = _empty_in_layout(x, b, d, weight.shape[1] - 1, cl) if initial_states is not None else x.new_empty(0)
    return dx, dweight, dbias, dinit


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, return_final_states, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
    ctx.silu = silu
    ctx.return_final_states = return_final_states
    ctx.set_materialize_grads(False)


def _conv_backward(ctx, dout, dfinal):
    x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(x)
    if not ctx.return_final_states:
        dfinal = None
    dx, dweight, dbias, dinit = ops.causal_conv1d_bwd(
        x, weight, bias, seq_idx, initial_states, dout.to(x.dtype),
        None if dfinal is None else dfinal.to(x.dtype), ctx.silu)
    return (dx, dweight, dbias if bias is not None else None, None,
            dinit if initial_states is not None else None, None, None)


torch.library.register_autograd("ssm_ext::causal_conv1d_fwd", _conv_backward,
                                setup_context=_conv_setup_context)


@torch.library.register_fake("ssm_ext::causal_conv1d_update")
def _(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices):
    return x.new_empty(x.shape)


@torch.library.register_fake("ssm_ext::causal_conv1d_varlen_states")
def _(x, cu_seqlens, state_len):
    return x.new_empty(cu_seqlens.shape[0] - 1, state_len, x.shape[1]).transpose(1, 2)


# ---------------------------------------------------------------- first-order scan

# Mirrors kChunk in csrc/scan/scan.h: the forward keeps h at every SCAN_CHUNK-th step.
SCAN_CHUNK = 32


def _scan_state_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("ssm_ext::scan_fwd")
def _(x, a, b, c, initial_state, store_states, out_dtype):
    sd = _scan_state_dtype(x)
    y = torch.empty_like(x, dtype=out_dtype or x.dtype)
    final = x.new_empty(x.shape[0], x.shape[2], dtype=sd)
    states = torch.empty_like(x, dtype=sd) if store_states else x.new_empty(0, dtype=sd)
    n_chunks = (x.shape[1] + SCAN_CHUNK - 1) // SCAN_CHUNK
    if store_states:
        chunk_states = x.new_empty(0, dtype=sd)
    elif x.stride(1) == 1 and x.shape[1] > 1:  # laid out like x, as empty_chunk_states in csrc/scan/scan.cpp
        chunk_states = x.new_empty(x.shape[0], x.shape[2], n_chunks, dtype=sd).transpose(1, 2)
    else:
        chunk_states = x.new_empty(x.shape[0], n_chunks, x.shape[2], dtype=sd)
    return y, final, states, chunk_states


@torch.library.register_fake("ssm_ext::scan_bwd")
def _(x, a, b, c, initial_state, states, chunk_states, dy, dfinal_state):
    def like(t):
        return torch.empty_like(t) if t is not None else x.new_empty(0)
    dinit = initial_state.new_empty(initial_state.shape) if initial_state is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(a), like(b), like(c), dinit


def _scan_setup_context(ctx, inputs, output):
    x, a, b, c, initial_state, store_states, out_dtype = inputs
    _, _, states, chunk_states = output
    ctx.save_for_backward(x, a, b, c, initial_state, states if store_states else None,
                          None if store_states else chunk_states)
    ctx.mark_non_differentiable(states, chunk_states)
    ctx.set_materialize_grads(False)


def _scan_backward(ctx, dy, dfinal, _dstates, _dchunk_states):
    x, a, b, c, initial_state, states, chunk_states = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    if dfinal is not None:
        dfinal = dfinal.to(_scan_state_dtype(x))
    dx, da, db, dc, dinit = ops.scan_bwd(x, a, b, c, initial_state, states, chunk_states, dy, dfinal)
    return (dx, da, db if b is not None else None, dc if c is not None else None,
            dinit if initial_state is not None else None, None, None)


torch.library.register_autograd("ssm_ext::scan_fwd", _scan_backward, setup_context=_scan_setup_context)


# ---------------------------------------------------------------- ISSM scan

def _issm_chunk_states_numel(x, B, z):
    """Size of issm_fwd's chunk_states: on CUDA without z, the state entering each 64-step chunk
    (b, chunks, H, P, N) and the chunks' decay products (b, chunks, H, N); else empty."""
    b, L, h, p = x.shape
    if x.device.type != "cuda" or z is not None or p == 0:
        return 0
    return b * ((L + 63) // 64) * h * (p + 1) * B.shape[3]


@torch.library.register_fake("ssm_ext::issm_fwd")
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus,
      dt_limit_lo, dt_limit_hi, return_final_states):
    b, _, h, p = x.shape
    nseq = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    sd = _scan_state_dtype(x)
    final = x.new_empty(nseq, h, p, B.shape[3], dtype=sd) if return_final_states else x.new_empty(0, dtype=sd)
    return x.new_empty(x.shape), final, x.new_empty(_issm_chunk_states_numel(x, B, z), dtype=torch.float32)


@torch.library.register_fake("ssm_ext::issm_bwd")
def _(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus,
      dt_limit_lo, dt_limit_hi, dout, dfinal_states, chunk_states):
    def like(t):
        return t.new_empty(t.shape) if t is not None else x.new_empty(0)
    return (like(x), like(dt), like(A), like(B), like(C), like(D), like(z), like(dt_bias), like(initial_states))


def _issm_setup_context(ctx, inputs, output):
    (x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus,
     lo, hi, return_final_states) = inputs
    ctx.mark_non_differentiable(output[2])
    chunk_states = output[2] if output[2].numel() > 0 else None  # the CUDA forward's, to skip recomputing it
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_states)
    ctx.args = (chunk_size, dt_softplus, lo, hi)
    ctx.return_final_states = return_final_states
    ctx.set_materialize_grads(False)


def _issm_backward(ctx, dout, dfinal, _dchunk_states):
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, chunk_states = ctx.saved_tensors
    chunk_size, dt_softplus, lo, hi = ctx.args
    dout = torch.zeros_like(x) if dout is None else dout.to(x.dtype)
    if dfinal is not None and ctx.return_final_states:
        dfinal = dfinal.to(_scan_state_dtype(x))
    else:
        dfinal = None
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = ops.issm_bwd(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_softplus, lo, hi,
        dout, dfinal, chunk_states)
    return (dx, ddt, dA, dB, dC, None, dD if D is not None else None, dz if z is not None else None,
            ddt_bias if dt_bias is not None else None, dinit if initial_states is not None else None,
            None, None, None, None, None, None)


torch.library.register_autograd("ssm_ext::issm_fwd", _issm_backward, setup_context=_issm_setup_context)


# ---------------------------------------------------------------- gated RMSNorm

@torch.library.register_fake("ssm_ext::rmsnorm_gated_fwd")
def _(x, weight, bias, z, eps, group_size, norm_before_gate):
    rstd = x.new_empty(*x.shape[:-1], x.shape[-1] // group_size, dtype=_scan_state_dtype(x))
    return x.new_empty(x.shape), rstd


@torch.library.register_fake("ssm_ext::rmsnorm_gated_bwd")
def _(dout, x, weight, bias, z, rstd, group_size, norm_before_gate):
    def like(t):
        return t.new_empty(t.shape) if t is not None else x.new_empty(0)
    return like(x), like(weight), like(bias), like(z)


def _rmsnorm_setup_context(ctx, inputs, output):
    x, weight, bias, z, eps, group_size, norm_before_gate = inputs
    _, rstd = output
    ctx.save_for_backward(x, weight, bias, z, rstd)
    ctx.args = (group_size, norm_before_gate)
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)


def _rmsnorm_backward(ctx, dout, _drstd):
    x, weight, bias, z, rstd = ctx.saved_tensors
    group_size, norm_before_gate = ctx.args
    dout = torch.zeros_like(x) if dout is None else dout.to(x.dtype)
    dx, dweight, dbias, dz = ops.rmsnorm_gated_bwd(dout, x, weight, bias, z, rstd, group_size, norm_before_gate)
    return dx, dweight, dbias if bias is not None else None, dz if z is not None else None, None, None, None


torch.library.register_autograd("ssm_ext::rmsnorm_gated_fwd", _rmsnorm_backward,
                                setup_context=_rmsnorm_setup_context)


# ---------------------------------------------------------------- HSTU attention (dense, block-sparse)

def _hstu_out(q, v):
    return q.new_empty(q.shape[0], v.shape[1])


@torch.library.register_fake("ssm_ext::hstu_attn_fwd")
def _(q, k, v, x_offsets, n, num_heads, alpha, attn_mask):
    return _hstu_out(q, v)


@torch.library.register_fake("ssm_ext::hstu_attn_bwd")
def _(q, k, v, x_offsets, n, num_heads, alpha, attn_mask, dout):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _hstu_attn_setup_context(ctx, inputs, output):
    q, k, v, x_offsets, n, num_heads, alpha, attn_mask = inputs
    ctx.save_for_backward(q, k, v, x_offsets, attn_mask)
    ctx.args = (n, num_heads, alpha)


def _hstu_attn_backward(ctx, dout):
    q, k, v, x_offsets, attn_mask = ctx.saved_tensors
    n, num_heads, alpha = ctx.args
    dq, dk, dv = ops.hstu_attn_bwd(q, k, v, x_offsets, n, num_heads, alpha, attn_mask, dout.to(q.dtype))
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("ssm_ext::hstu_attn_fwd", _hstu_attn_backward,
                                setup_context=_hstu_attn_setup_context)


@torch.library.register_fake("ssm_ext::hstu_bsa_topk")
def _(q, k, x_offsets, n, num_heads, alpha, block_size, block_counts):
    return q.new_empty(q.shape[0], num_heads, block_counts, dtype=torch.int32)


@torch.library.register_fake("ssm_ext::hstu_bsa_fwd")
def _(q, k, v, u, gates, block_idx, x_offsets, n, num_heads, alpha, block_size, window_size, attn_mask):
    return _hstu_out(q, v)


@torch.library.register_fake("ssm_ext::hstu_bsa_bwd")
def _(q, k, v, u, gates, block_idx, x_offsets, n, num_heads, alpha, block_size, window_size, attn_mask, dout):
    du = v.new_empty(v.shape) if u is not None else v.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), du, gates.new_empty(gates.shape)


def _hstu_bsa_setup_context(ctx, inputs, output):
    q, k, v, u, gates, block_idx, x_offsets, n, num_heads, alpha, block_size, window_size, attn_mask = inputs
    ctx.save_for_backward(q, k, v, u, gates, block_idx, x_offsets, attn_mask)
    ctx.args = (n, num_heads, alpha, block_size, window_size)


def _hstu_bsa_backward(ctx, dout):
    q, k, v, u, gates, block_idx, x_offsets, attn_mask = ctx.saved_tensors
    n, num_heads, alpha, block_size, window_size = ctx.args
    dq, dk, dv, du, dgates = ops.hstu_bsa_bwd(q, k, v, u, gates, block_idx, x_offsets, n, num_heads, alpha,
                                              block_size, window_size, attn_mask, dout.to(q.dtype))
    # the selected block indices are constants for the gradient
    return (dq, dk, dv, du if u is not None else None, dgates, None, None, None, None, None, None, None, None)


torch.library.register_autograd("ssm_ext::hstu_bsa_fwd", _hstu_bsa_backward, setup_context=_hstu_bsa_setup_context)
