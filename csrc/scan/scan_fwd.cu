// CUDA forward of the first-order scan: one pass, each input read once, y written once.
// See scan_cuda.cuh for the tiling and the look-back between tiles.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "scan/scan.h"
#include "scan/scan_cuda.cuh"

namespace ssm_ext {
namespace scan {
namespace {

// T: x, a, b, c; Y: y. Writes y, the final state, and the states or the chunk states if asked.
template <typename T, typename Y, Mode M>
__global__ __launch_bounds__(kThreads, 2) void fwd_kernel(ScanParams p, LookBack lb) {
  __shared__ float2 pairs[kWarps][kTileRows];
  __shared__ float h_in[kTileRows];
  __shared__ int64_t scratch;
  const int64_t k = take_ticket(lb, &scratch);
  const int64_t chunk = k / lb.n_strips, strip = k % lb.n_strips;
  const Block blk = block_of(p, strip, chunk);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;

  float a[kStepsPerThread][kRowsPerThread], u[kStepsPerThread][kRowsPerThread];
  float bb[kStepsPerThread][kRowsPerThread], c[kStepsPerThread][kRowsPerThread];
  load_block<T, M>(p.a, blk, 1.f, a);
  load_block<T, M>(p.x, blk, 0.f, u);
  if (p.b.ptr) load_block<T, M>(p.b, blk, 0.f, bb);
  if (p.c.ptr) load_block<T, M>(p.c, blk, 0.f, c);
  if (p.b.ptr) {
#pragma unroll
    for (int i = 0; i < kStepsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kRowsPerThread; ++j) u[i][j] *= bb[i][j];
  }
#pragma unroll
  for (int j = 0; j < kRowsPerThread; ++j) {
    float2 pu = make_float2(1.f, 0.f);
#pragma unroll
    for (int i = 0; i < kStepsPerThread; ++i) pu = make_float2(a[i][j] * pu.x, a[i][j] * pu.y + u[i][j]);
    pairs[warp][lane * kRowsPerThread + j] = pu;
  }
  const float2 tile = compose_warps<true>(pairs);

  // Row thread r: the state entering the tile, from the initial state or the tiles before.
  const int r = threadIdx.x;
  float edge = 0.f;
  int64_t rb = 0, rd = 0;
  const bool row_thread = r < kTileRows && strip * kTileRows + r < p.batch * p.dim;
  if (row_thread) {
    rb = (strip * kTileRows + r) / p.dim;
    rd = (strip * kTileRows + r) % p.dim;
    if (chunk == 0 && p.initial_state.ptr)
      edge = load_as<float>(p.initial_state.ptr, p.initial_dtype, rb * p.initial_state.sb + rd * p.initial_state.sd);
  }
  const float h0 = chain_tiles(lb, k, tile, edge, &scratch);
  if (row_thread) {
    h_in[r] = h0;
    if (p.chunk_states.ptr)
      static_cast<float*>(p.chunk_states.ptr)[rb * p.chunk_states.sb + chunk * p.chunk_states.sl + rd * p.chunk_states.sd] = h0;
    if (chunk == lb.n_chunks - 1 && p.final_state.ptr)
      static_cast<float*>(p.final_state.ptr)[rb * p.final_state.sb + rd * p.final_state.sd] = tile.x * h0 + tile.y;
  }
  __syncthreads();

  float y[kStepsPerThread][kRowsPerThread];
#pragma unroll
  for (int j = 0; j < kRowsPerThread; ++j) {
    const int row = lane * kRowsPerThread + j;
    const float2 before = pairs[warp][row];
    float h = before.x * h_in[row] + before.y;
#pragma unroll
    for (int i = 0; i < kStepsPerThread; ++i) {
      h = a[i][j] * h + u[i][j];
      u[i][j] = h;  // u now holds h
      y[i][j] = p.c.ptr ? c[i][j] * h : h;
    }
  }
  if (p.y.ptr) store_block<Y, M>(p.y, blk, y);  // absent when the backward only wants chunk states
  if (p.states.ptr) store_block<float, M>(p.states, blk, u);
}

}  // namespace

void launch_fwd(const ScanParams& p, at::ScalarType in, at::ScalarType out, const at::Tensor& like) {
  ScratchSpace ws(p, like);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_io_dtype(in, "x", [&](auto tin) {
    using T = decltype(tin);
    dispatch_out_dtype<T>(out, [&](auto tout) {
      using Y = decltype(tout);
      const Mode m = pick_mode(p, {{p.x, sizeof(T)}, {p.a, sizeof(T)}, {p.b, sizeof(T)}, {p.c, sizeof(T)},
                                   {p.y, sizeof(Y)}, {p.states, 4}});
      mode_switch(m, [&](auto mode) {
        fwd_kernel<T, Y, decltype(mode)::value>
            <<<ws.blocks(), kThreads, 0, stream>>>(p, ws.lb);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cuda(
    const at::Tensor& x, const at::Tensor& a, const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& c,
    const c10::optional<at::Tensor>& initial_state, bool store_states, c10::optional<at::ScalarType> out_dtype) {
  FwdArgs r = prepare_fwd(x, a, b, c, initial_state, store_states, out_dtype);
  TORCH_CHECK(x.scalar_type() != at::kDouble, "x: float64 is supported on the CPU only");
  const c10::cuda::CUDAGuard guard(x.device());
  if (r.p.batch * r.p.dim == 0) return {r.y, r.final_state, r.states, r.chunk_states};
  if (r.p.seqlen == 0) {
    if (initial_state.has_value()) r.final_state.copy_(*initial_state);
    else r.final_state.zero_();
    return {r.y, r.final_state, r.states, r.chunk_states};
  }
  // y in a dtype other than x's or fp32 is computed in fp32, then cast.
  const at::ScalarType yt = r.y.scalar_type();
  at::Tensor y_direct = (yt == x.scalar_type() || yt == at::kFloat) ? r.y : at::empty_like(r.y, r.y.options().dtype(at::kFloat));
  r.p.y = view_bld(y_direct);
  launch_fwd(r.p, x.scalar_type(), y_direct.scalar_type(), x);
  if (!y_direct.is_same(r.y)) r.y.copy_(y_direct);
  return {r.y, r.final_state, r.states, r.chunk_states};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("scan_fwd", &fwd_cuda); }

}  // namespace scan
}  // namespace ssm_ext
