// CUDA backward of the first-order scan, one pass from the end of L to its start:
//   carry_t = a_t * dh_t flows to step t-1, dh_t = c_t*dy_t + carry_{t+1} (carry_L = dfinal),
//   dx = b*dh, da = h_{t-1}*dh, db = x*dh, dc = h_t*dy, dinitial = carry_0.
// h is recomputed in each tile: from the chunk states exactly as the forward computed it
// (same steps per warp, same operations), or from the stored h before each thread's steps.
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

template <typename T, typename DY, Mode M>
__global__ __launch_bounds__(kThreads, 2) void bwd_kernel(ScanParams p, LookBack lb) {
  constexpr int R = kBwdRows, kTileRows = 32 * R;
  __shared__ float2 pairs[kWarps][kTileRows];
  __shared__ float edge_in[kTileRows];
  const int64_t k = blockIdx.x, strip = k % lb.n_strips, chunk = lb.n_chunks - 1 - k / lb.n_strips;
  const Block blk = block_of<R, M>(p, strip, chunk);
  const uint32_t dim = static_cast<uint32_t>(p.dim);
  const int r = threadIdx.x;
  const int64_t row = strip * kTileRows + r;
  const bool row_thread = r < kTileRows && row < p.batch * p.dim;
  const int64_t rb = row_thread ? row / p.dim : 0, rd = row_thread ? row % p.dim : 0;

  Raw<T, R> a, x, b, c;
  Raw<DY, R> dy;
  load_block<T, M>(p.a, blk, dim, 1.f, a);
  load_block<T, M>(p.x, blk, dim, 0.f, x);
  if (p.b.ptr) load_block<T, M>(p.b, blk, dim, 0.f, b);
  if (p.c.ptr) load_block<T, M>(p.c, blk, dim, 0.f, c);
  load_block<DY, M>(p.dy, blk, dim, 0.f, dy);
  auto g = [&](int i, int j) { return p.c.ptr ? get<M>(c, i, j) * get<M>(dy, i, j) : get<M>(dy, i, j); };

  // h_{t0-1} of each row: stored, or recomputed as the forward kernel computed it. A warp
  // whose steps lie past the end of L reads none (h_{t0-1} is then past the stored states).
  float h_before[R];
  if (p.states.ptr) {
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const uint32_t rj = blk.r0 + j;
      h_before[j] = j >= blk.n_rows || blk.n_steps == 0 ? 0.f
                    : blk.t0 > 0   ? static_cast<const float*>(p.states.ptr)[offset(p.states, rj, dim, blk.t0 - 1)]
                    : p.initial_state.ptr ? load_as<float>(p.initial_state.ptr, p.initial_dtype, offset(p.initial_state, rj, dim, 0))
                                          : 0.f;
    }
  } else {
    step_pairs<M>(a, x, b, p.b.ptr != nullptr, blk, pairs);
    if (row_thread)
      edge_in[r] = static_cast<const float*>(p.chunk_states.ptr)[rb * p.chunk_states.sb + chunk * p.chunk_states.sl + rd * p.chunk_states.sd];
    compose_warps<true, kTileRows>(pairs);
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const float2 before = pairs[blk.sg][blk.rg * R + j];
      h_before[j] = before.x * edge_in[blk.rg * R + j] + before.y;
    }
    __syncthreads();  // pairs and edge_in are reused below
  }

  float out[kStepsPerThread][R];
  // h of the thread's steps, row by row, into out; then f(i, j, h_prev, h) for each element.
  auto steps = [&]() {
#pragma unroll
    for (int j = 0; j < R; ++j) {
      float hv = h_before[j];
#pragma unroll
      for (int i = 0; i < kStepsPerThread; ++i) out[i][j] = hv = get<M>(a, i, j) * hv + bx<M>(x, b, p.b.ptr != nullptr, i, j);
    }
  };
  if (p.dc.ptr) {  // dc = h*dy
    steps();
#pragma unroll
    for (int i = 0; i < kStepsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < R; ++j) out[i][j] *= get<M>(dy, i, j);
    store_block<T, M>(p.dc, blk, dim, out);
  }

  // The carry map of this thread's steps, last step first: carry -> a*(g + carry).
#pragma unroll
  for (int j = 0; j < R; ++j) {
    float2 pu = make_float2(1.f, 0.f);
#pragma unroll
    for (int i = kStepsPerThread - 1; i >= 0; --i) {
      const float av = get<M>(a, i, j);
      pu = make_float2(av * pu.x, av * (pu.y + g(i, j)));
    }
    pairs[blk.sg][blk.rg * R + j] = pu;
  }
  const float2 tile = compose_warps<false, kTileRows>(pairs);
  if (r < kTileRows) {
    float edge = 0.f;
    if (row_thread && chunk == lb.n_chunks - 1 && p.dfinal_state.ptr)
      edge = static_cast<const float*>(p.dfinal_state.ptr)[rb * p.dfinal_state.sb + rd * p.dfinal_state.sd];
    const float carry_in = chain_tiles(lb, k, tile, edge);
    edge_in[r] = carry_in;
    if (row_thread && chunk == 0 && p.dinitial_state.ptr)
      store_as(p.dinitial_state.ptr, p.initial_dtype, rb * p.dinitial_state.sb + rd * p.dinitial_state.sd,
               tile.x * carry_in + tile.y);
  }
  __syncthreads();

  // dh into dh; then da = h_{t-1}*dh, dx = b*dh, db = x*dh, one output at a time through out.
  float dh[kStepsPerThread][R];
