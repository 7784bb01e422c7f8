"""Tests of the HSTU attention family, dense and block-sparse (SPEC.md section 6).

Ground truth is ssm_ext.reference.hstu_bsa (float64 loops over sequences, heads and queries).
Every test runs on the CPU and, when a GPU is present, on CUDA (the `cuda`-marked
parametrisation of `device`).

    w(t, j) = silu(alpha q_t.k_j) / n * mask(t, j), j <= t
    out(t)  = u_t * (g_cmp o_cmp + g_slc o_slc + g_swa o_swa)
"""

import copy
import math
import os

import pytest
import torch

import ssm_ext  # noqa: F401  (registers torch.ops.ssm_ext.*)
from ssm_ext.hstu_bsa import (GateModel, TritonHSTUBSAAttention, hstu_attention, jagged_to_padded,
                              padded_to_jagged, triton_block_sparse_attn, triton_hstu_attention_with_bsa)
from ssm_ext.reference import hstu_bsa as ref

from helpers import assert_rel, schema_args, tol_for


F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
ERRORS = (RuntimeError, ValueError)
COMPILE_BACKEND = os.environ.get("SSM_EXT_COMPILE_BACKEND", "inductor")
ops = torch.ops.ssm_ext

# The default case: lengths with a 1, an empty sequence and lengths not a multiple of the block.
LENS, N, H, DA, DL, BS, S, W = [1, 5, 17, 0, 12], 20, 2, 8, 6, 4, 2, 3


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def _cpu(t):
    return None if t is None else t.detach().cpu()


def _offsets(lens, device):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), device=device)


def _inputs(lens, dtype, device, heads=H, da=DA, dl=DL):
    """q, k, v, u jagged, gates (T, H, 3) in (0, 1), x_offsets."""
    T = sum(lens)
    q, k = (torch.randn(T, heads * da, device=device).to(dtype) for _ in range(2))
    v, u = (torch.randn(T, heads * dl, device=device).to(dtype) for _ in range(2))
    gates = torch.rand(T, heads, 3, device=device).to(dtype)
    return q, k, v, u, gates, _offsets(lens, device)


def _mask(batch, n, device, p=0.7):
    return (torch.rand(batch, n, n, device=device) < p).float()


def _bsa(q, k, v, u, gates, off, n=N, heads=H, bs=BS, counts=S, window=W, alpha=None, attn_mask=None):
    """Our functional API with the gates as a tensor; returns (out, block_idx, padded_q, padded_k)."""
    da, dl = q.shape[1] // heads, v.shape[1] // heads
    out, pq, pk = triton_hstu_attention_with_bsa(heads, da, dl, q, k, v, u, off, torch.zeros(1, n, n), gates,
                                                 block_counts=counts, block_size=bs, window_size=window,
                                                 alpha=alpha, attn_mask=attn_mask)
    a = 1.0 / math.sqrt(da) if alpha is None else alpha
    idx = ops.hstu_bsa_topk(q.detach(), k.detach(), off, n, heads, a, bs, counts)
    return out, idx, pq, pk


def _ref_scores(q, k, off, heads, bs, alpha):
    """score[(row, h)] = list over blocks 0..own of silu(alpha q.kbar_c) (+inf for the own block)."""
    q64, k64 = q.detach().cpu().double(), k.detach().cpu().double()
    d = q.shape[1] // heads
    out = {}
    o = off.tolist()
    for s, e in zip(o[:-1], o[1:]):
        L = e - s
        nb = L // bs
        kbar = k64[s:s + nb * bs].view(nb, bs, heads, d).mean(1)
        for t in range(L):
            for h in range(heads):
                own = t // bs
                sc = [torch.nn.functional.silu(alpha * (q64[s + t].view(heads, d)[h] @ kbar[c, h])).item()
                      for c in range(own)]
                out[(s + t, h)] = sc + [math.inf]
    return out


def _assert_same_selection(idx, q, k, off, heads, bs, counts, alpha, rtol=1e-5):
    """Our indices equal the reference's, except where two scores tie within rounding: there the
    selected blocks' reference scores must match the reference's choice within rtol."""
    ridx = ref.select_blocks(_cpu(q), _cpu(k), _cpu(off), heads, bs, counts, alpha)
    idx = _cpu(idx)
    assert idx.shape == ridx.shape and idx.dtype == torch.int32
    if torch.equal(idx, ridx):
        return
    scores = _ref_scores(q, k, off, heads, bs, alpha)
    for row, h in (idx != ridx).any(-1).nonzero().tolist():
        sc = scores[(row, h)]
        ours = sorted((sc[c] for c in idx[row, h].tolist() if c >= 0), reverse=True)
        theirs = sorted((sc[c] for c in ridx[row, h].tolist() if c >= 0), reverse=True)
        assert len(ours) == len(theirs), f"row {row} head {h}: {idx[row, h].tolist()} vs {ridx[row, h].tolist()}"
        for a, b in zip(ours, theirs):
            assert a == b or abs(a - b) <= rtol * max(abs(a), abs(b)), \
                f"row {row} head {h}: selected {idx[row, h].tolist()}, reference {ridx[row, h].tolist()}"


def _check_fwd(lens, dtype, device, n=N, heads=H, da=DA, dl=DL, bs=BS, counts=S, window=W, gate_keep=(1, 1, 1),
               u_on=True, mask=None):
    q, k, v, u, gates, off = _inputs(lens, dtype, device, heads, da, dl)
    gates = gates * torch.tensor(gate_keep, device=device, dtype=dtype)
    u = u if u_on else None
    alpha = 1.0 / math.sqrt(da)
    out, idx, pq, pk = _bsa(q, k, v, u, gates, off, n, heads, bs, counts, window, attn_mask=mask)
    _assert_same_selection(idx, q, k, off, heads, bs, counts, alpha)
    r, _ = ref.hstu_bsa(_cpu(q), _cpu(k), _cpu(v), _cpu(u), _cpu(gates), _cpu(off), n, heads, bs, counts, window,
                        attn_mask=_cpu(mask), block_idx=_cpu(idx))
    assert out.shape == (sum(lens), heads * dl) and out.dtype == dtype and out.device == q.device
    assert_rel(out, r, tol_for(dtype), "attn_output")
    assert torch.equal(_cpu(pq).double(), ref.pad(_cpu(q), _cpu(off), n, heads)), "padded_q"
    assert torch.equal(_cpu(pk).double(), ref.pad(_cpu(k), _cpu(off), n, heads)), "padded_k"
    return out


# --------------------------------------------------------------------------------------
# forward and selection
# --------------------------------------------------------------------------------------

BRANCHES = {"cmp": (1, 0, 0), "slc": (0, 1, 0), "swa": (0, 0, 1), "all": (1, 1, 1)}


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("branch", list(BRANCHES))
def test_fwd_each_branch(device, branch, dtype):
    out = _check_fwd(LENS, dtype, device, gate_keep=BRANCHES[branch])
    assert out.abs().max() > 0


@pytest.mark.parametrize("window", [0, 1, 3, 100])
def test_fwd_window(device, window):
    _check_fwd(LENS, F32, device, window=window)


