// CUDA backward of the ISSM scan. Same semantics as issm_cpu.cpp's backward; chunks of 64 steps.
//   1. forward phases A, B and C (issm_cuda.cuh) in kOutBwd mode: the state entering each
//      chunk, the chunk decay products, gy = dout * silu(z) (fp32 scratch) and dz.
//   2. adj_local_kernel: per chunk, the adjoint of the chunk's entering state from the chunk's
//      own outputs (dS += C gy^T; dS *= decay; zeroed at segment starts / resets; dfinal_states
//      added at segment ends), walking the chunk in reverse from 0.
//   3. pass_kernel<reverse>: the adjoint at the end of each chunk from all later chunks.
//   4. bwd_chunk_kernel: per (chunk, p-tile, 32-state n-tile), the forward states of the chunk
//      are recomputed (block boundaries every kTS steps, then a block's step history, in shared
//      memory) and the chunk walked in reverse: dx partials (over this n-tile, a lane
//      reduce-scatter per block), and per (t, n) sums over the CTA's p of dk = dS^T x,
//      dlog = (dS . s_{t-1}) decay and dC = s_t^T gy (warp partials summed over warps in order);
//      dinitial_states at segment starts.
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

// Step 2. Tiling as chunk_kernel (NPT up to 8); the chunk's blocks go through the same staging
// pipeline, last block first.
template <typename T, int NPT>
__global__ SSM_EXT_MAXNREG(NPT >= 8 ? 128 : 96) void adj_local_kernel(IssmParams p, Tiling tl, BwdBufs bb) {
  constexpr int NT = 32 * NPT;
  __shared__ Stage<NT> st;
  __shared__ float sA[NT], sbias[NT];
  __shared__ int ev_start[kBwdChunk], ev_end[kBwdChunk];
  const Tile<NPT> u = make_tile<NPT>(p, tl);
  const int64_t nb = (u.c1 - u.c0 + kTS - 1) / kTS;
  Raw<T, 4> r;
  prefetch_block<T, NPT, 4, kGy>(p, r, bb.gy, u, u.c0 + (nb - 1) * kTS);
  load_cta_constants<NPT>(p, tl, u, sA, sbias, ev_start, ev_end);
  float dS[kPPT][NPT];
#pragma unroll
  for (int j = 0; j < kPPT; ++j)
#pragma unroll
    for (int jn = 0; jn < NPT; ++jn) dS[j][jn] = 0.f;
  for (int64_t ib = nb - 1; ib >= 0; --ib) {
    const int64_t t0 = u.c0 + ib * kTS;
    __syncthreads();  // the previous block's reads of st are done (first: sA, sbias, events written)
    commit_block<T, NPT, 4, kGy>(p, r, st, sA, sbias, u, t0);
    __syncthreads();
    if (ib > 0) prefetch_block<T, NPT, 4, kGy>(p, r, bb.gy, u, t0 - kTS);
#pragma unroll 1
    for (int ts = kTS - 1; ts >= 0; --ts) {
      const int end = ev_end[t0 - u.c0 + ts];
      if (end >= 0 && p.dfinal_states.ptr) {
        const float* df = static_cast<const float*>(p.dfinal_states.ptr);
#pragma unroll
        for (int j = 0; j < kPPT; ++j)
#pragma unroll
          for (int jn = 0; jn < NPT; ++jn)
            if (u.pin[j] && u.nin[jn]) dS[j][jn] += df[p.dfinal_states.at(end, u.a.h, u.pw + j, u.nl + jn)];
      }
      float dec[NPT], c[NPT];
      lds<NPT>(&st.dec[ts][u.lane * NPT], dec);
      lds<NPT>(&st.C[ts][u.lane * NPT], c);
      const float4 gq = *reinterpret_cast<const float4*>(&st.gy[ts][u.warp * kPPT]);
      const float gv[kPPT] = {gq.x, gq.y, gq.z, gq.w};
      const bool cut = ev_start[t0 - u.c0 + ts] != -2;
#pragma unroll
      for (int j = 0; j < kPPT; ++j)
#pragma unroll
        for (int jn = 0; jn < NPT; ++jn) dS[j][jn] = cut ? 0.f : dec[jn] * fmaf(c[jn], gv[j], dS[j][jn]);
    }
  }
#pragma unroll
  for (int j = 0; j < kPPT; ++j)
#pragma unroll
    for (int jn = 0; jn < NPT; ++jn)
      if (u.pin[j] && u.nin[jn]) bb.adj[state_index(p, tl, u.a.row, u.a.c, u.a.h, u.pw + j, u.nl + jn)] = dS[j][jn];
}

