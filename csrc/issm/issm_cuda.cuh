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

// A register cap per thread (so that a chosen number of CTAs fits an SM). __maxnreg__ needs nvcc
// 12.4+; older ones get the plain 512-thread bound (128 registers).
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define SSM_EXT_MAXNREG(n) __maxnreg__(n)
#else
#define SSM_EXT_MAXNREG(n) __launch_bounds__(kMaxWarps * 32, 1)
#endif

struct Tiling {
  int nrows = 0, nheads = 0, seqlen = 0, nchunks = 0;
  int Tc = 64;       // chunk length, a multiple of kTS
  int npt = 1;       // n per lane
  int warps = 1;     // warps per CTA
  int ntp = 1, ntn = 1;
  int64_t ctas() const { return int64_t(nrows) * nheads * nchunks * ntp * ntn; }
};

// max_npt: 8 for the forward kernels, 1 for the backward's adjoint kernels. Tc = 0: choose.
inline Tiling make_tiling(const IssmParams& p, int Tc, int max_npt) {
  const int64_t big = std::max({p.batch, p.seqlen, p.nheads, p.headdim, p.dstate, p.nseq});
  TORCH_CHECK(big < (int64_t(1) << 31), "issm (CUDA): every size must be < 2^31, got ", big);
  Tiling tl;
  tl.nrows = static_cast<int>(p.cu_seqlens ? 1 : p.batch);
  tl.nheads = static_cast<int>(p.nheads);
  tl.seqlen = static_cast<int>(p.seqlen);
  const int64_t N = p.dstate, P = p.headdim;
  tl.npt = N <= 32 ? 1 : N <= 64 ? 2 : N <= 128 ? 4 : 8;
  tl.npt = std::min(tl.npt, max_npt);
  tl.ntn = static_cast<int>((N + 32 * tl.npt - 1) / (32 * tl.npt));
  tl.ntp = static_cast<int>((P + kMaxPC - 1) / kMaxPC);
  tl.warps = static_cast<int>((P + int64_t(kPPT) * tl.ntp - 1) / (int64_t(kPPT) * tl.ntp));
  if (Tc == 0) {
    const int64_t base = int64_t(tl.nrows) * tl.nheads * tl.ntp * tl.ntn;
    Tc = base * ((p.seqlen + 127) / 128) >= 1024 ? 128 : 64;
  }
  tl.Tc = std::min(Tc, kMaxTc);
  tl.nchunks = static_cast<int>((p.seqlen + Tc - 1) / Tc);
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

// v[0..V) partial sums over the warp's lanes (V a power of 2, <= 32; v is overwritten) -> the full
// sum of value lane >> (5 - log2 V), returned to every lane (32 / V lanes get each value). At each
// level a lane keeps the half of its values selected by one of its lane bits and adds its partner's
// copy of that half; then the lanes of a group all-reduce. The addition tree is fixed by the lane
// bits, the same for every value and independent of the data.
// reduce_scatter_level<V / 2, M> alone (M < 16) reduces over the lanes of lane bits M .. 1 only,
// leaving 2 V / (2 M) values per lane.
template <int HALF, int M>
__device__ __forceinline__ void reduce_scatter_level(float* v, int lane) {
  if constexpr (HALF >= 1 && M >= 1) {
    const bool b = lane & M;
#pragma unroll
    for (int i = 0; i < HALF; ++i) {
      const float send = b ? v[i] : v[i + HALF], keep = b ? v[i + HALF] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, M);
    }
    reduce_scatter_level<HALF / 2, M / 2>(v, lane);
  }
}
template <int V>
__device__ __forceinline__ float reduce_scatter(float* v, int lane) {
  reduce_scatter_level<V / 2, 16>(v, lane);
  float u = v[0];
#pragma unroll
  for (int m = 16 / V; m >= 1; m /= 2) u += __shfl_xor_sync(0xffffffffu, u, m);
  return u;
}

