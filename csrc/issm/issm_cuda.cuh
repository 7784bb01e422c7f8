// Device code shared by the ISSM CUDA forward and backward (issm_fwd.cu, issm_bwd.cu).
//
// Chunk-parallel recurrence in fp32 FFMA (no tensor cores: fp32 inputs need ~1e-5):
//   phase A  chunk_kernel<kLocal>   per (row, head, chunk of Tc steps, p-tile, n-tile): run the
//            recurrence from 0 over the chunk; write the chunk-end state ("local") and the
//            product of the chunk's decays per n (0 when a segment start or a seq_idx reset lies
//            in the chunk: the incoming state does not pass).
//   phase B  pass_kernel            sequential over chunks, elementwise over (row, head, p, n):
//            S_c = prod_c * S_{c-1} + local_c; the buffer ends up holding the state entering
//            each chunk. Run in reverse it passes the adjoint of the backward.
//   phase C  chunk_kernel<kOut>     re-run each chunk from its entering state and emit
//            y_t[p] = sum_n C_t[n] s_t[p,n] + D x_t[p] (gated by silu(z)), the final states at
//            segment ends. <kOutBwd> emits gy = dout * silu(z) and dz instead of out.
// Thread layout: a warp owns kPPT consecutive p; lane l owns NPT consecutive n (l*NPT ...).
// A CTA has W warps (W*kPPT p: a p-tile) and 32*NPT n (an n-tile). Inputs are staged into
// shared memory kTS steps at a time (decay, k = delta*B, C, x, step events), the state stays
// in registers. The y reduction over n is a lane reduce-scatter (6 shuffles per step for 4 p),
// whose addition tree is the same for every step: results do not depend on a step's position.
// The decay is given per state (ISSM); a scalar per head (Mamba-2) is the same code with
// the staged decay broadcast over n.
//
// Segments and events: a "row" is a batch row (or the packed row with cu_seqlens). Per step t
// of a row: start = i when t starts segment i (state := initial_states[i] or 0), -1 when
// seq_idx changes at t (state := 0), -2 otherwise; end = i when t is the last step of segment
// i (final_states[i] := state after the step), -1 otherwise. cu_seqlens values are read on the
// device (binary search); nothing syncs with the host.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/load.h"
#include "issm/issm.h"

// The dynamic shared-memory array of a kernel (a macro so that a host-side emulation of these
// kernels can supply its own buffer).
#ifndef SSM_EXT_DYNAMIC_SMEM
#define SSM_EXT_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

