// CPU kernels for the first-order scan: one sequential loop over L per (batch, channel),
// parallel over (batch, channel).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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
        if (p.chunk_states.ptr && t % kChunk == 0)
          static_cast<acc_t*>(p.chunk_states.ptr)[at_bld(p.chunk_states, b, t / kChunk, d)] = h;
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
// da = h_{t-1}*dh, dc = h*dy, dinitial = a_0*dh_0. Walks each row's chunks from the last; a
// chunk's h comes from the stored states, or is recomputed from the chunk's start state
// (chunk_states, or a first pass over the row when neither is given).
template <typename scalar_t>
void bwd_kernel(const ScanParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t L = p.seqlen, nc = num_chunks(L);
  at::parallel_for(0, p.batch * p.dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> starts(nc), hbuf(kChunk + 1);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.dim, d = row % p.dim;
      auto x = [&](int64_t t) { return acc_t(static_cast<const scalar_t*>(p.x.ptr)[at_bld(p.x, b, t, d)]); };
      auto a = [&](int64_t t) { return acc_t(static_cast<const scalar_t*>(p.a.ptr)[at_bld(p.a, b, t, d)]); };
      auto bx = [&](int64_t t) { return input_or_one<scalar_t, acc_t>(p.b, b, t, d) * x(t); };
      const acc_t h0 = initial<acc_t>(p, b, d);
      if (!p.states.ptr) {
        if (p.chunk_states.ptr) {
          for (int64_t j = 0; j < nc; ++j)
            starts[j] = static_cast<const acc_t*>(p.chunk_states.ptr)[at_bld(p.chunk_states, b, j, d)];
        } else {
          acc_t h = h0;
          for (int64_t t = 0; t < L; ++t) {
            if (t % kChunk == 0) starts[t / kChunk] = h;
            h = a(t) * h + bx(t);
          }
        }
      }
      acc_t carry = p.dfinal_state.ptr ? static_cast<const acc_t*>(p.dfinal_state.ptr)[at_bld(p.dfinal_state, b, 0, d)]
                                       : acc_t(0);
      for (int64_t j = nc - 1; j >= 0; --j) {
        const int64_t t0 = j * kChunk, t1 = std::min(L, t0 + kChunk);
        // hbuf[i] = h_{t0 + i - 1}
        for (int64_t t = t0 - 1; t < t1; ++t) {
          acc_t h;
          if (p.states.ptr) {
            h = t < 0 ? h0 : static_cast<const acc_t*>(p.states.ptr)[at_bld(p.states, b, t, d)];
          } else {
            h = t < t0 ? starts[j] : a(t) * hbuf[t - t0] + bx(t);
          }
          hbuf[t - t0 + 1] = h;
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
          const acc_t dy = load_as<acc_t>(p.dy.ptr, p.dy_dtype, at_bld(p.dy, b, t, d));
          const acc_t g = input_or_one<scalar_t, acc_t>(p.c, b, t, d) * dy + carry;
          auto put = [&](const View3& v, acc_t val) { static_cast<scalar_t*>(v.ptr)[at_bld(v, b, t, d)] = scalar_t(val); };
          put(p.dx, input_or_one<scalar_t, acc_t>(p.b, b, t, d) * g);
          put(p.da, hbuf[t - t0] * g);
          if (p.db.ptr) put(p.db, x(t) * g);
          if (p.dc.ptr) put(p.dc, hbuf[t - t0 + 1] * dy);
          carry = a(t) * g;
        }
      }
      if (p.dinitial_state.ptr)
        store_as(p.dinitial_state.ptr, p.initial_dtype, at_bld(p.dinitial_state, b, 0, d), carry);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& x, const at::Tensor& a,
                                                       const c10::optional<at::Tensor>& b,
                                                       const c10::optional<at::Tensor>& c,
                                                       const c10::optional<at::Tensor>& initial_state,
                                                       bool store_states, c10::optional<at::ScalarType> out_dtype) {
  FwdArgs r = prepare_fwd(x, a, b, c, initial_state, store_states, out_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "scan_fwd",
                                  [&] { fwd_kernel<scalar_t>(r.p); });
  return {r.y, r.final_state, r.states, r.chunk_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& x, const at::Tensor& a, const c10::optional<at::Tensor>& b,
    const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& initial_state,
    const c10::optional<at::Tensor>& states, const c10::optional<at::Tensor>& chunk_states, const at::Tensor& dy,
    const c10::optional<at::Tensor>& dfinal_state) {
  BwdArgs r = prepare_bwd(x, a, b, c, initial_state, states, chunk_states, dy, dfinal_state);
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
