// Device code shared by the ISSM CUDA forward and backward (issm_fwd.cu, issm_bwd.cu).
//
// Chunk-parallel recurrence in fp32 FFMA (no tensor cores: fp32 inputs need ~1e-5):
//   fwd_chunk_kernel<kOut>  per (row, head, chunk of 64 steps, p-tile, n-tile), one launch: run the
//            recurrence from 0 over the chunk (local y and end state), get the state entering the
//            chunk from its predecessors by a look-back inside the launch, publish the state
//            leaving it, and add the entering state's share to y as a small matrix product; emit
//            y_t[p] = sum_n C_t[n] s_t[p,n] + D x_t[p] (gated by silu(z)) and the final states at
//            segment ends. <kOutBwd> emits gy = dout * silu(z) and dz instead of out, and keeps the
//            entering states and decay products for the backward.
//   pass_kernel             sequential over chunks (last first), elementwise over (row, head, p, n):
//            passes the adjoint of the backward from chunk to chunk.
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
constexpr int kMaxWarps = 16;  // a CTA covers up to 64 p
constexpr int kMaxPC = kMaxWarps * kPPT;

enum Mode : int { kOut = 1, kOutBwd = 2 };

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

// max_npt: 8 for the forward kernels, 1 for the backward's adjoint kernels.
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
  tl.Tc = Tc;
  tl.nchunks = static_cast<int>((p.seqlen + Tc - 1) / Tc);
  return tl;
}

// Scratch buffers (fp32, allocated by the launchers).
struct Bufs {
  float* states = nullptr;  // (nrows, nchunks, H, P, N): the state entering each chunk (chunk 0: with prod only)
  float* prod = nullptr;    // (nrows, nchunks, H, N): product of the chunk's decays (for the backward; may be null)
  float* agg = nullptr;     // (nrows, nchunks, H, P, N): local chunk-end states (look-back aggregates)
  float* agg_lam = nullptr; // (nrows, nchunks, H, ntp, N): their decay products
  int* flags = nullptr;     // (nrows, nchunks, H, ntp, ntn): look-back flags, 0 before the launch
  float* ypart = nullptr;   // (ntn, nrows, L, H, P): y partial sums per n-tile (ntn > 1 only)
  float* gy = nullptr;      // (nrows, L, H, P): dout * silu(z) (backward)
};

