// Argument checking for the gated RMSNorm ops, shared by CPU and CUDA.
#include "norm/norm.h"

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "common/checks.h"

namespace ssm_ext {
namespace norm {
namespace {

std::string num(double v) {  // snprintf, never an ostream (see common/checks.h)
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

at::ScalarType state_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// x's leading dims flattened: (rows, dim), a view when the strides allow it.
at::Tensor as_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return t.reshape({rows, t.size(-1)});
}

std::vector<int64_t> rstd_shape(const at::Tensor& x, int64_t ngroups) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end() - 1);
  s.push_back(ngroups);
  return s;
}

// Checks what the forward and backward share; fills the sizes, x, z, weight and bias.
void check_common(RmsNormParams& p, at::Tensor& x2, at::Tensor& z2, const at::Tensor& x, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& z, int64_t group_size,
                  bool norm_before_gate) {
  TORCH_CHECK(x.dim() >= 1, msg("x must have at least 1 dim (..., hidden_size), got a 0-D tensor"));
  check_input_dtype(x, "x");
  const int64_t dim = x.size(-1);
  check_same_device(weight, "weight", x, "x");
  check_input_dtype(weight, "weight");
  check_shape(weight, "weight", {dim}, "(hidden_size,) = (x.size(-1),)");
  TORCH_CHECK(group_size > 0 && dim % group_size == 0,
              msg("group_size must be > 0 and divide hidden_size (x.size(-1) = ", dim, "), got ", group_size));
  if (bias.has_value()) {
    check_same_device(*bias, "bias", x, "x");
    check_input_dtype(*bias, "bias");
    check_shape(*bias, "bias", {dim}, "(hidden_size,) = (x.size(-1),)");
    p.bias = bias->data_ptr();
    p.b_s = bias->stride(0);
    p.b_dtype = dtype_of(*bias);
  }
  x2 = as_rows(x);
  if (z.has_value()) {
    check_same_device(*z, "z", x, "x");
    check_dtype(*z, "z", x.scalar_type());
    check_shape(*z, "z", x.sizes(), "like x");
    z2 = as_rows(*z);
    p.z = z2.data_ptr();
    p.z_rs = z2.stride(0);
    p.z_cs = z2.stride(1);
  }
  p.rows = x2.size(0);
  p.dim = dim;
  p.group_size = group_size;
  p.ngroups = dim / group_size;
  p.norm_before_gate = norm_before_gate;
  p.x_dtype = dtype_of(x);
  p.x = x2.data_ptr();
  p.x_rs = x2.stride(0);
  p.x_cs = x2.stride(1);
  p.weight = weight.data_ptr();
  p.w_s = weight.stride(0);
  p.w_dtype = dtype_of(weight);
}

}  // namespace

FwdArgs prepare_fwd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& z, double eps, int64_t group_size, bool norm_before_gate) {
  FwdArgs r;
  RmsNormParams& p = r.p;
  check_common(p, r.x2, r.z2, x, weight, bias, z, group_size, norm_before_gate);
  TORCH_CHECK(eps >= 0, msg("eps must be >= 0, got ", num(eps)));
  p.eps = eps;
  r.out = at::empty(x.sizes(), x.options());
  r.rstd = at::empty(rstd_shape(x, p.ngroups), x.options().dtype(state_dtype(x)));
  p.out = r.out.data_ptr();
  p.rstd = r.rstd.data_ptr();
  return r;
}

BwdArgs prepare_bwd(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& z,
                    const at::Tensor& rstd, int64_t group_size, bool norm_before_gate) {
  BwdArgs r;
  RmsNormParams& p = r.p;
  check_common(p, r.x2, r.z2, x, weight, bias, z, group_size, norm_before_gate);
  check_same_device(dout, "dout", x, "x");
  check_dtype(dout, "dout", x.scalar_type());
  check_shape(dout, "dout", x.sizes(), "like x");
  check_same_device(rstd, "rstd", x, "x");
  check_dtype(rstd, "rstd", state_dtype(x));
  check_shape(rstd, "rstd", rstd_shape(x, p.ngroups), "(..., ngroups) as returned by the forward");
  r.dout2 = as_rows(dout);
  r.rstd = rstd.contiguous();
  p.dout = r.dout2.data_ptr();
  p.dout_rs = r.dout2.stride(0);
  p.dout_cs = r.dout2.stride(1);
  p.rstd = r.rstd.data_ptr();
  r.dx = at::empty(x.sizes(), x.options());
  r.dweight = at::empty(weight.sizes(), weight.options());
  r.dbias = bias.has_value() ? at::empty(bias->sizes(), bias->options()) : at::empty({0}, x.options());
  r.dz = z.has_value() ? at::empty(z->sizes(), z->options()) : at::empty({0}, x.options());
  p.dx = r.dx.data_ptr();
  p.dweight = r.dweight.data_ptr();
  p.dbias = bias.has_value() ? r.dbias.data_ptr() : nullptr;
  p.dz = z.has_value() ? r.dz.data_ptr() : nullptr;
  return r;
}

}  // namespace norm
}  // namespace ssm_ext
