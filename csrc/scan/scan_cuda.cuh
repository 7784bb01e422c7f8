// CUDA building blocks of the first-order scan, shared by the forward and backward kernels.
//
// A tile is 128 rows (r = b*D + d) x kChunk (32) steps. Thread (lane, warp) owns a 4 x 4
// block: rows 4*lane .. 4*lane+3 and steps 4*warp .. 4*warp+3 of the tile. Each input is read
// once into registers; the recurrence inside a tile composes (P, U) pairs (h -> P*h + U)
// through shared memory, and tiles are chained along L by a decoupled look-back: each tile
// publishes its own pair, then folds the pairs of its predecessors, oldest first, onto the
// nearest predecessor that has published its outgoing state. That fold is the same sequential
// composition whatever the timing, so results are deterministic.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/TypeCast.h>
#include <cuda_runtime.h>

#include <initializer_list>
#include <type_traits>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "scan/scan.h"

namespace ssm_ext {
namespace scan {

constexpr int kRowsPerThread = 4, kStepsPerThread = 4;
constexpr int kWarps = static_cast<int>(kChunk) / kStepsPerThread;  // 8
constexpr int kThreads = kWarps * 32;
constexpr int kTileRows = 32 * kRowsPerThread;  // 128
static_assert(kThreads >= kTileRows, "one thread per tile row folds the tile's pairs");

// How a thread's 4 x 4 block is read: 4-element vectors along D (D4) or along L (L4), or one
// element at a time with any strides (Generic).
enum class Mode { D4, L4, Generic };

// Where a thread's block lies: rows (b[j], d[j]), steps t0 .. t0+3, and which exist.
struct Block {
  int64_t b[kRowsPerThread], d[kRowsPerThread];
  int64_t t0;
  bool row_ok[kRowsPerThread], step_ok[kStepsPerThread];
};

__device__ __forceinline__ Block block_of(const ScanParams& p, int64_t strip, int64_t chunk) {
  Block blk;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  blk.t0 = chunk * kChunk + warp * kStepsPerThread;
#pragma unroll
  for (int j = 0; j < kRowsPerThread; ++j) {
    const int64_t r = strip * kTileRows + lane * kRowsPerThread + j;
    blk.row_ok[j] = r < p.batch * p.dim;
    blk.b[j] = r / p.dim;
    blk.d[j] = r % p.dim;
  }
#pragma unroll
  for (int i = 0; i < kStepsPerThread; ++i) blk.step_ok[i] = blk.t0 + i < p.seqlen;
  return blk;
}

__device__ __forceinline__ int64_t offset(const View3& v, const Block& blk, int i, int j) {
  return blk.b[j] * v.sb + (blk.t0 + i) * v.sl + blk.d[j] * v.sd;
}

// e[i][j] = element (step t0+i, row j) of v as fp32, `fill` where it does not exist.
// In the vector modes a vector is wholly in or out (D % 4 == 0, resp. L % 4 == 0).
template <typename T, Mode M>
__device__ __forceinline__ void load_block(const View3& v, const Block& blk, float fill,
                                           float (&e)[kStepsPerThread][kRowsPerThread]) {
  const T* base = static_cast<const T*>(v.ptr);
  if constexpr (M == Mode::D4) {
    float vec[4];
#pragma unroll
    for (int i = 0; i < kStepsPerThread; ++i) {
      if (blk.row_ok[0] && blk.step_ok[i]) load_vec<T, 4>(base + offset(v, blk, i, 0), vec);
      else for (int j = 0; j < 4; ++j) vec[j] = fill;
#pragma unroll
      for (int j = 0; j < kRowsPerThread; ++j) e[i][j] = vec[j];
    }
  } else if constexpr (M == Mode::L4) {
    float vec[4];
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      if (blk.row_ok[j] && blk.step_ok[0]) load_vec<T, 4>(base + offset(v, blk, 0, j), vec);
      else for (int i = 0; i < 4; ++i) vec[i] = fill;
#pragma unroll
      for (int i = 0; i < kStepsPerThread; ++i) e[i][j] = vec[i];
    }
  } else {
#pragma unroll
    for (int i = 0; i < kStepsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kRowsPerThread; ++j)
        e[i][j] = blk.row_ok[j] && blk.step_ok[i] ? float(base[offset(v, blk, i, j)]) : fill;
  }
}

template <typename T, Mode M>
__device__ __forceinline__ void store_block(const View3& v, const Block& blk,
                                            const float (&e)[kStepsPerThread][kRowsPerThread]) {
  T* base = static_cast<T*>(v.ptr);
  if constexpr (M == Mode::D4) {
#pragma unroll
    for (int i = 0; i < kStepsPerThread; ++i)
      if (blk.row_ok[0] && blk.step_ok[i]) store_vec<T, 4>(base + offset(v, blk, i, 0), e[i]);
  } else if constexpr (M == Mode::L4) {
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      float vec[4];
#pragma unroll
      for (int i = 0; i < kStepsPerThread; ++i) vec[i] = e[i][j];
      if (blk.row_ok[j] && blk.step_ok[0]) store_vec<T, 4>(base + offset(v, blk, 0, j), vec);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kStepsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kRowsPerThread; ++j)
        if (blk.row_ok[j] && blk.step_ok[i]) base[offset(v, blk, i, j)] = T(e[i][j]);
  }
}

