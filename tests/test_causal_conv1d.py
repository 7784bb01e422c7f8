"""Tests of the causal depthwise conv1d family (SPEC.md section 1, API_causal_conv1d.txt).

Ground truth is ssm_ext.reference.causal_conv1d (float64 loops). Every test runs on the CPU
and, when a GPU is present, on CUDA (the `cuda`-marked parametrisation of `device`).
"""

import copy
import os

import pytest
import torch

import ssm_ext  # noqa: F401  (registers torch.ops.ssm_ext.*)
from ssm_ext.causal_conv1d import (
    causal_conv1d_fn,
    causal_conv1d_update,
    causal_conv1d_varlen_states,
)
from ssm_ext.reference import causal_conv1d as ref

from helpers import assert_rel, make_seq_idx, make_x, schema_args, tol_for

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
ERRORS = (RuntimeError, ValueError, NotImplementedError)
COMPILE_BACKEND = os.environ.get("SSM_EXT_COMPILE_BACKEND", "inductor")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def _make_init(b, D, W, dtype, device, channel_last):
    if channel_last:
        return torch.randn(b, W - 1, D, dtype=dtype, device=device).transpose(1, 2)
    return torch.randn(b, D, W - 1, dtype=dtype, device=device)


def _empty_states(b, D, W, dtype, device, channel_last):
    if channel_last:
        return torch.empty(b, W - 1, D, dtype=dtype, device=device).transpose(1, 2)
    return torch.empty(b, D, W - 1, dtype=dtype, device=device)


def _cpu(t):
    return None if t is None else t.detach().cpu()


def _exact(out, ref64, what):
    """States are copies of inputs (or 0): they must match the reference exactly."""
    got = out.detach().cpu().to(F64)
    assert got.shape == ref64.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    bad = (got != ref64).sum().item()
    assert bad == 0, f"{what}: {bad} entries differ from the reference (max |diff| {(got - ref64).abs().max().item():.3e})"


