// CPU kernels for HSTU attention, dense and block-sparse: one task per (sequence, head), run
// in parallel. A task copies its head's q, k, v rows into contiguous acc_t buffers (fp32, fp64
// for fp64 inputs), forms the block means, and walks the queries in order; gradients of k and
// v land in per-task buffers, so no two tasks write the same element.
//
// Every branch is one call of attend_fwd / attend_bwd over a range of key rows: the dense
// attention over [0, t], the window over (t - W, t], a selected block over its keys <= t, and
// the compressed branch over the means of the complete blocks (with no mask).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "hstu_bsa/hstu_bsa.h"

namespace ssm_ext {
namespace hstu_bsa {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
inline acc_t sigmoid(acc_t s) {
  return acc_t(1) / (acc_t(1) + std::exp(-s));
}

// mask(t, j) for one query row t of one sequence; absent means 1.
template <typename acc_t>
struct MaskRow {
  const void* ptr = nullptr;
  int64_t base = 0, sj = 0;
  Dtype dt = Dtype::f32;
  acc_t at(int64_t j) const { return ptr ? load_as<acc_t>(ptr, dt, base + j * sj) : acc_t(1); }
};

// The keys a query attends to: rows of K (dim_qk wide) and V (dim_v wide), weighted by
// w_j = silu(alpha q.K_j) * inv_n * mask_j.
template <typename acc_t>
struct Keys {
  const acc_t* K;
  const acc_t* V;
  int64_t dim_qk, dim_v;
  acc_t alpha, inv_n;
  MaskRow<acc_t> mask;
};

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t d) {
  acc_t s = 0;
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

// o += sum_{j0 <= j < j1} w_j V_j.
template <typename acc_t>
void attend_fwd(const Keys<acc_t>& ks, const acc_t* q, int64_t j0, int64_t j1, acc_t* o) {
  for (int64_t j = j0; j < j1; ++j) {
    const acc_t s = ks.alpha * dot(q, ks.K + j * ks.dim_qk, ks.dim_qk);
    const acc_t w = s * sigmoid(s) * ks.inv_n * ks.mask.at(j);
    const acc_t* vj = ks.V + j * ks.dim_v;
    for (int64_t i = 0; i < ks.dim_v; ++i) o[i] += w * vj[i];
  }
}

// The same keys backwards, with g the gradient reaching this branch's sum (gate * dA):
// o += w_j V_j (the branch output, for the gate gradient); dV_j += w_j g;
// ds_j = (g.V_j) * inv_n * mask_j * silu'(s_j); dq += alpha ds_j K_j; dK_j += alpha ds_j q.
template <typename acc_t>
void attend_bwd(const Keys<acc_t>& ks, const acc_t* q, int64_t j0, int64_t j1, const acc_t* g, acc_t* o,
                acc_t* dq, acc_t* dK, acc_t* dV) {
  for (int64_t j = j0; j < j1; ++j) {
    const acc_t* kj = ks.K + j * ks.dim_qk;
    const acc_t* vj = ks.V + j * ks.dim_v;
    const acc_t s = ks.alpha * dot(q, kj, ks.dim_qk);
    const acc_t sg = sigmoid(s);
    const acc_t m = ks.inv_n * ks.mask.at(j);
    const acc_t w = s * sg * m;
    acc_t* dvj = dV + j * ks.dim_v;
    for (int64_t i = 0; i < ks.dim_v; ++i) {
      o[i] += w * vj[i];
      dvj[i] += w * g[i];
    }
    const acc_t ds = ks.alpha * dot(g, vj, ks.dim_v) * m * sg * (acc_t(1) + s * (acc_t(1) - sg));
    acc_t* dkj = dK + j * ks.dim_qk;
    for (int64_t i = 0; i < ks.dim_qk; ++i) {
      dq[i] += ds * kj[i];
      dkj[i] += ds * q[i];
    }
  }
}

// One (sequence, head): its rows of q, k (and v) as contiguous acc_t buffers, and the means
// of k (and v) over its complete blocks.
template <typename scalar_t, typename acc_t>
struct Head {
  int64_t b, h, start, len;
  std::vector<acc_t> q, k, v, kbar, vbar;

  Head(const HstuParams& p, int64_t task, bool with_v, bool with_means)
      : b(task / p.heads), h(task % p.heads), start(p.offsets[b]), len(p.offsets[b + 1] - start) {
    q = load(p.q, p.dim_qk);
    k = load(p.k, p.dim_qk);
    if (with_v) v = load(p.v, p.dim_v);
    if (with_means) {
      kbar = means(k, p.dim_qk, p.block_size);
      if (with_v) vbar = means(v, p.dim_v, p.block_size);
    }
  }

  std::vector<acc_t> load(const Mat& m, int64_t d) const {
    std::vector<acc_t> r(len * d);
    const scalar_t* src = static_cast<const scalar_t*>(m.ptr);
    for (int64_t t = 0; t < len; ++t)
      for (int64_t i = 0; i < d; ++i) r[t * d + i] = acc_t(src[at(m, t, d, i)]);
    return r;
  }

  std::vector<acc_t> means(const std::vector<acc_t>& x, int64_t d, int64_t bs) const {
    const int64_t nb = len / bs;
    std::vector<acc_t> r(nb * d, acc_t(0));
    for (int64_t c = 0; c < nb; ++c) {
      for (int64_t j = c * bs; j < (c + 1) * bs; ++j)
        for (int64_t i = 0; i < d; ++i) r[c * d + i] += x[j * d + i];
      for (int64_t i = 0; i < d; ++i) r[c * d + i] /= acc_t(bs);
    }
    return r;
  }

  MaskRow<acc_t> mask_row(const HstuParams& p, int64_t t) const {
    MaskRow<acc_t> m;
    if (!p.mask.ptr) return m;
    m.ptr = p.mask.ptr;
    m.base = (p.mask_batch == 1 ? 0 : b) * p.mask.s0 + t * p.mask.s1;
    m.sj = p.mask.s2;
    m.dt = p.mask_dtype;
    return m;
  }

  Keys<acc_t> keys(const HstuParams& p, int64_t t) const {
    return {k.data(), v.data(), p.dim_qk, p.dim_v, acc_t(p.alpha), acc_t(1) / acc_t(p.n), mask_row(p, t)};
  }
  Keys<acc_t> block_keys(const HstuParams& p) const {
    return {kbar.data(), vbar.data(), p.dim_qk, p.dim_v, acc_t(p.alpha), acc_t(1) / acc_t(p.n), {}};
  }

  // Column c of head h in row t of the jagged (T, H*d) tensor m.
  int64_t at(const Mat& m, int64_t t, int64_t d, int64_t c) const {
    return (start + t) * m.st + (h * d + c) * m.sc;
  }
  int64_t at3(const Mat3& m, int64_t t, int64_t c) const { return (start + t) * m.s0 + h * m.s1 + c * m.s2; }

  // Writes rows of a (len, d) acc_t buffer to this head's columns of m.
  void store(const Mat& m, int64_t d, const std::vector<acc_t>& x) const {
    for (int64_t t = 0; t < len; ++t)
      for (int64_t i = 0; i < d; ++i) static_cast<scalar_t*>(m.ptr)[at(m, t, d, i)] = scalar_t(x[t * d + i]);
  }

  // Key ranges of query t's selected blocks and window, each with its branch number (1 slc, 2 swa).
  template <typename F>
  void for_each_range(const HstuParams& p, int64_t t, F&& f) const {
    for (int64_t s = 0; s < p.block_counts; ++s) {
      const int64_t c = static_cast<const int32_t*>(p.block_idx.ptr)[at3(p.block_idx, t, s)];
      if (c >= 0 && c * p.block_size <= t) f(1, c * p.block_size, std::min((c + 1) * p.block_size, t + 1));
    }
    if (p.window_size > 0) f(2, std::max<int64_t>(0, t - p.window_size + 1), t + 1);
  }
};

template <typename acc_t>
inline void zero(std::vector<acc_t>& x) {
  std::fill(x.begin(), x.end(), acc_t(0));
}

// ---------------------------------------------------------------- dense

template <typename scalar_t>
void attn_fwd_kernel(const HstuParams& p) {
  using acc_t = acc_type<scalar_t>;
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> o(p.dim_v);
    for (int64_t task = begin; task < end; ++task) {
      Head<scalar_t, acc_t> hd(p, task, /*with_v=*/true, /*with_means=*/false);
      for (int64_t t = 0; t < hd.len; ++t) {
        zero(o);
        attend_fwd(hd.keys(p, t), &hd.q[t * p.dim_qk], 0, t + 1, o.data());
        for (int64_t i = 0; i < p.dim_v; ++i)
          static_cast<scalar_t*>(p.out.ptr)[hd.at(p.out, t, p.dim_v, i)] = scalar_t(o[i]);
      }
    }
  });
}