def test_fwd_window_off_ignores_its_gate(device):
    """window_size == 0: the window branch is off, whatever g_swa is."""
    q, k, v, u, gates, off = _inputs(LENS, F32, device)
    g2 = gates.clone()
    g2[..., 2] = torch.rand_like(g2[..., 2])
    assert torch.equal(_bsa(q, k, v, u, gates, off, window=0)[0], _bsa(q, k, v, u, g2, off, window=0)[0])


SIZES = {  # lens, n, block_size, block_counts
    "counts_past_blocks": ([9, 20], 24, 4, 8),
    "shorter_than_a_block": ([3, 2, 1], 4, 8, 2),
    "length_1": ([1], 1, 4, 4),
    "all_length_1": ([1, 1, 1], 3, 2, 2),
    "block_size_1": ([6, 3], 8, 1, 3),
    "block_larger_than_n": ([5, 7], 7, 16, 2),
    "empty_sequences": ([0, 7, 0], 9, 2, 2),
    "one_block_exactly": ([8, 16], 16, 8, 1),
}


@pytest.mark.parametrize("case", list(SIZES))
def test_fwd_sizes(device, case):
    lens, n, bs, counts = SIZES[case]
    _check_fwd(lens, F32, device, n=n, bs=bs, counts=counts, window=2)


@pytest.mark.parametrize("lens", [[0, 0], []], ids=["all_empty", "no_sequences"])
def test_empty(device, lens):
    """T = 0: empty outputs and gradients, padded_q of B rows of zeros."""
    q, k, v, u, gates, off = (_leaf(t) if t.is_floating_point() else t for t in _inputs(lens, F32, device))
    out, _, pq, _ = _bsa(q, k, v, u, gates, off, n=4)
    dense, _, _ = hstu_attention(H, DA, DL, q, k, v, off, torch.zeros(1, 4, 4))
    assert out.shape == dense.shape == (0, H * DL) and pq.shape == (len(lens), 4, H, DA)
    assert pq.abs().sum() == 0
    grads = torch.autograd.grad(out.sum() + dense.sum(), (q, k, v, u, gates))
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in (q, k, v, u, gates)]


def test_int32_offsets(device):
    """The public functions take int32 x_offsets too (the ops take int64)."""
    q, k, v, u, gates, off = _inputs(LENS, F32, device)
    outs = [triton_hstu_attention_with_bsa(H, DA, DL, q, k, v, u, o, torch.zeros(1, N, N), gates)[0]
            for o in (off.int(), off)]
    assert torch.equal(*outs)
    dense = [hstu_attention(H, DA, DL, q, k, v, o, torch.zeros(1, N, N))[0] for o in (off.int(), off)]
    assert torch.equal(*dense)


def test_fwd_head_dims(device):
    """Wider heads (32 / 16) and four heads."""
    _check_fwd([40, 9], F32, device, n=40, heads=4, da=32, dl=16, bs=8, counts=3, window=5)


def test_fwd_without_u(device):
    _check_fwd(LENS, F32, device, u_on=False)


def test_fwd_alpha(device):
    q, k, v, u, gates, off = _inputs(LENS, F32, device)
    out, idx, _, _ = _bsa(q, k, v, u, gates, off, alpha=0.9)
    _assert_same_selection(idx, q, k, off, H, BS, S, 0.9)
    r, _ = ref.hstu_bsa(*map(_cpu, (q, k, v, u, gates, off)), N, H, BS, S, W, alpha=0.9, block_idx=_cpu(idx))
    assert_rel(out, r, 1e-5, "attn_output (alpha=0.9)")


def test_selection_properties(device):
    """Own block first, then distinct earlier blocks, then -1: min(block_counts, own + 1) entries."""
    lens, bs, counts = [30, 13], 4, 5
    q, k, _, _, _, off = _inputs(lens, F32, device)
    idx = _cpu(ops.hstu_bsa_topk(q, k, off, 30, H, 0.3, bs, counts))
    o = off.tolist()
    for s, e in zip(o[:-1], o[1:]):
        for t in range(e - s):
            own = t // bs
            for h in range(H):
                row = idx[s + t, h].tolist()
                keep = min(counts, own + 1)
                assert row[0] == own
                assert row[keep:] == [-1] * (counts - keep)
                assert len(set(row[:keep])) == keep and all(0 <= c <= own for c in row[:keep])
    _assert_same_selection(idx, q, k, off, H, bs, counts, 0.3)


def test_selection_ties_to_lower_index(device):
    """Equal block means give equal scores: the lower blocks are chosen, in increasing order."""
    lens, bs, counts = [24], 4, 3
    q, k, _, _, _, off = _inputs(lens, F32, device)
    k = k[:1].expand(24, -1).contiguous()      # every block mean is the same vector
    idx = _cpu(ops.hstu_bsa_topk(q, k, off, 24, H, 0.5, bs, counts))
    for t in range(24):
        own = t // bs
        want = [own] + list(range(min(counts - 1, own))) + [-1] * max(0, counts - 1 - own)
        assert idx[t, 0].tolist() == want and idx[t, 1].tolist() == want, (t, idx[t].tolist())


def test_selection_bf16(device):
    q, k, _, _, _, off = _inputs([33, 20], BF16, device)
    idx = ops.hstu_bsa_topk(q, k, off, 33, H, 0.4, 4, 3)
    _assert_same_selection(idx, q, k, off, H, 4, 3, 0.4, rtol=1e-3)


@pytest.mark.parametrize("kind", ["per_sequence", "shared", "two_d", "bool", "larger_than_n"])
def test_fwd_attn_mask(device, kind):
    B = len(LENS)
    if kind == "per_sequence":
        mask = _mask(B, N, device)
    elif kind == "shared":
        mask = _mask(1, N, device)
    elif kind == "two_d":
        mask = _mask(1, N, device)[0]
    elif kind == "bool":
        mask = _mask(B, N, device) > 0
    else:
        mask = torch.rand(B, N + 3, N + 5, device=device) + 0.5   # soft weights, wider than n
    q, k, v, u, gates, off = _inputs(LENS, F32, device)
    out, idx, _, _ = _bsa(q, k, v, u, gates, off, attn_mask=mask)
    rmask = _cpu(mask).float()
    rmask = rmask[None] if rmask.dim() == 2 else rmask
    r, _ = ref.hstu_bsa(*map(_cpu, (q, k, v, u, gates, off)), N, H, BS, S, W, attn_mask=rmask, block_idx=_cpu(idx))
    assert_rel(out, r, 1e-5, f"attn_output ({kind} mask)")
    plain, _, _, _ = _bsa(q, k, v, u, gates, off)
    assert not torch.allclose(out, plain), "the mask changed nothing"


def _gate_model(device):
    return GateModel(DA, hidden_dim=16).to(device)


def _ref_gates(gm, q, off, n=N):
    """gates (T, H, 3) float64 from a float64 copy of gate_model on the reference padding of q."""
    g64 = copy.deepcopy(gm).to("cpu", F64)
    return ref.unpad(torch.stack(g64(ref.pad(q, off, n, H)), -1), off)


