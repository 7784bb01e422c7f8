"""Checks the dense HSTU attention CUDA kernels (hstu_attn_fwd.cu, hstu_attn_bwd.cu: the forward,
dk/dv and dq passes on the tensor-core and fp32 paths), run on the CPU through the host
emulation (build.sh), against the float64 reference: out, dq, dk, dv for fp32 / bf16 / fp16,
padded head widths 32 / 64 / 128 (and dqk != dv, widths not a multiple of 8), jagged lengths
around the tiles (0, 1, 63 .. 65, 130, 300), attn_mask, strided inputs; two runs agree bitwise.
QUICK=1: fewer cases. Exit status 1 on any failure."""
import importlib.util
import math
import os
import sys

import torch

from emu_check import ROOT, load_hemu, rel  # first: it sets the import paths

# The reference by its path: it needs only torch, not the built ssm_ext package.
_spec = importlib.util.spec_from_file_location("hstu_ref", os.path.join(ROOT, "ssm_ext", "reference", "hstu_bsa.py"))
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)
hemu = load_hemu()
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
fails = 0


def check(lens, dtype, heads, da, dl, mask_on=False, strided=False, name=""):
    global fails
    T, n = sum(lens), max(lens + [1])
    off = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int64)
    if strided:  # column slices of one projection and a transposed v (copied to padded buffers)
        buf = torch.randn(T, 2 * heads * da + 8).to(dtype)
        q, k = buf[:, 8:8 + heads * da], buf[:, 8 + heads * da:]
        v = torch.randn(heads * dl, T).to(dtype).t()
    else:
        q, k = (torch.randn(T, heads * da).to(dtype) for _ in range(2))
        v = torch.randn(T, heads * dl).to(dtype)
    mask = (torch.rand(len(lens), n, n) < 0.7).float() if mask_on else None
    dout = torch.randn(T, heads * dl).to(dtype)
    alpha = 1.0 / math.sqrt(da)
    out = hemu.hstu_attn_fwd(q, k, v, off, n, heads, alpha, mask)
    grads = hemu.hstu_attn_bwd(q, k, v, off, n, heads, alpha, mask, dout)
    again = hemu.hstu_attn_bwd(q, k, v, off, n, heads, alpha, mask, dout)
    refs = [t.double().requires_grad_() for t in (q, k, v)]
    r = ref.hstu_attention(*refs, off, n, heads, alpha=alpha, attn_mask=mask)
    rg = torch.autograd.grad(r, refs, dout.double()) if T else [torch.zeros(0)] * 3
    tol = 2e-5 if dtype == F32 else 2e-2
    errs = {"out": rel(out, r) if T else 0.0}
    for nm, g, gr in zip(("dq", "dk", "dv"), grads, rg):
        errs[nm] = rel(g, gr) if T else 0.0
    bad = {k_: f"{v_:.1e}" for k_, v_ in errs.items() if not v_ <= tol}
    if not all(torch.equal(a, b) for a, b in zip(grads, again)):
        bad["repeat"] = "differs"
    fails += bool(bad)
    print(f"{name:40s} {'OK ' if not bad else 'BAD'} {max(errs.values()):.1e} {bad if bad else ''}", flush=True)


torch.manual_seed(0)
quick = bool(os.environ.get("QUICK"))
LENS = [1, 0, 63, 64, 65, 130, 17]
for dtype in (BF16, F32, F16):
    for da, dl in ([(128, 128), (64, 64), (32, 32)] if quick else [(128, 128), (64, 64), (32, 32), (40, 128), (8, 6), (64, 32)]):
        check(LENS, dtype, 2, da, dl, name=f"{dtype} d={da}/{dl}")
for dtype in (BF16, F32):
    check([70, 1, 33], dtype, 3, 128, 128, mask_on=True, name=f"{dtype} mask d128")
    check([70, 1, 33], dtype, 3, 32, 32, mask_on=True, name=f"{dtype} mask d32")
    check([70, 1, 33], dtype, 3, 8, 6, strided=True, name=f"{dtype} strided 8x6")
if not quick:
    check([300, 129], BF16, 1, 128, 128, name="bf16 300/129 d128 (ring wraps)")
    check([300, 129], F32, 1, 64, 64, mask_on=True, name="f32 300/129 d64 mask")
print("FAILS", fails)
sys.exit(1 if fails else 0)
