// CUDA backward of the ISSM scan. Same semantics as issm_cpu.cpp's backward; chunks of 64 steps.
//   1. fwd_chunk_kernel (issm_cuda.cuh) in kOutBwd mode: the state entering each chunk, the
//      chunk decay products, gy = dout * silu(z) (fp32 scratch) and dz.
//   2. adj_local_kernel: per chunk, the adjoint of the chunk's entering state from the chunk's
//      own outputs (the reverse walk dS := decay (dS + C gy^T), zeroed at segment starts / resets,
//      dfinal_states added at segment ends), summed as a forward product over the steps.
//   3. pass_kernel: the adjoint at the end of each chunk from all later chunks.
//   4. bwd_chunk_kernel: per (chunk, p-tile, 32-state n-tile), thread = 4 p x 2 n, the forward
//      states of the chunk are recomputed (block boundaries every kTS steps in shared memory, then
//      a block's step history in registers) and the chunk walked in reverse: dx partials (over this
//      n-tile, a lane reduce-scatter per block), and per (t, n) sums over the CTA's p of
//      dk = dS^T x, dlog = (dS . s_{t-1}) decay and dC = s_t^T gy (warp partials summed over warps
//      in order); dinitial_states at segment starts.
//   5. finish_n_kernel: per (row, 16 steps, group, 128 states): ddt (through the clamp mask and
//      softplus), dB = delta dk and dC summed over the group's heads in order, partials of dA
//      and ddt_bias. finish_p_kernel: dx = D gy + the n-tile partials in order, partials of dD.
//      colsum_kernel: dA, ddt_bias, dD summed over the partials in a fixed order; params_kernel:
//      stored in their dtypes (per-head shapes by a fixed tree).
// No atomics; every sum has a fixed order: the gradients are bitwise reproducible.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "issm/issm.h"
#include "issm/issm_cuda.cuh"