// Step 4. CTA = (row, h, chunk, p-tile, 32-state n-tile): warp w owns p = pw .. pw + 3, lane l the
// state n = nlo + l. The chunk's nb blocks of kTS steps go through the forward kernels' staging
// pipeline in the order 0 .. nb-2 (pass 1: the state entering each block, kept in shared memory, each
// thread its own column), then nb-1 .. 0 (pass 2: the states entering the block's steps recomputed
// into registers, then the block walked in reverse). Per (step, n), the sums over the warp's p (dk,
// dlog, dC) go to shared memory and are summed over the warps in order once per block; per (step, p),
// the dx terms stay in registers for the block and are summed over the lanes once per block (a
// 32-value reduce-scatter: 31 shuffles per 8 steps). The loops over a block's steps are unrolled
// (the history is a register array) with a lean body: the rare events only load or store.
// Dynamic shared memory: 3 * warps * kTS * 32 floats of warp partials, then (kSub + kTS) * kPPT *
// blockDim floats of states (111 KB at P = 36: two CTAs per SM).
template <typename T>
__global__ SSM_EXT_MAXNREG(96) void bwd_chunk_kernel(IssmParams p, Tiling tl, BwdBufs bb) {
  __shared__ Stage<32> st;
  __shared__ float sA[32], sbias[32];
  __shared__ int ev_start[kBwdChunk], ev_end[kBwdChunk];
  SSM_EXT_DYNAMIC_SMEM(float, smem);
  const Tile<1> u = make_tile<1>(p, tl);
  const int W = tl.warps;
  const int64_t P = p.headdim, N = p.dstate, H = p.nheads, n = u.nl;
  const bool nin = u.nin[0];
  const int nb = static_cast<int>((u.c1 - u.c0 + kTS - 1) / kTS), nstages = 2 * nb - 1;
  auto block_of = [&](int i) { return i < nb ? i : 2 * nb - 2 - i; };  // stage i -> its block
  Raw<T, 1> r;
  prefetch_block<T, 1, 1, kGy>(p, r, bb.gy, u, u.c0);
  load_cta_constants<1>(p, tl, u, sA, sbias, ev_start, ev_end);

  float* red = smem;  // [3][W][kTS][32]: dk, dlog, dC per (warp, step, lane)
  const int rq = W * kTS * 32;
  // Each thread's column of kPPT states: bnd[jb] entering block jb, pv[ts] entering step ts of the
  // block of pass 2 (after the step's event).
  float4* bnd = reinterpret_cast<float4*>(smem + 3 * rq) + threadIdx.x;
  float4* pv = bnd + kSub * blockDim.x;
  static_assert(kPPT == 4, "a thread's p are one float4");
  // initial_states, dfinal_states, dinitial_states: contiguous fp32 (nseq, H, P, N) here (bwd_cuda);
  // element (seg, h, pw + j, n) is at seg * HPN + toff + j * N.
  const int HPN = static_cast<int>(H * P * N), toff = static_cast<int>((u.a.h * P + u.pw) * N + n);
  auto seg_state = [&](const void* base, int seg) { return static_cast<float*>(const_cast<void*>(base)) + int64_t(seg) * HPN + toff; };
  float dS[kPPT], s[kPPT];
#pragma unroll
  for (int j = 0; j < kPPT; ++j) {
    const bool in = u.pin[j] && nin;
    const int64_t si = state_index(p, tl, u.a.row, u.a.c, u.a.h, u.pw + j, n);
    s[j] = in ? bb.states[si] : 0.f;
    dS[j] = in ? bb.adj[si] : 0.f;
  }
  bnd[0] = make_float4(s[0], s[1], s[2], s[3]);

#pragma unroll 1
  for (int i = 0; i < nstages; ++i) {
    const int jb = block_of(i);
    const int64_t t0 = u.c0 + jb * kTS;
    __syncthreads();  // the previous block's reads of st and red are done (first: constants written)
    commit_block<T, 1, 1, kGy>(p, r, st, sA, sbias, u, t0);
    __syncthreads();
    if (i + 1 < nstages) prefetch_block<T, 1, 1, kGy>(p, r, bb.gy, u, u.c0 + block_of(i + 1) * kTS);

    const bool pass2 = i >= nb - 1;  // uniform
    const float4 b = bnd[jb * blockDim.x];
    s[0] = b.x, s[1] = b.y, s[2] = b.z, s[3] = b.w;
#pragma unroll
    for (int ts = 0; ts < kTS; ++ts) {
      const int start = ev_start[jb * kTS + ts];
      const float dec = st.dec[ts][u.lane], k = st.k[ts][u.lane];
      const float4 xq = *reinterpret_cast<const float4*>(&st.x[ts][u.warp * kPPT]);
      const float xv[kPPT] = {xq.x, xq.y, xq.z, xq.w};
      if (start != -2) {
        const bool init = start >= 0 && p.initial_states.ptr;
        const float* src = seg_state(p.initial_states.ptr, init ? start : 0);
#pragma unroll
        for (int j = 0; j < kPPT; ++j) s[j] = init && u.pin[j] && nin ? src[j * N] : 0.f;
      }
      if (pass2) pv[ts * blockDim.x] = make_float4(s[0], s[1], s[2], s[3]);
#pragma unroll
      for (int j = 0; j < kPPT; ++j) s[j] = fmaf(dec, s[j], k * xv[j]);
    }
    if (!pass2) {
      bnd[(jb + 1) * blockDim.x] = make_float4(s[0], s[1], s[2], s[3]);
      continue;
    }

    float dxp[kTS][kPPT];
#pragma unroll
    for (int ts = kTS - 1; ts >= 0; --ts) {
      const int start = ev_start[jb * kTS + ts], end = ev_end[jb * kTS + ts];
      if (end >= 0 && p.dfinal_states.ptr) {
        const float* src = seg_state(p.dfinal_states.ptr, end);
#pragma unroll
        for (int j = 0; j < kPPT; ++j)
          if (u.pin[j] && nin) dS[j] += src[j * N];
      }
      const float dec = st.dec[ts][u.lane], k = st.k[ts][u.lane], c = st.C[ts][u.lane];
      const float4 xq = *reinterpret_cast<const float4*>(&st.x[ts][u.warp * kPPT]);
      const float4 gq = *reinterpret_cast<const float4*>(&st.gy[ts][u.warp * kPPT]);
      const float4 vq = pv[ts * blockDim.x];
      const float xv[kPPT] = {xq.x, xq.y, xq.z, xq.w};
      const float gv[kPPT] = {gq.x, gq.y, gq.z, gq.w};
      const float sv[kPPT] = {vq.x, vq.y, vq.z, vq.w};
      // dC = sum_p s_t gy with s_t = dec pv + k x: dec (pv . gy) + k (x . gy)
      float dk = 0.f, dl = 0.f, sg = 0.f, xg = 0.f;
#pragma unroll
      for (int j = 0; j < kPPT; ++j) {
        dS[j] = fmaf(c, gv[j], dS[j]);
        dxp[ts][j] = dS[j] * k;
        dk = fmaf(dS[j], xv[j], dk);
        dl = fmaf(dS[j], sv[j], dl);
        sg = fmaf(sv[j], gv[j], sg);
        xg = fmaf(xv[j], gv[j], xg);
        dS[j] *= dec;
      }
      if (start >= 0 && p.dinitial_states.ptr) {
        float* dst = seg_state(p.dinitial_states.ptr, start);
#pragma unroll
        for (int j = 0; j < kPPT; ++j)
          if (u.pin[j] && nin) dst[j * N] = dS[j];
      }
      if (start != -2) {
#pragma unroll
        for (int j = 0; j < kPPT; ++j) dS[j] = 0.f;
      }
      const int o = (u.warp * kTS + ts) * 32 + u.lane;
      red[o] = dk;
      red[rq + o] = dl * dec;
      red[2 * rq + o] = fmaf(dec, sg, k * xg);
    }
    {  // dx partial of (step t0 + lane / 4, p = pw + lane % 4) over this n-tile
      const float dx = reduce_scatter<kTS * kPPT>(&dxp[0][0], u.lane);
      const int64_t t = t0 + (u.lane >> 2), pp = u.pw + (u.lane & 3);
      if (t < u.c1 && pp < P) bb.dxpart[(((u.a.tn * tl.nrows + u.a.row) * p.seqlen + t) * H + u.a.h) * P + pp] = dx;
    }
    __syncthreads();
    // dk, dlog, dC of the block: the warps' partials summed in warp order
    const int64_t per_q = tl.ntp * tl.nrows * p.seqlen * H * N;
    for (int e = threadIdx.x; e < 3 * kTS * 32; e += blockDim.x) {
      const int q = e / (kTS * 32), ts = (e / 32) % kTS, l = e % 32;
      const int64_t t = t0 + ts, nn = u.nlo + l;
      if (t >= u.c1 || nn >= N) continue;
      const float* src = red + q * rq + ts * 32 + l;
      float v[kMaxWarps];
#pragma unroll
      for (int w = 0; w < kMaxWarps; ++w) v[w] = w < W ? src[w * kTS * 32] : 0.f;
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kMaxWarps; ++w) sum += v[w];
      bb.nred[q * per_q + (((u.a.tp * tl.nrows + u.a.row) * p.seqlen + t) * H + u.a.h) * N + nn] = sum;
    }
  }
}