def _check_fwd(x, w, bias, seq, init, act, final_mode, check_layout=True, fso=None):
    """Run causal_conv1d_fn with the given options and compare everything with the reference."""
    b, D, L = x.shape
    W = w.shape[1]
    kwargs = dict(bias=bias, seq_idx=seq, initial_states=init, activation=act)
    if final_mode == "none":
        out = causal_conv1d_fn(x, w, **kwargs)
        fs = None
    elif final_mode == "return":
        res = causal_conv1d_fn(x, w, return_final_states=True, **kwargs)
        assert isinstance(res, (tuple, list)) and len(res) == 2
        out, fs = res
    else:
        assert final_mode == "out"
        if fso is None:
            fso = _empty_states(b, D, W, x.dtype, x.device, x.stride(1) == 1 and x.stride(2) != 1)
        fso.fill_(float("nan"))
        out, fs = causal_conv1d_fn(x, w, return_final_states=True, final_states_out=fso, **kwargs)

    ref_out, ref_fs = ref.causal_conv1d(_cpu(x), _cpu(w), _cpu(bias), _cpu(seq), _cpu(init), act)

    assert out.shape == (b, D, L) and out.dtype == x.dtype and out.device == x.device
    if check_layout and L > 1 and D > 1:
        if x.stride(1) == 1 and x.stride(2) != 1:
            assert out.stride(1) == 1, f"channel-last x gave out strides {out.stride()}"
        elif x.is_contiguous():
            assert out.is_contiguous(), f"contiguous x gave out strides {out.stride()}"
    assert_rel(out, ref_out, tol_for(x.dtype), "out")
    if fs is not None:
        assert fs.shape == (b, D, W - 1) and fs.dtype == x.dtype and fs.device == x.device
        _exact(fs, ref_fs, "final_states")
    if final_mode == "out":
        _exact(fso, ref_fs, "final_states_out (written in place)")
    return out, fs


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("final_mode", ["none", "return", "out"])
@pytest.mark.parametrize("init_on", [False, True], ids=["noinit", "init"])
@pytest.mark.parametrize("seq_on", [False, True], ids=["noseq", "seq"])
@pytest.mark.parametrize("act", [None, "silu", "swish"])
@pytest.mark.parametrize("bias_on", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("channel_last", [False, True], ids=["contig", "chlast"])
def test_fwd_options(device, channel_last, bias_on, act, seq_on, init_on, final_mode):
    b, D, L, W = 2, 37, 29, 4
    x = make_x(b, D, L, F32, device, channel_last)
    w = torch.randn(D, W, device=device)
    bias = torch.randn(D, device=device) if bias_on else None
    seq = make_seq_idx(b, L, device) if seq_on else None
    init = _make_init(b, D, W, F32, device, channel_last) if init_on else None
    _check_fwd(x, w, bias, seq, init, act, final_mode)


DTYPE_PAIRS = [(F32, F32), (F16, F16), (F16, F32), (BF16, BF16), (BF16, F32)]


@pytest.mark.parametrize("all_on", [False, True], ids=["plain", "allopts"])
@pytest.mark.parametrize("channel_last", [False, True], ids=["contig", "chlast"])
@pytest.mark.parametrize("xdtype,wdtype", DTYPE_PAIRS, ids=[f"x{str(a)[6:]}-w{str(b)[6:]}" for a, b in DTYPE_PAIRS])
@pytest.mark.parametrize("W", [2, 3, 4, 5])
def test_fwd_dtypes_widths(device, W, xdtype, wdtype, channel_last, all_on):
    b, D, L = 2, 24, 45
    x = make_x(b, D, L, xdtype, device, channel_last)
    w = torch.randn(D, W, dtype=wdtype, device=device)
    if all_on:
        bias = torch.randn(D, dtype=wdtype, device=device)
        seq = make_seq_idx(b, L, device)
        init = _make_init(b, D, W, xdtype, device, channel_last)
        _check_fwd(x, w, bias, seq, init, "silu", "return")
    else:
        _check_fwd(x, w, None, None, None, None, "none")


SIZES = [  # (b, D, L, W)
    (1, 8, 1, 4),     # L = 1
    (2, 37, 1, 2),    # L = 1, D odd
    (2, 16, 3, 4),    # L = 3 = W - 1
    (2, 37, 3, 5),    # L < W - 1
    (3, 5, 2, 4),     # L < W - 1, tiny D
    (1, 1, 9, 3),     # D = 1
    (3, 37, 50, 3),   # L, D not multiples of 8
    (2, 64, 131, 4),  # longer
    (2, 9, 17, 7),    # larger width
]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("all_on", [False, True], ids=["plain", "allopts"])
@pytest.mark.parametrize("channel_last", [False, True], ids=["contig", "chlast"])
@pytest.mark.parametrize("b,D,L,W", SIZES)
def test_fwd_sizes(device, b, D, L, W, channel_last, all_on, dtype):
    x = make_x(b, D, L, dtype, device, channel_last)
    w = torch.randn(D, W, device=device)
    if all_on:
        bias = torch.randn(D, device=device)
        seq = make_seq_idx(b, L, device)
        init = _make_init(b, D, W, dtype, device, channel_last)
        _check_fwd(x, w, bias, seq, init, "silu", "out")
    else:
        _check_fwd(x, w, None, None, None, None, "return")


def _noncontig_x(kind, b, D, L, device):
    if kind == "l_stride2":  # x[..., ::2]
        return torch.randn(b, D, 2 * L, device=device)[..., ::2]
    if kind == "narrow_channels":  # contiguous rows, channel range narrowed
        return torch.randn(b, D + 7, L, device=device)[:, 3:3 + D]
    if kind == "narrow_channels_chlast":  # channel-last with a narrowed channel range
        return torch.randn(b, L, D + 7, device=device)[:, :, 2:2 + D].transpose(1, 2)
    if kind == "narrow_time":  # time range narrowed out of a longer buffer
        return torch.randn(b, D, L + 9, device=device)[:, :, 4:4 + L]
    if kind == "batch_stride2":
        return torch.randn(2 * b, D, L, device=device)[::2]
    if kind == "batch_minor":  # (D, b, L) memory order
        return torch.randn(D, b, L, device=device).transpose(0, 1)
    if kind == "d_stride2_chlast":  # neither stride is 1
        return torch.randn(b, L, 2 * D, device=device)[:, :, ::2].transpose(1, 2)
    raise AssertionError(kind)


@pytest.mark.parametrize("all_on", [False, True], ids=["plain", "allopts"])
@pytest.mark.parametrize("kind", ["l_stride2", "narrow_channels", "narrow_channels_chlast", "narrow_time",
                                  "batch_stride2", "batch_minor", "d_stride2_chlast"])
def test_fwd_noncontiguous(device, kind, all_on):
    b, D, L, W = 2, 37, 21, 4
    x = _noncontig_x(kind, b, D, L, device)
    assert x.shape == (b, D, L) and not x.is_contiguous()
    x_before = x.clone()
    w = torch.randn(D, W, device=device)
    if all_on:
        bias = torch.randn(D, device=device)
        seq = make_seq_idx(b, L, device)
        init = torch.randn(b, D, W - 1, device=device)
        _check_fwd(x, w, bias, seq, init, "silu", "return", check_layout=False)
    else:
        _check_fwd(x, w, None, None, None, None, "none", check_layout=False)
    assert torch.equal(x, x_before), "x was modified"


def test_fwd_noncontiguous_weight_bias_states(device):
    """weight given as a transposed (W, D) buffer, bias / seq_idx / initial_states as strided views."""
    b, D, L, W = 2, 19, 13, 4
    x = make_x(b, D, L, F32, device, False)
    w = torch.randn(W, D, device=device).t()
    bias = torch.randn(2 * D, device=device)[::2]
    seq = make_seq_idx(b, 2 * L, device)[:, ::2]
    init = torch.randn(b, D, 2 * (W - 1), device=device)[..., ::2]
    _check_fwd(x, w, bias, seq, init, "silu", "return")


@pytest.mark.parametrize("x_chlast", [False, True], ids=["x_contig", "x_chlast"])
def test_fwd_mixed_state_layouts(device, x_chlast):
    """initial_states / final_states_out in the other layout than x."""
    b, D, L, W = 2, 24, 15, 4
    x = make_x(b, D, L, F32, device, x_chlast)
    w = torch.randn(D, W, device=device)
    init = _make_init(b, D, W, F32, device, not x_chlast)
    fso = _empty_states(b, D, W, F32, device, not x_chlast)
    _check_fwd(x, w, torch.randn(D, device=device), make_seq_idx(b, L, device), init, "silu", "out", fso=fso)


def test_fwd_bias_dtype_independent(device):
    """bias may be any float dtype (here bf16 bias with fp32 x and fp16 weight)."""
    b, D, L, W = 2, 16, 11, 3
    x = make_x(b, D, L, F32, device, False)
    w = torch.randn(D, W, dtype=F16, device=device)
    bias = torch.randn(D, dtype=BF16, device=device)
    _check_fwd(x, w, bias, None, None, None, "return")


def test_fwd_float64_cpu():
    b, D, L, W = 2, 7, 12, 4
    x = make_x(b, D, L, F64, "cpu", False)
    w = torch.randn(D, W, dtype=F64)
    _check_fwd(x, w, torch.randn(D, dtype=F64), make_seq_idx(b, L), torch.randn(b, D, W - 1, dtype=F64),
               "silu", "return")


def test_seq_idx_isolates_sequences(device):
    """Changing the inputs of one sequence leaves the outputs of the other sequences unchanged."""
    b, D, L, W = 1, 8, 20, 4
    x = make_x(b, D, L, F32, device, False)
    w = torch.randn(D, W, device=device)
    seq = torch.tensor([[0] * 7 + [1] * 6 + [2] * 7], dtype=torch.int32, device=device)
    out1 = causal_conv1d_fn(x, w, seq_idx=seq)
    x2 = x.clone()
    x2[:, :, 7:13] += 10.0
    out2 = causal_conv1d_fn(x2, w, seq_idx=seq)
    assert torch.equal(out1[..., :7], out2[..., :7])
    assert torch.equal(out1[..., 13:], out2[..., 13:])
    assert not torch.equal(out1[..., 7:13], out2[..., 7:13])


SEQ_PATTERNS = [[0, 0, 1, 1, 1], [0, 1], [1, 1], [-1, -1, 0, 0, -1], [0, 0, 0, -1, -1], [-1, 0, -1],
                [-1, -1], [0, -1, 1, 1, -1, 2], [3, 3, 3, 3, 3, 3, 3]]


@pytest.mark.parametrize("channel_last", [False, True], ids=["contig", "chlast"])
@pytest.mark.parametrize("W", [3, 4, 5])
@pytest.mark.parametrize("pattern", SEQ_PATTERNS, ids=lambda p: "_".join(map(str, p)))
def test_seq_idx_patterns_with_states(device, pattern, W, channel_last):
    """Hand-written seq_idx patterns (initial states joining the first sequence, padding at the start /
    end, sequences shorter than W - 1) with initial_states and final states."""
    b, D, L = 2, 5, len(pattern)
    x = make_x(b, D, L, F32, device, channel_last)
    seq = torch.tensor([pattern, list(reversed(pattern))], dtype=torch.int32, device=device)
    init = _make_init(b, D, W, F32, device, channel_last)
    _check_fwd(x, torch.randn(D, W, device=device), torch.randn(D, device=device), seq, init, "silu", "return")


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------

def _check_grads(device, b, D, L, W, xdtype, wdtype, channel_last, bias_on, act, seq_on, init_on, final_grad):
    x = make_x(b, D, L, xdtype, device, channel_last).requires_grad_()
    w = torch.randn(D, W, dtype=wdtype, device=device).requires_grad_()
    bias = torch.randn(D, dtype=wdtype, device=device).requires_grad_() if bias_on else None
    seq = make_seq_idx(b, L, device) if seq_on else None
    init = _make_init(b, D, W, xdtype, device, channel_last).requires_grad_() if init_on else None

    if final_grad:
        out, fs = causal_conv1d_fn(x, w, bias, seq, init, return_final_states=True, activation=act)
        dout, dfs = torch.randn_like(out), torch.randn_like(fs)
        torch.autograd.backward([out, fs], [dout, dfs])
    else:
        out = causal_conv1d_fn(x, w, bias, seq, init, activation=act)
        dout, dfs = torch.randn_like(out), None
        out.backward(dout)

    def leaf(t):
        return None if t is None else t.detach().cpu().to(F64).requires_grad_()

    x64, w64, b64, i64 = leaf(x), leaf(w), leaf(bias), leaf(init)
    ro, rfs = ref.causal_conv1d(x64, w64, b64, _cpu(seq), i64, act)
    if final_grad:
        torch.autograd.backward([ro, rfs], [_cpu(dout).to(F64), _cpu(dfs).to(F64)])
    else:
        ro.backward(_cpu(dout).to(F64))

    low = xdtype != F32 or wdtype != F32
    tol_x = 2e-2 if low else 1e-5
    tol_w = 2e-2 if low else 1e-4
    pairs = [("dx", x, x64, tol_x), ("dweight", w, w64, tol_w)]
    if bias_on:
        pairs.append(("dbias", bias, b64, tol_w))
    if init_on:
        pairs.append(("dinitial_states", init, i64, tol_x))
    for name, t, t64, tol in pairs:
        assert t.grad is not None, f"{name} is None"
        assert t.grad.shape == t.shape and t.grad.dtype == t.dtype, f"{name}: {t.grad.shape} {t.grad.dtype}"
        assert_rel(t.grad, t64.grad, tol, name)


@pytest.mark.parametrize("final_grad", [False, True], ids=["nofinal", "dfinal"])
@pytest.mark.parametrize("init_on", [False, True], ids=["noinit", "init"])
@pytest.mark.parametrize("seq_on", [False, True], ids=["noseq", "seq"])
@pytest.mark.parametrize("act", [None, "silu"])
@pytest.mark.parametrize("bias_on", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("channel_last", [False, True], ids=["contig", "chlast"])
def test_bwd_options(device, channel_last, bias_on, act, seq_on, init_on, final_grad):
    _check_grads(device, 2, 19, 23, 4, F32, F32, channel_last, bias_on, act, seq_on, init_on, final_grad)


@pytest.mark.parametrize("channel_last", [False, True], ids=["contig", "chlast"])
@pytest.mark.parametrize("xdtype,wdtype", [(F32, F32), (BF16, BF16), (BF16, F32), (F16, F16)],
                         ids=["f32", "bf16", "bf16-wf32", "f16"])
@pytest.mark.parametrize("W", [2, 3, 5])
def test_bwd_dtypes_widths(device, W, xdtype, wdtype, channel_last):
    _check_grads(device, 2, 21, 33, W, xdtype, wdtype, channel_last, True, "silu", True, True, True)


@pytest.mark.parametrize("all_options", [False, True], ids=["plain", "seq-init-dfinal"])
@pytest.mark.parametrize("xdtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("channel_last", [False, True], ids=["contig", "chlast"])
def test_bwd_vectorised_paths(device, channel_last, W, xdtype, all_options):
    """Sizes that take the 16-byte vector kernels (D and L multiples of 8) and cross their tile
    edges: channel-last 256-channel tiles (the second one partial) and 32-step tiles within
    256-step ranges (L = 300 ends inside the second); channel-first 1024-step chunks."""
    D, L = (264, 300) if channel_last else (8, 1032)
    _check_grads(device, 2, D, L, W, xdtype, xdtype, channel_last, True, "silu", all_options, all_options,
                 all_options)


@pytest.mark.parametrize("b,D,L,W", [(2, 8, 1, 4), (2, 5, 2, 4), (1, 37, 3, 5), (2, 16, 70, 3)])
@pytest.mark.parametrize("channel_last", [False, True], ids=["contig", "chlast"])
def test_bwd_sizes(device, b, D, L, W, channel_last):
    _check_grads(device, b, D, L, W, F32, F32, channel_last, True, "silu", True, True, True)


def test_bwd_noncontiguous(device):
    b, D, L, W = 2, 13, 17, 4
    base = torch.randn(b, D, 2 * L, device=device, requires_grad=True)
    x = base[..., ::2]
    w = torch.randn(D, W, device=device, requires_grad=True)
    out = causal_conv1d_fn(x, w, activation="silu")
    dout = torch.randn_like(out)
    out.backward(dout)
    x64 = x.detach().cpu().to(F64).requires_grad_()
    w64 = w.detach().cpu().to(F64).requires_grad_()
    ref.causal_conv1d(x64, w64, activation="silu")[0].backward(dout.cpu().to(F64))
    assert_rel(base.grad[..., ::2], x64.grad, 1e-5, "dx")
    assert base.grad[..., 1::2].abs().max().item() == 0.0
    assert_rel(w.grad, w64.grad, 1e-4, "dweight")


@pytest.mark.parametrize("channel_last", [False, True], ids=["contig", "chlast"])
@pytest.mark.parametrize("W", [3, 4])
def test_gradcheck_float64_cpu(W, channel_last):
    b, D, L = 2, 3, 7
    x = make_x(b, D, L, F64, "cpu", channel_last).requires_grad_()
    w = torch.randn(D, W, dtype=F64, requires_grad=True)
    bias = torch.randn(D, dtype=F64, requires_grad=True)
    init = torch.randn(b, D, W - 1, dtype=F64, requires_grad=True)
    seq = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [0, 0, 0, 0, 0, 1, 1]], dtype=torch.int32)

    def f(x, w, bias, init):
        out, fs = causal_conv1d_fn(x, w, bias, seq, init, return_final_states=True, activation="silu")
        return out, fs

    assert torch.autograd.gradcheck(f, (x, w, bias, init))

    def g(x, w, init):  # no bias, no seq_idx
        return causal_conv1d_fn(x, w, None, None, init, return_final_states=True)

    assert torch.autograd.gradcheck(g, (x, w, init))


# --------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------

FWD_COMBOS = [  # (bias, seq, init, silu, channel_last, return_final_states)
    (False, False, False, False, False, False),
    (True, False, False, True, False, True),
    (True, True, True, True, False, True),
    (False, True, True, False, True, True),
    (True, True, False, True, True, False),
]


@pytest.mark.parametrize("bias_on,seq_on,init_on,silu,channel_last,ret_final", FWD_COMBOS)
def test_opcheck_fwd(device, bias_on, seq_on, init_on, silu, channel_last, ret_final):
    b, D, L, W = 2, 6, 9, 4
    x = make_x(b, D, L, F32, device, channel_last).requires_grad_()
    w = torch.randn(D, W, device=device, requires_grad=True)
    bias = torch.randn(D, device=device, requires_grad=True) if bias_on else None
    seq = make_seq_idx(b, L, device) if seq_on else None
    init = _make_init(b, D, W, F32, device, channel_last).requires_grad_() if init_on else None
    op = torch.ops.ssm_ext.causal_conv1d_fwd.default
    args = schema_args(op, dict(x=x, weight=w, bias=bias, seq_idx=seq, initial_states=init,
                                 return_final_states=ret_final, silu=silu))
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("bias_on,seq_on,init_on,silu,channel_last,ret_final", FWD_COMBOS)
def test_opcheck_bwd(device, bias_on, seq_on, init_on, silu, channel_last, ret_final):
    b, D, L, W = 2, 6, 9, 4
    x = make_x(b, D, L, F32, device, channel_last)
    w = torch.randn(D, W, device=device)
    bias = torch.randn(D, device=device) if bias_on else None
    seq = make_seq_idx(b, L, device) if seq_on else None
    init = _make_init(b, D, W, F32, device, channel_last) if init_on else None
    dout = torch.randn_like(x)
    dfs = _make_init(b, D, W, F32, device, channel_last) if ret_final else None
    op = torch.ops.ssm_ext.causal_conv1d_bwd.default
    args = schema_args(op, dict(x=x, weight=w, bias=bias, seq_idx=seq, initial_states=init, dout=dout,
                                 dfinal_states=dfs, silu=silu))
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("bias_on,silu,circular,indices,l", [
    (False, False, False, False, 1),
    (True, True, False, False, 3),
    (True, False, True, False, 2),
    (False, True, True, True, 1),
    (True, True, False, True, 2),
])
def test_opcheck_update(device, bias_on, silu, circular, indices, l):
    b, D, W, S = 3, 6, 4, 5
    x = torch.randn(b, D, l, device=device)
    pool = 5 if indices else b
    conv_state = torch.randn(pool, D, S, device=device)
    w = torch.randn(D, W, device=device)
    bias = torch.randn(D, device=device) if bias_on else None
    cs = torch.tensor([0, 4, 11], dtype=torch.int32, device=device) if circular else None
    idx = torch.tensor([4, -1, 1], dtype=torch.int32, device=device) if indices else None
    op = torch.ops.ssm_ext.causal_conv1d_update.default
    args = schema_args(op, dict(x=x, conv_state=conv_state, weight=w, bias=bias, silu=silu,
                                 cache_seqlens=cs, conv_state_indices=idx))
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
def test_opcheck_varlen_states(device, cu_dtype):
    x = torch.randn(12, 6, device=device)
    cu = torch.tensor([0, 2, 2, 9, 12], dtype=cu_dtype, device=device)
    op = torch.ops.ssm_ext.causal_conv1d_varlen_states.default
    torch.library.opcheck(op, schema_args(op, dict(x=x, cu_seqlens=cu, state_len=4)))


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------

class _ConvBlock(torch.nn.Module):
    def __init__(self, D, W, pool, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(D, W, device=device))
        self.bias = torch.nn.Parameter(torch.randn(D, device=device))
        self.register_buffer("conv_state", torch.randn(pool, D, W - 1, device=device))

    def forward(self, x, xt):
        y = causal_conv1d_fn(x, self.weight, self.bias, activation="silu")
        z = causal_conv1d_update(xt, self.conv_state, self.weight, self.bias, activation="silu")
        return y, z


def test_compile_module(device):
    torch._dynamo.reset()
    b, D, L, W = 2, 16, 11, 4
    eager = _ConvBlock(D, W, b, device)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    with torch.no_grad():
        for step in range(2):
            x = make_x(b, D, L, F32, device, step == 1)
            xt = torch.randn(b, D, device=device)
            y_e, z_e = eager(x, xt)
            y_c, z_c = compiled(x, xt)
            assert_rel(y_c, y_e, 1e-6, f"compiled fn output (step {step})")
            assert_rel(z_c, z_e, 1e-6, f"compiled update output (step {step})")
            assert torch.equal(model.conv_state, eager.conv_state), "compiled conv_state differs from eager"
    # and the eager path itself matches the reference update
    x0 = torch.randn(b, D, device=device)
    st = eager.conv_state.clone()
    with torch.no_grad():
        z = causal_conv1d_update(x0, eager.conv_state, eager.weight, eager.bias, activation="silu")
    rz, rst = ref.causal_conv1d_update(_cpu(x0), _cpu(st), _cpu(eager.weight), _cpu(eager.bias), "silu")
    assert_rel(z, rz, 1e-5, "update out")
    _exact(eager.conv_state, rst, "conv_state")


def test_compile_training_step(device):
    torch._dynamo.reset()
    b, D, L, W = 2, 12, 17, 4

    def loss_fn(x, w, bias, init, seq, g, gf):
        out, fs = causal_conv1d_fn(x, w, bias, seq, init, return_final_states=True, activation="silu")
        return (out * g).sum() + (fs * gf).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=COMPILE_BACKEND)
    x0 = make_x(b, D, L, F32, device, False)
    w0 = torch.randn(D, W, device=device)
    b0 = torch.randn(D, device=device)
    i0 = torch.randn(b, D, W - 1, device=device)
    seq = make_seq_idx(b, L, device)
    g = torch.randn(b, D, L, device=device)
    gf = torch.randn(b, D, W - 1, device=device)

    results = []
    for fn in (loss_fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (x0, w0, b0, i0)]
        loss = fn(*leaves, seq, g, gf)
        loss.backward()
        results.append((loss.detach(), [t.grad for t in leaves]))
    (le, ge), (lc, gc) = results
    assert_rel(lc, le, 1e-5, "loss")
    for name, a, c in zip(["dx", "dweight", "dbias", "dinitial_states"], ge, gc):
        assert c is not None, name
        assert_rel(c, a, 1e-5, name)
    # the eager gradients are right too
    x64, w64, b64, i64 = (t.cpu().to(F64).requires_grad_() for t in (x0, w0, b0, i0))
    ro, rfs = ref.causal_conv1d(x64, w64, b64, seq.cpu(), i64, "silu")
    ((ro * g.cpu().to(F64)).sum() + (rfs * gf.cpu().to(F64)).sum()).backward()
    for name, a, r, tol in zip(["dx", "dweight", "dbias", "dinitial_states"], ge, (x64, w64, b64, i64),
                               (1e-5, 1e-4, 1e-4, 1e-5)):
        assert_rel(a, r.grad, tol, name)