namespace ssm_ext {
namespace issm {
namespace {

constexpr int kBwdChunk = 64;
constexpr int kSub = kBwdChunk / kTS;  // blocks per chunk
constexpr int kTB = 16;                // steps per CTA in the finishing kernels

struct BwdBufs {
  float* states;  // entering states (nrows, nchunks, H, P, N)
  float* prod;    // (nrows, nchunks, H, N)
  float* gy;      // (nrows, L, H, P)
  float* adj;     // adjoint at chunk ends (nrows, nchunks, H, P, N)
  float* dxpart;  // (ntn, nrows, L, H, P)
  float* nred;    // (3, ntp, nrows, L, H, N): dk, dlog, dC summed over a p-tile
  // (nrows * ntb, ncols) partials of the parameter gradients per (row, block of kTB steps), in
  // columns [0, HN) dA (h, n), [HN, 2 HN) ddt_bias (h, n), [2 HN, ncols) dD (h, p); then their sums
  float* parts;
  float* sums;  // (ncols)
  int64_t ncols;
  int64_t ntb;
};

// Four consecutive elements from src (stride s between them; the first nv valid, the rest read as 0) as
// fp32. kVec: one 4-element access (the launcher checked unit stride and alignment, and that nv >= 4 or <= 0).
template <typename T, bool kVec>
__device__ __forceinline__ void load4(const T* src, int64_t s, int nv, float (&v)[4]) {
  if constexpr (kVec) {
    if (nv > 0) {
      load_vec<T, 4>(src, v);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) v[e] = 0.f;
    }
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = e < nv ? float(src[e * s]) : 0.f;
  }
}

// The first nv of four values to contiguous dst.
template <typename T, bool kVec>
__device__ __forceinline__ void store4(T* dst, int nv, const float (&v)[4]) {
  if constexpr (kVec) {
    if (nv > 0) store_vec<T, 4>(dst, v);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (e < nv) dst[e] = T(v[e]);
  }
}

// A or dt_bias at (h, n .. n + 3) as fp32 (0 past nv): one 16-byte load when `fast` (fp32, unit stride along
// n, 16-byte aligned rows, nv >= 4 or <= 0), else per element in its dtype.
__device__ __forceinline__ void param4(const void* ptr, Dtype dtype, const View4& v, bool fast, int h, int n, int nv,
                                       float (&out)[4]) {
  if (fast && nv >= 4) {
    const float4 q = *reinterpret_cast<const float4*>(static_cast<const float*>(ptr) + v.at(h, n));
    out[0] = q.x, out[1] = q.y, out[2] = q.z, out[3] = q.w;
    return;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) out[e] = e < nv ? load_as<float>(ptr, dtype, v.at(h, n + e)) : 0.f;
}

// Step 2. The adjoint of the state entering a chunk from the chunk's own outputs. With L_t[n] the product
// of dec over the chunk's steps up to t (0 from a segment start or seq_idx reset on: the entering state
// does not pass it),
//   adj[p, n] = sum_t L_t[n] (C_t[n] gy_t[p] + dfinal_i[p, n] if t ends segment i),
// the reverse walk dS := dec (dS + C gy^T) from 0, summed forward instead: a (P x steps) (steps x N)
// product, one FFMA per (t, p, n) with no chain through the steps' decays.
// CTA = (row, h, chunk, p-tile, n-tile of NT = 32 NPT <= 128 states), thread = kPPT p x NPT n (Tile<NPT>).
// The chunk in stages of kAS steps: (1) all threads: dec (0 at starts / resets) and C per (t, n), loaded
// 4 n at a time (one vector access when the strides allow), and gy per (t, p), into shared memory, kAB
// groups of loads in flight per thread; (2) thread per n: L_t (carried across stages) and w_t = L_t C_t
// in place; (3) per step adj += w_t gy_t^T; the dfinal terms of the stage's segment ends after it.
constexpr int kAS = 32;  // steps per stage
constexpr int kAB = 4;   // loads batched per thread
static_assert(kAS == kAB * 32 / kPPT, "gy of a stage: kAB elements per thread (a CTA has 32 / kPPT threads per p)");

template <int NT>
struct alignas(16) AdjStage {
  float dec[kAS][NT];  // dec, then L
  float w[kAS][NT];    // C, then L C
  float gy[kAS][kMaxPC];
};

template <typename T, int NPT, bool kVec>
__global__ SSM_EXT_MAXNREG(72) void adj_local_kernel(IssmParams p, Tiling tl, BwdBufs bb) {
  constexpr int NT = 32 * NPT, NQ = NT / 4;
  __shared__ AdjStage<NT> st;
  __shared__ float sA[NT], sbias[NT], sL[NT];
  __shared__ int ev_start[kBwdChunk], ev_end[kBwdChunk];
  const Tile<NPT> u = make_tile<NPT>(p, tl);
  load_cta_constants<NPT>(p, tl, u, sA, sbias, ev_start, ev_end);
  for (int j = threadIdx.x; j < NT; j += blockDim.x) sL[j] = 1.f;
  const int N = static_cast<int>(p.dstate), P = static_cast<int>(p.headdim), HP = static_cast<int>(p.nheads) * P;
  const T* dt0 = static_cast<const T*>(p.dt.ptr) + p.dt.at(u.a.row, u.c0, u.a.h, u.nlo);
  const T* C0 = static_cast<const T*>(p.C.ptr) + p.C.at(u.a.row, u.c0, u.g, u.nlo);
  const float* gy0 = bb.gy + gy_index(p, u.a.row, u.c0, u.a.h, u.plo);
  const int gts = threadIdx.x / u.PC, gpc = threadIdx.x % u.PC;  // gy elements: steps gts + 8 k, p plo + gpc
  const bool has_df = p.dfinal_states.ptr != nullptr;
  float acc[kPPT][NPT];
#pragma unroll
  for (int j = 0; j < kPPT; ++j)
#pragma unroll
    for (int jn = 0; jn < NPT; ++jn) acc[j][jn] = 0.f;
  for (int s0 = 0; s0 < u.c1 - u.c0; s0 += kAS) {
    const int rem = u.c1 - u.c0 - s0, ns = rem < kAS ? rem : kAS;  // the stage's steps inside the chunk
    __syncthreads();  // the constants are written; the previous stage's reads are done
    {
      float g[kAB];
#pragma unroll
      for (int k = 0; k < kAB; ++k) {
        const int ts = gts + k * (32 / kPPT);
        g[k] = ts < ns && u.plo + gpc < P ? gy0[int64_t(s0 + ts) * HP + gpc] : 0.f;
      }
#pragma unroll
      for (int k = 0; k < kAB; ++k) st.gy[gts + k * (32 / kPPT)][gpc] = g[k];
    }
    auto dec_of = [&](int ts, int j, float dtv) {
      return ev_start[s0 + ts] != -2 ? 0.f : __expf(delta_of(p, dtv + sbias[j], nullptr) * sA[j]);
    };
    if constexpr (kVec) {
      for (int i0 = threadIdx.x; i0 < kAS * NQ; i0 += kAB * blockDim.x) {
        float d[kAB][4], c[kAB][4];
#pragma unroll
        for (int k = 0; k < kAB; ++k) {
          const int i = i0 + k * blockDim.x, ts = i / NQ, jq = 4 * (i % NQ);
          const int nv = i < kAS * NQ && ts < ns ? N - u.nlo - jq : 0;
          const int64_t t = s0 + ts;
          load4<T, true>(dt0 + t * p.dt.s1 + jq, 1, nv, d[k]);
          load4<T, true>(C0 + t * p.C.s1 + jq, 1, nv, c[k]);
        }
#pragma unroll
        for (int k = 0; k < kAB; ++k) {
          const int i = i0 + k * blockDim.x, ts = i / NQ, jq = 4 * (i % NQ);
          if (i >= kAS * NQ) break;
          float dec[4] = {1.f, 1.f, 1.f, 1.f};  // outside the chunk or the states: no contribution
          if (ts < ns && u.nlo + jq < N) {
#pragma unroll
            for (int e = 0; e < 4; ++e) dec[e] = dec_of(ts, jq + e, d[k][e]);
          }
          *reinterpret_cast<float4*>(&st.dec[ts][jq]) = make_float4(dec[0], dec[1], dec[2], dec[3]);
          *reinterpret_cast<float4*>(&st.w[ts][jq]) = make_float4(c[k][0], c[k][1], c[k][2], c[k][3]);
        }
      }
    } else {
      for (int i = threadIdx.x; i < kAS * NT; i += blockDim.x) {
        const int ts = i / NT, j = i % NT;
        const bool in = ts < ns && u.nlo + j < N;
        const int64_t t = s0 + ts;
        st.dec[ts][j] = in ? dec_of(ts, j, float(dt0[t * p.dt.s1 + j * p.dt.s3])) : 1.f;
        st.w[ts][j] = in ? float(C0[t * p.C.s1 + j * p.C.s3]) : 0.f;
      }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < NT; j += blockDim.x) {
      float Lc = sL[j];
#pragma unroll 8
      for (int ts = 0; ts < kAS; ++ts) {
        Lc *= st.dec[ts][j];
        st.dec[ts][j] = Lc;
        st.w[ts][j] *= Lc;
      }
      sL[j] = Lc;
    }
    __syncthreads();
#pragma unroll 8
    for (int ts = 0; ts < kAS; ++ts) {  // steps past the chunk have w = 0, gy = 0
      float w[NPT];
      lds<NPT>(&st.w[ts][u.lane * NPT], w);
      const float4 gq = *reinterpret_cast<const float4*>(&st.gy[ts][u.warp * kPPT]);
      const float gv[kPPT] = {gq.x, gq.y, gq.z, gq.w};
#pragma unroll
      for (int j = 0; j < kPPT; ++j)
#pragma unroll
        for (int jn = 0; jn < NPT; ++jn) acc[j][jn] = fmaf(w[jn], gv[j], acc[j][jn]);
    }
    if (has_df) {
      for (int ts = 0; ts < ns; ++ts) {
        const int end = ev_end[s0 + ts];
        if (end < 0) continue;
        float Lt[NPT];
        lds<NPT>(&st.dec[ts][u.lane * NPT], Lt);
        // contiguous fp32 (nseq, H, P, N) here (bwd_cuda)
        const float* df = static_cast<const float*>(p.dfinal_states.ptr) + (int64_t(end) * p.nheads + u.a.h) * P * N;
#pragma unroll
        for (int j = 0; j < kPPT; ++j)
#pragma unroll
          for (int jn = 0; jn < NPT; ++jn)
            if (u.pin[j] && u.nin[jn]) acc[j][jn] = fmaf(Lt[jn], df[int64_t(u.pw + j) * N + u.nl + jn], acc[j][jn]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kPPT; ++j) {
    if (!u.pin[j]) continue;
    float* dst = bb.adj + state_index(p, tl, u.a.row, u.a.c, u.a.h, u.pw + j, u.nl);
    if constexpr (NPT == 4) {
      if (N % 4 == 0 && u.nin[0]) {
        *reinterpret_cast<float4*>(dst) = make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
        continue;
      }
    }
#pragma unroll
    for (int jn = 0; jn < NPT; ++jn)
      if (u.nin[jn]) dst[jn] = acc[j][jn];
  }
}

// Step 4. 2-D lane layout. CTA = (row, h, chunk, p-tile, 32-state n-tile) with W warps; warp w owns
// the 8 p from pw0 = plo + 8 w; lane l = 16 hf + q (hf: p half, q: n pair) owns the 4 p from
// pw0 + 4 hf and the 2 states nlo + 2 q, nlo + 2 q + 1: a thread holds 4 p x 2 n, a warp 8 p x 32 n, a
// CTA 8 W p x 32 n (W = 5 at P = 36). The thread's two n are held in the order (own, other) with own
// = nlo + 2 q + hf: the staged dec, k, C have a second copy with each pair swapped, so that one 8-byte
// load gives both halves their order; the sums over the warp's 8 p for n then take the own half's
// partial and the other half's via one shuffle (lane ^ 16), no select. Per step, the shared loads of x,
// gy (one float4 each), dec, k, C (8 bytes each) and the step's events serve the thread's 8 states.
// The chunk's nb blocks of kTS steps go through the staging pipeline in the order 0 .. nb-2 (pass 1:
// the state entering each block kept in shared memory, each thread its own columns), then nb-1 .. 0
// (pass 2: the states entering the block's steps recomputed into registers, pv, then the block
// walked in reverse). Per (step, n), the sums over the warp's p of dk, dlog, dC go to shared memory and
// are summed over the warps in order once per block (4 n per thread, float4); per (step, p), the dx
// terms (summed over the thread's 2 n) stay in registers for the block and are summed over the 16
// lanes of the half once per block (a 32-value reduce-scatter over lane bits 3..0: 30 shuffles per
// 8 steps, 2 values per lane). The loops over a block's steps are unrolled (pv and the dx terms are
// register arrays) with a lean body: the rare events only load or store. Staging: a thread's global
// loads are addressed from CTA-uniform block pointers (stepped by +-kTS steps) plus per-thread 32-bit
// offsets computed once; in pass 2 the next block's loads are issued after the reverse walk, so that
// their registers are free during it.
// Shared memory: static BwdStage + constants (11 KB); dynamic bwd_smem(W): 3 W kTS 32 floats of warp
// partials, then kSub * 8 floats per thread of block-entering states (66 KB in all at P = 36: three
// CTAs (15 warps) per SM at <= 128 registers; P = 64: 101 KB, two CTAs of 8 warps).
constexpr int kBPW = 2 * kPPT;  // p per warp
constexpr int kBMaxWarps = kMaxPC / kBPW;
constexpr int kBQ = 2;  // (step, n) elements of a block prefetched per thread (all of them from 4 warps up)

struct alignas(16) BwdStage {
  float dec[kTS][64];  // [ts][j]: n-tile state j; [ts][32 + (j ^ 1)]: the same, pairs swapped
  float k[kTS][64];
  float C[kTS][64];
  float x[kTS][kMaxPC];  // [ts][p - plo]
  float gy[kTS][kMaxPC];
};

inline size_t bwd_smem(int warps) { return sizeof(float) * (3 * kTS * 32 + kSub * 8 * 32) * warps; }

template <typename T>
struct BwdRaw {
  T dt[kBQ], B[kBQ], C[kBQ];
  T x[2];
  float gy[2];
};

// The staging elements of a thread: (step, n) elements i = tid + q blockDim for q < kBQ (step ts + q W,
// state j = tid % 32, with ts = tid / 32: blockDim = 32 W) and two (step, p) elements tid + q blockDim
// (step xts + 4 q, p = plo + tid % PC, with xts = tid / PC: blockDim = 4 PC). Their global offsets
// relative to the chunk's first step and the tile's first n (p) are 32-bit (bwd_cuda makes sure that a
// chunk's span fits): block jb, element q is at jb kTS s1 + o + q dq. ts = kBwdChunk (xts = kBwdChunk)
// marks a state (p) outside the tile, so that `ts + q W < steps of the block` is the whole test.
struct BwdStageIdx {
  int ts, xts, xs;                // xs: the (step, p) element's index in BwdStage x / gy
  unsigned odt, oB, oC, ox, ogy;  // element 0
};

// CTA-uniform: the tile's inputs at its chunk's first step, the offsets between a thread's elements (q)
// and the offsets of one block (kTS steps).
template <typename T>
struct BwdBase {
  const T *dt, *B, *C, *x;
  const float* gy;
  unsigned qdt, qB, qC, qx, qgy;  // W steps of dt, B, C; 4 of x, gy
  unsigned sdt, sB, sC, sx, sgy;  // kTS steps
};

// Makes v opaque to the compiler, so that it keeps (or spills) the value instead of recomputing it from
// its inputs at every use (the staging offsets would cost several instructions each per block).
template <typename V>
__device__ __forceinline__ void opaque(V& v) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(V) == 8) asm volatile("" : "+l"(v));
  else asm volatile("" : "+r"(v));
#endif
}

__device__ __forceinline__ BwdStageIdx bwd_stage_idx(const IssmParams& p, const Tile<1>& u, int PC, int plo) {
  BwdStageIdx si;
  const int tid = threadIdx.x, ts = tid >> 5, j = tid & 31, xts = tid / PC, pc = tid % PC;
  si.ts = u.nlo + j < p.dstate ? ts : kBwdChunk;
  si.xts = plo + pc < p.headdim ? xts : kBwdChunk;
  si.xs = xts * kMaxPC + pc;
  si.odt = static_cast<unsigned>(ts * p.dt.s1 + j * p.dt.s3);
  si.oB = static_cast<unsigned>(ts * p.B.s1 + j * p.B.s3);
  si.oC = static_cast<unsigned>(ts * p.C.s1 + j * p.C.s3);
  si.ox = static_cast<unsigned>(xts * p.x.s1 + pc * p.x.s3);
  si.ogy = static_cast<unsigned>(xts * p.nheads * p.headdim + pc);
  opaque(si.ts), opaque(si.xts), opaque(si.xs);
  opaque(si.odt), opaque(si.oB), opaque(si.oC), opaque(si.ox), opaque(si.ogy);
  return si;
}

template <typename T>
__device__ __forceinline__ BwdBase<T> bwd_base(const IssmParams& p, const float* gy, const Tile<1>& u, int plo, int W) {
  const int64_t row = u.a.row, h = u.a.h, HP = p.nheads * p.headdim;
  BwdBase<T> bs;
  bs.dt = static_cast<const T*>(p.dt.ptr) + p.dt.at(row, u.c0, h, u.nlo);
  bs.B = static_cast<const T*>(p.B.ptr) + p.B.at(row, u.c0, u.g, u.nlo);
  bs.C = static_cast<const T*>(p.C.ptr) + p.C.at(row, u.c0, u.g, u.nlo);
  bs.x = static_cast<const T*>(p.x.ptr) + p.x.at(row, u.c0, h, plo);
  bs.gy = gy + gy_index(p, row, u.c0, h, plo);
  bs.qdt = static_cast<unsigned>(W * p.dt.s1), bs.qB = static_cast<unsigned>(W * p.B.s1);
  bs.qC = static_cast<unsigned>(W * p.C.s1), bs.qx = static_cast<unsigned>(4 * p.x.s1);
  bs.qgy = static_cast<unsigned>(4 * HP);
  bs.sdt = static_cast<unsigned>(kTS * p.dt.s1), bs.sB = static_cast<unsigned>(kTS * p.B.s1);
  bs.sC = static_cast<unsigned>(kTS * p.C.s1), bs.sx = static_cast<unsigned>(kTS * p.x.s1);
  bs.sgy = static_cast<unsigned>(kTS * HP);
  opaque(bs.dt), opaque(bs.B), opaque(bs.C), opaque(bs.x), opaque(bs.gy);
  opaque(bs.qdt), opaque(bs.qB), opaque(bs.qC), opaque(bs.qx), opaque(bs.qgy);
  opaque(bs.sdt), opaque(bs.sB), opaque(bs.sC), opaque(bs.sx), opaque(bs.sgy);
  return bs;
}

// Issues the loads of block jb (rem: its steps inside the chunk, at most kTS); nothing waits on them here.
template <typename T>
__device__ __forceinline__ void bwd_prefetch(BwdRaw<T>& r, const BwdBase<T>& bs, const BwdStageIdx& si, int jb,
                                             int rem, int W) {
  const unsigned b = static_cast<unsigned>(jb);
#pragma unroll
  for (int q = 0; q < kBQ; ++q) {
    const bool in = si.ts + q * W < rem;
    r.dt[q] = in ? bs.dt[b * bs.sdt + si.odt + q * bs.qdt] : T(0.f);
    r.B[q] = in ? bs.B[b * bs.sB + si.oB + q * bs.qB] : T(0.f);
    r.C[q] = in ? bs.C[b * bs.sC + si.oC + q * bs.qC] : T(0.f);
  }
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    const bool in = si.xts + 4 * q < rem;
    r.x[q] = in ? bs.x[b * bs.sx + si.ox + q * bs.qx] : T(0.f);
    r.gy[q] = in ? bs.gy[b * bs.sgy + si.ogy + q * bs.qgy] : 0.f;
  }
}

__device__ __forceinline__ void bwd_stage_put(BwdStage& st, int ts, int j, float dec, float k, float c) {
  st.dec[ts][j] = dec, st.dec[ts][32 + (j ^ 1)] = dec;
  st.k[ts][j] = k, st.k[ts][32 + (j ^ 1)] = k;
  st.C[ts][j] = c, st.C[ts][32 + (j ^ 1)] = c;
}

// Steps at or past c1 get dec = 1, k = 0, C = 0, x = 0, gy = 0: they change nothing.
template <typename T>
__device__ __forceinline__ void bwd_commit(const IssmParams& p, const BwdRaw<T>& r, BwdStage& st, const float* sA,
                                           const float* sbias, const Tile<1>& u, const BwdStageIdx& si, int t0, int W) {
  const int j = threadIdx.x & 31, ts = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < kBQ; ++q) {
    if (ts + q * W >= kTS) break;
    float dec, k, c;
    stage_values<T>(p, sA, sbias, j, si.ts + q * W < u.c1 - t0, r.dt[q], r.B[q], r.C[q], dec, k, c);
    bwd_stage_put(st, ts + q * W, j, dec, k, c);
  }
  for (int i = threadIdx.x + kBQ * blockDim.x; i < kTS * 32; i += blockDim.x) {  // CTAs of < 4 warps
    const int ts = i >> 5, j = i & 31;
    const int64_t t = t0 + ts, n = u.nlo + j;
    const bool in = t < u.c1 && n < p.dstate;
    float dec, k, c;
    stage_values<T>(p, sA, sbias, j, in,
                    in ? static_cast<const T*>(p.dt.ptr)[p.dt.at(u.a.row, t, u.a.h, n)] : T(0.f),
                    in ? static_cast<const T*>(p.B.ptr)[p.B.at(u.a.row, t, u.g, n)] : T(0.f),
                    in ? static_cast<const T*>(p.C.ptr)[p.C.at(u.a.row, t, u.g, n)] : T(0.f), dec, k, c);
    bwd_stage_put(st, ts, j, dec, k, c);
  }
#pragma unroll
  for (int q = 0; q < 2; ++q) {
    (&st.x[0][0])[si.xs + q * 4 * kMaxPC] = float(r.x[q]);
    (&st.gy[0][0])[si.xs + q * 4 * kMaxPC] = r.gy[q];
  }
}

template <typename T>
__global__ SSM_EXT_MAXNREG(128) void bwd_chunk_kernel(IssmParams p, Tiling tl, BwdBufs bb) {
  __shared__ BwdStage st;
  __shared__ float sA[32], sbias[32];
  __shared__ int ev_start[kBwdChunk], ev_end[kBwdChunk];
  SSM_EXT_DYNAMIC_SMEM(float, smem);
  const Tile<1> u = make_tile<1>(p, tl);  // CTA coordinates, n-tile, steps (not its p layout)
  const int W = tl.warps, PC = W * kBPW, plo = u.a.tp * PC;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, hf = lane >> 4, q2 = 2 * (lane & 15);
  const int P = static_cast<int>(p.headdim), N = static_cast<int>(p.dstate);
  const int pw = plo + warp * kBPW + hf * kPPT;  // the thread's p: pw + j
  const int n0 = u.nlo + q2 + hf, dn1 = 1 - 2 * hf;  // the thread's n: own n0, other n0 + dn1
  bool in[kPPT][2];
#pragma unroll
  for (int j = 0; j < kPPT; ++j) {
    in[j][0] = pw + j < P && n0 < N;
    in[j][1] = pw + j < P && n0 + dn1 < N;
  }
  const int nb = (u.c1 - u.c0 + kTS - 1) / kTS, nstages = 2 * nb - 1;
  auto block_of = [&](int i) { return i < nb ? i : 2 * nb - 2 - i; };  // stage i -> its block
  const BwdStageIdx si = bwd_stage_idx(p, u, PC, plo);
  const BwdBase<T> bs = bwd_base<T>(p, bb.gy, u, plo, W);
  BwdRaw<T> r;
  bwd_prefetch<T>(r, bs, si, 0, u.c1 - u.c0 < kTS ? u.c1 - u.c0 : kTS, W);
  load_cta_constants<1>(p, tl, u, sA, sbias, ev_start, ev_end);

  float* red = smem;  // [3][W][kTS][32]: dk, dlog, dC per (warp, step, n)
  const int rq = W * kTS * 32;
  // Each thread's columns: block jb's entering states of its n slot jn at bnd[(2 jb + jn) blockDim]
  float4* bnd = reinterpret_cast<float4*>(smem + 3 * rq) + threadIdx.x;
  auto put = [&](float4* slot, const float (&v)[kPPT][2]) {
#pragma unroll
    for (int jn = 0; jn < 2; ++jn) slot[jn * blockDim.x] = make_float4(v[0][jn], v[1][jn], v[2][jn], v[3][jn]);
  };
  auto get = [&](const float4* slot, float (&v)[kPPT][2]) {
#pragma unroll
    for (int jn = 0; jn < 2; ++jn) {
      const float4 q = slot[jn * blockDim.x];
      v[0][jn] = q.x, v[1][jn] = q.y, v[2][jn] = q.z, v[3][jn] = q.w;
    }
  };
  static_assert(kPPT == 4, "a thread's p of one n are one float4");
  // initial_states, dfinal_states, dinitial_states: contiguous fp32 (nseq, H, P, N) here (bwd_cuda);
  // element (seg, h, pw + j, own / other n) is at seg * HPN + toff + j * N (+ dn1).
  const int HPN = static_cast<int>(p.nheads * P * N), toff = (u.a.h * P + pw) * N + n0;
  auto seg_state = [&](const void* base, int seg) { return static_cast<float*>(const_cast<void*>(base)) + int64_t(seg) * HPN + toff; };
  float dS[kPPT][2], s[kPPT][2];
#pragma unroll
  for (int j = 0; j < kPPT; ++j)
#pragma unroll
    for (int jn = 0; jn < 2; ++jn) {
      const int64_t sx = state_index(p, tl, u.a.row, u.a.c, u.a.h, pw + j, n0 + jn * dn1);
      s[j][jn] = in[j][jn] ? bb.states[sx] : 0.f;
      dS[j][jn] = in[j][jn] ? bb.adj[sx] : 0.f;
    }
  put(bnd, s);
  const int so = hf * 32 + q2;              // the thread's (own, other) pair in BwdStage dec / k / C
  const int xo = warp * kBPW + hf * kPPT;   // its 4 p in BwdStage x / gy
  const int ro = (warp * kTS) * 32 + q2 + hf;  // its own n's partials in red, step 0
  // nred (3, ntp, nrows, L, H, N): (q, t, nlo + l) of this tile at nred0 + q per_q + t HN + l
  const int64_t HN = p.nheads * N, per_q = int64_t(tl.ntp) * tl.nrows * p.seqlen * HN;
  float* const nred0 = bb.nred + (int64_t(u.a.tp) * tl.nrows + u.a.row) * p.seqlen * HN + int64_t(u.a.h) * N + u.nlo;

#pragma unroll 1
  for (int i = 0; i < nstages; ++i) {
    const int jb = block_of(i);
    const int t0 = u.c0 + jb * kTS;
    __syncthreads();  // the previous block's reads of st and red are done (first: constants written)
    bwd_commit<T>(p, r, st, sA, sbias, u, si, t0, W);
    __syncthreads();
    const bool pass2 = i >= nb - 1;  // uniform
    // The next block's loads: in pass 1 here, in pass 2 after the reverse walk (so that their registers
    // are not held through it, where the step history is).
    auto prefetch_next = [&] {
      if (i + 1 < nstages) {
        const int jn = block_of(i + 1), rem = u.c1 - u.c0 - jn * kTS;
        bwd_prefetch<T>(r, bs, si, jn, rem < kTS ? rem : kTS, W);
      }
    };
    if (!pass2) prefetch_next();
    // the state entering step ts of the block (v: the state before the step's event)
    auto enter = [&](int ts, float (&v)[kPPT][2]) {
      const int start = ev_start[jb * kTS + ts];
      if (start != -2) {
        const bool init = start >= 0 && p.initial_states.ptr;
        const float* src = seg_state(p.initial_states.ptr, init ? start : 0);
#pragma unroll
        for (int j = 0; j < kPPT; ++j)
#pragma unroll
          for (int jn = 0; jn < 2; ++jn) v[j][jn] = init && in[j][jn] ? src[j * N + jn * dn1] : 0.f;
      }
    };
    get(bnd + 2 * jb * blockDim.x, s);
    // pass 2: the state entering each step (after the step's event); pv[0] is re-read from bnd at the
    // reverse walk's last step, so that it does not hold 8 registers through the walk
    float pv[kTS][kPPT][2];
#pragma unroll
    for (int ts = 0; ts < kTS; ++ts) {
      const float2 dq = *reinterpret_cast<const float2*>(&st.dec[ts][so]);
      const float2 kq = *reinterpret_cast<const float2*>(&st.k[ts][so]);
      const float4 xq = *reinterpret_cast<const float4*>(&st.x[ts][xo]);
      const float dec[2] = {dq.x, dq.y}, k[2] = {kq.x, kq.y}, xv[kPPT] = {xq.x, xq.y, xq.z, xq.w};
      enter(ts, s);
#pragma unroll
      for (int j = 0; j < kPPT; ++j)
#pragma unroll
        for (int jn = 0; jn < 2; ++jn) {
          if (ts > 0) pv[ts][j][jn] = s[j][jn];
          s[j][jn] = fmaf(dec[jn], s[j][jn], k[jn] * xv[j]);
        }
    }
    if (!pass2) {
      put(bnd + 2 * (jb + 1) * blockDim.x, s);
      continue;
    }

    float dxp[kTS][kPPT];  // dx terms of (step, p), summed over the thread's 2 n
#pragma unroll
    for (int ts = kTS - 1; ts >= 0; --ts) {
      const int start = ev_start[jb * kTS + ts], end = ev_end[jb * kTS + ts];
      if (end >= 0 && p.dfinal_states.ptr) {
        const float* src = seg_state(p.dfinal_states.ptr, end);
#pragma unroll
        for (int j = 0; j < kPPT; ++j)
#pragma unroll
          for (int jn = 0; jn < 2; ++jn)
            if (in[j][jn]) dS[j][jn] += src[j * N + jn * dn1];
      }
      if (ts == 0) {
        get(bnd + 2 * jb * blockDim.x, pv[0]);
        enter(0, pv[0]);
      }
      const float2 dq = *reinterpret_cast<const float2*>(&st.dec[ts][so]);
      const float2 kq = *reinterpret_cast<const float2*>(&st.k[ts][so]);
      const float2 cq = *reinterpret_cast<const float2*>(&st.C[ts][so]);
      const float4 xq = *reinterpret_cast<const float4*>(&st.x[ts][xo]);
      const float4 gq = *reinterpret_cast<const float4*>(&st.gy[ts][xo]);
      const float dec[2] = {dq.x, dq.y}, k[2] = {kq.x, kq.y}, c[2] = {cq.x, cq.y};
      const float xv[kPPT] = {xq.x, xq.y, xq.z, xq.w};
      const float gv[kPPT] = {gq.x, gq.y, gq.z, gq.w};
      // per n: dk = sum_p dS x, dl = sum_p dS pv, sg = sum_p pv gy over the thread's 4 p; dC = sum_p s_t gy
      // with s_t = dec pv + k x: dec (pv . gy) + k (x . gy)
      float dk[2] = {0.f, 0.f}, dl[2] = {0.f, 0.f}, sg[2] = {0.f, 0.f}, xg = 0.f;
#pragma unroll
      for (int j = 0; j < kPPT; ++j) {
        xg = fmaf(xv[j], gv[j], xg);
#pragma unroll
        for (int jn = 0; jn < 2; ++jn) {
          dS[j][jn] = fmaf(c[jn], gv[j], dS[j][jn]);
          dxp[ts][j] = jn == 0 ? dS[j][0] * k[0] : fmaf(dS[j][jn], k[jn], dxp[ts][j]);
          dk[jn] = fmaf(dS[j][jn], xv[j], dk[jn]);
          dl[jn] = fmaf(dS[j][jn], pv[ts][j][jn], dl[jn]);
          sg[jn] = fmaf(pv[ts][j][jn], gv[j], sg[jn]);
        }
      }
      if (start == -2) {
#pragma unroll
        for (int j = 0; j < kPPT; ++j)
#pragma unroll
          for (int jn = 0; jn < 2; ++jn) dS[j][jn] *= dec[jn];
      } else {  // a segment start or reset: dinitial_states := dS dec, then dS := 0
        if (start >= 0 && p.dinitial_states.ptr) {
          float* dst = seg_state(p.dinitial_states.ptr, start);
#pragma unroll
          for (int j = 0; j < kPPT; ++j)
#pragma unroll
            for (int jn = 0; jn < 2; ++jn)
              if (in[j][jn]) dst[j * N + jn * dn1] = dS[j][jn] * dec[jn];
        }
#pragma unroll
        for (int j = 0; j < kPPT; ++j)
#pragma unroll
          for (int jn = 0; jn < 2; ++jn) dS[j][jn] = 0.f;
      }
      // the warp's 8 p: this half's partial of the own n plus the other half's (its "other" slot)
      const float dkw = dk[0] + __shfl_xor_sync(0xffffffffu, dk[1], 16);
      const float dlw = dl[0] + __shfl_xor_sync(0xffffffffu, dl[1], 16);
      const float sgw = sg[0] + __shfl_xor_sync(0xffffffffu, sg[1], 16);
      const float xgw = xg + __shfl_xor_sync(0xffffffffu, xg, 16);
      red[ro + ts * 32] = dkw;
      red[rq + ro + ts * 32] = dlw * dec[0];
      red[2 * rq + ro + ts * 32] = fmaf(dec[0], sgw, k[0] * xgw);
    }
    {  // dx partial over this n-tile of (step t0 + (lane & 15) / 2, p = pw + 2 (lane & 1) + e), e = 0, 1
      reduce_scatter_level<kTS * kPPT / 2, 8>(&dxp[0][0], lane);
      const int t = t0 + ((lane & 15) >> 1), pp = pw + 2 * (lane & 1);
      if (t < u.c1) {
        float* dst = bb.dxpart + ((int64_t(u.a.tn) * tl.nrows + u.a.row) * p.seqlen + t) * p.nheads * P + u.a.h * P + pp;
        if (pp < P) dst[0] = dxp[0][0];
        if (pp + 1 < P) dst[1] = dxp[0][1];
      }
    }
    prefetch_next();
    __syncthreads();
    // dk, dlog, dC of the block: the warps' partials summed in warp order, 4 n per thread
    for (int e = threadIdx.x; e < 3 * kTS * 8; e += blockDim.x) {
      const int q = e >> 6, ts = (e >> 3) & 7, l = 4 * (e & 7);  // e = (q, ts, l / 4)
      if (ts >= u.c1 - t0) continue;
      const float4* src = reinterpret_cast<const float4*>(red + q * rq) + (e & 63);
      float4 sum = src[0];
#pragma unroll
      for (int w = 1; w < kBMaxWarps; ++w)
        if (w < W) {
          const float4 v = src[w * kTS * 8];
          sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
        }
      float* dst = nred0 + q * per_q + int64_t(t0 + ts) * HN + l;
      const float sv[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
      for (int c = 0; c < 4; ++c)
        if (u.nlo + l + c < N) dst[c] = sv[c];
    }
  }
}

// The finishing kernels' lane layout: lane = 4 sl + q handles steps t0 + sl and t0 + sl + 8 of a block of
// kTB steps and the 4 consecutive elements from 4 q of its warp's 16; a warp covers 16 elements x kTB steps.
// A sum over the block's steps is the thread's two steps, then its 8 step lanes (lane bits 4..2) by a
// reduce-scatter, a fixed tree.
static_assert(kTB == 16, "finishing kernels: 8 step lanes x 2 steps per block");

// Step 5a. CTA = (row, block tb, group g, kFinN states from n0); warp w: the states n0 + 16 w ... For each
// head of the group, in order: ddt per (t, n); dB = sum_h delta dk and dC = sum_h dC in registers; the dA
// and ddt_bias partials of the block per (h, n), after whose reduce-scatter lane (sl, q) holds value sl of
// {dA of its 4 n, ddt_bias of its 4 n}. A head's loads (nred, dt: two steps of 4 n) all precede its
// stores, so they are in flight together; vec: dt and B allow 4-element accesses (and N % 4 == 0).
constexpr int kFinWarps = 8;
constexpr int kFinN = kFinWarps * 16;
template <typename T, bool kVec>
__global__ __launch_bounds__(kFinWarps * 32, 2) void finish_n_kernel(IssmParams p, Tiling tl, BwdBufs bb, int nnb) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sl = lane >> 2;
  int idx = blockIdx.x;
  const int nb = idx % nnb;
  idx /= nnb;
  const int g = idx % static_cast<int>(p.ngroups);
  idx /= static_cast<int>(p.ngroups);
  const int tb = idx % static_cast<int>(bb.ntb), row = idx / static_cast<int>(bb.ntb);
  const int N = static_cast<int>(p.dstate), H = static_cast<int>(p.nheads), L = static_cast<int>(p.seqlen);
  const int nw = nb * kFinN + warp * 16, n = nw + 4 * (lane & 3);
  if (nw >= N) return;  // the whole warp (no shuffles wait for it)
  const int64_t per_q = int64_t(tl.ntp) * tl.nrows * L * H * N;
  int t[2], nv[2];
  float Bv[2][4], accB[2][4], accC[2][4];
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    t[s] = tb * kTB + sl + 8 * s;
    nv[s] = t[s] < L ? N - n : 0;
    load4<T, kVec>(static_cast<const T*>(p.B.ptr) + p.B.at(row, t[s], g, n), p.B.s3, nv[s], Bv[s]);
#pragma unroll
    for (int e = 0; e < 4; ++e) accB[s][e] = accC[s][e] = 0.f;
  }
  float* const part = bb.parts + (int64_t(row) * bb.ntb + tb) * bb.ncols + (sl >> 2) * H * N + n + (sl & 3);
  auto fast4 = [&](const void* ptr, Dtype d, const View4& v) {
    return kVec && d == Dtype::f32 && v.s1 == 1 && v.s0 % 4 == 0 && (reinterpret_cast<uintptr_t>(ptr) & 15) == 0;
  };
  const bool fastA = fast4(p.A.ptr, p.A_dtype, p.A), fastb = fast4(p.dt_bias.ptr, p.dt_bias_dtype, p.dt_bias);
  const int hpg = static_cast<int>(p.heads_per_group);
  for (int h = g * hpg; h < (g + 1) * hpg; ++h) {
    float A[4], bias[4] = {0.f, 0.f, 0.f, 0.f}, dk[2][4], dl[2][4], dc[2][4], dtv[2][4];
    param4(p.A.ptr, p.A_dtype, p.A, fastA, h, n, N - n, A);
    if (p.dt_bias.ptr) param4(p.dt_bias.ptr, p.dt_bias_dtype, p.dt_bias, fastb, h, n, N - n, bias);
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      load4<T, kVec>(static_cast<const T*>(p.dt.ptr) + p.dt.at(row, t[s], h, n), p.dt.s3, nv[s], dtv[s]);
      const float* src = bb.nred + ((int64_t(row) * L + t[s]) * H + h) * N + n;  // p-tile 0
      load4<float, kVec>(src, 1, nv[s], dk[s]);
      load4<float, kVec>(src + per_q, 1, nv[s], dl[s]);
      load4<float, kVec>(src + 2 * per_q, 1, nv[s], dc[s]);
      for (int tp = 1; tp < tl.ntp; ++tp) {  // P > kMaxPC: the other p-tiles' partials, in order
        const float* sp = src + int64_t(tp) * tl.nrows * L * H * N;
        float a[4], b[4], c[4];
        load4<float, kVec>(sp, 1, nv[s], a);
        load4<float, kVec>(sp + per_q, 1, nv[s], b);
        load4<float, kVec>(sp + 2 * per_q, 1, nv[s], c);
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[s][e] += a[e], dl[s][e] += b[e], dc[s][e] += c[e];
      }
    }
    float v[8];  // dA, ddt_bias partials of the 4 n
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = 0.f;
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      float ddt[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float mask;
        const float delta = delta_of(p, dtv[s][e] + bias[e], &mask);
        ddt[e] = (dk[s][e] * Bv[s][e] + dl[s][e] * A[e]) * mask;
        v[e] += dl[s][e] * delta;
        v[4 + e] += ddt[e];
        accB[s][e] += dk[s][e] * delta;
        accC[s][e] += dc[s][e];
      }
      store4<T, kVec>(static_cast<T*>(p.ddt.ptr) + p.ddt.at(row, t[s], h, n), nv[s], ddt);
    }
    reduce_scatter_level<4, 16>(v, lane);
    if ((sl & 3) < N - n) part[h * N] = v[0];
  }
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    store4<T, kVec>(static_cast<T*>(p.dB.ptr) + p.dB.at(row, t[s], g, n), nv[s], accB[s]);
    store4<T, kVec>(static_cast<T*>(p.dC.ptr) + p.dC.at(row, t[s], g, n), nv[s], accC[s]);
  }
}

