// CUDA backward of the ISSM scan. Same semantics as issm_cpu.cpp's backward; chunks of 64 steps.
//   1. forward phases A, B and C (issm_cuda.cuh) in kOutBwd mode: the state entering each
//      chunk, the chunk decay products, gy = dout * silu(z) (fp32 scratch) and dz.
//   2. adj_local_kernel: per chunk, the adjoint of the chunk's entering state from the chunk's
//      own outputs (dS += C gy^T; dS *= decay; zeroed at segment starts / resets; dfinal_states
//      added at segment ends), walking the chunk in reverse from 0.
//   3. pass_kernel<reverse>: the adjoint at the end of each chunk from all later chunks.
//   4. bwd_chunk_kernel: per (chunk, p-tile, 32-state n-tile), the forward states of the chunk
//      are recomputed (boundaries every kTS steps in shared memory, a kTS-step history in registers)
//      and the chunk walked in reverse: dx partials (over this n-tile, a lane reduce-scatter),
//      and per (t, n) sums over the CTA's p of dk = dS^T x, dlog = (dS . s_{t-1}) decay and
//      dC = s_t^T gy (warp partials summed over warps in order); dinitial_states at segment starts.
//   5. finish_n_kernel: per (row, 16 steps, group, 128 states): ddt (through the clamp mask and
//      softplus), dB = delta dk and dC summed over the group's heads in order, partials of dA
//      and ddt_bias. finish_p_kernel: dx = D gy + the n-tile partials in order, partials of dD.
//      params_kernel: dA, ddt_bias, dD summed over the partials in order.
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
constexpr int kSub = kBwdChunk / kTS;  // sub-blocks per chunk
constexpr int kTB = 16;                // steps per CTA in the finishing kernels

struct BwdBufs {
  float* states;  // entering states (nrows, nchunks, H, P, N)
  float* prod;    // (nrows, nchunks, H, N)
  float* gy;      // (nrows, L, H, P)
  float* adj;     // adjoint at chunk ends (nrows, nchunks, H, P, N)
  float* dxpart;  // (ntn, nrows, L, H, P)
  float* nred;    // (3, ntp, nrows, L, H, N): dk, dlog, dC summed over a p-tile
  float* dA_part;     // (nrows * ntb, H, N)
  float* dbias_part;  // (nrows * ntb, H, N)
  float* dD_part;     // (nrows * ntb, H, P)
  int64_t ntb;
};