# --------------------------------------------------------------------------------------
# update
# --------------------------------------------------------------------------------------

UPDATE_MODES = [  # (x_shape_l, extra_state, circular, indices, bias, act)
    (None, 0, False, False, False, None),   # x (b, D), S = W - 1
    (None, 3, False, False, True, "silu"),  # x (b, D), S > W - 1
    (1, 0, False, False, True, None),       # x (b, D, 1)
    (3, 2, False, False, True, "silu"),     # l = 3
    (7, 0, False, False, False, "swish"),   # l > S when W <= 5
    (None, 3, True, False, True, "silu"),   # circular
    (4, 1, True, False, False, None),       # circular, several tokens
    (9, 0, True, False, True, "silu"),      # circular, l > S (sequential wrap-around writes)
    (None, 2, False, True, True, "silu"),   # pool + indices (with a negative one)
    (2, 3, True, True, True, None),         # pool + indices + circular
]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("l,extra,circular,indices,bias_on,act", UPDATE_MODES)
@pytest.mark.parametrize("W", [2, 3, 4, 5])
def test_update(device, W, l, extra, circular, indices, bias_on, act, dtype):
    b, D = 3, 37
    S = W - 1 + extra
    x = torch.randn(b, D, dtype=dtype, device=device) if l is None else \
        torch.randn(b, D, l, dtype=dtype, device=device)
    w = torch.randn(D, W, device=device)
    bias = torch.randn(D, device=device) if bias_on else None
    pool = 6 if indices else b
    conv_state = torch.randn(pool, D, S, dtype=dtype, device=device)
    # values larger than S as well as small ones
    cs = torch.tensor([0, S + 2, 3 * S + 1], dtype=torch.int32, device=device) if circular else None
    idx = torch.tensor([5, -1, 2], dtype=torch.int32, device=device) if indices else None
    state0 = conv_state.clone()

    out = causal_conv1d_update(x, conv_state, w, bias, activation=act, cache_seqlens=cs, conv_state_indices=idx)
    ref_out, ref_state = ref.causal_conv1d_update(_cpu(x), _cpu(state0), _cpu(w), _cpu(bias), act,
                                                  _cpu(cs), _cpu(idx))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert_rel(out, ref_out, tol_for(dtype), "update out")
    if indices:
        assert out[1].abs().max().item() == 0.0, "negative conv_state_indices must give 0 output"
    _exact(conv_state, ref_state, "conv_state (whole pool)")


