// Host emulation of the CUDA features the ssm_ext kernels use: each CTA runs as blockDim.x
// std::threads; __syncthreads is a std::barrier over the CTA, shuffles exchange through a
// per-warp buffer between two warp barriers. __shared__ variables become function statics (one
// CTA runs at a time).
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __maxnreg__(...)
#define __shared__ static
#define __restrict__
#define SSM_EXT_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(emu::dyn_smem())
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3() {} dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
typedef void* cudaStream_t;
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <class F> inline cudaError_t cudaFuncSetAttribute(F, int, int) { return 0; }
extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
namespace emu {
void* dyn_smem();
void syncthreads();
float shfl_xor(float v, int m);
void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);
}
inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) {}
inline float __shfl_xor_sync(unsigned, float v, int m) { return emu::shfl_xor(v, m); }
inline float __expf(float v) { return std::exp(v); }
inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }
