// Tile machinery shared by the HSTU CUDA kernels (dense and block-sparse).
//
// A CTA of kWarps warps owns a tile of "row" vectors (queries in the forward and dq passes,
// keys in the dk/dv passes), 16 rows per warp, and walks tiles of "column" vectors staged
// in shared memory. Two warp-level products cover every kernel:
//   gemm_abt: acc (16 x 8NT)  += A (16 rows of a smem tile) . B (8NT rows of a smem tile)^T   over D
//   gemm_pb:  out (16 x D)    += P (16 x 8NK, in accumulator fragments) . B (8NK rows, D wide)
// For fp16 / bf16 they are ldmatrix + mma.sync.m16n8k16 (fp32 accumulate); for fp32 they are
// FFMA loops (fp32 accuracy) that give every thread the same fragment elements, so all the
// element-wise code (scores, masks, gates, stores) is shared by both paths.
//
// Shared tiles are [rows][D] with 16-byte chunks XOR-swizzled by row (ldmatrix reads 8 rows of
// one logical chunk: the swizzle puts them in 8 different bank groups). Global rows are
// staged by cp.async with zero fill: rows past the sequence and columns past the head width
// read as 0, and silu(0) = 0, so padded keys and columns add nothing.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/load.h"
#include "common/mma.cuh"
#include "hstu_bsa/hstu_bsa.h"