def test_update_channel_last_x(device):
    b, D, W, l = 2, 24, 4, 3
    x = torch.randn(b, l, D, device=device).transpose(1, 2)
    w = torch.randn(D, W, device=device)
    conv_state = torch.randn(b, D, W + 1, device=device)
    state0 = conv_state.clone()
    out = causal_conv1d_update(x, conv_state, w, None, activation="silu")
    ro, rs = ref.causal_conv1d_update(_cpu(x), _cpu(state0), _cpu(w), None, "silu")
    assert_rel(out, ro, 1e-5, "update out")
    _exact(conv_state, rs, "conv_state")


@pytest.mark.parametrize("state_mode", ["final_states", "varlen_states", "circular"])
@pytest.mark.parametrize("W", [2, 4, 5])
def test_prefill_then_decode_equals_full(device, W, state_mode):
    b, D, L, P = 2, 20, 19, 9  # P prefill tokens, then L - P decode steps
    x = make_x(b, D, L, F32, device, False)
    w = torch.randn(D, W, device=device)
    bias = torch.randn(D, device=device)
    full = causal_conv1d_fn(x, w, bias, activation="silu")

    pre, fs = causal_conv1d_fn(x[..., :P], w, bias, return_final_states=True, activation="silu")
    assert_rel(pre, full[..., :P], 1e-5, "prefill")
    cs = None
    if state_mode == "final_states":
        conv_state = fs.contiguous().clone()
    else:
        S = W + 2
        flat = x[..., :P].transpose(1, 2).reshape(b * P, D)
        cu = torch.arange(0, b * P + 1, P, dtype=torch.int32, device=device)
        conv_state = causal_conv1d_varlen_states(flat, cu, S)  # right-aligned last S tokens
        assert conv_state.shape == (b, D, S)
        if state_mode == "circular":
            # slot (P - S + i) % S holds token P - S + i
            conv_state = torch.roll(conv_state, shifts=P % S, dims=2).contiguous()
            cs = torch.full((b,), P, dtype=torch.int32, device=device)
    outs = []
    t = P
    while t < L:
        n = 2 if t == P + 1 else 1  # one 2-token chunk among the single steps
        n = min(n, L - t)
        xt = x[..., t] if n == 1 else x[..., t:t + n]
        o = causal_conv1d_update(xt, conv_state, w, bias, activation="silu", cache_seqlens=cs)
        outs.append(o.unsqueeze(-1) if n == 1 else o)
        if cs is not None:
            cs = cs + n
        t += n
    dec = torch.cat(outs, dim=-1)
    assert_rel(dec, full[..., P:], 1e-5, "decode vs full sequence")


