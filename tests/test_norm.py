"""Tests of the gated RMSNorm (SPEC.md section 3; mamba_ssm layernorm_gated semantics).

Ground truth is ssm_ext.reference.norm (float64). Every test runs on the CPU and, when a GPU is
present, on CUDA (csrc/norm/norm_cuda.cu).

    norm_before_gate: out = rmsnorm(x) * silu(z);  else out = rmsnorm(x * silu(z))
"""

import copy
import os

import pytest
import torch

import ssm_ext  # noqa: F401
from ssm_ext.norm import RMSNormGated, rmsnorm_fn
from ssm_ext.reference import norm as ref

from helpers import assert_rel, schema_args, tol_for


F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
ERRORS = (RuntimeError, ValueError, NotImplementedError, TypeError)
COMPILE_BACKEND = os.environ.get("SSM_EXT_COMPILE_BACKEND", "inductor")


def _cpu(t):
    return None if t is None else t.detach().cpu()


def _make(shape, dtype, device, bias=False, z=True, w_dtype=F32):
    dim = shape[-1]
    return dict(
        x=torch.randn(*shape, device=device).to(dtype),
        weight=(1.0 + 0.5 * torch.randn(dim, device=device)).to(w_dtype),
        bias=(0.5 * torch.randn(dim, device=device)).to(w_dtype) if bias else None,
        z=torch.randn(*shape, device=device).to(dtype) if z else None,
    )


def _check(inp, eps=1e-6, group_size=None, norm_before_gate=True, tol=None, grads=True):
    names = [k for k in ("x", "weight", "bias", "z") if inp[k] is not None]
    leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inp.items()}
    out = rmsnorm_fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["z"], eps, group_size, norm_before_gate)
    r_leaves = {k: (_cpu(v).to(F64).requires_grad_() if v is not None else None) for k, v in inp.items()}
    r_out = ref.rmsnorm_gated(r_leaves["x"], r_leaves["weight"], r_leaves["bias"], r_leaves["z"], eps, group_size,
                              norm_before_gate)
    x = inp["x"]
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert_rel(out, r_out, tol or tol_for(x.dtype), "out")
    if not grads:
        return
    dout = torch.randn(out.shape, device=out.device).to(out.dtype)
    g = torch.autograd.grad(out, [leaves[k] for k in names], dout)
    rg = torch.autograd.grad(r_out, [r_leaves[k] for k in names], _cpu(dout).to(F64))
    for name, a, r in zip(names, g, rg):
        assert a.shape == inp[name].shape and a.dtype == inp[name].dtype, name
        assert_rel(a, r, tol or tol_for(inp[name].dtype), f"d{name}")


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("group_size", [None, 8, 1, 40], ids=["gs_all", "gs8", "gs1", "gs40"])
@pytest.mark.parametrize("z", [False, True], ids=["noz", "z"])
@pytest.mark.parametrize("norm_before_gate", [True, False], ids=["norm_gate", "gate_norm"])
def test_options(device, norm_before_gate, z, group_size, bias):
    _check(_make((3, 7, 40), F32, device, bias=bias, z=z), 1e-5, group_size, norm_before_gate)


