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

constexpr int kStepsPerThread = 4;
constexpr int kWarps = static_cast<int>(kChunk) / kStepsPerThread;  // 8
constexpr int kThreads = kWarps * 32;

// A thread owns R rows x 4 steps, a tile 32*R rows x kChunk steps. The forward takes 16 bytes
// of rows (4 fp32 or 8 fp16/bf16 rows); the backward, holding more per element, 4 rows.
template <typename T>
constexpr int kFwdRows = 16 / int(sizeof(T));
constexpr int kBwdRows = 4;

// How a thread's block is read: 16-byte vectors along D (D4), 4-step vectors along L (L4),
// or one element at a time with any strides (Generic).
enum class Mode { D4, L4, Generic };

// A thread's block of one input (R rows x 4 steps of T), as loaded; element (step i, row j)
// is element idx<M, R>(i, j) of it viewed as T[].
template <typename T, int R>
struct Raw {
  static constexpr int kBytes = kStepsPerThread * R * int(sizeof(T));
  uint4 v[(kBytes + 15) / 16];
};

template <Mode M, int R>
__device__ __forceinline__ constexpr int idx(int i, int j) {
  return M == Mode::L4 ? j * kStepsPerThread + i : i * R + j;
}

template <Mode M, typename T, int R>
__device__ __forceinline__ float get(const Raw<T, R>& r, int i, int j) {
  return float(reinterpret_cast<const T*>(r.v)[idx<M, R>(i, j)]);
}

// u = b*x of element (i, j) (b absent means 1).
template <Mode M, typename T, int R>
__device__ __forceinline__ float bx(const Raw<T, R>& x, const Raw<T, R>& b, bool has_b, int i, int j) {
  return has_b ? get<M>(x, i, j) * get<M>(b, i, j) : get<M>(x, i, j);
}

// Where a thread's block lies: its step group sg (steps t0 .. t0+3 of the tile, t0 = 4*sg) and
// row group rg (rows r0 .. r0+R-1, r = b*D + d), and which of them exist. D4/Generic: a warp
// is a step group, its lanes the row groups. L4: 8 lanes cover a row's 32 steps, so a warp
// reads 4 whole 128-byte row segments per vector.
struct Block {
  int sg, rg;
  uint32_t r0, n_rows;  // row r0 + j exists iff j < n_rows
  int64_t t0;
  int n_steps;          // steps t0 .. t0 + n_steps - 1 exist
};

template <int R, Mode M>
__device__ __forceinline__ Block block_of(const ScanParams& p, int64_t strip, int64_t chunk) {
  Block blk;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  blk.sg = M == Mode::L4 ? lane % kWarps : warp;
  blk.rg = M == Mode::L4 ? warp * (32 / kWarps) + lane / kWarps : lane;
  const int64_t r0 = strip * 32 * R + blk.rg * R;
  const int64_t rows = p.batch * p.dim;
  blk.r0 = static_cast<uint32_t>(r0);
  blk.n_rows = static_cast<uint32_t>(r0 >= rows ? 0 : (rows - r0 < R ? rows - r0 : R));
  blk.t0 = chunk * kChunk + blk.sg * kStepsPerThread;
  const int64_t left = p.seqlen - blk.t0;
  blk.n_steps = left <= 0 ? 0 : (left < kStepsPerThread ? int(left) : kStepsPerThread);
  return blk;
}

// Offset of element (row r, step t) in v; 32-bit row arithmetic (checked on the host).
__device__ __forceinline__ int64_t offset(const View3& v, uint32_t r, uint32_t dim, int64_t t) {
  return int64_t(r / dim) * v.sb + int64_t(r % dim) * v.sd + t * v.sl;
}

template <typename T, int R>
__device__ __forceinline__ void fill_raw(Raw<T, R>& raw, float fill) {
  T* e = reinterpret_cast<T*>(raw.v);
#pragma unroll
  for (int n = 0; n < kStepsPerThread * R; ++n) e[n] = T(fill);
}

