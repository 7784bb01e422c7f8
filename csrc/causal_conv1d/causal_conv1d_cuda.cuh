// Pieces shared by the conv1d forward and backward CUDA kernels: launch shapes, fast-path
// conditions, compile-time switches and the window loads.
#pragma once
#include <initializer_list>
#include <type_traits>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/causal_conv1d_math.h"
#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"

namespace ssm_ext {
namespace conv1d {

constexpr int kCfThreads = 128;      // channel-first: threads per block (one row)
// channel-first forward: 16-byte vectors per thread per chunk. 2 measured slower on the H100
// (bf16 8x4096x4096: 225 us against 186 us; 56 registers against 40 cost occupancy).
constexpr int kCfVecs = 1;
constexpr int kClThreads = 128;      // channel-last forward: threads per block along D
constexpr int kClSteps = 64;         // channel-last forward: time steps per thread
constexpr int kClUnroll = 4;         // channel-last forward: steps loaded per group (one group prefetched)
// channel-last backward: a block owns kClBwdTileC channels (2 per thread) and kClBwdSteps
// steps, loaded into shared memory kClBwdTileL steps at a time (see bwd_cl_kernel).
constexpr int kClBwdThreads = 128;
constexpr int kClBwdTileC = 2 * kClBwdThreads;
constexpr int kClBwdTileL = 32;
constexpr int kClBwdSteps = 256;     // fewer, longer ranges: fewer dweight partials to sum

template <typename F>
void width_switch(int64_t w, F&& f) {
  switch (w) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;  // callers only pass 2..4
  }
}

// The decode kernel keeps its window in registers: widths 2..8.
constexpr int kUpdateMaxWidth = 8;
template <typename F>
void update_width_switch(int64_t w, F&& f) {
  switch (w) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Vectorised paths need 16-byte aligned rows: the fallback handles everything else.
template <typename T>
bool use_cf_fast_path(const ConvParams& p, std::initializer_list<View3> views) {
  constexpr int E = kVecElems<T>;
  if (p.channel_last || p.width > 4 || p.seqlen % E != 0 || p.seqlen > (int64_t(1) << 30)) return false;
  for (const View3& v : views)
    if (v.sl != 1 || v.sd % E || v.sb % E || !aligned16(v.ptr)) return false;
  return true;
}

template <typename T, int E = kVecElems<T>>
bool use_cl_fast_path(const ConvParams& p, std::initializer_list<View3> views) {
  if (!p.channel_last || p.width > 4 || p.dim % E != 0 || p.seqlen < p.width - 1) return false;
  if (ceil_div(p.seqlen, kClSteps) > 65535 || p.batch > 65535) return false;
  for (const View3& v : views)
    if (v.sd != 1 || v.sl % E || v.sb % E || !aligned16(v.ptr)) return false;
  return true;
}

// Weights and bias (same dtype, see prepare_*) of channels [c0, c0+E) as fp32. One dtype
// switch whose arm issues every load before converting: a conversion inside the arm would
// make the thread wait for each load in turn. P: ConvParams or UpdateParams.
template <typename WT, int W, int E, typename P>
__device__ __forceinline__ void load_weights_typed(const P& p, int64_t c0, float (&w)[W][E], float (&bias)[E]) {
  const WT* wp = static_cast<const WT*>(p.weight);
  const WT* bp = static_cast<const WT*>(p.bias);
  WT raw[W][E], rb[E];
#pragma unroll
  for (int i = 0; i < E; ++i) {
#pragma unroll
    for (int k = 0; k < W; ++k) raw[k][i] = wp[(c0 + i) * p.weight_sd + k * p.weight_sw];
    rb[i] = bp == nullptr ? WT(0.f) : bp[(c0 + i) * p.bias_sd];
  }
#pragma unroll
  for (int i = 0; i < E; ++i) {
#pragma unroll
    for (int k = 0; k < W; ++k) w[k][i] = float(raw[k][i]);
    bias[i] = float(rb[i]);
  }
}

template <int W, int E, typename P>
__device__ __forceinline__ void load_weights_block(const P& p, int64_t c0, float (&w)[W][E], float (&bias)[E]) {
  switch (p.weight_dtype) {
    case Dtype::f16: load_weights_typed<c10::Half>(p, c0, w, bias); break;
    case Dtype::bf16: load_weights_typed<c10::BFloat16>(p, c0, w, bias); break;
    default: load_weights_typed<float>(p, c0, w, bias); break;
  }
}

template <int W, typename P>
__device__ __forceinline__ void load_weights_fixed(const P& p, int64_t d, float (&w)[W], float& bias) {
  float wb[W][1], bb[1];
  load_weights_block<W, 1>(p, d, wb, bb);
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = wb[k][0];
  bias = bb[0];
}

// Channel-first: one block per (batch, channel) row walks L in chunks of kCfThreads * N
// steps, N = kVecs * E consecutive steps per thread (kVecs 16-byte vectors). CfLoads is
// what a thread reads for one chunk, raw, so that the next chunk's loads are in flight
// while the current one is computed: its vectors (zeros past L), lane 0 the vector before
// them, and in the backward lanes 0 .. W-2 the vectors after the warp's (x and dout), whose
// first W-1 steps belong to the next warp. Positions within a row are 32-bit (use_cf_fast_path).
template <typename T, int W, bool kHasSeq, int kVecs = 1>
struct CfLoads {
  static constexpr int E = kVecElems<T>, N = E * kVecs;
  uint4 x[kVecs], g[kVecs], x_prev, x_next, g_next;
  int s[kHasSeq ? N : 1], s_prev[W - 1], s_next[W - 1];
};

// The thread's own vectors (x, and dout in the backward) and seq ids.
template <typename T, int W, bool kHasSeq, bool kBwd, int kVecs>
__device__ __forceinline__ void cf_load_own(const ConvParams& p, const T* x, const T* g, const int* seq,
                                            int t, CfLoads<T, W, kHasSeq, kVecs>& c) {
  constexpr int E = kVecElems<T>;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  const int L = static_cast<int>(p.seqlen);
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int tv = t + v * E;
    const bool in = tv < L;
    c.x[v] = in ? load_raw(x + tv) : zero;
    if (kBwd) c.g[v] = in ? load_raw(g + tv) : zero;
    if (kHasSeq) {
#pragma unroll
      for (int i = 0; i < E; i += 4) {
        const int4 q = in ? *reinterpret_cast<const int4*>(seq + tv + i) : make_int4(-1, -1, -1, -1);
        int* o = c.s + v * E + i;
        o[0] = q.x; o[1] = q.y; o[2] = q.z; o[3] = q.w;
      }
    }
  }
}

// The neighbours' vectors: lane 0 the one before, lanes 0 .. W-2 (backward) the ones after the warp's.
template <typename T, int W, bool kHasSeq, bool kBwd, int kVecs>
__device__ __forceinline__ void cf_load_neighbours(const ConvParams& p, const T* x, const T* g, const int* seq,
                                                   int t, CfLoads<T, W, kHasSeq, kVecs>& c) {
  constexpr int E = kVecElems<T>, N = E * kVecs;
  const int lane = threadIdx.x & 31;
  const int L = static_cast<int>(p.seqlen);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  if (lane == 0 && t > 0 && t < L) {
    c.x_prev = load_raw(x + t - E);
    if (kHasSeq)
#pragma unroll
      for (int j = 0; j < W - 1; ++j) c.s_prev[j] = seq[t - (W - 1) + j];
  }
  if (kBwd && lane < W - 1) {
    const int tn = t + (32 - lane) * N;  // the step after the warp's vectors
    const bool next = tn < L;           // then all E next steps exist (L % E == 0)
    c.x_next = next ? load_raw(x + tn) : zero;
    c.g_next = next ? load_raw(g + tn) : zero;
    if (kHasSeq)
#pragma unroll
      for (int j = 0; j < W - 1; ++j) c.s_next[j] = next ? seq[tn + j] : -1;
  }
}

// xv[W-1+i] = x(t+i) for i < N, xv[j] = xe(t-(W-1)+j); sq likewise for seq(.). init: the
// row's initial states (thread 0 only). Every lane must call this (shuffles).
template <typename T, int W, bool kHasSeq, int kVecs>
__device__ __forceinline__ void cf_window(const CfLoads<T, W, kHasSeq, kVecs>& c, int t, const float* init,
                                          float* xv, int* sq) {
  constexpr int E = kVecElems<T>, N = E * kVecs;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) unpack<T>(c.x[v], xv + W - 1 + v * E);
  if (kHasSeq)
#pragma unroll
    for (int i = 0; i < N; ++i) sq[W - 1 + i] = c.s[i];
#pragma unroll
  for (int j = 0; j < W - 1; ++j) {
    xv[j] = __shfl_up_sync(0xffffffffu, xv[N + j], 1);
    if (kHasSeq) sq[j] = __shfl_up_sync(0xffffffffu, sq[N + j], 1);
  }
  if ((threadIdx.x & 31) == 0) {
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
      xv[j] = t == 0 ? init[j] : unpack_one<T>(c.x_prev, E - (W - 1) + j);
      if (kHasSeq) sq[j] = t == 0 ? sq[W - 1] : c.s_prev[j];  // before x: seq(0)
    }
  }
}

}  // namespace conv1d
}  // namespace ssm_ext