namespace ssm_ext {
namespace issm {
namespace {

constexpr int kPPT = 4;        // p per warp (each lane holds all kPPT)
constexpr int kTS = 8;         // steps staged per shared-memory block
constexpr int kMaxTc = 128;    // chunk length bound (chunk_kernel keeps a chunk's events in shared memory)
constexpr int kMaxWarps = 16;  // a CTA covers up to 64 p
constexpr int kMaxPC = kMaxWarps * kPPT;

enum Mode : int { kLocal = 0, kOut = 1, kOutBwd = 2 };

// __maxnreg__ needs nvcc 12.4+; older ones get the plain 512-thread bound (128 registers).
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define SSM_EXT_MAXNREG_112 __maxnreg__(112)
#else
#define SSM_EXT_MAXNREG_112 __launch_bounds__(kMaxWarps * 32, 1)
#endif

struct Tiling {
  int64_t nrows = 0, nheads = 0, seqlen = 0, nchunks = 0;
  int Tc = 64;       // chunk length, a multiple of kTS
  int npt = 1;       // n per lane
  int warps = 1;     // warps per CTA
  int ntp = 1, ntn = 1;
  int64_t ctas() const { return nrows * nheads * nchunks * ntp * ntn; }
};

// max_npt: 8 for the forward kernels, 1 for the backward's adjoint kernels. Tc = 0: choose.
inline Tiling make_tiling(const IssmParams& p, int Tc, int max_npt) {
  Tiling tl;
  tl.nrows = p.cu_seqlens ? 1 : p.batch;
  tl.nheads = p.nheads;
  tl.seqlen = p.seqlen;
  const int64_t N = p.dstate, P = p.headdim;
  tl.npt = N <= 32 ? 1 : N <= 64 ? 2 : N <= 128 ? 4 : 8;
  tl.npt = std::min(tl.npt, max_npt);
  tl.ntn = static_cast<int>((N + 32 * tl.npt - 1) / (32 * tl.npt));
  tl.ntp = static_cast<int>((P + kMaxPC - 1) / kMaxPC);
  tl.warps = static_cast<int>((P + int64_t(kPPT) * tl.ntp - 1) / (int64_t(kPPT) * tl.ntp));
  if (Tc == 0) {
    const int64_t base = tl.nrows * tl.nheads * tl.ntp * tl.ntn;
    Tc = base * ((p.seqlen + 127) / 128) >= 1024 ? 128 : 64;
  }
  tl.Tc = std::min(Tc, kMaxTc);
  tl.nchunks = (p.seqlen + Tc - 1) / Tc;
  return tl;
}

// Scratch buffers (fp32, allocated by the launchers).
struct Bufs {
  float* states = nullptr;  // (nrows, nchunks, H, P, N): local chunk states, then entering states
  float* prod = nullptr;    // (nrows, nchunks, H, N): product of the chunk's decays
  float* ypart = nullptr;   // (ntn, nrows, L, H, P): y partial sums per n-tile (ntn > 1 only)
  float* gy = nullptr;      // (nrows, L, H, P): dout * silu(z) (backward)
};

__device__ __forceinline__ float sigmoid_f(float v) { return 1.f / (1.f + __expf(-v)); }

// delta = clamp(phi(v), lo, hi); *mask = d delta / d v (0 where clamped).
__device__ __forceinline__ float delta_of(const IssmParams& p, float v, float* mask) {
  float phi = v, dphi = 1.f;
  if (p.dt_softplus && v <= 20.f) {
    phi = log1pf(__expf(v));
    dphi = sigmoid_f(v);
  }
  const float lo = float(p.dt_lo), hi = float(p.dt_hi);
  if (mask) *mask = (phi >= lo && phi <= hi) ? dphi : 0.f;
  return fminf(fmaxf(phi, lo), hi);
}

// dt + dt_bias at (b, t, h, n), in fp32.
template <typename T>
__device__ __forceinline__ float dt_at(const IssmParams& p, int64_t b, int64_t t, int64_t h, int64_t n) {
  float v = float(static_cast<const T*>(p.dt.ptr)[p.dt.at(b, t, h, n)]);
  if (p.dt_bias.ptr) v += load_as<float>(p.dt_bias.ptr, p.dt_bias_dtype, p.dt_bias.at(h, n));
  return v;
}

// The events of step t of row `row` (see the file comment).
__device__ __forceinline__ void step_events(const IssmParams& p, int64_t row, int64_t t, int* start, int* end) {
  *start = -2;
  *end = -1;
  if (t < 0 || t >= p.seqlen) return;
  if (!p.cu_seqlens) {
    if (t == 0) *start = static_cast<int>(row);
    else if (resets_at(p, row, t)) *start = -1;
    if (t == p.seqlen - 1) *end = static_cast<int>(row);
    return;
  }
  if (p.nseq <= 0) return;
  // the last segment i whose start cu[i] <= t (empty segments before it share its start)
  int64_t lo = 0, hi = p.nseq - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (segment(p, mid).t0 <= t) lo = mid;
    else hi = mid - 1;
  }
  const Segment sg = segment(p, lo);
  if (sg.t0 == t) *start = static_cast<int>(lo);
  else if (t > sg.t0 && resets_at(p, 0, t)) *start = -1;
  if (t == sg.t1 - 1) *end = static_cast<int>(lo);
}

// One staged block of kTS steps for an n-tile of NT states and a p-tile of up to kMaxPC.
template <int NT>
struct alignas(16) Stage {
  float dec[kTS][NT];   // exp(delta*A); 1 outside the row / the states
  float k[kTS][NT];     // delta*B; 0 outside
  float C[kTS][NT];     // 0 outside
  float x[kTS][kMaxPC];   // 0 outside
  float gy[kTS][kMaxPC];  // backward: dout * silu(z)
  float y[kTS][kMaxPC];   // y partial (over this n-tile)
  int start[kTS], end[kTS];
};

// Fills st for steps [t0, t0 + kTS) of (row, h), n in [nlo, nlo + NT), p in [plo, plo + PC).
// Steps at or past t1 get dec = 1, k = 0, C = 0, x = 0 (they change nothing).
template <typename T, int NT, bool kGy>
__device__ __forceinline__ void stage_block(const IssmParams& p, const float* gy_buf, Stage<NT>& st, int64_t row,
                                            int64_t h, int64_t t0, int64_t t1, int64_t nlo, int64_t plo, int PC) {
  const int64_t g = h / p.heads_per_group, N = p.dstate, P = p.headdim;
  for (int i = threadIdx.x; i < kTS * NT; i += blockDim.x) {
    const int ts = i / NT, j = i % NT;
    const int64_t t = t0 + ts, n = nlo + j;
    float dec = 1.f, k = 0.f, c = 0.f;
    if (t < t1 && n < N) {
      const float d = delta_of(p, dt_at<T>(p, row, t, h, n), nullptr);
      dec = __expf(d * load_as<float>(p.A.ptr, p.A_dtype, p.A.at(h, n)));
      k = d * float(static_cast<const T*>(p.B.ptr)[p.B.at(row, t, g, n)]);
      c = float(static_cast<const T*>(p.C.ptr)[p.C.at(row, t, g, n)]);
    }
    st.dec[ts][j] = dec;
    st.k[ts][j] = k;
    st.C[ts][j] = c;
  }
  for (int i = threadIdx.x; i < kTS * PC; i += blockDim.x) {
    const int ts = i / PC, j = i % PC;
    const int64_t t = t0 + ts, pp = plo + j;
    const bool in = t < t1 && pp < P;
    st.x[ts][j] = in ? float(static_cast<const T*>(p.x.ptr)[p.x.at(row, t, h, pp)]) : 0.f;
    if (kGy) st.gy[ts][j] = in ? gy_buf[((row * p.seqlen + t) * p.nheads + h) * P + pp] : 0.f;
  }
  if (threadIdx.x < kTS) {
    int s, e;
    const int64_t t = t0 + threadIdx.x;
    step_events(p, row, t < t1 ? t : -1, &s, &e);
    st.start[threadIdx.x] = s;
    st.end[threadIdx.x] = e;
  }
}

// The forward chunk kernel's staging is software-pipelined: the raw global loads of block i+1
// are issued into registers (Raw) before block i is computed, and converted into the Stage after
// it, so a block's load latency hides behind the previous block's compute. Per-CTA constants (A,
// dt_bias per n; events per step of the chunk) are read once in the prologue.
constexpr int kPre = 4;       // n-elements per thread prefetched (all of them for >= 2*NPT warps)
static_assert(kTS * kPPT == 32, "x, z of a block: exactly one element per thread");

template <typename T>
struct Raw {
  T dt[kPre], B[kPre], C[kPre];
  T x, z;
};

// Element q of this thread's share of the block's (step, n) elements.
__device__ __forceinline__ int raw_index(int q) { return threadIdx.x + q * blockDim.x; }

// Issues the loads of steps [t0, min(t0 + kTS, t1)) into r (z only with kZ); nothing waits on
// them here.
template <typename T, int NT, bool kZ>
__device__ __forceinline__ void prefetch_block(const IssmParams& p, Raw<T>& r, int64_t row, int64_t h, int64_t g,
                                               int64_t t0, int64_t t1, int64_t nlo, int64_t plo, int PC) {
#pragma unroll
  for (int q = 0; q < kPre; ++q) {
    const int i = raw_index(q);
    const int64_t t = t0 + i / NT, n = nlo + i % NT;
    const bool in = i < kTS * NT && t < t1 && n < p.dstate;
    r.dt[q] = in ? static_cast<const T*>(p.dt.ptr)[p.dt.at(row, t, h, n)] : T(0.f);
    r.B[q] = in ? static_cast<const T*>(p.B.ptr)[p.B.at(row, t, g, n)] : T(0.f);
    r.C[q] = in ? static_cast<const T*>(p.C.ptr)[p.C.at(row, t, g, n)] : T(0.f);
  }
  const int64_t t = t0 + threadIdx.x / PC, pp = plo + threadIdx.x % PC;
  const bool in = t < t1 && pp < p.headdim;
  r.x = in ? static_cast<const T*>(p.x.ptr)[p.x.at(row, t, h, pp)] : T(0.f);
  r.z = kZ && in && p.z.ptr ? static_cast<const T*>(p.z.ptr)[p.z.at(row, t, h, pp)] : T(0.f);
}

// dec, k, C of element (ts, j) from its raw dt, B, C; A and dt_bias of the n-tile in sA, sbias.
template <typename T, int NT>
__device__ __forceinline__ void stage_elem(const IssmParams& p, Stage<NT>& st, const float* sA, const float* sbias,
                                           int ts, int j, bool in, T dtv, T Bv, T Cv) {
  float dec = 1.f, k = 0.f, c = 0.f;
  if (in) {
    const float d = delta_of(p, float(dtv) + sbias[j], nullptr);
    dec = __expf(d * sA[j]);
    k = d * float(Bv);
    c = float(Cv);
  }
  st.dec[ts][j] = dec;
  st.k[ts][j] = k;
  st.C[ts][j] = c;
}

// Writes the prefetched block into st; elements past kPre per thread (CTAs of fewer than 2*NPT
// warps) are loaded here. Steps at or past t1 get dec = 1, k = 0, C = 0, x = 0.
template <typename T, int NT>
__device__ __forceinline__ void commit_block(const IssmParams& p, const Raw<T>& r, Stage<NT>& st, const float* sA,
                                             const float* sbias, int64_t row, int64_t h, int64_t g, int64_t t0,
                                             int64_t t1, int64_t nlo, int PC) {
#pragma unroll
  for (int q = 0; q < kPre; ++q) {
    const int i = raw_index(q);
    if (i >= kTS * NT) break;
    const int ts = i / NT, j = i % NT;
    stage_elem<T, NT>(p, st, sA, sbias, ts, j, t0 + ts < t1 && nlo + j < p.dstate, r.dt[q], r.B[q], r.C[q]);
  }
  for (int i = raw_index(kPre); i < kTS * NT; i += blockDim.x) {
    const int ts = i / NT, j = i % NT;
    const int64_t t = t0 + ts, n = nlo + j;
    const bool in = t < t1 && n < p.dstate;
    const T* dt = static_cast<const T*>(p.dt.ptr);
    const T* B = static_cast<const T*>(p.B.ptr);
    const T* C = static_cast<const T*>(p.C.ptr);
    stage_elem<T, NT>(p, st, sA, sbias, ts, j, in, in ? dt[p.dt.at(row, t, h, n)] : T(0.f),
                      in ? B[p.B.at(row, t, g, n)] : T(0.f), in ? C[p.C.at(row, t, g, n)] : T(0.f));
  }
  st.x[threadIdx.x / PC][threadIdx.x % PC] = float(r.x);
}

// NPT consecutive floats from shared memory.
template <int NPT>
__device__ __forceinline__ void lds(const float* src, float* v) {
  if constexpr (NPT % 4 == 0) {
#pragma unroll
    for (int j = 0; j < NPT; j += 4) {
      const float4 q = *reinterpret_cast<const float4*>(src + j);
      v[j] = q.x, v[j + 1] = q.y, v[j + 2] = q.z, v[j + 3] = q.w;
    }
  } else if constexpr (NPT == 2) {
    const float2 q = *reinterpret_cast<const float2*>(src);
    v[0] = q.x, v[1] = q.y;
  } else {
#pragma unroll
    for (int j = 0; j < NPT; ++j) v[j] = src[j];
  }
}

// v[0..3] partial sums of 4 values over the warp's lanes -> lanes with (lane & 7) == 0 hold the
// full sum of value ((lane >> 4) & 1) * 2 + ((lane >> 3) & 1); returned for every lane (each lane
// of a group of 8 gets the same value). The addition tree is fixed by lane bits, not by data.
__device__ __forceinline__ float reduce_scatter4(const float* v, int lane) {
  const bool b4 = lane & 16, b3 = lane & 8;
  const float send0 = b4 ? v[0] : v[2], send1 = b4 ? v[1] : v[3];
  const float keep0 = b4 ? v[2] : v[0], keep1 = b4 ? v[3] : v[1];
  const float r0 = keep0 + __shfl_xor_sync(0xffffffffu, send0, 16);
  const float r1 = keep1 + __shfl_xor_sync(0xffffffffu, send1, 16);
  float u = (b3 ? r1 : r0) + __shfl_xor_sync(0xffffffffu, b3 ? r0 : r1, 8);
  u += __shfl_xor_sync(0xffffffffu, u, 4);
  u += __shfl_xor_sync(0xffffffffu, u, 2);
  u += __shfl_xor_sync(0xffffffffu, u, 1);
  return u;
}
__device__ __forceinline__ int scatter_index4(int lane) { return ((lane >> 4) & 1) * 2 + ((lane >> 3) & 1); }

struct Cta {
  int64_t row, h, c, tp, tn;
};
__device__ __forceinline__ Cta decode_cta(const Tiling& tl, int64_t idx) {
  Cta a;
  a.tn = idx % tl.ntn;
  idx /= tl.ntn;
  a.tp = idx % tl.ntp;
  idx /= tl.ntp;
  a.c = idx % tl.nchunks;
  idx /= tl.nchunks;
  a.h = idx % tl.nheads;
  a.row = idx / tl.nheads;
  return a;
}

__device__ __forceinline__ int64_t state_index(const IssmParams& p, const Tiling& tl, int64_t row, int64_t c,
                                               int64_t h, int64_t pp, int64_t n) {
  return (((row * tl.nchunks + c) * p.nheads + h) * p.headdim + pp) * p.dstate + n;
}
__device__ __forceinline__ int64_t prod_index(const IssmParams& p, const Tiling& tl, int64_t row, int64_t c,
                                              int64_t h, int64_t n) {
  return ((row * tl.nchunks + c) * p.nheads + h) * p.dstate + n;
}

// The y epilogue of one element (t, p) of head h: y includes D x (Dv: D[h, p], 0 when absent;
// zv: z[t, h, p] when z is given). Forward: out = y * silu(z). Backward: gy = dout * silu(z) (to
// the scratch), dz = dout * y * silu'(z).
template <typename T, int MODE>
__device__ __forceinline__ void emit_y(const IssmParams& p, const Bufs& bufs, int64_t row, int64_t t, int64_t h,
                                       int64_t pp, float y, float xv, float Dv, float zv) {
  if (p.D.ptr) y += Dv * xv;
  if constexpr (MODE == kOut) {
    if (p.z.ptr) y *= zv * sigmoid_f(zv);
    static_cast<T*>(p.out.ptr)[p.out.at(row, t, h, pp)] = T(y);
  } else {
    const float go = float(static_cast<const T*>(p.dout.ptr)[p.dout.at(row, t, h, pp)]);
    float gy = go;
    if (p.z.ptr) {
      const float s = sigmoid_f(zv);
      gy = go * zv * s;
      static_cast<T*>(p.dz.ptr)[p.dz.at(row, t, h, pp)] = T(go * y * s * (1.f + zv * (1.f - s)));
    }
    bufs.gy[((row * p.seqlen + t) * p.nheads + h) * p.headdim + pp] = gy;
  }
}

__device__ __forceinline__ float D_at(const IssmParams& p, int64_t h, int64_t pp) {
  return p.D.ptr ? load_as<float>(p.D.ptr, p.D_dtype, p.D.at(h, pp)) : 0.f;
}

// Phase A (kLocal) and phase C (kOut, kOutBwd); see the file comment. 112 registers: two CTAs of
// 9 warps (P = 36) per SM.
template <typename T, int NPT, int MODE>
__global__ SSM_EXT_MAXNREG_112 void chunk_kernel(IssmParams p, Tiling tl, Bufs bufs) {
  constexpr int NT = 32 * NPT;
  __shared__ Stage<NT> st;
  __shared__ float sA[NT], sbias[NT];
  __shared__ int ev_start[kMaxTc], ev_end[kMaxTc];
  const Cta a = decode_cta(tl, blockIdx.x);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int PC = tl.warps * kPPT;
  const int64_t P = p.headdim, N = p.dstate, g = a.h / p.heads_per_group;
  const int64_t nlo = a.tn * NT, plo = a.tp * PC;
  const int64_t pw = plo + warp * kPPT, nl = nlo + lane * NPT;
  const int64_t c0 = a.c * tl.Tc, c1 = std::min<int64_t>(c0 + tl.Tc, p.seqlen);
  bool pin[kPPT], nin[NPT];
#pragma unroll
  for (int j = 0; j < kPPT; ++j) pin[j] = pw + j < P;
#pragma unroll
  for (int j = 0; j < NPT; ++j) nin[j] = nl + j < N;

  Raw<T> r;
  prefetch_block<T, NT, MODE != kLocal>(p, r, a.row, a.h, g, c0, c1, nlo, plo, PC);
  for (int j = threadIdx.x; j < NT; j += blockDim.x) {
    const int64_t n = nlo + j;
    sA[j] = n < N ? load_as<float>(p.A.ptr, p.A_dtype, p.A.at(a.h, n)) : 0.f;
    sbias[j] = n < N && p.dt_bias.ptr ? load_as<float>(p.dt_bias.ptr, p.dt_bias_dtype, p.dt_bias.at(a.h, n)) : 0.f;
  }
  for (int i = threadIdx.x; i < c1 - c0; i += blockDim.x) step_events(p, a.row, c0 + i, &ev_start[i], &ev_end[i]);
  // The epilogue element of this thread (the same (step in block, p) in every block).
  const int ets = threadIdx.x / PC;
  const int64_t epp = plo + threadIdx.x % PC;
  const float Dv = MODE != kLocal && epp < P ? D_at(p, a.h, epp) : 0.f;

  float s[kPPT][NPT], prod[NPT];
#pragma unroll
  for (int jn = 0; jn < NPT; ++jn) prod[jn] = 1.f;
#pragma unroll
  for (int j = 0; j < kPPT; ++j)
#pragma unroll
    for (int jn = 0; jn < NPT; ++jn)
      s[j][jn] = (MODE != kLocal && pin[j] && nin[jn])
                     ? bufs.states[state_index(p, tl, a.row, a.c, a.h, pw + j, nl + jn)]
                     : 0.f;

  for (int64_t t0 = c0; t0 < c1; t0 += kTS) {
    __syncthreads();  // the previous block's reads of st are done (first: sA, sbias, events written)
    commit_block<T, NT>(p, r, st, sA, sbias, a.row, a.h, g, t0, c1, nlo, PC);
    const float zv = float(r.z);
    __syncthreads();
    if (t0 + kTS < c1) prefetch_block<T, NT, MODE != kLocal>(p, r, a.row, a.h, g, t0 + kTS, c1, nlo, plo, PC);
    // Not unrolled: the step body (with its rare reset and final-state paths) unrolled 8 times
    // made the kernel ~140-170 KB of code, beyond the instruction cache.
#pragma unroll 1
    for (int ts = 0; ts < kTS; ++ts) {
      const int start = t0 + ts < c1 ? ev_start[t0 - c0 + ts] : -2;
      if (start != -2) {  // uniform over the CTA
#pragma unroll
        for (int jn = 0; jn < NPT; ++jn) prod[jn] = 0.f;
#pragma unroll
        for (int j = 0; j < kPPT; ++j)
#pragma unroll
          for (int jn = 0; jn < NPT; ++jn)
            s[j][jn] = (start >= 0 && p.initial_states.ptr && pin[j] && nin[jn])
                           ? load_as<float>(p.initial_states.ptr, p.init_dtype,
                                            p.initial_states.at(start, a.h, pw + j, nl + jn))
                           : 0.f;
      }
      float dec[NPT], k[NPT];
      lds<NPT>(&st.dec[ts][lane * NPT], dec);
      lds<NPT>(&st.k[ts][lane * NPT], k);
      const float4 xq = *reinterpret_cast<const float4*>(&st.x[ts][warp * kPPT]);
      const float xv[kPPT] = {xq.x, xq.y, xq.z, xq.w};
#pragma unroll
      for (int j = 0; j < kPPT; ++j)
#pragma unroll
        for (int jn = 0; jn < NPT; ++jn) s[j][jn] = fmaf(dec[jn], s[j][jn], k[jn] * xv[j]);
#pragma unroll
      for (int jn = 0; jn < NPT; ++jn) prod[jn] *= dec[jn];
      if constexpr (MODE != kLocal) {
        float c[NPT], part[kPPT];
        lds<NPT>(&st.C[ts][lane * NPT], c);
#pragma unroll
        for (int j = 0; j < kPPT; ++j) {
          part[j] = 0.f;
#pragma unroll
          for (int jn = 0; jn < NPT; ++jn) part[j] = fmaf(c[jn], s[j][jn], part[j]);
        }
        const float y = reduce_scatter4(part, lane);
        if ((lane & 7) == 0) st.y[ts][warp * kPPT + scatter_index4(lane)] = y;
      }
      if constexpr (MODE == kOut) {
        const int end = t0 + ts < c1 ? ev_end[t0 - c0 + ts] : -1;
        if (end >= 0 && p.final_states.ptr) {
          float* f = static_cast<float*>(p.final_states.ptr);
#pragma unroll
          for (int j = 0; j < kPPT; ++j)
#pragma unroll
            for (int jn = 0; jn < NPT; ++jn)
              if (pin[j] && nin[jn]) f[p.final_states.at(end, a.h, pw + j, nl + jn)] = s[j][jn];
        }
      }
    }
    if constexpr (MODE != kLocal) {
      __syncthreads();
      const int64_t t = t0 + ets;
      if (t < c1 && epp < P) {
        const float y = st.y[ets][threadIdx.x % PC];
        if (tl.ntn > 1) {
          bufs.ypart[((a.tn * tl.nrows + a.row) * p.seqlen + t) * p.nheads * P + a.h * P + epp] = y;
        } else {
          emit_y<T, MODE>(p, bufs, a.row, t, a.h, epp, y, st.x[ets][threadIdx.x % PC], Dv, zv);
        }
      }
    }
  }
  if constexpr (MODE == kLocal) {
#pragma unroll
    for (int j = 0; j < kPPT; ++j)
#pragma unroll
      for (int jn = 0; jn < NPT; ++jn)
        if (pin[j] && nin[jn]) bufs.states[state_index(p, tl, a.row, a.c, a.h, pw + j, nl + jn)] = s[j][jn];
    if (a.tp == 0 && warp == 0) {
#pragma unroll
      for (int jn = 0; jn < NPT; ++jn)
        if (nin[jn]) bufs.prod[prod_index(p, tl, a.row, a.c, a.h, nl + jn)] = prod[jn];
    }
  }
}

// Phase B: forward, buf[c] := state entering chunk c; reverse (adjoint), buf[c] := adjoint at
// the end of chunk c coming from later chunks. One thread per (row, h, p, n).
template <bool kReverse>
__global__ __launch_bounds__(256) void pass_kernel(IssmParams p, Tiling tl, float* buf, const float* prod) {
  const int64_t PN = p.headdim * p.dstate;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= tl.nrows * p.nheads * PN) return;
  const int64_t row = e / (p.nheads * PN), rem = e % (p.nheads * PN);
  const int64_t h = rem / PN, pn = rem % PN, pp = pn / p.dstate, n = pn % p.dstate;
  float S = 0.f;
  for (int64_t i = 0; i < tl.nchunks; ++i) {
    const int64_t c = kReverse ? tl.nchunks - 1 - i : i;
    const int64_t si = state_index(p, tl, row, c, h, pp, n);
    const float loc = buf[si], pr = prod[prod_index(p, tl, row, c, h, n)];
    buf[si] = S;
    S = fmaf(pr, S, loc);
  }
}

// ntn > 1: y = sum over n-tiles (in order) of the partials, then the epilogue.
template <typename T, int MODE>
__global__ __launch_bounds__(256) void ypart_kernel(IssmParams p, Tiling tl, Bufs bufs) {
  const int64_t HP = p.nheads * p.headdim, per_tile = tl.nrows * p.seqlen * HP;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= per_tile) return;
  const int64_t row = e / (p.seqlen * HP), rem = e % (p.seqlen * HP);
  const int64_t t = rem / HP, h = (rem % HP) / p.headdim, pp = rem % p.headdim;
  float y = 0.f;
  for (int tn = 0; tn < tl.ntn; ++tn) y += bufs.ypart[tn * per_tile + e];
  const float xv = float(static_cast<const T*>(p.x.ptr)[p.x.at(row, t, h, pp)]);
  const float zv = p.z.ptr ? float(static_cast<const T*>(p.z.ptr)[p.z.at(row, t, h, pp)]) : 0.f;
  emit_y<T, MODE>(p, bufs, row, t, h, pp, y, xv, D_at(p, h, pp), zv);
}

