// Row mode of the CUDA scan, for layouts with L contiguous (accelerated-scan's (B, C, T)) and
// rows (b, d) enough to fill the GPU: kWpr warps own one row (a whole CTA when b and c are
// absent, else one warp) and walk it in segments of kWpr * 32 * V steps, lane l of the row's
// warp w holding steps seg0 + (32 w + l) V .. + V-1. Within a segment the lanes compose their
// (P, U) pairs by shuffles and the warps through shared memory; between segments every thread
// carries h itself. No look-back and no scratch.
#include <c10/cuda/CUDAStream.h>

#include "common/dispatch.h"
#include "scan/scan.h"
#include "scan/scan_cuda.cuh"

namespace ssm_ext {
namespace scan {
namespace {

constexpr int kRowWarps = 8;
constexpr unsigned kFull = 0xFFFFFFFFu;

template <typename T>
constexpr int kVec = 16 / int(sizeof(T));
// kPlain (b and c absent: accelerated-scan's case) rows run a CTA per row, the 8 warps sharing
// each segment, with one segment of loads at a time: measured on the H100 at (8, 1536, 4096),
// this beats a warp per row with 2-3 segments in flight (fp32 fwd 214.5 -> 203.6 us, bf16
// 111.7 -> 105.0 us), whose many small row streams kept DRAM below the Triton scalar kernel.
// Other rows keep a warp per row, 2 segments in flight, one 16-byte vector per lane per input.
template <bool kPlain>
constexpr int kWarpsPerRow = kPlain ? kRowWarps : 1;
template <bool kPlain>
constexpr int kDepth = kPlain ? 1 : 2;
// Steps per lane in a segment: 32 bytes of each input in the plain forward (fp32 8, 16-bit 16),
// 8 in the plain backward (it also reads dy), else one 16-byte vector (registers).
template <typename T, bool kPlain>
constexpr int kLaneSteps = kPlain ? 32 / int(sizeof(T)) : kVec<T>;
template <typename T, bool kPlain>
constexpr int kBwdLaneSteps = kPlain ? 8 : kVec<T>;

// N consecutive elements of T, as whole 16-byte pieces.
template <typename T, int N>
struct Vec {
  uint4 v[(N * int(sizeof(T)) + 15) / 16];
  __device__ __forceinline__ void load(const T* p, bool exists, float fill) {
#pragma unroll
    for (int q = 0; q < int(sizeof(v) / 16); ++q) v[q] = exists ? reinterpret_cast<const uint4*>(p)[q] : uint4{};
    if (!exists) {
      T* e = reinterpret_cast<T*>(v);
#pragma unroll
      for (int i = 0; i < N; ++i) e[i] = T(fill);
    }
  }
  __device__ __forceinline__ float operator[](int i) const { return float(reinterpret_cast<const T*>(v)[i]); }
};

template <typename Y, int N>
__device__ __forceinline__ void store_row(Y* p, const float (&e)[N]) {
  constexpr int kPiece = 16 / int(sizeof(Y));
#pragma unroll
  for (int q = 0; q < N; q += kPiece) store_vec<Y, kPiece>(p + q, e + q);
}

// Inclusive scan of the lanes' pairs in scan order (lane 0 first when forward, lane 31 when
// not); returns it, and in `before` the composition of the lanes before this one.
template <bool kForward>
__device__ __forceinline__ float2 warp_scan(float2 pu, float2& before) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const float px = kForward ? __shfl_up_sync(kFull, pu.x, o) : __shfl_down_sync(kFull, pu.x, o);
    const float py = kForward ? __shfl_up_sync(kFull, pu.y, o) : __shfl_down_sync(kFull, pu.y, o);
    if (kForward ? lane >= o : lane + o < 32) pu = then(make_float2(px, py), pu);
  }
  before.x = kForward ? __shfl_up_sync(kFull, pu.x, 1) : __shfl_down_sync(kFull, pu.x, 1);
  before.y = kForward ? __shfl_up_sync(kFull, pu.y, 1) : __shfl_down_sync(kFull, pu.y, 1);
  if (lane == (kForward ? 0 : 31)) before = make_float2(1.f, 0.f);
  return pu;
}

// Calls process(s, seg) for the n_seg segments in order (last first when reverse), with the
// loads of the next kDepth - 1 segments in flight while one is processed.
template <int kDepth, typename Seg, typename Load, typename Process>
__device__ __forceinline__ void pipelined(int64_t n_seg, bool reverse, Load&& load, Process&& process) {
  Seg buf[kDepth];
  auto at = [&](int64_t i) { return reverse ? n_seg - 1 - i : i; };
#pragma unroll
  for (int d = 0; d < kDepth; ++d)
    if (d < n_seg) load(at(d), buf[d]);
  for (int64_t i = 0; i < n_seg; i += kDepth) {
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      if (i + d < n_seg) {
        process(at(i + d), buf[d]);
        if (i + d + kDepth < n_seg) load(at(i + d + kDepth), buf[d]);
      }
    }
  }
}