// Step 5a. CTA per (row, block of kTB steps, group, 128 states); thread per state n.
template <typename T>
__global__ __launch_bounds__(128) void finish_n_kernel(IssmParams p, Tiling tl, BwdBufs bb, int64_t nnb) {
  int64_t idx = blockIdx.x;
  const int64_t nb = idx % nnb;
  idx /= nnb;
  const int64_t g = idx % p.ngroups;
  idx /= p.ngroups;
  const int64_t tb = idx % bb.ntb, row = idx / bb.ntb;
  const int64_t n = nb * 128 + threadIdx.x, N = p.dstate, H = p.nheads;
  if (n >= N) return;
  const int64_t t0 = tb * kTB;
  const int64_t per_q = tl.ntp * tl.nrows * p.seqlen * H * N;
  float accB[kTB], accC[kTB];
#pragma unroll
  for (int i = 0; i < kTB; ++i) accB[i] = accC[i] = 0.f;
  for (int64_t h = g * p.heads_per_group; h < (g + 1) * p.heads_per_group; ++h) {
    const float A = load_as<float>(p.A.ptr, p.A_dtype, p.A.at(h, n));
    float dAp = 0.f, dbp = 0.f;
#pragma unroll
    for (int i = 0; i < kTB; ++i) {
      const int64_t t = t0 + i;
      if (t >= p.seqlen) break;
      float dk = 0.f, dl = 0.f, dc = 0.f;
      for (int tp = 0; tp < tl.ntp; ++tp) {
        const int64_t o = (((tp * tl.nrows + row) * p.seqlen + t) * H + h) * N + n;
        dk += bb.nred[o];
        dl += bb.nred[per_q + o];
        dc += bb.nred[2 * per_q + o];
      }
      float mask;
      const float delta = delta_of(p, dt_at<T>(p, row, t, h, n), &mask);
      const float Bv = float(static_cast<const T*>(p.B.ptr)[p.B.at(row, t, g, n)]);
      const float ddt = (dk * Bv + dl * A) * mask;
      static_cast<T*>(p.ddt.ptr)[p.ddt.at(row, t, h, n)] = T(ddt);
      dAp += dl * delta;
      dbp += ddt;
      accB[i] += dk * delta;
      accC[i] += dc;
    }
    float* part = bb.parts + (row * bb.ntb + tb) * bb.ncols + h * N + n;
    part[0] = dAp;
    part[H * N] = dbp;
  }
#pragma unroll
  for (int i = 0; i < kTB; ++i) {
    const int64_t t = t0 + i;
    if (t >= p.seqlen) break;
    static_cast<T*>(p.dB.ptr)[p.dB.at(row, t, g, n)] = T(accB[i]);
    static_cast<T*>(p.dC.ptr)[p.dC.at(row, t, g, n)] = T(accC[i]);
  }
}