// Loads a thread's block of v; elements that do not exist read as `fill`. In the vector modes
// a vector is wholly in or out (D % kRows == 0, resp. L % 4 == 0).
template <typename T, Mode M, int R>
__device__ __forceinline__ void load_block(const View3& v, const Block& blk, uint32_t dim, float fill, Raw<T, R>& raw) {
  const T* base = static_cast<const T*>(v.ptr);
  fill_raw(raw, fill);
  if constexpr (M == Mode::D4) {
    if (blk.n_rows == 0) return;
    using V = typename VecType<R * sizeof(T)>::type;
    const int64_t o = offset(v, blk.r0, dim, blk.t0);
#pragma unroll
    for (int i = 0; i < kStepsPerThread; ++i)
      if (i < blk.n_steps) reinterpret_cast<V*>(raw.v)[i] = *reinterpret_cast<const V*>(base + o + i * v.sl);
  } else if constexpr (M == Mode::L4) {
    if (blk.n_steps == 0) return;
    using V = typename VecType<kStepsPerThread * sizeof(T)>::type;
#pragma unroll
    for (int j = 0; j < R; ++j)
      if (j < blk.n_rows) reinterpret_cast<V*>(raw.v)[j] = *reinterpret_cast<const V*>(base + offset(v, blk.r0 + j, dim, blk.t0));
  } else {
    T* e = reinterpret_cast<T*>(raw.v);
#pragma unroll
    for (int j = 0; j < R; ++j)
#pragma unroll
      for (int i = 0; i < kStepsPerThread; ++i)
        if (j < blk.n_rows && i < blk.n_steps) e[idx<M, R>(i, j)] = base[offset(v, blk.r0 + j, dim, blk.t0 + i)];
  }
}

// Stores e[i][j] (step i, row j) into v as Y, where the element exists.
template <typename Y, Mode M, int R>
__device__ __forceinline__ void store_block(const View3& v, const Block& blk, uint32_t dim,
                                            const float (&e)[kStepsPerThread][R]) {
  Y* base = static_cast<Y*>(v.ptr);
  if constexpr (M == Mode::D4) {
    if (blk.n_rows == 0) return;
    constexpr int kPiece = 16 / sizeof(Y);  // elements per 16-byte store
    const int64_t o = offset(v, blk.r0, dim, blk.t0);
#pragma unroll
    for (int i = 0; i < kStepsPerThread; ++i)
      if (i < blk.n_steps)
#pragma unroll
        for (int j = 0; j < R; j += kPiece) store_vec<Y, (kPiece < R ? kPiece : R)>(base + o + i * v.sl + j, &e[i][j]);
  } else if constexpr (M == Mode::L4) {
    if (blk.n_steps == 0) return;
#pragma unroll
    for (int j = 0; j < R; ++j) {
      float col[kStepsPerThread];
#pragma unroll
      for (int i = 0; i < kStepsPerThread; ++i) col[i] = e[i][j];
      if (j < blk.n_rows) store_vec<Y, kStepsPerThread>(base + offset(v, blk.r0 + j, dim, blk.t0), col);
    }
  } else {
#pragma unroll
    for (int j = 0; j < R; ++j)
#pragma unroll
      for (int i = 0; i < kStepsPerThread; ++i)
        if (j < blk.n_rows && i < blk.n_steps) base[offset(v, blk.r0 + j, dim, blk.t0 + i)] = Y(e[i][j]);
  }
}

// (P, U): the map h -> P*h + U. then(first, second) is "first, then second".
__device__ __forceinline__ float2 then(float2 first, float2 second) {
  return make_float2(second.x * first.x, second.x * first.y + second.y);
}

// Look-back slots hold this bit pattern until published; a published value with these bits
// (one particular NaN) is stored as the canonical NaN instead, so it can never read as empty.
constexpr uint32_t kEmpty = 0xFFFFFFFFu;

__device__ __forceinline__ uint32_t publishable(float v) {
  const uint32_t u = __float_as_uint(v);
  return u == kEmpty ? 0x7FFFFFFFu : u;
}