// Where a warp's row lies in each view (L stride 1): a CTA holds kRowWarps / kWpr rows, kWpr
// warps each; slot is the row's place in the CTA, sub the warp's place in the row.
template <int kWpr>
struct RowAt {
  int64_t rb, rd;
  int slot, sub;
  bool exists;
  __device__ RowAt(const ScanParams& p) {
    const int warp = threadIdx.x / 32;
    slot = warp / kWpr;
    sub = warp % kWpr;
    const int64_t row = int64_t(blockIdx.x) * (kRowWarps / kWpr) + slot;
    exists = row < p.batch * p.dim;
    rb = exists ? row / p.dim : 0;
    rd = exists ? row % p.dim : 0;
  }
  template <typename T>
  __device__ T* in(const View3& v) const { return static_cast<T*>(v.ptr) + rb * v.sb + rd * v.sd; }
  __device__ int64_t chunk(const View3& v, int64_t c) const { return rb * v.sb + c * v.sl + rd * v.sd; }
};

// One segment's inputs of a lane: V steps.
template <typename T, typename DY, int V>
struct Segment {
  Vec<T, V> a, x, b, c;
  Vec<DY, V> dy;
  float h_in;  // backward: the chunk state entering the segment
};

// The warp's row of a, x, b, c (b, c null when absent, or always when kPlain).
template <typename T, bool kPlain>
struct RowInputs {
  const T *a, *x, *b, *c;
  __device__ RowInputs(const ScanParams& p, const RowAt<kWarpsPerRow<kPlain>>& at)
      : a(at.template in<const T>(p.a)),
        x(at.template in<const T>(p.x)),
        b(!kPlain && p.b.ptr ? at.template in<const T>(p.b) : nullptr),
        c(!kPlain && p.c.ptr ? at.template in<const T>(p.c) : nullptr) {}
  // Steps t .. t + V - 1 into g (ok: they exist).
  template <typename DY, int V>
  __device__ void load(Segment<T, DY, V>& g, int64_t t, bool ok) const {
    g.a.load(a + t, ok, 1.f);
    g.x.load(x + t, ok, 0.f);
    if (b) g.b.load(b + t, ok, 0.f);
    if (c) g.c.load(c + t, ok, 0.f);
  }
};

// kPlain: b and c absent. The warps' aggregates of a segment are composed through shared memory,
// double-buffered by segment parity: one barrier per segment.
template <typename T, typename Y, bool kPlain>
__global__ __launch_bounds__(kRowWarps * 32, 3) void fwd_rows_kernel(ScanParams p) {
  constexpr int V = kLaneSteps<T, kPlain>, kWpr = kWarpsPerRow<kPlain>, kSeg = kWpr * 32 * V;
  constexpr int kRowsPerCta = kRowWarps / kWpr;
  using Seg = Segment<T, T, V>;
  __shared__ float2 agg[2][kRowsPerCta][kWpr];
  const int lane = threadIdx.x % 32;
  const RowAt<kWpr> at(p);
  const int slot = at.slot, sub = at.sub;
  const bool exists = at.exists;
  const RowInputs<T, kPlain> in(p, at);
  const T *b = in.b, *c = in.c;
  const int64_t n_seg = (p.seqlen + kSeg - 1) / kSeg;
  const int64_t lane0 = int64_t(sub * 32 + lane) * V;
  auto load = [&](int64_t s, Seg& g) {
    const int64_t t = s * kSeg + lane0;
    in.load(g, t, exists && t < p.seqlen);
  };
  float carry = exists && p.initial_state.ptr
                    ? load_as<float>(p.initial_state.ptr, p.initial_dtype, at.chunk(p.initial_state, 0)) : 0.f;
  int parity = 0;
  pipelined<kDepth<kPlain>, Seg>(n_seg, false, load, [&](int64_t s, const Seg& cur) {
    const int64_t t = s * kSeg + lane0;
    float u[V];
    float2 pu = make_float2(1.f, 0.f);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      u[i] = b ? cur.b[i] * cur.x[i] : cur.x[i];
      pu = make_float2(cur.a[i] * pu.x, cur.a[i] * pu.y + u[i]);
    }
    float2 before;
    const float2 upto = warp_scan<true>(pu, before);
    float2 seg_all = make_float2(__shfl_sync(kFull, upto.x, 31), __shfl_sync(kFull, upto.y, 31));
    if constexpr (kWpr > 1) {
      if (lane == 31) agg[parity][slot][sub] = upto;
      __syncthreads();
      float2 ahead = make_float2(1.f, 0.f);  // the warps before this one in the segment
#pragma unroll
      for (int w = 0; w < kWpr; ++w) {
        const float2 g = agg[parity][slot][w];
        if (w < sub) ahead = then(ahead, g);
        if (w == 0) seg_all = g;
        else seg_all = then(seg_all, g);
      }
      before = then(ahead, before);
      parity ^= 1;
    }
    float h = before.x * carry + before.y;
    if (exists && p.chunk_states.ptr && t < p.seqlen && t % kChunk == 0)
      static_cast<float*>(p.chunk_states.ptr)[at.chunk(p.chunk_states, t / kChunk)] = h;
    float hs[V], ys[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      hs[i] = h = cur.a[i] * h + u[i];
      ys[i] = c ? cur.c[i] * h : h;
    }
    if (exists && t < p.seqlen) {
      if (p.y.ptr) store_row<Y, V>(at.template in<Y>(p.y) + t, ys);
      if (p.states.ptr) store_row<float, V>(at.template in<float>(p.states) + t, hs);
    }
    carry = seg_all.x * carry + seg_all.y;
  });
  if (exists && sub == 0 && lane == 0 && p.final_state.ptr)
    static_cast<float*>(p.final_state.ptr)[at.chunk(p.final_state, 0)] = carry;
}