// Step 5b. CTA = (row, block tb, kFinPE elements of the flat (h, p) index from e0), the same lane layout:
// dx = the n-tile partials summed in order + D gy; the dD partials of the block after a reduce-scatter over
// lane bits 4, 3 and a last exchange over bit 2. vec: x is contiguous over (h, p) with 4-element accesses
// (and H P % 4 == 0).
constexpr int kFinPWarps = 4;
constexpr int kFinPE = kFinPWarps * 16;
template <typename T, bool kVec>
__global__ __launch_bounds__(kFinPWarps * 32) void finish_p_kernel(IssmParams p, Tiling tl, BwdBufs bb, int neb) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sl = lane >> 2;
  const int eb = blockIdx.x % neb, rt = blockIdx.x / neb;
  const int tb = rt % static_cast<int>(bb.ntb), row = rt / static_cast<int>(bb.ntb);
  const int P = static_cast<int>(p.headdim), HP = static_cast<int>(p.nheads) * P, L = static_cast<int>(p.seqlen);
  const int ew = eb * kFinPE + warp * 16, e0 = ew + 4 * (lane & 3);
  if (ew >= HP) return;  // the whole warp
  const int64_t per_tile = int64_t(tl.nrows) * L * HP;
  float D[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) D[e] = e < HP - e0 ? D_at(p, (e0 + e) / P, (e0 + e) % P) : 0.f;
  float dD[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int t = tb * kTB + sl + 8 * s, nv = t < L ? HP - e0 : 0;
    const int64_t o = (int64_t(row) * L + t) * HP + e0;
    float gy[4], dx[4], xv[4];
    load4<float, kVec>(bb.gy + o, 1, nv, gy);
    load4<float, kVec>(bb.dxpart + o, 1, nv, dx);
    if constexpr (kVec) {
      load4<T, true>(static_cast<const T*>(p.x.ptr) + p.x.at(row, t, 0, e0), 1, nv, xv);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        xv[e] = e < nv ? float(static_cast<const T*>(p.x.ptr)[p.x.at(row, t, (e0 + e) / P, (e0 + e) % P)]) : 0.f;
    }
#pragma unroll 4
    for (int tn = 1; tn < tl.ntn; ++tn) {
      float a[4];
      load4<float, kVec>(bb.dxpart + tn * per_tile + o, 1, nv, a);
#pragma unroll
      for (int e = 0; e < 4; ++e) dx[e] += a[e];
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      dx[e] = fmaf(D[e], gy[e], dx[e]);
      dD[e] = fmaf(gy[e], xv[e], dD[e]);
    }
    store4<T, kVec>(static_cast<T*>(p.dx.ptr) + p.dx.at(row, t, 0, e0), nv, dx);
  }
  reduce_scatter_level<2, 16>(dD, lane);  // lane: value sl / 2, summed over lane bits 4, 3
  const float sum = dD[0] + __shfl_xor_sync(0xffffffffu, dD[0], 4);
  if ((sl & 1) == 0 && (sl >> 1) < HP - e0)
    bb.parts[(int64_t(row) * bb.ntb + tb) * bb.ncols + 2 * p.nheads * p.dstate + e0 + (sl >> 1)] = sum;
}

