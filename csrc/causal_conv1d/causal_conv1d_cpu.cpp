// CPU kernels for causal conv1d: plain loops over rows, parallel over (batch, channel).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/causal_conv1d_math.h"
#include "common/checks.h"

namespace ssm_ext {
namespace conv1d {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename scalar_t>
inline scalar_t& at3(const View3& v, int64_t b, int64_t d, int64_t t) {
  return static_cast<scalar_t*>(v.ptr)[b * v.sb + d * v.sd + t * v.sl];
}

template <typename scalar_t>
void fwd_kernel(const ConvParams& p) {
  using acc_t = acc_type<scalar_t>;
  at::parallel_for(0, p.batch * p.dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> w(p.width);
    acc_t bias;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.dim, d = row % p.dim;
      load_row_weights(p, d, w.data(), &bias);
      for (int64_t t = 0; t < p.seqlen; ++t)
        at3<scalar_t>(p.out, b, d, t) = scalar_t(out_at<scalar_t, acc_t>(p, b, d, t, w.data(), bias));
      if (p.final_states.ptr != nullptr)
        for (int64_t j = 0; j < p.width - 1; ++j)
          at3<scalar_t>(p.final_states, b, d, j) = scalar_t(final_at<scalar_t, acc_t>(p, b, d, j));
    }
  });
}

// dweight/dbias partials: one per batch row, so that each (b, d) owns its slot.
template <typename scalar_t>
void bwd_kernel(const ConvParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t W = p.width, L = p.seqlen;
  at::parallel_for(0, p.batch * p.dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> w(W), dz(L);
    acc_t bias;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.dim, d = row % p.dim;
      load_row_weights(p, d, w.data(), &bias);
      for (int64_t t = 0; t < L; ++t) dz[t] = dz_at<scalar_t, acc_t>(p, b, d, t, w.data(), bias);
      auto dz_fn = [&](int64_t t) { return dz[t]; };
      for (int64_t i = -(W - 1); i < L; ++i) {
        const acc_t g = dxe_at<scalar_t, acc_t>(p, b, d, i, w.data(), dz_fn);
        if (i >= 0) {
          at3<scalar_t>(p.dx, b, d, i) = scalar_t(g);
        } else if (p.dinitial_states.ptr != nullptr) {
          at3<scalar_t>(p.dinitial_states, b, d, W - 1 + i) = scalar_t(g);
        }
      }
      acc_t db = 0;
      for (int64_t t = 0; t < L; ++t) db += dz[t];
      p.dbias_part[b * p.dim + d] = float(db);
      for (int64_t k = 0; k < W; ++k) {
        acc_t dw = 0;
        for (int64_t t = 0; t < L; ++t) {
          const int64_t i = t - (W - 1) + k;
          if (seq_at(p, b, i) == seq_at(p, b, t)) dw += dz[t] * xe_at<scalar_t, acc_t>(p, b, d, i);
        }
        p.dweight_part[(b * p.dim + d) * W + k] = float(dw);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                           const c10::optional<at::Tensor>& bias,
                                           const c10::optional<at::Tensor>& seq_idx,
                                           const c10::optional<at::Tensor>& initial_states,
                                           bool return_final_states, bool silu) {
  FwdArgs a = prepare_fwd(x, weight, bias, seq_idx, initial_states, return_final_states, silu);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "causal_conv1d_fwd",
                                  [&] { fwd_kernel<scalar_t>(a.p); });
  return {a.out, a.final_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& seq_idx, const c10::optional<at::Tensor>& initial_states,
    const at::Tensor& dout, const c10::optional<at::Tensor>& dfinal_states, bool silu) {
  BwdArgs a = prepare_bwd(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu);
  at::Tensor dweight_part, dbias_part;
  alloc_param_partials(a, a.p.batch, dweight_part, dbias_part);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "causal_conv1d_bwd",
                                  [&] { bwd_kernel<scalar_t>(a.p); });
  auto [dweight, dbias] = finish_param_grads(dweight_part, dbias_part, weight, bias);
  return {a.dx, dweight, dbias, a.dinitial_states};
}

template <typename scalar_t>
void update_kernel(const UpdateParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t W = p.width, S = p.state_len, L = p.seqlen;
  at::parallel_for(0, p.batch * p.dim, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> w(W), win(W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.dim, d = row % p.dim;
      const int64_t pool_row = p.conv_state_indices ? p.conv_state_indices[b] : b;
      if (pool_row < 0) {
        for (int64_t t = 0; t < L; ++t) at3<scalar_t>(p.out, b, d, t) = scalar_t(0);
        continue;
      }
      for (int64_t k = 0; k < W; ++k)
        w[k] = load_as<acc_t>(p.weight, p.weight_dtype, d * p.weight_sd + k * p.weight_sw);
      const acc_t bias = p.bias ? load_as<acc_t>(p.bias, p.bias_dtype, d * p.bias_sd) : acc_t(0);
      scalar_t* state = &at3<scalar_t>(p.conv_state, pool_row, d, 0);
      const int64_t ss = p.conv_state.sl;
      // start: index of the oldest of the W-1 inputs that precede token 0
      const int64_t head = p.cache_seqlens ? ((p.cache_seqlens[b] % S) + S) % S : S;
      for (int64_t i = 0; i < W - 1; ++i) win[i] = acc_t(state[((head - (W - 1) + i) % S + S) % S * ss]);
      for (int64_t t = 0; t < L; ++t) {
        const scalar_t xt = at3<scalar_t>(p.x, b, d, t);
        win[W - 1] = acc_t(xt);
        acc_t v = bias;
        for (int64_t k = 0; k < W; ++k) v += w[k] * win[k];
        at3<scalar_t>(p.out, b, d, t) = scalar_t(p.silu ? v * sigmoid(v) : v);
        for (int64_t k = 0; k + 1 < W; ++k) win[k] = win[k + 1];
        if (p.cache_seqlens) state[(head + t) % S * ss] = xt;
      }
      if (!p.cache_seqlens) {  // shift left by L and append x (reads stay ahead of writes)
        for (int64_t i = 0; i < S; ++i) {
          const int64_t src = i + L;
          state[i * ss] = src < S ? state[src * ss] : at3<scalar_t>(p.x, b, d, src - S);
        }
      }
    }
  });
}