# --------------------------------------------------------------------------------------
# varlen states
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("state_len", [1, 3, 4, 8])
def test_varlen_states(device, state_len, dtype, cu_dtype):
    lens = [3, 0, 10, 1, 4, 7]
    D = 37
    total = sum(lens)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=cu_dtype, device=device)
    x = torch.randn(total, D, dtype=dtype, device=device)
    out = causal_conv1d_varlen_states(x, cu, state_len)
    assert out.shape == (len(lens), D, state_len) and out.dtype == dtype and out.device == x.device
    _exact(out, ref.causal_conv1d_varlen_states(_cpu(x), _cpu(cu), state_len), "varlen states")


def test_varlen_states_noncontiguous_x(device):
    x = torch.randn(2 * 15, 9, device=device)[::2]
    cu = torch.tensor([0, 5, 15], dtype=torch.int32, device=device)
    out = causal_conv1d_varlen_states(x, cu, 4)
    _exact(out, ref.causal_conv1d_varlen_states(_cpu(x), _cpu(cu), 4), "varlen states")


# --------------------------------------------------------------------------------------
# empty batch, the *_ref functions
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("channel_last", [False, True], ids=["contig", "chlast"])
def test_empty_batch(device, channel_last):
    D, L, W = 8, 5, 4
    x = make_x(0, D, L, F32, device, channel_last).requires_grad_()
    w = torch.randn(D, W, device=device, requires_grad=True)
    bias = torch.randn(D, device=device, requires_grad=True)
    out, fs = causal_conv1d_fn(x, w, bias, return_final_states=True, activation="silu")
    assert out.shape == (0, D, L) and fs.shape == (0, D, W - 1)
    (out.sum() + fs.sum()).backward()
    assert x.grad.shape == x.shape
    assert w.grad.shape == w.shape and w.grad.abs().max().item() == 0.0
    assert bias.grad.shape == bias.shape and bias.grad.abs().max().item() == 0.0

    seq = torch.zeros(0, L, dtype=torch.int32, device=device)
    init = torch.zeros(0, D, W - 1, device=device)
    out2 = causal_conv1d_fn(x.detach(), w.detach(), None, seq, init)
    assert out2.shape == (0, D, L)

    conv_state = torch.randn(0, D, W - 1, device=device)
    o = causal_conv1d_update(torch.randn(0, D, device=device), conv_state, w.detach())
    assert o.shape == (0, D)
    o3 = causal_conv1d_update(torch.randn(0, D, 2, device=device), torch.randn(3, D, W, device=device),
                              w.detach(), conv_state_indices=torch.zeros(0, dtype=torch.int32, device=device))
    assert o3.shape == (0, D, 2)

    v = causal_conv1d_varlen_states(torch.randn(0, D, device=device),
                                    torch.zeros(1, dtype=torch.int32, device=device), 3)
    assert v.shape == (0, D, 3)