// Step 5c. sums[col] = the partials of column col summed over the nparts rows in a fixed order (the
// warps' contiguous slices of rows, each in order, then the slices in order). CTA = 8 warps x 32
// columns; each warp keeps kColB loads in flight.
constexpr int kColB = 8;
__global__ __launch_bounds__(256) void colsum_kernel(BwdBufs bb, int64_t nparts) {
  __shared__ float sm[8][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t col = int64_t(blockIdx.x) * 32 + lane;
  const int64_t per = (nparts + 7) / 8, k0 = warp * per, k1 = std::min(nparts, k0 + per);
  float sum = 0.f;
  if (col < bb.ncols) {
    for (int64_t k = k0; k < k1; k += kColB) {
      float v[kColB];
#pragma unroll
      for (int i = 0; i < kColB; ++i) v[i] = k + i < k1 ? bb.parts[(k + i) * bb.ncols + col] : 0.f;
#pragma unroll
      for (int i = 0; i < kColB; ++i) sum += v[i];
    }
  }
  sm[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && col < bb.ncols) {
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < 8; ++w) t += sm[w][lane];
    bb.sums[col] = t;
  }
}

// Fixed-order sum over the block's threads of one value each (blockDim.x = 256).
__device__ float block_sum(float v, float* sm) {
  sm[threadIdx.x] = v;
  __syncthreads();
  for (int s = 128; s > 0; s >>= 1) {
    if (threadIdx.x < s) sm[threadIdx.x] += sm[threadIdx.x + s];
    __syncthreads();
  }
  const float r = sm[0];
  __syncthreads();
  return r;
}