// Step 5b. CTA per (row, block of kTB steps); thread per (h, p).
template <typename T>
__global__ __launch_bounds__(256) void finish_p_kernel(IssmParams p, Tiling tl, BwdBufs bb) {
  const int64_t tb = blockIdx.x % bb.ntb, row = blockIdx.x / bb.ntb;
  const int64_t H = p.nheads, P = p.headdim, HP = H * P;
  const int64_t per_tile = tl.nrows * p.seqlen * HP;
  for (int64_t e = threadIdx.x; e < HP; e += blockDim.x) {
    const int64_t h = e / P, pp = e % P;
    const float D = p.D.ptr ? load_as<float>(p.D.ptr, p.D_dtype, p.D.at(h, pp)) : 0.f;
    float dDp = 0.f;
    for (int i = 0; i < kTB; ++i) {
      const int64_t t = tb * kTB + i;
      if (t >= p.seqlen) break;
      const int64_t o = (row * p.seqlen + t) * HP + e;
      const float gy = bb.gy[o];
      float dx = 0.f;
      for (int tn = 0; tn < tl.ntn; ++tn) dx += bb.dxpart[tn * per_tile + o];
      dx = fmaf(D, gy, dx);
      static_cast<T*>(p.dx.ptr)[p.dx.at(row, t, h, pp)] = T(dx);
      dDp = fmaf(gy, float(static_cast<const T*>(p.x.ptr)[p.x.at(row, t, h, pp)]), dDp);
    }
    bb.parts[(row * bb.ntb + tb) * bb.ncols + 2 * H * p.dstate + e] = dDp;
  }
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

template <typename T>
void run_backward(const IssmParams& p, const at::Tensor& like, cudaStream_t stream) {
  const Tiling tf = make_tiling(p, kBwdChunk, 8);  // forward-like kernels
  const Tiling tb = make_tiling(p, kBwdChunk, 1);  // bwd_chunk_kernel: 32 states per CTA
  const auto f32 = like.options().dtype(at::kFloat);
  const int64_t H = p.nheads, P = p.headdim, N = p.dstate, L = p.seqlen, R = tf.nrows;
  auto buf = [&](int64_t n) { return at::empty({std::max<int64_t>(n, 1)}, f32); };
  const int64_t ntb = (L + kTB - 1) / kTB;
  at::Tensor states = buf(R * tf.nchunks * H * P * N), adj = buf(R * tf.nchunks * H * P * N);
  at::Tensor prod = buf(R * tf.nchunks * H * N), gy = buf(R * L * H * P);
  at::Tensor ypart = tf.ntn > 1 ? buf(tf.ntn * R * L * H * P) : at::Tensor();
  at::Tensor dxpart = buf(tb.ntn * R * L * H * P), nred = buf(3 * tb.ntp * R * L * H * N);
  const int64_t ncols = 2 * H * N + H * P;
  at::Tensor parts = buf(R * ntb * ncols), sums = buf(ncols);

  Bufs fb;
  fb.states = states.data_ptr<float>();
  fb.prod = prod.data_ptr<float>();
  fb.gy = gy.data_ptr<float>();
  if (tf.ntn > 1) fb.ypart = ypart.data_ptr<float>();
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
    run_forward<T, kOutBwd>(p, tf, fb, stream);  // 1.
    const unsigned threads = static_cast<unsigned>(tf.warps * 32);
    npt_switch(tf.npt, [&](auto npt) {  // 2.
      adj_local_kernel<T, decltype(npt)::value><<<static_cast<unsigned>(tf.ctas()), threads, 0, stream>>>(p, tf, bb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const int64_t elems = R * H * P * N;  // 3.
    pass_kernel<true><<<blocks_for(elems, 256), 256, 0, stream>>>(p, tf, bb.adj, bb.prod);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const size_t smem = sizeof(float) * (3 * kTS * 32 + (kSub + kTS) * kPPT * 32) * tb.warps;  // 4.
    C10_CUDA_CHECK(cudaFuncSetAttribute(bwd_chunk_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    bwd_chunk_kernel<T><<<static_cast<unsigned>(tb.ctas()), static_cast<unsigned>(tb.warps * 32), smem, stream>>>(
        p, tb, bb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t nnb = (N + 127) / 128;  // 5.
    finish_n_kernel<T><<<static_cast<unsigned>(R * ntb * p.ngroups * nnb), 128, 0, stream>>>(p, tb, bb, nnb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_p_kernel<T><<<static_cast<unsigned>(R * ntb), 256, 0, stream>>>(p, tb, bb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
         const c10::optional<at::Tensor>& dfinal_states) {
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
  dispatch_io_dtype(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    if (p.headdim == 0 || p.nheads == 0) {  // nothing flows: zero gradients
      for (at::Tensor* t : {&r.dx, &r.ddt, &r.dA, &r.dB, &r.dC, &r.dD, &r.dz, &r.ddt_bias, &r.dinitial_states})
        t->zero_();
      return;
    }
    run_backward<T>(p, x, stream);
  });
  if (dinit32.defined() && !dinit32.is_same(r.dinitial_states)) r.dinitial_states.copy_(dinit32);
  return {r.dx, r.ddt, r.dA, r.dB, r.dC, r.dD, r.dz, r.ddt_bias, r.dinitial_states};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("issm_bwd", &bwd_cuda); }

}  // namespace issm
}  // namespace ssm_ext