// A CTA's coordinates (32-bit: make_tiling checks that every size fits).
struct Cta {
  int row, h, c, tp, tn;
};
__device__ __forceinline__ Cta decode_cta(const Tiling& tl, int idx) {
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

// A CTA's tile (decode_cta): steps [c0, c1) of (row, h); p in [plo, plo + PC), warp w owning kPPT
// of them from pw; n in [nlo, nlo + 32 NPT), lane l owning NPT of them from nl.
template <int NPT>
struct Tile {
  Cta a;
  int lane, warp, PC;
  int g, nlo, plo, pw, nl, c0, c1;
  bool pin[kPPT], nin[NPT];
};

template <int NPT>
__device__ __forceinline__ Tile<NPT> make_tile(const IssmParams& p, const Tiling& tl) {
  Tile<NPT> u;
  u.a = decode_cta(tl, blockIdx.x);
  u.lane = threadIdx.x & 31;
  u.warp = threadIdx.x >> 5;
  u.PC = tl.warps * kPPT;
  u.g = u.a.h / static_cast<int>(p.heads_per_group);
  u.nlo = u.a.tn * 32 * NPT;
  u.plo = u.a.tp * u.PC;
  u.pw = u.plo + u.warp * kPPT;
  u.nl = u.nlo + u.lane * NPT;
  u.c0 = u.a.c * tl.Tc;
  u.c1 = std::min(u.c0 + tl.Tc, tl.seqlen);
#pragma unroll
  for (int j = 0; j < kPPT; ++j) u.pin[j] = u.pw + j < p.headdim;
#pragma unroll
  for (int j = 0; j < NPT; ++j) u.nin[j] = u.nl + j < p.dstate;
  return u;
}

// The CTA's constants, read once: A and dt_bias of its n-tile (sA, sbias: 32 NPT each) and the events
// of the Tc steps of its chunk (ev_start, ev_end: -2 / -1 past the chunk's end, so that a block's tail
// needs no test).
template <int NPT>
__device__ __forceinline__ void load_cta_constants(const IssmParams& p, const Tiling& tl, const Tile<NPT>& u,
                                                   float* sA, float* sbias, int* ev_start, int* ev_end) {
  for (int j = threadIdx.x; j < 32 * NPT; j += blockDim.x) {
    const int64_t n = u.nlo + j;
    sA[j] = n < p.dstate ? load_as<float>(p.A.ptr, p.A_dtype, p.A.at(u.a.h, n)) : 0.f;
    sbias[j] = n < p.dstate && p.dt_bias.ptr
                   ? load_as<float>(p.dt_bias.ptr, p.dt_bias_dtype, p.dt_bias.at(u.a.h, n))
                   : 0.f;
  }
  for (int i = threadIdx.x; i < tl.Tc; i += blockDim.x)
    step_events(p, u.a.row, u.c0 + i < u.c1 ? u.c0 + i : -1, &ev_start[i], &ev_end[i]);
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
};

__device__ __forceinline__ int64_t gy_index(const IssmParams& p, int64_t row, int64_t t, int64_t h, int64_t pp) {
  return ((row * p.seqlen + t) * p.nheads + h) * p.headdim + pp;
}

// The staging is software-pipelined: the raw global loads of block i+1 are issued into registers
// (Raw) before block i is computed, and converted into the Stage after it, so that a block's load
// latency hides behind the previous block's compute. Q (step, n) elements per thread are prefetched
// (CTAs too small to hold a block that way load the rest at the commit); x and the block's other
// per-(step, p) input (EX: z for the forward output, gy for the backward) are one element per thread.
static_assert(kTS * kPPT == 32, "x, z of a block: exactly one element per thread");
enum Extra : int { kNone = 0, kZ = 1, kGy = 2 };

template <typename T, int Q>
struct Raw {
  T dt[Q], B[Q], C[Q];
  T x, z;
  float gy;
};

// Element q of this thread's share of the block's (step, n) elements.
__device__ __forceinline__ int raw_index(int q) { return threadIdx.x + q * blockDim.x; }

// Issues the loads of steps [t0, min(t0 + kTS, c1)); nothing waits on them here.
template <typename T, int NPT, int Q, int EX>
__device__ __forceinline__ void prefetch_block(const IssmParams& p, Raw<T, Q>& r, const float* gy_buf,
                                               const Tile<NPT>& u, int64_t t0) {
  constexpr int NT = 32 * NPT;
  const int64_t row = u.a.row, h = u.a.h;
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int i = raw_index(q);
    const int64_t t = t0 + i / NT, n = u.nlo + i % NT;
    const bool in = i < kTS * NT && t < u.c1 && n < p.dstate;
    r.dt[q] = in ? static_cast<const T*>(p.dt.ptr)[p.dt.at(row, t, h, n)] : T(0.f);
    r.B[q] = in ? static_cast<const T*>(p.B.ptr)[p.B.at(row, t, u.g, n)] : T(0.f);
    r.C[q] = in ? static_cast<const T*>(p.C.ptr)[p.C.at(row, t, u.g, n)] : T(0.f);
  }
  const int64_t t = t0 + threadIdx.x / u.PC, pp = u.plo + threadIdx.x % u.PC;
  const bool in = t < u.c1 && pp < p.headdim;
  r.x = in ? static_cast<const T*>(p.x.ptr)[p.x.at(row, t, h, pp)] : T(0.f);
  if constexpr (EX == kZ) r.z = in && p.z.ptr ? static_cast<const T*>(p.z.ptr)[p.z.at(row, t, h, pp)] : T(0.f);
  if constexpr (EX == kGy) r.gy = in ? gy_buf[gy_index(p, row, t, h, pp)] : 0.f;
}

