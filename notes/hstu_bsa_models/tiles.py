"""numpy mirror of the block-sparse CUDA kernels' tile logic (hstu_bsa_fwd.cu, hstu_bsa_bwd.cu):
the compressed tiles, the key-tile bitmaps of a query tile, the multiplicity tiles, the
coefficients, the dq kernel's published query-tile bitmap, the dkbar/dvbar pass, the dk/dv pass
over bitmap rows plus the window band, and the /BS spreads, in float64 with 64-row tiles
(MT = 1), against ssm_ext.reference autograd. Run: python notes/hstu_bsa_models/tiles.py
(about a minute on a CPU). It checks the algorithm, not the CUDA code itself."""
# Line-by-line numpy mirror of the tile logic of hstu_bsa_fwd.cu / hstu_bsa_bwd.cu / hstu_bsa_topk.cu
# (tile sets, bitmaps, multiplicity tiles, coefficients, spreads), checked against the reference.
import math, sys
import numpy as np, torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", ".."))
from ssm_ext.reference import hstu_bsa as ref
R64 = 64
sig = lambda x: 1 / (1 + np.exp(-x))

def run(lens, H, dqk, dv, bs, S, W, use_u, mask_on, seed=0, QC=32, idx_mode="topk"):
    rng = np.random.default_rng(seed)
    T = sum(lens); B = len(lens); n = max(lens + [1])
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    q = rng.standard_normal((T, H * dqk)); k = rng.standard_normal((T, H * dqk))
    v = rng.standard_normal((T, H * dv)); u = rng.standard_normal((T, H * dv)) if use_u else None
    gates = rng.random((T, H, 3)); dout = rng.standard_normal((T, H * dv))
    mask = (rng.random((B, n, n)) < 0.7).astype(float) if mask_on else None
    alpha = 1 / math.sqrt(dqk)
    max_len = max(lens + [0])
    bs = min(bs, max_len + 1)
    if idx_mode == "topk":
        idx = ref.select_blocks(torch.tensor(q), torch.tensor(k), torch.tensor(off), H, bs, S, alpha).numpy()
    else:
        idx = rng.integers(-2, 12, (T, H, S)).astype(np.int32); idx[:, :, 1] = idx[:, :, 0]
    n_tiles = (max_len + 63) // 64
    words = (n_tiles + 31) // 32
    cblk = np.concatenate([[0], np.cumsum([l // bs for l in lens])]).astype(np.int64)
    nbtot = T // bs + 1
    kbar = np.zeros((nbtot, H, dqk)); vbar = np.zeros((nbtot, H, dv))
    for b in range(B):
        s0 = off[b]; nb = lens[b] // bs
        for c in range(nb):
            rows = slice(s0 + c * bs, s0 + (c + 1) * bs)
            kbar[cblk[b] + c] = k[rows].reshape(bs, H, dqk).mean(0)
            vbar[cblk[b] + c] = v[rows].reshape(bs, H, dv).mean(0)
    da = dout * u if use_u else dout.copy()
    out = np.zeros((T, H * dv)); dq = np.zeros((T, H * dqk)); dk = np.zeros((T, H * dqk)); dvv = np.zeros((T, H * dv))
    dgates = np.zeros((T, H, 3)); du = np.zeros((T, H * dv)) if use_u else None
    gbits = np.zeros((B * H, n_tiles, words), dtype=np.uint64)
    dkbar = np.zeros((nbtot, H, dqk)); dvbar = np.zeros((nbtot, H, dv))
    def hq(x, h, d): return x[:, h * d:(h + 1) * d]
    def build_key_tiles(s0, h, L, q0):
        bits = set(); last = min(L, q0 + 64) - 1
        for r in range(64):
            t = q0 + r
            if t >= L: continue
            for s in range(S):
                c = int(idx[s0 + t, h, s])
                if c < 0 or c * bs > t: continue
                for kt in range(c * bs // 64, min((c + 1) * bs - 1, t) // 64 + 1): bits.add(kt)
        if W > 0:
            for kt in range(max(0, q0 - W + 1) // 64, last // 64 + 1): bits.add(kt)
        return sorted(bits)
    def build_mult(s0, h, L, t0, k0, nrows):
        m = np.zeros((nrows, 64))
        for r in range(nrows):
            t = t0 + r
            if t >= L: continue
            kz = min(t, k0 + 63)
            for s in range(S):
                c = int(idx[s0 + t, h, s])
                if c < 0: continue
                a = max(c * bs, k0); z = min((c + 1) * bs - 1, kz)
                for j in range(a, z + 1): m[r, j - k0] += 1
        return m
    def maskf(b, t, j):
        return 1.0 if mask is None else mask[b, t, j]
    def tile(x, r0, nrows, d):  # zero-filled rows of a (L, d) array
        outt = np.zeros((nrows, d)); a = x[r0:r0 + nrows]; outt[:a.shape[0]] = a; return outt
    for b in range(B):
        s0 = off[b]; L = lens[b]
        for h in range(H):
            Q = hq(q, h, dqk)[s0:s0 + L]; K = hq(k, h, dqk)[s0:s0 + L]; V = hq(v, h, dv)[s0:s0 + L]
            A = hq(da, h, dv)[s0:s0 + L]
            Kb = kbar[cblk[b]:cblk[b] + L // bs, h]; Vb = vbar[cblk[b]:cblk[b] + L // bs, h]
            wnd = min(W, L)
            for m in range(n_tiles):
                q0 = m * 64
                if q0 >= L: continue
                last = min(L, q0 + 64) - 1
                Qt = tile(Q, q0, 64, dqk); At = tile(A, q0, 64, dv)
                ts = q0 + np.arange(64)
                valid = ts < L
                g = np.zeros((64, 3)); g[valid] = gates[s0 + ts[valid], h]
                if wnd == 0: g[:, 2] = 0
                o = np.zeros((64, dv)); dqt = np.zeros((64, dqk)); dg = np.zeros((64, 3))
                n_cmp = (last + 1) // bs
                for ct in range((n_cmp + 63) // 64):
                    c0 = ct * 64
                    Kt = tile(Kb, c0, min(64, n_cmp - c0), dqk); Kt = np.vstack([Kt, np.zeros((64 - Kt.shape[0], dqk))])
                    Vt = tile(Vb, c0, min(64, n_cmp - c0), dv); Vt = np.vstack([Vt, np.zeros((64 - Vt.shape[0], dv))])
                    x = alpha * Qt @ Kt.T; dp = At @ Vt.T; sg = sig(x)
                    cs = c0 + np.arange(64)
                    mm = np.where((cs[None, :] + 1) * bs <= ts[:, None] + 1, 1 / n, 0.0)
                    P = x * sg * mm * g[:, 0:1]
                    o += P @ Vt
                    dg[:, 0] += (x * sg * mm * dp).sum(1)
                    ds = alpha * dp * mm * g[:, 0:1] * sg * (1 + x * (1 - sg))
                    dqt += ds @ Kt
                kts = build_key_tiles(s0, h, L, q0)
                for kt in kts: gbits[b * H + h, kt, m // 32] |= np.uint64(1 << (m % 32))
                for kt in kts:
                    k0 = kt * 64
                    Kt = tile(K, k0, 64, dqk); Vt = tile(V, k0, 64, dv)
                    Kt = np.vstack([Kt, np.zeros((64 - Kt.shape[0], dqk))]); Vt = np.vstack([Vt, np.zeros((64 - Vt.shape[0], dv))])
                    mult = build_mult(s0, h, L, q0, k0, 64)
                    x = alpha * Qt @ Kt.T; dp = At @ Vt.T; sg = sig(x)
                    cs = np.zeros((64, 64)); cw = np.zeros((64, 64)); mm = np.zeros((64, 64))
                    for r in range(64):
                        t = q0 + r
                        for kc in range(64):
                            kj = k0 + kc
                            if kj <= t and t < L:
                                cs[r, kc] = mult[r, kc]; cw[r, kc] = 1.0 if kj > t - wnd else 0.0
                                mm[r, kc] = (1 / n) * (maskf(b, t, kj) if (cs[r, kc] or cw[r, kc]) else 1)
                    coef = g[:, 1:2] * cs + g[:, 2:3] * cw
                    o += (x * sg * mm * coef) @ Vt
                    base = x * sg * mm * dp
                    dg[:, 1] += (cs * base).sum(1); dg[:, 2] += (cw * base).sum(1)
                    dqt += (alpha * dp * mm * coef * sg * (1 + x * (1 - sg))) @ Kt
                nv = min(64, L - q0)
                uu = hq(u, h, dv)[s0 + q0:s0 + q0 + nv] if use_u else 1.0
                out[s0 + q0:s0 + q0 + nv, h * dv:(h + 1) * dv] = uu * o[:nv]
                if use_u: du[s0 + q0:s0 + q0 + nv, h * dv:(h + 1) * dv] = hq(dout, h, dv)[s0 + q0:s0 + q0 + nv] * o[:nv]
                dq[s0 + q0:s0 + q0 + nv, h * dqk:(h + 1) * dqk] = dqt[:nv]
                dgates[s0 + q0:s0 + q0 + nv, h] = dg[:nv]
    # cmp kernel
    for b in range(B):
        s0 = off[b]; L = lens[b]; nb = L // bs
        for h in range(H):
            Q = hq(q, h, dqk)[s0:s0 + L]; A = hq(da, h, dv)[s0:s0 + L]
            for cb in range((nb + 63) // 64):
                c0 = cb * 64
                Kt = np.zeros((64, dqk)); Vt = np.zeros((64, dv)); nn = min(64, nb - c0)
                Kt[:nn] = kbar[cblk[b] + c0:cblk[b] + c0 + nn, h]; Vt[:nn] = vbar[cblk[b] + c0:cblk[b] + c0 + nn, h]
                dkt = np.zeros((64, dqk)); dvt = np.zeros((64, dv))
                first = ((c0 + 1) * bs - 1) // QC; n_qt = (L + QC - 1) // QC
                for uq in range(first, n_qt):
                    t0 = uq * QC
                    Qt = tile(Q, t0, QC, dqk); Qt = np.vstack([Qt, np.zeros((QC - Qt.shape[0], dqk))])
                    At = tile(A, t0, QC, dv); At = np.vstack([At, np.zeros((QC - At.shape[0], dv))])
                    tsq = t0 + np.arange(QC); gc = np.where(tsq < L, gates[np.minimum(s0 + tsq, T - 1), h, 0], 0)
                    x = alpha * Kt @ Qt.T; dp = Vt @ At.T; sg = sig(x)
                    cs = c0 + np.arange(64)
                    cf = np.where(((cs[:, None] + 1) * bs <= tsq[None, :] + 1) & (cs[:, None] < nb), gc[None, :] / n, 0)
                    dvt += (x * sg * cf) @ At; dkt += (alpha * dp * cf * sg * (1 + x * (1 - sg))) @ Qt
                dkbar[cblk[b] + c0:cblk[b] + c0 + nn, h] = dkt[:nn]; dvbar[cblk[b] + c0:cblk[b] + c0 + nn, h] = dvt[:nn]
    # dkdv kernel
    Rr = 64 // QC
    for b in range(B):
        s0 = off[b]; L = lens[b]; wnd = min(W, L)
        for h in range(H):
            Q = hq(q, h, dqk)[s0:s0 + L]; K = hq(k, h, dqk)[s0:s0 + L]; V = hq(v, h, dv)[s0:s0 + L]; A = hq(da, h, dv)[s0:s0 + L]
            for kt in range(n_tiles):
                k0 = kt * 64
                if k0 >= L: continue
                qset = set(mq for mq in range(n_tiles) if int(gbits[b * H + h, kt, mq // 32]) >> (mq % 32) & 1)
                if wnd > 0:
                    for mq in range(k0 // 64, min(L - 1, k0 + 63 + wnd - 1) // 64 + 1): qset.add(mq)
                Kt = tile(K, k0, 64, dqk); Kt = np.vstack([Kt, np.zeros((64 - Kt.shape[0], dqk))])
                Vt = tile(V, k0, 64, dv); Vt = np.vstack([Vt, np.zeros((64 - Vt.shape[0], dv))])
                dkt = np.zeros((64, dqk)); dvt = np.zeros((64, dv))
                for mq in sorted(qset):
                    for sub in range(Rr):
                        t0 = (mq * Rr + sub) * QC
                        Qt = tile(Q, t0, QC, dqk); Qt = np.vstack([Qt, np.zeros((QC - Qt.shape[0], dqk))])
                        At = tile(A, t0, QC, dv); At = np.vstack([At, np.zeros((QC - At.shape[0], dv))])
                        mult = build_mult(s0, h, L, t0, k0, QC)
                        tsq = t0 + np.arange(QC); ok = tsq < L
                        gs_ = np.where(ok, gates[np.minimum(s0 + tsq, T - 1), h, 1], 0)
                        gw_ = np.where(ok & (wnd > 0), gates[np.minimum(s0 + tsq, T - 1), h, 2], 0)
                        x = alpha * Kt @ Qt.T; dp = Vt @ At.T; sg = sig(x)
                        cf = np.zeros((64, QC))
                        for kr in range(64):
                            kj = k0 + kr
                            for tc in range(QC):
                                t = t0 + tc
                                if kj <= t and t < L:
                                    c = gs_[tc] * mult[tc, kr] + (gw_[tc] if kj > t - wnd else 0)
                                    if mask is not None and c != 0: c *= mask[b, t, kj]
                                    cf[kr, tc] = c
                        cf /= n
                        dvt += (x * sg * cf) @ At; dkt += (alpha * dp * cf * sg * (1 + x * (1 - sg))) @ Qt
                nbk = (L // bs) * bs
                for r in range(64):
                    kj = k0 + r
                    if kj < nbk:
                        dkt[r] += dkbar[cblk[b] + kj // bs, h] / bs; dvt[r] += dvbar[cblk[b] + kj // bs, h] / bs
                nv = min(64, L - k0)
                dk[s0 + k0:s0 + k0 + nv, h * dqk:(h + 1) * dqk] = dkt[:nv]; dvv[s0 + k0:s0 + k0 + nv, h * dv:(h + 1) * dv] = dvt[:nv]
    # reference
    tq = [torch.tensor(x, requires_grad=True) if x is not None else None for x in (q, k, v, u, gates)]
    r, _ = ref.hstu_bsa(*tq, torch.tensor(off), n, H, bs, S, W, alpha=alpha,
                        attn_mask=None if mask is None else torch.tensor(mask), block_idx=torch.tensor(idx))
    live = [t for t in tq if t is not None]
    rg = torch.autograd.grad(r, live, torch.tensor(dout))
    ours = [dq, dk, dvv] + ([du] if use_u else []) + [dgates]
    names = ["dq", "dk", "dv"] + (["du"] if use_u else []) + ["dgates"]
    err = lambda a, b: np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    res = {"out": err(out, r.detach().numpy())}
    for nm, a, g_ in zip(names, ours, rg): res[nm] = err(a, g_.numpy())
    return res

cases = [
    dict(lens=[1, 0, 150, 64, 70], H=1, dqk=8, dv=6, bs=16, S=4, W=40, use_u=True, mask_on=False),
    dict(lens=[150, 70], H=1, dqk=8, dv=8, bs=64, S=2, W=100, use_u=False, mask_on=True),
    dict(lens=[130, 5], H=1, dqk=4, dv=4, bs=3, S=5, W=0, use_u=True, mask_on=False, QC=64),
    dict(lens=[140], H=2, dqk=4, dv=4, bs=1, S=3, W=1, use_u=True, mask_on=True),
    dict(lens=[150, 40], H=1, dqk=4, dv=4, bs=16, S=6, W=20, use_u=True, mask_on=False, idx_mode="hand"),
    dict(lens=[200], H=1, dqk=4, dv=4, bs=300, S=3, W=70, use_u=True, mask_on=False),
]
for c in cases:
    res = run(**c)
    bad = {k: v for k, v in res.items() if v > 1e-9}
    print("OK " if not bad else "BAD", c, {k: f"{v:.1e}" for k, v in res.items()})
