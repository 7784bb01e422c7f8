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
  constexpr int R = kFwdRows<T>, kTileRows = 32 * R;
  __shared__ float2 pairs[kWarps][kTileRows];
  __shared__ float h_in[kTileRows];
  const int64_t k = blockIdx.x, chunk = k / lb.n_strips, strip = k % lb.n_strips;
  const Block blk = block_of<R, M>(p, strip, chunk);
  const uint32_t dim = static_cast<uint32_t>(p.dim);

  Raw<T, R> a, x, b, c;
  load_block<T, M>(p.a, blk, dim, 1.f, a);
  load_block<T, M>(p.x, blk, dim, 0.f, x);
  if (p.b.ptr) load_block<T, M>(p.b, blk, dim, 0.f, b);
  if (p.c.ptr) load_block<T, M>(p.c, blk, dim, 0.f, c);
  step_pairs<M>(a, x, b, p.b.ptr != nullptr, blk, pairs);
  const float2 tile = compose_warps<true, kTileRows>(pairs);

  // Row thread r: the state entering the tile, from the initial state or the tiles before.
  const int r = threadIdx.x;
  const int64_t row = strip * kTileRows + r;
  const bool row_thread = r < kTileRows && row < p.batch * p.dim;
  const int64_t rb = row_thread ? row / p.dim : 0, rd = row_thread ? row % p.dim : 0;
  if (r < kTileRows) {
    float edge = 0.f;
    if (row_thread && chunk == 0 && p.initial_state.ptr)
      edge = load_as<float>(p.initial_state.ptr, p.initial_dtype, rb * p.initial_state.sb + rd * p.initial_state.sd);
    const float h0 = chain_tiles(lb, k, tile, edge);
    h_in[r] = h0;
    if (row_thread && p.chunk_states.ptr)
      static_cast<float*>(p.chunk_states.ptr)[rb * p.chunk_states.sb + chunk * p.chunk_states.sl + rd * p.chunk_states.sd] = h0;
    if (row_thread && chunk == lb.n_chunks - 1 && p.final_state.ptr)
      static_cast<float*>(p.final_state.ptr)[rb * p.final_state.sb + rd * p.final_state.sd] = tile.x * h0 + tile.y;
  }
  __syncthreads();

  // y, then (if asked) h: the steps are cheap to run twice, registers are not.
  float out[kStepsPerThread][R];
  auto run = [&](bool want_h) {
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const float2 before = pairs[blk.sg][blk.rg * R + j];
      float hv = before.x * h_in[blk.rg * R + j] + before.y;
#pragma unroll
      for (int i = 0; i < kStepsPerThread; ++i) {
        hv = get<M>(a, i, j) * hv + bx<M>(x, b, p.b.ptr != nullptr, i, j);
        out[i][j] = want_h || !p.c.ptr ? hv : get<M>(c, i, j) * hv;
      }
    }
  };
  if (p.y.ptr) {  // absent when the backward only wants chunk states
    run(false);
    store_block<Y, M>(p.y, blk, dim, out);
  }
  if (p.states.ptr) {
    run(true);
    store_block<float, M>(p.states, blk, dim, out);
  }
}

}  // namespace

void launch_fwd(const ScanParams& p, at::ScalarType in, at::ScalarType out, const at::Tensor& like) {
  if (launch_rows_fwd(p, in, out) || launch_strips_fwd(p, in, out, like)) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_io_dtype(in, "x", [&](auto tin) {
    using T = decltype(tin);
    ScratchSpace ws(p, 32 * kFwdRows<T>, like);
    dispatch_out_dtype<T>(out, [&](auto tout) {
      using Y = decltype(tout);
      const Mode m = pick_mode(p, kFwdRows<T>, {{p.x, sizeof(T)}, {p.a, sizeof(T)}, {p.b, sizeof(T)}, {p.c, sizeof(T)},
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
