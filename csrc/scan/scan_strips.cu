// Strip mode of the CUDA forward, for layouts with D contiguous ((B, L, D)). A strip is one
// 128-byte line of channels of one batch (32 fp32 or 64 16-bit channels), lane l owning its
// 32-bit word l (one or two channels); a tile is a strip x kStripSteps steps (8 KB of each
// input), copied into shared memory by cp.async. Persistent CTAs take the tiles in scan order
// (k = chunk * n_strips + strip, CTA i takes i, i + G, ...) with the copies of the next
// kStages - 1 tiles in flight while one is scanned, so loads never wait on the look-back. Warp w
// scans steps w*S .. w*S + S-1 of the tile: first its (P, U) pairs, composed across warps and
// chained to the earlier tiles of the strip (the state read a tile ahead, or chain_tiles' walk by
// the row threads), then h and y from the state entering its steps.
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/mma.cuh"
#include "scan/scan.h"
#include "scan/scan_cuda.cuh"

namespace ssm_ext {
namespace scan {
namespace {

// A tile row is one 128-byte line of each input: lane l owns the 32-bit word l of it, one fp32
// channel or two 16-bit ones (read from shared memory in one access, two independent chains).
constexpr int kStripSteps = 64;  // 8 KB of each input per tile
constexpr int kWarpSteps = kStripSteps / kWarps;
constexpr int kPieces = 128 / 16;  // 16-byte copies per tile row
template <typename T>
constexpr int kLaneRows = 4 / int(sizeof(T));  // channels per lane
template <typename T>
constexpr int kStripRows = 32 * kLaneRows<T>;  // channels per strip: 32 fp32, 64 16-bit
template <typename T>
constexpr int kPieceElems = 16 / int(sizeof(T));  // elements of one 16-byte copy

enum Input { kA, kX, kB, kC, kInputs };

struct StripTile {
  uint32_t v[kInputs][kStripSteps][32];
};

// Where tile k = chunk * n_strips + strip lies: batch bb, channels d0 .., steps t0 ... Advanced
// by the grid stride with 32-bit arithmetic (the host checks the bounds), not a 64-bit division
// per tile.
struct TileAt {
  int64_t k;
  uint32_t chunk, strip;
  __device__ void advance(int64_t grid, uint32_t grid_chunks, uint32_t grid_strips, uint32_t n_strips) {
    k += grid;
    chunk += grid_chunks;
    strip += grid_strips;
    if (strip >= n_strips) {
      strip -= n_strips;
      ++chunk;
    }
  }
  __device__ uint32_t bb(uint32_t n_dstrips) const { return strip / n_dstrips; }
  template <int kRows>
  __device__ int64_t d0(uint32_t n_dstrips) const { return int64_t(strip % n_dstrips) * kRows; }
  __device__ int64_t t0() const { return int64_t(chunk) * kStripSteps; }
};

// T: x, a, b, c; Y: y. Writes y (if p.y), the states or the chunk states if asked, the final state.
// A ring of kStages tiles, built for kMinCtas CTAs per SM.
template <typename T, typename Y, int kStages, int kMinCtas>
__global__ __launch_bounds__(kThreads, kMinCtas) void fwd_strips_kernel(ScanParams p, LookBack lb, uint32_t n_dstrips) {
  constexpr int S = kWarpSteps, R = kLaneRows<T>, kRows = kStripRows<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  StripTile* tiles = reinterpret_cast<StripTile*>(smem_raw);
  __shared__ float2 pairs[kWarps][kRows];
  __shared__ float h_in[kRows];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n_tiles = lb.n_strips * lb.n_chunks, grid = gridDim.x;
  const bool has_b = p.b.ptr != nullptr, has_c = p.c.ptr != nullptr && p.y.ptr != nullptr;

  const uint32_t n_strips = uint32_t(lb.n_strips), grid_chunks = uint32_t(grid / n_strips),
                 grid_strips = uint32_t(grid % n_strips);
  const TileAt first{blockIdx.x, uint32_t(blockIdx.x / n_strips), uint32_t(blockIdx.x % n_strips)};

  // Copies tile `at` (if it exists) into stage `stage`; always commits a group, so the number of
  // groups in flight stays kStages - 1. Steps past L and channels past D read as zeros. Thread
  // i copies the 16-byte pieces i, i + kThreads, ..., the same places in every tile.
  constexpr int kCopies = kStripSteps * kPieces / kThreads, kStepStride = kThreads / kPieces;
  static_assert(kCopies * kThreads == kStripSteps * kPieces, "whole copies per thread");
  const int step0 = threadIdx.x / kPieces, piece = threadIdx.x % kPieces;
  auto issue = [&](const TileAt& at, int stage) {
    if (at.k < n_tiles) {
      const int64_t bb = at.bb(n_dstrips), d0 = at.d0<kRows>(n_dstrips) + piece * kPieceElems<T>, t0 = at.t0();
      const int steps_left = int(std::min<int64_t>(p.seqlen - t0, kStripSteps));
      const bool row_ok = d0 < p.dim;
      auto copy = [&](const View3& v, int input) {
        const T* src = static_cast<const T*>(v.ptr) + bb * v.sb + (t0 + step0) * v.sl + d0;
#pragma unroll
        for (int j = 0; j < kCopies; ++j) {
          const bool ok = row_ok && step0 + j * kStepStride < steps_left;
          mma::cp_async16(&tiles[stage].v[input][step0 + j * kStepStride][piece * 4],
                          ok ? src + int64_t(j * kStepStride) * v.sl : v.ptr, ok);
        }
      };
      copy(p.a, kA);
      copy(p.x, kX);
      if (has_b) copy(p.b, kB);
      if (has_c) copy(p.c, kC);
    }
    mma::cp_async_commit();
  };

  TileAt next = first;  // the next tile to copy
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    issue(next, s);
    next.advance(grid, grid_chunks, grid_strips, n_strips);
  }
  // Row thread r (< kRows) reads the state it needs from the tile before the next one a whole
  // tile ahead: with more strips than CTAs that tile is long done, and no walk is needed.
  const int r = threadIdx.x;
  uint32_t ahead = kEmpty;
  int stage = 0;
  for (TileAt at = first; at.k < n_tiles; at.advance(grid, grid_chunks, grid_strips, n_strips)) {
    const int64_t k = at.k;
    // The state ahead, read (again) at the top of the tile where it was not there a tile ago: its
    // tile then ran alongside this CTA's last one and has most likely published by now.
    if (r < kRows && ahead == kEmpty) ahead = peek_state(lb, k);
    issue(next, (stage + kStages - 1) % kStages);
    next.advance(grid, grid_chunks, grid_strips, n_strips);
    mma::cp_async_wait<kStages - 1>();
    __syncthreads();
    const StripTile& tile = tiles[stage];
    const int64_t bb = at.bb(n_dstrips), d0 = at.d0<kRows>(n_dstrips), t0 = at.t0();
    const int64_t d = d0 + lane * R, tw = t0 + warp * S;
    const bool lane_ok = d < p.dim;  // both channels of a 16-bit lane (D is a multiple of 8)
    const int n_steps = p.seqlen - tw <= 0 ? 0 : (p.seqlen - tw < S ? int(p.seqlen - tw) : S);
    auto in = [&](int input, int i, float (&f)[R]) { unpack<T>(tile.v[input][warp * S + i][lane], f); };
    auto u_at = [&](int i, float (&u)[R]) {  // b*x (b absent: x)
      in(kX, i, u);
      if (has_b) {
        float bv[R];
        in(kB, i, bv);
#pragma unroll
        for (int j = 0; j < R; ++j) u[j] *= bv[j];
      }
    };
    // A warp's steps all exist in all but the last tile of a strip: no per-step tests there.
    const bool all_steps = n_steps == S;

    float2 pu[R];
#pragma unroll
    for (int j = 0; j < R; ++j) pu[j] = make_float2(1.f, 0.f);
    auto pair_steps = [&](auto whole_c) {
#pragma unroll
      for (int i = 0; i < S; ++i) {
        if (decltype(whole_c)::value || i < n_steps) {
          float av[R], u[R];
          in(kA, i, av);
          u_at(i, u);
#pragma unroll
          for (int j = 0; j < R; ++j) pu[j] = make_float2(av[j] * pu[j].x, av[j] * pu[j].y + u[j]);
        }
      }
    };
    if (all_steps) pair_steps(std::true_type{});
    else pair_steps(std::false_type{});
#pragma unroll
    for (int j = 0; j < R; ++j) pairs[warp][lane * R + j] = pu[j];
    const float2 whole = compose_warps<true, kRows>(pairs);

    // The state entering the tile (chain_tiles: at a strip's first tile the initial state, else
    // the state read ahead, else found by the walk); row thread r publishes the state leaving it.
    if (r < kRows) {
      float edge = 0.f;
      if (at.chunk == 0 && d0 + r < p.dim && p.initial_state.ptr)
        edge = load_as<float>(p.initial_state.ptr, p.initial_dtype, bb * p.initial_state.sb + (d0 + r) * p.initial_state.sd);
      h_in[r] = chain_tiles(lb, k, whole, edge, ahead);
      ahead = k + grid < n_tiles ? peek_state(lb, k + grid) : kEmpty;
    }
    __syncthreads();
    if (r < kRows && d0 + r < p.dim && at.chunk == lb.n_chunks - 1 && p.final_state.ptr)
      static_cast<float*>(p.final_state.ptr)[bb * p.final_state.sb + (d0 + r) * p.final_state.sd] =
          whole.x * h_in[r] + whole.y;

    if (lane_ok && n_steps > 0) {
      float h[R];
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const float2 before = pairs[warp][lane * R + j];
        h[j] = before.x * h_in[lane * R + j] + before.y;
      }
      // A chunk of kChunk steps starts only at a warp's first step (S divides kChunk).
      static_assert(kChunk % S == 0, "warp steps within one chunk");
      if (p.chunk_states.ptr && (warp * S) % kChunk == 0) {
#pragma unroll
        for (int j = 0; j < R; ++j)
          static_cast<float*>(p.chunk_states.ptr)[bb * p.chunk_states.sb + (tw / kChunk) * p.chunk_states.sl +
                                                  (d + j) * p.chunk_states.sd] = h[j];
      }
      // y and the states: a lane's channels in one vector (strips_ok checked D contiguous)
      Y* y = p.y.ptr ? static_cast<Y*>(p.y.ptr) + bb * p.y.sb + tw * p.y.sl + d : nullptr;
      float* hs = p.states.ptr ? static_cast<float*>(p.states.ptr) + bb * p.states.sb + tw * p.states.sl + d : nullptr;
      float hv[S][R];
      auto out_steps = [&](auto whole_c) {
        constexpr bool kWhole = decltype(whole_c)::value;
#pragma unroll
        for (int i = 0; i < S; ++i) {
          if (kWhole || i < n_steps) {
            float av[R], u[R];
            in(kA, i, av);
            u_at(i, u);
#pragma unroll
            for (int j = 0; j < R; ++j) hv[i][j] = h[j] = av[j] * h[j] + u[j];
          }
        }
        if (y && has_c) {
#pragma unroll
          for (int i = 0; i < S; ++i) {
            if (kWhole || i < n_steps) {
              float cv[R];
              in(kC, i, cv);
#pragma unroll
              for (int j = 0; j < R; ++j) cv[j] *= hv[i][j];
              store_vec<Y, R>(y + i * p.y.sl, cv);
            }
          }
        } else if (y) {
#pragma unroll
          for (int i = 0; i < S; ++i)
            if (kWhole || i < n_steps) store_vec<Y, R>(y + i * p.y.sl, hv[i]);
        }
        if (hs) {
#pragma unroll
          for (int i = 0; i < S; ++i)
            if (kWhole || i < n_steps) store_vec<float, R>(hs + i * p.states.sl, hv[i]);
        }
      };
      if (all_steps) out_steps(std::true_type{});
      else out_steps(std::false_type{});
    }
    __syncthreads();  // the stage, pairs and h_in are rewritten next
    stage = stage + 1 == kStages ? 0 : stage + 1;
  }
  mma::cp_async_wait<0>();
}

// Strip mode copies 16-byte pieces of each input: D contiguous and a multiple of a piece,
// aligned rows; at least 32 channels, so few lanes idle. A lane stores its channels of y and of
// the stored states as one vector: D contiguous, rows aligned to it.
template <typename T, typename Y>
bool strips_ok(const ScanParams& p) {
  constexpr int piece = kPieceElems<T>, R = kLaneRows<T>;
  if (p.dim < 32 || p.dim % piece != 0) return false;
  for (const View3* v : {&p.x, &p.a, &p.b, &p.c}) {
    if (v->ptr && !vec_ok(*v, sizeof(T), piece, v->sd, p.batch > 1 ? v->sb : 0, p.seqlen > 1 ? v->sl : 0))
      return false;
  }
  for (const ViewBytes& o : {ViewBytes{p.y, int(sizeof(Y))}, ViewBytes{p.states, 4}}) {
    const View3& v = o.v;
    if (v.ptr && !vec_ok(v, o.elem_bytes, R, v.sd, p.batch > 1 ? v.sb : 0, p.seqlen > 1 ? v.sl : 0)) return false;
  }
  return true;
}

}  // namespace