// Step 2. Layout as chunk_kernel (tiling with NPT up to 8).
template <typename T, int NPT>
__global__ __launch_bounds__(kMaxWarps * 32, 1) void adj_local_kernel(IssmParams p, Tiling tl, BwdBufs bb) {
  constexpr int NT = 32 * NPT;
  __shared__ Stage<NT> st;
  const Cta a = decode_cta(tl, blockIdx.x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int PC = tl.warps * kPPT;
  const int64_t P = p.headdim, N = p.dstate;
  const int64_t nlo = a.tn * NT, plo = a.tp * PC;
  const int64_t pw = plo + warp * kPPT, nl = nlo + lane * NPT;
  const int64_t c0 = a.c * tl.Tc, c1 = std::min<int64_t>(c0 + tl.Tc, p.seqlen);
  bool pin[kPPT], nin[NPT];
#pragma unroll
  for (int j = 0; j < kPPT; ++j) pin[j] = pw + j < P;
#pragma unroll
  for (int j = 0; j < NPT; ++j) nin[j] = nl + j < N;
  float dS[kPPT][NPT];
#pragma unroll
  for (int j = 0; j < kPPT; ++j)
#pragma unroll
    for (int jn = 0; jn < NPT; ++jn) dS[j][jn] = 0.f;
  const int64_t nblk = (c1 - c0 + kTS - 1) / kTS;
  for (int64_t ib = nblk - 1; ib >= 0; --ib) {
    const int64_t t0 = c0 + ib * kTS;
    __syncthreads();
    stage_block<T, NT, true>(p, bb.gy, st, a.row, a.h, t0, c1, nlo, plo, PC);
    __syncthreads();
#pragma unroll
    for (int ts = kTS - 1; ts >= 0; --ts) {
      if (t0 + ts >= c1) continue;  // uniform
      const int end = st.end[ts];
      if (end >= 0 && p.dfinal_states.ptr) {
        const float* df = static_cast<const float*>(p.dfinal_states.ptr);
#pragma unroll
        for (int j = 0; j < kPPT; ++j)
#pragma unroll
          for (int jn = 0; jn < NPT; ++jn)
            if (pin[j] && nin[jn]) dS[j][jn] += df[p.dfinal_states.at(end, a.h, pw + j, nl + jn)];
      }
      float dec[NPT], c[NPT];
      lds<NPT>(&st.dec[ts][lane * NPT], dec);
      lds<NPT>(&st.C[ts][lane * NPT], c);
      const float4 gq = *reinterpret_cast<const float4*>(&st.gy[ts][warp * kPPT]);
      const float gv[kPPT] = {gq.x, gq.y, gq.z, gq.w};
      const bool cut = st.start[ts] != -2;
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
      if (pin[j] && nin[jn]) bb.adj[state_index(p, tl, a.row, a.c, a.h, pw + j, nl + jn)] = dS[j][jn];
}

// Step 4. NPT = 1: lane l owns state n = tn*32 + l; warp w owns p = plo + 4w .. +3. At most 112
// registers: two CTAs of 288 threads (P = 36) fit an SM; 512 threads (P = 64) still launch.
// Dynamic shared memory: 3 * warps * kTS * 32 floats of warp partials (dk, dlog, dC), then
// kSub * kPPT * blockDim floats of sub-block boundary states (each thread its own column).
template <typename T>
__global__ SSM_EXT_MAXNREG_112 void bwd_chunk_kernel(IssmParams p, Tiling tl, BwdBufs bb) {
  constexpr int NT = 32;
  __shared__ Stage<NT> st;
  SSM_EXT_DYNAMIC_SMEM(float, red);  // [3][warps][kTS][32]
  const Cta a = decode_cta(tl, blockIdx.x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int W = tl.warps, PC = W * kPPT;
  const int64_t P = p.headdim, N = p.dstate, H = p.nheads;
  const int64_t nlo = a.tn * NT, plo = a.tp * PC;
  const int64_t pw = plo + warp * kPPT, n = nlo + lane;
  const int64_t c0 = a.c * tl.Tc, c1 = std::min<int64_t>(c0 + tl.Tc, p.seqlen);
  const bool nin = n < N;
  bool pin[kPPT];
#pragma unroll
  for (int j = 0; j < kPPT; ++j) pin[j] = pw + j < P;
  auto init_at = [&](int seg, int j) {
    return (seg >= 0 && p.initial_states.ptr && pin[j] && nin)
               ? load_as<float>(p.initial_states.ptr, p.init_dtype, p.initial_states.at(seg, a.h, pw + j, n))
               : 0.f;
  };

  // Boundaries: bnd(jb, j) = state entering sub-block jb (before its first step's event), in
  // shared memory (registers would cost 32 per thread and halve the CTAs per SM).
  float* bnd_sm = red + 3 * W * kTS * 32;
  auto bnd = [&](int jb, int j) -> float& { return bnd_sm[(jb * kPPT + j) * blockDim.x + threadIdx.x]; };
#pragma unroll
  for (int j = 0; j < kPPT; ++j)
    bnd(0, j) = (pin[j] && nin) ? bb.states[state_index(p, tl, a.row, a.c, a.h, pw + j, n)] : 0.f;
#pragma unroll 1
  for (int jb = 0; jb < kSub; ++jb) {
    const int64_t t0 = c0 + jb * kTS;
    float s[kPPT];
#pragma unroll
    for (int j = 0; j < kPPT; ++j) s[j] = bnd(jb, j);
    if (jb + 1 < kSub) {
      if (t0 < c1) {  // uniform
        __syncthreads();
        stage_block<T, NT, false>(p, nullptr, st, a.row, a.h, t0, c1, nlo, plo, PC);
        __syncthreads();
#pragma unroll
        for (int ts = 0; ts < kTS; ++ts) {
          const int start = st.start[ts];
          const float dec = st.dec[ts][lane], k = st.k[ts][lane];
          const float4 xq = *reinterpret_cast<const float4*>(&st.x[ts][warp * kPPT]);
          const float xv[kPPT] = {xq.x, xq.y, xq.z, xq.w};
#pragma unroll
          for (int j = 0; j < kPPT; ++j) {
            if (start != -2) s[j] = init_at(start, j);
            s[j] = fmaf(dec, s[j], k * xv[j]);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kPPT; ++j) bnd(jb + 1, j) = s[j];
    }
  }

  float dS[kPPT];
#pragma unroll
  for (int j = 0; j < kPPT; ++j)
    dS[j] = (pin[j] && nin) ? bb.adj[state_index(p, tl, a.row, a.c, a.h, pw + j, n)] : 0.f;

  float* red_dk = red;
  float* red_dl = red + W * kTS * 32;
  float* red_dc = red + 2 * W * kTS * 32;
#pragma unroll 1
  for (int jb = kSub - 1; jb >= 0; --jb) {
    const int64_t t0 = c0 + jb * kTS;
    if (t0 < c1) {  // uniform
      __syncthreads();
      stage_block<T, NT, true>(p, bb.gy, st, a.row, a.h, t0, c1, nlo, plo, PC);
      __syncthreads();
      // the states after each step of the sub-block
      float hist[kTS][kPPT];
#pragma unroll
      for (int ts = 0; ts < kTS; ++ts) {
        const int start = st.start[ts];
        const float dec = st.dec[ts][lane], k = st.k[ts][lane];
        const float4 xq = *reinterpret_cast<const float4*>(&st.x[ts][warp * kPPT]);
        const float xv[kPPT] = {xq.x, xq.y, xq.z, xq.w};
#pragma unroll
        for (int j = 0; j < kPPT; ++j) {
          float prev = ts == 0 ? bnd(jb, j) : hist[ts > 0 ? ts - 1 : 0][j];
          if (start != -2) prev = init_at(start, j);
          hist[ts][j] = fmaf(dec, prev, k * xv[j]);
        }
      }
#pragma unroll
      for (int ts = kTS - 1; ts >= 0; --ts) {
        float dk = 0.f, dl = 0.f, dc = 0.f;
        if (t0 + ts < c1) {  // uniform
          const int start = st.start[ts], end = st.end[ts];
          if (end >= 0 && p.dfinal_states.ptr) {
            const float* df = static_cast<const float*>(p.dfinal_states.ptr);
#pragma unroll
            for (int j = 0; j < kPPT; ++j)
              if (pin[j] && nin) dS[j] += df[p.dfinal_states.at(end, a.h, pw + j, n)];
          }
          const float dec = st.dec[ts][lane], k = st.k[ts][lane], c = st.C[ts][lane];
          const float4 xq = *reinterpret_cast<const float4*>(&st.x[ts][warp * kPPT]);
          const float4 gq = *reinterpret_cast<const float4*>(&st.gy[ts][warp * kPPT]);
          const float xv[kPPT] = {xq.x, xq.y, xq.z, xq.w};
          const float gv[kPPT] = {gq.x, gq.y, gq.z, gq.w};
          float dxp[kPPT];
#pragma unroll
          for (int j = 0; j < kPPT; ++j) {
            dS[j] = fmaf(c, gv[j], dS[j]);
            dc = fmaf(hist[ts][j], gv[j], dc);
            dxp[j] = dS[j] * k;
            dk = fmaf(dS[j], xv[j], dk);
            float prev = ts == 0 ? bnd(jb, j) : hist[ts > 0 ? ts - 1 : 0][j];
            if (start != -2) prev = init_at(start, j);
            dl = fmaf(dS[j], prev, dl);
            dS[j] *= dec;
          }
          dl *= dec;
          const float dx = reduce_scatter4(dxp, lane);
          if ((lane & 7) == 0) st.y[ts][warp * kPPT + scatter_index4(lane)] = dx;
          if (start >= 0 && p.dinitial_states.ptr) {
#pragma unroll
            for (int j = 0; j < kPPT; ++j)
              if (pin[j] && nin) store_as(p.dinitial_states.ptr, p.init_dtype, p.dinitial_states.at(start, a.h, pw + j, n), dS[j]);
          }
          if (start != -2) {
#pragma unroll
            for (int j = 0; j < kPPT; ++j) dS[j] = 0.f;
          }
        }
        red_dk[(warp * kTS + ts) * 32 + lane] = dk;
        red_dl[(warp * kTS + ts) * 32 + lane] = dl;
        red_dc[(warp * kTS + ts) * 32 + lane] = dc;
      }
      __syncthreads();
      // sums over the warps, in warp order, and the dx partials
      const int64_t per_q = tl.ntp * tl.nrows * p.seqlen * H * N;
      for (int i = threadIdx.x; i < 3 * kTS * 32; i += blockDim.x) {
        const int q = i / (kTS * 32), ts = (i / 32) % kTS, l = i % 32;
        const int64_t t = t0 + ts, nn = nlo + l;
        if (t >= c1 || nn >= N) continue;
        const float* r = red + q * W * kTS * 32;
        float sum = 0.f;
        for (int w = 0; w < W; ++w) sum += r[(w * kTS + ts) * 32 + l];
        bb.nred[q * per_q + (((a.tp * tl.nrows + a.row) * p.seqlen + t) * H + a.h) * N + nn] = sum;
      }
      for (int i = threadIdx.x; i < kTS * PC; i += blockDim.x) {
        const int ts = i / PC, j = i % PC;
        const int64_t t = t0 + ts, pp = plo + j;
        if (t >= c1 || pp >= P) continue;
        bb.dxpart[((a.tn * tl.nrows + a.row) * p.seqlen + t) * H * P + a.h * P + pp] = st.y[ts][j];
      }
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
    const int64_t part = ((row * bb.ntb + tb) * H + h) * N + n;
    bb.dA_part[part] = dAp;
    bb.dbias_part[part] = dbp;
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
    bb.dD_part[(row * bb.ntb + tb) * HP + e] = dDp;
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

// Step 5c. CTA per head: dA, ddt_bias, dD summed over the (row, step-block) partials in order.
__global__ __launch_bounds__(256) void params_kernel(IssmParams p, BwdBufs bb, int64_t nparts) {
  __shared__ float sm[256];
  const int64_t h = blockIdx.x, H = p.nheads, N = p.dstate, P = p.headdim;
  float bias_head = 0.f, D_head = 0.f;
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    float sa = 0.f, sb = 0.f;
    for (int64_t k = 0; k < nparts; ++k) {
      sa += bb.dA_part[(k * H + h) * N + n];
      sb += bb.dbias_part[(k * H + h) * N + n];
    }
    store_as(p.dA.ptr, p.A_dtype, p.dA.at(h, n), sa);
    if (p.ddt_bias.ptr && !p.dt_bias_per_head) store_as(p.ddt_bias.ptr, p.dt_bias_dtype, p.ddt_bias.at(h, n), sb);
    bias_head += sb;
  }
  for (int64_t pp = threadIdx.x; pp < P; pp += blockDim.x) {
    float sd = 0.f;
    for (int64_t k = 0; k < nparts; ++k) sd += bb.dD_part[(k * H + h) * P + pp];
    if (p.dD.ptr && !p.D_per_head) store_as(p.dD.ptr, p.D_dtype, p.dD.at(h, pp), sd);
    D_head += sd;
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
  const int64_t H = p.nheads, P = p.headdim, N = p.dstate, L = p.seqlen;
  auto buf = [&](int64_t n) { return at::empty({std::max<int64_t>(n, 1)}, f32); };
  const int64_t ntb = (L + kTB - 1) / kTB;
  at::Tensor states = buf(tf.nrows * tf.nchunks * H * P * N), adj = buf(tf.nrows * tf.nchunks * H * P * N);
  at::Tensor prod = buf(tf.nrows * tf.nchunks * H * N), gy = buf(tf.nrows * L * H * P);
  at::Tensor ypart = tf.ntn > 1 ? buf(tf.ntn * tf.nrows * L * H * P) : at::Tensor();
  at::Tensor dxpart = buf(tb.ntn * tb.nrows * L * H * P), nred = buf(3 * tb.ntp * tb.nrows * L * H * N);
  at::Tensor dA_part = buf(tb.nrows * ntb * H * N), dbias_part = buf(tb.nrows * ntb * H * N);
  at::Tensor dD_part = buf(tb.nrows * ntb * H * P);

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
  bb.dA_part = dA_part.data_ptr<float>();
  bb.dbias_part = dbias_part.data_ptr<float>();
  bb.dD_part = dD_part.data_ptr<float>();
  bb.ntb = ntb;

  if (tf.ctas() > 0) {
    run_forward<T, kOutBwd>(p, tf, fb, stream);  // 1.
    const unsigned threads = static_cast<unsigned>(tf.warps * 32);
    npt_switch(tf.npt, [&](auto npt) {  // 2.
      adj_local_kernel<T, decltype(npt)::value><<<static_cast<unsigned>(tf.ctas()), threads, 0, stream>>>(p, tf, bb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const int64_t elems = tf.nrows * H * P * N;  // 3.
    pass_kernel<true><<<blocks_for(elems, 256), 256, 0, stream>>>(p, tf, bb.adj, bb.prod);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const size_t smem = sizeof(float) * (3 * kTS * 32 + kSub * kPPT * 32) * tb.warps;  // 4.
    C10_CUDA_CHECK(cudaFuncSetAttribute(bwd_chunk_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    bwd_chunk_kernel<T><<<static_cast<unsigned>(tb.ctas()), static_cast<unsigned>(tb.warps * 32), smem, stream>>>(
        p, tb, bb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t nnb = (N + 127) / 128;  // 5.
    finish_n_kernel<T><<<static_cast<unsigned>(tb.nrows * ntb * p.ngroups * nnb), 128, 0, stream>>>(p, tb, bb, nnb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_p_kernel<T><<<static_cast<unsigned>(tb.nrows * ntb), 256, 0, stream>>>(p, tb, bb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  params_kernel<<<static_cast<unsigned>(H), 256, 0, stream>>>(p, bb, tf.ctas() > 0 ? tb.nrows * ntb : 0);
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
  const IssmParams& p = r.p;
  TORCH_CHECK(p.dstate > 0, msg("dstate (B.size(3)) must be > 0 on CUDA, got ", p.dstate));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_io_dtype(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    if (p.headdim == 0 || p.nheads == 0) {  // nothing flows: zero gradients
      for (at::Tensor* t : {&r.dx, &r.ddt, &r.dA, &r.dB, &r.dC, &r.dD, &r.dz, &r.ddt_bias, &r.dinitial_states})
        t->zero_();
      return;
    }
    run_backward<T>(p, x, stream);
  });
  return {r.dx, r.ddt, r.dA, r.dB, r.dC, r.dD, r.dz, r.ddt_bias, r.dinitial_states};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("issm_bwd", &bwd_cuda); }

}  // namespace issm
}  // namespace ssm_ext