// dec, k, C of state j of the n-tile from its raw dt, B, C (1, 0, 0 when !in); A and dt_bias of the
// n-tile in sA, sbias.
template <typename T>
__device__ __forceinline__ void stage_values(const IssmParams& p, const float* sA, const float* sbias, int j, bool in,
                                             T dtv, T Bv, T Cv, float& dec, float& k, float& c) {
  dec = 1.f, k = 0.f, c = 0.f;
  if (in) {
    const float d = delta_of(p, float(dtv) + sbias[j], nullptr);
    dec = __expf(d * sA[j]);
    k = d * float(Bv);
    c = float(Cv);
  }
}

// dec, k, C of element (ts, j) from its raw dt, B, C into st.
template <typename T, int NT>
__device__ __forceinline__ void stage_elem(const IssmParams& p, Stage<NT>& st, const float* sA, const float* sbias,
                                           int ts, int j, bool in, T dtv, T Bv, T Cv) {
  float dec, k, c;
  stage_values<T>(p, sA, sbias, j, in, dtv, Bv, Cv, dec, k, c);
  st.dec[ts][j] = dec;
  st.k[ts][j] = k;
  st.C[ts][j] = c;
}

// Writes the prefetched block of steps from t0 into st. Steps at or past c1 get dec = 1, k = 0, C = 0,
// x = 0 (and gy = 0): they change nothing.
template <typename T, int NPT, int Q, int EX>
__device__ __forceinline__ void commit_block(const IssmParams& p, const Raw<T, Q>& r, Stage<32 * NPT>& st,
                                             const float* sA, const float* sbias, const Tile<NPT>& u, int64_t t0) {
  constexpr int NT = 32 * NPT;
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int i = raw_index(q);
    if (i >= kTS * NT) break;
    const int ts = i / NT, j = i % NT;
    stage_elem<T, NT>(p, st, sA, sbias, ts, j, t0 + ts < u.c1 && u.nlo + j < p.dstate, r.dt[q], r.B[q], r.C[q]);
  }
  for (int i = raw_index(Q); i < kTS * NT; i += blockDim.x) {
    const int ts = i / NT, j = i % NT;
    const int64_t t = t0 + ts, n = u.nlo + j;
    const bool in = t < u.c1 && n < p.dstate;
    const T* dt = static_cast<const T*>(p.dt.ptr);
    const T* B = static_cast<const T*>(p.B.ptr);
    const T* C = static_cast<const T*>(p.C.ptr);
    stage_elem<T, NT>(p, st, sA, sbias, ts, j, in, in ? dt[p.dt.at(u.a.row, t, u.a.h, n)] : T(0.f),
                      in ? B[p.B.at(u.a.row, t, u.g, n)] : T(0.f), in ? C[p.C.at(u.a.row, t, u.g, n)] : T(0.f));
  }
  st.x[threadIdx.x / u.PC][threadIdx.x % u.PC] = float(r.x);
  if constexpr (EX == kGy) st.gy[threadIdx.x / u.PC][threadIdx.x % u.PC] = r.gy;
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
    bufs.gy[gy_index(p, row, t, h, pp)] = gy;
  }
}

__device__ __forceinline__ float D_at(const IssmParams& p, int64_t h, int64_t pp) {
  return p.D.ptr ? load_as<float>(p.D.ptr, p.D_dtype, p.D.at(h, pp)) : 0.f;
}