def test_ref_functions_match_reference():
    from ssm_ext.causal_conv1d import causal_conv1d_ref, causal_conv1d_update_ref

    b, D, L, W = 2, 6, 9, 4
    x = torch.randn(b, D, L)
    w = torch.randn(D, W)
    bias = torch.randn(D)
    init = torch.randn(b, D, W - 1)
    out, fs = causal_conv1d_ref(x, w, bias, initial_states=init, return_final_states=True, activation="silu")
    ro, rfs = ref.causal_conv1d(x, w, bias, None, init, "silu")
    assert_rel(out, ro, 1e-5, "causal_conv1d_ref out")
    assert_rel(fs, rfs, 1e-6, "causal_conv1d_ref final states")

    st = torch.randn(b, D, W + 1)
    st0 = st.clone()
    xt = torch.randn(b, D)
    o = causal_conv1d_update_ref(xt, st, w, bias, activation="silu")
    ro, rs = ref.causal_conv1d_update(xt, st0, w, bias, "silu")
    assert_rel(o, ro, 1e-5, "causal_conv1d_update_ref out")
    assert_rel(st, rs, 1e-6, "causal_conv1d_update_ref state")


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------

_B, _D, _L, _W = 2, 8, 10, 4


def _fwd_args(device, **over):
    args = dict(
        x=torch.randn(_B, _D, _L, device=device),
        weight=torch.randn(_D, _W, device=device),
        bias=None, seq_idx=None, initial_states=None, activation=None,
    )
    args.update(over)
    return args


