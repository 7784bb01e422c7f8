"""Checks the gated RMSNorm CUDA kernels, run on the CPU through the host emulation (build.sh),
against the float64 reference (outputs and all gradients; vector and scalar paths). Exit status 1
on any failure."""
import sys

import torch

from emu_check import load_hemu, rel  # first: it sets the import paths

from ssm_ext.reference import norm as ref
hemu = load_hemu()
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
fails = 0
def check(shape, dtype, bias, z, gs, nbg, name, w_dtype=F32, noncontig=False):
    global fails
    dim = shape[-1]
    if noncontig:
        proj = torch.randn(*shape[:-1], 2 * dim + 3).to(dtype); x = proj[..., :dim]; zz = proj[..., dim + 1:2 * dim + 1] if z else None
    else:
        x = torch.randn(*shape).to(dtype); zz = torch.randn(*shape).to(dtype) if z else None
    w = (1 + 0.5 * torch.randn(dim)).to(w_dtype); b = (0.5 * torch.randn(dim)).to(w_dtype) if bias else None
    g = gs or dim
    out, rstd = hemu.norm_fwd(x, w, b, zz, 1e-6, g, nbg)
    leaves = [t.double().requires_grad_() if t is not None else None for t in (x, w, b, zz)]
    r = ref.rmsnorm_gated(leaves[0], leaves[1], leaves[2], leaves[3], 1e-6, gs, nbg)
    dout = torch.randn(shape).to(dtype)
    names = [i for i, t in enumerate(leaves) if t is not None]
    rg = torch.autograd.grad(r, [leaves[i] for i in names], dout.double())
    gd = hemu.norm_bwd(dout, x, w, b, zz, rstd, g, nbg)  # dx, dweight, dbias, dz
    mine = {0: gd[0], 1: gd[1], 2: gd[2], 3: gd[3]}
    tol = 2e-5 if dtype == F32 else 2e-2
    errs = {"out": rel(out, r)}
    for i, rr in zip(names, rg): errs[f"d{i}"] = rel(mine[i], rr)
    bad = {k: f"{v:.1e}" for k, v in errs.items() if not v <= tol}
    fails += bool(bad)
    print(f"{name:45s} {'OK ' if not bad else 'BAD'} {max(errs.values()):.1e} {bad if bad else ''}")
torch.manual_seed(0)
for nbg in (True, False):
    for z in (False, True):
        for gs in (None, 8, 1, 40):
            for bias in (False, True):
                check((3, 7, 40), F32, bias, z, gs, nbg, f"opts nbg={nbg} z={z} gs={gs} b={bias}")
for dt in (F32, F16, BF16):
    check((4, 5, 64), dt, True, True, 16, False, f"dtype {dt} vec")
    check((4, 5, 64), dt, True, True, 16, True, f"dtype {dt} vec nbg", w_dtype=dt)
    check((4, 5, 64), dt, True, True, 16, False, f"dtype {dt} noncontig", noncontig=True)
check((300, 1536), F32, True, True, 512, False, "wide 1536 gs512")
check((300, 1536), F32, True, True, 3, True, "wide 1536 gs3")
check((1000, 24), F32, True, True, None, False, "1000 rows")
print("FAILS", fails)
sys.exit(1 if fails else 0)