namespace {

template <typename T, typename Y, int kStages, int kMinCtas>
void launch_strips(const ScanParams& p, const at::Tensor& like, int sms, int64_t n_dstrips, int64_t n_chunks) {
  auto kernel = fwd_strips_kernel<T, Y, kStages, kMinCtas>;
  constexpr size_t smem = kStages * sizeof(StripTile);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  ScratchSpace ws(p.batch * n_dstrips, n_chunks, kStripRows<T>, like);
  // Every CTA resident at once: a tile waits only on lower tiles, taken by running CTAs.
  const int64_t grid = std::min<int64_t>(int64_t(ws.blocks()), int64_t(std::max(per_sm, 1)) * sms);
  kernel<<<unsigned(grid), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(p, ws.lb, uint32_t(n_dstrips));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool launch_strips_fwd(const ScanParams& p, at::ScalarType in, at::ScalarType out, const at::Tensor& like) {
  bool done = false;
  dispatch_io_dtype(in, "x", [&](auto tin) {
    using T = decltype(tin);
    dispatch_out_dtype<T>(out, [&](auto tout) {
      using Y = decltype(tout);
      if (!strips_ok<T, Y>(p)) return;
      constexpr int kRows = kStripRows<T>;
      const int64_t n_dstrips = (p.dim + kRows - 1) / kRows, n_chunks = (p.seqlen + kStripSteps - 1) / kStripSteps;
      if (p.batch * n_dstrips >= (int64_t(1) << 31) || n_chunks >= (int64_t(1) << 31)) return;  // 32-bit tile coordinates
      int device = 0, sms = 0;
      C10_CUDA_CHECK(cudaGetDevice(&device));
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
      // Fewer strips than two CTAs per SM: tiles wait on tiles of their own round (the look-back
      // walks while the CTA's other warps wait at the barrier), and three CTAs per SM with a 2-stage
      // ring overlap those waits better (L = 1M, D = 256 fp32: 2260 -> 2106 us). Otherwise the
      // predecessor's state is read a tile ahead, and a 3-stage ring keeps more loads in flight.
      if (p.batch * n_dstrips < 2 * int64_t(sms)) launch_strips<T, Y, 2, 3>(p, like, sms, n_dstrips, n_chunks);
      else launch_strips<T, Y, 3, 2>(p, like, sms, n_dstrips, n_chunks);
      done = true;
    });
  });
  return done;
}

}  // namespace scan
}  // namespace ssm_ext