def _bad_fwd(device, what):
    d = device
    cases = {
        "weight_1d": (dict(weight=torch.randn(_D, device=d)), "weight"),
        "weight_3d": (dict(weight=torch.randn(_D, 1, _W, device=d)), "weight"),
        "weight_wrong_D": (dict(weight=torch.randn(_D + 1, _W, device=d)), "weight"),
        "weight_width1": (dict(weight=torch.randn(_D, 1, device=d)), "weight"),
        "x_2d": (dict(x=torch.randn(_D, _L, device=d)), r"\bx\b"),
        "x_4d": (dict(x=torch.randn(_B, _D, _L, 1, device=d)), r"\bx\b"),
        "x_int": (dict(x=torch.randint(0, 5, (_B, _D, _L), device=d)), r"\bx\b"),
        "bias_wrong_len": (dict(bias=torch.randn(_D + 1, device=d)), "bias"),
        "bias_2d": (dict(bias=torch.randn(_D, 1, device=d)), "bias"),
        "seq_idx_int64": (dict(seq_idx=torch.zeros(_B, _L, dtype=torch.int64, device=d)), "seq_idx"),
        "seq_idx_wrong_shape": (dict(seq_idx=torch.zeros(_B, _L + 1, dtype=torch.int32, device=d)), "seq_idx"),
        "init_wrong_shape": (dict(initial_states=torch.randn(_B, _D, _W, device=d)), "initial_states"),
        "init_wrong_dtype": (dict(initial_states=torch.randn(_B, _D, _W - 1, dtype=F16, device=d)),
                             "initial_states"),
        "activation_relu": (dict(activation="relu"), "activation"),
    }
    over, match = cases[what]
    return _fwd_args(device, **over), match


@pytest.mark.parametrize("what", [
    "weight_1d", "weight_3d", "weight_wrong_D", "weight_width1", "x_2d", "x_4d", "x_int",
    "bias_wrong_len", "bias_2d", "seq_idx_int64", "seq_idx_wrong_shape", "init_wrong_shape",
    "init_wrong_dtype", "activation_relu",
])
def test_bad_input_fwd(device, what):
    args, match = _bad_fwd(device, what)
    with pytest.raises(ERRORS, match=match):
        causal_conv1d_fn(**args)


def test_bad_final_states_out(device):
    args = _fwd_args(device)
    fso = torch.empty(_B, _D, _W, device=device)
    with pytest.raises(ERRORS, match="final_states_out"):
        causal_conv1d_fn(**args, return_final_states=True, final_states_out=fso)