#pragma unroll
  for (int j = 0; j < R; ++j) {
    const float2 after = pairs[blk.sg][blk.rg * R + j];
    float carry = after.x * edge_in[blk.rg * R + j] + after.y;
#pragma unroll
    for (int i = kStepsPerThread - 1; i >= 0; --i) {
      dh[i][j] = g(i, j) + carry;
      carry = get<M>(a, i, j) * dh[i][j];
    }
  }
  steps();
#pragma unroll
  for (int j = 0; j < R; ++j) {
#pragma unroll
    for (int i = kStepsPerThread - 1; i >= 0; --i) out[i][j] = (i == 0 ? h_before[j] : out[i - 1][j]) * dh[i][j];
  }
  store_block<T, M>(p.da, blk, dim, out);
#pragma unroll
  for (int i = 0; i < kStepsPerThread; ++i)
#pragma unroll
    for (int j = 0; j < R; ++j) out[i][j] = p.b.ptr ? get<M>(b, i, j) * dh[i][j] : dh[i][j];
  store_block<T, M>(p.dx, blk, dim, out);
  if (p.db.ptr) {
#pragma unroll
    for (int i = 0; i < kStepsPerThread; ++i)
#pragma unroll
      for (int j = 0; j < R; ++j) out[i][j] = get<M>(x, i, j) * dh[i][j];
    store_block<T, M>(p.db, blk, dim, out);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& x, const at::Tensor& a, const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& c,
    const c10::optional<at::Tensor>& initial_state, const c10::optional<at::Tensor>& states,
    const c10::optional<at::Tensor>& chunk_states, const at::Tensor& dy, const c10::optional<at::Tensor>& dfinal_state) {
  BwdArgs r = prepare_bwd(x, a, b, c, initial_state, states, chunk_states, dy, dfinal_state);
  TORCH_CHECK(x.scalar_type() != at::kDouble, "x: float64 is supported on the CPU only");
  const c10::cuda::CUDAGuard guard(x.device());
  ScanParams& p = r.p;
  auto result = [&] { return std::make_tuple(r.dx, r.da, r.db, r.dc, r.dinitial_state); };
  if (p.batch * p.dim == 0) return result();
  if (p.seqlen == 0) {
    if (p.dinitial_state.ptr && dfinal_state.has_value()) r.dinitial_state.copy_(*dfinal_state);
    else if (p.dinitial_state.ptr) r.dinitial_state.zero_();
    return result();
  }
  // dy in a dtype other than x's or fp32 is read as fp32.
  const at::Tensor dy_direct = (dy.scalar_type() == x.scalar_type() || dy.scalar_type() == at::kFloat) ? dy : dy.to(at::kFloat);
  p.dy = view_bld(dy_direct);
  at::Tensor own_chunk_states;
  if (!p.states.ptr && !p.chunk_states.ptr) {  // nothing saved: a forward pass makes the chunk states
    own_chunk_states = empty_chunk_states(x, x.options().dtype(at::kFloat));
    ScanParams fp = p;
    fp.chunk_states = view_bld(own_chunk_states);
    fp.y = View3{};
    fp.final_state = View3{};
    launch_fwd(fp, x.scalar_type(), x.scalar_type(), x);
    p.chunk_states = fp.chunk_states;
  }
  if (launch_rows_bwd(p, x.scalar_type(), dy_direct.scalar_type())) return result();
  ScratchSpace ws(p, 32 * kBwdRows, x);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_io_dtype(x.scalar_type(), "x", [&](auto tin) {
    using T = decltype(tin);
    dispatch_out_dtype<T>(dy_direct.scalar_type(), [&](auto tdy) {
      using DY = decltype(tdy);
      const int e = sizeof(T);
      const Mode m = pick_mode(p, kBwdRows, {{p.x, e}, {p.a, e}, {p.b, e}, {p.c, e}, {p.dy, int(sizeof(DY))}, {p.states, 4},
                                   {p.dx, e}, {p.da, e}, {p.db, e}, {p.dc, e}});
      mode_switch(m, [&](auto mode) {
        bwd_kernel<T, DY, decltype(mode)::value><<<ws.blocks(), kThreads, 0, stream>>>(p, ws.lb);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return result();
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("scan_bwd", &bwd_cuda); }

}  // namespace scan
}  // namespace ssm_ext