// Phase A (kLocal) and phase C (kOut, kOutBwd); see the file comment. 112 registers: two CTAs of
// 9 warps (P = 36) per SM.
template <typename T, int NPT, int MODE>
__global__ SSM_EXT_MAXNREG(NPT >= 8 ? 128 : 96) void chunk_kernel(IssmParams p, Tiling tl, Bufs bufs) {
  constexpr int NT = 32 * NPT;
  constexpr int EX = MODE == kLocal ? kNone : kZ;
  __shared__ Stage<NT> st;
  __shared__ float sA[NT], sbias[NT];
  __shared__ int ev_start[kMaxTc], ev_end[kMaxTc];
  const Tile<NPT> u = make_tile<NPT>(p, tl);
  const int64_t P = p.headdim;

  Raw<T, 4> r;
  prefetch_block<T, NPT, 4, EX>(p, r, nullptr, u, u.c0);
  load_cta_constants<NPT>(p, tl, u, sA, sbias, ev_start, ev_end);
  // The epilogue element of this thread (the same (step in block, p) in every block).
  const int ets = threadIdx.x / u.PC;
  const int64_t epp = u.plo + threadIdx.x % u.PC;
  const float Dv = MODE != kLocal && epp < P ? D_at(p, u.a.h, epp) : 0.f;

  float s[kPPT][NPT], prod[NPT];
#pragma unroll
  for (int jn = 0; jn < NPT; ++jn) prod[jn] = 1.f;
#pragma unroll
  for (int j = 0; j < kPPT; ++j)
#pragma unroll
    for (int jn = 0; jn < NPT; ++jn)
      s[j][jn] = (MODE != kLocal && u.pin[j] && u.nin[jn])
                     ? bufs.states[state_index(p, tl, u.a.row, u.a.c, u.a.h, u.pw + j, u.nl + jn)]
                     : 0.f;

  for (int64_t t0 = u.c0; t0 < u.c1; t0 += kTS) {
    __syncthreads();  // the previous block's reads of st are done (first: sA, sbias, events written)
    commit_block<T, NPT, 4, EX>(p, r, st, sA, sbias, u, t0);
    const float zv = float(r.z);
    __syncthreads();
    if (t0 + kTS < u.c1) prefetch_block<T, NPT, 4, EX>(p, r, nullptr, u, t0 + kTS);
    // Not unrolled: the step body (with its rare reset and final-state paths) unrolled 8 times
    // made the kernel ~140-170 KB of code, beyond the instruction cache.
#pragma unroll 1
    for (int ts = 0; ts < kTS; ++ts) {
      const int start = ev_start[t0 - u.c0 + ts];
      if (start != -2) {  // uniform over the CTA
#pragma unroll
        for (int jn = 0; jn < NPT; ++jn) prod[jn] = 0.f;
#pragma unroll
        for (int j = 0; j < kPPT; ++j)
#pragma unroll
          for (int jn = 0; jn < NPT; ++jn)
            s[j][jn] = (start >= 0 && p.initial_states.ptr && u.pin[j] && u.nin[jn])
                           ? load_as<float>(p.initial_states.ptr, p.init_dtype,
                                            p.initial_states.at(start, u.a.h, u.pw + j, u.nl + jn))
                           : 0.f;
      }
      float dec[NPT], k[NPT];
      lds<NPT>(&st.dec[ts][u.lane * NPT], dec);
      lds<NPT>(&st.k[ts][u.lane * NPT], k);
      const float4 xq = *reinterpret_cast<const float4*>(&st.x[ts][u.warp * kPPT]);
      const float xv[kPPT] = {xq.x, xq.y, xq.z, xq.w};
#pragma unroll
      for (int j = 0; j < kPPT; ++j)
#pragma unroll
        for (int jn = 0; jn < NPT; ++jn) s[j][jn] = fmaf(dec[jn], s[j][jn], k[jn] * xv[j]);
#pragma unroll
      for (int jn = 0; jn < NPT; ++jn) prod[jn] *= dec[jn];
      if constexpr (MODE != kLocal) {
        float c[NPT], part[kPPT];
        lds<NPT>(&st.C[ts][u.lane * NPT], c);
#pragma unroll
        for (int j = 0; j < kPPT; ++j) {
          part[j] = 0.f;
#pragma unroll
          for (int jn = 0; jn < NPT; ++jn) part[j] = fmaf(c[jn], s[j][jn], part[j]);
        }
        const float y = reduce_scatter<kPPT>(part, u.lane);  // p = pw + lane / 8
        if ((u.lane & 7) == 0) st.y[ts][u.warp * kPPT + (u.lane >> 3)] = y;
      }
      if constexpr (MODE == kOut) {
        const int end = ev_end[t0 - u.c0 + ts];
        if (end >= 0 && p.final_states.ptr) {
          float* f = static_cast<float*>(p.final_states.ptr);
#pragma unroll
          for (int j = 0; j < kPPT; ++j)
#pragma unroll
            for (int jn = 0; jn < NPT; ++jn)
              if (u.pin[j] && u.nin[jn]) f[p.final_states.at(end, u.a.h, u.pw + j, u.nl + jn)] = s[j][jn];
        }
      }
    }
    if constexpr (MODE != kLocal) {
      __syncthreads();
      const int64_t t = t0 + ets;
      if (t < u.c1 && epp < P) {
        const float y = st.y[ets][threadIdx.x % u.PC];
        if (tl.ntn > 1) {
          bufs.ypart[((u.a.tn * tl.nrows + u.a.row) * p.seqlen + t) * p.nheads * P + u.a.h * P + epp] = y;
        } else {
          emit_y<T, MODE>(p, bufs, u.a.row, t, u.a.h, epp, y, st.x[ets][threadIdx.x % u.PC], Dv, zv);
        }
      }
    }
  }
  if constexpr (MODE == kLocal) {
#pragma unroll
    for (int j = 0; j < kPPT; ++j)
#pragma unroll
      for (int jn = 0; jn < NPT; ++jn)
        if (u.pin[j] && u.nin[jn])
          bufs.states[state_index(p, tl, u.a.row, u.a.c, u.a.h, u.pw + j, u.nl + jn)] = s[j][jn];
    if (u.a.tp == 0 && u.warp == 0) {
#pragma unroll
      for (int jn = 0; jn < NPT; ++jn)
        if (u.nin[jn]) bufs.prod[prod_index(p, tl, u.a.row, u.a.c, u.a.h, u.nl + jn)] = prod[jn];
    }
  }
}