// From the last segment to the first: h recomputed from the chunk state entering the segment
// (as the forward computed it), then the carry recurrence carry_t = a_t*(c_t*dy_t + carry_{t+1}).
// kWpr warps share a row as in the forward; both scans' warp aggregates go through shared memory
// with one barrier per segment.
template <typename T, typename DY, bool kPlain>
__global__ __launch_bounds__(kRowWarps * 32, kPlain ? 3 : 2) void bwd_rows_kernel(ScanParams p) {
  constexpr int V = kBwdLaneSteps<T, kPlain>, kWpr = kWarpsPerRow<kPlain>, kSeg = kWpr * 32 * V;
  constexpr int kRowsPerCta = kRowWarps / kWpr;
  using Seg = Segment<T, DY, V>;
  __shared__ float2 agg[2][2][kRowsPerCta][kWpr];  // [parity][forward, reverse]
  const int lane = threadIdx.x % 32;
  const RowAt<kWpr> at(p);
  const int slot = at.slot, sub = at.sub;
  const bool exists = at.exists;
  const RowInputs<T, kPlain> in(p, at);
  const T *b = in.b, *c = in.c;
  const DY* dy = at.template in<const DY>(p.dy);
  const float* chunk_states = static_cast<const float*>(p.chunk_states.ptr);
  const int64_t n_seg = (p.seqlen + kSeg - 1) / kSeg;
  const int64_t lane0 = int64_t(sub * 32 + lane) * V;
  auto load = [&](int64_t s, Seg& g) {
    const int64_t t = s * kSeg + lane0;
    const bool ok = exists && t < p.seqlen;
    in.load(g, t, ok);
    g.dy.load(dy + t, ok, 0.f);
    g.h_in = exists ? chunk_states[at.chunk(p.chunk_states, s * (kSeg / kChunk))] : 0.f;
  };
  float carry = exists && p.dfinal_state.ptr ? static_cast<const float*>(p.dfinal_state.ptr)[at.chunk(p.dfinal_state, 0)] : 0.f;
  int parity = 0;
  pipelined<kDepth<kPlain>, Seg>(n_seg, true, load, [&](int64_t s, const Seg& cur) {
    const int64_t t = s * kSeg + lane0;
    float u[V], g[V];
    float2 pu = make_float2(1.f, 0.f);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      u[i] = b ? cur.b[i] * cur.x[i] : cur.x[i];
      g[i] = c ? cur.c[i] * cur.dy[i] : cur.dy[i];
      pu = make_float2(cur.a[i] * pu.x, cur.a[i] * pu.y + u[i]);
    }
    float2 before;
    const float2 upto_f = warp_scan<true>(pu, before);
    pu = make_float2(1.f, 0.f);  // the carry map of the lane's steps, last step first
#pragma unroll
    for (int i = V - 1; i >= 0; --i) pu = make_float2(cur.a[i] * pu.x, cur.a[i] * (pu.y + g[i]));
    float2 after;
    const float2 upto_r = warp_scan<false>(pu, after);
    float2 seg_r = make_float2(__shfl_sync(kFull, upto_r.x, 0), __shfl_sync(kFull, upto_r.y, 0));
    if constexpr (kWpr > 1) {
      if (lane == 31) agg[parity][0][slot][sub] = upto_f;
      if (lane == 0) agg[parity][1][slot][sub] = upto_r;
      __syncthreads();
      float2 ahead = make_float2(1.f, 0.f), behind = make_float2(1.f, 0.f);
#pragma unroll
      for (int w = 0; w < kWpr; ++w)
        if (w < sub) ahead = then(ahead, agg[parity][0][slot][w]);
#pragma unroll
      for (int w = kWpr - 1; w >= 0; --w) {
        const float2 r = agg[parity][1][slot][w];
        if (w > sub) behind = then(behind, r);
        seg_r = w == kWpr - 1 ? r : then(seg_r, r);
      }
      before = then(ahead, before);
      after = then(behind, after);
      parity ^= 1;
    }
    float hs[V + 1];  // hs[i + 1] = h at step i, hs[0] the state before the lane's steps
    hs[0] = before.x * cur.h_in + before.y;
#pragma unroll
    for (int i = 0; i < V; ++i) hs[i + 1] = cur.a[i] * hs[i] + u[i];
    float k = after.x * carry + after.y, dh[V];
#pragma unroll
    for (int i = V - 1; i >= 0; --i) {
      dh[i] = g[i] + k;
      k = cur.a[i] * dh[i];
    }
    if (exists && t < p.seqlen) {
      float o[V];
#pragma unroll
      for (int i = 0; i < V; ++i) o[i] = hs[i] * dh[i];
      store_row<T, V>(at.template in<T>(p.da) + t, o);
#pragma unroll
      for (int i = 0; i < V; ++i) o[i] = b ? cur.b[i] * dh[i] : dh[i];
      store_row<T, V>(at.template in<T>(p.dx) + t, o);
      if (p.db.ptr) {
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = cur.x[i] * dh[i];
        store_row<T, V>(at.template in<T>(p.db) + t, o);
      }
      if (p.dc.ptr) {
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = hs[i + 1] * cur.dy[i];
        store_row<T, V>(at.template in<T>(p.dc) + t, o);
      }
    }
    carry = seg_r.x * carry + seg_r.y;
  });
  if (exists && sub == 0 && lane == 0 && p.dinitial_state.ptr)
    store_as(p.dinitial_state.ptr, p.initial_dtype, at.chunk(p.dinitial_state, 0), carry);
}

