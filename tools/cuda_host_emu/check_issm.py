"""Checks the ISSM CUDA kernels, run on the CPU through the host emulation (build.sh), against
the float64 reference: forward outputs and final states, every gradient (autograd through the
reference), and bitwise-equal repeated forwards. Exit status 1 on any failure."""
import os
import sys
import time

import torch

from emu_check import load_hemu, rel  # first: it sets the import paths

from ssm_ext.reference import issm as ref
import test_issm as T
from helpers import make_seq_idx
hemu = load_hemu()
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DIFF = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
fails = 0
def check(inp, name, tol=None, **opts):
    global fails
    sp = opts.get("dt_softplus", False); lim = opts.get("dt_limit", (0.0, float("inf")))
    x = inp["x"]; tol = tol or (2e-5 if x.dtype == F32 else 2e-2)
    t0 = time.time()
    out, fs, saved = hemu.issm_fwd(x, inp["dt"], inp["A"], inp["B"], inp["C"], 64, inp["D"], inp["z"], inp["dt_bias"], inp["initial_states"], inp["seq_idx"], inp["cu_seqlens"], sp, lim[0], lim[1], True)
    names = [k for k in DIFF if inp[k] is not None]
    leaves = {k: (v.to(F64).requires_grad_() if k in names else v) for k, v in inp.items()}
    r_out, r_fs = ref.issm_chunk_scan(**leaves, **opts)
    dout = torch.randn(out.shape).to(x.dtype); dfs = torch.randn(fs.shape)
    rg = torch.autograd.grad((r_out, r_fs), [leaves[k] for k in names], (dout.double(), dfs.double()), allow_unused=True)
    g = hemu.issm_bwd(x, inp["dt"], inp["A"], inp["B"], inp["C"], 64, inp["D"], inp["z"], inp["dt_bias"], inp["initial_states"], inp["seq_idx"], inp["cu_seqlens"], sp, lim[0], lim[1], dout, dfs, None)
    gd = dict(zip(DIFF, g))
    errs = {"out": rel(out, r_out), "final": rel(fs, r_fs)}
    for k, r in zip(names, rg):
        if r is None: r = torch.zeros_like(inp[k], dtype=F64)
        errs["d" + k] = rel(gd[k], r) if r.abs().max() > 0 else gd[k].abs().max().item()
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not (v <= tol)}
    # determinism: a second run is bitwise equal
    out2, fs2, _ = hemu.issm_fwd(x, inp["dt"], inp["A"], inp["B"], inp["C"], 64, inp["D"], inp["z"], inp["dt_bias"], inp["initial_states"], inp["seq_idx"], inp["cu_seqlens"], sp, lim[0], lim[1], True)
    if not (torch.equal(out, out2) and torch.equal(fs, fs2)): bad["determinism"] = "fwd differs"
    # the backward from the forward's chunk states (z absent) equals the recomputing one bitwise
    if (saved.numel() > 0) != (inp["z"] is None and x.shape[1] > 0 and x.shape[3] > 0): bad["saved"] = f"numel {saved.numel()}"
    if saved.numel() > 0:
        g2 = hemu.issm_bwd(x, inp["dt"], inp["A"], inp["B"], inp["C"], 64, inp["D"], inp["z"], inp["dt_bias"], inp["initial_states"], inp["seq_idx"], inp["cu_seqlens"], sp, lim[0], lim[1], dout, dfs, saved)
        if not all(torch.equal(a, b) for a, b in zip(g, g2)): bad["saved"] = "bwd from chunk_states differs"
    fails += bool(bad)
    print(f"{name:40s} {'OK ' if not bad else 'BAD'} {time.time()-t0:5.1f}s max_err={max(errs.values()):.1e} {bad if bad else ''}", flush=True)

torch.manual_seed(0)
check(T._make(2, 37, 4, 2, 5, 6, F32, D="hp", z=True, dt_bias="hn", init=True, softplus=True), "all opts", dt_softplus=True, dt_limit=(0.01, 5.0))
check(T._make(2, 30, 2, 1, 3, 4, F32, D="h", dt_bias="h", init=True), "per-head D/bias")
check(T._make(1, 1, 1, 1, 1, 1, F32, D="hp", z=True, dt_bias="hn", init=True), "all ones L1")
check(T._make(1, 9, 2, 2, 3, 300, F32, D="hp", z=True, dt_bias="hn", init=True), "N300 (two n-tiles)")
inp = T._make(3, 60, 4, 2, 3, 5, F32, D="hp", z=True, dt_bias="h", init=True)
inp["seq_idx"] = make_seq_idx(3, 60, padding=True, max_run=9); check(inp, "seq_idx")
lens = [5, 0, 1, 17, 9, 0]
cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
inp = T._make(1, sum(lens), 4, 2, 3, 6, F32, D="hp", z=True, dt_bias="hn", init=True, nseq=len(lens))
inp["cu_seqlens"] = cu; check(inp, "cu_seqlens")
inp["cu_seqlens"] = cu.long(); check(inp, "cu_seqlens int64")
inp["cu_seqlens"] = cu; inp["seq_idx"] = torch.tensor([[0]*10 + [1]*22], dtype=torch.int32); check(inp, "cu+seq_idx")
inp = T._make(2, 31, 2, 1, 3, 8, F32, dt_bias="hn", init=True, softplus=True)
check(inp, "clamped", dt_softplus=True, dt_limit=(0.2, 0.4))
for (b, L, H, G, P, N) in (T.MULTI if not os.environ.get('QUICK') else [(1, 129, 4, 2, 5, 33), (1, 140, 2, 1, 3, 260)]):
    inp = T._make(b, L, H, G, P, N, F32, D="hp", z=True, dt_bias="hn", init=True, softplus=True); inp["A"] = inp["A"] * 0.1
    check(inp, f"multi {b,L,H,G,P,N}", dt_softplus=True)
