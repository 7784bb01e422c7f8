// CUDA backward of the first-order scan, one pass from the end of L to its start:
//   carry_t = a_t * dh_t flows to step t-1, dh_t = c_t*dy_t + carry_{t+1} (carry_L = dfinal),
//   dx = b*dh, da = h_{t-1}*dh, db = x*dh, dc = h_t*dy, dinitial = carry_0.
// h comes from the stored states, or is recomputed in each tile from the chunk states exactly
// as the forward computed it (same tiles, same operations), so both give the same bits.
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
  __shared__ float2 pairs[kWarps][kTileRows];
  __shared__ float edge_in[kTileRows];
  __shared__ int64_t scratch;
  const int64_t k = take_ticket(lb, &scratch);
  const int64_t strip = k % lb.n_strips, chunk = lb.n_chunks - 1 - k / lb.n_strips;
  const Block blk = block_of(p, strip, chunk);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, r = threadIdx.x;
  const bool row_thread = r < kTileRows && strip * kTileRows + r < p.batch * p.dim;
  const int64_t rb = row_thread ? (strip * kTileRows + r) / p.dim : 0;
  const int64_t rd = row_thread ? (strip * kTileRows + r) % p.dim : 0;

  float a[kStepsPerThread][kRowsPerThread], x[kStepsPerThread][kRowsPerThread];
  float bb[kStepsPerThread][kRowsPerThread], c[kStepsPerThread][kRowsPerThread];
  float g[kStepsPerThread][kRowsPerThread], h[kStepsPerThread][kRowsPerThread];
  float h_before[kRowsPerThread];  // h_{t0-1} of each row
  load_block<T, M>(p.a, blk, 1.f, a);
  if (!p.states.ptr) {  // for the recompute; read again for dx and db (from L2) to save registers
    load_block<T, M>(p.x, blk, 0.f, x);
    if (p.b.ptr) load_block<T, M>(p.b, blk, 0.f, bb);
  }
  if (p.c.ptr) load_block<T, M>(p.c, blk, 0.f, c);
  load_block<DY, M>(p.dy, blk, 0.f, g);
  auto initial = [&](int64_t b, int64_t d) {
    return p.initial_state.ptr ? load_as<float>(p.initial_state.ptr, p.initial_dtype,
                                                b * p.initial_state.sb + d * p.initial_state.sd)
                               : 0.f;
  };

  if (p.states.ptr) {
    load_block<float, M>(p.states, blk, 0.f, h);
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int64_t b = blk.b[j], d = blk.d[j];
      h_before[j] = !blk.row_ok[j] ? 0.f
                    : blk.t0 == 0  ? initial(b, d)
                                   : static_cast<const float*>(p.states.ptr)[b * p.states.sb + (blk.t0 - 1) * p.states.sl + d * p.states.sd];
    }
  } else {  // recompute as the forward kernel does
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      float2 pu = make_float2(1.f, 0.f);
#pragma unroll
      for (int i = 0; i < kStepsPerThread; ++i) {
        const float u = p.b.ptr ? x[i][j] * bb[i][j] : x[i][j];
        pu = make_float2(a[i][j] * pu.x, a[i][j] * pu.y + u);
      }
      pairs[warp][lane * kRowsPerThread + j] = pu;
    }
    if (row_thread)
      edge_in[r] = static_cast<const float*>(p.chunk_states.ptr)[rb * p.chunk_states.sb + chunk * p.chunk_states.sl + rd * p.chunk_states.sd];
    compose_warps<true>(pairs);
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int row = lane * kRowsPerThread + j;
      const float2 before = pairs[warp][row];
      float hv = before.x * edge_in[row] + before.y;
      h_before[j] = hv;
#pragma unroll
      for (int i = 0; i < kStepsPerThread; ++i) {
        hv = a[i][j] * hv + (p.b.ptr ? x[i][j] * bb[i][j] : x[i][j]);
        h[i][j] = hv;
      }
    }
    __syncthreads();  // pairs and edge_in are reused below
  }

  // dc = h*dy; g = c*dy from here on.