template <typename scalar_t>
void attn_bwd_kernel(const HstuParams& p) {
  using acc_t = acc_type<scalar_t>;
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> o(p.dim_v), g(p.dim_v), dq(p.dim_qk);  // o: the output, unused here
    for (int64_t task = begin; task < end; ++task) {
      Head<scalar_t, acc_t> hd(p, task, /*with_v=*/true, /*with_means=*/false);
      std::vector<acc_t> dK(hd.len * p.dim_qk, acc_t(0)), dV(hd.len * p.dim_v, acc_t(0));
      std::vector<acc_t> dQ(hd.len * p.dim_qk);
      for (int64_t t = 0; t < hd.len; ++t) {
        const scalar_t* dout = static_cast<const scalar_t*>(p.dout.ptr);
        for (int64_t i = 0; i < p.dim_v; ++i) g[i] = acc_t(dout[hd.at(p.dout, t, p.dim_v, i)]);
        zero(dq);
        attend_bwd(hd.keys(p, t), &hd.q[t * p.dim_qk], 0, t + 1, g.data(), o.data(), dq.data(), dK.data(),
                   dV.data());
        std::copy(dq.begin(), dq.end(), dQ.begin() + t * p.dim_qk);
      }
      hd.store(p.dq, p.dim_qk, dQ);
      hd.store(p.dk, p.dim_qk, dK);
      hd.store(p.dv, p.dim_v, dV);
    }
  });
}