// Row mode needs L contiguous, 16-byte aligned rows (vec = kVec<T> steps) in every view, L a
// multiple of the lane's steps, and enough rows: below 16 warps per SM the tiles with
// look-back keep more loads in flight.
bool rows_ok(const ScanParams& p, int vec, int lane_steps, std::initializer_list<View3> views) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (p.seqlen % lane_steps != 0 || p.batch * p.dim < 16 * int64_t(sms)) return false;
  for (const View3& v : views)
    if (v.ptr && !vec_ok(v, 16 / vec, vec, v.sl, p.batch == 1 ? 0 : v.sb, p.dim == 1 ? 0 : v.sd)) return false;
  return true;
}

template <bool kPlain>
unsigned row_blocks(const ScanParams& p) { return ceil_div(p.batch * p.dim, kRowWarps / kWarpsPerRow<kPlain>); }

}  // namespace

bool launch_rows_fwd(const ScanParams& p, at::ScalarType in, at::ScalarType out) {
  bool done = false;
  dispatch_io_dtype(in, "x", [&](auto tin) {
    using T = decltype(tin);
    dispatch_out_dtype<T>(out, [&](auto tout) {
      using Y = decltype(tout);
      // every view is checked at the input's vector length; wider outputs take 2 stores
      bool_switch(!p.b.ptr && !p.c.ptr, [&](auto plain) {
        if (!rows_ok(p, kVec<T>, kLaneSteps<T, plain>, {p.x, p.a, p.b, p.c, p.y, p.states})) return;
        fwd_rows_kernel<T, Y, plain><<<row_blocks<plain>(p), kRowWarps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        done = true;
      });
    });
  });
  return done;
}

bool launch_rows_bwd(const ScanParams& p, at::ScalarType in, at::ScalarType dy) {
  if (p.states.ptr || !p.chunk_states.ptr) return false;
  bool done = false;
  dispatch_io_dtype(in, "x", [&](auto tin) {
    using T = decltype(tin);
    dispatch_out_dtype<T>(dy, [&](auto tdy) {
      using DY = decltype(tdy);
      bool_switch(!p.b.ptr && !p.c.ptr, [&](auto plain) {
        if (!rows_ok(p, kVec<T>, kBwdLaneSteps<T, plain>, {p.x, p.a, p.b, p.c, p.dy, p.dx, p.da, p.db, p.dc})) return;
        bwd_rows_kernel<T, DY, plain><<<row_blocks<plain>(p), kRowWarps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        done = true;
      });
    });
  });
  return done;
}

}  // namespace scan
}  // namespace ssm_ext
