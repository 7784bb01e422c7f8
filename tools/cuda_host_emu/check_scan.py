"""Checks the strip-mode CUDA scan forward (fwd_strips_kernel through launch_strips_fwd,
csrc/scan/scan_strips.cu), run on the CPU through the host emulation (build.sh), against the
float64 reference: y, final_state, and chunk_states (chunk_states[:, j] = h entering step
j*32) or the stored states. Inputs have D contiguous, D >= 32 and whole 16-byte pieces of
channels (tiles: 64 steps x 32 fp32 / 64 16-bit channels), and the launcher must take them
(BAD otherwise), so every case runs the strip kernel.

The emulated device has hemu.set_device(n_sms, hide) SMs of one CTA each (default 1: one
persistent CTA takes every tile). CTAs run one after another, so more than one only where no
tile waits on a later CTA: n_sms dividing the number of strips (B * ceil(D / 32) fp32,
B * ceil(D / 64) 16-bit) or one tile per strip; those runs must equal the one-CTA run bitwise.
hide = 1 / 2 makes the look-back walk (chain_tiles folds the published pairs back to the strip's
first tile, or to a pseudo-random earlier state) instead of reading the state ahead. Exit status 1 on any failure."""
import math
import os
import sys
import time
import zlib

import torch

from emu_check import load_hemu, rel  # first: it sets the import paths

from ssm_ext.reference import scan as ref
import test_scan as T
hemu = load_hemu()
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CHUNK = 32
NAME = {F32: "float32", BF16: "bfloat16", F16: "float16"}
fails = 0


def run(inp, store, out, n_sms=1, hide=0, chunks_only=False):
    hemu.set_device(n_sms, hide)
    try:
        return hemu.scan_strips_fwd(*inp, store, NAME[out] if out is not None else "", chunks_only)
    finally:
        hemu.set_device(1, 0)


def inputs(B, L, D, dtype, b_on, c_on, init_on, lo=0.99, view=None):
    """(B, L, D)-contiguous inputs; views of (B, 2L, D+16) ones: "sliced_d": channels from 16
    bytes on (rows stay 16-byte aligned), "l_stride": every other step, "misaligned": channels 1 .. 1+D."""
    if view is None: return T._inputs(B, L, D, dtype, "cpu", b_on, c_on, init_on, lo=lo)
    full = T._inputs(B, 2 * L, D + 16, dtype, "cpu", b_on, c_on, init_on, lo=lo)
    p = 16 // full[0].element_size()
    cut = {"sliced_d": lambda t: t[:, :L, p:p + D], "l_stride": lambda t: t[:, ::2, :D],
           "misaligned": lambda t: t[:, :L, 1:1 + D]}[view]
    return [None if t is None else (cut(t) if t.dim() == 3 else t[:, :D]) for t in full]