// Step 5d. CTA per head: dA, ddt_bias, dD from the column sums in their dtypes; per-head dt_bias and
// D sum theirs over n or p by a fixed tree.
__global__ __launch_bounds__(256) void params_kernel(IssmParams p, BwdBufs bb) {
  __shared__ float sm[256];
  const int64_t h = blockIdx.x, H = p.nheads, N = p.dstate, P = p.headdim;
  const float* sA = bb.sums + h * N;
  const float* sb = bb.sums + H * N + h * N;
  const float* sD = bb.sums + 2 * H * N + h * P;
  float bias_head = 0.f, D_head = 0.f;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    store_as(p.dA.ptr, p.A_dtype, p.dA.at(h, n), sA[n]);
    if (p.ddt_bias.ptr && !p.dt_bias_per_head) store_as(p.ddt_bias.ptr, p.dt_bias_dtype, p.ddt_bias.at(h, n), sb[n]);
    bias_head += sb[n];
  }
  for (int64_t pp = threadIdx.x; pp < P; pp += blockDim.x) {
    if (p.dD.ptr && !p.D_per_head) store_as(p.dD.ptr, p.D_dtype, p.dD.at(h, pp), sD[pp]);
    D_head += sD[pp];
  }
  if (p.ddt_bias.ptr && p.dt_bias_per_head) {
    const float s = block_sum(bias_head, sm);
    if (threadIdx.x == 0) store_as(p.ddt_bias.ptr, p.dt_bias_dtype, p.ddt_bias.at(h, 0), s);
  }
  if (p.dD.ptr && p.D_per_head) {
    const float s = block_sum(D_head, sm);
    if (threadIdx.x == 0) store_as(p.dD.ptr, p.D_dtype, p.dD.at(h, 0), s);
  }
}

