"""Model of ldmatrix (.x4, .trans) and mma.sync.m16n8k16 fragments as the PTX ISA defines them,
driven by the address formulas of gemm_abt / gemm_pb in csrc/hstu_bsa/hstu_tile.cuh (XOR-swizzled
[rows][D] bf16 tiles), checked against numpy matmuls for D = 32, 64, 128 and 4 / 8 column tiles.
Run: python notes/hstu_bsa_models/fragments.py"""
import numpy as np
rng = np.random.default_rng(0)

def make_tile(D, kE=8):
    kC = D // kE
    def swz(r): return (r & 7) if kC >= 8 else ((r >> 1) & 3)
    def off(r, c): return r * D + ((c ^ swz(r)) * kE)
    return off

def store(mat, D):  # mat [rows][D] -> smem array via off()
    off = make_tile(D)
    rows = mat.shape[0]
    s = np.full(rows * D, np.nan)
    for r in range(rows):
        for c in range(D // 8):
            o = off(r, c)
            s[o:o + 8] = mat[r, c * 8:(c + 1) * 8]
    return s, off

def ldmatrix(s, addrs, trans):
    # addrs[lane] = element offset of the 8-element row that lane provides (matrix lane//8, row lane%8)
    regs = [[None] * 4 for _ in range(32)]
    for j in range(4):
        m = np.array([s[addrs[j * 8 + r]: addrs[j * 8 + r] + 8] for r in range(8)])  # 8x8
        for l in range(32):
            if not trans:
                regs[l][j] = (m[l // 4, 2 * (l % 4)], m[l // 4, 2 * (l % 4) + 1])
            else:
                regs[l][j] = (m[2 * (l % 4), l // 4], m[2 * (l % 4) + 1, l // 4])
    return regs

def mma(acc, a, b0, b1):
    # acc[lane][4], a[lane][4 pairs], b0/b1[lane] pairs
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for l in range(32):
        g, q = l // 4, l % 4
        A[g, 2*q:2*q+2] = a[l][0]; A[g+8, 2*q:2*q+2] = a[l][1]
        A[g, 2*q+8:2*q+10] = a[l][2]; A[g+8, 2*q+8:2*q+10] = a[l][3]
        B[2*q:2*q+2, g] = b0[l]; B[2*q+8:2*q+10, g] = b1[l]
    C = A @ B
    for l in range(32):
        g, q = l // 4, l % 4
        acc[l][0] += C[g, 2*q]; acc[l][1] += C[g, 2*q+1]; acc[l][2] += C[g+8, 2*q]; acc[l][3] += C[g+8, 2*q+1]

def gemm_abt(sA, a0, sB, b0, D, NT, off):
    acc = [[[0.0] * 4 for _ in range(NT)] for _ in range(32)]  # acc[lane][j][e]
    for kk in range(D // 16):
        addrs = [off(a0 + (l & 7) + ((l >> 3) & 1) * 8, kk * 2 + (l >> 4)) for l in range(32)]
        a = ldmatrix(sA, addrs, False)
        for j in range(0, NT, 2):
            addrs = [off(b0 + j * 8 + (l & 7) + ((l >> 3) >> 1) * 8, kk * 2 + ((l >> 3) & 1)) for l in range(32)]
            b = ldmatrix(sB, addrs, False)
            accj = [acc[l][j] for l in range(32)]; mma(accj, a, [b[l][0] for l in range(32)], [b[l][1] for l in range(32)])
            accj = [acc[l][j+1] for l in range(32)]; mma(accj, a, [b[l][2] for l in range(32)], [b[l][3] for l in range(32)])
    return acc

def frag_to_mat(acc, NT):
    M = np.zeros((16, NT * 8))
    for l in range(32):
        g, q = l // 4, l % 4
        for j in range(NT):
            for e in range(4):
                M[g + 8 * (e >> 1), 8 * j + 2 * q + (e & 1)] = acc[l][j][e]
    return M

def gemm_pb(P, sB, b0, D, NK, off):
    out = [[[0.0] * 4 for _ in range(D // 8)] for _ in range(32)]
    for kk in range(NK // 2):
        a = [[(P[l][2*kk][0], P[l][2*kk][1]), (P[l][2*kk][2], P[l][2*kk][3]), (P[l][2*kk+1][0], P[l][2*kk+1][1]), (P[l][2*kk+1][2], P[l][2*kk+1][3])] for l in range(32)]
        for dt in range(0, D // 8, 2):
            addrs = [off(b0 + kk * 16 + (l & 7) + ((l >> 3) & 1) * 8, dt + ((l >> 3) >> 1)) for l in range(32)]
            b = ldmatrix(sB, addrs, True)
            o = [out[l][dt] for l in range(32)]; mma(o, a, [b[l][0] for l in range(32)], [b[l][1] for l in range(32)])
            o = [out[l][dt+1] for l in range(32)]; mma(o, a, [b[l][2] for l in range(32)], [b[l][3] for l in range(32)])
    return out

for D in (32, 64, 128):
    for NT in (4, 8):
        A = rng.standard_normal((64, D)); B = rng.standard_normal((64, D))
        sA, off = store(A, D); sB, _ = store(B, D)
        for w in range(4):
            acc = gemm_abt(sA, w * 16, sB, 0, D, NT, off)
            ref = A[w*16:w*16+16] @ B[:NT*8].T
            assert np.allclose(frag_to_mat(acc, NT), ref), (D, NT, w)
        # gemm_pb: P (16 x NT*8) in fragments times B rows [b0 .. b0 + NT*8)
        P = rng.standard_normal((16, NT * 8))
        Pf = [[[P[(l//4) + 8*(e>>1), 8*j + 2*(l%4) + (e&1)] for e in range(4)] for j in range(NT)] for l in range(32)]
        out = gemm_pb(Pf, sB, 16 if NT == 4 else 0, D, NT, off)
        b0 = 16 if NT == 4 else 0
        assert np.allclose(frag_to_mat(out, D // 8), P @ B[b0:b0 + NT * 8]), (D, NT, "pb")
print("fragment layouts OK")
