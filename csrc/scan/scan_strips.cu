// Strip mode of the CUDA forward, for layouts with D contiguous ((B, L, D)). A strip is 32
// consecutive channels d of one batch, lane l owning channel d0 + l; a tile is a strip x
// kStripSteps steps (8 KB of each input), copied into shared memory by cp.async. Persistent
// CTAs take the tiles in scan order (k = chunk * n_strips + strip, CTA i takes i, i + G, ...)
// with the copies of the next kStages - 1 tiles in flight while one is scanned, so loads never
// wait on the look-back. Warp w scans steps w*S .. w*S + S-1 of the tile: first its (P, U)
// pair, composed across warps and chained to the earlier tiles by the look-back of
// scan_cuda.cuh, then h and y from the state entering its steps.
#include <c10/cuda/CUDAStream.h>

#include "common/dispatch.h"
#include "common/mma.cuh"
#include "scan/scan.h"
#include "scan/scan_cuda.cuh"

namespace ssm_ext {
namespace scan {
namespace {

constexpr int kStripRows = 32;
constexpr int kStages = 3;
template <typename T>
constexpr int kStripSteps = 8192 / (kStripRows * int(sizeof(T)));  // fp32 64, 16-bit 128
template <typename T>
constexpr int kWarpSteps = kStripSteps<T> / kWarps;
template <typename T>
constexpr int kPieceElems = 16 / int(sizeof(T));  // elements of one 16-byte copy

enum Input { kA, kX, kB, kC, kInputs };

template <typename T>
struct StripTile {
  T v[kInputs][kStripSteps<T>][kStripRows];
};

template <typename T>
constexpr size_t kStripSmem = kStages * sizeof(StripTile<T>);

// Tile k: its strip (batch bb, channels d0 ..) and first step t0.
struct TileAt {
  int64_t chunk, bb, d0, t0;
};
template <typename T>
__device__ __forceinline__ TileAt tile_at(int64_t k, const LookBack& lb, int64_t n_dstrips) {
  const int64_t chunk = k / lb.n_strips, strip = k % lb.n_strips;
  return {chunk, strip / n_dstrips, (strip % n_dstrips) * kStripRows, chunk * kStripSteps<T>};
}

// T: x, a, b, c; Y: y. Writes y (if p.y), the states or the chunk states if asked, the final state.
template <typename T, typename Y>
__global__ __launch_bounds__(kThreads, 2) void fwd_strips_kernel(ScanParams p, LookBack lb, int64_t n_dstrips) {
  constexpr int S = kWarpSteps<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  StripTile<T>* tiles = reinterpret_cast<StripTile<T>*>(smem_raw);
  __shared__ float2 pairs[kWarps][kStripRows];
  __shared__ float h_in[kStripRows];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n_tiles = lb.n_strips * lb.n_chunks, grid = gridDim.x;
  const bool has_b = p.b.ptr != nullptr, has_c = p.c.ptr != nullptr && p.y.ptr != nullptr;

  // Copies tile k (if it exists) into stage `stage`; always commits a group, so the number of
  // groups in flight stays kStages - 1. Steps past L and channels past D read as zeros.
  auto issue = [&](int64_t k, int stage) {
    if (k < n_tiles) {
      const TileAt at = tile_at<T>(k, lb, n_dstrips);
      auto copy = [&](const View3& v, int input) {
        constexpr int kPieces = kStripRows / kPieceElems<T>, kCopies = kStripSteps<T> * kPieces;
        const T* base = static_cast<const T*>(v.ptr) + at.bb * v.sb + at.d0;
#pragma unroll
        for (int m = threadIdx.x; m < kCopies; m += kThreads) {
          const int step = m / kPieces, q = (m % kPieces) * kPieceElems<T>;
          const bool ok = at.t0 + step < p.seqlen && at.d0 + q < p.dim;
          mma::cp_async16(&tiles[stage].v[input][step][q], ok ? base + (at.t0 + step) * v.sl + q : v.ptr, ok);
        }
      };
      copy(p.a, kA);
      copy(p.x, kX);
      if (has_b) copy(p.b, kB);
      if (has_c) copy(p.c, kC);
    }
    mma::cp_async_commit();
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(blockIdx.x + s * grid, s);
  // Warp 0 reads the state it needs from the tile before the next one a whole tile ahead: with
  // more strips than CTAs that tile is long done, and the look-back costs no round trip.
  uint32_t ahead = warp == 0 ? peek_state(lb, blockIdx.x) : kEmpty;
  int stage = 0;
  for (int64_t k = blockIdx.x; k < n_tiles; k += grid) {
    issue(k + (kStages - 1) * grid, (stage + kStages - 1) % kStages);
    mma::cp_async_wait<kStages - 1>();
    __syncthreads();
    const StripTile<T>& tile = tiles[stage];
    const TileAt at = tile_at<T>(k, lb, n_dstrips);
    const int64_t d = at.d0 + lane, tw = at.t0 + warp * S;
    const bool row_ok = d < p.dim;
    const int n_steps = p.seqlen - tw <= 0 ? 0 : (p.seqlen - tw < S ? int(p.seqlen - tw) : S);
    auto u_at = [&](int i) {
      const float xv = float(tile.v[kX][warp * S + i][lane]);
      return has_b ? float(tile.v[kB][warp * S + i][lane]) * xv : xv;
    };

    float2 pu = make_float2(1.f, 0.f);
#pragma unroll
    for (int i = 0; i < S; ++i) {
      if (i < n_steps) {
        const float av = float(tile.v[kA][warp * S + i][lane]);
        pu = make_float2(av * pu.x, av * pu.y + u_at(i));
      }
    }
    pairs[warp][lane] = pu;
    const float2 whole = compose_warps<true, kStripRows>(pairs);
    if (warp == 0) {
      float edge = 0.f;
      if (row_ok && at.chunk == 0 && p.initial_state.ptr)
        edge = load_as<float>(p.initial_state.ptr, p.initial_dtype, at.bb * p.initial_state.sb + d * p.initial_state.sd);
      const float h0 = chain_tiles<16>(lb, k, whole, edge, ahead);
      h_in[lane] = h0;
      ahead = k + grid < n_tiles ? peek_state(lb, k + grid) : kEmpty;
      if (row_ok && at.chunk == lb.n_chunks - 1 && p.final_state.ptr)
        static_cast<float*>(p.final_state.ptr)[at.bb * p.final_state.sb + d * p.final_state.sd] = whole.x * h0 + whole.y;
    }
    __syncthreads();

    const float2 before = pairs[warp][lane];
    float h = before.x * h_in[lane] + before.y;
#pragma unroll
    for (int i = 0; i < S; ++i) {
      if (i < n_steps && row_ok) {
        const int64_t t = tw + i;
        if (p.chunk_states.ptr && t % kChunk == 0)
          static_cast<float*>(p.chunk_states.ptr)[at.bb * p.chunk_states.sb + (t / kChunk) * p.chunk_states.sl +
                                                  d * p.chunk_states.sd] = h;
        h = float(tile.v[kA][warp * S + i][lane]) * h + u_at(i);
        if (p.y.ptr)
          static_cast<Y*>(p.y.ptr)[at.bb * p.y.sb + t * p.y.sl + d * p.y.sd] =
              Y(has_c ? float(tile.v[kC][warp * S + i][lane]) * h : h);
        if (p.states.ptr) static_cast<float*>(p.states.ptr)[at.bb * p.states.sb + t * p.states.sl + d * p.states.sd] = h;
      }
    }
    __syncthreads();  // the stage and pairs are rewritten next
    stage = stage + 1 == kStages ? 0 : stage + 1;
  }
  mma::cp_async_wait<0>();
}

// Strip mode copies 16-byte pieces of each input: D contiguous and a multiple of a piece,
// aligned rows; at least one strip of channels, so few lanes idle.
bool strips_ok(const ScanParams& p, int piece) {
  if (p.dim < kStripRows || p.dim % piece != 0) return false;
  for (const View3* v : {&p.x, &p.a, &p.b, &p.c}) {
    if (!v->ptr) continue;
    if (v->sd != 1 || (p.batch > 1 && v->sb % piece != 0) || (p.seqlen > 1 && v->sl % piece != 0) ||
        reinterpret_cast<uintptr_t>(v->ptr) % 16 != 0)
      return false;
  }
  return true;
}

}  // namespace

bool launch_strips_fwd(const ScanParams& p, at::ScalarType in, at::ScalarType out, const at::Tensor& like) {
  bool done = false;
  dispatch_io_dtype(in, "x", [&](auto tin) {
    using T = decltype(tin);
    if (!strips_ok(p, kPieceElems<T>)) return;
    dispatch_out_dtype<T>(out, [&](auto tout) {
      using Y = decltype(tout);
      auto kernel = fwd_strips_kernel<T, Y>;
      constexpr size_t smem = kStripSmem<T>;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      int device = 0, sms = 0, per_sm = 0;
      C10_CUDA_CHECK(cudaGetDevice(&device));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
      const int64_t n_dstrips = (p.dim + kStripRows - 1) / kStripRows;
      ScratchSpace ws(p.batch * n_dstrips, (p.seqlen + kStripSteps<T> - 1) / kStripSteps<T>, kStripRows, like);
      // Every CTA resident at once: a tile waits only on lower tiles, taken by running CTAs.
      const int64_t grid = std::min<int64_t>(int64_t(ws.blocks()), int64_t(std::max(per_sm, 1)) * sms);
      kernel<<<unsigned(grid), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(p, ws.lb, n_dstrips);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      done = true;
    });
  });
  return done;
}

}  // namespace scan
}  // namespace ssm_ext