def _update_args(device, **over):
    args = dict(
        x=torch.randn(_B, _D, device=device),
        conv_state=torch.randn(_B, _D, _W - 1, device=device),
        weight=torch.randn(_D, _W, device=device),
        bias=None, activation=None, cache_seqlens=None, conv_state_indices=None,
    )
    args.update(over)
    return args


@pytest.mark.parametrize("what,over,match", [
    ("conv_state_wrong_D", lambda d: dict(conv_state=torch.randn(_B, _D + 1, _W - 1, device=d)), "conv_state"),
    ("conv_state_too_short", lambda d: dict(conv_state=torch.randn(_B, _D, _W - 2, device=d)), "conv_state"),
    ("conv_state_2d", lambda d: dict(conv_state=torch.randn(_B, _D, device=d)), "conv_state"),
    ("conv_state_wrong_dtype", lambda d: dict(conv_state=torch.randn(_B, _D, _W - 1, dtype=F16, device=d)),
     "conv_state"),
    ("conv_state_batch_too_small", lambda d: dict(conv_state=torch.randn(_B - 1, _D, _W - 1, device=d)),
     "conv_state"),
    ("cache_seqlens_float", lambda d: dict(cache_seqlens=torch.zeros(_B, device=d)), "cache_seqlens"),
    ("cache_seqlens_wrong_shape", lambda d: dict(cache_seqlens=torch.zeros(_B + 1, dtype=torch.int32, device=d)),
     "cache_seqlens"),
    ("indices_float", lambda d: dict(conv_state_indices=torch.zeros(_B, device=d)), "conv_state_indices"),
    ("indices_wrong_shape", lambda d: dict(conv_state_indices=torch.zeros(_B, 1, dtype=torch.int32, device=d)),
     "conv_state_indices"),
    ("x_4d", lambda d: dict(x=torch.randn(_B, _D, 1, 1, device=d)), r"\bx\b"),
    ("weight_wrong_D", lambda d: dict(weight=torch.randn(_D + 1, _W, device=d)), "weight"),
    ("activation_relu", lambda d: dict(activation="relu"), "activation"),
])
def test_bad_input_update(device, what, over, match):
    args = _update_args(device, **over(device))
    with pytest.raises(ERRORS, match=match):
        causal_conv1d_update(**args)


@pytest.mark.parametrize("what", ["cu_2d", "state_len_0", "state_len_neg", "x_3d"])
def test_bad_input_varlen(device, what):
    x = torch.randn(10, _D, device=device)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    state_len, match = 3, None
    if what == "cu_2d":
        cu, match = cu[None], "cu_seqlens"
    elif what == "state_len_0":
        state_len, match = 0, "state_len"
    elif what == "state_len_neg":
        state_len, match = -2, "state_len"
    elif what == "x_3d":
        x, match = x[None], r"\bx\b"
    with pytest.raises(ERRORS, match=match):
        causal_conv1d_varlen_states(x, cu, state_len)


@pytest.mark.cuda
def test_bad_input_cuda_only():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    # float64 is a CPU-only dtype (for gradcheck); on CUDA it is rejected naming x
    with pytest.raises(ERRORS, match=r"\bx\b"):
        causal_conv1d_fn(torch.randn(_B, _D, _L, dtype=F64, device="cuda"),
                         torch.randn(_D, _W, dtype=F64, device="cuda"))
    # weight on another device than x
    with pytest.raises(ERRORS, match="weight"):
        causal_conv1d_fn(torch.randn(_B, _D, _L, device="cuda"), torch.randn(_D, _W))
    with pytest.raises(ERRORS, match="weight"):
        causal_conv1d_update(torch.randn(_B, _D, device="cuda"), torch.randn(_B, _D, _W - 1, device="cuda"),
                             torch.randn(_D, _W))
    with pytest.raises(ERRORS, match="conv_state"):
        causal_conv1d_update(torch.randn(_B, _D, device="cuda"), torch.randn(_B, _D, _W - 1),
                             torch.randn(_D, _W, device="cuda"))


def test_causal_conv1d_module(device):
    """CausalConv1d: forward equals the functional op; prefill + step() equals the full sequence."""
    from ssm_ext.causal_conv1d import CausalConv1d

    b, D, L, W = 2, 24, 13, 4
    conv = CausalConv1d(D, width=W, activation="silu", device=device)
    x = torch.randn(b, D, L, device=device)
    full = conv(x)
    ref_out, _ = ref.causal_conv1d(x, conv.weight.detach(), conv.bias.detach(), None, None, "silu")
    assert_rel(full, ref_out, 1e-5, "module forward")
    _, state = causal_conv1d_fn(x[..., :-3], conv.weight, conv.bias, activation="silu", return_final_states=True)
    state = state.detach().contiguous()
    steps = torch.stack([conv.step(x[..., t], state) for t in range(L - 3, L)], dim=-1)
    assert_rel(steps, full[..., -3:].detach(), 1e-5, "module step")
    full.sum().backward()
    assert conv.weight.grad is not None and conv.bias.grad is not None


@pytest.mark.parametrize("channel_last", [False, True], ids=["contig", "chlast"])
def test_deterministic(device, channel_last):
    """Same inputs give bitwise the same outputs and gradients (no atomics anywhere)."""
    b, D, L, W = 3, 64, 1000, 4
    x = make_x(b, D, L, torch.bfloat16, device, channel_last).requires_grad_()
    w = torch.randn(D, W, device=device, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(D, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(b, D, L, device=device, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        out = causal_conv1d_fn(x, w, bias, activation="silu")
        grads = torch.autograd.grad(out, (x, w, bias), g)
        runs.append((out, *grads))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