def check(B, L, D, dtype, b_on, c_on, init_on, store, out=None, grids=(), hides=(), lo=0.99, view=None,
          chunks_only=False):
    """One input (gates a in [lo, 1]); the one-CTA run vs the reference, then the same input on
    `grids` SMs (bitwise equal) and with the look-back walks of `hides` (vs the reference).
    chunks_only: y and the final state must stay unwritten (NaN)."""
    global fails
    t0 = time.time()
    torch.manual_seed(zlib.crc32(repr((B, L, D, dtype, b_on, c_on, init_on, store, out, lo, view)).encode()))
    x, a, b, c, h0 = inputs(B, L, D, dtype, b_on, c_on, init_on, lo, view)
    inp = (x, a, b, c, h0)
    ry, rfs = ref.scan(x, a, b, c, h0)
    rh, _ = ref.scan(x, a, b, None, h0)  # h_t
    h_in = torch.cat([(h0.double() if h0 is not None else torch.zeros(B, D, dtype=torch.float64))[:, None],
                      rh[:, CHUNK - 1:L - 1:CHUNK]], 1)  # h entering steps 0, 32, 64, ...
    odt = out if out is not None else dtype
    ytol = {F32: 1e-5, BF16: 1e-2, F16: 2e-3}[odt]
    name = (f"({B},{L},{D}) {str(dtype)[6:]}->{str(odt)[6:]} b{int(b_on)} c{int(c_on)} init{int(init_on)} "
            f"{'states' if store else 'chunks'}" + (f" a>={lo}" if lo != 0.99 else "") + (f" {view}" if view else "")
            + (" chunks_only" if chunks_only else ""))

    def errors(res):
        y, fs, st, cs = res
        bad = {}
        if y.shape != (B, L, D) or y.dtype != odt: bad["y meta"] = f"{tuple(y.shape)} {y.dtype}"
        if fs.shape != (B, D) or fs.dtype != F32: bad["final meta"] = f"{tuple(fs.shape)} {fs.dtype}"
        if chunks_only:  # unwritten: still the NaN the outputs start as
            errs = {}
            if not (y.isnan().all() and fs.isnan().all()): bad["y/final written"] = "chunks_only"
        else: errs = {"y": (rel(y, ry), ytol), "final": (rel(fs, rfs), 1e-5)}
        if store:
            if st.shape != (B, L, D) or st.dtype != F32 or cs.numel(): bad["states meta"] = f"{tuple(st.shape)} {cs.numel()}"
            else:
                errs["states"] = (rel(st, rh), 1e-5)
                # the final state comes from the tile chain, the stored h from the steps
                errs["final-states[-1]"] = (rel(fs, st[:, -1]), 1e-6)
        else:
            nc = math.ceil(L / CHUNK)
            if cs.shape != (B, nc, D) or cs.dtype != F32 or st.numel(): bad["chunks meta"] = f"{tuple(cs.shape)} {st.numel()}"
            else: errs["chunk_states"] = (rel(cs, h_in) if h_in.abs().max() > 0 else cs.abs().max().item(), 1e-5)
        bad.update({k: f"{v:.2e}" for k, (v, tol) in errs.items() if not (v <= tol)})
        return bad, max([v for v, _ in errs.values()] + [0.0])

    res = run(inp, store, out, chunks_only=chunks_only)
    if not res:
        fails += 1
        print(f"{name:62s} BAD   launch_strips_fwd refused the inputs", flush=True)
        return
    bad, worst = errors(res)
    for g in grids:  # bitwise equal (NaN where unwritten)
        res_g = run(inp, store, out, n_sms=g, chunks_only=chunks_only)
        if not all(torch.equal(p.nan_to_num(), q.nan_to_num()) for p, q in zip(res, res_g)): bad[f"G={g}"] = "differs from G=1"
    for h in hides:
        bad_h, worst_h = errors(run(inp, store, out, hide=h, chunks_only=chunks_only))
        worst = max(worst, worst_h)
        bad.update({f"hide{h} {k}": v for k, v in bad_h.items()})
    fails += bool(bad)
    extra = (f" G={list(grids)}" if grids else "") + (f" hide={list(hides)}" if hides else "")
    print(f"{name + extra:62s} {'OK ' if not bad else 'BAD'} {time.time()-t0:5.1f}s max_err={worst:.1e} {bad if bad else ''}",
          flush=True)


# TileAt::advance for grid strides the emulated launches cannot run (any G vs the strips).
walk_bad = [(G, ns, nc) for G in range(1, 41) for ns in range(1, 13) for nc in range(1, 8)
            if not hemu.strips_tile_walk(G, ns, nc)]
fails += bool(walk_bad)
print(f"{'TileAt walk: G 1..40 x strips 1..12 x chunks 1..7':62s} {'OK ' if not walk_bad else 'BAD'} {walk_bad[:5]}")

# (b, c, initial state, stored states): every option on and off
OPTS = [(False, False, False, False), (True, False, True, True), (False, True, False, True),
        (True, True, True, False), (True, True, True, True)]
