// Gated RMSNorm (SPEC.md section 3, mamba_ssm layernorm_gated semantics) over rows of x viewed
// as (rows, dim), normalised per group of group_size channels:
//   norm_before_gate: out = rmsnorm(x) * w (+ b) then * silu(z)
//   else:             out = rmsnorm(x * silu(z)) * w (+ b)
// rmsnorm(u) = u * rstd, rstd = 1 / sqrt(mean(u^2 over the group) + eps).
// The params struct shared by the CPU and CUDA kernels, and the argument checking both go through.
#pragma once
#include <ATen/ATen.h>

#include "common/load.h"

namespace ssm_ext {
namespace norm {

struct RmsNormParams {
  int64_t rows = 0, dim = 0, group_size = 0, ngroups = 0;
  double eps = 1e-6;
  bool norm_before_gate = true;
  Dtype x_dtype = Dtype::f32;  // x, z, out, dout, dx, dz
  Dtype w_dtype = Dtype::f32, b_dtype = Dtype::f32;
  // (rows, dim) views: element (r, c) at ptr[r * row_stride + c * col_stride]
  const void* x = nullptr;
  int64_t x_rs = 0, x_cs = 0;
  const void* z = nullptr;  // absent: no gate
  int64_t z_rs = 0, z_cs = 0;
  const void* weight = nullptr;  // (dim,)
  int64_t w_s = 0;
  const void* bias = nullptr;    // (dim,) or absent
  int64_t b_s = 0;
  void* out = nullptr;           // (rows, dim) contiguous
  void* rstd = nullptr;          // (rows, ngroups) contiguous, fp32 (fp64 for fp64 x)
  // backward (rstd as given by the forward; outputs contiguous)
  const void* dout = nullptr;
  int64_t dout_rs = 0, dout_cs = 0;
  void* dx = nullptr;
  void* dz = nullptr;
  void* dweight = nullptr;  // in weight's dtype
  void* dbias = nullptr;    // in bias's dtype
};

// dweight[c] (and dbias[c]) from per-block partials laid out (nblk, dim), summed in block order:
// one fixed order, shared by the CPU and CUDA backward.
template <typename acc_t>
C10_HOST_DEVICE inline void store_param_grads(const RmsNormParams& p, const acc_t* dw_part, const acc_t* db_part,
                                              int64_t nblk, int64_t c) {
  acc_t sw = 0, sb = 0;
  for (int64_t blk = 0; blk < nblk; ++blk) {
    sw += dw_part[blk * p.dim + c];
    sb += db_part[blk * p.dim + c];
  }
  store_as(p.dweight, p.w_dtype, c, sw);
  if (p.dbias) store_as(p.dbias, p.b_dtype, c, sb);
}

struct FwdArgs {
  at::Tensor out, rstd;
  at::Tensor x2, z2;  // (rows, dim) views (or copies) kept alive while the kernel runs
  RmsNormParams p;
};
struct BwdArgs {
  at::Tensor dx, dweight, dbias, dz;
  at::Tensor x2, z2, dout2, rstd;
  RmsNormParams p;
};

FwdArgs prepare_fwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& z, double eps, int64_t group_size, bool norm_before_gate);
BwdArgs prepare_bwd(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& z,
                    const at::Tensor& rstd, int64_t group_size, bool norm_before_gate);

}  // namespace norm
}  // namespace ssm_ext