__device__ __forceinline__ uint32_t ld_relaxed32(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ uint64_t ld_relaxed64(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_relaxed32(uint32_t* p, uint32_t v) {
  asm volatile("st.relaxed.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void st_relaxed64(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Global scratch of one launch, all kEmpty before it. Tile k (blocks run in scan order,
// k = step * n_strips + strip) publishes, per row, agg[k] = its own pair (one 64-bit word) and
// then state[k] = the state leaving it. Each word is its own ready flag: no fences needed.
struct LookBack {
  uint64_t* agg;    // [tile][tile rows] (P, U) bits
  uint32_t* state;  // [tile][tile rows] float bits
  int64_t n_strips, n_chunks;
  int tile_rows;
};

// The state leaving tile k's predecessor in the same strip, if published yet (kEmpty if not or
// if k is a strip's first tile); read ahead, it spares chain_tiles its walk.
__device__ __forceinline__ uint32_t peek_state(const LookBack& lb, int64_t k) {
  return k < lb.n_strips ? kEmpty : ld_relaxed32(lb.state + (k - lb.n_strips) * lb.tile_rows + threadIdx.x);
}

// Row thread r (< tile rows) passes its row's pair for this tile and `edge`, the state
// entering the first tile of the scan; gets the state entering this tile, after publishing
// the state leaving it. `ahead`: peek_state(k) read earlier. Blocks start in index order, so
// every tile waited on is running.
__device__ __forceinline__ float chain_tiles(const LookBack& lb, int64_t k, float2 own, float edge,
                                             uint32_t ahead = kEmpty) {
  const int64_t step = k / lb.n_strips;  // tiles of one strip are k, k - n_strips, ...
  const int64_t stride = lb.n_strips * lb.tile_rows, me = k * lb.tile_rows + threadIdx.x;
  if (step == 0) {
    st_relaxed32(lb.state + me, publishable(own.x * edge + own.y));
    return edge;
  }
  if (ahead != kEmpty) {  // nothing to publish but the state: no tile waits on this one's pair
    const float h = __uint_as_float(ahead);
    st_relaxed32(lb.state + me, publishable(own.x * h + own.y));
    return h;
  }
  st_relaxed64(lb.agg + me, uint64_t(publishable(own.x)) | (uint64_t(publishable(own.y)) << 32));
  // Walk back, kBatch tiles per round trip, to the nearest tile that has published its state;
  // every tile passed on the way must have published its pair. Then fold forward from it: the
  // pairs of the last round from registers, those of earlier rounds read again.
  constexpr int kBatch = 8;  // tiles read per round trip of the walk
  // The walk sits on the critical path of every tile that has no state ahead (the CTA's other
  // warps wait for it at a barrier), so its batch is kept short: running pointers, no 64-bit
  // index arithmetic per load, and one bit mask for the search.
  int64_t s = step - 1;  // the nearest tile not passed yet; `state` and `agg` point at its slots
  const uint32_t* state = lb.state + me - stride;
  const uint64_t* agg = lb.agg + me - stride;
  float h = 0.f;
  for (bool found = false; !found;) {
    uint32_t st[kBatch];
    uint64_t pu[kBatch];
    const int n = s + 1 < kBatch ? int(s + 1) : kBatch;  // tiles s, s - 1, ... that exist
    const uint32_t* sq = state;
    const uint64_t* aq = agg;
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      st[q] = q < n ? ld_relaxed32(sq) : kEmpty;
      pu[q] = q < n ? ld_relaxed64(aq) : 0;
      sq -= stride;
      aq -= stride;
    }
    unsigned stops = 0;  // bit i: tile s - i has its state, or not even its pair
#pragma unroll
    for (int i = 0; i < kBatch; ++i) stops |= unsigned(st[i] != kEmpty || uint32_t(pu[i]) == kEmpty) << i;
    const int q = stops ? __ffs(int(stops)) - 1 : kBatch;
    uint32_t at_q = kEmpty;
#pragma unroll
    for (int i = 0; i < kBatch; ++i)  // unrolled, not st[q], so st and pu stay in registers
      if (i == q) at_q = st[i];
    found = at_q != kEmpty;
    if (found) {
      h = __uint_as_float(at_q);
#pragma unroll
      for (int i = kBatch - 1; i >= 0; --i)
        if (i < q) h = __uint_as_float(uint32_t(pu[i])) * h + __uint_as_float(uint32_t(pu[i] >> 32));
    } else {
      s -= q;  // tile s - q (if q < kBatch) has published nothing yet; step 0 always publishes its state
      state -= q * stride;
      agg -= q * stride;
      if (q < kBatch) __nanosleep(32);
    }
  }
  for (++s; s < step; ++s) {  // tiles passed in earlier rounds
    agg += stride;
    const uint64_t pu = ld_relaxed64(agg);
    h = __uint_as_float(uint32_t(pu)) * h + __uint_as_float(uint32_t(pu >> 32));
  }
  st_relaxed32(lb.state + me, publishable(own.x * h + own.y));
  return h;
}

// Each row's pair for the thread's steps (h -> a*h + b*x, in step order) into pairs[sg][row].
// The forward and the backward's recompute both go through it, so they compute the same h.
template <Mode M, typename T, int R, int kTileRows>
__device__ __forceinline__ void step_pairs(const Raw<T, R>& a, const Raw<T, R>& x, const Raw<T, R>& b, bool has_b,
                                           const Block& blk, float2 (*pairs)[kTileRows]) {
#pragma unroll
  for (int j = 0; j < R; ++j) {
    float2 pu = make_float2(1.f, 0.f);
#pragma unroll
    for (int i = 0; i < kStepsPerThread; ++i) {
      const float av = get<M>(a, i, j);
      pu = make_float2(av * pu.x, av * pu.y + bx<M>(x, b, has_b, i, j));
    }
    pairs[blk.sg][blk.rg * R + j] = pu;
  }
}

// Composes the per-thread pairs of a tile across warps, in scan order (warp 0 first when
// forward). In: pairs[w][r] = warp w's pair for row r. Out: pairs[w][r] = composition of the
// warps before w; returns, in row thread r, the whole tile's pair.
template <bool kForward, int kTileRows>
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

// Vector modes need every view to allow aligned vectors of n elements along the mode's axis.
inline bool vec_ok(const View3& v, int elem_bytes, int n, int64_t inner_stride, int64_t s1, int64_t s2) {
  if (!v.ptr) return true;
  return inner_stride == 1 && s1 % n == 0 && s2 % n == 0 &&
         reinterpret_cast<uintptr_t>(v.ptr) % (n * elem_bytes) == 0;
}

struct ViewBytes {
  View3 v;
  int elem_bytes;
};

// rows_per_vec: the rows of a thread (R), one vector along D in the D4 mode.
inline Mode pick_mode(const ScanParams& p, int rows_per_vec, std::initializer_list<ViewBytes> views) {
  auto all = [&](bool along_d) {
    for (const ViewBytes& vb : views) {
      const View3& v = vb.v;
      // a stride of a size-1 dimension is never used
      const int64_t sb = p.batch == 1 ? 0 : v.sb, sd = p.dim == 1 ? 1 : v.sd, sl = p.seqlen == 1 ? 1 : v.sl;
      if (along_d ? !vec_ok(v, vb.elem_bytes, rows_per_vec, sd, sb, p.seqlen == 1 ? 0 : sl)
                  : !vec_ok(v, vb.elem_bytes, kStepsPerThread, sl, sb, p.dim == 1 ? 0 : sd))
        return false;
    }
    return true;
  };
  if (p.dim % rows_per_vec == 0 && all(true)) return Mode::D4;
  if (p.seqlen % kStepsPerThread == 0 && all(false)) return Mode::L4;
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

// Allocates the look-back scratch of one launch, filled with kEmpty (on the current stream):
// n_strips strips of tile_rows rows, each cut into n_chunks tiles along L.
struct ScratchSpace {
  at::Tensor data;
  LookBack lb;
  ScratchSpace(int64_t n_strips, int64_t n_chunks, int tile_rows, const at::Tensor& like) {
    lb.tile_rows = tile_rows;
    lb.n_strips = n_strips;
    lb.n_chunks = n_chunks;
    const int64_t slots = n_strips * n_chunks * tile_rows;
    data = at::empty({slots * 3}, like.options().dtype(at::kInt));
    C10_CUDA_CHECK(cudaMemsetAsync(data.data_ptr(), 0xFF, data.numel() * 4, c10::cuda::getCurrentCUDAStream()));
    lb.agg = reinterpret_cast<uint64_t*>(data.data_ptr<int>());
    lb.state = reinterpret_cast<uint32_t*>(data.data_ptr<int>() + slots * 2);
  }
  // The tiles of kChunk steps over rows r = b*D + d.
  ScratchSpace(const ScanParams& p, int tile_rows, const at::Tensor& like)
      : ScratchSpace((check_rows(p), (p.batch * p.dim + tile_rows - 1) / tile_rows), num_chunks(p.seqlen), tile_rows,
                     like) {}
  unsigned blocks() const { return static_cast<unsigned>(lb.n_strips * lb.n_chunks); }

 private:
  static void check_rows(const ScanParams& p) {
    TORCH_CHECK(p.batch * p.dim < (int64_t(1) << 31) && p.seqlen < (int64_t(1) << 31),
                msg("scan on CUDA: batch * dim and seqlen must each be below 2^31, got batch * dim = ",
                    p.batch * p.dim, ", seqlen = ", p.seqlen));
  }
};

// Calls f with T{} when out is T's dtype, else with float{} (the caller casts other dtypes).
template <typename T, typename F>
void dispatch_out_dtype(at::ScalarType out, F&& f) {
  if (out == c10::CppTypeToScalarType<T>::value) f(T{});
  else f(float{});
}

// The forward kernel; with p.y absent it only produces the chunk states (for the backward).
void launch_fwd(const ScanParams& p, at::ScalarType in, at::ScalarType out, const at::Tensor& like);

// Row mode (scan_rows.cu), for L-contiguous layouts with many rows; false when p does not
// allow it (then the tiles run). The backward needs chunk states and no stored states.
// Strip mode (scan_strips.cu), the forward for D-contiguous layouts; false when p does not allow it.
bool launch_rows_fwd(const ScanParams& p, at::ScalarType in, at::ScalarType out);
bool launch_rows_bwd(const ScanParams& p, at::ScalarType in, at::ScalarType dy);
bool launch_strips_fwd(const ScanParams& p, at::ScalarType in, at::ScalarType out, const at::Tensor& like);

}  // namespace scan
}  // namespace ssm_ext