// ---------------------------------------------------------------- top-k block selection

// For query t: blocks 0 .. t/BS are the candidates (all but the last are complete); the
// block holding t scores +inf, the others silu(alpha q.kbar_c). The best block_counts in
// descending score, ties to the lower index, then -1 padding.
template <typename scalar_t>
void topk_kernel(const HstuParams& p) {
  using acc_t = acc_type<scalar_t>;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<acc_t, int64_t>> cand;
    for (int64_t task = begin; task < end; ++task) {
      Head<scalar_t, acc_t> hd(p, task, /*with_v=*/false, /*with_means=*/true);
      for (int64_t t = 0; t < hd.len; ++t) {
        const int64_t own = t / p.block_size;
        cand.clear();
        for (int64_t c = 0; c < own; ++c) {
          const acc_t s = acc_t(p.alpha) * dot(&hd.q[t * p.dim_qk], &hd.kbar[c * p.dim_qk], p.dim_qk);
          const acc_t score = s * sigmoid(s);
          cand.emplace_back(std::isnan(score) ? -inf : score, c);  // NaN would break the ordering
        }
        cand.emplace_back(inf, own);
        const int64_t keep = std::min<int64_t>(p.block_counts, own + 1);
        std::partial_sort(cand.begin(), cand.begin() + keep, cand.end(), [](const auto& a, const auto& b) {
          return a.first > b.first || (a.first == b.first && a.second < b.second);
        });
        int32_t* idx = static_cast<int32_t*>(p.block_idx.ptr);
        for (int64_t s = 0; s < p.block_counts; ++s)
          idx[hd.at3(p.block_idx, t, s)] = s < keep ? static_cast<int32_t>(cand[s].second) : -1;
      }
    }
  });
}

// ---------------------------------------------------------------- block-sparse

template <typename acc_t>
inline acc_t gate(const HstuParams& p, const Mat3& g, int64_t row, int64_t h, int64_t branch) {
  return load_as<acc_t>(g.ptr, p.gates_dtype, row * g.s0 + h * g.s1 + branch * g.s2);
}