SIZES = [  # (B, L, D)
    (2, 300, 40),    # a partial strip of channels (8 of 32 fp32 lanes, 20 of 32 16-bit); L ends inside a tile
    (3, 300, 96),    # several strips per batch, L ends inside a tile
    (3, 64, 96),     # one whole tile per strip
    (2, 256, 48),    # whole tiles; fp32: 2 strips per batch, the second half full; 16-bit: 1 strip, 24 of 32 lanes
    (1, 1, 32),      # L = 1
    (2, 1, 40),      # L = 1, a partial strip
    (1, 1000, 32),   # one strip, 16 tiles (16-bit: half the lanes)
]
if os.environ.get("QUICK"): SIZES = [s for s in SIZES if s[1] < 1000]
for (B, L, D) in SIZES:
    for dtype in (F32, BF16, F16):
        for out in ([None] if dtype == F32 else [None, F32]):
            for (b_on, c_on, init_on, store) in OPTS:
                check(B, L, D, dtype, b_on, c_on, init_on, store, out)
check(2, 300, 40, F32, True, True, True, False, out=BF16)   # y through an fp32 buffer, then cast
check(2, 300, 40, BF16, True, True, True, True, out=F16)
check(2, 300, 36, F32, True, True, True, False)             # fp32: a strip of one 16-byte piece
check(2, 300, 36, F32, False, True, False, True)
for dt in (F32, BF16):                                      # strided views with 16-byte rows
    check(2, 200, 48, dt, True, True, True, False, view="sliced_d")
    check(2, 200, 48, dt, True, True, True, True, view="l_stride")
for dt in (F32, BF16):                                      # the backward's forward: chunk states only
    check(2, 300, 40, dt, True, True, True, False, chunks_only=True)
    check(1, 1000, 32, dt, False, True, False, False, chunks_only=True)


def refused(what, B, L, D, dtype, view=None):
    """Inputs strip mode must leave to the other kernels: launch_strips_fwd returns false."""
    global fails
    ok = run(inputs(B, L, D, dtype, True, True, True, view=view), False, None) == []
    fails += not ok
    print(f"{'refused: ' + what:62s} {'OK ' if ok else 'BAD'}")


refused("D = 24 < 32", 2, 100, 24, F32)
refused("bf16 D = 36 (not a multiple of 8)", 2, 100, 36, BF16)
refused("a view 4 bytes off 16-byte alignment", 2, 100, 48, F32, view="misaligned")

# Gates near 1 from here on: a tile's state reaches many tiles ahead (0.9995^64 ~ 0.97), so a
# pair folded wrongly or the wrong tile's state shows. Above: a in [0.99, 1] (0.73 per fp32 tile).
# More CTAs (G | strips, or one tile per strip) and the look-back walks.
SLOW = dict(lo=0.999)
check(3, 300, 96, F32, True, True, True, False, grids=(3, 9), hides=(1, 2), **SLOW)
check(3, 300, 96, BF16, True, False, True, True, out=F32, grids=(2, 3, 6), hides=(1, 2), **SLOW)
check(2, 300, 40, F16, False, True, True, False, grids=(2,), hides=(1,), **SLOW)
check(3, 64, 96, F32, True, True, False, True, grids=(2, 4, 7, 9), **SLOW)       # one tile per strip: any G
check(2, 1, 40, BF16, True, True, True, False, grids=(3, 4), **SLOW)
check(2, 256, 48, F32, True, True, True, False, grids=(2, 4), hides=(1, 2), **SLOW)
check(1, 1000, 32, F32, True, True, True, False, hides=(1, 2), **SLOW)
check(1, 1000, 32, BF16, False, True, True, True, hides=(1, 2), **SLOW)
check(6, 700, 64, F32, True, True, True, False, grids=(3, 4, 12), hides=(1, 2), **SLOW)
check(6, 700, 64, BF16, True, True, True, False, grids=(2, 3, 6), hides=(1, 2), **SLOW)
# 71 tiles per strip: walks over many rounds of 8 tiles
check(1, 64 * 70 + 5, 32, F32, True, True, True, False, hides=(1, 2), **SLOW)
check(1, 64 * 70 + 5, 64, BF16, True, True, False, True, hides=(1, 2), **SLOW)
print("FAILS", fails)
sys.exit(1 if fails else 0)