at::Tensor update_cpu(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                      const c10::optional<at::Tensor>& bias, bool silu,
                      const c10::optional<at::Tensor>& cache_seqlens,
                      const c10::optional<at::Tensor>& conv_state_indices) {
  UpdateArgs a = prepare_update(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices);
  const UpdateParams& p = a.p;
  if (conv_state_indices.has_value() && p.batch > 0) {
    const int64_t hi = conv_state_indices->max().item<int64_t>();
    TORCH_CHECK(hi < p.pool_size, msg("conv_state_indices must be < conv_state.size(0) = ",
                p.pool_size, ", got ", hi));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "causal_conv1d_update",
                                  [&] { update_kernel<scalar_t>(p); });
  return a.out;
}

at::Tensor varlen_states_cpu(const at::Tensor& x, const at::Tensor& cu_seqlens_in, int64_t state_len) {
  check_varlen_states(x, cu_seqlens_in, state_len);
  const at::Tensor cu = cu_seqlens_in.to(at::kLong).contiguous();
  const int64_t nseq = cu.size(0) - 1, D = x.size(1), total = x.size(0);
  const int64_t* c = cu.data_ptr<int64_t>();
  TORCH_CHECK(c[0] >= 0, msg("cu_seqlens must start at >= 0, got ", c[0]));
  for (int64_t i = 0; i < nseq; ++i)
    TORCH_CHECK(c[i] <= c[i + 1], msg("cu_seqlens must be non-decreasing, got ", c[i], " then ", c[i + 1],
                " at index ", i));
  TORCH_CHECK(c[nseq] <= total, msg("cu_seqlens[-1] = ", c[nseq], " exceeds x.size(0) = ", total));
  at::Tensor states = at::zeros({nseq, state_len, D}, x.options()).transpose(1, 2);
  for (int64_t i = 0; i < nseq; ++i) {
    const int64_t n = std::min(c[i + 1] - c[i], state_len);
    if (n > 0)
      states[i].narrow(1, state_len - n, n).copy_(x.narrow(0, c[i + 1] - n, n).t());
  }
  return states;
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CPU, m) {
  m.impl("causal_conv1d_fwd", &fwd_cpu);
  m.impl("causal_conv1d_bwd", &bwd_cpu);
  m.impl("causal_conv1d_update", &update_cpu);
  m.impl("causal_conv1d_varlen_states", &varlen_states_cpu);
}

}  // namespace conv1d
}  // namespace ssm_ext
