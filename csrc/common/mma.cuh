// Warp-level tensor-core and async-copy primitives for sm_80+ (used on sm_90 as well):
// cp.async 16-byte copies with zero fill, ldmatrix (plain and transposed) and
// mma.sync.m16n8k16 with fp32 accumulation for fp16 / bf16 operands.
//
// Fragment layout of m16n8k16 (g = lane / 4, q = lane % 4), which the callers rely on:
//   C / D (16 x 8, fp32): c0, c1 = (row g,     cols 2q, 2q+1); c2, c3 = (row g + 8, cols 2q, 2q+1)
//   A (16 x 16): a0a1 = (g, k 2q..), a2a3 = (g+8, k 2q..), a4a5 = (g, k 2q+8..), a6a7 = (g+8, k 2q+8..)
//   B (16 x 8):  b0b1 = (k 2q.., n g), b2b3 = (k 2q+8.., n g)
// so the C fragments of two adjacent 8-column tiles are exactly the A fragment of a 16-wide k step.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace ssm_ext {
namespace mma {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; when !valid the 16 bytes are zero-filled and
// nothing is read (src must still be a mapped address: pass the tensor's base).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(src_size)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ldmatrix from a shared-window byte address (smem_u32 of a tile, possibly offset by the caller).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t saddr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(saddr));
}

// c += a * b, m16n8k16, fp32 accumulate; T is c10::BFloat16 or c10::Half.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, c10::Half>, "mma16816: fp16 or bf16 operands");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats as a packed pair of T (lo in the low half: the lower column / k index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
}

// One MUFU op: tanh.approx.f32 (max relative error about 2^-11).
__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// sigmoid(x) at the precision an io dtype T needs. fp32: exp (ex2.approx, ~2^-22) and a division;
// fp16 / bf16: one tanh.approx, sigmoid = (1 + tanh(x / 2)) / 2 (about 2^-11, below their rounding).
template <typename T>
__device__ __forceinline__ float sigmoid_io(float x) {
  if constexpr (std::is_same_v<T, float>) return 1.f / (1.f + __expf(-x));
  else return fmaf(0.5f, tanh_approx(0.5f * x), 0.5f);
}

}  // namespace mma
}  // namespace ssm_ext
