// CUDA forward of the ISSM scan: one chunk kernel with the state passing inside the launch (plus
// ypart_kernel for N > 256); see issm_cuda.cuh. Same semantics as issm_cpu.cpp's forward.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "issm/issm.h"
#include "issm/issm_cuda.cuh"

namespace ssm_ext {
namespace issm {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                            const at::Tensor& B, const at::Tensor& C, int64_t chunk_size,
                                            const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                                            const c10::optional<at::Tensor>& dt_bias,
                                            const c10::optional<at::Tensor>& initial_states,
                                            const c10::optional<at::Tensor>& seq_idx,
                                            const c10::optional<at::Tensor>& cu_seqlens, bool dt_softplus,
                                            double dt_limit_lo, double dt_limit_hi, bool return_final_states) {
  FwdArgs r = prepare_fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                          dt_softplus, dt_limit_lo, dt_limit_hi, return_final_states);
  const c10::cuda::CUDAGuard guard(x.device());
  const IssmParams& p = r.p;
  TORCH_CHECK(p.dstate > 0, msg("dstate (B.size(3)) must be > 0 on CUDA, got ", p.dstate));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor chunk_states = at::empty({0}, x.options().dtype(at::kFloat));
  dispatch_io_dtype(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    if (p.headdim == 0 || p.nheads == 0) return;  // out is empty; final states too (P or H is 0)
    const Tiling tl = make_tiling(p, kFwdChunk, 8);
    const auto f32 = x.options().dtype(at::kFloat);
    const int64_t n_states = int64_t(tl.nrows) * tl.nchunks * p.nheads * p.headdim * p.dstate;
    Bufs bufs;
    at::Tensor states;
    if (!p.z.ptr && n_states > 0) {  // kept for the backward: the entering states, then the decay products
      chunk_states = at::empty({n_states + int64_t(tl.nrows) * tl.nchunks * p.nheads * p.dstate}, f32);
      bufs.states = chunk_states.data_ptr<float>();
      bufs.prod = bufs.states + n_states;
    } else {
      states = at::empty({std::max<int64_t>(n_states, 1)}, f32);
      bufs.states = states.data_ptr<float>();
    }
    at::Tensor ypart;
    if (tl.ntn > 1) {
      ypart = at::empty({int64_t(tl.ntn) * tl.nrows * p.seqlen * p.nheads * p.headdim}, f32);
      bufs.ypart = ypart.data_ptr<float>();
    }
    run_forward<T, kOut>(p, tl, bufs, x, stream);
    if (p.final_states.ptr && (p.cu_seqlens || p.seqlen == 0) && p.nseq > 0) {
      empty_segments_kernel<false><<<blocks_for(p.nseq * p.nheads * p.headdim * p.dstate, 256), 256, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {r.out, r.final_states, chunk_states};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("issm_fwd", &fwd_cuda); }

}  // namespace issm
}  // namespace ssm_ext
