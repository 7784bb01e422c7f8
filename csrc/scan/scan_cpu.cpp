// CPU kernels for the first-order scan: one sequential loop over L per (batch, channel),
// parallel over (batch, channel).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "scan/scan.h"

namespace ssm_ext {
namespace scan {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline int64_t at_bld(const View3& v, int64_t b, int64_t t, int64_t d) { return b * v.sb + t * v.sl + d * v.sd; }

// Reads element (b, t, d) of an input view, or 1 when the view is absent (b or c None).
template <typename scalar_t, typename acc_t>
inline acc_t input_or_one(const View3& v, int64_t b, int64_t t, int64_t d) {
  return v.ptr ? acc_t(static_cast<const scalar_t*>(v.ptr)[at_bld(v, b, t, d)]) : acc_t(1);
}

template <typename acc_t>
inline acc_t initial(const ScanParams& p, int64_t b, int64_t d) {
  return p.initial_state.ptr ? load_as<acc_t>(p.initial_state.ptr, p.initial_dtype, at_bld(p.initial_state, b, 0, d))
                             : acc_t(0);
}

template <typename scalar_t>
void fwd_kernel(const ScanParams& p) {
  using acc_t = acc_type<scalar_t>;
  at::parallel_for(0, p.batch * p.dim, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.dim, d = row % p.dim;
      acc_t h = initial<acc_t>(p, b, d);
      for (int64_t t = 0; t < p.seqlen; ++t) {
        const acc_t x = acc_t(static_cast<const scalar_t*>(p.x.ptr)[at_bld(p.x, b, t, d)]);
        const acc_t a = acc_t(static_cast<const scalar_t*>(p.a.ptr)[at_bld(p.a, b, t, d)]);
        h = a * h + input_or_one<scalar_t, acc_t>(p.b, b, t, d) * x;
        store_as(p.y.ptr, p.y_dtype, at_bld(p.y, b, t, d), input_or_one<scalar_t, acc_t>(p.c, b, t, d) * h);
        if (p.states.ptr) static_cast<acc_t*>(p.states.ptr)[at_bld(p.states, b, t, d)] = h;
      }
      static_cast<acc_t*>(p.final_state.ptr)[at_bld(p.final_state, b, 0, d)] = h;
    }
  });
}

// dh_t = c_t*dy_t + a_{t+1}*dh_{t+1} (+ dfinal at t = L-1); dx = b*dh, db = x*dh,
// da = h_{t-1}*dh, dc = h*dy, dinitial = a_0*dh_0. Without stored states, each row's h is
// recomputed into a buffer of L values (never a (B, L, D) tensor).
template <typename scalar_t>
void bwd_kernel(const ScanParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t L = p.seqlen;
  at::parallel_for(0, p.batch * p.dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> hbuf(p.states.ptr ? 0 : L);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.dim, d = row % p.dim;
      auto x = [&](int64_t t) { return acc_t(static_cast<const scalar_t*>(p.x.ptr)[at_bld(p.x, b, t, d)]); };
      auto a = [&](int64_t t) { return acc_t(static_cast<const scalar_t*>(p.a.ptr)[at_bld(p.a, b, t, d)]); };
      const acc_t h0 = initial<acc_t>(p, b, d);
      if (!p.states.ptr) {
        acc_t h = h0;
        for (int64_t t = 0; t < L; ++t) hbuf[t] = h = a(t) * h + input_or_one<scalar_t, acc_t>(p.b, b, t, d) * x(t);
      }
      auto h = [&](int64_t t) {
        if (t < 0) return h0;
        return p.states.ptr ? static_cast<const acc_t*>(p.states.ptr)[at_bld(p.states, b, t, d)] : hbuf[t];
      };
      acc_t carry = p.dfinal_state.ptr ? static_cast<const acc_t*>(p.dfinal_state.ptr)[at_bld(p.dfinal_state, b, 0, d)]
                                       : acc_t(0);
      for (int64_t t = L - 1; t >= 0; --t) {
        const acc_t dy = load_as<acc_t>(p.dy.ptr, p.dy_dtype, at_bld(p.dy, b, t, d));
        const acc_t g = input_or_one<scalar_t, acc_t>(p.c, b, t, d) * dy + carry;
        auto put = [&](const View3& v, acc_t val) { static_cast<scalar_t*>(v.ptr)[at_bld(v, b, t, d)] = scalar_t(val); };
        put(p.dx, input_or_one<scalar_t, acc_t>(p.b, b, t, d) * g);
        put(p.da, h(t - 1) * g);
        if (p.db.ptr) put(p.db, x(t) * g);
        if (p.dc.ptr) put(p.dc, h(t) * dy);
        carry = a(t) * g;
      }
      if (p.dinitial_state.ptr)
        store_as(p.dinitial_state.ptr, p.initial_dtype, at_bld(p.dinitial_state, b, 0, d), carry);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& x, const at::Tensor& a,
                                                       const c10::optional<at::Tensor>& b,
                                                       const c10::optional<at::Tensor>& c,
                                                       const c10::optional<at::Tensor>& initial_state,
                                                       bool store_states, c10::optional<at::ScalarType> out_dtype) {
  FwdArgs r = prepare_fwd(x, a, b, c, initial_state, store_states, out_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scan_fwd",
                                  [&] { fwd_kernel<scalar_t>(r.p); });
  return {r.y, r.final_state, r.states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& x, const at::Tensor& a, const c10::optional<at::Tensor>& b,
    const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& initial_state,
    const c10::optional<at::Tensor>& states, const at::Tensor& dy, const c10::optional<at::Tensor>& dfinal_state) {
  BwdArgs r = prepare_bwd(x, a, b, c, initial_state, states, dy, dfinal_state);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scan_bwd",
                                  [&] { bwd_kernel<scalar_t>(r.p); });
  return {r.dx, r.da, r.db, r.dc, r.dinitial_state};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CPU, m) {
  m.impl("scan_fwd", &fwd_cpu);
  m.impl("scan_bwd", &bwd_cpu);
}

}  // namespace scan
}  // namespace ssm_ext
