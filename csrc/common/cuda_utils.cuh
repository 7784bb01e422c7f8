// Small CUDA helpers shared by the kernels: 16-byte vector loads/stores converted to fp32.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace ssm_ext {

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVecElems = 16 / sizeof(T);

template <int kBytes>
struct VecType;
template <>
struct VecType<16> { using type = uint4; };
template <>
struct VecType<8> { using type = uint2; };
template <>
struct VecType<4> { using type = uint32_t; };

// Loads N consecutive elements (one aligned access of N * sizeof(T) bytes) as fp32.
template <typename T, int N = kVecElems<T>>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  using V = typename VecType<N * sizeof(T)>::type;
  const V raw = *reinterpret_cast<const V*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = float(e[i]);
}

template <typename T, int N = kVecElems<T>>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
  using V = typename VecType<N * sizeof(T)>::type;
  V raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < N; ++i) e[i] = T(in[i]);
  *reinterpret_cast<V*>(p) = raw;
}

// Raw 16-byte vector <-> fp32 elements, for loads issued ahead of their use.
template <typename T>
__device__ __forceinline__ uint4 load_raw(const T* p) { return *reinterpret_cast<const uint4*>(p); }

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float* out) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVecElems<T>; ++i) out[i] = float(e[i]);
}

template <typename T>
__device__ __forceinline__ float unpack_one(const uint4& raw, int i) {
  return float(reinterpret_cast<const T*>(&raw)[i]);
}

__device__ __forceinline__ float sigmoid_f(float v) { return 1.f / (1.f + __expf(-v)); }
__device__ __forceinline__ float silu_f(float v) { return v / (1.f + __expf(-v)); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace ssm_ext