inp = T._make(2, 70, 3, 1, 9, 40, F32, D="hp", z=True, dt_bias="hn", init=True, softplus=True)
# strided views: x and dt with steps innermost, B, C slices of a wider tensor (bwd_chunk_kernel's 32-bit
# offsets within a block follow the strides)
inp["x"] = inp["x"].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
inp["dt"] = inp["dt"].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
for k in ("B", "C"):
    inp[k] = torch.cat([inp[k], torch.randn_like(inp[k])], dim=3)[..., :40]
check(inp, "strided x, dt, B, C", dt_softplus=True)
# two p-tiles with the finishing kernels' 4-element accesses (N % 4 == 0, contiguous)
check(T._make(1, 100, 3, 1, 70, 16, F32, D="hp", z=True, dt_bias="hn", init=True, softplus=True), "P70 N16 (p-tiles, vector)", dt_softplus=True)
inp = T._make(1, 150, 2, 1, 36, 128, F32, init=True)  # DEST3D-like: P = 36, N = 128 (4 states per lane)
check(inp, "DEST3D-like P36 N128")
inp = T._make(1, 150, 2, 1, 36, 128, BF16, z=True, D="h", init=True)
check(inp, "DEST3D-like bf16")
lens = [70, 0, 64, 1, 0, 130, 15]
cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
inp = T._make(1, sum(lens), 2, 1, 5, 12, F32, D="hp", z=True, dt_bias="hn", init=True, nseq=len(lens)); inp["A"] *= 0.1
inp["cu_seqlens"] = cu; ids = torch.zeros(1, sum(lens), dtype=torch.int32); ids[0, 100:] = 1; ids[0, 190:] = 2; inp["seq_idx"] = ids
check(inp, "multi cu_seqlens + seq_idx")
for dt in (BF16, F16):
    check(T._make(2, 40, 4, 2, 8, 16, dt, D="hp", z=True, dt_bias="h", init=True, softplus=True), f"{dt}", dt_softplus=True)
check(T._make(2, 45, 4, 2, 8, 16, F32, D="hp", z=True, dt_bias="hn", init=True, softplus=True, param_dtype=BF16), "params bf16", dt_softplus=True, tol=2e-2)
# The forward's look-back walks (hide 1 / 2: chunk tiles fold their predecessors' aggregates; 2 also
# addresses the staging loads with 64-bit offsets) give bitwise the results of the direct chain and
# 32-bit offsets (hide 0), forward and backward.
lens = [70, 0, 64, 1, 0, 250, 15]
cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
inp = T._make(1, sum(lens), 2, 1, 70, 12, F32, D="hp", z=True, dt_bias="hn", init=True, nseq=len(lens)); inp["A"] *= 0.1
inp["cu_seqlens"] = cu; ids = torch.zeros(1, sum(lens), dtype=torch.int32); ids[0, 100:] = 1; ids[0, 190:] = 2; inp["seq_idx"] = ids
for case, x in (("walk multi chunk", T._make(2, 300, 2, 1, 5, 40, F32, D="hp", z=True, dt_bias="hn", init=True, softplus=True)),
                ("walk cu_seqlens + seq_idx, P70", inp)):
    args = lambda: (x["x"], x["dt"], x["A"], x["B"], x["C"], 64, x["D"], x["z"], x["dt_bias"], x["initial_states"], x["seq_idx"], x["cu_seqlens"], True, 0.0, float("inf"))
    dout = torch.randn(x["x"].shape)
    base = hemu.issm_fwd(*args(), True), hemu.issm_bwd(*args(), dout, None, None)
    for h in (1, 2):
        hemu.set_device(1, h)
        got = hemu.issm_fwd(*args(), True), hemu.issm_bwd(*args(), dout, None, None)
        hemu.set_device(1, 0)
        same = all(torch.equal(a, b) for a, b in zip(list(base[0]) + [g for g in base[1] if g is not None],
                                                     list(got[0]) + [g for g in got[1] if g is not None]))
        fails += not same
        print(f"{case} hide={h}: bitwise equal to the direct chain {same}", flush=True)
inp = T._make(2, 0, 2, 1, 3, 4, F32, init=True, D="h", z=True)
out, fs, _ = hemu.issm_fwd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 64, inp["D"], inp["z"], None, inp["initial_states"], None, None, False, 0.0, float("inf"), True)
ok = torch.equal(fs, inp["initial_states"])
fails += not ok
print("L=0 final == initial_states", ok)
print("FAILS", fails)
sys.exit(1 if fails else 0)