// Whether 4 consecutive elements along the last dim, from any multiple of 4, are one aligned access.
inline bool quad_ok(const View4& v, size_t elem) {
  return v.s3 == 1 && v.s0 % 4 == 0 && v.s1 % 4 == 0 && v.s2 % 4 == 0 &&
         reinterpret_cast<uintptr_t>(v.ptr) % (4 * elem) == 0;
}

template <typename F>
void bool_switch(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

template <typename T>
// saved: issm_fwd's chunk_states (z absent), or undefined. With them step 1 has nothing left to
// compute (the entering states and decay products are the forward's, bitwise; gy = dout).
void run_backward(const IssmParams& p, const at::Tensor& like, const at::Tensor& saved, const at::Tensor& dout,
                  cudaStream_t stream) {
  const Tiling tf = make_tiling(p, kBwdChunk, 8);  // forward-like kernels
  Tiling tb = make_tiling(p, kBwdChunk, 1);  // bwd_chunk_kernel: 32 states per CTA, 8 p per warp
  tb.warps = static_cast<int>((p.headdim + int64_t(kBPW) * tb.ntp - 1) / (int64_t(kBPW) * tb.ntp));
  const auto f32 = like.options().dtype(at::kFloat);
  const int64_t H = p.nheads, P = p.headdim, N = p.dstate, L = p.seqlen, R = tf.nrows;
  auto buf = [&](int64_t n) { return at::empty({std::max<int64_t>(n, 1)}, f32); };
  const int64_t ntb = (L + kTB - 1) / kTB;
  // The entering states, then the decay products: issm_fwd's chunk_states, or step 1 writes them.
  const int64_t n_states = R * tf.nchunks * H * P * N;
  const bool reuse = saved.defined();
  at::Tensor chunk = reuse ? saved : buf(n_states + R * tf.nchunks * H * N), adj = buf(n_states);
  at::Tensor gy = reuse ? dout.to(at::kFloat).contiguous() : buf(R * L * H * P);
  at::Tensor ypart = tf.ntn > 1 && !reuse ? buf(tf.ntn * R * L * H * P) : at::Tensor();
  at::Tensor dxpart = buf(tb.ntn * R * L * H * P), nred = buf(3 * tb.ntp * R * L * H * N);
  const int64_t ncols = 2 * H * N + H * P;
  at::Tensor parts = buf(R * ntb * ncols), sums = buf(ncols);

  Bufs fb;
  fb.states = chunk.data_ptr<float>();
  fb.prod = fb.states + n_states;
  fb.gy = gy.data_ptr<float>();
  if (ypart.defined()) fb.ypart = ypart.data_ptr<float>();
  BwdBufs bb;
  bb.states = fb.states;
  bb.prod = fb.prod;
  bb.gy = fb.gy;
  bb.adj = adj.data_ptr<float>();
  bb.dxpart = dxpart.data_ptr<float>();
  bb.nred = nred.data_ptr<float>();
  bb.parts = parts.data_ptr<float>();
  bb.sums = sums.data_ptr<float>();
  bb.ncols = ncols;
  bb.ntb = ntb;

  if (tf.ctas() > 0) {
    if (!reuse) run_forward<T, kOutBwd>(p, tf, fb, like, stream);  // 1.
    // 2. At most 128 states per CTA (its stages' shared memory). kVec: the chunk's dt and C are read 4 n at a
    // time; likewise in step 5.
    const Tiling ta = make_tiling(p, kBwdChunk, 4);
    const bool quads = N % 4 == 0;
    bool_switch(quads && quad_ok(p.dt, sizeof(T)) && quad_ok(p.C, sizeof(T)), [&](auto vec) {
      auto launch = [&](auto npt) {
        adj_local_kernel<T, decltype(npt)::value, decltype(vec)::value><<<static_cast<unsigned>(ta.ctas()),
                                                                         static_cast<unsigned>(ta.warps * 32), 0, stream>>>(
            p, ta, bb);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (ta.npt == 1) launch(std::integral_constant<int, 1>{});
      else if (ta.npt == 2) launch(std::integral_constant<int, 2>{});
      else launch(std::integral_constant<int, 4>{});
    });
    const int64_t elems = R * H * P * N;  // 3.
    pass_kernel<<<blocks_for(elems, 256), 256, 0, stream>>>(p, tf, bb.adj, bb.prod);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const size_t smem = bwd_smem(tb.warps);  // 4.
    C10_CUDA_CHECK(cudaFuncSetAttribute(bwd_chunk_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    bwd_chunk_kernel<T><<<static_cast<unsigned>(tb.ctas()), static_cast<unsigned>(tb.warps * 32), smem, stream>>>(
        p, tb, bb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int nnb = static_cast<int>((N + kFinN - 1) / kFinN);  // 5.
    bool_switch(quads && quad_ok(p.dt, sizeof(T)) && quad_ok(p.B, sizeof(T)), [&](auto vec) {
      finish_n_kernel<T, decltype(vec)::value><<<static_cast<unsigned>(R * ntb * p.ngroups * nnb), kFinWarps * 32, 0,
                                                 stream>>>(p, tb, bb, nnb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const int neb = static_cast<int>((H * P + kFinPE - 1) / kFinPE);
    bool_switch(p.x.s2 == P && H * P % 4 == 0 && quad_ok(p.x, sizeof(T)), [&](auto vec) {
      finish_p_kernel<T, decltype(vec)::value><<<static_cast<unsigned>(R * ntb * neb), kFinPWarps * 32, 0, stream>>>(
          p, tb, bb, neb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  colsum_kernel<<<blocks_for(ncols, 32), 256, 0, stream>>>(bb, tf.ctas() > 0 ? R * ntb : 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  params_kernel<<<static_cast<unsigned>(H), 256, 0, stream>>>(p, bb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.dinitial_states.ptr && (p.cu_seqlens || L == 0) && p.nseq > 0) {
    empty_segments_kernel<true><<<blocks_for(p.nseq * H * P * N, 256), 256, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
bwd_cuda(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
         int64_t chunk_size, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
         const c10::optional<at::Tensor>& dt_bias, const c10::optional<at::Tensor>& initial_states,
         const c10::optional<at::Tensor>& seq_idx, const c10::optional<at::Tensor>& cu_seqlens, bool dt_softplus,
         double dt_limit_lo, double dt_limit_hi, const at::Tensor& dout,
         const c10::optional<at::Tensor>& dfinal_states, const c10::optional<at::Tensor>& chunk_states) {
  BwdArgs r = prepare_bwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                          dt_softplus, dt_limit_lo, dt_limit_hi, dout, dfinal_states);
  const c10::cuda::CUDAGuard guard(x.device());
  IssmParams p = r.p;
  TORCH_CHECK(p.dstate > 0, msg("dstate (B.size(3)) must be > 0 on CUDA, got ", p.dstate));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // bwd_chunk_kernel reads initial_states and dfinal_states and writes dinitial_states as contiguous
  // fp32 (nseq, H, P, N) tensors, so that its unrolled event sites stay small: others go through copies.
  TORCH_CHECK(p.nheads * p.headdim * p.dstate < (int64_t(1) << 31),
              msg("issm (CUDA): nheads * headdim * dstate must be < 2^31, got ", p.nheads * p.headdim * p.dstate));
  // bwd_chunk_kernel addresses its staging loads by 32-bit offsets within a chunk (kBwdChunk steps of a
  // tile of 32 n or up to kMaxPC p): inputs with larger strides go through contiguous copies.
  auto span_fits = [](const View4& v, int64_t width) {
    return (kBwdChunk - 1) * v.s1 + (width - 1) * v.s3 < (int64_t(1) << 31);
  };
  at::Tensor copies[4];
  const at::Tensor* srcs[4] = {&dt, &B, &C, &x};
  View4* views[4] = {&p.dt, &p.B, &p.C, &p.x};
  for (int i = 0; i < 4; ++i) {
    const int64_t width = i == 3 ? kMaxPC : 32;
    if (!span_fits(*views[i], width)) {
      copies[i] = srcs[i]->contiguous();
      *views[i] = view4(copies[i]);
    }
    TORCH_CHECK(span_fits(*views[i], width), "issm (CUDA): ", kBwdChunk, " steps of x, dt, B or C span >= 2^31 elements");
  }
  TORCH_CHECK((kBwdChunk - 1) * p.nheads * p.headdim + kMaxPC < (int64_t(1) << 31), "issm (CUDA): nheads * headdim too large");
  at::Tensor init32, dinit32, dfinal32;
  if (p.initial_states.ptr) {
    init32 = initial_states->to(at::kFloat).contiguous();
    dinit32 = r.dinitial_states.scalar_type() == at::kFloat ? r.dinitial_states : at::empty_like(init32);
    p.initial_states = view4(init32);
    p.dinitial_states = view4(dinit32);
    p.init_dtype = Dtype::f32;
  }
  if (p.dfinal_states.ptr) {
    dfinal32 = dfinal_states->contiguous();
    p.dfinal_states = view4(dfinal32);
  }
  at::Tensor saved;
  if (chunk_states.has_value() && chunk_states->numel() > 0) {
    const int64_t rows = p.cu_seqlens ? 1 : p.batch, nc = (p.seqlen + kBwdChunk - 1) / kBwdChunk;
    const int64_t want = rows * nc * p.nheads * (p.headdim + 1) * p.dstate;
    TORCH_CHECK(!p.z.ptr, "chunk_states: issm_fwd returns them only when z is absent, but z was given");
    TORCH_CHECK(chunk_states->device() == x.device() && chunk_states->scalar_type() == at::kFloat &&
                    chunk_states->dim() == 1 && chunk_states->numel() == want,
                msg("chunk_states must be the float32 (", want, ",) tensor issm_fwd returned for these inputs on ",
                    x.device(), ", got ", chunk_states->scalar_type(), " with ", chunk_states->dim(), " dims and ", chunk_states->numel(), " elements on ",
                    chunk_states->device()));
    saved = chunk_states->contiguous();
  }
  dispatch_io_dtype(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    if (p.headdim == 0 || p.nheads == 0) {  // nothing flows: zero gradients
      for (at::Tensor* t : {&r.dx, &r.ddt, &r.dA, &r.dB, &r.dC, &r.dD, &r.dz, &r.ddt_bias, &r.dinitial_states})
        t->zero_();
      return;
    }
    run_backward<T>(p, x, saved, dout, stream);
  });
  if (dinit32.defined() && !dinit32.is_same(r.dinitial_states)) r.dinitial_states.copy_(dinit32);
  return {r.dx, r.ddt, r.dA, r.dB, r.dC, r.dD, r.dz, r.ddt_bias, r.dinitial_states};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("issm_bwd", &bwd_cuda); }

}  // namespace issm
}  // namespace ssm_ext