template <typename scalar_t>
void bsa_fwd_kernel(const HstuParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t dv = p.dim_v;
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> o(3 * dv);  // o_cmp, o_slc, o_swa
    for (int64_t task = begin; task < end; ++task) {
      Head<scalar_t, acc_t> hd(p, task, /*with_v=*/true, /*with_means=*/true);
      for (int64_t t = 0; t < hd.len; ++t) {
        const acc_t* q = &hd.q[t * p.dim_qk];
        zero(o);
        attend_fwd(hd.block_keys(p), q, 0, (t + 1) / p.block_size, o.data());
        const Keys<acc_t> ks = hd.keys(p, t);
        hd.for_each_range(p, t, [&](int br, int64_t j0, int64_t j1) { attend_fwd(ks, q, j0, j1, &o[br * dv]); });
        acc_t g[3];
        for (int br = 0; br < 3; ++br) g[br] = gate<acc_t>(p, p.gates, hd.start + t, hd.h, br);
        for (int64_t i = 0; i < dv; ++i) {
          const acc_t a = g[0] * o[i] + g[1] * o[dv + i] + g[2] * o[2 * dv + i];
          const int64_t ui = hd.at(p.u, t, dv, i);
          const acc_t u = p.u.ptr ? acc_t(static_cast<const scalar_t*>(p.u.ptr)[ui]) : acc_t(1);
          static_cast<scalar_t*>(p.out.ptr)[hd.at(p.out, t, dv, i)] = scalar_t(u * a);
        }
      }
    }
  });
}

// dA = dout * u; each branch b gets g_b = gate_b * dA and returns its output o_b, so
// dgate_b = dA.o_b and du = dout * sum_b gate_b o_b. The means' gradients spread evenly
// over their blocks' keys at the end.
template <typename scalar_t>
void bsa_bwd_kernel(const HstuParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t dv = p.dim_v, dqk = p.dim_qk, bs = p.block_size;
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> o(3 * dv), g(3 * dv), dA(dv), dout(dv), dq(dqk);
    for (int64_t task = begin; task < end; ++task) {
      Head<scalar_t, acc_t> hd(p, task, /*with_v=*/true, /*with_means=*/true);
      const int64_t nb = hd.len / bs;
      std::vector<acc_t> dK(hd.len * dqk, acc_t(0)), dV(hd.len * dv, acc_t(0));
      std::vector<acc_t> dKbar(nb * dqk, acc_t(0)), dVbar(nb * dv, acc_t(0)), dQ(hd.len * dqk);
      for (int64_t t = 0; t < hd.len; ++t) {
        const acc_t* q = &hd.q[t * dqk];
        acc_t gt[3];
        for (int br = 0; br < 3; ++br) gt[br] = gate<acc_t>(p, p.gates, hd.start + t, hd.h, br);
        for (int64_t i = 0; i < dv; ++i) {
          dout[i] = acc_t(static_cast<const scalar_t*>(p.dout.ptr)[hd.at(p.dout, t, dv, i)]);
          const acc_t u = p.u.ptr ? acc_t(static_cast<const scalar_t*>(p.u.ptr)[hd.at(p.u, t, dv, i)]) : acc_t(1);
          dA[i] = dout[i] * u;
          for (int br = 0; br < 3; ++br) g[br * dv + i] = gt[br] * dA[i];
        }
        zero(o);
        zero(dq);
        attend_bwd(hd.block_keys(p), q, 0, (t + 1) / bs, g.data(), o.data(), dq.data(), dKbar.data(),
                   dVbar.data());
        const Keys<acc_t> ks = hd.keys(p, t);
        hd.for_each_range(p, t, [&](int br, int64_t j0, int64_t j1) {
          attend_bwd(ks, q, j0, j1, &g[br * dv], &o[br * dv], dq.data(), dK.data(), dV.data());
        });
        std::copy(dq.begin(), dq.end(), dQ.begin() + t * dqk);
        for (int br = 0; br < 3; ++br) {
          const acc_t dg = dot(dA.data(), &o[br * dv], dv);
          store_as(p.dgates.ptr, p.gates_dtype, hd.at3(p.dgates, t, br), dg);
        }
        if (p.u.ptr) {
          for (int64_t i = 0; i < dv; ++i) {
            const acc_t a = gt[0] * o[i] + gt[1] * o[dv + i] + gt[2] * o[2 * dv + i];
            static_cast<scalar_t*>(p.du.ptr)[hd.at(p.du, t, dv, i)] = scalar_t(dout[i] * a);
          }
        }
      }
      for (int64_t j = 0; j < nb * bs; ++j) {
        const int64_t c = j / bs;
        for (int64_t i = 0; i < dqk; ++i) dK[j * dqk + i] += dKbar[c * dqk + i] / acc_t(bs);
        for (int64_t i = 0; i < dv; ++i) dV[j * dv + i] += dVbar[c * dv + i] / acc_t(bs);
      }
      hd.store(p.dq, dqk, dQ);
      hd.store(p.dk, dqk, dK);
      hd.store(p.dv, dv, dV);
    }
  });
}

