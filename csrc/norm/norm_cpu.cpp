// CPU kernels for the gated RMSNorm: one pass per row, parallel over rows. dweight and dbias
// are summed per fixed block of rows, then over the blocks in order, so they are deterministic
// whatever the thread count.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "norm/norm.h"

namespace ssm_ext {
namespace norm {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr int64_t kRowsPerBlock = 32;

template <typename acc_t>
inline acc_t sigmoid(acc_t v) { return acc_t(1) / (acc_t(1) + std::exp(-v)); }

// The row's inputs in acc_t: x, silu(z) (1 without z), u = what is normalised.
template <typename scalar_t, typename acc_t>
struct RowIn {
  std::vector<acc_t> x, z, sz, u;
  explicit RowIn(int64_t dim) : x(dim), z(dim), sz(dim, acc_t(1)), u(dim) {}
  void load(const RmsNormParams& p, int64_t r) {
    const scalar_t* xp = static_cast<const scalar_t*>(p.x) + r * p.x_rs;
    const scalar_t* zp = p.z ? static_cast<const scalar_t*>(p.z) + r * p.z_rs : nullptr;
    for (int64_t c = 0; c < p.dim; ++c) {
      x[c] = acc_t(xp[c * p.x_cs]);
      if (zp) {
        z[c] = acc_t(zp[c * p.z_cs]);
        sz[c] = z[c] * sigmoid(z[c]);
      }
      u[c] = (zp && !p.norm_before_gate) ? x[c] * sz[c] : x[c];
    }
  }
};

template <typename scalar_t>
void fwd_kernel(const RmsNormParams& p) {
  using acc_t = acc_type<scalar_t>;
  at::parallel_for(0, p.rows, 16, [&](int64_t begin, int64_t end) {
    RowIn<scalar_t, acc_t> in(p.dim);
    for (int64_t r = begin; r < end; ++r) {
      in.load(p, r);
      scalar_t* out = static_cast<scalar_t*>(p.out) + r * p.dim;
      for (int64_t g = 0; g < p.ngroups; ++g) {
        const int64_t c0 = g * p.group_size, c1 = c0 + p.group_size;
        acc_t ss = 0;
        for (int64_t c = c0; c < c1; ++c) ss += in.u[c] * in.u[c];
        const acc_t rstd = acc_t(1) / std::sqrt(ss / acc_t(p.group_size) + acc_t(p.eps));
        static_cast<acc_t*>(p.rstd)[r * p.ngroups + g] = rstd;
        for (int64_t c = c0; c < c1; ++c) {
          acc_t o = in.u[c] * rstd * load_as<acc_t>(p.weight, p.w_dtype, c * p.w_s);
          if (p.bias) o += load_as<acc_t>(p.bias, p.b_dtype, c * p.b_s);
          if (p.z && p.norm_before_gate) o *= in.sz[c];
          out[c] = scalar_t(o);
        }
      }
    }
  });
}

// With yhat = u*rstd and g = dout (times silu(z) when the gate comes after the norm):
//   dweight += g*yhat, dbias += g, du = rstd*(g*w - yhat*mean(g*w*yhat)) per group;
//   norm_before_gate: dx = du, dz = dout*(yhat*w + b)*silu'(z); else dx = du*silu(z), dz = du*x*silu'(z).
template <typename scalar_t>
void bwd_kernel(const RmsNormParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t nblk = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<acc_t> dw_part(nblk * p.dim, acc_t(0)), db_part(nblk * p.dim, acc_t(0));
  at::parallel_for(0, nblk, 1, [&](int64_t begin, int64_t end) {
    RowIn<scalar_t, acc_t> in(p.dim);
    std::vector<acc_t> w(p.dim), gw(p.dim), yhat(p.dim), go(p.dim);
    for (int64_t c = 0; c < p.dim; ++c) w[c] = load_as<acc_t>(p.weight, p.w_dtype, c * p.w_s);
    for (int64_t blk = begin; blk < end; ++blk) {
      acc_t* dw = &dw_part[blk * p.dim];
      acc_t* db = &db_part[blk * p.dim];
      for (int64_t r = blk * kRowsPerBlock; r < std::min(p.rows, (blk + 1) * kRowsPerBlock); ++r) {
        in.load(p, r);
        const scalar_t* dout = static_cast<const scalar_t*>(p.dout) + r * p.dout_rs;
        scalar_t* dx = static_cast<scalar_t*>(p.dx) + r * p.dim;
        scalar_t* dz = p.dz ? static_cast<scalar_t*>(p.dz) + r * p.dim : nullptr;
        for (int64_t g = 0; g < p.ngroups; ++g) {
          const int64_t c0 = g * p.group_size, c1 = c0 + p.group_size;
          const acc_t rstd = static_cast<const acc_t*>(p.rstd)[r * p.ngroups + g];
          acc_t dot = 0;
          for (int64_t c = c0; c < c1; ++c) {
            go[c] = acc_t(dout[c * p.dout_cs]);
            const acc_t gc = (p.z && p.norm_before_gate) ? go[c] * in.sz[c] : go[c];
            yhat[c] = in.u[c] * rstd;
            dw[c] += gc * yhat[c];
            db[c] += gc;
            gw[c] = gc * w[c];
            dot += gw[c] * yhat[c];
          }
          const acc_t mean = dot / acc_t(p.group_size);
          for (int64_t c = c0; c < c1; ++c) {
            const acc_t du = rstd * (gw[c] - yhat[c] * mean);
            if (!p.z) {
              dx[c] = scalar_t(du);
              continue;
            }
            const acc_t s = sigmoid(in.z[c]), dsilu = s * (acc_t(1) + in.z[c] * (acc_t(1) - s));
            if (p.norm_before_gate) {
              acc_t o = yhat[c] * w[c];
              if (p.bias) o += load_as<acc_t>(p.bias, p.b_dtype, c * p.b_s);
              dx[c] = scalar_t(du);
              dz[c] = scalar_t(go[c] * o * dsilu);
            } else {
              dx[c] = scalar_t(du * in.sz[c]);
              dz[c] = scalar_t(du * in.x[c] * dsilu);
            }
          }
        }
      }
    }
  });
  at::parallel_for(0, p.dim, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) store_param_grads(p, dw_part.data(), db_part.data(), nblk, c);
  });
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& z,
                                           double eps, int64_t group_size, bool norm_before_gate) {
  FwdArgs r = prepare_fwd(x, weight, bias, z, eps, group_size, norm_before_gate);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rmsnorm_gated_fwd",
                                  [&] { fwd_kernel<scalar_t>(r.p); });
  return {r.out, r.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& z, const at::Tensor& rstd, int64_t group_size, bool norm_before_gate) {
  BwdArgs r = prepare_bwd(dout, x, weight, bias, z, rstd, group_size, norm_before_gate);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rmsnorm_gated_bwd",
                                  [&] { bwd_kernel<scalar_t>(r.p); });
  return {r.dx, r.dweight, r.dbias, r.dz};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CPU, m) {
  m.impl("rmsnorm_gated_fwd", &fwd_cpu);
  m.impl("rmsnorm_gated_bwd", &bwd_cpu);
}

}  // namespace norm
}  // namespace ssm_ext
