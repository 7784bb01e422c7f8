// Row mode of the CUDA scan, for layouts with L contiguous (accelerated-scan's (B, C, T)) and
// rows (b, d) enough to fill the GPU: a warp owns one row and walks it in segments of
// 32 * V steps, lane l holding steps seg0 + l*V .. seg0 + l*V + V-1 (32 bytes of each input
// when only a and x are read, else 16). Within a segment the lanes compose their (P, U) pairs by shuffles;
// between segments the warp carries h itself. No look-back, no scratch, no block barrier, and
// the next segment's loads are in flight while the current one is computed.
#include <c10/cuda/CUDAStream.h>

#include "common/dispatch.h"
#include "scan/scan.h"
#include "scan/scan_cuda.cuh"

namespace ssm_ext {
namespace scan {
namespace {

constexpr int kRowWarps = 8;
// Segments in flight per warp, one of them being processed: 3 of 16 bytes per input per lane
// when only a and x (and dy) are read, else 2 (registers).
template <typename T, bool kPlain>
constexpr int kDepth = kPlain && sizeof(T) < 4 ? 3 : 2;
constexpr unsigned kFull = 0xFFFFFFFFu;

template <typename T>
constexpr int kVec = 16 / int(sizeof(T));
// Steps per lane in a segment: 8 when b and c are absent (kPlain; fp32 then reads 32 bytes per
// input, half the shuffle scans per step of 4 steps), else one 16-byte vector (registers).
template <typename T, bool kPlain>
constexpr int kLaneSteps = kPlain ? 8 : kVec<T>;

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

// Where a warp's row lies in each view (L stride 1).
struct RowAt {
  int64_t row, rb, rd;
  bool exists;
  __device__ RowAt(const ScanParams& p) {
    row = int64_t(blockIdx.x) * kRowWarps + threadIdx.x / 32;
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
  __device__ RowInputs(const ScanParams& p, const RowAt& at)
      : a(at.in<const T>(p.a)),
        x(at.in<const T>(p.x)),
        b(!kPlain && p.b.ptr ? at.in<const T>(p.b) : nullptr),
        c(!kPlain && p.c.ptr ? at.in<const T>(p.c) : nullptr) {}
  // Steps t .. t + V - 1 into g (ok: they exist).
  template <typename DY, int V>
  __device__ void load(Segment<T, DY, V>& g, int64_t t, bool ok) const {
    g.a.load(a + t, ok, 1.f);
    g.x.load(x + t, ok, 0.f);
    if (b) g.b.load(b + t, ok, 0.f);
    if (c) g.c.load(c + t, ok, 0.f);
  }
};

// kPlain: b and c absent.
template <typename T, typename Y, bool kPlain>
__global__ __launch_bounds__(kRowWarps * 32, kDepth<T, kPlain> == 3 ? 4 : 3) void fwd_rows_kernel(ScanParams p) {
  constexpr int V = kLaneSteps<T, kPlain>, kSeg = 32 * V;
  using Seg = Segment<T, T, V>;
  const RowAt at(p);
  if (!at.exists) return;
  const int lane = threadIdx.x % 32;
  const RowInputs<T, kPlain> in(p, at);
  const T *b = in.b, *c = in.c;
  const int64_t n_seg = (p.seqlen + kSeg - 1) / kSeg;
  auto load = [&](int64_t s, Seg& g) {
    const int64_t t = s * kSeg + lane * V;
    in.load(g, t, t < p.seqlen);
  };
  float carry = p.initial_state.ptr ? load_as<float>(p.initial_state.ptr, p.initial_dtype, at.chunk(p.initial_state, 0)) : 0.f;
  pipelined<kDepth<T, kPlain>, Seg>(n_seg, false, load, [&](int64_t s, const Seg& cur) {
    const int64_t t = s * kSeg + lane * V;
    float u[V];
    float2 pu = make_float2(1.f, 0.f);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      u[i] = b ? cur.b[i] * cur.x[i] : cur.x[i];
      pu = make_float2(cur.a[i] * pu.x, cur.a[i] * pu.y + u[i]);
    }
    float2 before;
    const float2 upto = warp_scan<true>(pu, before);
    float h = before.x * carry + before.y;
    if (p.chunk_states.ptr && t < p.seqlen && t % kChunk == 0)
      static_cast<float*>(p.chunk_states.ptr)[at.chunk(p.chunk_states, t / kChunk)] = h;
    float hs[V], ys[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      hs[i] = h = cur.a[i] * h + u[i];
      ys[i] = c ? cur.c[i] * h : h;
    }
    if (t < p.seqlen) {
      if (p.y.ptr) store_row<Y, V>(at.in<Y>(p.y) + t, ys);
      if (p.states.ptr) store_row<float, V>(at.in<float>(p.states) + t, hs);
    }
    carry = __shfl_sync(kFull, upto.x * carry + upto.y, 31);
  });
  if (lane == 0 && p.final_state.ptr) static_cast<float*>(p.final_state.ptr)[at.chunk(p.final_state, 0)] = carry;
}

// From the last segment to the first: h recomputed from the chunk state entering the segment
// (as the forward computed it), then the carry recurrence carry_t = a_t*(c_t*dy_t + carry_{t+1}).
template <typename T, typename DY, bool kPlain>
__global__ __launch_bounds__(kRowWarps * 32, 2) void bwd_rows_kernel(ScanParams p) {
  constexpr int V = kLaneSteps<T, kPlain>, kSeg = 32 * V;
  using Seg = Segment<T, DY, V>;
  const RowAt at(p);
  if (!at.exists) return;
  const int lane = threadIdx.x % 32;
  const RowInputs<T, kPlain> in(p, at);
  const T *b = in.b, *c = in.c;
  const DY* dy = at.in<const DY>(p.dy);
  const float* chunk_states = static_cast<const float*>(p.chunk_states.ptr);
  const int64_t n_seg = (p.seqlen + kSeg - 1) / kSeg;
  auto load = [&](int64_t s, Seg& g) {
    const int64_t t = s * kSeg + lane * V;
    const bool ok = t < p.seqlen;
    in.load(g, t, ok);
    g.dy.load(dy + t, ok, 0.f);
    g.h_in = chunk_states[at.chunk(p.chunk_states, s * (kSeg / kChunk))];
  };
  float carry = p.dfinal_state.ptr ? static_cast<const float*>(p.dfinal_state.ptr)[at.chunk(p.dfinal_state, 0)] : 0.f;
  pipelined<kDepth<T, kPlain>, Seg>(n_seg, true, load, [&](int64_t s, const Seg& cur) {
    const int64_t t = s * kSeg + lane * V;
    float u[V], g[V];
    float2 pu = make_float2(1.f, 0.f);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      u[i] = b ? cur.b[i] * cur.x[i] : cur.x[i];
      g[i] = c ? cur.c[i] * cur.dy[i] : cur.dy[i];
      pu = make_float2(cur.a[i] * pu.x, cur.a[i] * pu.y + u[i]);
    }
    float2 before;
    warp_scan<true>(pu, before);
    float hs[V + 1];  // hs[i + 1] = h at step i, hs[0] the state before the lane's steps
    hs[0] = before.x * cur.h_in + before.y;
#pragma unroll
    for (int i = 0; i < V; ++i) hs[i + 1] = cur.a[i] * hs[i] + u[i];

    pu = make_float2(1.f, 0.f);  // the carry map of the lane's steps, last step first
#pragma unroll
    for (int i = V - 1; i >= 0; --i) pu = make_float2(cur.a[i] * pu.x, cur.a[i] * (pu.y + g[i]));
    const float2 upto = warp_scan<false>(pu, before);
    float k = before.x * carry + before.y, dh[V];
#pragma unroll
    for (int i = V - 1; i >= 0; --i) {
      dh[i] = g[i] + k;
      k = cur.a[i] * dh[i];
    }
    if (t < p.seqlen) {
      float o[V];
#pragma unroll
      for (int i = 0; i < V; ++i) o[i] = hs[i] * dh[i];
      store_row<T, V>(at.in<T>(p.da) + t, o);
#pragma unroll
      for (int i = 0; i < V; ++i) o[i] = b ? cur.b[i] * dh[i] : dh[i];
      store_row<T, V>(at.in<T>(p.dx) + t, o);
      if (p.db.ptr) {
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = cur.x[i] * dh[i];
        store_row<T, V>(at.in<T>(p.db) + t, o);
      }
      if (p.dc.ptr) {
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = hs[i + 1] * cur.dy[i];
        store_row<T, V>(at.in<T>(p.dc) + t, o);
      }
    }
    carry = __shfl_sync(kFull, upto.x * carry + upto.y, 0);
  });
  if (lane == 0 && p.dinitial_state.ptr) store_as(p.dinitial_state.ptr, p.initial_dtype, at.chunk(p.dinitial_state, 0), carry);
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

unsigned row_blocks(const ScanParams& p) { return ceil_div(p.batch * p.dim, kRowWarps); }

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
        fwd_rows_kernel<T, Y, plain><<<row_blocks(p), kRowWarps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
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
        if (!rows_ok(p, kVec<T>, kLaneSteps<T, plain>, {p.x, p.a, p.b, p.c, p.dy, p.dx, p.da, p.db, p.dc})) return;
        bwd_rows_kernel<T, DY, plain><<<row_blocks(p), kRowWarps * 32, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        done = true;
      });
    });
  });
  return done;
}

}  // namespace scan
}  // namespace ssm_ext