// ---------------------------------------------------------------- op entry points

#define HSTU_DISPATCH(T, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, T, NAME, __VA_ARGS__)

at::Tensor attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& x_offsets,
                        int64_t n, int64_t num_heads, double alpha, const c10::optional<at::Tensor>& attn_mask) {
  AttnFwdArgs r = prepare_attn_fwd(q, k, v, x_offsets, n, num_heads, alpha, attn_mask);
  HSTU_DISPATCH(q.scalar_type(), "hstu_attn_fwd", [&] { attn_fwd_kernel<scalar_t>(r.p); });
  return r.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& x_offsets,
                                                            int64_t n, int64_t num_heads, double alpha,
                                                            const c10::optional<at::Tensor>& attn_mask,
                                                            const at::Tensor& dout) {
  AttnBwdArgs r = prepare_attn_bwd(q, k, v, x_offsets, n, num_heads, alpha, attn_mask, dout);
  HSTU_DISPATCH(q.scalar_type(), "hstu_attn_bwd", [&] { attn_bwd_kernel<scalar_t>(r.p); });
  return {r.dq, r.dk, r.dv};
}

at::Tensor topk_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& x_offsets, int64_t n,
                    int64_t num_heads, double alpha, int64_t block_size, int64_t block_counts) {
  TopkArgs r = prepare_topk(q, k, x_offsets, n, num_heads, alpha, block_size, block_counts);
  HSTU_DISPATCH(q.scalar_type(), "hstu_bsa_topk", [&] { topk_kernel<scalar_t>(r.p); });
  return r.block_idx;
}

at::Tensor bsa_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const c10::optional<at::Tensor>& u, const at::Tensor& gates, const at::Tensor& block_idx,
                       const at::Tensor& x_offsets, int64_t n, int64_t num_heads, double alpha, int64_t block_size,
                       int64_t window_size, const c10::optional<at::Tensor>& attn_mask) {
  BsaFwdArgs r = prepare_bsa_fwd(q, k, v, u, gates, block_idx, x_offsets, n, num_heads, alpha, block_size,
                                 window_size, attn_mask);
  HSTU_DISPATCH(q.scalar_type(), "hstu_bsa_fwd", [&] { bsa_fwd_kernel<scalar_t>(r.p); });
  return r.out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bsa_bwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& u,
    const at::Tensor& gates, const at::Tensor& block_idx, const at::Tensor& x_offsets, int64_t n,
    int64_t num_heads, double alpha, int64_t block_size, int64_t window_size,
    const c10::optional<at::Tensor>& attn_mask, const at::Tensor& dout) {
  BsaBwdArgs r = prepare_bsa_bwd(q, k, v, u, gates, block_idx, x_offsets, n, num_heads, alpha, block_size,
                                 window_size, attn_mask, dout);
  HSTU_DISPATCH(q.scalar_type(), "hstu_bsa_bwd", [&] { bsa_bwd_kernel<scalar_t>(r.p); });
  return {r.dq, r.dk, r.dv, r.du, r.dgates};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CPU, m) {
  m.impl("hstu_attn_fwd", &attn_fwd_cpu);
  m.impl("hstu_attn_bwd", &attn_bwd_cpu);
  m.impl("hstu_bsa_topk", &topk_cpu);
  m.impl("hstu_bsa_fwd", &bsa_fwd_cpu);
  m.impl("hstu_bsa_bwd", &bsa_bwd_cpu);
}

}  // namespace hstu_bsa
}  // namespace ssm_ext
