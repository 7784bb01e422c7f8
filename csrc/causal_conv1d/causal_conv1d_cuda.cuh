// Pieces shared by the conv1d forward and backward CUDA kernels: launch shapes, fast-path
// conditions, compile-time switches and the window loads.
#pragma once
#include <initializer_list>
#include <type_traits>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/causal_conv1d_math.h"
#include "common/cuda_utils.cuh"

namespace ssm_ext {
namespace conv1d {

constexpr int kCfThreads = 128;      // channel-first: threads per block (one row segment)
constexpr int kClThreads = 128;      // channel-last forward: threads per block along D
constexpr int kClSteps = 64;         // channel-last forward: time steps per thread
constexpr int kClBwdThreads = 64;    // channel-last backward
constexpr int kClBwdSteps = 256;     // fewer, longer tiles: fewer dweight partials to sum
constexpr int kClBwdElems = 4;       // channels per thread: 8 would need ~255 registers
constexpr int kCfVecs = 2;           // channel-first: 16-byte vectors per thread

template <typename F>
void width_switch(int64_t w, F&& f) {
  switch (w) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;  // callers only pass 2..4
  }
}

template <typename F>
void bool_switch(bool v, F&& f) {
  if (v) f(std::true_type{});
  else f(std::false_type{});
}

template <typename F>
void dispatch_io_dtype(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, name, ": x must be float32, float16 or bfloat16 on CUDA, got ", t);
  }
}

// Vectorised paths need 16-byte aligned rows: the fallback handles everything else.
template <typename T>
bool use_cf_fast_path(const ConvParams& p, std::initializer_list<View3> views) {
  constexpr int E = kVecElems<T>;
  if (p.channel_last || p.width > 4 || p.seqlen % E != 0) return false;
  if (ceil_div(p.seqlen, int64_t(kCfThreads) * E * kCfVecs) > 65535) return false;
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

template <int W>
__device__ __forceinline__ void load_weights_fixed(const ConvParams& p, int64_t d, float (&w)[W], float& bias) {
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = load_as<float>(p.weight, p.weight_dtype, d * p.weight_sd + k * p.weight_sw);
  bias = p.bias == nullptr ? 0.f : load_as<float>(p.bias, p.bias_dtype, d * p.bias_sd);
}

// Channel-first window of one thread: xv[W-1+i] = x(t0+i) for its N = kVecs*E own steps,
// xv[j] (j < W-1) = xe(t0-(W-1)+j) from the previous lane (lane 0 reads memory or the
// initial states). sq likewise holds seq(.) when kHasSeq. Every lane must call this.
template <typename T, int W, int kVecs, bool kHasSeq>
__device__ __forceinline__ void load_cf_window(const ConvParams& p, const T* x, int64_t b, int64_t d,
                                               int64_t t0, bool active, float* xv, int* sq) {
  constexpr int E = kVecElems<T>, N = E * kVecs;
#pragma unroll
  for (int i = 0; i < N; ++i) xv[W - 1 + i] = 0.f;
  if (active) {
#pragma unroll
    for (int v = 0; v < kVecs; ++v) load_vec(x + t0 + v * E, xv + W - 1 + v * E);
  }
  if (kHasSeq) {
    const int* s = p.seq_idx + b * p.seqlen + t0;
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const int4 q = active ? *reinterpret_cast<const int4*>(s + i) : make_int4(-1, -1, -1, -1);
      sq[W - 1 + i] = q.x; sq[W + i] = q.y; sq[W + 1 + i] = q.z; sq[W + 2 + i] = q.w;
    }
  }
#pragma unroll
  for (int j = 0; j < W - 1; ++j) {
    xv[j] = __shfl_up_sync(0xffffffffu, xv[N + j], 1);
    if (kHasSeq) sq[j] = __shfl_up_sync(0xffffffffu, sq[N + j], 1);
  }
  if ((threadIdx.x & 31) == 0 && active) {
    if (t0 > 0) {
      float prev[E];
      load_vec(x + t0 - E, prev);
#pragma unroll
      for (int j = 0; j < W - 1; ++j) {
        xv[j] = prev[E - (W - 1) + j];
        if (kHasSeq) sq[j] = p.seq_idx[b * p.seqlen + t0 - (W - 1) + j];
      }
    } else {
#pragma unroll
      for (int j = 0; j < W - 1; ++j) {
        xv[j] = state_at<T, float>(p.initial_states, b, d, j);
        if (kHasSeq) sq[j] = sq[W - 1];
      }
    }
  }
}

// Channel-last: the W-1 inputs before t0 for channels [c0, c0+E).
template <typename T, int W, bool kHasSeq, int E>
__device__ __forceinline__ void load_cl_halo(const ConvParams& p, int64_t b, int64_t c0, int64_t t0,
                                             float (&win)[W][E], int (&swin)[W]) {
#pragma unroll
  for (int j = 0; j < W - 1; ++j) {
    const int64_t t = t0 - (W - 1) + j;
    if (t >= 0) {
      load_vec<T, E>(static_cast<const T*>(p.x.ptr) + b * p.x.sb + t * p.x.sl + c0, win[j]);
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) win[j][i] = state_at<T, float>(p.initial_states, b, c0 + i, W - 1 + t);
    }
    swin[j] = kHasSeq ? seq_at(p, b, t) : 0;
  }
  swin[W - 1] = 0;
}

template <int W, int E>
__device__ __forceinline__ void shift_window(float (&win)[W][E], int (&swin)[W]) {
#pragma unroll
  for (int k = 0; k < W - 1; ++k) {
#pragma unroll
    for (int i = 0; i < E; ++i) win[k][i] = win[k + 1][i];
    swin[k] = swin[k + 1];
  }
}

}  // namespace conv1d
}  // namespace ssm_ext