// Phase B: forward, buf[c] := state entering chunk c; reverse (adjoint), buf[c] := adjoint at
// the end of chunk c coming from later chunks. One thread per (row, h, p, n). The loads of kPassB
// chunks are issued before any of their stores (they do not depend on S): one memory latency per
// kPassB chunks instead of per chunk.
constexpr int kPassB = 8;
template <bool kReverse>
__global__ __launch_bounds__(256) void pass_kernel(IssmParams p, Tiling tl, float* __restrict__ buf,
                                                   const float* __restrict__ prod) {
  const int64_t N = p.dstate, PN = p.headdim * N, HPN = p.nheads * PN;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= tl.nrows * HPN) return;
  const int64_t row = e / HPN, h = (e % HPN) / PN, pn = e % PN;
  float* b = buf + state_index(p, tl, row, 0, h, 0, pn);          // chunk c at b[c * HPN]
  const float* pr = prod + prod_index(p, tl, row, 0, h, pn % N);  // chunk c at pr[c * H * N]
  const int64_t HN = p.nheads * N;
  const int nc = tl.nchunks;
  float S = 0.f;
  for (int i0 = 0; i0 < nc; i0 += kPassB) {
    float loc[kPassB], dec[kPassB];
#pragma unroll
    for (int i = 0; i < kPassB; ++i) {
      const int c = kReverse ? nc - 1 - (i0 + i) : i0 + i;
      loc[i] = i0 + i < nc ? b[c * HPN] : 0.f;
      dec[i] = i0 + i < nc ? pr[c * HN] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kPassB; ++i) {
      const int c = kReverse ? nc - 1 - (i0 + i) : i0 + i;
      if (i0 + i < nc) {
        b[c * HPN] = S;
        S = fmaf(dec[i], S, loc[i]);
      }
    }
  }
}

// ntn > 1: y = sum over n-tiles (in order) of the partials, then the epilogue.
template <typename T, int MODE>
__global__ __launch_bounds__(256) void ypart_kernel(IssmParams p, Tiling tl, Bufs bufs) {
  const int64_t HP = p.nheads * p.headdim, per_tile = int64_t(tl.nrows) * p.seqlen * HP;
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
      const int64_t elems = int64_t(tl.nrows) * p.nheads * p.headdim * p.dstate;
      pass_kernel<false><<<blocks_for(elems, 256), 256, 0, stream>>>(p, tl, bufs.states, bufs.prod);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      chunk_kernel<T, decltype(npt)::value, MODE><<<static_cast<unsigned>(ctas), threads, 0, stream>>>(p, tl, bufs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    if (tl.ntn > 1) {
      const int64_t n = int64_t(tl.nrows) * p.seqlen * p.nheads * p.headdim;
      ypart_kernel<T, MODE><<<blocks_for(n, 256), 256, 0, stream>>>(p, tl, bufs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

}  // namespace
}  // namespace issm
}  // namespace ssm_ext
