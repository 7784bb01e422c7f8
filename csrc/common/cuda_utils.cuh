// Small CUDA helpers shared by the kernels: 16-byte vector loads/stores converted to fp32.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <type_traits>

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

// The elements of T in a raw word or vector (sizeof(Raw) / sizeof(T) of them) as fp32. bf16: the
// bits shifted into place, two instructions per pair where the generic conversion takes three.
template <typename T, typename Raw>
__device__ __forceinline__ void unpack(const Raw& raw, float* out) {
  constexpr int n = int(sizeof(Raw) / sizeof(T));
  if constexpr (std::is_same_v<T, c10::BFloat16> && n % 2 == 0) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(&raw);
#pragma unroll
    for (int i = 0; i < n / 2; ++i) {
      out[2 * i] = __uint_as_float(w[i] << 16);
      out[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
  } else {
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < n; ++i) out[i] = float(e[i]);
  }
}

// Loads N consecutive elements (one aligned access of N * sizeof(T) bytes) as fp32.
template <typename T, int N = kVecElems<T>>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  using V = typename VecType<N * sizeof(T)>::type;
  unpack<T>(*reinterpret_cast<const V*>(p), out);
}

// Stores N fp32 values as N consecutive elements (one aligned access); 16-bit pairs by one
// packing conversion each (the same round-to-nearest as two single conversions).
template <typename T, int N = kVecElems<T>>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
  using V = typename VecType<N * sizeof(T)>::type;
  V raw;
  if constexpr (std::is_same_v<T, c10::BFloat16> && N % 2 == 0) {
    __nv_bfloat162* e = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < N / 2; ++i) e[i] = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
  } else if constexpr (std::is_same_v<T, c10::Half> && N % 2 == 0) {
    __half2* e = reinterpret_cast<__half2*>(&raw);
#pragma unroll
    for (int i = 0; i < N / 2; ++i) e[i] = __floats2half2_rn(in[2 * i], in[2 * i + 1]);
  } else {
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = T(in[i]);
  }
  *reinterpret_cast<V*>(p) = raw;
}

// Raw 16-byte vector, for loads issued ahead of their use (unpack converts it).
template <typename T>
__device__ __forceinline__ uint4 load_raw(const T* p) { return *reinterpret_cast<const uint4*>(p); }

template <typename T>
__device__ __forceinline__ float unpack_one(const uint4& raw, int i) {
  return float(reinterpret_cast<const T*>(&raw)[i]);
}

__device__ __forceinline__ float sigmoid_f(float v) { return 1.f / (1.f + __expf(-v)); }
__device__ __forceinline__ float silu_f(float v) { return v / (1.f + __expf(-v)); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace ssm_ext