// Empty segments (cu_seqlens with equal offsets, or seqlen 0): forward final := initial (or 0);
// backward dinitial := dfinal (or 0). One thread per (segment, h, p, n).
template <bool kBwd>
__global__ __launch_bounds__(256) void empty_segments_kernel(IssmParams p) {
  const int64_t PN = p.headdim * p.dstate, HPN = p.nheads * PN;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= p.nseq * HPN) return;
  const int64_t i = e / HPN, h = (e % HPN) / PN, pp = (e % PN) / p.dstate, n = e % p.dstate;
  const Segment sg = segment(p, i);
  if (sg.t1 > sg.t0) return;
  if (!kBwd) {
    const float v = p.initial_states.ptr
                        ? load_as<float>(p.initial_states.ptr, p.init_dtype, p.initial_states.at(i, h, pp, n))
                        : 0.f;
    static_cast<float*>(p.final_states.ptr)[p.final_states.at(i, h, pp, n)] = v;
  } else {
    const float v = p.dfinal_states.ptr
                        ? static_cast<const float*>(p.dfinal_states.ptr)[p.dfinal_states.at(i, h, pp, n)]
                        : 0.f;
    store_as(p.dinitial_states.ptr, p.init_dtype, p.dinitial_states.at(i, h, pp, n), v);
  }
}