// delta = clamp(phi(v), lo, hi); *mask = d delta / d v (0 where clamped).
__device__ __forceinline__ float delta_of(const IssmParams& p, float v, float* mask) {
  float phi = v, dphi = 1.f;
  if (p.dt_softplus && v <= 20.f) {
    phi = log1pf(__expf(v));
    dphi = sigmoid_f(v);
  }
  const float lo = p.dt_lo_f, hi = p.dt_hi_f;
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

// NPT consecutive floats to shared memory.
template <int NPT>
__device__ __forceinline__ void sts(float* dst, const float* v) {
  if constexpr (NPT % 4 == 0) {
#pragma unroll
    for (int j = 0; j < NPT; j += 4) *reinterpret_cast<float4*>(dst + j) = make_float4(v[j], v[j + 1], v[j + 2], v[j + 3]);
  } else if constexpr (NPT == 2) {
    *reinterpret_cast<float2*>(dst) = make_float2(v[0], v[1]);
  } else {
#pragma unroll
    for (int j = 0; j < NPT; ++j) dst[j] = v[j];
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
  int xts, xpc;  // this thread's (step in block, p) element of a block's x (and gy)
  bool pin[kPPT], nin[NPT];
};

template <int NPT>
__device__ __forceinline__ Tile<NPT> make_tile_at(const IssmParams& p, const Tiling& tl, const Cta& a) {
  Tile<NPT> u;
  u.a = a;
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
  u.xts = threadIdx.x / u.PC;
  u.xpc = threadIdx.x % u.PC;
#pragma unroll
  for (int j = 0; j < kPPT; ++j) u.pin[j] = u.pw + j < p.headdim;
#pragma unroll
  for (int j = 0; j < NPT; ++j) u.nin[j] = u.nl + j < p.dstate;
  return u;
}
template <int NPT>
__device__ __forceinline__ Tile<NPT> make_tile(const IssmParams& p, const Tiling& tl) {
  return make_tile_at<NPT>(p, tl, decode_cta(tl, blockIdx.x));
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
};

__device__ __forceinline__ int64_t gy_index(const IssmParams& p, int64_t row, int64_t t, int64_t h, int64_t pp) {
  return ((row * p.seqlen + t) * p.nheads + h) * p.headdim + pp;
}

// The staging is software-pipelined: the raw global loads of block i+1 are issued into registers
// (Raw) before block i is computed, and converted into the Stage after it, so that a block's load
// latency hides behind the previous block's compute. Q (step, n) elements per thread are prefetched
// (CTAs too small to hold a block that way load the rest at the commit); x and the block's other
// per-(step, p) input (EX: gy for the backward) are one element per thread.
static_assert(kTS * kPPT == 32, "x of a block: exactly one element per thread");
enum Extra : int { kNone = 0, kGy = 2 };

template <typename T, int Q>
struct Raw {
  T dt[Q], B[Q], C[Q];
  T x;
  float gy;
};

// Element q of this thread's share of the block's (step, n) elements.
__device__ __forceinline__ int raw_index(int q) { return threadIdx.x + q * blockDim.x; }

// The block's (step, n) inputs from CTA-uniform bases at (t0, nlo): element (ts, j) at ts * s1 + j * s3,
// in 32-bit arithmetic when every such offset of the block fits (o32: two integer multiply-adds per
// load instead of View4::at's 64-bit products); in bounds where ts < nt and j < nn.
template <typename T>
struct RawBase {
  const T *dt, *B, *C;
  int nt, nn;
  bool o32;
};
__device__ __forceinline__ bool fits32(const View4& v, int64_t n3) {
  return (kTS - 1) * v.s1 + (n3 - 1) * v.s3 < (int64_t(1) << 31);
}
template <typename T, int NPT>
__device__ __forceinline__ RawBase<T> raw_base(const IssmParams& p, const Tile<NPT>& u, int64_t t0) {
  RawBase<T> rb;
  rb.dt = static_cast<const T*>(p.dt.ptr) + p.dt.at(u.a.row, t0, u.a.h, u.nlo);
  rb.B = static_cast<const T*>(p.B.ptr) + p.B.at(u.a.row, t0, u.g, u.nlo);
  rb.C = static_cast<const T*>(p.C.ptr) + p.C.at(u.a.row, t0, u.g, u.nlo);
  rb.nt = u.c1 - static_cast<int>(t0);
  rb.nn = static_cast<int>(p.dstate) - u.nlo;
  rb.o32 = fits32(p.dt, 32 * NPT) && fits32(p.B, 32 * NPT) && fits32(p.C, 32 * NPT);
  return rb;
}
template <typename T>
__device__ __forceinline__ void load_raw(const IssmParams& p, const RawBase<T>& rb, int ts, int j, bool in, T& dt, T& B,
                                         T& C) {
  if (rb.o32) {
    dt = in ? rb.dt[ts * int(p.dt.s1) + j * int(p.dt.s3)] : T(0.f);
    B = in ? rb.B[ts * int(p.B.s1) + j * int(p.B.s3)] : T(0.f);
    C = in ? rb.C[ts * int(p.C.s1) + j * int(p.C.s3)] : T(0.f);
  } else {
    dt = in ? rb.dt[ts * p.dt.s1 + j * p.dt.s3] : T(0.f);
    B = in ? rb.B[ts * p.B.s1 + j * p.B.s3] : T(0.f);
    C = in ? rb.C[ts * p.C.s1 + j * p.C.s3] : T(0.f);
  }
}

// Issues the loads of steps [t0, min(t0 + kTS, c1)); nothing waits on them here.
template <typename T, int NPT, int Q, int EX>
__device__ __forceinline__ void prefetch_block(const IssmParams& p, Raw<T, Q>& r, const float* gy_buf,
                                               const Tile<NPT>& u, int64_t t0) {
  constexpr int NT = 32 * NPT;
  const RawBase<T> rb = raw_base<T>(p, u, t0);
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int i = raw_index(q), ts = i / NT, j = i % NT;
    load_raw<T>(p, rb, ts, j, i < kTS * NT && ts < rb.nt && j < rb.nn, r.dt[q], r.B[q], r.C[q]);
  }
  const bool in = u.xts < rb.nt && u.plo + u.xpc < p.headdim;
  const T* x = static_cast<const T*>(p.x.ptr) + p.x.at(u.a.row, t0, u.a.h, u.plo);
  r.x = in ? x[fits32(p.x, kMaxPC) ? u.xts * int(p.x.s1) + u.xpc * int(p.x.s3) : u.xts * p.x.s1 + u.xpc * p.x.s3] : T(0.f);
  if constexpr (EX == kGy) r.gy = in ? gy_buf[gy_index(p, u.a.row, t0 + u.xts, u.a.h, u.plo + u.xpc)] : 0.f;
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
  const int nt = u.c1 - static_cast<int>(t0), nn = static_cast<int>(p.dstate) - u.nlo;
#pragma unroll
  for (int q = 0; q < Q; ++q) {
    const int i = raw_index(q);
    if (i >= kTS * NT) break;
    const int ts = i / NT, j = i % NT;
    stage_elem<T, NT>(p, st, sA, sbias, ts, j, ts < nt && j < nn, r.dt[q], r.B[q], r.C[q]);
  }
  if (raw_index(Q) < kTS * NT) {  // CTAs too small to prefetch the whole block load the rest now
    const RawBase<T> rb = raw_base<T>(p, u, t0);
    for (int i = raw_index(Q); i < kTS * NT; i += blockDim.x) {
      const int ts = i / NT, j = i % NT;
      const bool in = ts < nt && j < nn;
      T dt, B, C;
      load_raw<T>(p, rb, ts, j, in, dt, B, C);
      stage_elem<T, NT>(p, st, sA, sbias, ts, j, in, dt, B, C);
    }
  }
  st.x[u.xts][u.xpc] = float(r.x);
  if constexpr (EX == kGy) st.gy[u.xts][u.xpc] = r.gy;
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

// Chunk state passing inside the launch (decoupled look-back over the chunks of a row, as the
// scan's strips do over tiles; ALGORITHMS.md 3): CTAs are numbered chunk-major, so the CTA of
// chunk c - 1 of a tile starts before that of chunk c. A tile slot's flag: 0 nothing yet, 1 its
// aggregate (local chunk-end state and decay product) published, 2 its inclusive state (the
// state leaving the chunk) published. Data first, then the flag: the CTA's stores, a barrier,
// a fence and the release by thread 0; the reader acquires with thread 0, then a barrier, then
// reads the data through L2 (ld.cg). Each state entering a chunk is the same FMA chain
// (S = prod * S + local, over the chunks in order) whichever predecessor's inclusive state the
// walk stops at, so the results are bitwise independent of timing.
constexpr int kFlagAgg = 1, kFlagIncl = 2;

__device__ __forceinline__ int ld_acquire_flag(const int* f) {
  int v;
  asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(f) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_flag(int* f, int v) {
  asm volatile("st.release.gpu.global.s32 [%0], %1;" ::"l"(f), "r"(v) : "memory");
}

// After this CTA's stores of a slot's data: makes them visible with flag value v (CTA-uniform call).
__device__ __forceinline__ void publish_flag(int* f, int v) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    st_release_flag(f, v);
  }
}

// Thread 0: the nearest chunk k < c whose inclusive state is published, waiting on slots with
// nothing yet; every chunk in (k, c) has its aggregate published. flag(j) is chunk j's flag.
template <typename F>
__device__ __forceinline__ int lookback_walk(int c, F&& flag) {
  int k = c - 1;
  for (;;) {
    int f;
    while ((f = ld_acquire_flag(flag(k))) == 0) __nanosleep(64);
    if (f == kFlagIncl) return k;
    --k;  // chunk 0 always publishes its inclusive state
  }
}

// A chunk tile of the forward: CTA index -> (row, h, c, tp, tn), chunk slowest (the look-back
// waits only on CTAs of lower index).
__device__ __forceinline__ Cta decode_cta_chunk_major(const Tiling& tl, int idx) {
  Cta a;
  a.tn = idx % tl.ntn;
  idx /= tl.ntn;
  a.tp = idx % tl.ntp;
  idx /= tl.ntp;
  a.h = idx % tl.nheads;
  idx /= tl.nheads;
  a.row = idx % tl.nrows;
  a.c = idx / tl.nrows;
  return a;
}
// Chunk c of the tile a: its flag, and the decay product of state n in its aggregate.
__device__ __forceinline__ int64_t flag_index(const Tiling& tl, const Cta& a, int c) {
  return (((int64_t(a.row) * tl.nchunks + c) * tl.nheads + a.h) * tl.ntp + a.tp) * tl.ntn + a.tn;
}
__device__ __forceinline__ int64_t agg_lam_index(const IssmParams& p, const Tiling& tl, const Cta& a, int c, int n) {
  return (((int64_t(a.row) * tl.nchunks + c) * tl.nheads + a.h) * tl.ntp + a.tp) * p.dstate + n;
}

// Dynamic shared memory of fwd_chunk_kernel: q[kFwdChunk][NT + 4] (C * decay product from the chunk
// start), sin[PC][NT + 4] (the state entering the chunk), y[kFwdChunk][PC] (the y partial sums).
// Rows padded by 4 floats: the correction's float4 reads of different rows fall in different banks.
constexpr int kFwdChunk = 64;
inline size_t fwd_smem(int npt, int warps) {
  const size_t ld = 32 * npt + 4, PC = size_t(warps) * kPPT;
  return (kFwdChunk * ld + PC * ld + kFwdChunk * PC) * sizeof(float);
}

// The forward in one pass per chunk tile (kOut: out and final states; kOutBwd: gy, dz and, for the
// backward, the entering states and decay products in bufs.states / prod):
// 1. from a zero state, the recurrence over the chunk: y_loc[t] = C_t . s_loc_t per (t, p) to shared
//    memory, q_t = C_t * lam_t (lam_t: the product of the decays from the chunk start, 0 from a
//    reset on) to shared memory, the local end state s_loc and lam in registers. Blocks of kTS steps
//    without events run unrolled with no event tests.
// 2. look-back: the entering state S_in; publish S_out = lam * S_in + s_loc.
// 3. y_t = y_loc[t] + sum_n q_t[n] S_in[p, n] (s_t = s_loc_t + lam_t * S_in), a (Tc x NT) x (NT x PC)
//    product in FFMA, then the epilogue per (t, p).
// 4 p x NPT n per thread as before; 96 registers at NPT <= 4: two 9-warp CTAs per SM at P = 36.
template <typename T, int NPT, int MODE>
__global__ SSM_EXT_MAXNREG(NPT >= 8 ? 128 : 96) void fwd_chunk_kernel(IssmParams p, Tiling tl, Bufs bufs) {
  constexpr int NT = 32 * NPT, LD = NT + 4;
  __shared__ Stage<NT> st;
  __shared__ float sA[NT], sbias[NT], fin_lam[NT];
  __shared__ int ev_start[kFwdChunk], ev_end[kFwdChunk];
  __shared__ bool blk_ev[kFwdChunk / kTS];
  __shared__ int lb_k, fin_at;
  SSM_EXT_DYNAMIC_SMEM(float, dsm);
  const Tile<NPT> u = make_tile_at<NPT>(p, tl, decode_cta_chunk_major(tl, blockIdx.x));
  const int W = tl.warps, PC = u.PC;
  float* sq = dsm;                  // [kFwdChunk][LD]
  float* ssin = sq + kFwdChunk * LD;  // [PC][LD]
  float* sy = ssin + PC * LD;         // [kFwdChunk][PC]

  Raw<T, 4> r;
  prefetch_block<T, NPT, 4, kNone>(p, r, nullptr, u, u.c0);
  load_cta_constants<NPT>(p, tl, u, sA, sbias, ev_start, ev_end);
  if (threadIdx.x == 0) fin_at = -1;

  float s[kPPT][NPT], lam[NPT];
#pragma unroll
  for (int jn = 0; jn < NPT; ++jn) lam[jn] = 1.f;
#pragma unroll
  for (int j = 0; j < kPPT; ++j)
#pragma unroll
    for (int jn = 0; jn < NPT; ++jn) s[j][jn] = 0.f;
  bool reset_seen = false;  // a start event in the chunk so far (lam = 0 from it on)
  int qw = 0;               // the warp that stores q of the current step (steps rotate over the warps)

  const bool y_lane = (u.lane & 7) == 0;  // stores the warp's y of p = pw + lane / 8
  // One step ts of the block at t0; kEv: with the step's events. sqb, syb: q and y of the block's
  // first step for this thread.
  auto step = [&](const int t0, const int ts, float* sqb, float* syb, const auto ev) {
    constexpr bool kEv = decltype(ev)::value;
    const int tr = t0 - u.c0 + ts;
    if constexpr (kEv) {
      const int start = ev_start[tr];
      if (start != -2) {  // uniform over the CTA
        reset_seen = true;
#pragma unroll
        for (int jn = 0; jn < NPT; ++jn) lam[jn] = 0.f;
#pragma unroll
        for (int j = 0; j < kPPT; ++j)
#pragma unroll
          for (int jn = 0; jn < NPT; ++jn)
            s[j][jn] = (start >= 0 && p.initial_states.ptr && u.pin[j] && u.nin[jn])
                           ? load_as<float>(p.initial_states.ptr, p.init_dtype,
                                            p.initial_states.at(start, u.a.h, u.pw + j, u.nl + jn))
                           : 0.f;
      }
    }
    float dec[NPT], k[NPT], c[NPT], part[kPPT];
    lds<NPT>(&st.dec[ts][u.lane * NPT], dec);
    lds<NPT>(&st.k[ts][u.lane * NPT], k);
    lds<NPT>(&st.C[ts][u.lane * NPT], c);
    const float4 xq = *reinterpret_cast<const float4*>(&st.x[ts][u.warp * kPPT]);
    const float xv[kPPT] = {xq.x, xq.y, xq.z, xq.w};
#pragma unroll
    for (int j = 0; j < kPPT; ++j)
#pragma unroll
      for (int jn = 0; jn < NPT; ++jn) s[j][jn] = fmaf(dec[jn], s[j][jn], k[jn] * xv[j]);
#pragma unroll
    for (int jn = 0; jn < NPT; ++jn) lam[jn] *= dec[jn];
    if (u.warp == qw) {
      float q[NPT];
#pragma unroll
      for (int jn = 0; jn < NPT; ++jn) q[jn] = c[jn] * lam[jn];
      sts<NPT>(sqb + ts * LD, q);
    }
    qw = qw + 1 == W ? 0 : qw + 1;
#pragma unroll
    for (int j = 0; j < kPPT; ++j) {
      part[j] = 0.f;
#pragma unroll
      for (int jn = 0; jn < NPT; ++jn) part[j] = fmaf(c[jn], s[j][jn], part[j]);
    }
    const float y = reduce_scatter<kPPT>(part, u.lane);  // p = pw + lane / 8
    if (y_lane) syb[ts * PC] = y;
    if constexpr (kEv && MODE == kOut) {
      const int end = ev_end[tr];
      if (end >= 0 && p.final_states.ptr) {  // the local state now; lam * S_in added after the look-back
        float* f = static_cast<float*>(p.final_states.ptr);
#pragma unroll
        for (int j = 0; j < kPPT; ++j)
#pragma unroll
          for (int jn = 0; jn < NPT; ++jn)
            if (u.pin[j] && u.nin[jn]) f[p.final_states.at(end, u.a.h, u.pw + j, u.nl + jn)] = s[j][jn];
        if (!reset_seen) {  // at most one such end per chunk: a start follows every other end
          if (threadIdx.x == 0) fin_at = end;
          if (u.warp == 0) sts<NPT>(&fin_lam[u.lane * NPT], lam);
        }
      }
    }
  };

  const int nb = (u.c1 - u.c0 + kTS - 1) / kTS;
  for (int b = 0; b < nb; ++b) {
    const int t0 = u.c0 + b * kTS;
    __syncthreads();  // the previous block's reads of st are done (first: constants, events written)
    commit_block<T, NPT, 4, kNone>(p, r, st, sA, sbias, u, t0);
    if (b == 0 && threadIdx.x < nb) {
      bool any = false;
      for (int i = threadIdx.x * kTS; i < threadIdx.x * kTS + kTS; ++i) any |= ev_start[i] != -2 || ev_end[i] >= 0;
      blk_ev[threadIdx.x] = any;
    }
    __syncthreads();
    if (t0 + kTS < u.c1) prefetch_block<T, NPT, 4, kNone>(p, r, nullptr, u, t0 + kTS);
    float* sqb = sq + b * kTS * LD + u.lane * NPT;
    float* syb = sy + b * kTS * PC + u.warp * kPPT + (u.lane >> 3);
    if (!blk_ev[b]) {
#pragma unroll
      for (int ts = 0; ts < kTS; ++ts) step(t0, ts, sqb, syb, std::false_type{});
    } else {
      // Not unrolled: the event paths unrolled kTS times would bloat the code (instruction cache).
#pragma unroll 1
      for (int ts = 0; ts < kTS; ++ts) step(t0, ts, sqb, syb, std::true_type{});
    }
  }

  // 2. The entering state (registers: sin) and the publication of this chunk's.
  const Cta& a = u.a;
  const int nc = tl.nchunks;
  int* flags = bufs.flags;
  const int64_t plane = int64_t(p.nheads) * p.headdim * p.dstate;  // one chunk's states of a row
  float sin[kPPT][NPT];
#pragma unroll
  for (int j = 0; j < kPPT; ++j)
#pragma unroll
    for (int jn = 0; jn < NPT; ++jn) sin[j][jn] = 0.f;
  if (a.c > 0) {
    if (threadIdx.x == 0) lb_k = ld_acquire_flag(flags + flag_index(tl, a, a.c - 1)) == kFlagIncl ? a.c - 1 : -1;
    __syncthreads();
    if (lb_k < 0) {  // the predecessor is not done: publish the aggregate, then walk back
#pragma unroll
      for (int j = 0; j < kPPT; ++j)
#pragma unroll
        for (int jn = 0; jn < NPT; ++jn)
          if (u.pin[j] && u.nin[jn])
            __stcg(&bufs.agg[state_index(p, tl, a.row, a.c, a.h, u.pw + j, u.nl + jn)], s[j][jn]);
      if (u.warp == 0) {
#pragma unroll
        for (int jn = 0; jn < NPT; ++jn)
          if (u.nin[jn]) __stcg(&bufs.agg_lam[agg_lam_index(p, tl, a, a.c, u.nl + jn)], lam[jn]);
      }
      publish_flag(flags + flag_index(tl, a, a.c), kFlagAgg);
      if (threadIdx.x == 0) lb_k = lookback_walk(a.c, [&](int k) { return flags + flag_index(tl, a, k); });
      __syncthreads();
    }
    const int k0 = lb_k;
    const int64_t e = state_index(p, tl, a.row, 0, a.h, u.pw, u.nl), N = p.dstate;
#pragma unroll
    for (int j = 0; j < kPPT; ++j)
#pragma unroll
      for (int jn = 0; jn < NPT; ++jn)  // the state leaving chunk k0
        if (u.pin[j] && u.nin[jn]) sin[j][jn] = __ldcg(&bufs.states[e + (k0 + 1) * plane + j * N + jn]);
    for (int kk = k0 + 1; kk < a.c; ++kk) {  // then the aggregates of the chunks after it, in order
      float lk[NPT];
#pragma unroll
      for (int jn = 0; jn < NPT; ++jn) lk[jn] = u.nin[jn] ? __ldcg(&bufs.agg_lam[agg_lam_index(p, tl, a, kk, u.nl + jn)]) : 0.f;
#pragma unroll
      for (int j = 0; j < kPPT; ++j)
#pragma unroll
        for (int jn = 0; jn < NPT; ++jn)
          if (u.pin[j] && u.nin[jn]) sin[j][jn] = fmaf(lk[jn], sin[j][jn], __ldcg(&bufs.agg[e + kk * plane + j * N + jn]));
    }
  }
  if (bufs.prod && a.c == 0) {  // the backward reads the state entering chunk 0 too
#pragma unroll
    for (int j = 0; j < kPPT; ++j)
#pragma unroll
      for (int jn = 0; jn < NPT; ++jn)
        if (u.pin[j] && u.nin[jn]) bufs.states[state_index(p, tl, a.row, 0, a.h, u.pw + j, u.nl + jn)] = 0.f;
  }
  if (a.c + 1 < nc) {  // the state leaving this chunk enters chunk c + 1
#pragma unroll
    for (int j = 0; j < kPPT; ++j)
#pragma unroll
      for (int jn = 0; jn < NPT; ++jn)
        if (u.pin[j] && u.nin[jn])
          __stcg(&bufs.states[state_index(p, tl, a.row, a.c + 1, a.h, u.pw + j, u.nl + jn)],
                 fmaf(lam[jn], sin[j][jn], s[j][jn]));
    publish_flag(flags + flag_index(tl, a, a.c), kFlagIncl);
  }
  if (bufs.prod && a.tp == 0 && u.warp == 0) {
#pragma unroll
    for (int jn = 0; jn < NPT; ++jn)
      if (u.nin[jn]) bufs.prod[prod_index(p, tl, a.row, a.c, a.h, u.nl + jn)] = lam[jn];
  }

  // 3. The correction y_t += q_t . S_in, then the epilogue. Thread: p pair pi (2 p), steps
  // ti + 16 i (i < kFwdChunk / 16).
#pragma unroll
  for (int j = 0; j < kPPT; ++j) sts<NPT>(&ssin[(u.warp * kPPT + j) * LD + u.lane * NPT], sin[j]);
  __syncthreads();  // sin, q, y and fin_at / fin_lam complete
  if (MODE == kOut && fin_at >= 0) {  // the final state of an end before any reset in the chunk
    float* f = static_cast<float*>(p.final_states.ptr);
    float fl[NPT];
    lds<NPT>(&fin_lam[u.lane * NPT], fl);
#pragma unroll
    for (int j = 0; j < kPPT; ++j)
#pragma unroll
      for (int jn = 0; jn < NPT; ++jn)
        if (u.pin[j] && u.nin[jn]) {
          float& fv = f[p.final_states.at(fin_at, a.h, u.pw + j, u.nl + jn)];
          fv = fmaf(fl[jn], sin[j][jn], fv);
        }
  }
  constexpr int kTR = kFwdChunk / 16;
  const int pi = threadIdx.x % (2 * W), ti = threadIdx.x / (2 * W);
  float acc[kTR][2];
#pragma unroll
  for (int i = 0; i < kTR; ++i) acc[i][0] = acc[i][1] = 0.f;
  const float* q0 = sq + ti * LD;
  const float* s0 = ssin + 2 * pi * LD;
#pragma unroll 2
  for (int n = 0; n < NT; n += 4) {
    const float4 b0 = *reinterpret_cast<const float4*>(s0 + n), b1 = *reinterpret_cast<const float4*>(s0 + LD + n);
#pragma unroll
    for (int i = 0; i < kTR; ++i) {
      const float4 qv = *reinterpret_cast<const float4*>(q0 + 16 * i * LD + n);
      acc[i][0] = fmaf(qv.w, b0.w, fmaf(qv.z, b0.z, fmaf(qv.y, b0.y, fmaf(qv.x, b0.x, acc[i][0]))));
      acc[i][1] = fmaf(qv.w, b1.w, fmaf(qv.z, b1.z, fmaf(qv.y, b1.y, fmaf(qv.x, b1.x, acc[i][1]))));
    }
  }
  const int64_t P = p.headdim;
#pragma unroll
  for (int jp = 0; jp < 2; ++jp) {
    const int64_t pp = u.plo + 2 * pi + jp;
    if (pp >= P) continue;
    const float Dv = D_at(p, a.h, pp);
#pragma unroll
    for (int i = 0; i < kTR; ++i) {
      const int tr = ti + 16 * i;
      const int64_t t = u.c0 + tr;
      if (t >= u.c1) continue;
      const float y = sy[tr * PC + 2 * pi + jp] + acc[i][jp];
      if (tl.ntn > 1) {
        bufs.ypart[((a.tn * tl.nrows + a.row) * p.seqlen + t) * p.nheads * P + a.h * P + pp] = y;
      } else {
        const float xv = float(static_cast<const T*>(p.x.ptr)[p.x.at(a.row, t, a.h, pp)]);
        const float zv = p.z.ptr ? float(static_cast<const T*>(p.z.ptr)[p.z.at(a.row, t, a.h, pp)]) : 0.f;
        emit_y<T, MODE>(p, bufs, a.row, t, a.h, pp, y, xv, Dv, zv);
      }
    }
  }
}

// Backward step 3: buf[c] := the adjoint at the end of chunk c coming from later chunks (buf holds
// each chunk's local adjoint on entry). One thread per (row, h, p, n). The loads of kPassB chunks
// are issued before any of their stores (they do not depend on S): one memory latency per kPassB
// chunks instead of per chunk.
constexpr int kPassB = 8;
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
      const int c = nc - 1 - (i0 + i);
      loc[i] = i0 + i < nc ? b[c * HPN] : 0.f;
      dec[i] = i0 + i < nc ? pr[c * HN] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kPassB; ++i) {
      const int c = nc - 1 - (i0 + i);
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

// The forward with mode kOut or kOutBwd (tl.Tc == kFwdChunk). bufs.states must hold
// nrows*nchunks*H*P*N floats, bufs.prod (kOutBwd) nrows*nchunks*H*N, bufs.ypart ntn*nrows*L*H*P when
// ntn > 1; the look-back scratch is allocated here (like: a tensor on the device).
template <typename T, int MODE>
void run_forward(const IssmParams& p, const Tiling& tl, Bufs bufs, const at::Tensor& like, cudaStream_t stream) {
  TORCH_CHECK(tl.Tc == kFwdChunk, "issm (CUDA): the forward runs chunks of ", kFwdChunk, " steps, got ", tl.Tc);
  const int64_t ctas = tl.ctas();
  if (ctas == 0) return;
  const int64_t slots = ctas;  // one per chunk tile
  at::Tensor agg = at::empty({int64_t(tl.nrows) * tl.nchunks * p.nheads * p.headdim * p.dstate},
                             like.options().dtype(at::kFloat));
  at::Tensor agg_lam = at::empty({int64_t(tl.nrows) * tl.nchunks * p.nheads * tl.ntp * p.dstate},
                                 like.options().dtype(at::kFloat));
  at::Tensor flags = at::zeros({slots}, like.options().dtype(at::kInt));
  bufs.agg = agg.data_ptr<float>();
  bufs.agg_lam = agg_lam.data_ptr<float>();
  bufs.flags = flags.data_ptr<int>();
  const unsigned threads = static_cast<unsigned>(tl.warps * 32);
  npt_switch(tl.npt, [&](auto npt) {
    constexpr int NPT = decltype(npt)::value;
    const size_t smem = fwd_smem(NPT, tl.warps);
    C10_CUDA_CHECK(cudaFuncSetAttribute(fwd_chunk_kernel<T, NPT, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    fwd_chunk_kernel<T, NPT, MODE><<<static_cast<unsigned>(ctas), threads, smem, stream>>>(p, tl, bufs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (tl.ntn > 1) {
    const int64_t n = int64_t(tl.nrows) * p.seqlen * p.nheads * p.headdim;
    ypart_kernel<T, MODE><<<blocks_for(n, 256), 256, 0, stream>>>(p, tl, bufs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace issm
}  // namespace ssm_ext
