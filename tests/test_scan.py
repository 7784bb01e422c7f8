"""Tests of the first-order scan family (SPEC.md section 2, API_scan.txt).

Ground truth is ssm_ext.reference.scan (float64 loops over time). Every test runs on the CPU
and, when a GPU is present, on CUDA (the `cuda`-marked parametrisation of `device`).

    h_t = a_t * h_{t-1} + b_t * x_t,  y_t = c_t * h_t,  h_{-1} = initial_state or 0
"""

import copy
import os
import time

import pytest
import torch

import ssm_ext  # noqa: F401  (registers torch.ops.ssm_ext.*)
import ssm_ext.quick_ssm as qs
from ssm_ext.quick_ssm import scan, scan_step
from ssm_ext.reference import scan as ref

from helpers import assert_rel, schema_args, tol_for


F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
ERRORS = (RuntimeError, ValueError, NotImplementedError, TypeError)
COMPILE_BACKEND = os.environ.get("SSM_EXT_COMPILE_BACKEND", "inductor")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def _cpu(t):
    return None if t is None else t.detach().cpu()


def _state_dtype(dtype):
    """States (initial / final / stored) are fp32, fp64 for fp64 inputs."""
    return F64 if dtype == F64 else F32


def _gate(shape, dtype, device, lo=0.5, hi=1.0):
    return (lo + (hi - lo) * torch.rand(*shape, device=device)).to(dtype)


def _inputs(B, L, D, dtype, device, b_on=True, c_on=True, init_on=False, lo=0.5, hi=1.0):
    x = torch.randn(B, L, D, device=device).to(dtype)
    a = _gate((B, L, D), dtype, device, lo, hi)
    b = torch.randn(B, L, D, device=device).to(dtype) if b_on else None
    c = torch.randn(B, L, D, device=device).to(dtype) if c_on else None
    h0 = torch.randn(B, D, device=device).to(_state_dtype(dtype)) if init_on else None
    return x, a, b, c, h0


def _time_major(t):
    """t's values in a (B, D, L)-contiguous buffer seen as (B, L, D) (time steps contiguous);
    None and 2-D (B, D) states pass through."""
    return t if t is None or t.dim() != 3 else t.transpose(1, 2).contiguous().transpose(1, 2)


def _run(x, a, b, c, h0=None, ret_final=True, **kw):
    res = scan(x, a, b, c, initial_state=h0, return_final_state=ret_final, **kw)
    if ret_final:
        assert isinstance(res, (tuple, list)) and len(res) == 2, f"return_final_state=True gave {type(res)}"
        return res
    assert isinstance(res, torch.Tensor), f"return_final_state=False gave {type(res)}"
    return res, None


def _check_fwd(x, a, b, c, h0, ret_final=True, out_dtype=None, backend="auto", **kw):
    """Run quick_ssm.scan and compare y (and the final state) with the float64 reference."""
    B, L, D = x.shape
    y, fs = _run(x, a, b, c, h0, ret_final, out_dtype=out_dtype, backend=backend, **kw)
    ry, rfs = ref.scan(_cpu(x), _cpu(a), _cpu(b), _cpu(c), _cpu(h0))
    odt = out_dtype if out_dtype is not None else x.dtype
    assert y.shape == (B, L, D), f"y shape {tuple(y.shape)}"
    assert y.dtype == odt, f"y dtype {y.dtype}, expected {odt}"
    assert y.device == x.device
    assert_rel(y, ry, tol_for(odt), "y")
    if ret_final:
        assert fs.shape == (B, D), f"final_state shape {tuple(fs.shape)}"
        assert fs.dtype == _state_dtype(x.dtype), f"final_state dtype {fs.dtype}"
        assert fs.device == x.device
        # the state is accumulated (and returned) in fp32 whatever the input dtype
        assert_rel(fs, rfs, 1e-10 if x.dtype == F64 else 1e-5, "final_state")
    return y, fs


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def _check_grads(x, a, b, c, h0, final_grad, y_grad=True, out_dtype=None, tol=None, **kw):
    """Gradients of x, a, b, c, initial_state through quick_ssm.scan vs autograd through the reference."""
    leaves = [_leaf(t) for t in (x, a, b, c, h0)]
    y, fs = _run(*leaves, ret_final=True, out_dtype=out_dtype, **kw)
    dy = torch.randn(y.shape, device=y.device).to(y.dtype)
    dfs = torch.randn(fs.shape, device=fs.device).to(fs.dtype)
    # autograd.grad with explicit grad_outputs, so no loss arithmetic adds rounding
    outs, gos = [], []
    if y_grad:
        outs.append(y); gos.append(dy)
    if final_grad:
        outs.append(fs); gos.append(dfs)
    need = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(outs, need, gos, allow_unused=True)

    refs = [None if t is None else _cpu(t).to(F64).requires_grad_() for t in leaves]
    ry, rfs = ref.scan(*refs)
    rl = ry.new_zeros(())
    if y_grad:
        rl = rl + (ry * _cpu(dy).to(F64)).sum()
    if final_grad:
        rl = rl + (rfs * _cpu(dfs).to(F64)).sum()
    rgrads = torch.autograd.grad(rl, [r for r in refs if r is not None], allow_unused=True)

    names = [n for n, t in zip(["dx", "da", "db", "dc", "dinitial_state"], leaves) if t is not None]
    for name, t, g, rg in zip(names, need, grads, rgrads):
        if rg is None:  # the reference has no path from this input (e.g. dc with only a final-state grad)
            rg = torch.zeros(t.shape, dtype=F64)
        assert g is not None, f"{name} is None"
        assert g.shape == t.shape and g.dtype == t.dtype, f"{name}: {tuple(g.shape)} {g.dtype} for {t.dtype}"
        if rg.abs().max().item() == 0.0:
            assert g.abs().max().item() == 0.0, f"{name} should be zero"
        else:
            t_tol = tol if tol is not None else tol_for(t.dtype)
            assert_rel(g, rg, t_tol, name)
    return grads


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("ret_final", [False, True], ids=["y", "y_final"])
@pytest.mark.parametrize("init_on", [False, True], ids=["noinit", "init"])
@pytest.mark.parametrize("c_on", [False, True], ids=["noc", "c"])
@pytest.mark.parametrize("b_on", [False, True], ids=["nob", "b"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_fwd_options(device, dtype, b_on, c_on, init_on, ret_final):
    x, a, b, c, h0 = _inputs(2, 45, 37, dtype, device, b_on, c_on, init_on)
    _check_fwd(x, a, b, c, h0, ret_final)


SIZES = [  # (B, L, D)
    (1, 1, 8),      # L = 1
    (2, 1, 37),     # L = 1, D odd
    (2, 3, 5),      # L = 3
    (3, 2, 1),      # D = 1
    (1, 257, 3),    # L just past a power of two
    (2, 1000, 19),  # long-ish
    (2, 33, 130),   # D not a multiple of 8, > 128
]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("all_on", [False, True], ids=["plain", "allopts"])
@pytest.mark.parametrize("B,L,D", SIZES)
def test_fwd_sizes(device, B, L, D, all_on, dtype):
    x, a, b, c, h0 = _inputs(B, L, D, dtype, device, all_on, all_on, all_on)
    _check_fwd(x, a, b, c, h0, True)


def test_fwd_float64_cpu():
    x, a, b, c, h0 = _inputs(2, 31, 7, F64, "cpu", True, True, True)
    _check_fwd(x, a, b, c, h0, True)
    x, a, b, c, h0 = _inputs(2, 31, 7, F64, "cpu", False, False, False)
    _check_fwd(x, a, b, c, h0, True)


@pytest.mark.parametrize("in_dtype,out_dtype", [(BF16, F32), (F16, F32), (F32, BF16), (F32, F16), (BF16, BF16),
                                                (F32, F32)])
def test_fwd_out_dtype(device, in_dtype, out_dtype):
    """y takes out_dtype; with fp32 out from fp16/bf16 inputs nothing is rounded to the input dtype
    on the way (so it meets the fp32 tolerance against the reference of the same rounded inputs)."""
    x, a, b, c, h0 = _inputs(2, 200, 24, in_dtype, device, True, True, True)
    _check_fwd(x, a, b, c, h0, True, out_dtype=out_dtype)


def test_fwd_wide_gates(device):
    """Gates anywhere in (-1, 1), including negative and near-zero ones."""
    x, a, b, c, h0 = _inputs(2, 150, 16, F32, device, True, True, True, lo=-1.0, hi=1.0)
    _check_fwd(x, a, b, c, h0, True)


def test_fwd_empty(device):
    """L = 0: y is (B, 0, D) and the final state is the initial state (or 0); B = 0 works."""
    B, D = 2, 5
    x, a, b, c, h0 = _inputs(B, 0, D, F32, device, True, True, True)
    y, fs = _run(x, a, b, c, h0)
    assert y.shape == (B, 0, D) and fs.shape == (B, D)
    assert torch.equal(fs, h0)
    y, fs = _run(x, a, b, c, None)
    assert fs.shape == (B, D) and fs.abs().max().item() == 0.0
    x, a, b, c, h0 = _inputs(0, 7, D, F32, device, True, True, True)
    y, fs = _run(x, a, b, c, h0)
    assert y.shape == (0, 7, D) and fs.shape == (0, D)


def _ref_chunked(x, a, u_is_x_times_b, c, h0, K=256):
    """Loop-free (over time) float64 scan for long sequences, stable for gates in [0.5, 1):
    within chunks of K steps h = P * cumsum(u / P) with P the in-chunk cumprod of a
    (P >= 0.5**K stays far from underflow), and a short loop carries the state across chunks.
    x, a, c: (B, L, D) float64; returns the (B, L, D) states h and y = c * h."""
    Bsz, L, D = x.shape
    u = u_is_x_times_b
    n = (L + K - 1) // K
    pad = n * K - L
    a_p = torch.cat([a, torch.ones(Bsz, pad, D, dtype=F64)], 1).view(Bsz, n, K, D)
    u_p = torch.cat([u, torch.zeros(Bsz, pad, D, dtype=F64)], 1).view(Bsz, n, K, D)
    P = torch.cumprod(a_p, dim=2)
    local = P * torch.cumsum(u_p / P, dim=2)
    carry = torch.empty(Bsz, n, D, dtype=F64)
    h = h0.clone()
    for j in range(n):
        carry[:, j] = h
        h = P[:, j, -1] * h + local[:, j, -1]
    H = (local + P * carry[:, :, None, :]).reshape(Bsz, n * K, D)[:, :L]
    return H, (None if c is None else c * H)


def test_fwd_bwd_very_long_sequence():
    """L = 1_000_003 (not a power of two, > 2^20) with a small B * D, forward and gradients."""
    t0 = time.time()
    # the chunked closed form agrees with the step-by-step reference first
    xs, as_, bs, cs, hs = (t.to(F64) if t is not None else None for t in _inputs(1, 1500, 3, F64, "cpu", True, True, True))
    H, Y = _ref_chunked(xs, as_, bs * xs, cs, hs, K=256)
    ry, rfs = ref.scan(xs, as_, bs, cs, hs)
    assert_rel(Y, ry, 1e-12, "chunked reference vs loop reference")
    assert_rel(H[:, -1], rfs, 1e-12, "chunked reference final state")

    B, L, D = 1, 1_000_003, 3
    x, a, b, c, h0 = _inputs(B, L, D, F32, "cpu", True, True, True)
    dy = torch.randn(B, L, D)
    dfs = torch.randn(B, D)
    leaves = [t.clone().requires_grad_() for t in (x, a, b, c, h0)]
    y, fs = scan(*leaves[:4], initial_state=leaves[4], return_final_state=True)
    x64, a64, b64, c64, h64 = (t.to(F64) for t in (x, a, b, c, h0))
    H, Y = _ref_chunked(x64, a64, b64 * x64, c64, h64)
    assert_rel(y, Y, 1e-5, "y (L = 1_000_003)")
    assert_rel(fs, H[:, -1], 1e-5, "final_state (L = 1_000_003)")
    # y at the very end is not swamped by the norm of the rest
    assert_rel(y[:, -5:], Y[:, -5:], 1e-5, "last steps of y")

    dx, da, db, dc, dh0 = torch.autograd.grad((y, fs), leaves, (dy, dfs))
    # adjoint: g_t = c_t dy_t + a_{t+1} g_{t+1}, g_{L-1} = c dy + dfinal; a reverse scan
    dy64 = dy.to(F64)
    a_next = torch.cat([a64[:, 1:], torch.ones(B, 1, D, dtype=F64)], 1)
    G, _ = _ref_chunked(dy64.flip(1), a_next.flip(1), (c64 * dy64).flip(1), None, dfs.to(F64))
    # the final-state gradient enters at t = L - 1 as h_{-1} of the reversed scan, multiplied by a_next = 1
    G = G.flip(1)
    h_prev = torch.cat([h64[:, None], H[:, :-1]], 1)
    assert_rel(dx, G * b64, 1e-5, "dx (long)")
    assert_rel(db, G * x64, 1e-5, "db (long)")
    assert_rel(da, G * h_prev, 1e-5, "da (long)")
    assert_rel(dc, dy64 * H, 1e-5, "dc (long)")
    assert_rel(dh0, a64[:, 0] * G[:, 0], 1e-5, "dinitial_state (long)")
    assert time.time() - t0 < 60


def _noncontig(kind, B, L, D, dtype, device, gate=False):
    def draw(*shape):
        t = _gate(shape, F32, device) if gate else torch.randn(*shape, device=device)
        return t.to(dtype)
    if kind == "transposed":      # a (B, D, L) buffer seen as (B, L, D)
        return draw(B, D, L).transpose(1, 2)
    if kind == "l_stride2":
        return draw(B, 2 * L, D)[:, ::2]
    if kind == "d_stride2":
        return draw(B, L, 2 * D)[:, :, ::2]
    if kind == "batch_stride2":
        return draw(2 * B, L, D)[::2]
    if kind == "narrow_d":
        return draw(B, L, D + 5)[:, :, 2:2 + D]
    if kind == "batch_minor":     # (L, B, D) memory order
        return draw(L, B, D).transpose(0, 1)
    if kind == "contig":
        return draw(B, L, D)
    raise AssertionError(kind)


NONCONTIG = ["transposed", "l_stride2", "d_stride2", "batch_stride2", "narrow_d", "batch_minor"]


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("kind", NONCONTIG)
def test_fwd_noncontiguous(device, kind, dtype):
    B, L, D = 2, 29, 21
    x = _noncontig(kind, B, L, D, dtype, device)
    a = _noncontig(kind, B, L, D, dtype, device, gate=True)
    b = _noncontig("transposed" if kind != "transposed" else "l_stride2", B, L, D, dtype, device)
    c = _noncontig(kind, B, L, D, dtype, device)
    h0 = torch.randn(B, 2 * D, device=device)[:, ::2]
    assert x.shape == (B, L, D) and not x.is_contiguous()
    before = [t.clone() for t in (x, a, b, c, h0)]
    y, _ = _check_fwd(x, a, b, c, h0, True)
    for t, t0 in zip((x, a, b, c, h0), before):
        assert torch.equal(t, t0), "an input was modified"


@pytest.mark.parametrize("how", ["gate_per_channel", "gate_per_batch_channel", "scalar_b_c"])
def test_fwd_expanded_zero_stride(device, how):
    B, L, D = 3, 40, 11
    x = torch.randn(B, L, D, device=device)
    if how == "gate_per_channel":
        a = _gate((D,), F32, device).expand(B, L, D)
        b, c = torch.randn(B, L, D, device=device), torch.randn(B, L, D, device=device)
    elif how == "gate_per_batch_channel":
        a = _gate((B, 1, D), F32, device).expand(B, L, D)
        b, c = None, torch.randn(1, L, 1, device=device).expand(B, L, D)
    else:
        a = _gate((B, L, D), F32, device)
        b = torch.randn(1, 1, 1, device=device).expand(B, L, D)
        c = torch.randn(1, 1, 1, device=device).expand(B, L, D)
    _check_fwd(x, a, b, c, torch.randn(B, D, device=device), True)


def test_fwd_chaining_with_final_state(device):
    """Scanning two halves, the second from the first's fp32 final state, equals one scan
    (also for bf16 inputs: the state handed over is fp32)."""
    for dtype in (F32, BF16):
        x, a, b, c, h0 = _inputs(2, 64, 24, dtype, device, True, True, True)
        y, fs = _run(x, a, b, c, h0)
        y1, fs1 = _run(x[:, :25], a[:, :25], b[:, :25], c[:, :25], h0)
        y2, fs2 = _run(x[:, 25:], a[:, 25:], b[:, 25:], c[:, 25:], fs1)
        assert_rel(torch.cat([y1, y2], 1), y, tol_for(dtype) / 10, f"chained y ({dtype})")
        assert_rel(fs2, fs, 1e-6, f"chained final_state ({dtype})")


def test_fwd_compat_arguments(device):
    """block_l / tile_b / tile_d are accepted and change nothing; checkpoint does not change y."""
    x, a, b, c, h0 = _inputs(3, 70, 20, F32, device, True, True, True)
    y0, f0 = _run(x, a, b, c, h0)
    for kw in (dict(block_l=16), dict(block_l=1024, tile_b=1, tile_d=4), dict(checkpoint=False),
               dict(tile_b=2, tile_d=64, checkpoint=True)):
        y1, f1 = _run(x, a, b, c, h0, **kw)
        assert torch.equal(y1, y0), f"y changed with {kw}"
        assert torch.equal(f1, f0), f"final_state changed with {kw}"


def test_fwd_y_layout(device):
    """y is laid out like x: contiguous for contiguous x, (B, D, L)-major for a transposed x."""
    a = _gate((2, 20, 9), F32, device)
    x = torch.randn(2, 20, 9, device=device)
    assert scan(x, a, None, None).is_contiguous()
    xt = torch.randn(2, 9, 20, device=device).transpose(1, 2)
    y = scan(xt, a, None, None)
    assert y.stride() == xt.stride(), f"y strides {y.stride()}, x strides {xt.stride()}"


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu_or_cuda"])
def test_backends_agree(device, backend):
    """backend="torch" (the pure-PyTorch path) and the explicit device backend agree with "auto"
    (the explicit device backend bitwise), forward and gradients."""
    if backend == "cpu_or_cuda":
        backend = "cpu" if device == "cpu" else "cuda"
    x, a, b, c, h0 = _inputs(2, 50, 13, F32, device, True, True, True)
    _check_fwd(x, a, b, c, h0, True, backend=backend)
    _check_grads(x, a, b, c, h0, True, backend=backend)
    dy = torch.randn(2, 50, 13, device=device)
    dfs = torch.randn(2, 13, device=device)
    res = []
    for be in ("auto", backend):
        leaves = [_leaf(t) for t in (x, a, b, c, h0)]
        y, fs = _run(*leaves, backend=be)
        res.append((y, fs, *torch.autograd.grad((y, fs), leaves, (dy, dfs))))
    for name, p, q in zip(["y", "final_state", "dx", "da", "db", "dc", "dinit"], *res):
        assert q.dtype == p.dtype and q.shape == p.shape, f"{name}: {q.dtype} {tuple(q.shape)}"
        if backend == "torch":
            assert_rel(q, p, 1e-5, f"{name}: torch vs auto")
        else:
            assert torch.equal(q, p), f"{name}: {backend} differs from auto"


def test_backend_torch_bf16(device):
    """The pure-PyTorch backend keeps the dtype contract too (y in x's dtype, state fp32)."""
    x, a, b, c, h0 = _inputs(2, 30, 8, BF16, device, True, True, True)
    _check_fwd(x, a, b, c, h0, True, backend="torch")


# --------------------------------------------------------------------------------------
# the op itself
# --------------------------------------------------------------------------------------

def test_op_fwd_states(device):
    """scan_fwd(store_states=True) returns the fp32 h_t and no chunk states; store_states=False
    no states and h at every 32nd step (the initial state first)."""
    x, a, b, c, h0 = _inputs(2, 37, 10, BF16, device, True, True, True)
    y, fs, st, cs = torch.ops.ssm_ext.scan_fwd(x, a, b, c, h0, True, None)
    assert cs.numel() == 0
    rh, _ = ref.scan(_cpu(x), _cpu(a), _cpu(b), None, _cpu(h0))
    assert st.shape == (2, 37, 10) and st.dtype == F32
    assert_rel(st, rh, 1e-5, "states")
    assert y.is_contiguous() and y.dtype == BF16
    y2, fs2, st2, cs2 = torch.ops.ssm_ext.scan_fwd(x, a, b, c, h0, False, None)
    assert st2.numel() == 0
    assert cs2.shape == (2, 2, 10) and cs2.dtype == F32
    assert_rel(cs2[:, 0], h0.float(), 1e-6, "chunk_states[:, 0]")
    assert_rel(cs2[:, 1], rh[:, 31], 1e-5, "chunk_states[:, 1]")
    assert torch.equal(y2, y) and torch.equal(fs2, fs)
    # CUDA: the final state comes from the tile chain, the stored h from the steps of the last tile
    if device == "cpu":
        assert torch.equal(fs, st[:, -1])
    else:
        assert_rel(fs, st[:, -1], 1e-6, "final_state")


@pytest.mark.parametrize("b_on,c_on,init_on", [(False, False, False), (True, True, True), (True, False, True),
                                               (False, True, False)])
def test_op_bwd_direct(device, b_on, c_on, init_on):
    """scan_bwd: gradients vs the reference; db/dc/dinitial_state empty when absent; states given
    or recomputed (from chunk states, or from nothing) give the same gradients (bitwise on the
    CPU; on CUDA the recomputed tile starts round differently from the stored steps, so
    within 1e-6, and chunk states given or rebuilt bitwise); dfinal_state None means 0."""
    x, a, b, c, h0 = _inputs(2, 70, 9, F32, device, b_on, c_on, init_on)
    st = torch.ops.ssm_ext.scan_fwd(x, a, b, c, h0, True, None)[2]
    cs = torch.ops.ssm_ext.scan_fwd(x, a, b, c, h0, False, None)[3]
    dy = torch.randn(2, 70, 9, device=device)
    dfs = torch.randn(2, 9, device=device)
    for dfinal in (None, dfs):
        g1 = torch.ops.ssm_ext.scan_bwd(x, a, b, c, h0, st, None, dy, dfinal)
        assert len(g1) == 5
        g2 = torch.ops.ssm_ext.scan_bwd(x, a, b, c, h0, None, cs, dy, dfinal)
        g3 = torch.ops.ssm_ext.scan_bwd(x, a, b, c, h0, None, None, dy, dfinal)
        for p, q, r in zip(g1, g2, g3):
            assert torch.equal(q, r), "given and rebuilt chunk states give different gradients"
            if device == "cpu":
                assert torch.equal(p, q), "stored and recomputed states give different gradients"
            elif p.numel():
                assert_rel(q, p, 1e-6, "stored vs recomputed states")
        refs = [None if t is None else _cpu(t).to(F64).requires_grad_() for t in (x, a, b, c, h0)]
        ry, rfs = ref.scan(*refs)
        rl = (ry * _cpu(dy).to(F64)).sum()
        if dfinal is not None:
            rl = rl + (rfs * _cpu(dfinal).to(F64)).sum()
        live = [r for r in refs if r is not None]
        rg = dict(zip([id(r) for r in live], torch.autograd.grad(rl, live)))
        for name, g, t, r in zip(["dx", "da", "db", "dc", "dinitial_state"], g1, (x, a, b, c, h0), refs):
            if t is None:
                assert g.numel() == 0, f"{name} should be empty when its input is None"
            else:
                assert g.shape == t.shape and g.dtype == t.dtype
                assert_rel(g, rg[id(r)], 1e-5, name)


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint", [True, False], ids=["ckpt", "stored"])
@pytest.mark.parametrize("final_grad", [False, True], ids=["nofinalgrad", "finalgrad"])
@pytest.mark.parametrize("init_on", [False, True], ids=["noinit", "init"])
@pytest.mark.parametrize("c_on", [False, True], ids=["noc", "c"])
@pytest.mark.parametrize("b_on", [False, True], ids=["nob", "b"])
def test_bwd_options(device, b_on, c_on, init_on, final_grad, checkpoint):
    x, a, b, c, h0 = _inputs(2, 33, 19, F32, device, b_on, c_on, init_on)
    _check_grads(x, a, b, c, h0, final_grad, checkpoint=checkpoint)


@pytest.mark.parametrize("dtype,out_dtype", [(F16, None), (BF16, None), (BF16, F32), (F32, BF16)])
def test_bwd_dtypes(device, dtype, out_dtype):
    x, a, b, c, h0 = _inputs(2, 40, 24, dtype, device, True, True, True)
    # gradients take their input's dtype, rounded once at the end
    _check_grads(x, a, b, c, h0, True, out_dtype=out_dtype, tol=1e-2 if dtype != F32 else 1e-5)


@pytest.mark.parametrize("B,L,D", [(1, 1, 8), (2, 3, 5), (2, 1000, 7), (3, 2, 1)])
def test_bwd_sizes(device, B, L, D):
    x, a, b, c, h0 = _inputs(B, L, D, F32, device, True, True, True)
    _check_grads(x, a, b, c, h0, True)


@pytest.mark.parametrize("dtype,out_dtype", [(F32, None), (BF16, None), (BF16, F32), (F16, None)])
@pytest.mark.parametrize("opts", ["plain", "allopts", "stored"])
@pytest.mark.parametrize("L", [264, 4112])
def test_time_contiguous_many_rows(device, dtype, out_dtype, opts, L):
    """(B, D, L)-contiguous inputs with enough rows (b, d) that CUDA runs the row mode (the
    accelerated-scan layout: a CTA per row without b, c, else a warp). L = 264 ends inside the
    first segment of the row walk (16-bit inputs without b, c take the tiles: L % 16 != 0);
    L = 4112 spans two segments everywhere. Forward and gradients vs the reference, with and
    without b, c, initial state, in checkpoint and stored-states mode."""
    if L > 1000 and device == "cpu" and (opts != "plain" or dtype != F32):
        pytest.skip("the long rows exercise the CUDA row walk; the CPU runs one of them")
    B, D = 2, 1100
    on = opts != "plain"
    x, a, b, c, h0 = (_time_major(t) for t in _inputs(B, L, D, dtype, device, on, on, on))
    assert x.stride(1) == 1
    _check_fwd(x, a, b, c, h0, out_dtype=out_dtype, checkpoint=opts != "stored")
    _check_grads(x, a, b, c, h0, True, out_dtype=out_dtype, tol=1e-2 if dtype != F32 else 1e-5,
                 checkpoint=opts != "stored")


STRIP_SIZES = [  # (B, L, D): D contiguous, D >= 32 and a multiple of 8 (CUDA strip mode)
    (2, 300, 40),     # a partial strip of channels; L ends inside a tile (64 steps)
    (3, 64, 96),      # whole tiles, several strips per batch
    (1, 20000, 32),   # one strip, hundreds of tiles: long look-back chains between CTAs
    (1, 1, 32),       # L = 1
    (8, 100, 1544),   # CUDA: many strips (the state read a tile ahead), the last of each batch partial
]


# the long and the wide case run the plain, allopts and stored options once per input dtype (the wide
# one also allopts with every output dtype)
STRIP_CASES = [(size, dt, odt, opts)
               for size in STRIP_SIZES
               for dt, odt in [(F32, None), (BF16, None), (BF16, F32), (F16, None), (F32, BF16)]
               for opts in ["plain", "b", "c", "allopts", "stored"]
               if (size[1] <= 1000 and size[2] < 1000) or (odt is None and opts in ("plain", "allopts", "stored"))
               or (size[2] > 1000 and opts == "allopts")]


@pytest.mark.parametrize("size,dtype,out_dtype,opts", STRIP_CASES)
def test_channel_contiguous_strips(device, size, dtype, out_dtype, opts):
    """(B, L, D)-contiguous inputs with D >= 32 (CUDA: strips of one 128-byte line of channels
    through shared memory, persistent CTAs chained by look-back). Forward and gradients vs the reference, with and
    without b, c, initial state, in checkpoint and stored-states mode."""
    B, L, D = size
    x, a, b, c, h0 = _inputs(B, L, D, dtype, device, opts in ("b", "allopts", "stored"),
                             opts in ("c", "allopts", "stored"), opts in ("allopts", "stored"))
    _check_fwd(x, a, b, c, h0, out_dtype=out_dtype, checkpoint=opts != "stored")
    _check_grads(x, a, b, c, h0, True, out_dtype=out_dtype, tol=1e-2 if dtype != F32 else 1e-5,
                 checkpoint=opts != "stored")


@pytest.mark.parametrize("kind", ["sliced_d", "misaligned", "l_stride"])
def test_channel_contiguous_views(device, kind):
    """Strided (B, L, D) views: a slice of wider channels and an L stride keep 16-byte rows
    (strip mode); a view one element off 16-byte alignment takes the general tiles."""
    B, L, D = 2, 200, 48
    full = [t for t in _inputs(B, 2 * L, D + 8, F32, device, True, True, True)]
    if kind == "sliced_d":
        x, a, b, c = (t[:, :L, 4:4 + D] for t in full[:4])
    elif kind == "misaligned":
        x, a, b, c = (t[:, :L, 1:1 + D] for t in full[:4])
    else:
        x, a, b, c = (t[:, ::2, :D] for t in full[:4])
    h0 = full[4][:, :D]
    _check_fwd(x, a, b, c, h0)
    _check_grads(x, a, b, c, h0, True)


def test_bwd_only_final_state(device):
    """Only the final state carries a gradient (y unused): dc is zero, the rest flows back."""
    x, a, b, c, h0 = _inputs(2, 17, 6, F32, device, True, True, True)
    _check_grads(x, a, b, c, h0, True, y_grad=False)


def test_bwd_empty_sequence(device):
    """L = 0: the final-state gradient goes straight to initial_state."""
    x, a, b, c, h0 = _inputs(2, 0, 5, F32, device, True, True, True)
    leaves = [t.clone().requires_grad_() for t in (x, a, b, c, h0)]
    y, fs = _run(*leaves)
    g = torch.randn(2, 5, device=device)
    (fs * g).sum().backward()
    assert torch.equal(leaves[4].grad, g)
    for t in leaves[:4]:
        assert t.grad is None or (t.grad.shape == t.shape and t.grad.numel() == 0)


@pytest.mark.parametrize("kind", ["transposed", "l_stride2", "d_stride2"])
def test_bwd_noncontiguous(device, kind):
    B, L, D = 2, 21, 13
    bases = [torch.randn(B, D, L, device=device), _gate((B, D, L), F32, device),
             torch.randn(B, D, L, device=device), torch.randn(B, D, L, device=device)]
    if kind == "transposed":
        views = lambda ts: [t.transpose(1, 2) for t in ts]  # noqa: E731
    elif kind == "l_stride2":
        bases = [torch.randn(B, 2 * L, D, device=device) if i != 1 else _gate((B, 2 * L, D), F32, device)
                 for i in range(4)]
        views = lambda ts: [t[:, ::2] for t in ts]  # noqa: E731
    else:
        bases = [torch.randn(B, L, 2 * D, device=device) if i != 1 else _gate((B, L, 2 * D), F32, device)
                 for i in range(4)]
        views = lambda ts: [t[:, :, ::2] for t in ts]  # noqa: E731
    bases = [t.requires_grad_() for t in bases]
    h0 = torch.randn(B, D, device=device, requires_grad=True)
    x, a, b, c = views(bases)
    y, fs = _run(x, a, b, c, h0)
    dy, dfs = torch.randn_like(y), torch.randn_like(fs)
    torch.autograd.backward((y, fs), (dy, dfs))
    r = [t.detach().cpu().to(F64).requires_grad_() for t in bases]
    r0 = h0.detach().cpu().to(F64).requires_grad_()
    ry, rfs = ref.scan(*views(r), r0)
    torch.autograd.backward((ry, rfs), (dy.cpu().to(F64), dfs.cpu().to(F64)))
    for name, t, rt in zip(["dx", "da", "db", "dc"], bases, r):
        assert_rel(t.grad, rt.grad, 1e-5, name)
    assert_rel(h0.grad, r0.grad, 1e-5, "dinitial_state")


def test_bwd_expanded_gate(device):
    """A zero-stride (expanded) a: its gradient is summed over the broadcast dimensions."""
    B, L, D = 3, 25, 10
    a_small = _gate((1, 1, D), F32, device).requires_grad_()
    x = torch.randn(B, L, D, device=device, requires_grad=True)
    c = torch.randn(B, L, D, device=device, requires_grad=True)
    y = scan(x, a_small.expand(B, L, D), None, c)
    dy = torch.randn_like(y)
    y.backward(dy)
    ra = a_small.detach().cpu().to(F64).requires_grad_()
    rx = x.detach().cpu().to(F64).requires_grad_()
    rc = c.detach().cpu().to(F64).requires_grad_()
    ry, _ = ref.scan(rx, ra.expand(B, L, D), None, rc)
    ry.backward(dy.cpu().to(F64))
    assert_rel(a_small.grad, ra.grad, 1e-5, "da (expanded)")
    assert_rel(x.grad, rx.grad, 1e-5, "dx")
    assert_rel(c.grad, rc.grad, 1e-5, "dc")


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_checkpoint_same_gradients(device, dtype):
    """checkpoint=True (recompute states) and False (stored states) give the same gradients,
    bitwise on the CPU."""
    x, a, b, c, h0 = _inputs(2, 300, 16, dtype, device, True, True, True)
    dy = torch.randn(2, 300, 16, device=device).to(dtype)
    dfs = torch.randn(2, 16, device=device)
    results = []
    for ck in (True, False):
        leaves = [_leaf(t) for t in (x, a, b, c, h0)]
        y, fs = _run(*leaves, checkpoint=ck)
        results.append((y, fs, *torch.autograd.grad((y, fs), leaves, (dy, dfs))))
    for name, p, q in zip(["y", "final_state", "dx", "da", "db", "dc", "dinit"], *results):
        if device == "cpu":
            assert torch.equal(p, q), f"{name}: checkpoint=True and False differ"
        else:
            assert_rel(p, q, 1e-6, name)


def test_deterministic(device):
    x, a, b, c, h0 = _inputs(2, 500, 33, BF16, device, True, True, True)
    dy = torch.randn(2, 500, 33, device=device).to(BF16)
    runs = []
    for _ in range(2):
        leaves = [_leaf(t) for t in (x, a, b, c, h0)]
        y, fs = _run(*leaves)
        runs.append((y, fs, *torch.autograd.grad((y, fs), leaves, (dy, torch.ones_like(fs)))))
    for p, q in zip(*runs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("checkpoint", [True, False], ids=["ckpt", "stored"])
def test_gradcheck_float64_cpu(checkpoint):
    B, L, D = 2, 5, 3
    x, a, b, c, h0 = (_leaf(t) for t in _inputs(B, L, D, F64, "cpu", True, True, True))

    def f(x, a, b, c, h0):
        return scan(x, a, b, c, initial_state=h0, return_final_state=True, checkpoint=checkpoint)

    assert torch.autograd.gradcheck(f, (x, a, b, c, h0))

    def g(x, a, h0):  # b = c = None
        return scan(x, a, None, None, initial_state=h0, return_final_state=True, checkpoint=checkpoint)

    assert torch.autograd.gradcheck(g, (x, a, h0))

    def h(x, a, c):  # no initial state, y only
        return scan(x, a, None, c, checkpoint=checkpoint)

    assert torch.autograd.gradcheck(h, (x, a, c))


# --------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------

OP_COMBOS = [  # (b, c, init, store_states, out_dtype, dtype)
    (False, False, False, False, None, F32),
    (True, True, True, False, None, F32),
    (True, False, True, True, F32, BF16),
    (False, True, False, True, BF16, F32),
    (True, True, True, True, None, F16),
]


@pytest.mark.parametrize("b_on,c_on,init_on,store,out_dtype,dtype", OP_COMBOS)
def test_opcheck_fwd(device, b_on, c_on, init_on, store, out_dtype, dtype):
    x, a, b, c, h0 = (_leaf(t) for t in _inputs(2, 11, 6, dtype, device, b_on, c_on, init_on))
    op = torch.ops.ssm_ext.scan_fwd.default
    torch.library.opcheck(op, schema_args(op, dict(x=x, a=a, b=b, c=c, initial_state=h0,
                                                    store_states=store, out_dtype=out_dtype)))


def test_opcheck_fwd_time_contiguous(device):
    """(B, D, L)-contiguous inputs: y and the chunk states keep x's layout (time steps contiguous),
    and the fake kernel says so too."""
    x, a = (_leaf(_time_major(t)) for t in _inputs(2, 70, 6, F32, device, False)[:2])
    y, _, _, cs = torch.ops.ssm_ext.scan_fwd(x, a, None, None, None, False, None)
    assert y.stride(1) == 1 and cs.shape == (2, 3, 6) and cs.stride(1) == 1
    op = torch.ops.ssm_ext.scan_fwd.default
    torch.library.opcheck(op, schema_args(op, dict(x=x, a=a, b=None, c=None, initial_state=None,
                                                    store_states=False, out_dtype=None)))


@pytest.mark.parametrize("b_on,c_on,init_on,store,out_dtype,dtype", OP_COMBOS)
def test_opcheck_bwd(device, b_on, c_on, init_on, store, out_dtype, dtype):
    x, a, b, c, h0 = _inputs(2, 11, 6, dtype, device, b_on, c_on, init_on)
    st, cs = torch.ops.ssm_ext.scan_fwd(x, a, b, c, h0, store, None)[2:]
    dy = torch.randn(2, 11, 6, device=device).to(dtype)
    dfs = torch.randn(2, 6, device=device) if init_on or store else None
    op = torch.ops.ssm_ext.scan_bwd.default
    torch.library.opcheck(op, schema_args(op, dict(x=x, a=a, b=b, c=c, initial_state=h0, states=st,
                                                    chunk_states=cs, dy=dy, dfinal_state=dfs)))


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------

class _ScanBlock(torch.nn.Module):
    def __init__(self, D, device):
        super().__init__()
        self.proj = torch.nn.Linear(D, 4 * D, device=device)

    def forward(self, u, h0):
        xs, ga, gb, c = self.proj(u).chunk(4, dim=-1)  # strided views into one buffer
        return scan(xs, torch.sigmoid(ga), torch.sigmoid(gb), c, initial_state=h0, return_final_state=True)


def test_compile_module_fwd_bwd(device):
    torch._dynamo.reset()
    B, L, D = 2, 19, 8
    eager = _ScanBlock(D, device)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    u0 = torch.randn(B, L, D, device=device)
    h00 = torch.randn(B, D, device=device)
    dy = torch.randn(B, L, D, device=device)
    dfs = torch.randn(B, D, device=device)
    res = []
    for m in (eager, compiled):
        u, h0 = u0.clone().requires_grad_(), h00.clone().requires_grad_()
        y, fs = m(u, h0)
        torch.autograd.backward((y, fs), (dy, dfs))
        params = model.proj if m is compiled else eager.proj
        res.append((y.detach(), fs.detach(), u.grad, h0.grad, params.weight.grad, params.bias.grad))
    for name, e, c in zip(["y", "final_state", "du", "dh0", "dW", "dbias"], *res):
        assert c is not None, name
        assert_rel(c, e, 1e-5, f"compiled {name}")
    # the eager path matches the reference
    with torch.no_grad():
        xs, ga, gb, c = eager.proj(u0).chunk(4, dim=-1)
    ry, rfs = ref.scan(_cpu(xs), torch.sigmoid(_cpu(ga).to(F64)), torch.sigmoid(_cpu(gb).to(F64)), _cpu(c),
                       _cpu(h00))
    assert_rel(res[0][0], ry, 1e-5, "eager y")


def test_compile_scan_step(device):
    torch._dynamo.reset()
    B, D = 3, 10
    compiled = torch.compile(lambda h, x, a, b, c: scan_step(h, x, a, b, c), fullgraph=True,
                             backend=COMPILE_BACKEND)
    h = torch.randn(B, D, device=device)
    for _ in range(3):
        x, a, b, c = torch.randn(B, D, device=device), _gate((B, D), F32, device), \
            torch.randn(B, D, device=device), torch.randn(B, D, device=device)
        y_e, h_e = scan_step(h, x, a, b, c)
        y_c, h_c = compiled(h, x, a, b, c)
        assert_rel(y_c, y_e, 1e-6, "compiled scan_step y")
        assert_rel(h_c, h_e, 1e-6, "compiled scan_step h")
        ry, rh = ref.scan_step(_cpu(h), _cpu(x), _cpu(a), _cpu(b), _cpu(c))
        assert_rel(y_e, ry, 1e-6, "scan_step y")
        assert_rel(h_e, rh, 1e-6, "scan_step h")
        h = h_e


# --------------------------------------------------------------------------------------
# scan_step (decode)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_scan_step_loop_equals_scan(device, dtype):
    B, L, D = 2, 23, 17
    x, a, b, c, h0 = _inputs(B, L, D, dtype, device, True, True, True)
    y_full, fs_full = _run(x, a, b, c, h0)
    h = h0.clone()
    ys = []
    for t in range(L):
        y_t, h = scan_step(h, x[:, t], a[:, t], b[:, t], c[:, t])
        assert y_t.shape == (B, D) and h.shape == (B, D)
        assert h.dtype == F32, f"scan_step state dtype {h.dtype}"
        assert y_t.dtype == dtype, f"scan_step y dtype {y_t.dtype}"
        ys.append(y_t)
    y_steps = torch.stack(ys, 1)
    assert_rel(y_steps, y_full, tol_for(dtype) / 10 if dtype != F32 else 1e-6, "scan_step loop y")
    assert_rel(h, fs_full, 1e-6, "scan_step loop final state")


def test_scan_step_prefill_then_decode(device):
    """Prefill with scan (final state), continue with scan_step: equals scanning everything."""
    B, L, D, P = 2, 30, 12, 21
    x, a, b, c, h0 = _inputs(B, L, D, F32, device, True, True, False)
    y_full = scan(x, a, b, c)
    y_pre, h = scan(x[:, :P], a[:, :P], b[:, :P], c[:, :P], return_final_state=True)
    ys = [y_pre]
    for t in range(P, L):
        y_t, h = scan_step(h, x[:, t], a[:, t], b[:, t], c[:, t])
        ys.append(y_t[:, None])
    assert_rel(torch.cat(ys, 1), y_full, 1e-6, "prefill + decode")


def test_scan_step_b_c_none(device):
    B, D = 2, 6
    h, x, a = torch.randn(B, D, device=device), torch.randn(B, D, device=device), _gate((B, D), F32, device)
    y_t, h_t = scan_step(h, x, a, None, None)
    ry, rh = ref.scan_step(_cpu(h), _cpu(x), _cpu(a), None, None)
    assert_rel(y_t, ry, 1e-6, "y")
    assert_rel(h_t, rh, 1e-6, "h")


# --------------------------------------------------------------------------------------
# the SSM layer
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mult,use_residual,use_norm", [(1.0, True, True), (2.0, False, False), (0.5, True, False)])
def test_ssm_layer(device, mult, use_residual, use_norm):
    from ssm_ext.quick_ssm.layers import SSM

    B, L, H = 2, 13, 24  # L not a power of two
    layer = SSM(hidden_size=H, state_size_mult=mult, compute_dtype=F32, device=device,
                use_residual=use_residual, use_norm=use_norm)
    x0 = torch.randn(B, L, H, device=device)
    dy = torch.randn(B, L, H, device=device)
    res = []
    for backend in ("auto", "torch"):
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        y = layer(x, backend=backend)
        assert y.shape == (B, L, H) and y.dtype == F32
        y.backward(dy)
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        res.append((y.detach(), x.grad, grads))
    (y_a, dx_a, g_a), (y_t, dx_t, g_t) = res
    assert_rel(y_a, y_t, 1e-5, "SSM output: op vs torch backend")
    assert_rel(dx_a, dx_t, 1e-5, "SSM dx: op vs torch backend")
    assert set(g_a) == set(g_t) and len(g_a) > 0
    for n in g_a:
        assert torch.isfinite(g_a[n]).all(), n
        assert_rel(g_a[n], g_t[n], 1e-4, f"SSM d{n}: op vs torch backend")
    n_nonzero = sum(int(g.abs().max().item() > 0) for g in g_a.values())
    assert n_nonzero == len(g_a), "some parameter got no gradient"


def test_ssm_layer_default_compute_dtype(device):
    """compute_dtype defaults to fp16: the scan runs on fp16 inputs and the output is close to the
    fp32-compute layer with the same weights."""
    from ssm_ext.quick_ssm.layers import SSM

    B, L, H = 2, 16, 32
    layer16 = SSM(hidden_size=H, device=device)
    layer32 = SSM(hidden_size=H, device=device, compute_dtype=F32)
    layer32.load_state_dict(layer16.state_dict())
    x = torch.randn(B, L, H, device=device)
    y16 = layer16(x)
    y32 = layer32(x)
    assert y16.shape == (B, L, H)
    assert_rel(y16, y32, 1e-2, "fp16-compute vs fp32-compute layer")
    y16.sum().backward()


def test_rmsnorm(device):
    from ssm_ext.quick_ssm.layers import RMSNorm

    H = 20
    norm = RMSNorm(H, eps=1e-5, device=device)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(H, device=device))
    x = torch.randn(3, 7, H, device=device)
    x64 = x.double()
    expect = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    assert_rel(norm(x), expect, 1e-6, "RMSNorm")


# --------------------------------------------------------------------------------------
# import-path twins
# --------------------------------------------------------------------------------------

def test_quick_ssm_twins():
    import ssm_ext.compat.quick_ssm as cq
    from ssm_ext.compat.quick_ssm import layers as clayers
    from ssm_ext.compat.quick_ssm import scan_interface
    from ssm_ext.quick_ssm import layers

    assert scan_interface.scan is qs.scan
    assert cq.scan is qs.scan
    assert clayers.SSM is layers.SSM and cq.SSM is layers.SSM
    assert clayers.RMSNorm is layers.RMSNorm and cq.RMSNorm is layers.RMSNorm


def test_accelerated_scan_twins():
    import ssm_ext.compat.accelerated_scan as acc
    from ssm_ext.compat.accelerated_scan import ref as acc_ref
    from ssm_ext.compat.accelerated_scan import scalar, warp

    assert callable(acc.scan)
    assert warp.scan is acc.scan and scalar.scan is acc.scan and acc_ref.scan is acc.scan


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("T", [1, 37, 64])
def test_accelerated_scan(device, T, dtype):
    """accelerated_scan.scan(gates, tokens) on (B, C, T): x_t = gates_t * x_{t-1} + tokens_t, and its
    gradients, vs the reference with b = c = None in the transposed layout."""
    from ssm_ext.compat.accelerated_scan import scan as acc_scan

    B, C = 2, 11
    gates = _gate((B, C, T), dtype, device).requires_grad_()
    tokens = torch.randn(B, C, T, device=device).to(dtype).requires_grad_()
    out = acc_scan(gates, tokens)
    assert out.shape == (B, C, T) and out.dtype == dtype and out.device == tokens.device
    rg = _cpu(gates).to(F64).requires_grad_()
    rt = _cpu(tokens).to(F64).requires_grad_()
    ry, _ = ref.scan(rt.transpose(1, 2), rg.transpose(1, 2), None, None)
    ry = ry.transpose(1, 2)
    assert_rel(out, ry, tol_for(dtype), "accelerated_scan out")
    g = torch.randn(B, C, T, device=device).to(dtype)
    out.backward(g)
    ry.backward(_cpu(g).to(F64))
    assert gates.grad.dtype == dtype and tokens.grad.dtype == dtype
    assert_rel(gates.grad, rg.grad, tol_for(dtype), "d gates")
    assert_rel(tokens.grad, rt.grad, tol_for(dtype), "d tokens")


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------

_B, _L, _D = 2, 10, 8
_A = r"\ba\b(?! \d+-D)"  # the argument `a`, not the article in "got a 2-D tensor"


def _args(device, **over):
    args = dict(
        x=torch.randn(_B, _L, _D, device=device),
        a=_gate((_B, _L, _D), F32, device),
        b=torch.randn(_B, _L, _D, device=device),
        c=torch.randn(_B, _L, _D, device=device),
        initial_state=None,
    )
    args.update(over)
    return args


BAD = {
    "a_wrong_D": (lambda d: dict(a=torch.rand(_B, _L, _D + 1, device=d)), _A),
    "a_wrong_L": (lambda d: dict(a=torch.rand(_B, _L - 1, _D, device=d)), _A),
    "b_wrong_shape": (lambda d: dict(b=torch.randn(_B + 1, _L, _D, device=d)), r"\bb\b"),
    "c_wrong_shape": (lambda d: dict(c=torch.randn(_B, _L, _D - 1, device=d)), r"\bc\b"),
    "x_a_2d": (lambda d: dict(x=torch.randn(_L, _D, device=d), a=torch.rand(_L, _D, device=d),
                              b=None, c=None), r"\bx\b"),
    "x_4d": (lambda d: dict(x=torch.randn(_B, _L, _D, 1, device=d), a=torch.rand(_B, _L, _D, 1, device=d),
                            b=None, c=None), r"\bx\b"),
    "a_2d": (lambda d: dict(a=torch.rand(_B, _D, device=d)), _A),
    "x_a_int": (lambda d: dict(x=torch.randint(0, 5, (_B, _L, _D), device=d),
                               a=torch.randint(0, 5, (_B, _L, _D), device=d), b=None, c=None), r"\bx\b"),
    "b_int": (lambda d: dict(b=torch.randint(0, 5, (_B, _L, _D), device=d)), r"\bb\b"),
    "a_f32_x_bf16": (lambda d: dict(x=torch.randn(_B, _L, _D, device=d, dtype=BF16),
                                    b=None, c=None), _A),
    "c_f16_x_f32": (lambda d: dict(c=torch.randn(_B, _L, _D, device=d, dtype=F16)), r"\bc\b"),
    "init_wrong_shape": (lambda d: dict(initial_state=torch.randn(_B, _D + 1, device=d)), "initial_state"),
    "init_3d": (lambda d: dict(initial_state=torch.randn(_B, 1, _D, device=d)), "initial_state"),
    "init_int": (lambda d: dict(initial_state=torch.zeros(_B, _D, dtype=torch.int32, device=d)), "initial_state"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_input(device, what):
    over, match = BAD[what]
    args = _args(device, **over(device))
    with pytest.raises(ERRORS, match=match):
        scan(args["x"], args["a"], args["b"], args["c"], initial_state=args["initial_state"],
             return_final_state=True)


@pytest.mark.parametrize("what", ["a_wrong_D", "x_a_2d", "a_f32_x_bf16", "init_wrong_shape"])
def test_bad_input_op(device, what):
    """The op checks its arguments itself (not only the Python wrapper)."""
    over, match = BAD[what]
    args = _args(device, **over(device))
    with pytest.raises(ERRORS, match=match):
        torch.ops.ssm_ext.scan_fwd(args["x"], args["a"], args["b"], args["c"], args["initial_state"], False, None)


def test_bad_backend_and_out_dtype(device):
    args = _args(device)
    with pytest.raises(ERRORS, match="backend"):
        scan(args["x"], args["a"], args["b"], args["c"], backend="triton_please")
    with pytest.raises(ERRORS, match="out_dtype"):
        scan(args["x"], args["a"], args["b"], args["c"], out_dtype=torch.int32)


@pytest.mark.parametrize("what,match", [("dy", r"\bdy\b"), ("dfinal_state", "dfinal_state"),
                                        ("states", "states"), ("chunk_states", "chunk_states")])
def test_bad_input_bwd(device, what, match):
    args = _args(device)
    x, a, b, c = args["x"], args["a"], args["b"], args["c"]
    dy = torch.randn(_B, _L, _D, device=device)
    dfs = torch.randn(_B, _D, device=device)
    st = cs = None
    if what == "dy":
        dy = torch.randn(_B, _L + 1, _D, device=device)
    elif what == "dfinal_state":
        dfs = torch.randn(_B, _D + 2, device=device)
    elif what == "states":
        st = torch.randn(_B, _L - 3, _D, device=device)
    else:
        cs = torch.randn(_B, _L, _D, device=device)
    with pytest.raises(ERRORS, match=match):
        torch.ops.ssm_ext.scan_bwd(x, a, b, c, None, st, cs, dy, dfs)


def test_bad_input_accelerated_scan(device):
    from ssm_ext.compat.accelerated_scan import scan as acc_scan

    with pytest.raises(ERRORS, match="gates|tokens"):
        acc_scan(torch.rand(2, 4, 9, device=device), torch.randn(2, 4, 8, device=device))
    with pytest.raises(ERRORS, match="gates|tokens"):
        acc_scan(torch.rand(4, 9, device=device), torch.randn(4, 9, device=device))


@pytest.mark.cuda
def test_bad_input_cuda_only():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    x = torch.randn(_B, _L, _D, device="cuda")
    a = _gate((_B, _L, _D), F32, "cuda")
    with pytest.raises(ERRORS, match=_A):
        scan(x, a.cpu(), None, None)
    with pytest.raises(ERRORS, match=r"\bb\b"):
        scan(x, a, torch.randn(_B, _L, _D), None)
    with pytest.raises(ERRORS, match="initial_state"):
        scan(x, a, None, None, initial_state=torch.randn(_B, _D))
    with pytest.raises(ERRORS, match=r"\bx\b"):
        scan(x.double(), a.double(), None, None)