@pytest.mark.parametrize("w_dtype", [F32, "same"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_dtypes(device, dtype, w_dtype):
    inp = _make((4, 5, 64), dtype, device, bias=True, w_dtype=dtype if w_dtype == "same" else w_dtype)
    _check(inp, 1e-6, 16, False)
    _check(inp, 1e-6, None, True)


def test_float64_cpu():
    _check(_make((3, 9), F64, "cpu", bias=True, w_dtype=F64), 1e-6, 3, False)


@pytest.mark.parametrize("shape", [(1, 1), (5, 1), (2, 3, 4, 12), (1000, 24), (7,)])
def test_shapes(device, shape):
    # With one channel, dx = rstd*g*w*(1 - yhat^2) is eps-sized: an fp32 cancellation, not compared.
    _check(_make(shape, F32, device, bias=True), 1e-5, None, False, grads=shape[-1] > 1)


@pytest.mark.parametrize("group_size", [None, 64, 512, 3], ids=["gs_all", "gs64", "gs512", "gs3"])
@pytest.mark.parametrize("norm_before_gate", [True, False], ids=["norm_gate", "gate_norm"])
def test_wide_rows(device, norm_before_gate, group_size):
    """Rows wider than a CTA (1536 channels), groups wider than a warp and more groups than warps,
    and enough rows for many dweight/dbias partial blocks."""
    _check(_make((300, 1536), F32, device, bias=True), 1e-6, group_size, norm_before_gate)


def test_empty_rows(device):
    inp = _make((0, 16), F32, device)
    x = inp["x"].requires_grad_()
    out = rmsnorm_fn(x, inp["weight"], None, inp["z"])
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad.shape == (0, 16)


def test_noncontiguous(device):
    """x and z as slices of one projection, weight strided."""
    proj = torch.randn(3, 6, 70, device=device)
    inp = dict(x=proj[..., :32], z=proj[..., 33:65], weight=torch.randn(64, device=device)[::2], bias=None)
    assert not inp["x"].is_contiguous() and not inp["weight"].is_contiguous()
    _check(inp, 1e-5, 8, False)
    _check(inp, 1e-5, None, True)


def test_module(device):
    """RMSNormGated: weight of ones, no bias, forward(x, z) = rmsnorm_fn with its settings."""
    m = RMSNormGated(24, eps=1e-5, group_size=6, norm_before_gate=False, device=device)
    assert m.bias is None and torch.equal(m.weight, torch.ones(24, device=device))
    with torch.no_grad():
        m.weight.normal_()
    x, z = torch.randn(2, 5, 24, device=device), torch.randn(2, 5, 24, device=device)
    assert_rel(m(x, z), ref.rmsnorm_gated(_cpu(x), _cpu(m.weight), None, _cpu(z), 1e-5, 6, False), 1e-5, "module")
    assert_rel(m(x), ref.rmsnorm_gated(_cpu(x), _cpu(m.weight), None, None, 1e-5, 6), 1e-5, "module, no gate")
    m2 = RMSNormGated(24, dtype=BF16, device=device)
    assert m2.weight.dtype == BF16 and m2(x.to(BF16)).dtype == BF16


def test_rms_norm_ref_twin():
    from ssm_ext.compat.issm_triton.layernorm_gated import rms_norm_ref

    inp = _make((3, 16), BF16, "cpu", bias=True)
    out = rms_norm_ref(inp["x"], inp["weight"], inp["bias"], z=inp["z"], group_size=4, norm_before_gate=False)
    assert out.dtype == BF16
    assert_rel(out, ref.rmsnorm_gated(inp["x"], inp["weight"], inp["bias"], inp["z"], 1e-6, 4, False), 1e-2, "ref")


def test_deterministic(device):
    inp = _make((300, 48), BF16, device, bias=True)
    runs = []
    for _ in range(2):
        leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
        out = rmsnorm_fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["z"], 1e-6, 12, False)
        runs.append((out, *torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))))
    for p, q in zip(*runs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gradcheck_float64_cpu(norm_before_gate):
    inp = _make((3, 2, 6), F64, "cpu", bias=True, w_dtype=F64)
    leaves = [v.clone().requires_grad_() for v in inp.values()]

    def f(x, w, b, z):
        return rmsnorm_fn(x, w, b, z, 1e-6, 3, norm_before_gate)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("case", ["plain", "gate_norm_bias_bf16", "norm_gate_groups"])
def test_opcheck(device, case):
    dtype = BF16 if "bf16" in case else F32
    inp = _make((3, 4, 16), dtype, device, bias="bias" in case, z=case != "plain")
    inp = {k: (v.requires_grad_() if v is not None else None) for k, v in inp.items()}
    gs = 4 if "groups" in case else 16
    nbg = not case.startswith("gate_norm")
    fwd = torch.ops.ssm_ext.rmsnorm_gated_fwd.default
    torch.library.opcheck(fwd, schema_args(fwd, dict(inp, eps=1e-6, group_size=gs, norm_before_gate=nbg)))
    with torch.no_grad():
        _, rstd = fwd(inp["x"], inp["weight"], inp["bias"], inp["z"], 1e-6, gs, nbg)
    bwd = torch.ops.ssm_ext.rmsnorm_gated_bwd.default
    vals = {k: (v.detach() if v is not None else None) for k, v in inp.items()}
    torch.library.opcheck(bwd, schema_args(bwd, dict(vals, dout=torch.randn_like(vals["x"]), rstd=rstd,
                                                     group_size=gs, norm_before_gate=nbg)))


class _GatedBlock(torch.nn.Module):
    def __init__(self, d, device):
        super().__init__()
        self.proj = torch.nn.Linear(d, 2 * d, device=device)
        self.norm = RMSNormGated(d, group_size=d // 2, norm_before_gate=False, device=device)

    def forward(self, u):
        x, z = self.proj(u).chunk(2, dim=-1)
        return self.norm(x, z)


def test_compile_module_fwd_bwd(device):
    torch._dynamo.reset()
    eager = _GatedBlock(16, device)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    u0 = torch.randn(2, 7, 16, device=device)
    dy = torch.randn(2, 7, 16, device=device)
    res = []
    for m, params in ((eager, eager), (compiled, model)):
        u = u0.clone().requires_grad_()
        y = m(u)
        y.backward(dy)
        res.append([y.detach(), u.grad] + [p.grad for p in params.parameters()])
    for i, (e, c) in enumerate(zip(*res)):
        assert c is not None, i
        assert_rel(c, e, 1e-5, f"compiled result {i}")


BAD = {  # name: (changes, call options, message pattern)
    "weight_shape": (lambda d: dict(weight=torch.ones(15, device=d)), {}, r"\bweight must have shape"),
    "weight_int": (lambda d: dict(weight=torch.ones(16, dtype=torch.int32, device=d)), {}, r"\bweight must be float"),
    "bias_shape": (lambda d: dict(bias=torch.zeros(8, device=d)), {}, r"\bbias must have shape"),
    "z_shape": (lambda d: dict(z=torch.randn(3, 16, device=d)), {}, r"\bz must have shape"),
    "z_dtype": (lambda d: dict(z=torch.randn(3, 4, 16, device=d, dtype=BF16)), {}, r"\bz must have dtype"),
    "x_int": (lambda d: dict(x=torch.zeros(3, 4, 16, dtype=torch.int64, device=d)), {}, r"\bx must be float"),
    "group_not_dividing": (lambda d: {}, dict(group_size=5), r"\bgroup_size must be > 0 and divide"),
    "group_zero": (lambda d: {}, dict(group_size=0), r"\bgroup_size must be > 0"),
    "eps_negative": (lambda d: {}, dict(eps=-1.0), r"\beps must be >= 0"),
    "x_0d": (lambda d: dict(x=torch.tensor(1.0, device=d), z=None, weight=torch.ones(1, device=d)), {},
             r"\bx must have at least 1 dim"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_input(device, what):
    change, opts, match = BAD[what]
    inp = dict(_make((3, 4, 16), F32, device, bias=True), **change(device))
    with pytest.raises(ERRORS, match=match):
        rmsnorm_fn(inp["x"], inp["weight"], inp["bias"], inp["z"], **opts)


def test_bad_input_bwd(device):
    inp = _make((3, 4, 16), F32, device, bias=True)
    fwd, bwd = torch.ops.ssm_ext.rmsnorm_gated_fwd, torch.ops.ssm_ext.rmsnorm_gated_bwd
    _, rstd = fwd(inp["x"], inp["weight"], inp["bias"], inp["z"], 1e-6, 4, True)
    dout = torch.randn_like(inp["x"])
    for d, r, match in [(dout[..., :8], rstd, r"\bdout must have shape"), (dout.to(BF16), rstd, r"\bdout must have dtype"),
                        (dout, rstd[..., :2], r"\brstd must have shape"), (dout, rstd.double(), r"\brstd must have dtype")]:
        with pytest.raises(ERRORS, match=match):
            bwd(d, inp["x"], inp["weight"], inp["bias"], inp["z"], r, 4, True)