namespace ssm_ext {
namespace hstu_bsa {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = kWarps * 16;  // row tile of every kernel: 64

// ---------------------------------------------------------------- global operands

// One jagged (T, H * d) input as the kernels read it: element (row r, head h, column c) at
// ptr[r * st + h * hs + c], columns contiguous, 16-byte aligned rows; columns >= cols are 0.
struct Operand {
  const void* ptr = nullptr;
  int64_t st = 0, hs = 0;
  int cols = 0;
};

// Head width padded for the kernels: 32, 64 or 128.
inline int padded_dim(int64_t d) { return d <= 32 ? 32 : d <= 64 ? 64 : 128; }
constexpr int64_t kMaxDim = 128;

// x (T, H*d) as an Operand: in place when its columns are contiguous and rows 16-byte aligned,
// else a zero-padded contiguous copy (T, H*dpad) held in `keep`.
inline Operand make_operand(const at::Tensor& x, int64_t heads, int64_t d, at::Tensor& keep) {
  const int64_t e = 16 / x.element_size();
  Operand o;
  if (x.stride(1) == 1 && d % e == 0 && x.stride(0) % e == 0 && aligned16(x.data_ptr())) {
    o.ptr = x.data_ptr();
    o.st = x.stride(0);
    o.hs = d;
    o.cols = static_cast<int>(d);
    return o;
  }
  const int64_t dpad = (d + e - 1) / e * e;
  keep = at::zeros({x.size(0), heads * dpad}, x.options());
  keep.view({x.size(0), heads, dpad}).narrow(2, 0, d).copy_(x.unflatten(1, {heads, d}));
  o.ptr = keep.data_ptr();
  o.st = heads * dpad;
  o.hs = dpad;
  o.cols = static_cast<int>(dpad);
  return o;
}

inline void check_cuda_dims(const HstuParams& p) {
  TORCH_CHECK(p.dim_qk <= kMaxDim && p.dim_v <= kMaxDim,
              msg("HSTU attention on CUDA supports per-head widths up to ", kMaxDim, " (attention_dim = ",
                  p.dim_qk, ", linear_dim = ", p.dim_v, "); use the CPU for wider heads"));
}

// Calls f(T{}, std::integral_constant<int, D>{}) for q's dtype and the padded head width.
template <typename F>
void dispatch_hstu(at::ScalarType t, int dim, F&& f) {
  auto with_dim = [&](auto tv) {
    switch (dim) {
      case 32: f(tv, std::integral_constant<int, 32>{}); break;
      case 64: f(tv, std::integral_constant<int, 64>{}); break;
      default: f(tv, std::integral_constant<int, 128>{}); break;
    }
  };
  switch (t) {
    case at::kFloat: with_dim(float{}); break;
    case at::kHalf: with_dim(c10::Half{}); break;
    case at::kBFloat16: with_dim(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, msg("q must be float32, float16 or bfloat16 on CUDA, got ", t));
  }
}

// Opts the kernel in to `bytes` of dynamic shared memory, with a clear error where the device
// has less (the fp32 tiles at head widths > 64 need Hopper's 227 KB; A100 has 163 KB, Ada 99 KB).
template <typename K>
void set_smem(K kernel, size_t bytes) {
  int dev = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin),
              msg("HSTU attention CUDA kernel: needs ", bytes, " bytes of shared memory per block, this GPU allows ",
                  optin, "; use bf16 / fp16 inputs, narrower heads, or the CPU"));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

// ---------------------------------------------------------------- shared tiles

template <typename T, int D>
struct Tile {
  static constexpr int kE = 16 / sizeof(T);  // elements per 16-byte chunk
  static constexpr int kC = D / kE;          // chunks per row: 4 .. 32
  static_assert(kC >= 4, "rows of at least 64 bytes");
  __device__ __forceinline__ static int swz(int r) { return kC >= 8 ? (r & 7) : ((r >> 1) & 3); }
  // Offset (elements) of chunk c of row r, and of element k of row r.
  __device__ __forceinline__ static int off(int r, int c) { return r * D + ((c ^ swz(r)) * kE); }
  __device__ __forceinline__ static int elem(int r, int k) { return off(r, k / kE) + k % kE; }
  // Shared-window byte address of chunk c of row r of the tile at s (for ldmatrix). When s starts
  // at a multiple of kRowBytes in the shared window (every HSTU kernel lays its tiles out as whole
  // rows from a 1024-aligned dynamic shared base), then for m < kC and i >= 0
  //   addr(s, r + 8i, c ^ m) == (addr(s, r, c) ^ 16m) + 8i kRowBytes:
  // the row's start has no bits below kRowBytes (a power of two), 16 (c ^ swz(r)) < kRowBytes
  // carries the chunk, 16 ((c ^ m) ^ swz) = 16 (c ^ swz) ^ 16m, and swz(r + 8i) = swz(r).
  // So a warp product needs one address per operand, not one per k step.
  static constexpr int kRowBytes = D * static_cast<int>(sizeof(T));
  __device__ __forceinline__ static uint32_t addr(const T* s, int r, int c) { return mma::smem_u32(s + off(r, c)); }
};

// Stages rows [0, ROWS) of g (row stride st elements) into the tile s; rows >= nrows and
// columns >= cols are zero-filled. `safe` is any mapped address (for the zero-fill copies).
// NTHREADS threads (tid < NTHREADS) share the copies.
template <typename T, int D, int ROWS, int NTHREADS = kThreads>
__device__ __forceinline__ void load_tile(T* s, const T* g, int64_t st, int nrows, int cols, const void* safe,
                                          int tid) {
  using L = Tile<T, D>;
  constexpr int kTotal = ROWS * L::kC;
  if constexpr (kTotal % NTHREADS == 0 && NTHREADS % L::kC == 0) {
    // Chunk i = tid + k NTHREADS is row tid / kC + k NTHREADS / kC, column chunk tid % kC: a
    // fixed trip count and one column per thread (no remainder loop, no divisions per copy).
    // Not unrolled: the pointers advance by a step, so no per-copy addresses stay live in the
    // callers' main loops.
    constexpr int kRowStep = NTHREADS / L::kC;
    const int c = tid % L::kC;
    int r = tid / L::kC;
    const bool cok = c * L::kE < cols;
    const T* gp = g + r * st + c * L::kE;
    const int64_t gstep = kRowStep * st;
#pragma unroll 1
    for (int k = 0; k < kTotal / NTHREADS; ++k, r += kRowStep, gp += gstep) {
      const bool ok = cok && r < nrows;
      mma::cp_async16(s + L::off(r, c), ok ? static_cast<const void*>(gp) : safe, ok);
    }
  } else {
#pragma unroll 4
    for (int i = tid; i < kTotal; i += NTHREADS) {
      const int r = i / L::kC, c = i % L::kC;
      const bool ok = r < nrows && c * L::kE < cols;
      mma::cp_async16(s + L::off(r, c), ok ? static_cast<const void*>(g + r * st + c * L::kE) : safe, ok);
    }
  }
}

// ---------------------------------------------------------------- warp products

template <typename T>
constexpr bool kTensorCores = !std::is_same_v<T, float>;

// acc[j][e] += sum_k A[a0 + row(e)][k] * B[b0 + 8j + col(e)][k], k < D.
template <typename T, int D, int NT>
__device__ __forceinline__ void gemm_abt(float (&acc)[NT][4], const T* sA, int a0, const T* sB, int b0, int lane) {
  using L = Tile<T, D>;
  if constexpr (kTensorCores<T>) {
    static_assert(NT % 2 == 0, "pairs of 8-column tiles");
    // A: row a0 + (lane & 7) + 8 (mi & 1), chunk 2kk + (lane >> 4); B: row b0 + 8j + (lane & 7)
    // + 8 (mi >> 1), chunk 2kk + (mi & 1). Chunk 2kk + c = c ^ 2kk (c < 2): Tile::addr's XOR rule.
    const int mi = lane >> 3;
    const uint32_t pa = L::addr(sA, a0 + (lane & 7) + (mi & 1) * 8, lane >> 4);
    const uint32_t pb = L::addr(sB, b0 + (lane & 7) + (mi >> 1) * 8, mi & 1);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      mma::ldmatrix_x4(a, pa ^ (kk * 32));
      const uint32_t pk = pb ^ (kk * 32);
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        uint32_t b[4];
        mma::ldmatrix_x4(b, pk + j * 8 * L::kRowBytes);
        mma::mma16816<T>(acc[j], a, b[0], b[1]);
        mma::mma16816<T>(acc[j + 1], a, b[2], b[3]);
      }
    }
  } else {
    const int g = lane >> 2, q = lane & 3;
#pragma unroll 2
    for (int k = 0; k < D; k += 4) {
      const float4 x0 = *reinterpret_cast<const float4*>(sA + L::elem(a0 + g, k));
      const float4 x1 = *reinterpret_cast<const float4*>(sA + L::elem(a0 + g + 8, k));
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const float4 y0 = *reinterpret_cast<const float4*>(sB + L::elem(b0 + 8 * j + 2 * q, k));
        const float4 y1 = *reinterpret_cast<const float4*>(sB + L::elem(b0 + 8 * j + 2 * q + 1, k));
        acc[j][0] += x0.x * y0.x + x0.y * y0.y + x0.z * y0.z + x0.w * y0.w;
        acc[j][1] += x0.x * y1.x + x0.y * y1.y + x0.z * y1.z + x0.w * y1.w;
        acc[j][2] += x1.x * y0.x + x1.y * y0.y + x1.z * y0.z + x1.w * y0.w;
        acc[j][3] += x1.x * y1.x + x1.y * y1.y + x1.z * y1.z + x1.w * y1.w;
      }
    }
  }
}

// out[dt][e] += sum_kk P[row(e)][kk] * B[b0 + kk][8dt + col(e)], kk < 8NK. The fp32 path goes
// through `scratch`, this warp's 16 x 8NK floats of shared memory.
template <typename T, int D, int NK>
__device__ __forceinline__ void gemm_pb(float (&out)[D / 8][4], const float (&P)[NK][4], const T* sB, int b0,
                                        float* scratch, int lane) {
  using L = Tile<T, D>;
  if constexpr (kTensorCores<T>) {
    static_assert(NK % 2 == 0, "16-wide k steps");
    // P as A fragments first (NK / 2 k steps of 4 packed pairs: half the registers of P), then
    // per column pair dt one B address: row b0 + 16kk + (lane & 7) + 8 (mi & 1), chunk dt +
    // (mi >> 1) = (mi >> 1) ^ dt (dt even). Each out[dt] still sums its k steps in order.
    uint32_t a[NK / 2][4];
#pragma unroll
    for (int kk = 0; kk < NK / 2; ++kk) {
      a[kk][0] = mma::pack2<T>(P[2 * kk][0], P[2 * kk][1]);
      a[kk][1] = mma::pack2<T>(P[2 * kk][2], P[2 * kk][3]);
      a[kk][2] = mma::pack2<T>(P[2 * kk + 1][0], P[2 * kk + 1][1]);
      a[kk][3] = mma::pack2<T>(P[2 * kk + 1][2], P[2 * kk + 1][3]);
    }
    const int mi = lane >> 3;
    const uint32_t pb = L::addr(sB, b0 + (lane & 7) + (mi & 1) * 8, mi >> 1);
#pragma unroll
    for (int dt = 0; dt < D / 8; dt += 2) {
      const uint32_t pd = pb ^ (dt * 16);
#pragma unroll
      for (int kk = 0; kk < NK / 2; ++kk) {
        uint32_t b[4];
        mma::ldmatrix_x4_trans(b, pd + kk * 16 * L::kRowBytes);
        mma::mma16816<T>(out[dt], a[kk], b[0], b[1]);
        mma::mma16816<T>(out[dt + 1], a[kk], b[2], b[3]);
      }
    }
  } else {
    constexpr int W = 8 * NK + 4;  // padded scratch row
    const int g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int j = 0; j < NK; ++j) {
      scratch[g * W + 8 * j + 2 * q] = P[j][0];
      scratch[g * W + 8 * j + 2 * q + 1] = P[j][1];
      scratch[(g + 8) * W + 8 * j + 2 * q] = P[j][2];
      scratch[(g + 8) * W + 8 * j + 2 * q + 1] = P[j][3];
    }
    __syncwarp();
#pragma unroll 2
    for (int kk = 0; kk < 8 * NK; ++kk) {
      const float p0 = scratch[g * W + kk], p1 = scratch[(g + 8) * W + kk];
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        const float2 y = *reinterpret_cast<const float2*>(sB + L::elem(b0 + kk, 8 * dt + 2 * q));
        out[dt][0] += p0 * y.x;
        out[dt][1] += p0 * y.y;
        out[dt][2] += p1 * y.x;
        out[dt][3] += p1 * y.y;
      }
    }
    __syncwarp();
  }
}

// The same two products for MT 16-row tiles per warp (rows a0 + 16 mt): every B fragment read
// from shared memory feeds MT tensor-core ops, halving the ldmatrix traffic per MMA at MT = 2.
// The fp32 path runs the single-tile product per tile.
template <typename T, int D, int NT, int MT>
__device__ __forceinline__ void gemm_abt_mt(float (&acc)[MT][NT][4], const T* sA, int a0, const T* sB, int b0,
                                            int lane) {
  using L = Tile<T, D>;
  if constexpr (kTensorCores<T>) {
    static_assert(NT % 2 == 0, "pairs of 8-column tiles");
    const int mi = lane >> 3;  // addresses as in gemm_abt
    const uint32_t pa = L::addr(sA, a0 + (lane & 7) + (mi & 1) * 8, lane >> 4);
    const uint32_t pb = L::addr(sB, b0 + (lane & 7) + (mi >> 1) * 8, mi & 1);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4];
      const uint32_t pak = pa ^ (kk * 32), pk = pb ^ (kk * 32);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma::ldmatrix_x4(a[mt], pak + mt * 16 * L::kRowBytes);
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        uint32_t b[4];
        mma::ldmatrix_x4(b, pk + j * 8 * L::kRowBytes);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma::mma16816<T>(acc[mt][j], a[mt], b[0], b[1]);
          mma::mma16816<T>(acc[mt][j + 1], a[mt], b[2], b[3]);
        }
      }
    }
  } else {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) gemm_abt<T, D, NT>(acc[mt], sA, a0 + mt * 16, sB, b0, lane);
  }
}

template <typename T, int D, int NK, int MT>
__device__ __forceinline__ void gemm_pb_mt(float (&out)[MT][D / 8][4], const float (&P)[MT][NK][4], const T* sB,
                                           int b0, float* scratch, int lane) {
  using L = Tile<T, D>;
  if constexpr (kTensorCores<T>) {
    static_assert(NK % 2 == 0, "16-wide k steps");
    const int mi = lane >> 3;  // the B address as in gemm_pb
    const uint32_t pb = L::addr(sB, b0 + (lane & 7) + (mi & 1) * 8, mi >> 1);
#pragma unroll
    for (int kk = 0; kk < NK / 2; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = mma::pack2<T>(P[mt][2 * kk][0], P[mt][2 * kk][1]);
        a[mt][1] = mma::pack2<T>(P[mt][2 * kk][2], P[mt][2 * kk][3]);
        a[mt][2] = mma::pack2<T>(P[mt][2 * kk + 1][0], P[mt][2 * kk + 1][1]);
        a[mt][3] = mma::pack2<T>(P[mt][2 * kk + 1][2], P[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {
        uint32_t b[4];
        mma::ldmatrix_x4_trans(b, (pb ^ (dt * 16)) + kk * 16 * L::kRowBytes);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma::mma16816<T>(out[mt][dt], a[mt], b[0], b[1]);
          mma::mma16816<T>(out[mt][dt + 1], a[mt], b[2], b[3]);
        }
      }
    }
  } else {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) gemm_pb<T, D, NK>(out[mt], P[mt], sB, b0, scratch, lane);
  }
}

// Floats of fp32 scratch per warp for gemm_pb with NK column groups (0 on tensor cores).
template <typename T, int NK>
constexpr int scratch_floats() {
  return kTensorCores<T> ? 0 : 16 * (8 * NK + 4);
}

// ---------------------------------------------------------------- element-wise

// Fragment coordinates: element e of 8-column tile j of warp w's 16 rows.
__device__ __forceinline__ int frag_row(int lane, int e) { return (lane >> 2) + 8 * (e >> 1); }
__device__ __forceinline__ int frag_col(int lane, int j, int e) { return 8 * j + 2 * (lane & 3) + (e & 1); }

// mask(t, j) of sequence b; 1 when absent.
__device__ __forceinline__ float mask_at(const HstuParams& p, int64_t b, int64_t t, int64_t j) {
  if (!p.mask.ptr) return 1.f;
  const int64_t mb = p.mask_batch == 1 ? 0 : b;
  return load_as<float>(p.mask.ptr, p.mask_dtype, mb * p.mask.s0 + t * p.mask.s1 + j * p.mask.s2);
}

// Writes scale * o (16 rows of this warp, r0 = the warp's first row within the tile) to the
// head's columns of m: rows >= nrows and columns >= cols are skipped. base = element (tile row
// 0, head column 0).
template <typename T, int D>
__device__ __forceinline__ void store_frag(const float (&o)[D / 8][4], T* base, const Mat& m, int r0, int nrows,
                                           int cols, float scale, int lane) {
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = r0 + frag_row(lane, e), c = frag_col(lane, dt, e);
      if (r < nrows && c < cols) base[r * m.st + c * m.sc] = T(o[dt][e] * scale);
    }
  }
}

template <int N>
__device__ __forceinline__ void zero(float (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) a[i][0] = a[i][1] = a[i][2] = a[i][3] = 0.f;
}
template <int M, int N>
__device__ __forceinline__ void zero(float (&a)[M][N][4]) {
#pragma unroll
  for (int i = 0; i < M; ++i) zero(a[i]);
}

// ---------------------------------------------------------------- dense query-tile kernels

// The shape shared by the dense forward and dq passes: a CTA owns kQRows queries, one 16-row
// tile per warp (8 warps on the tensor cores, so each K / V tile is staged once per 128
// queries; 4 on the fp32 FFMA path, whose tiles are twice the bytes), and walks the key tiles
// 0 .. its diagonal through a kKvStages-deep cp.async ring (walk_kv_tiles).
template <typename T>
constexpr int kQWarps = kTensorCores<T> ? 8 : 4;
template <typename T>
constexpr int kQThreads = kQWarps<T> * 32;
template <typename T>
constexpr int kQRows = kQWarps<T> * 16;
// Keys per tile: 32 at d 128 on the tensor cores (the score fragments are 16 registers, so a
// warp's 64 accumulator registers of O or dQ fit within 128), else 64.
template <typename T, int D>
constexpr int kKeyTile = kTensorCores<T> && D >= 128 ? 32 : 64;
// K / V ring depth: 3 on the tensor cores, 2 on the fp32 path (its tiles are twice the bytes).
template <typename T>
constexpr int kKvStages = kTensorCores<T> ? 3 : 2;
// CTAs per SM the register budget is set for (tensor cores: 2 x 256 threads -> <= 128 registers).
template <typename T>
constexpr int kQMinCtas = kTensorCores<T> ? 2 : 1;

// Walks key tiles it = 0 .. n_kt - 1 (BN rows each; rows >= len zero-filled) of the heads at
// gK, gV (row 0 of the walk), calling body(it, K tile, V tile) with both tiles in shared
// memory. S-stage ring at sK, sV (S x BN x D each), one barrier per tile: wait for tile it,
// barrier (everyone's copies of it have landed and everyone is done with tile it - 1), then
// refill the stage of tile it - 1 - KEEP with tile it + S - 1 - KEEP. KEEP = 1 keeps tile it - 1
// resident during body(it) (the dk/dv pass's dK trails its tiles by one). Each tile is one
// commit group, empty past the last tile, so group i is always tile i and the wait count is a
// constant; copies the caller issued before (its resident tiles) ride in group 0. Every thread
// of the CTA calls this (the barriers); a warp with nothing to do on a tile just returns from body.
template <typename T, int D, int BN, int S, int NTH, int KEEP = 0, typename Body>
__device__ __forceinline__ void walk_kv_tiles(T* sK, T* sV, const Operand& K, const T* gK, const Operand& V,
                                              const T* gV, int len, int n_kt, int tid, Body&& body) {
  constexpr int P = S - 1 - KEEP;  // tiles in flight ahead of the one in use
  static_assert(P >= 1, "at least one tile in flight");
  auto load_kv = [&](int it, int st) {
    if (it < n_kt) {
      const int k0 = it * BN;
      load_tile<T, D, BN, NTH>(sK + st * BN * D, gK + k0 * K.st, K.st, len - k0, K.cols, K.ptr, tid);
      load_tile<T, D, BN, NTH>(sV + st * BN * D, gV + k0 * V.st, V.st, len - k0, V.cols, V.ptr, tid);
    }
    mma::cp_async_commit();
  };
#pragma unroll
  for (int i = 0; i < P; ++i) load_kv(i, i);
#pragma unroll 1
  for (int it = 0; it < n_kt; ++it) {
    mma::cp_async_wait<P - 1>();  // this thread's copies of tile it (and group 0's extras) have landed
    __syncthreads();
    // Stages from the counter (no second loop-carried register: the d 128 kernels have none to spare).
    const int st = static_cast<int>(static_cast<unsigned>(it) % S);
    load_kv(it + P, st >= S - P ? st + P - S : st + P);
    body(it, static_cast<const T*>(sK + st * BN * D), static_cast<const T*>(sV + st * BN * D));
  }
}

// Scale of the silu argument: x = s * silu_ha<T>(alpha). fp16 / bf16 use x = alpha s / 2 (the
// tanh form below), fp32 x = alpha s.
template <typename T>
__device__ __forceinline__ float silu_ha(float alpha) {
  return kTensorCores<T> ? 0.5f * alpha : alpha;
}

// w = silu(alpha s) / n without the mask; ha = silu_ha<T>(alpha), c = 1 / n. fp16 / bf16: with
// y = alpha s and x = y / 2, silu(y) = y (1 + tanh(y / 2)) / 2 = x (1 + tanh x): one MUFU op and
// 3 FP ops. fp32: x = y, silu(y) = x sigmoid(x).
template <typename T>
__device__ __forceinline__ float silu_w(float s, float ha, float c) {
  const float x = s * ha;
  if constexpr (kTensorCores<T>) return fmaf(x, mma::tanh_approx(x), x) * c;
  else return x * mma::sigmoid_io<T>(x) * c;
}

// dw / dP factor without the mask: alpha silu'(alpha s) / n, so that dS = dP * dsilu_w (times
// the mask). silu'(y) = sg (1 + y (1 - sg)), sg = sigmoid(y); cd = ha / n. fp16 / bf16: x = y / 2,
// t = tanh x, sg = (1 + t) / 2, y (1 - sg) = x (1 - t), so the factor is (alpha / 2n) (1 + t)
// (1 + x (1 - t)): one MUFU op and 5 FP ops. fp32: cd = alpha / n, sg by exp and a division.
template <typename T>
__device__ __forceinline__ float dsilu_w(float s, float ha, float cd) {
  const float x = s * ha;
  if constexpr (kTensorCores<T>) {
    const float t = mma::tanh_approx(x);
    return fmaf(t, cd, cd) * fmaf(x, 1.f - t, 1.f);
  } else {
    const float sg = mma::sigmoid_io<T>(x);
    return cd * sg * fmaf(x, 1.f - sg, 1.f);
  }
}

// attn_mask offsets of this thread's two fragment rows (frag_row 0 and 8) of the warp whose
// first row is r0 (columns added per element); sequence b. Rows are queries, or keys when
// KEY_ROWS (the dk/dv pass's transposed scores).
template <bool KEY_ROWS = false>
__device__ __forceinline__ void mask_rows(int64_t (&mrow)[2], const HstuParams& p, int64_t b, int r0, int lane) {
  const int64_t mb = p.mask_batch == 1 ? 0 : b, rs = KEY_ROWS ? p.mask.s2 : p.mask.s1;
  mrow[0] = mb * p.mask.s0 + int64_t(r0 + frag_row(lane, 0)) * rs;
  mrow[1] = mrow[0] + 8 * rs;
}

// The causal / length / attn_mask factor of a warp's score fragments: x[j][e] at row r0 +
// frag_row, column c0 + frag_col, i.e. query t and key kj (rows queries; KEY_ROWS: rows keys),
// becomes 0 where kj > t or t >= len (no mask load there: rows past the sequence may be past the
// mask), else x * attn_mask(t, kj) when MASK.
template <bool MASK, bool KEY_ROWS = false, int NT>
__device__ __forceinline__ void causal_mask(float (&x)[NT][4], const HstuParams& p, const int64_t (&mrow)[2], int r0,
                                            int c0, int len, int lane) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = r0 + frag_row(lane, e), c = c0 + frag_col(lane, j, e);
      const int t = KEY_ROWS ? c : r, kj = KEY_ROWS ? r : c;
      if (kj > t || t >= len) x[j][e] = 0.f;
      else if constexpr (MASK)
        x[j][e] *= load_as<float>(p.mask.ptr, p.mask_dtype, mrow[e >> 1] + (KEY_ROWS ? t * p.mask.s1 : kj * p.mask.s2));
    }
  }
}

// ---------------------------------------------------------------- block means (kbar, vbar)

// Complete blocks per sequence, as prefix sums: cblk[b] = sum_{b' < b} len_b' / block_size
// (B + 1 entries, int64, on the device; no host sync).
inline at::Tensor block_offsets(const at::Tensor& offsets, int64_t block_size) {
  const at::Tensor nb = at::floor_divide(offsets.narrow(0, 1, offsets.size(0) - 1) - offsets.narrow(0, 0, offsets.size(0) - 1),
                                         block_size);
  return at::cat({at::zeros({1}, offsets.options()), at::cumsum(nb, 0)});
}

constexpr int kMeanBlocks = 8;  // blocks per CTA of the means kernel (16 threads each)

// hi[(cblk[b] + c, h, i)] = mean over block c of sequence b of x's head h column i (fp32 sum),
// rounded to T; lo (fp16 / bf16 only, may be null) gets the rounding remainder, so hi + lo
// carries the mean to about 16 bits more. Columns i in [d, dpad) are 0.
template <typename T>
__global__ void __launch_bounds__(128) block_means_kernel(const HstuParams p, const Mat x, int64_t d,
                                                          const int64_t* cblk, T* hi, T* lo, int dpad) {
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const int64_t start = p.offsets[b];
  const int64_t nb = (p.offsets[b + 1] - start) / p.block_size;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kMeanBlocks + threadIdx.x / 16;
  if (c >= nb) return;
  const T* src = static_cast<const T*>(x.ptr);
  const int64_t row0 = start + c * p.block_size;
  const int64_t out0 = ((cblk[b] + c) * p.heads + h) * dpad;
  const float inv = 1.f / static_cast<float>(p.block_size);
  for (int i = threadIdx.x % 16; i < dpad; i += 16) {
    float s = 0.f;
    if (i < d) {
      const T* col = src + (h * d + i) * x.sc;
      for (int64_t j = 0; j < p.block_size; ++j) s += static_cast<float>(col[(row0 + j) * x.st]);
    }
    const float m = s * inv;
    const T mh = static_cast<T>(m);
    hi[out0 + i] = mh;
    if (lo) lo[out0 + i] = static_cast<T>(m - static_cast<float>(mh));
  }
}

// Means of x (T, H*d) over the complete blocks: (total blocks, H, dpad) in x's dtype (hi), and
// the remainders (lo) when want_lo and x is fp16 / bf16 (else lo stays undefined).
inline void block_means(const HstuParams& p, const at::Tensor& x, int64_t d, const at::Tensor& cblk, int dpad,
                        bool want_lo, at::Tensor& hi, at::Tensor& lo, cudaStream_t stream) {
  const int64_t rows = p.total / p.block_size + 1;
  hi = at::empty({rows, p.heads, dpad}, x.options());
  const bool with_lo = want_lo && x.scalar_type() != at::kFloat;
  if (with_lo) lo = at::empty({rows, p.heads, dpad}, x.options());
  const int64_t max_nb = p.max_len / p.block_size;
  if (max_nb == 0) return;
  TORCH_CHECK((max_nb + kMeanBlocks - 1) / kMeanBlocks <= 65535, "too many blocks per sequence for CUDA");
  Mat m;
  m.ptr = x.data_ptr();
  m.st = x.stride(0);
  m.sc = x.stride(1);
  const dim3 grid(static_cast<unsigned>(p.batch * p.heads), static_cast<unsigned>((max_nb + kMeanBlocks - 1) / kMeanBlocks));
  dispatch_io_dtype(x.scalar_type(), "x", [&](auto tv) {
    using T = decltype(tv);
    block_means_kernel<T><<<grid, 128, 0, stream>>>(p, m, d, cblk.data_ptr<int64_t>(), static_cast<T*>(hi.data_ptr()),
                                                    with_lo ? static_cast<T*>(lo.data_ptr()) : nullptr, dpad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------- block-sparse tile sets

// Key tiles (of kRows keys) a query tile needs for the selected and window branches, as a
// bitmap over the sequence's key tiles: the tiles of every valid selected block of its rows
// (keys <= t) and the window band. Bit setting is an OR, so the result is order-free.
// nq (<= kThreads) is the query tile's row count.
__device__ __forceinline__ void build_key_tiles(const HstuParams& p, int64_t start, int64_t h, int len, int q0,
                                                int nq, uint32_t* bits, int words, int tid) {
  for (int i = tid; i < words; i += kThreads) bits[i] = 0u;
  __syncthreads();
  const int last = min(len, q0 + nq) - 1;
  if (tid < nq && q0 + tid < len) {
    const int64_t t = q0 + tid;
    const int32_t* idx = static_cast<const int32_t*>(p.block_idx.ptr) + (start + t) * p.block_idx.s0 + h * p.block_idx.s1;
    for (int64_t s = 0; s < p.block_counts; ++s) {
      const int64_t c = idx[s * p.block_idx.s2];
      if (c < 0 || c * p.block_size > t) continue;
      const int64_t a = c * p.block_size / kRows, z = min((c + 1) * p.block_size - 1, t) / kRows;
      for (int64_t kt = a; kt <= z; ++kt) atomicOr(&bits[kt >> 5], 1u << (kt & 31));
    }
  }
  if (p.window_size > 0) {
    const int a = static_cast<int>(max(int64_t(0), q0 - p.window_size + 1) / kRows), z = last / kRows;
    for (int kt = a + tid; kt <= z; kt += kThreads) atomicOr(&bits[kt >> 5], 1u << (kt & 31));
  }
  __syncthreads();
}

// The first set bit at or after `from`, or -1.
__device__ __forceinline__ int next_bit(const uint32_t* bits, int words, int from) {
  int wd = from >> 5;
  if (wd >= words) return -1;
  uint32_t m = bits[wd] & (~0u << (from & 31));
  while (true) {
    if (m) return wd * 32 + __ffs(m) - 1;
    if (++wd >= words) return -1;
    m = bits[wd];
  }
}

// mult[r * kRows + (j - k0)] = how often query row t = t0 + r lists the block of key j
// (k0 <= j < k0 + kRows, j <= t), for rows r < nrows (one thread per row). Rows past the
// sequence get 0.
// M = uint16_t, or uint8_t when block_counts <= 255 (a count never exceeds block_counts).
template <typename M>
__device__ __forceinline__ void build_mult(const HstuParams& p, int64_t start, int64_t h, int len, int t0, int k0,
                                           int nrows, M* mult, int tid) {
  if (tid >= nrows) return;
  M* row = mult + tid * kRows;
  for (int i = 0; i < kRows; ++i) row[i] = 0;
  const int64_t t = t0 + tid;
  if (t >= len) return;
  const int32_t* idx = static_cast<const int32_t*>(p.block_idx.ptr) + (start + t) * p.block_idx.s0 + h * p.block_idx.s1;
  const int64_t kz = min(t, int64_t(k0 + kRows - 1));
  for (int64_t s = 0; s < p.block_counts; ++s) {
    const int64_t c = idx[s * p.block_idx.s2];
    if (c < 0) continue;
    const int64_t a = max(c * p.block_size, int64_t(k0)), z = min((c + 1) * p.block_size - 1, kz);
    for (int64_t j = a; j <= z; ++j) ++row[j - k0];
  }
}

__device__ __forceinline__ float gate_at(const HstuParams& p, const Mat3& g, int64_t row, int64_t h, int br) {
  return load_as<float>(g.ptr, p.gates_dtype, row * g.s0 + h * g.s1 + br * g.s2);
}

}  // namespace hstu_bsa
}  // namespace ssm_ext