// (P, U): the map h -> P*h + U. then(first, second) is "first, then second".
__device__ __forceinline__ float2 then(float2 first, float2 second) {
  return make_float2(second.x * first.x, second.x * first.y + second.y);
}

__device__ __forceinline__ int ld_acquire(const int* p) {
  int v;
  asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release(int* p, int v) {
  asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// Global scratch of one launch. Tile k (in the order its chunk is reached along the scan
// direction: k = step * n_strips + strip) publishes agg[k] (its own pair) and/or state[k]
// (the state leaving it), then raises flags[k] to kAggregate or kInclusive.
struct LookBack {
  int* flags;     // zeroed before the launch
  int* ticket;    // zeroed before the launch; hands out tiles in order, so a tile only ever
                  // waits on tiles that are already running
  float2* agg;    // [tile][kTileRows]
  float* state;   // [tile][kTileRows]
  int64_t n_strips, n_chunks;
};
constexpr int kAggregate = 1, kInclusive = 2;

// Tile number k of this block, in scan order; the caller maps it to (strip, chunk).
__device__ __forceinline__ int64_t take_ticket(const LookBack& lb, int64_t* s_ticket) {
  if (threadIdx.x == 0) *s_ticket = atomicAdd(lb.ticket, 1);
  __syncthreads();
  return *s_ticket;
}

// Called by every thread of the block. Row thread r (< kTileRows) passes the tile's own pair
// for row r, and `edge`, the state entering the first tile of the scan for row r. Returns, in
// row thread r, the state entering this tile, after publishing the state leaving it.
__device__ __forceinline__ float chain_tiles(const LookBack& lb, int64_t k, float2 own, float edge,
                                             int64_t* s_scratch) {
  const int r = threadIdx.x;
  const int64_t step = k / lb.n_strips;  // tiles of one strip are k, k - n_strips, ...
  const int64_t base = k - step * lb.n_strips;
  if (threadIdx.x == 0) *s_scratch = step > 0 ? ld_acquire(lb.flags + k - lb.n_strips) : kInclusive;
  __syncthreads();
  if (*s_scratch != kInclusive) {  // let successors fold past this tile while it looks back
    if (r < kTileRows) lb.agg[k * kTileRows + r] = own;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) st_release(lb.flags + k, kAggregate);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t s = step - 1;
    for (; s >= 0; --s) {
      int f;
      while ((f = ld_acquire(lb.flags + s * lb.n_strips + base)) == 0) __nanosleep(20);
      if (f == kInclusive) break;
    }
    *s_scratch = s;
  }
  __syncthreads();
  const int64_t found = *s_scratch;
  float h = 0.f;
  if (r < kTileRows) {
    h = found < 0 ? edge : __ldcg(lb.state + (found * lb.n_strips + base) * kTileRows + r);
    for (int64_t s = found + 1; s < step; ++s) {
      const float2 pu = __ldcg(lb.agg + (s * lb.n_strips + base) * kTileRows + r);
      h = pu.x * h + pu.y;
    }
    lb.state[k * kTileRows + r] = own.x * h + own.y;
    __threadfence();
  }
  __syncthreads();
  if (threadIdx.x == 0) st_release(lb.flags + k, kInclusive);
  return h;
}

// Composes the per-thread pairs of a tile across warps, in scan order (warp 0 first when
// forward). In: pairs[w][r] = warp w's pair for row r. Out: pairs[w][r] = composition of the
// warps before w; returns, in row thread r, the whole tile's pair.
template <bool kForward>
__device__ __forceinline__ float2 compose_warps(float2 (*pairs)[kTileRows]) {
  __syncthreads();
  float2 acc = make_float2(1.f, 0.f);
  if (threadIdx.x < kTileRows) {
#pragma unroll
    for (int n = 0; n < kWarps; ++n) {
      const int w = kForward ? n : kWarps - 1 - n;
      const float2 own = pairs[w][threadIdx.x];
      pairs[w][threadIdx.x] = acc;
      acc = then(acc, own);
    }
  }
  __syncthreads();
  return acc;
}

// Vector modes need every view to allow 4-element aligned vectors along the mode's axis.
inline bool vec_ok(const View3& v, int elem_bytes, int64_t inner_stride, int64_t s1, int64_t s2) {
  if (!v.ptr) return true;
  return inner_stride == 1 && s1 % 4 == 0 && s2 % 4 == 0 &&
         reinterpret_cast<uintptr_t>(v.ptr) % (4 * elem_bytes) == 0;
}

struct ViewBytes {
  View3 v;
  int elem_bytes;
};

inline Mode pick_mode(const ScanParams& p, std::initializer_list<ViewBytes> views) {
  auto all = [&](bool along_d) {
    for (const ViewBytes& vb : views) {
      const View3& v = vb.v;
      // a stride of a size-1 dimension is never used
      const int64_t sb = p.batch == 1 ? 0 : v.sb, sd = p.dim == 1 ? 1 : v.sd, sl = p.seqlen == 1 ? 1 : v.sl;
      if (along_d ? !vec_ok(v, vb.elem_bytes, sd, sb, p.seqlen == 1 ? 0 : sl)
                  : !vec_ok(v, vb.elem_bytes, sl, sb, p.dim == 1 ? 0 : sd))
        return false;
    }
    return true;
  };
  if (p.dim % 4 == 0 && all(true)) return Mode::D4;
  if (p.seqlen % 4 == 0 && all(false)) return Mode::L4;
  return Mode::Generic;
}

template <typename F>
void mode_switch(Mode m, F&& f) {
  switch (m) {
    case Mode::D4: f(std::integral_constant<Mode, Mode::D4>{}); break;
    case Mode::L4: f(std::integral_constant<Mode, Mode::L4>{}); break;
    default: f(std::integral_constant<Mode, Mode::Generic>{}); break;
  }
}

// Allocates and clears the look-back scratch of one launch (on the current stream).
struct ScratchSpace {
  at::Tensor flags, data;
  LookBack lb;
  ScratchSpace(const ScanParams& p, const at::Tensor& like) {
    lb.n_strips = (p.batch * p.dim + kTileRows - 1) / kTileRows;
    lb.n_chunks = num_chunks(p.seqlen);
    const int64_t tiles = lb.n_strips * lb.n_chunks;
    TORCH_CHECK(tiles < (int64_t(1) << 31), msg("scan: batch * dim * seqlen too large (", tiles, " tiles)"));
    flags = at::empty({tiles + 1}, like.options().dtype(at::kInt));
    data = at::empty({tiles * kTileRows * 3}, like.options().dtype(at::kFloat));
    C10_CUDA_CHECK(cudaMemsetAsync(flags.data_ptr(), 0, flags.numel() * sizeof(int), c10::cuda::getCurrentCUDAStream()));
    lb.flags = flags.data_ptr<int>();
    lb.ticket = lb.flags + tiles;
    lb.agg = reinterpret_cast<float2*>(data.data_ptr<float>());
    lb.state = data.data_ptr<float>() + tiles * kTileRows * 2;
  }
  unsigned blocks() const { return static_cast<unsigned>(lb.n_strips * lb.n_chunks); }
};

// Calls f with T{} when out is T's dtype, else with float{} (the caller casts other dtypes).
template <typename T, typename F>
void dispatch_out_dtype(at::ScalarType out, F&& f) {
  if (out == c10::CppTypeToScalarType<T>::value) f(T{});
  else f(float{});
}

// The forward kernel; with p.y absent it only produces the chunk states (for the backward).
void launch_fwd(const ScanParams& p, at::ScalarType in, at::ScalarType out, const at::Tensor& like);

}  // namespace scan
}  // namespace ssm_ext