inline unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

template <typename F>
void npt_switch(int npt, F&& f) {
  switch (npt) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Phases A, B and C with mode kOut or kOutBwd. bufs.states / prod must hold
// nrows*nchunks*H*P*N and nrows*nchunks*H*N floats; bufs.ypart ntn*nrows*L*H*P when ntn > 1.
template <typename T, int MODE>
void run_forward(const IssmParams& p, const Tiling& tl, const Bufs& bufs, cudaStream_t stream) {
  const int64_t ctas = tl.ctas();
  if (ctas > 0) {
    const unsigned threads = static_cast<unsigned>(tl.warps * 32);
    npt_switch(tl.npt, [&](auto npt) {
      chunk_kernel<T, decltype(npt)::value, kLocal><<<static_cast<unsigned>(ctas), threads, 0, stream>>>(p, tl, bufs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t elems = tl.nrows * p.nheads * p.headdim * p.dstate;
      pass_kernel<false><<<blocks_for(elems, 256), 256, 0, stream>>>(p, tl, bufs.states, bufs.prod);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      chunk_kernel<T, decltype(npt)::value, MODE><<<static_cast<unsigned>(ctas), threads, 0, stream>>>(p, tl, bufs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (tl.ntn > 1) {
      const int64_t n = tl.nrows * p.seqlen * p.nheads * p.headdim;
      ypart_kernel<T, MODE><<<blocks_for(n, 256), 256, 0, stream>>>(p, tl, bufs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

}  // namespace
}  // namespace issm
}  // namespace ssm_ext
