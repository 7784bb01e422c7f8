// Host emulation of the CUDA features the ssm_ext kernels use: each CTA runs as blockDim.x
// std::threads; __syncthreads is a std::barrier over the CTA, shuffles exchange through a
// per-warp buffer between two warp barriers. __shared__ variables become function statics (one
// CTA runs at a time). cp.async copies are queued per thread and done at the wait_group that
// completes them; relaxed global loads/stores are std::atomic_ref relaxed accesses.
#pragma once
#include <atomic>
#include <barrier>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __maxnreg__(...)
#define __shared__ static
#define __restrict__
#define __align__(n) alignas(n)
#define SSM_EXT_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(emu::dyn_smem())
struct dim3 { unsigned x = 1, y = 1, z = 1; dim3() {} dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
typedef void* cudaStream_t;
typedef int cudaError_t;
enum { cudaSuccess = 0, cudaFuncAttributeMaxDynamicSharedMemorySize = 8, cudaDevAttrMultiProcessorCount = 16,
       cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
namespace emu {
void* dyn_smem();
// Shared-window addresses (offsets from the 1024-aligned dynamic shared memory) and the warp
// collectives on them: ldmatrix.x4 (.trans), mma.sync m16n8k16 (fp16 / bf16, fp32 accumulate).
uint32_t smem_u32(const void* p);
void ldmatrix(uint32_t* r, uint32_t addr, bool trans);
void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1, bool bf16);
uint32_t pack2(float lo, float hi, bool bf16);
void syncthreads();
void syncwarp();
float shfl_xor(float v, int m);
void launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);
// The device the launchers see: emu::sms() SMs (default 1) with room for one CTA each, so
// persistent-CTA launchers start sms() CTAs, run one after another (tile look-backs must only
// wait on CTAs started before). smem_optin: the largest dynamic shared memory a launch may use.
int sms();
extern size_t smem_optin;
// cp.async: a 16-byte copy (zero fill when !valid) queued on the calling thread, done when a
// wait_group completes its group; copies still queued when a thread ends are an error.
void cp_async16(void* smem, const void* gmem, bool valid);
void cp_async_commit();
void cp_async_wait(int n);
// A look-back spin (__nanosleep): aborts after too many (a tile waiting on a CTA that never runs).
void spin();
// Look-back emulation (scan_cuda.cuh): hide_states() 0: states read as stored; 1: a state
// whose tile has published its pair reads as not yet published, so chain_tiles walks back to
// the strip's first tile; 2: the same for a fixed pseudo-random half of those slots. With
// hide_states() != 0 peek_state reads nothing, so every tile takes the walk.
int hide_states();
uint32_t lookback_state(uint32_t st, const uint64_t* agg);
template <class T> inline T ld_relaxed(const T* p) { return std::atomic_ref<T>(*const_cast<T*>(p)).load(std::memory_order_relaxed); }
template <class T> inline void st_relaxed(T* p, T v) { std::atomic_ref<T>(*p).store(v, std::memory_order_relaxed); }
template <class T> inline T ld_acquire(const T* p) { return std::atomic_ref<T>(*const_cast<T*>(p)).load(std::memory_order_acquire); }
template <class T> inline void st_release(T* p, T v) { std::atomic_ref<T>(*p).store(v, std::memory_order_release); }
[[noreturn]] void unsupported(const char* what);
}
template <class F> inline cudaError_t cudaFuncSetAttribute(F, int attr, int v) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) emu::smem_optin = size_t(v);
  return 0;
}
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return 0; }
inline cudaError_t cudaDeviceGetAttribute(int* v, int attr, int) {
  if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *v = 227 * 1024;  // the H100's
  else if (attr == cudaDevAttrMultiProcessorCount) *v = emu::sms();
  else emu::unsupported("cudaDeviceGetAttribute: attribute");
  return 0;
}
template <class F> inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int, size_t) { *n = 1; return 0; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) { std::memset(p, v, n); return 0; }
inline unsigned __float_as_uint(float v) { return std::bit_cast<unsigned>(v); }
inline float __uint_as_float(unsigned v) { return std::bit_cast<float>(v); }
inline void __nanosleep(unsigned) { emu::spin(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::syncwarp(); }  // full warps only
inline float __shfl_xor_sync(unsigned, float v, int m) { return emu::shfl_xor(v, m); }
// CUDA's integer min / max overloads (mixed operands as the usual conversions give them).
template <class A, class B> inline std::common_type_t<A, B> min(A a, B b) { return a < b ? a : b; }
template <class A, class B> inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }
inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }
inline int __ffs(int v) { return v ? std::countr_zero(unsigned(v)) + 1 : 0; }
inline float __expf(float v) { return std::exp(v); }
inline float rsqrtf(float v) { return 1.f / std::sqrt(v); }
