"""Tests of the ISSM scan family (SPEC.md section 3, issue 4).

Ground truth is ssm_ext.reference.issm (float64 loop over time). Every test runs on the CPU
and, when a GPU is present, on CUDA (the `cuda` parametrisation of `device`; kernels in
csrc/issm/issm_fwd.cu, issm_bwd.cu).

    delta = clamp(phi(dt + dt_bias), lo, hi);  s_t = exp(delta*A) s_{t-1} + delta*B_t x_t
    y_t = C_t . s_t + D x_t;  out = y * silu(z)
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

import ssm_ext  # noqa: F401  (registers torch.ops.ssm_ext.*)
from ssm_ext.issm import ISSM_chunk_scan_combined
from ssm_ext.norm import RMSNormGated
from ssm_ext.reference import issm as ref

from helpers import assert_rel, make_seq_idx, schema_args, tol_for


F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
ERRORS = (RuntimeError, ValueError, NotImplementedError, TypeError)
COMPILE_BACKEND = os.environ.get("SSM_EXT_COMPILE_BACKEND", "inductor")
DIFF = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
OPT_KEYS = ["D", "z", "dt_bias", "initial_states", "seq_idx", "cu_seqlens"]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def _cpu(t):
    return None if t is None else t.detach().cpu()


def _make(b, L, H, G, P, N, dtype=F32, device="cpu", *, D=None, z=False, dt_bias=None, init=False,
          softplus=False, param_dtype=F32, nseq=None):
    """Op inputs by name. D: None, "h" (H,) or "hp" (H, P); dt_bias: None, "h" or "hn".
    A, D, dt_bias and initial_states are in param_dtype (parameters are often fp32)."""
    def rnd(*s, dt_=dtype):
        return torch.randn(*s, device=device).to(dt_)
    # dt near 0.1..0.6 after the optional softplus, so the decay over a few dozen steps stays visible
    dt = (torch.randn(b, L, H, N, device=device) - 1.0) if softplus else \
        (0.05 + 0.5 * torch.rand(b, L, H, N, device=device))
    inp = dict(
        x=rnd(b, L, H, P), dt=dt.to(dtype),
        A=(-torch.exp(torch.rand(H, N, device=device))).to(param_dtype),
        B=rnd(b, L, G, N), C=rnd(b, L, G, N),
        D=None if D is None else rnd(*((H,) if D == "h" else (H, P)), dt_=param_dtype),
        z=rnd(b, L, H, P) if z else None,
        dt_bias=None if dt_bias is None else (0.3 * torch.randn(*((H,) if dt_bias == "h" else (H, N)),
                                                                device=device)).to(param_dtype),
        initial_states=rnd(b if nseq is None else nseq, H, P, N, dt_=param_dtype) if init else None,
        seq_idx=None, cu_seqlens=None,
    )
    return inp


def _call(inp, chunk_size=64, ret_final=True, **opts):
    return ISSM_chunk_scan_combined(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size,
                                    **{k: inp[k] for k in OPT_KEYS}, return_final_states=ret_final, **opts)


def _ref(inp, **opts):
    return ref.issm_chunk_scan(**{k: _cpu(v) for k, v in inp.items()}, **opts)


def _check_fwd(inp, chunk_size=64, tol=None, **opts):
    x = inp["x"]
    out, fs = _call(inp, chunk_size, True, **opts)
    r_out, r_fs = _ref(inp, **opts)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert fs.shape == r_fs.shape, f"final_states shape {tuple(fs.shape)}"
    assert fs.dtype == (F64 if x.dtype == F64 else F32), f"final_states dtype {fs.dtype}"
    assert_rel(out, r_out, tol if tol is not None else tol_for(x.dtype), "out")
    # the state is accumulated and returned in fp32 whatever the input dtype
    assert_rel(fs, r_fs, 1e-10 if x.dtype == F64 else 1e-5, "final_states")
    return out, fs


def _check_grads(inp, tol=None, chunk_size=32, out_grad=True, final_grad=True, **opts):
    """Gradients of every differentiable input through the op vs autograd through the reference."""
    names = [k for k in DIFF if inp[k] is not None]
    leaves = {k: (v.detach().clone().requires_grad_() if k in names else v) for k, v in inp.items()}
    out, fs = _call(leaves, chunk_size, True, **opts)
    dout = torch.randn(out.shape, device=out.device).to(out.dtype)
    dfs = torch.randn(fs.shape, device=fs.device)
    outs, gos = [], []
    if out_grad:
        outs.append(out), gos.append(dout)
    if final_grad:
        outs.append(fs), gos.append(dfs)
    grads = torch.autograd.grad(outs, [leaves[k] for k in names], gos, allow_unused=True)

    rleaves = {k: (_cpu(v).to(F64).requires_grad_() if k in names else _cpu(v)) for k, v in inp.items()}
    r_out, r_fs = ref.issm_chunk_scan(**rleaves, **opts)
    routs, rgos = [], []
    if out_grad:
        routs.append(r_out), rgos.append(_cpu(dout).to(F64))
    if final_grad:
        routs.append(r_fs), rgos.append(_cpu(dfs).to(F64))
    rgrads = torch.autograd.grad(routs, [rleaves[k] for k in names], rgos, allow_unused=True)
    for name, g, rg in zip(names, grads, rgrads):
        t = inp[name]
        assert g is not None, f"d{name} is None"
        assert g.shape == t.shape and g.dtype == t.dtype, f"d{name}: {tuple(g.shape)} {g.dtype} for {t.dtype}"
        if rg is None or rg.abs().max().item() == 0.0:
            assert g.abs().max().item() == 0.0, f"d{name} should be zero"
        else:
            assert_rel(g, rg, tol if tol is not None else tol_for(t.dtype), f"d{name}")
    return dict(zip(names, grads))


# --------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("softplus", [False, True], ids=["nosoftplus", "softplus"])
@pytest.mark.parametrize("init", [False, True], ids=["noinit", "init"])
@pytest.mark.parametrize("dt_bias", [None, "h", "hn"], ids=["nobias", "bias_h", "bias_hn"])
@pytest.mark.parametrize("z", [False, True], ids=["noz", "z"])
@pytest.mark.parametrize("D", [None, "h", "hp"], ids=["noD", "D_h", "D_hp"])
def test_fwd_options(device, D, z, dt_bias, init, softplus):
    inp = _make(2, 37, 4, 2, 5, 6, F32, device, D=D, z=z, dt_bias=dt_bias, init=init, softplus=softplus)
    _check_fwd(inp, 16, dt_softplus=softplus)


@pytest.mark.parametrize("ret_final", [False, True])
def test_fwd_return_type(device, ret_final):
    inp = _make(1, 9, 2, 1, 3, 4, F32, device, init=True)
    res = _call(inp, 64, ret_final)
    if ret_final:
        assert isinstance(res, tuple) and len(res) == 2
    else:
        assert isinstance(res, torch.Tensor)
        assert_rel(res, _ref(inp)[0], 1e-5, "out")


@pytest.mark.parametrize("params_in_input_dtype", [False, True], ids=["params_f32", "params_same"])
@pytest.mark.parametrize("all_on", [False, True], ids=["plain", "allopts"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_fwd_dtypes(device, dtype, all_on, params_in_input_dtype):
    pd = dtype if params_in_input_dtype else F32
    inp = _make(2, 45, 4, 2, 8, 16, dtype, device, D="hp" if all_on else None, z=all_on,
                dt_bias="hn" if all_on else None, init=all_on, softplus=all_on, param_dtype=pd)
    _check_fwd(inp, 32, dt_softplus=all_on, dt_limit=(0.05, 2.0) if all_on else (0.0, float("inf")))


def test_fwd_float64_cpu():
    inp = _make(2, 20, 2, 1, 3, 5, F64, "cpu", D="hp", z=True, dt_bias="h", init=True, softplus=True,
                param_dtype=F64)
    _check_fwd(inp, 8, dt_softplus=True)


SIZES = [  # (b, L, H, G, P, N)
    (1, 1, 1, 1, 1, 1),      # L = 1, everything 1
    (2, 3, 2, 2, 4, 3),      # L = 3, G = H
    (1, 17, 4, 1, 7, 5),     # L prime, odd P
    (2, 33, 6, 3, 2, 9),     # G = 3, 2 heads per group
    (1, 20, 2, 1, 4, 256),   # N = 256
    (1, 9, 2, 2, 3, 300),    # N > 256
    (2, 130, 2, 1, 3, 4),    # longer than one checkpoint block in the backward
]


@pytest.mark.parametrize("b,L,H,G,P,N", SIZES)
def test_fwd_sizes(device, b, L, H, G, P, N):
    inp = _make(b, L, H, G, P, N, F32, device, D="hp", z=True, dt_bias="hn", init=True)
    _check_fwd(inp, 16)


@pytest.mark.parametrize("L", [1, 15, 16, 17, 100, 300])
def test_results_do_not_depend_on_chunk_size(device, L):
    """chunk_size is a tuning hint: 16..256, also not dividing L, give the reference's result
    (bitwise the same on the CPU, where it is not used)."""
    inp = _make(1, L, 2, 1, 4, 8, F32, device, D="h", z=True, dt_bias="h", init=True)
    results = [_check_fwd(inp, cs) for cs in (16, 32, 64, 100, 128, 256)]
    for out, fs in results[1:]:
        if device == "cpu":
            assert torch.equal(out, results[0][0]) and torch.equal(fs, results[0][1])
        else:
            assert_rel(out, results[0][0], 1e-6, "out vs chunk_size 16")


def test_fwd_empty(device):
    """L = 0: out is empty and the final states are the initial states (or 0); batch 0 works."""
    inp = _make(2, 0, 2, 1, 3, 4, F32, device, init=True, D="h", z=True)
    out, fs = _call(inp)
    assert out.shape == (2, 0, 2, 3) and torch.equal(fs, inp["initial_states"])
    inp["initial_states"] = None
    out, fs = _call(inp)
    assert fs.shape == (2, 2, 3, 4) and fs.abs().max().item() == 0.0
    inp = _make(0, 5, 2, 1, 3, 4, F32, device, init=True)
    out, fs = _call(inp)
    assert out.shape == (0, 5, 2, 3) and fs.shape == (0, 2, 3, 4)


def test_fwd_noncontiguous(device):
    """Strided views as the DEST3D / StreamPETR layers pass them: x and z split from one
    projection, dt permuted, B and C transposed, initial_states rearranged from queries,
    A broadcast over the states (stride 0), D strided."""
    b, L, H, G, P, N = 2, 29, 4, 2, 6, 10
    proj = torch.randn(b, L, 2 * H * P + 3, device=device)
    inp = dict(
        x=proj[..., :H * P].view(b, L, H, P),
        z=proj[..., H * P:2 * H * P].view(b, L, H, P),
        dt=(0.05 + 0.5 * torch.rand(b, L, N, H, device=device)).permute(0, 1, 3, 2),
        A=(-torch.exp(torch.rand(H, 1, device=device))).expand(H, N),
        B=torch.randn(b, L, N, G, device=device).transpose(-1, -2),
        C=torch.randn(b, N, L, G, device=device).permute(0, 2, 3, 1),
        D=torch.randn(2 * H, device=device)[::2],
        dt_bias=torch.randn(H, 2 * N, device=device)[:, ::2] * 0.3,
        initial_states=torch.randn(b, N, H * P, device=device).view(b, N, H, P).permute(0, 2, 3, 1),
        seq_idx=None, cu_seqlens=None,
    )
    assert not inp["x"].is_contiguous() and not inp["dt"].is_contiguous()
    before = {k: v.clone() for k, v in inp.items() if v is not None}
    _check_fwd(inp, 16)
    _check_grads(inp)
    for k, v in before.items():
        assert torch.equal(inp[k], v), f"{k} was modified"


# --------------------------------------------------------------------------------------
# dt: softplus and the clamp
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("softplus", [False, True])
@pytest.mark.parametrize("limit", [(0.2, 0.4), (0.3, float("inf")), (0.0, 0.25), (0.3, 0.3)])
def test_dt_limit(device, limit, softplus):
    """The clamp is applied after softplus and the bias; gradients are zero where it clips."""
    inp = _make(2, 31, 2, 1, 3, 8, F32, device, dt_bias="hn", init=True, softplus=softplus)
    _check_fwd(inp, 16, dt_softplus=softplus, dt_limit=limit)
    grads = _check_grads(inp, dt_softplus=softplus, dt_limit=limit)
    v = inp["dt"] + inp["dt_bias"]
    if softplus:
        v = F.softplus(v)
    clipped = (v < limit[0]) | (v > limit[1])
    if clipped.any():
        assert grads["dt"][clipped].abs().max().item() == 0.0, "ddt not zero where dt is clipped"


def test_softplus_threshold(device):
    """softplus is the identity above 20 (torch's threshold), in value and gradient."""
    inp = _make(1, 12, 2, 1, 3, 6, F32, device, init=True)
    inp["dt"] = (18.0 + 4.0 * torch.rand(1, 12, 2, 6, device=device))  # both sides of 20
    inp["A"] = -0.01 * torch.rand(2, 6, device=device)
    _check_fwd(inp, 16, dt_softplus=True)
    _check_grads(inp, dt_softplus=True)


# --------------------------------------------------------------------------------------
# seq_idx and cu_seqlens
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("init", [False, True], ids=["noinit", "init"])
def test_seq_idx_resets(device, init):
    b, L = 3, 60
    inp = _make(b, L, 4, 2, 3, 5, F32, device, D="hp", z=True, dt_bias="h", init=init)
    inp["seq_idx"] = make_seq_idx(b, L, device=device, padding=True, max_run=9)
    _check_fwd(inp, 16)
    _check_grads(inp)


def test_seq_idx_equals_separate_sequences(device):
    """A row with seq_idx [0]*a + [1]*c equals scanning its two pieces separately, the second
    from a zero state; the final state is the second piece's."""
    a, c = 13, 20
    inp = _make(1, a + c, 2, 1, 3, 4, F32, device, D="h", init=True)
    inp["seq_idx"] = torch.tensor([[0] * a + [1] * c], dtype=torch.int32, device=device)
    out, fs = _call(inp)

    def piece(sl, init):
        sub = {k: (v[:, sl] if k in ("x", "dt", "B", "C") and v is not None else v) for k, v in inp.items()}
        sub["seq_idx"] = None
        sub["initial_states"] = init
        return _call(sub)

    o1, _ = piece(slice(0, a), inp["initial_states"])
    o2, f2 = piece(slice(a, a + c), None)
    assert torch.equal(out, torch.cat([o1, o2], 1)) and torch.equal(fs, f2)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("init", [False, True], ids=["noinit", "init"])
def test_cu_seqlens(device, init, idx_dtype):
    lens = [5, 0, 1, 17, 9]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=idx_dtype, device=device)
    T = sum(lens)
    inp = _make(1, T, 4, 2, 3, 6, F32, device, D="hp", z=True, dt_bias="hn", init=init, nseq=len(lens))
    inp["cu_seqlens"] = cu
    out, fs = _check_fwd(inp, 16)
    assert fs.shape == (len(lens), 4, 3, 6)
    _check_grads(inp)
    # each sequence alone, from its own initial state, gives the same out and final state
    for i, n in enumerate(lens):
        s = int(cu[i])
        sub = {k: (v[:, s:s + n] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
        sub["cu_seqlens"] = None
        sub["initial_states"] = None if not init else inp["initial_states"][i:i + 1]
        o_i, f_i = _call(sub)
        assert_rel(out[:, s:s + n], o_i, 1e-6, f"sequence {i} out")
        assert_rel(fs[i:i + 1], f_i, 1e-6, f"sequence {i} final state")


def test_cu_seqlens_with_seq_idx(device):
    """Both: every packed sequence starts from its initial state, and seq_idx changes inside a
    sequence reset the state as well."""
    cu = torch.tensor([0, 12, 30], dtype=torch.int32, device=device)
    inp = _make(1, 30, 2, 1, 3, 4, F32, device, D="h", init=True, nseq=2)
    inp["cu_seqlens"] = cu
    inp["seq_idx"] = torch.tensor([[0] * 7 + [1] * 5 + [1] * 10 + [2] * 8], dtype=torch.int32, device=device)
    _check_fwd(inp, 16)
    _check_grads(inp)


# --------------------------------------------------------------------------------------
# several chunks and tiles (the CUDA kernels chunk L by 64 or 128 steps, tile P by up to 64
# and N by up to 256): state passing across chunks, resets and sequence starts inside and on
# chunk boundaries, P and N tails
# --------------------------------------------------------------------------------------

MULTI = [  # (b, L, H, G, P, N)
    (2, 300, 2, 1, 36, 20),    # 5 chunks of 64 (3 of 128), P = 36 tail of a warp's 4
    (1, 200, 3, 3, 70, 9),     # two p-tiles (70 > 64)
    (1, 140, 2, 1, 3, 260),    # two n-tiles (260 > 256)
    (1, 129, 4, 2, 5, 33),     # one step into a second chunk; N just above a warp's 32
]


@pytest.mark.parametrize("b,L,H,G,P,N", MULTI)
def test_multi_chunk_fwd_bwd(device, b, L, H, G, P, N):
    inp = _make(b, L, H, G, P, N, F32, device, D="hp", z=True, dt_bias="hn", init=True, softplus=True)
    inp["A"] = inp["A"] * 0.1  # keep the state alive across chunks
    _check_fwd(inp, 64, dt_softplus=True)
    _check_grads(inp, dt_softplus=True)


def test_multi_chunk_resets_on_boundaries(device):
    """seq_idx changes exactly at, just before and just after chunk boundaries (64, 128)."""
    b, L = 2, 260
    inp = _make(b, L, 2, 1, 6, 10, F32, device, D="h", z=True, dt_bias="h", init=True)
    inp["A"] = inp["A"] * 0.1
    ids = torch.zeros(b, L, dtype=torch.int32)
    for cut in (63, 64, 128, 129, 200):
        ids[0, cut:] += 1
    for cut in (1, 65, 127, 255):
        ids[1, cut:] += 1
    ids[1, 150:170] = -1
    inp["seq_idx"] = ids.to(device)
    _check_fwd(inp, 64)
    _check_grads(inp)


@pytest.mark.parametrize("init", [False, True], ids=["noinit", "init"])
def test_multi_chunk_cu_seqlens(device, init):
    """Packed sequences spanning chunk boundaries, empty ones among them, with seq_idx too."""
    lens = [70, 0, 64, 1, 0, 130, 15]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    T = sum(lens)
    inp = _make(1, T, 2, 1, 5, 12, F32, device, D="hp", z=True, dt_bias="hn", init=init, nseq=len(lens))
    inp["A"] = inp["A"] * 0.1
    inp["cu_seqlens"] = cu
    ids = torch.zeros(1, T, dtype=torch.int32)
    ids[0, 100:] = 1
    ids[0, 190:] = 2
    inp["seq_idx"] = ids.to(device)
    _, fs = _check_fwd(inp, 64)
    if init:  # empty sequences return their initial state
        assert torch.equal(fs[1], inp["initial_states"][1].float()) and torch.equal(fs[4], inp["initial_states"][4].float())
    _check_grads(inp)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_multi_chunk_dest3d_shape(device, dtype):
    """DEST3D's layer shape at a shorter L: P = 36, N = 128, initial and final states."""
    inp = _make(2, 200, 4, 1, 36, 128, dtype, device, init=True)
    _check_fwd(inp, 128)
    _check_grads(inp, chunk_size=128)


def test_deterministic_multi_chunk(device):
    """Bitwise the same outputs and gradients on a second call, with several chunks, p- and
    n-tiles, resets and packed sequences (the CUDA partial sums all have a fixed order)."""
    lens = [150, 0, 90]
    cu = torch.tensor([0, 150, 150, 240], dtype=torch.int32, device=device)
    inp = _make(1, 240, 4, 2, 66, 40, F32, device, D="h", z=True, dt_bias="hn", init=True, softplus=True,
                nseq=len(lens))
    inp["cu_seqlens"] = cu
    inp["seq_idx"] = torch.tensor([[0] * 100 + [1] * 140], dtype=torch.int32, device=device)
    names = [k for k in DIFF if inp[k] is not None]
    runs = []
    for _ in range(2):
        leaves = {k: (v.clone().requires_grad_() if k in names else v) for k, v in inp.items()}
        out, fs = _call(leaves, dt_softplus=True)
        g = torch.autograd.grad((out, fs), [leaves[k] for k in names], (torch.ones_like(out), torch.ones_like(fs)))
        runs.append((out, fs, *g))
    for p, q in zip(*runs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("opts,dtype", [("plain", F32), ("all_but_z", F32), ("cu_seqlens", F32), ("all_but_z", BF16)])
def test_bwd_from_chunk_states(device, opts, dtype):
    """Without z the CUDA forward returns its chunk states (the state entering each 64-step chunk
    and the decay products) and the backward starts from them instead of recomputing the forward:
    its gradients equal the recomputing backward's bitwise. The CPU returns none (it recomputes).
    Wrong chunk_states, or chunk_states with z, are refused by name."""
    if opts == "cu_seqlens":
        inp = _make(1, 200, 3, 1, 5, 12, dtype, device, D="h", init=True, nseq=3)
        inp["cu_seqlens"] = torch.tensor([0, 70, 70, 200], dtype=torch.int32, device=device)
    else:
        inp = _make(2, 150, 3, 1, 5, 12, dtype, device, **({} if opts == "plain" else
                                                           dict(D="hp", dt_bias="hn", init=True, softplus=True)))
    op_f, op_b = torch.ops.ssm_ext.issm_fwd.default, torch.ops.ssm_ext.issm_bwd.default
    v = dict(inp, chunk_size=64, dt_softplus=opts == "all_but_z", dt_limit_lo=0.0, dt_limit_hi=float("inf"),
             return_final_states=True)
    out, fs, cs = op_f(*schema_args(op_f, v))
    b, L, H, P = inp["x"].shape
    assert cs.dtype == F32 and cs.numel() == (b * ((L + 63) // 64) * H * (P + 1) * 12 if device == "cuda" else 0)
    v.update(dout=torch.randn_like(out), dfinal_states=torch.randn_like(fs))  # bf16 dout: gy is its fp32 copy
    recomputed = op_b(*schema_args(op_b, dict(v, chunk_states=None)))
    reused = op_b(*schema_args(op_b, dict(v, chunk_states=cs)))
    for i, (a, r) in enumerate(zip(recomputed, reused)):
        assert torch.equal(a, r), f"gradient {i} differs when the backward starts from chunk_states"
    if device == "cuda":
        with pytest.raises(ERRORS, match=r"chunk_states must be the float32"):
            op_b(*schema_args(op_b, dict(v, chunk_states=cs[:-1])))
        with pytest.raises(ERRORS, match=r"chunk_states: .* z was given"):
            op_b(*schema_args(op_b, dict(v, chunk_states=cs, z=torch.randn_like(inp["x"]))))


@pytest.mark.cuda
def test_cuda_graph_capture():
    """Forward and backward run inside a CUDA graph (no host syncs, current stream) and replay
    to the eager results."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    inp = _make(1, 130, 2, 1, 5, 12, F32, "cuda", D="hp", z=True, dt_bias="h", init=True, nseq=3)
    inp["cu_seqlens"] = torch.tensor([0, 70, 70, 130], dtype=torch.int32, device="cuda")
    op_f, op_b = torch.ops.ssm_ext.issm_fwd.default, torch.ops.ssm_ext.issm_bwd.default
    v = dict(inp, chunk_size=64, dt_softplus=True, dt_limit_lo=0.0, dt_limit_hi=float("inf"),
             return_final_states=True)
    v["dout"] = torch.randn_like(inp["x"])
    v["dfinal_states"] = torch.randn(3, 2, 5, 12, device="cuda")
    v["chunk_states"] = None
    eager = (*op_f(*schema_args(op_f, v)), *op_b(*schema_args(op_b, v)))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graph wants
        op_f(*schema_args(op_f, v)), op_b(*schema_args(op_b, v))
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = (*op_f(*schema_args(op_f, v)), *op_b(*schema_args(op_b, v)))
    g.replay()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(eager, captured)):
        assert torch.equal(a, b), f"result {i} differs after graph replay"


# --------------------------------------------------------------------------------------
# the Mamba-2 case: dt and A constant over the states
# --------------------------------------------------------------------------------------

def _ssd_direct(x, dt, A, B, C, D, h0):
    """Mamba-2's SSD in its quadratic (attention-like) form, float64:
    y_t = sum_{s<=t} (C_t.B_s) exp(sum_{r=s+1..t} dt_r A) dt_s x_s + exp(sum_{r<=t} dt_r A) C_t.h0 + D x_t.
    x (b,L,H,P), dt (b,L,H), A (H,), B, C (b,L,G,N), D (H,), h0 (b,H,P,N)."""
    H = x.shape[2]
    rep = H // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)
    cs = torch.cumsum(dt * A, 1)                                      # (b, L, H)
    seg = cs[:, :, None, :] - cs[:, None, :, :]                       # (b, t, s, H)
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()[None, :, :, None]
    decay = torch.exp(seg.masked_fill(~causal, float("-inf")))
    scores = torch.einsum("bthn,bshn->btsh", Ch, Bh) * decay
    y = torch.einsum("btsh,bsh,bshp->bthp", scores, dt, x)
    y = y + torch.einsum("bthn,bhpn,bth->bthp", Ch, h0, torch.exp(cs)) + D[:, None] * x
    last = torch.exp(cs[:, -1:, :] - cs)                              # (b, s, H)
    final = torch.einsum("bsh,bsh,bshn,bshp->bhpn", last, dt, Bh, x) + torch.exp(cs[:, -1])[..., None, None] * h0
    return y, final


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_mamba2_case(device, dtype):
    b, L, H, G, P, N = 2, 70, 4, 2, 8, 16
    x = torch.randn(b, L, H, P, device=device).to(dtype)
    dt_h = (0.05 + 0.3 * torch.rand(b, L, H, device=device)).to(dtype)
    A_h = -torch.exp(torch.rand(H, device=device))
    B = torch.randn(b, L, G, N, device=device).to(dtype)
    C = torch.randn(b, L, G, N, device=device).to(dtype)
    D = torch.randn(H, device=device)
    h0 = torch.randn(b, H, P, N, device=device)
    # dt and A enter as (.., N) views with stride 0 over the states
    out, fs = ISSM_chunk_scan_combined(x, dt_h[..., None].expand(b, L, H, N), A_h[:, None].expand(H, N), B, C,
                                       chunk_size=32, D=D, initial_states=h0, return_final_states=True)
    y, final = _ssd_direct(*(_cpu(t).to(F64) for t in (x, dt_h, A_h, B, C, D, h0)))
    assert_rel(out, y, tol_for(dtype), "out vs SSD")
    assert_rel(fs, final, 1e-5, "final_states vs SSD")


# --------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("softplus", [False, True], ids=["nosoftplus", "softplus"])
@pytest.mark.parametrize("z,init", [(False, False), (True, True)], ids=["plain", "z_init"])
@pytest.mark.parametrize("dt_bias", [None, "h", "hn"], ids=["nobias", "bias_h", "bias_hn"])
@pytest.mark.parametrize("D", [None, "h", "hp"], ids=["noD", "D_h", "D_hp"])
def test_bwd_options(device, D, dt_bias, z, init, softplus):
    inp = _make(2, 37, 4, 2, 5, 6, F32, device, D=D, z=z, dt_bias=dt_bias, init=init, softplus=softplus)
    _check_grads(inp, dt_softplus=softplus, dt_limit=(0.01, 5.0))


@pytest.mark.parametrize("out_grad,final_grad", [(True, False), (False, True)], ids=["out_only", "final_only"])
def test_bwd_one_output(device, out_grad, final_grad):
    inp = _make(2, 21, 2, 1, 3, 4, F32, device, D="hp", z=True, dt_bias="hn", init=True)
    _check_grads(inp, out_grad=out_grad, final_grad=final_grad)


@pytest.mark.parametrize("dtype", [F16, BF16])
def test_bwd_half_dtypes(device, dtype):
    inp = _make(2, 40, 4, 2, 8, 16, dtype, device, D="hp", z=True, dt_bias="h", init=True, softplus=True)
    _check_grads(inp, dt_softplus=True)


@pytest.mark.parametrize("b,L,H,G,P,N", [s for s in SIZES if s[5] <= 256])
def test_bwd_sizes(device, b, L, H, G, P, N):
    inp = _make(b, L, H, G, P, N, F32, device, D="h", z=True, dt_bias="hn", init=True)
    _check_grads(inp)


def test_bwd_empty_sequence(device):
    """L = 0: dinitial_states is dfinal_states; the other gradients are empty or zero."""
    inp = _make(2, 0, 2, 1, 3, 4, F32, device, init=True, D="hp", dt_bias="hn")
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inp.items()}
    out, fs = _call(leaves)
    dfs = torch.randn_like(fs)
    d0, dA, dD = torch.autograd.grad(fs, [leaves["initial_states"], leaves["A"], leaves["D"]], dfs)
    assert torch.equal(d0, dfs) and dA.abs().max().item() == 0 and dD.abs().max().item() == 0


def test_deterministic_and_thread_count_independent(device):
    inp = _make(2, 50, 4, 2, 4, 8, BF16, device, D="hp", z=True, dt_bias="hn", init=True, softplus=True)
    names = [k for k in DIFF if inp[k] is not None]
    runs = []
    threads = torch.get_num_threads()
    for n in ([1, max(2, threads)] if device == "cpu" else [threads, threads]):
        torch.set_num_threads(n)
        try:
            leaves = {k: (v.clone().requires_grad_() if k in names else v) for k, v in inp.items()}
            out, fs = _call(leaves, dt_softplus=True)
            g = torch.autograd.grad((out, fs), [leaves[k] for k in names], (torch.ones_like(out), torch.ones_like(fs)))
            runs.append((out, fs, *g))
        finally:
            torch.set_num_threads(threads)
    for p, q in zip(*runs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", ["all", "seq_idx", "cu_seqlens", "clamped"])
def test_gradcheck_float64_cpu(case):
    kw = dict(D="hp", z=True, dt_bias="hn", init=True, softplus=True, param_dtype=F64)
    nseq = 3 if case == "cu_seqlens" else None
    inp = _make(1 if case == "cu_seqlens" else 2, 7, 2, 1, 2, 3, F64, "cpu", nseq=nseq,
                **(dict(kw, D="h", dt_bias="h") if case == "seq_idx" else kw))
    if case == "seq_idx":
        inp["seq_idx"] = torch.tensor([[0, 0, 1, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1, 1]], dtype=torch.int32)
    if case == "cu_seqlens":
        inp["cu_seqlens"] = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    limit = (0.35, 0.9) if case == "clamped" else (0.0, float("inf"))
    names = [k for k in DIFF if inp[k] is not None]
    leaves = [inp[k].clone().requires_grad_() for k in names]

    def f(*ts):
        d = dict(inp, **dict(zip(names, ts)))
        return _call(d, 4, True, dt_softplus=True, dt_limit=limit)

    assert torch.autograd.gradcheck(f, leaves)


# --------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------

OP_CASES = {  # name: (make kwargs, dtype, seq_idx, cu_seqlens, softplus, ret_final)
    "plain": (dict(), F32, False, False, False, False),
    "all": (dict(D="hp", z=True, dt_bias="hn", init=True), F32, False, False, True, True),
    "seq_idx_bf16": (dict(D="h", dt_bias="h", init=True), BF16, True, False, True, True),
    "cu_seqlens": (dict(D="hp", z=True, init=True, nseq=3), F32, False, True, False, True),
}


def _op_values(device, case, requires_grad):
    kw, dtype, use_seq, use_cu, softplus, ret_final = OP_CASES[case]
    b = 1 if use_cu else 2
    inp = _make(b, 11, 2, 1, 3, 4, dtype, device, softplus=softplus, **kw)
    if use_seq:
        inp["seq_idx"] = make_seq_idx(b, 11, device=device)
    if use_cu:
        inp["cu_seqlens"] = torch.tensor([0, 4, 4, 11], dtype=torch.int32, device=device)
    if requires_grad:
        inp = {k: (v.requires_grad_() if k in DIFF and v is not None else v) for k, v in inp.items()}
    return dict(inp, chunk_size=8, dt_softplus=softplus, dt_limit_lo=0.0, dt_limit_hi=float("inf"),
                return_final_states=ret_final)


@pytest.mark.parametrize("case", list(OP_CASES))
def test_opcheck_fwd(device, case):
    op = torch.ops.ssm_ext.issm_fwd.default
    torch.library.opcheck(op, schema_args(op, _op_values(device, case, True)))


@pytest.mark.parametrize("case", ["all", "cu_seqlens"])
def test_opcheck_bwd(device, case):
    v = _op_values(device, case, False)
    x = v["x"]
    nseq = 3 if v["cu_seqlens"] is not None else x.shape[0]
    v["dout"] = torch.randn_like(x)
    v["dfinal_states"] = torch.randn(nseq, x.shape[2], x.shape[3], v["B"].shape[3], device=device)
    v["chunk_states"] = None
    op = torch.ops.ssm_ext.issm_bwd.default
    torch.library.opcheck(op, schema_args(op, v))


# --------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------

class _ISSMBlock(torch.nn.Module):
    """Projection -> ISSM scan (softplus dt with a bias, D, initial states) -> gated RMSNorm."""

    def __init__(self, d_model, H, P, G, N, device):
        super().__init__()
        self.H, self.P, self.G, self.N = H, P, G, N
        self.proj = torch.nn.Linear(d_model, 2 * H * P + H * N + 2 * G * N, device=device)
        self.A_log = torch.nn.Parameter(torch.rand(H, N, device=device))
        self.D = torch.nn.Parameter(torch.ones(H, device=device))
        self.dt_bias = torch.nn.Parameter(torch.randn(H, device=device) * 0.1)
        self.norm = RMSNormGated(H * P, group_size=P, norm_before_gate=False, device=device)

    def forward(self, u, h0):
        b, L, _ = u.shape
        H, P, G, N = self.H, self.P, self.G, self.N
        x, z, dt, B, C = torch.split(self.proj(u), [H * P, H * P, H * N, G * N, G * N], dim=-1)
        y, fs = ISSM_chunk_scan_combined(
            x.view(b, L, H, P), dt.view(b, L, H, N), -torch.exp(self.A_log), B.view(b, L, G, N),
            C.view(b, L, G, N), chunk_size=16, D=self.D, dt_bias=self.dt_bias, initial_states=h0,
            dt_softplus=True, return_final_states=True)
        return self.norm(y.reshape(b, L, H * P), z), fs


def test_compile_module_fwd_bwd(device):
    torch._dynamo.reset()
    b, L, d, H, P, G, N = 2, 19, 16, 2, 4, 1, 8
    eager = _ISSMBlock(d, H, P, G, N, device)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    u0 = torch.randn(b, L, d, device=device)
    h00 = torch.randn(b, H, P, N, device=device)
    dy, dfs = torch.randn(b, L, H * P, device=device), torch.randn(b, H, P, N, device=device)
    res = []
    for m, params in ((eager, eager), (compiled, model)):
        u, h0 = u0.clone().requires_grad_(), h00.clone().requires_grad_()
        y, fs = m(u, h0)
        torch.autograd.backward((y, fs), (dy, dfs))
        res.append([y.detach(), fs.detach(), u.grad, h0.grad] + [p.grad for p in params.parameters()])
    for i, (e, c) in enumerate(zip(*res)):
        assert c is not None, i
        assert_rel(c, e, 1e-5, f"compiled result {i}")


# --------------------------------------------------------------------------------------
# import-path twins and DEST3D's call
# --------------------------------------------------------------------------------------

def test_issm_triton_twins():
    import ssm_ext.compat.issm_triton as twin
    from ssm_ext.compat.issm_triton.issm_combined import ISSM_chunk_scan_combined as fn
    from ssm_ext.compat.issm_triton.layernorm_gated import RMSNorm, rmsnorm_fn
    from ssm_ext.norm import rmsnorm_fn as ours_fn

    assert fn is ISSM_chunk_scan_combined and twin.ISSM_chunk_scan_combined is ISSM_chunk_scan_combined
    assert RMSNorm is RMSNormGated and twin.RMSNormGated is RMSNormGated
    assert rmsnorm_fn is ours_fn and twin.rmsnorm_fn is ours_fn
    assert ssm_ext.ISSM_chunk_scan_combined is ISSM_chunk_scan_combined


def test_dest3d_call(device):
    """DEST3D's test_issm.py call: chunk_size positional, D=None, initial states, final states."""
    from ssm_ext.compat.issm_triton.issm_combined import ISSM_chunk_scan_combined as fn

    inp = _make(1, 64, 4, 1, 8, 32, F32, device, init=True)
    y, final = fn(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 32, D=None,
                  initial_states=inp["initial_states"], return_final_states=True)
    r_out, r_fs = _ref(inp)
    assert_rel(y, r_out, 1e-5, "out")
    assert_rel(final, r_fs, 1e-5, "final")


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------

_b, _L, _H, _G, _P, _N = 2, 10, 4, 2, 3, 5


def _good(device):
    return _make(_b, _L, _H, _G, _P, _N, F32, device, D="hp", z=True, dt_bias="hn", init=True)


def _i32(*rows, device):
    return torch.tensor(rows, dtype=torch.int32, device=device)


BAD = {  # name: (changes to the good inputs, extra call options, message pattern)
    "x_3d": (lambda d: dict(x=torch.randn(_b, _L, _H * _P, device=d)), {}, r"\bx must be 4-D"),
    "x_int": (lambda d: dict(x=torch.zeros(_b, _L, _H, _P, dtype=torch.int32, device=d)), {}, r"\bx must"),
    "B_3d": (lambda d: dict(B=torch.randn(_b, _L, _N, device=d)), {}, r"\bB must be 4-D"),
    "B_wrong_L": (lambda d: dict(B=torch.randn(_b, _L + 1, _G, _N, device=d)), {}, r"\bB must have shape"),
    "B_dtype": (lambda d: dict(B=torch.randn(_b, _L, _G, _N, device=d, dtype=BF16)), {}, r"\bB must have dtype"),
    "C_shape": (lambda d: dict(C=torch.randn(_b, _L, _G, _N + 1, device=d)), {}, r"\bC must have shape"),
    "dt_shape": (lambda d: dict(dt=torch.rand(_b, _L, _H, _N + 1, device=d)), {}, r"\bdt must have shape"),
    "dt_per_head": (lambda d: dict(dt=torch.rand(_b, _L, _H, device=d)), {}, r"\bdt must have shape"),
    "dt_dtype": (lambda d: dict(dt=torch.rand(_b, _L, _H, _N, device=d, dtype=F16)), {}, r"\bdt must have dtype"),
    "A_shape": (lambda d: dict(A=-torch.rand(_H, device=d)), {}, r"\bA must have shape"),
    "A_int": (lambda d: dict(A=torch.zeros(_H, _N, dtype=torch.int64, device=d)), {}, r"\bA must be float"),
    "heads_groups": (lambda d: dict(B=torch.randn(_b, _L, 3, _N, device=d), C=torch.randn(_b, _L, 3, _N, device=d)),
                     {}, r"multiple of ngroups"),
    "D_shape": (lambda d: dict(D=torch.randn(_H, _P + 1, device=d)), {}, r"\bD must have shape"),
    "D_int": (lambda d: dict(D=torch.ones(_H, dtype=torch.int32, device=d)), {}, r"\bD must be float"),
    "dt_bias_shape": (lambda d: dict(dt_bias=torch.randn(_N, device=d)), {}, r"\bdt_bias must have shape"),
    "z_shape": (lambda d: dict(z=torch.randn(_b, _L, _H, _P + 1, device=d)), {}, r"\bz must have shape"),
    "z_dtype": (lambda d: dict(z=torch.randn(_b, _L, _H, _P, device=d, dtype=F64)), {}, r"\bz must have dtype"),
    "init_shape": (lambda d: dict(initial_states=torch.randn(_b, _H, _N, _P, device=d)), {},
                   r"\binitial_states must have shape"),
    "init_int": (lambda d: dict(initial_states=torch.zeros(_b, _H, _P, _N, dtype=torch.int32, device=d)), {},
                 r"\binitial_states must be float"),
    "seq_idx_int64": (lambda d: dict(seq_idx=torch.zeros(_b, _L, dtype=torch.int64, device=d)), {},
                      r"\bseq_idx must have dtype"),
    "seq_idx_shape": (lambda d: dict(seq_idx=torch.zeros(_b, _L + 1, dtype=torch.int32, device=d)), {},
                      r"\bseq_idx must have shape"),
    "cu_batch2": (lambda d: dict(cu_seqlens=_i32(0, 4, _L, device=d)), {}, r"cu_seqlens.*batch 1"),
    "chunk_zero": (lambda d: {}, dict(chunk_size=0), r"\bchunk_size must be > 0"),
    "chunk_negative": (lambda d: {}, dict(chunk_size=-16), r"\bchunk_size must be > 0"),
    "dt_limit_order": (lambda d: {}, dict(dt_limit=(0.5, 0.1)), r"\bdt_limit must"),
    "dt_limit_nan": (lambda d: {}, dict(dt_limit=(float("nan"), 1.0)), r"\bdt_limit must"),
    "dt_limit_not_pair": (lambda d: {}, dict(dt_limit=0.5), r"\bdt_limit must be a pair"),
}


def _varlen(device, cu, init_rows=3):
    inp = _make(1, _L, _H, _G, _P, _N, F32, device, init=True, nseq=init_rows)
    inp["cu_seqlens"] = cu
    return inp


BAD_VARLEN = {
    "cu_float": (lambda d: torch.tensor([0.0, 4.0, 10.0], device=d), r"\bcu_seqlens must have dtype"),
    "cu_2d": (lambda d: torch.tensor([[0, 4, 10]], dtype=torch.int32, device=d), r"\bcu_seqlens must be 1-D"),
    "cu_start": (lambda d: _i32(1, 4, _L, device=d), r"\bcu_seqlens must start at 0"),
    "cu_end": (lambda d: _i32(0, 4, _L - 1, device=d), r"\bcu_seqlens must end at seqlen"),
    "cu_decreasing": (lambda d: _i32(0, 6, 4, _L, device=d), r"\bcu_seqlens must be non-decreasing"),
    "cu_init_rows": (lambda d: _i32(0, 4, 6, 8, _L, device=d), r"\binitial_states must have shape"),
}


def _call_with(inp, opts):
    opts = dict(opts)
    cs = opts.pop("chunk_size", 16)
    return _call(inp, cs, True, **opts)


@pytest.mark.parametrize("what", list(BAD))
def test_bad_input(device, what):
    change, opts, match = BAD[what]
    inp = dict(_good(device), **change(device))
    with pytest.raises(ERRORS, match=match):
        _call_with(inp, opts)


@pytest.mark.parametrize("what", list(BAD_VARLEN))
def test_bad_input_varlen(device, what):
    make_cu, match = BAD_VARLEN[what]
    if what.startswith(("cu_start", "cu_end", "cu_decreasing")) and device == "cuda":
        pytest.skip("cu_seqlens values are checked on the CPU only (no device sync)")
    with pytest.raises(ERRORS, match=match):
        _call(_varlen(device, make_cu(device)), 16, True)


def test_bad_input_bwd(device):
    inp = _good(device)
    v = dict(inp, chunk_size=16, dt_softplus=False, dt_limit_lo=0.0, dt_limit_hi=float("inf"), chunk_states=None)
    op = torch.ops.ssm_ext.issm_bwd.default
    ok_dout = torch.randn_like(inp["x"])
    ok_dfs = torch.randn(_b, _H, _P, _N, device=device)
    for dout, dfs, match in [
        (torch.randn(_b, _L + 1, _H, _P, device=device), ok_dfs, r"\bdout must have shape"),
        (ok_dout.to(BF16), ok_dfs, r"\bdout must have dtype"),
        (ok_dout, torch.randn(_b, _H, _P, _N + 1, device=device), r"\bdfinal_states must have shape"),
        (ok_dout, ok_dfs.to(BF16), r"\bdfinal_states must have dtype"),
    ]:
        with pytest.raises(ERRORS, match=match):
            op(*schema_args(op, dict(v, dout=dout, dfinal_states=dfs)))


@pytest.mark.cuda
def test_bad_input_devices():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    for name, match in [("B", r"\bB must be on the same device"), ("A", r"\bA must be on the same device"),
                        ("D", r"\bD must be on the same device"),
                        ("initial_states", r"\binitial_states must be on the same device")]:
        inp = _good("cuda")
        inp[name] = inp[name].cpu()
        with pytest.raises(ERRORS, match=match):
            _call(inp)
    inp = _good("cuda")
    inp["x"], inp["dt"], inp["B"], inp["C"], inp["z"] = (inp[k].double() for k in ("x", "dt", "B", "C", "z"))
    with pytest.raises(ERRORS, match=r"\bx must be float32, float16 or bfloat16"):
        _call(inp)