def test_gates_from_model(device):
    q, k, v, u, _, off = _inputs(LENS, F32, device)
    gm = _gate_model(device)
    out, pq, pk = triton_hstu_attention_with_bsa(H, DA, DL, q, k, v, u, off, torch.zeros(1, N, N), gm,
                                                 block_counts=S, block_size=BS, window_size=W)
    idx = ops.hstu_bsa_topk(q, k, off, N, H, 1 / math.sqrt(DA), BS, S)
    g = _ref_gates(gm, _cpu(q), _cpu(off))
    r, _ = ref.hstu_bsa(*map(_cpu, (q, k, v, u)), g, _cpu(off), N, H, BS, S, W, block_idx=_cpu(idx))
    assert_rel(out, r, 1e-5, "attn_output (GateModel)")


def test_gate_model_forms_agree(device):
    """A gate_model returning one (B, n, H, 3) tensor, the (g_cmp, g_slc, g_swa) tuple of
    GateModel, and the gate values as a (T, H, 3) tensor give the same output."""
    q, k, v, u, _, off = _inputs(LENS, F32, device)
    gm = _gate_model(device)
    stacked = lambda pq: torch.stack(gm(pq), -1)  # noqa: E731
    values = padded_to_jagged(torch.stack(gm(jagged_to_padded(q, off, N).view(-1, N, H, DA)), -1), off)
    outs = [triton_hstu_attention_with_bsa(H, DA, DL, q, k, v, u, off, torch.zeros(1, N, N), g, block_counts=S,
                                           block_size=BS, window_size=W)[0] for g in (gm, stacked, values)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_gates_dtype_may_differ(device):
    """bf16 q, k, v, u with fp32 gates (a gate model kept in fp32)."""
    q, k, v, u, gates, off = _inputs(LENS, BF16, device)
    g32 = torch.rand(gates.shape, device=device)
    out, idx, _, _ = _bsa(q, k, v, u, g32, off)
    r, _ = ref.hstu_bsa(*map(_cpu, (q, k, v, u, g32, off)), N, H, BS, S, W, block_idx=_cpu(idx))
    assert out.dtype == BF16
    assert_rel(out, r, 1e-2, "attn_output (fp32 gates)")


def test_noncontiguous_inputs(device):
    """q, k, v, u as column slices of one projection and a transposed buffer; gates transposed."""
    T = sum(LENS)
    buf = torch.randn(T, 2 * H * (DA + DL) + 3, device=device)
    q, k, v, u = torch.split(buf[:, 3:], [H * DA, H * DA, H * DL, H * DL], dim=1)
    qt = torch.randn(H * DA, T, device=device).t()
    gates = torch.rand(3, H, T, device=device).permute(2, 1, 0)
    off = _offsets(LENS, device)
    for qq in (q, qt):
        out, idx, _, _ = _bsa(qq, k, v, u, gates, off)
        r, _ = ref.hstu_bsa(*map(_cpu, (qq, k, v, u, gates, off)), N, H, BS, S, W, block_idx=_cpu(idx))
        assert_rel(out, r, 1e-5, "attn_output (strided inputs)")
        _assert_same_selection(idx, qq, k, off, H, BS, S, 1 / math.sqrt(DA))


def test_deterministic(device):
    q, k, v, u, gates, off = (t.requires_grad_() if t.is_floating_point() else t for t in _inputs(LENS, F32, device))
    runs = []
    for _ in range(2):
        out = _bsa(q, k, v, u, gates, off)[0]
        runs.append((out, *torch.autograd.grad(out, (q, k, v, u, gates), torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------

def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def _check_grads(lens, dtype, device, window=W, u_on=True, mask_on=False, counts=S, bs=BS, n=N, tol=None):
    q, k, v, u, gates, off = _inputs(lens, dtype, device)
    u = u if u_on else None
    mask = _mask(len(lens), n, device) if mask_on else None
    leaves = [_leaf(t) for t in (q, k, v, u, gates)]
    out, idx, _, _ = _bsa(*leaves, off, n=n, bs=bs, counts=counts, window=window, attn_mask=mask)
    dout = torch.randn(out.shape, device=device).to(dtype)
    live = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, live, dout)
    refs = [None if t is None else _cpu(t).double().requires_grad_() for t in (q, k, v, u, gates)]
    r, _ = ref.hstu_bsa(*refs, _cpu(off), n, H, bs, counts, window, attn_mask=_cpu(mask), block_idx=_cpu(idx))
    rlive = [t for t in refs if t is not None]
    rgrads = torch.autograd.grad(r, rlive, _cpu(dout).double())
    names = [nm for nm, t in zip(["dq", "dk", "dv", "du", "dgates"], leaves) if t is not None]
    for name, t, g, rg in zip(names, live, grads, rgrads):
        assert g.shape == t.shape and g.dtype == t.dtype, f"{name}: {tuple(g.shape)} {g.dtype}"
        if name == "dgates" and window == 0:
            assert g[..., 2].abs().max() == 0, "dg_swa must be 0 without a window"
        assert_rel(g, rg, tol if tol is not None else tol_for(dtype), name)


@pytest.mark.parametrize("window,u_on,mask_on", [(W, True, False), (0, True, False), (W, False, False),
                                                 (W, True, True), (100, False, True)])
def test_grads(device, window, u_on, mask_on):
    _check_grads(LENS, F32, device, window, u_on, mask_on)


@pytest.mark.parametrize("case", ["counts_past_blocks", "shorter_than_a_block", "all_length_1", "block_size_1"])
def test_grads_sizes(device, case):
    lens, n, bs, counts = SIZES[case]
    _check_grads(lens, F32, device, window=2, counts=counts, bs=bs, n=n)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_grads_half(device, dtype):
    _check_grads(LENS, dtype, device, tol=2e-2)


def test_grads_through_gate_model(device):
    """dq includes the path through gate_model(padded_q); the gate model's parameters get
    their gradients."""
    q, k, v, u, _, off = _inputs(LENS, F32, device)
    gm = _gate_model(device)
    leaves = [_leaf(t) for t in (q, k, v, u)]
    out, _, _ = triton_hstu_attention_with_bsa(H, DA, DL, *leaves, off, torch.zeros(1, N, N), gm, block_counts=S,
                                               block_size=BS, window_size=W)
    idx = ops.hstu_bsa_topk(q, k, off, N, H, 1 / math.sqrt(DA), BS, S)
    dout = torch.randn_like(out)
    params = list(gm.parameters())
    grads = torch.autograd.grad(out, leaves + params, dout)

    g64 = copy.deepcopy(gm).to("cpu", F64)
    refs = [_cpu(t).double().requires_grad_() for t in (q, k, v, u)]
    gates = ref.unpad(torch.stack(g64(ref.pad(refs[0], _cpu(off), N, H)), -1), _cpu(off))
    r, _ = ref.hstu_bsa(*refs, gates, _cpu(off), N, H, BS, S, W, block_idx=_cpu(idx))
    rgrads = torch.autograd.grad(r, refs + list(g64.parameters()), _cpu(dout).double())
    names = ["dq", "dk", "dv", "du"] + [f"d{nm}" for nm, _ in gm.named_parameters()]
    for name, g, rg in zip(names, grads, rgrads):
        assert_rel(g, rg, 1e-5, name)


def test_grads_padded_outputs(device):
    """Gradients reaching padded_q and padded_k flow back into q and k."""
    q, k, v, u, gates, off = _inputs(LENS, F32, device)
    ql, kl = _leaf(q), _leaf(k)
    out, _, pq, pk = _bsa(ql, kl, v, u, gates, off)
    wq, wk = torch.randn_like(pq), torch.randn_like(pk)
    dq, dk = torch.autograd.grad((pq * wq).sum() + (pk * wk).sum(), (ql, kl))
    assert torch.equal(dq, padded_to_jagged(wq.reshape(len(LENS), N, -1), off))
    assert torch.equal(dk, padded_to_jagged(wk.reshape(len(LENS), N, -1), off))


@pytest.mark.parametrize("u_on,mask_on,window", [(True, True, 3), (False, False, 0)])
def test_gradcheck_float64_cpu(u_on, mask_on, window):
    lens, n, bs = [7, 1, 10], 10, 3
    q, k, v, u, gates, off = (_leaf(t) if t.is_floating_point() else t for t in _inputs(lens, F64, "cpu"))
    u = u if u_on else None
    mask = _mask(len(lens), n, "cpu").double() if mask_on else None
    idx = ops.hstu_bsa_topk(q.detach(), k.detach(), off, n, H, 0.4, bs, 2)

    def f(q, k, v, u, gates):
        return ops.hstu_bsa_fwd(q, k, v, u, gates, idx, off, n, H, 0.4, bs, window, mask)

    assert torch.autograd.gradcheck(f, (q, k, v, u, gates))


def test_gradcheck_dense_float64_cpu():
    lens, n = [6, 1, 9], 9
    q, k, v, _, _, off = (_leaf(t) if t.is_floating_point() else t for t in _inputs(lens, F64, "cpu"))
    mask = _mask(len(lens), n, "cpu").double()
    for m in (None, mask):
        assert torch.autograd.gradcheck(lambda q, k, v: ops.hstu_attn_fwd(q, k, v, off, n, H, 0.4, m), (q, k, v))


# --------------------------------------------------------------------------------------
# sizes that cross the CUDA tiles (64 queries / keys, 64 block means per tile)
# --------------------------------------------------------------------------------------

TILE_LENS = [1, 0, 150, 64, 70]          # several query tiles, one exactly a tile, empty, 1
TILE_CASES = {  # block_size, block_counts, window
    "bs16_w40": (16, 4, 40),
    "bs64_w100": (64, 2, 100),
    "bs3_no_window": (3, 5, 0),
    "bs1_w1": (1, 3, 1),
}


def _check_tiles(dtype, device, dims, case, mask_on=False, u_on=True, heads=2, lens=TILE_LENS):
    bs, counts, window = TILE_CASES[case]
    da, dl = dims
    n = max(lens)
    q, k, v, u, gates, off = _inputs(lens, dtype, device, heads, da, dl)
    u = u if u_on else None
    mask = _mask(len(lens), n, device) if mask_on else None
    alpha = 1.0 / math.sqrt(da)
    idx = ops.hstu_bsa_topk(q, k, off, n, heads, alpha, bs, counts)
    _assert_same_selection(idx, q, k, off, heads, bs, counts, alpha, rtol=1e-5 if dtype == F32 else 1e-3)
    leaves = [_leaf(t) for t in (q, k, v, u, gates)]
    out = ops.hstu_bsa_fwd(*leaves, idx, off, n, heads, alpha, bs, window, mask)
    refs = [None if t is None else _cpu(t).double().requires_grad_() for t in (q, k, v, u, gates)]
    r, _ = ref.hstu_bsa(*refs, _cpu(off), n, heads, bs, counts, window, alpha=alpha, attn_mask=_cpu(mask),
                        block_idx=_cpu(idx))
    tol = tol_for(dtype)
    assert_rel(out, r, tol, f"bsa out {case} d={da}/{dl}")
    dout = torch.randn(out.shape, device=device).to(dtype)
    live = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, live, dout)
    rgrads = torch.autograd.grad(r, [t for t in refs if t is not None], _cpu(dout).double())
    names = [nm for nm, t in zip(["dq", "dk", "dv", "du", "dgates"], leaves) if t is not None]
    for name, g, rg in zip(names, grads, rgrads):
        assert g.shape == rg.shape and g.dtype == dtype, name
        assert_rel(g, rg, tol * (2 if dtype != F32 else 1), f"bsa {name} {case} d={da}/{dl}")


@pytest.mark.parametrize("case", list(TILE_CASES))
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_bsa_tiles(device, dtype, case):
    _check_tiles(dtype, device, (32, 32), case)


@pytest.mark.parametrize("dims", [(64, 64), (128, 128), (48, 96), (8, 6)], ids=["64", "128", "48x96", "8x6"])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_bsa_tiles_head_dims(device, dtype, dims):
    _check_tiles(dtype, device, dims, "bs16_w40")


@pytest.mark.parametrize("mask_on,u_on", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_bsa_tiles_mask_u(device, dtype, mask_on, u_on):
    _check_tiles(dtype, device, (32, 32), "bs16_w40", mask_on=mask_on, u_on=u_on)


def test_bsa_duplicate_and_invalid_indices(device):
    """block_idx given by hand: repeated blocks count as often as listed, entries < 0 or past
    t are skipped (as the CPU kernel does)."""
    lens, n, bs, heads = [150, 40], 150, 16, 2
    q, k, v, u, gates, off = _inputs(lens, F32, device, heads, 32, 32)
    T = sum(lens)
    idx = torch.randint(-2, 12, (T, heads, 6), device=device, dtype=torch.int32)
    idx[:, :, 1] = idx[:, :, 0]
    leaves = [_leaf(t) for t in (q, k, v, u, gates)]
    out = ops.hstu_bsa_fwd(*leaves, idx, off, n, heads, 0.3, bs, 20, None)
    refs = [_cpu(t).double().requires_grad_() for t in (q, k, v, u, gates)]
    r, _ = ref.hstu_bsa(*refs, _cpu(off), n, heads, bs, 6, 20, alpha=0.3, block_idx=_cpu(idx))
    assert_rel(out, r, 1e-5, "out (hand-made block_idx)")
    dout = torch.randn_like(out)
    for name, g, rg in zip(["dq", "dk", "dv", "du", "dgates"], torch.autograd.grad(out, leaves, dout),
                           torch.autograd.grad(r, refs, _cpu(dout).double())):
        assert_rel(g, rg, 1e-5, f"{name} (hand-made block_idx)")


def test_bsa_counts_past_255(device):
    """A block listed more than 255 times for one query (block_counts 260): the CUDA forward's
    multiplicity tile switches from 1-byte to 2-byte counts."""
    lens, n, bs, heads, S = [70, 3], 70, 16, 1, 260
    q, k, v, u, gates, off = _inputs(lens, F32, device, heads, 32, 32)
    T = sum(lens)
    idx = torch.full((T, heads, S), -1, device=device, dtype=torch.int32)
    idx[:, :, :256] = 0
    idx[:, :, 256:] = torch.randint(0, 5, (T, heads, S - 256), device=device, dtype=torch.int32)
    leaves = [_leaf(t) for t in (q, k, v, u, gates)]
    out = ops.hstu_bsa_fwd(*leaves, idx, off, n, heads, 0.3, bs, 0, None)
    refs = [_cpu(t).double().requires_grad_() for t in (q, k, v, u, gates)]
    r, _ = ref.hstu_bsa(*refs, _cpu(off), n, heads, bs, S, 0, alpha=0.3, block_idx=_cpu(idx))
    assert_rel(out, r, 1e-4, "out (block listed 256+ times)")
    dout = torch.randn_like(out)
    for name, g, rg in zip(["dq", "dk", "dv", "du", "dgates"], torch.autograd.grad(out, leaves, dout),
                           torch.autograd.grad(r, refs, _cpu(dout).double())):
        # the CPU kernel adds the 256 copies one by one in fp32: 1e-4
        assert_rel(g, rg, 1e-4, f"{name} (block listed 256+ times)")


def _cpu_op_grads(op, args, leaves_idx, dout):
    """Output and gradients of op on CPU copies of args (leaves at positions leaves_idx)."""
    cargs = [a.detach().cpu().requires_grad_() if i in leaves_idx and a is not None
             else (a.cpu() if isinstance(a, torch.Tensor) else a) for i, a in enumerate(args)]
    out = op(*cargs)
    grads = torch.autograd.grad(out, [cargs[i] for i in leaves_idx if cargs[i] is not None], dout.cpu())
    return out, grads


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_long_sequences_vs_cpu(device, dtype):
    """Sequences of 2300 rows: more than 32 key tiles, so the CUDA tile bitmaps span several
    words, and many pipelined tiles. Compared with the CPU op (itself checked against the
    reference above) on the same block indices."""
    if device == "cpu":
        pytest.skip("compares the CUDA kernels with the CPU op")
    lens, heads, d, bs, counts, window = [2300, 70], 2, 16, 16, 4, 100
    n = max(lens)
    q, k, v, u, gates, off = _inputs(lens, dtype, device, heads, d, d)
    mask = _mask(len(lens), n, device)
    alpha = 1 / math.sqrt(d)
    idx = ops.hstu_bsa_topk(q, k, off, n, heads, alpha, bs, counts)
    ridx = ops.hstu_bsa_topk(q.cpu(), k.cpu(), off.cpu(), n, heads, alpha, bs, counts)
    diff = (_cpu(idx) != ridx).any(-1).float().mean().item()
    assert diff < (1e-3 if dtype == F32 else 2e-2), f"{diff:.2%} of the selections differ from the CPU op's"
    tol = tol_for(dtype)
    for m in (None, mask):
        leaves = [_leaf(t) for t in (q, k, v, u, gates)]
        args = [*leaves, idx, off, n, heads, alpha, bs, window, m]
        out = ops.hstu_bsa_fwd(*args)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, dout)
        rout, rgrads = _cpu_op_grads(ops.hstu_bsa_fwd, args, [0, 1, 2, 3, 4], dout)
        assert_rel(out, rout.double(), tol, "bsa out vs CPU op")
        for name, g, rg in zip(["dq", "dk", "dv", "du", "dgates"], grads, rgrads):
            assert_rel(g, rg.double(), 2 * tol, f"bsa {name} vs CPU op")
        leaves = [_leaf(t) for t in (q, k, v)]
        args = [*leaves, off, n, heads, alpha, m]
        out = ops.hstu_attn_fwd(*args)
        grads = torch.autograd.grad(out, leaves, dout)
        rout, rgrads = _cpu_op_grads(ops.hstu_attn_fwd, args, [0, 1, 2], dout)
        assert_rel(out, rout.double(), tol, "dense out vs CPU op")
        for name, g, rg in zip(["dq", "dk", "dv"], grads, rgrads):
            assert_rel(g, rg.double(), 2 * tol, f"dense {name} vs CPU op")


def test_bsa_tiles_deterministic(device):
    q, k, v, u, gates, off = _inputs(TILE_LENS, BF16, device, 2, 64, 64)
    idx = ops.hstu_bsa_topk(q, k, off, 150, 2, 0.125, 16, 4)
    runs = []
    for _ in range(2):
        leaves = [_leaf(t) for t in (q, k, v, u, gates)]
        out = ops.hstu_bsa_fwd(*leaves, idx, off, 150, 2, 0.125, 16, 40, None)
        runs.append((out, *torch.autograd.grad(out, leaves, torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# dense HSTU attention
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("mask_on", [False, True])
def test_dense(device, dtype, mask_on):
    q, k, v, _, _, off = _inputs(LENS, dtype, device)
    mask = _mask(len(LENS), N, device) if mask_on else None
    leaves = [_leaf(t) for t in (q, k, v)]
    out, pq, pk = hstu_attention(H, DA, DL, *leaves, off, torch.zeros(1, N, N), attn_mask=mask)
    refs = [_cpu(t).double().requires_grad_() for t in (q, k, v)]
    r = ref.hstu_attention(*refs, _cpu(off), N, H, attn_mask=_cpu(mask))
    assert out.dtype == dtype and out.shape == (sum(LENS), H * DL)
    assert_rel(out, r, tol_for(dtype), "dense out")
    assert torch.equal(_cpu(pq).double(), ref.pad(_cpu(q), _cpu(off), N, H))
    dout = torch.randn(out.shape, device=device).to(dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    rgrads = torch.autograd.grad(r, refs, _cpu(dout).double())
    for name, g, rg in zip(["dq", "dk", "dv"], grads, rgrads):
        assert_rel(g, rg, tol_for(dtype) * (2 if dtype != F32 else 1), f"dense {name}")


DENSE_DIMS = [(32, 32), (48, 48), (64, 64), (96, 96), (128, 128), (64, 32), (8, 6), (40, 128)]
# lengths 1, 0, around the 64-row CUDA tile, several tiles, shorter than a tile
DENSE_LENS = [1, 0, 63, 64, 65, 130, 17]


def _check_dense(lens, dtype, device, heads, da, dl, mask_on=False, strided=False, tol=None):
    T = sum(lens)
    n = max(lens + [1])
    if strided:  # column slices of one projection (row stride > width) and a transposed v
        buf = torch.randn(T, 2 * heads * da + 8, device=device).to(dtype)
        q, k = buf[:, 8:8 + heads * da], buf[:, 8 + heads * da:]
        v = torch.randn(heads * dl, T, device=device).to(dtype).t()
        off = _offsets(lens, device)
    else:
        q, k, v, _, _, off = _inputs(lens, dtype, device, heads, da, dl)
    mask = _mask(len(lens), n, device) if mask_on else None
    leaves = [_leaf(t) for t in (q, k, v)]
    out, _, _ = hstu_attention(heads, da, dl, *leaves, off, torch.zeros(1, n, n), attn_mask=mask)
    refs = [_cpu(t).double().requires_grad_() for t in (q, k, v)]
    r = ref.hstu_attention(*refs, _cpu(off), n, heads, attn_mask=_cpu(mask))
    tol = tol if tol is not None else tol_for(dtype)
    assert out.dtype == dtype and out.shape == (T, heads * dl)
    assert_rel(out, r, tol, f"dense out d={da}/{dl}")
    dout = torch.randn(out.shape, device=device).to(dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    rgrads = torch.autograd.grad(r, refs, _cpu(dout).double())
    for name, g, rg in zip(["dq", "dk", "dv"], grads, rgrads):
        assert g.shape == rg.shape and g.dtype == dtype
        assert_rel(g, rg, tol * (2 if dtype != F32 else 1), f"dense {name} d={da}/{dl}")
    return out, grads


@pytest.mark.parametrize("dims", DENSE_DIMS, ids=[f"{a}x{b}" for a, b in DENSE_DIMS])
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_dense_head_dims(device, dtype, dims):
    """Every dtype and head width of the CUDA tiles (padded widths 48, 96, 40, 8 / 6, dqk != dv),
    with lengths 0, 1, around and past the 64-row tile."""
    _check_dense(DENSE_LENS, dtype, device, 2, *dims)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("dims", [(32, 32), (128, 128), (8, 6)], ids=["32", "128", "8x6"])
def test_dense_mask_and_strides(device, dtype, dims):
    _check_dense([70, 1, 33], dtype, device, 3, *dims, mask_on=True)
    _check_dense([70, 1, 33], dtype, device, 3, *dims, strided=True)


def test_dense_long_deterministic(device):
    """A few hundred rows (many key tiles through the pipeline); two runs agree bitwise."""
    out, grads = _check_dense([300, 129], BF16, device, 2, 64, 64)
    torch.manual_seed(0)
    q, k, v, _, _, off = _inputs([257, 5], F32, device, 2, 32, 32)
    runs = []
    for _ in range(2):
        leaves = [_leaf(t) for t in (q, k, v)]
        o, _, _ = hstu_attention(2, 32, 32, *leaves, off, torch.zeros(1, 257, 257))
        runs.append((o, *torch.autograd.grad(o, leaves, torch.ones_like(o))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_dense_equals_full_window(device):
    """The window branch alone with window >= n is the dense attention (times u)."""
    q, k, v, _, gates, off = _inputs(LENS, F32, device)
    only_swa = torch.zeros_like(gates)
    only_swa[..., 2] = 1
    sparse = _bsa(q, k, v, None, only_swa, off, window=N)[0]
    dense = hstu_attention(H, DA, DL, q, k, v, off, torch.zeros(1, N, N))[0]
    assert_rel(sparse, dense, 1e-6, "window-only vs dense")


# --------------------------------------------------------------------------------------
# the HSTU layer
# --------------------------------------------------------------------------------------

D_EMB = 12


def _layer(device, window=W):
    torch.manual_seed(1)
    layer = TritonHSTUBSAAttention(D_EMB, DL, DA, H, block_counts=S, block_size=BS, window_size=window).to(device)
    with torch.no_grad():  # non-trivial norm and bias parameters
        layer.norm_weight.uniform_(0.5, 1.5)
        layer.norm_bias.normal_(0, 0.1)
        layer.uvqk.normal_(0, 0.4)
        layer.uvqk_bias.normal_(0, 0.1)
    return layer


def _ref_layer(layer, gm, x, off, n, eps):
    """The layer of SPEC.md in float64 with the reference attention; returns (out, padded_q, padded_k)."""
    L = copy.deepcopy(layer).to("cpu", F64)
    g64 = copy.deepcopy(gm).to("cpu", F64)
    P = dict(L.named_parameters())
    normed = torch.nn.functional.layer_norm(x, [D_EMB], P["norm_weight"], P["norm_bias"], eps=eps)
    uvqk = torch.nn.functional.silu(normed @ P["uvqk"] + P["uvqk_bias"])
    u, v, q, k = torch.split(uvqk, [DL * H, DL * H, DA * H, DA * H], dim=1)
    gates = ref.unpad(torch.stack(g64(ref.pad(q, off, n, H)), -1), off)
    a, _ = ref.hstu_bsa(q, k, v, None, gates, off, n, H, layer.block_size, layer.block_counts, layer.window_size)
    a = torch.nn.functional.layer_norm(a, [DL * H], eps=eps)
    out = x + torch.nn.functional.linear(u * a, P["o.weight"], P["o.bias"])
    return out, ref.pad(q, off, n, H), ref.pad(k, off, n, H), L, g64


def test_layer_vs_reference(device):
    layer, gm = _layer(device), _gate_model(device)
    off = _offsets(LENS, device)
    x = torch.randn(sum(LENS), D_EMB, device=device, requires_grad=True)
    out, pq, pk = layer(x, off, torch.zeros(len(LENS), N, N), gm)
    x64 = _cpu(x).double().requires_grad_()
    r, rq, rk, L64, g64 = _ref_layer(layer, gm, x64, _cpu(off), N, layer.epsilon)
    assert_rel(out, r, 1e-5, "layer out")
    assert_rel(pq, rq, 1e-5, "layer padded_q")
    assert_rel(pk, rk, 1e-5, "layer padded_k")
    dout = torch.randn_like(out)
    params = list(layer.parameters()) + list(gm.parameters())
    grads = torch.autograd.grad(out, [x] + params, dout)
    rparams = list(L64.parameters()) + list(g64.parameters())
    rgrads = torch.autograd.grad(r, [x64] + rparams, _cpu(dout).double())
    names = (["dx"] + [f"d{nm}" for nm, _ in layer.named_parameters()]
             + [f"dgate.{nm}" for nm, _ in gm.named_parameters()])
    for name, g, rg in zip(names, grads, rgrads):
        assert_rel(g, rg, 1e-4, f"layer {name}")


class _Block(torch.nn.Module):
    def __init__(self, device):
        super().__init__()
        self.layer = _layer(device)
        self.gate = _gate_model(device)

    def forward(self, x, off, invalid_attn_mask):
        return self.layer(x, off, invalid_attn_mask, self.gate)


def test_compile_layer_fullgraph(device):
    torch._dynamo.reset()
    eager = _Block(device)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=COMPILE_BACKEND)
    off = _offsets(LENS, device)
    x0 = torch.randn(sum(LENS), D_EMB, device=device)
    dout = torch.randn(sum(LENS), D_EMB, device=device)
    res = []
    for m, params in ((eager, eager), (compiled, compiled_model)):
        x = x0.clone().requires_grad_()
        out, pq, pk = m(x, off, torch.zeros(len(LENS), N, N))
        out.backward(dout)
        res.append((out.detach(), pq.detach(), x.grad, params.layer.uvqk.grad, params.gate.mlp1.weight.grad))
    for name, e, c in zip(["out", "padded_q", "dx", "duvqk", "dgate"], *res):
        assert c is not None, name
        assert_rel(c, e, 1e-5, f"compiled {name}")


@pytest.mark.parametrize("lens", [LENS, [0, 3, 0, 0, 7, 0], [4]], ids=["default", "empties", "one"])
def test_compile_jagged_padded_rows(device, lens):
    """jagged_to_padded / padded_to_jagged compiled (fullgraph) equal eager, with empty sequences
    (repeated offsets) and an x_offsets that is a slice with a storage offset. On CUDA this runs
    Inductor's Triton searchsorted, which before pytorch/pytorch#182344 dropped the storage offset
    of a sliced boundary tensor (the cause of a wrong compiled padded_q)."""
    torch._dynamo.reset()

    def f(values, off):
        p = jagged_to_padded(values, off, N)
        return p, padded_to_jagged(p * 2, off)

    store = torch.cat([torch.tensor([7, 7], device=device), _offsets(lens, device)])
    values = torch.randn(sum(lens), 5, device=device)
    for off in (_offsets(lens, device), store[2:]):
        e = f(values, off)
        c = torch.compile(f, fullgraph=True, backend=COMPILE_BACKEND)(values, off)
        for name, a, b in zip(["padded", "jagged"], c, e):
            assert torch.equal(a, b), f"compiled {name}, offsets storage_offset {off.storage_offset()}"


# --------------------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------------------

def _op_values(device, dtype, u_on, mask_on, grad):
    q, k, v, u, gates, off = _inputs([5, 0, 9], dtype, device)
    if grad:
        q, k, v, u, gates = (_leaf(t) for t in (q, k, v, u, gates))
    idx = ops.hstu_bsa_topk(q.detach(), k.detach(), off, 10, H, 0.5, 3, 2)
    return dict(q=q, k=k, v=v, u=u if u_on else None, gates=gates, block_idx=idx, x_offsets=off, n=10,
                num_heads=H, alpha=0.5, block_size=3, block_counts=2, window_size=2,
                attn_mask=_mask(1, 10, device) if mask_on else None,
                dout=torch.randn(14, H * DL, device=device).to(dtype))


OP_COMBOS = [(F32, True, False), (F32, False, True), (BF16, True, True)]


@pytest.mark.parametrize("name", ["hstu_attn_fwd", "hstu_attn_bwd", "hstu_bsa_topk", "hstu_bsa_fwd", "hstu_bsa_bwd"])
@pytest.mark.parametrize("dtype,u_on,mask_on", OP_COMBOS)
def test_opcheck(device, name, dtype, u_on, mask_on):
    op = getattr(ops, name).default
    values = _op_values(device, dtype, u_on, mask_on, grad=name.endswith("fwd"))
    torch.library.opcheck(op, schema_args(op, values))


def _strided_op_values(device, grad):
    """The layer's operands: u, v, q, k column slices of one (T, 2H(DL+DA)) projection (row
    stride > width; q, k 16-byte aligned, v, u not), an empty sequence, widths 8 / 6, and a
    non-contiguous dout."""
    lens = [1, 5, 0, 9]
    uvqk = torch.randn(sum(lens), 2 * H * (DL + DA), device=device)
    if grad:
        uvqk.requires_grad_()
    u, v, q, k = torch.split(uvqk, [DL * H, DL * H, DA * H, DA * H], dim=1)
    off = _offsets(lens, device)
    gates = torch.rand(sum(lens), H, 4, device=device)[..., 1:]  # (T, H, 3), strided
    idx = ops.hstu_bsa_topk(q.detach(), k.detach(), off, 10, H, 0.5, 3, 2)
    dout = torch.randn(H * DL, sum(lens), device=device).t()
    return dict(q=q, k=k, v=v, u=u, gates=gates.requires_grad_(grad), block_idx=idx, x_offsets=off, n=10,
                num_heads=H, alpha=0.5, block_size=3, block_counts=2, window_size=2, attn_mask=None, dout=dout)


@pytest.mark.parametrize("name", ["hstu_attn_fwd", "hstu_attn_bwd", "hstu_bsa_topk", "hstu_bsa_fwd", "hstu_bsa_bwd"])
def test_opcheck_strided(device, name):
    """opcheck (schema: no input mutated or aliased; fake vs real strides; autograd) on the strided
    column slices the layer passes, not only contiguous samples."""
    op = getattr(ops, name).default
    values = _strided_op_values(device, grad=name.endswith("fwd"))
    torch.library.opcheck(op, schema_args(op, values))


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------

def _bad_cases(device):
    q, k, v, u, gates, off = _inputs([5, 4], F32, device)
    idx = ops.hstu_bsa_topk(q, k, off, 6, H, 0.5, 2, 2)
    o = lambda *vals: torch.tensor(vals, device=device)  # noqa: E731

    def bsa(**kw):
        a = dict(q=q, k=k, v=v, u=u, gates=gates, block_idx=idx, x_offsets=off, n=6, num_heads=H, alpha=0.5,
                 block_size=2, window_size=1, attn_mask=None)
        a.update(kw)
        return lambda: ops.hstu_bsa_fwd(*schema_args(ops.hstu_bsa_fwd.default, a))

    def topk(**kw):
        a = dict(q=q, k=k, x_offsets=off, n=6, num_heads=H, alpha=0.5, block_size=2, block_counts=2)
        a.update(kw)
        return lambda: ops.hstu_bsa_topk(*schema_args(ops.hstu_bsa_topk.default, a))

    def dense(**kw):
        a = dict(q=q, k=k, v=v, x_offsets=off, n=6, num_heads=H, alpha=0.5, attn_mask=None,
                 dout=torch.zeros(9, H * DL, device=device))
        a.update(kw)
        return lambda: ops.hstu_attn_bwd(*schema_args(ops.hstu_attn_bwd.default, a))

    def public(**kw):
        a = dict(num_heads=H, attention_dim=DA, linear_dim=DL, q=q, k=k, v=v, u=u, x_offsets=off,
                 invalid_attn_mask=torch.zeros(1, 6, 6), gate_model=gates)
        a.update(kw)
        return lambda: triton_hstu_attention_with_bsa(**a)

    return {
        "offsets_not_increasing": (bsa(x_offsets=o(0, 6, 4, 9)), r"x_offsets must not decrease"),
        "offsets_past_the_tensor": (topk(x_offsets=o(0, 5, 12)), r"x_offsets\[2\] = 12 is past the end of q"),
        "offsets_short_of_the_tensor": (topk(x_offsets=o(0, 5, 7)), r"x_offsets\[-1\] = 7 must equal q.size\(0\)"),
        "offsets_not_from_0": (dense(x_offsets=o(1, 5, 9)), r"x_offsets\[0\] must be 0"),
        "offsets_dtype": (bsa(x_offsets=off.int()), r"x_offsets must have dtype Long"),
        "offsets_2d": (topk(x_offsets=off[None]), r"x_offsets must be 1-D"),
        "heads_not_dividing_q": (topk(num_heads=3), r"q.size\(1\) = 16 .* not divisible by num_heads = 3"),
        "heads_not_dividing_v": (bsa(v=v[:, :5], u=None), r"v.size\(1\) = 5 .* not divisible by num_heads"),
        "heads_zero": (topk(num_heads=0), r"num_heads must be positive"),
        "n_smaller_than_longest": (bsa(n=4), r"n = 4 .*invalid_attn_mask.* smaller than the longest sequence"),
        "public_mask_smaller": (public(invalid_attn_mask=torch.zeros(1, 4, 4)), r"invalid_attn_mask"),
        "attn_mask_smaller": (bsa(attn_mask=torch.ones(2, 4, 4, device=device)), r"attn_mask must have shape"),
        "attn_mask_batch": (dense(attn_mask=torch.ones(3, 6, 6, device=device)), r"attn_mask must have shape"),
        "attn_mask_2d_op": (bsa(attn_mask=torch.ones(6, 6, device=device)), r"attn_mask must be 3-D"),
        "k_dtype": (bsa(k=k.double()), r"k must have dtype Float"),
        "v_dtype": (dense(v=v.to(BF16)), r"v must have dtype Float"),
        "u_shape": (bsa(u=u[:, :4]), r"u must have shape"),
        "k_shape": (topk(k=k[:, :8]), r"k must have shape"),
        "q_int": (topk(q=q.int(), k=k.int()), r"q must be float32, float16 or bfloat16"),
        "q_3d": (topk(q=q[None]), r"q must be 2-D"),
        "gates_shape": (bsa(gates=gates[:, :, :2]), r"gates must have shape"),
        "gates_int": (bsa(gates=gates.int()), r"gates must be float32"),
        "block_idx_dtype": (bsa(block_idx=idx.long()), r"block_idx must have dtype Int"),
        "block_idx_shape": (bsa(block_idx=idx[:4]), r"block_idx must have shape"),
        "block_size_zero": (bsa(block_size=0), r"block_size must be positive"),
        "topk_block_size_zero": (topk(block_size=0), r"block_size must be positive"),
        "block_counts_zero": (topk(block_counts=0), r"block_counts must be positive"),
        "window_negative": (bsa(window_size=-1), r"window_size must be >= 0"),
        "alpha_nan": (topk(alpha=float("nan")), r"alpha must be finite"),
        "dout_shape": (dense(dout=torch.zeros(9, 3, device=device)), r"dout must have shape"),
        "public_attention_dim": (public(attention_dim=DA + 1), r"num_heads \* attention_dim"),
        "public_gate_tensor_shape": (public(gate_model=gates[:, :1]), r"gate_model given as a tensor"),
        "public_gate_model_output": (public(gate_model=lambda pq: pq), r"gate_model\(padded_q\)"),
    }


@pytest.mark.parametrize("case", list(_bad_cases("cpu")))
def test_bad_input(device, case):
    fn, pattern = _bad_cases(device)[case]
    with pytest.raises(ERRORS, match=pattern):
        fn()


def test_bad_input_device_mismatch(device):
    if device != "cuda":
        pytest.skip("needs a second device")
    q, k, v, u, gates, off = _inputs([5, 4], F32, device)
    with pytest.raises(ERRORS, match=r"x_offsets must be on the same device as q"):
        ops.hstu_bsa_topk(q, k, off.cpu(), 6, H, 0.5, 2, 2)
    with pytest.raises(ERRORS, match=r"k must be on the same device as q"):
        ops.hstu_bsa_topk(q, k.cpu(), off, 6, H, 0.5, 2, 2)


def test_offsets_checked_again_after_a_change(device):
    """GPU offsets are read once per tensor and version (no device sync per call): a tensor
    changed in place, a new tensor, and the same tensor with another T are checked again."""
    q, k, v, u, gates, off = _inputs([5, 4], F32, device)
    ops.hstu_bsa_topk(q, k, off, 6, H, 0.5, 2, 2)
    ops.hstu_bsa_topk(q, k, off, 6, H, 0.5, 2, 2)  # remembered: the same answer
    off[1] = 9  # in place (the version changes): a sequence of 9 rows, longer than n
    with pytest.raises(ERRORS, match=r"longest sequence in x_offsets \(9 rows\)"):
        ops.hstu_bsa_topk(q, k, off, 6, H, 0.5, 2, 2)
    with pytest.raises(ERRORS, match=r"x_offsets\[2\] = 12 is past the end of q"):
        ops.hstu_bsa_topk(q, k, torch.tensor([0, 5, 12], device=device), 6, H, 0.5, 2, 2)
    good = torch.tensor([0, 5, 9], device=device)
    ops.hstu_bsa_topk(q, k, good, 6, H, 0.5, 2, 2)
    with pytest.raises(ERRORS, match=r"x_offsets\[2\] = 9 is past the end of q \(5 rows\)"):  # another T
        ops.hstu_bsa_topk(q[:5], k[:5], good, 6, H, 0.5, 2, 2)


# --------------------------------------------------------------------------------------
# padding helpers and import twins
# --------------------------------------------------------------------------------------

def test_jagged_padded_roundtrip(device):
    off = _offsets(LENS, device)
    x = torch.randn(sum(LENS), 3, 2, device=device)
    p = jagged_to_padded(x, off, N)
    assert p.shape == (len(LENS), N, 3, 2)
    assert torch.equal(_cpu(p).double(), ref.pad(_cpu(x).reshape(-1, 6), _cpu(off), N, 3).view(len(LENS), N, 3, 2))
    assert torch.equal(padded_to_jagged(p, off), x)


def test_compat_twins():
    import ssm_ext.compat.hstu_bsa as c
    import ssm_ext.hstu_bsa as ours
    from ssm_ext.compat.hstu_bsa.model import GateModel as gm_mod
    from ssm_ext.compat.hstu_bsa import triton_bsa_attention, triton_hstu_bsa

    assert c.triton_hstu_attention_with_bsa is ours.triton_hstu_attention_with_bsa
    assert triton_hstu_bsa.triton_hstu_attention_with_bsa is ours.triton_hstu_attention_with_bsa
    assert triton_hstu_bsa.TritonHSTUBSAAttention is ours.TritonHSTUBSAAttention is c.TritonHSTUBSAAttention
    assert triton_bsa_attention.triton_block_sparse_attn is ours.triton_block_sparse_attn
    assert gm_mod.GateModel is ours.GateModel is c.GateModel
    # the seed's GateModel parameter names, so its state_dict loads
    assert set(GateModel(8, 4).state_dict()) == {"mlp1.weight", "mlp1.bias", "mlp2.weight", "mlp2.bias"}


def test_triton_block_sparse_attn_padded(device):
    """The seed's padded entry point: every sequence of length T, gates (B, T, H), indices (B, H, T, S)."""
    B, T = 2, 11
    q, k = (torch.randn(B, T, H, DA, device=device) for _ in range(2))
    v, u = (torch.randn(B, T, H, DL, device=device) for _ in range(2))
    g = [torch.rand(B, T, H, device=device) for _ in range(3)]
    for g_swa, window in ((g[2], 3), (None, 0)):
        o, bi = triton_block_sparse_attn(q, k, v, u, g[0], g[1], g_swa, block_counts=2, block_size=4,
                                         window_size=window)
        assert o.shape == (B, T, H, DL) and bi.shape == (B, H, T, 2)
        off = torch.arange(B + 1) * T
        flat = lambda x: _cpu(x).reshape(B * T, -1)  # noqa: E731
        gates = torch.stack([_cpu(g[0]), _cpu(g[1]), _cpu(g_swa) if g_swa is not None else torch.zeros(B, T, H)],
                            -1).reshape(B * T, H, 3)
        r, ridx = ref.hstu_bsa(flat(q), flat(k), flat(v), flat(u), gates, off, T, H, 4, 2, window)
        assert_rel(o.reshape(B * T, -1), r, 1e-5, "triton_block_sparse_attn o")
        assert torch.equal(_cpu(bi).permute(0, 2, 1, 3).reshape(B * T, H, 2), ridx)