#pragma unroll
  for (int i = 0; i < kStepsPerThread; ++i)
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const float dy = g[i][j];
      if (p.c.ptr) {
        g[i][j] = c[i][j] * dy;
        c[i][j] = h[i][j] * dy;
      }
    }
  if (p.dc.ptr) store_block<T, M>(p.dc, blk, c);

  // The carry map of this thread's steps, last step first: carry -> a*(g + carry).
#pragma unroll
  for (int j = 0; j < kRowsPerThread; ++j) {
    float2 pu = make_float2(1.f, 0.f);
#pragma unroll
    for (int i = kStepsPerThread - 1; i >= 0; --i) pu = make_float2(a[i][j] * pu.x, a[i][j] * (pu.y + g[i][j]));
    pairs[warp][lane * kRowsPerThread + j] = pu;
  }
  const float2 tile = compose_warps<false>(pairs);
  float edge = 0.f;
  if (row_thread && chunk == lb.n_chunks - 1 && p.dfinal_state.ptr)
    edge = static_cast<const float*>(p.dfinal_state.ptr)[rb * p.dfinal_state.sb + rd * p.dfinal_state.sd];
  const float carry_in = chain_tiles(lb, k, tile, edge, &scratch);
  if (row_thread) {
    edge_in[r] = carry_in;
    if (chunk == 0 && p.dinitial_state.ptr)
      store_as(p.dinitial_state.ptr, p.initial_dtype, rb * p.dinitial_state.sb + rd * p.dinitial_state.sd,
               tile.x * carry_in + tile.y);
  }
  __syncthreads();
  if (p.b.ptr) {
    load_block<T, M>(p.x, blk, 0.f, x);
    load_block<T, M>(p.b, blk, 0.f, bb);
  }

  // Outputs in place: dx into bb (or g when b is absent), da into h, db into x.
#pragma unroll
  for (int j = 0; j < kRowsPerThread; ++j) {
    const int row = lane * kRowsPerThread + j;
    const float2 after = pairs[warp][row];
    float carry = after.x * edge_in[row] + after.y;
#pragma unroll
    for (int i = kStepsPerThread - 1; i >= 0; --i) {
      const float dh = g[i][j] + carry;
      carry = a[i][j] * dh;
      const float h_prev = i == 0 ? h_before[j] : h[i - 1][j];
      h[i][j] = h_prev * dh;
      if (p.b.ptr) {
        bb[i][j] = bb[i][j] * dh;
        x[i][j] = x[i][j] * dh;
      } else {
        g[i][j] = dh;
      }
    }
  }
  if (p.b.ptr) store_block<T, M>(p.dx, blk, bb);
  else store_block<T, M>(p.dx, blk, g);
  store_block<T, M>(p.da, blk, h);
  if (p.db.ptr) store_block<T, M>(p.db, blk, x);
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
    own_chunk_states = at::empty({p.batch, num_chunks(p.seqlen), p.dim}, x.options().dtype(at::kFloat));
    ScanParams fp = p;
    fp.chunk_states = view_bld(own_chunk_states);
    fp.y = View3{};
    fp.final_state = View3{};
    launch_fwd(fp, x.scalar_type(), x.scalar_type(), x);
    p.chunk_states = fp.chunk_states;
  }
  ScratchSpace ws(p, x);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_io_dtype(x.scalar_type(), "x", [&](auto tin) {
    using T = decltype(tin);
    dispatch_out_dtype<T>(dy_direct.scalar_type(), [&](auto tdy) {
      using DY = decltype(tdy);
      const int e = sizeof(T);
      const Mode m = pick_mode(p, {{p.x, e}, {p.a, e}, {p.b, e}, {p.c, e}, {p.dy, int(sizeof(DY))}, {p.states, 4},
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
