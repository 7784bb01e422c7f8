// CPU kernels for the ISSM scan: the plain recurrence over t per (segment, head), with the
// (headdim x dstate) state in a buffer, parallel over (segment, head). The backward runs the
// recurrence in reverse from state checkpoints taken every ~sqrt(len) steps, so it keeps
// O(sqrt(len)) states per task instead of one per step. Reductions over heads, batch and time
// go through per-task partial sums added in a fixed order: the results are deterministic and do
// not depend on the thread count or on chunk_size.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "issm/issm.h"

namespace ssm_ext {
namespace issm {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
inline acc_t sigmoid(acc_t v) { return acc_t(1) / (acc_t(1) + std::exp(-v)); }

// a . b with 8 partial sums in a fixed order: the compiler vectorises it without -ffast-math
// (a single running sum is a serial chain), and the result stays deterministic.
template <typename acc_t>
inline acc_t dot(const acc_t* __restrict a, const acc_t* __restrict b, int64_t n) {
  acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * b[i + j];
  acc_t tail = 0;
  for (; i < n; ++i) tail += a[i] * b[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])) + tail;
}

// The per-head constants and the per-step quantities of one (segment, head) task.
template <typename scalar_t>
struct Head {
  using acc_t = acc_type<scalar_t>;
  const IssmParams& p;
  int64_t b = 0, h = 0, g = 0;
  const int64_t P, N;
  std::vector<acc_t> A, bias, D;               // A[n], dt_bias[n] (0 if absent), D[p] (0 if absent)
  std::vector<acc_t> delta, decay, Bv, k, x, C;  // step t: delta, exp(delta*A), B_t, delta*B, x_t, C_t
  std::vector<acc_t> ddelta_ddt;                 // d delta / d dt: 0 where clamped

  explicit Head(const IssmParams& p_)
      : p(p_), P(p_.headdim), N(p_.dstate), A(N), bias(N), D(P), delta(N), decay(N), Bv(N), k(N), x(P), C(N),
        ddelta_ddt(N) {}

  void set(int64_t b_, int64_t h_) {
    b = b_;
    h = h_;
    g = h / p.heads_per_group;
    for (int64_t n = 0; n < N; ++n) {
      A[n] = load_as<acc_t>(p.A.ptr, p.A_dtype, p.A.at(h, n));
      bias[n] = p.dt_bias.ptr ? load_as<acc_t>(p.dt_bias.ptr, p.dt_bias_dtype, p.dt_bias.at(h, n)) : acc_t(0);
    }
    for (int64_t i = 0; i < P; ++i)
      D[i] = p.D.ptr ? load_as<acc_t>(p.D.ptr, p.D_dtype, p.D.at(h, i)) : acc_t(0);
  }

  const scalar_t* in(const View4& v) const { return static_cast<const scalar_t*>(v.ptr); }

  // Loads step t and computes delta, the decay and k = delta*B (and d delta / d dt if asked).
  void load(int64_t t, bool derivative) {
    const acc_t lo = acc_t(p.dt_lo), hi = acc_t(p.dt_hi);
    for (int64_t n = 0; n < N; ++n) {
      const acc_t v = acc_t(in(p.dt)[p.dt.at(b, t, h, n)]) + bias[n];
      acc_t phi = v, dphi = acc_t(1);
      if (p.dt_softplus && v <= acc_t(20)) {  // softplus is the identity above 20, as torch's
        phi = std::log1p(std::exp(v));
        dphi = sigmoid(v);
      }
      const acc_t d = std::min(std::max(phi, lo), hi);
      delta[n] = d;
      decay[n] = std::exp(d * A[n]);
      Bv[n] = acc_t(in(p.B)[p.B.at(b, t, g, n)]);
      k[n] = d * Bv[n];
      C[n] = acc_t(in(p.C)[p.C.at(b, t, g, n)]);
      if (derivative) ddelta_ddt[n] = (phi >= lo && phi <= hi) ? dphi : acc_t(0);  // torch.clamp's mask
    }
    for (int64_t i = 0; i < P; ++i) x[i] = acc_t(in(p.x)[p.x.at(b, t, h, i)]);
  }

  // S <- decay * S + k x^T
  void advance(acc_t* S) const {
    const acc_t* __restrict dc = decay.data();
    const acc_t* __restrict kk = k.data();
    for (int64_t i = 0; i < P; ++i) {
      acc_t* __restrict s = S + i * N;
      const acc_t xi = x[i];
      for (int64_t n = 0; n < N; ++n) s[n] = dc[n] * s[n] + kk[n] * xi;
    }
  }

  // y[i] = C . S[i] + D[i] x[i] (before the gate)
  acc_t y(const acc_t* S, int64_t i) const { return dot(C.data(), S + i * N, N) + D[i] * x[i]; }

  acc_t z(int64_t t, int64_t i) const { return acc_t(in(p.z)[p.z.at(b, t, h, i)]); }
};

// S = initial_states[i, h] or 0.
template <typename acc_t>
void load_initial(const IssmParams& p, int64_t i, int64_t h, acc_t* S) {
  const int64_t P = p.headdim, N = p.dstate;
  for (int64_t a = 0; a < P; ++a)
    for (int64_t n = 0; n < N; ++n)
      S[a * N + n] = p.initial_states.ptr
                         ? load_as<acc_t>(p.initial_states.ptr, p.init_dtype, p.initial_states.at(i, h, a, n))
                         : acc_t(0);
}

template <typename scalar_t>
void fwd_kernel(const IssmParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t P = p.headdim, N = p.dstate;
  at::parallel_for(0, p.nseq * p.nheads, 1, [&](int64_t begin, int64_t end) {
    Head<scalar_t> hd(p);
    std::vector<acc_t> S(P * N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / p.nheads, h = task % p.nheads;
      const Segment sg = segment(p, i);
      hd.set(sg.b, h);
      load_initial(p, i, h, S.data());
      for (int64_t t = sg.t0; t < sg.t1; ++t) {
        if (t > sg.t0 && resets_at(p, sg.b, t)) std::fill(S.begin(), S.end(), acc_t(0));
        hd.load(t, false);
        hd.advance(S.data());
        scalar_t* out = static_cast<scalar_t*>(p.out.ptr);
        for (int64_t a = 0; a < P; ++a) {
          acc_t y = hd.y(S.data(), a);
          if (p.z.ptr) {
            const acc_t zv = hd.z(t, a);
            y *= zv * sigmoid(zv);
          }
          out[p.out.at(sg.b, t, h, a)] = scalar_t(y);
        }
      }
      if (p.final_states.ptr) {
        acc_t* f = static_cast<acc_t*>(p.final_states.ptr);
        for (int64_t a = 0; a < P; ++a)
          for (int64_t n = 0; n < N; ++n) f[p.final_states.at(i, h, a, n)] = S[a * N + n];
      }
    }
  });
}

// Reverse recurrence. With dS the gradient of s_t (from y_t and from s_{t+1}), gy = dout*silu(z):
//   dS += C gy^T;  dC = S_t^T gy;  dx = D gy + dS k;  dk = dS^T x;  ddecay = sum_p dS*S_{t-1}
//   dB = dk*delta;  ddelta = dk*B + ddecay*decay*A;  dA += ddecay*decay*delta
//   ddt = ddelta * d delta/d dt;  then dS <- decay*dS is the gradient of s_{t-1}
// (zeroed where the state was reset; at the segment's first step it is dinitial_states).
template <typename scalar_t>
void bwd_kernel(const IssmParams& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t P = p.headdim, N = p.dstate, PN = P * N, H = p.nheads;
  // Per-task partials: dB and dC per head (summed over each group's heads below), dA and
  // ddt_bias per (segment, head, n), dD per (segment, head, p).
  std::vector<acc_t> dB_part(p.batch * p.seqlen * H * N), dC_part(dB_part.size());
  std::vector<acc_t> dA_part(p.nseq * H * N), dbias_part(p.nseq * H * N), dD_part(p.nseq * H * P);
  auto part_bl = [&](int64_t b, int64_t t, int64_t h) { return ((b * p.seqlen + t) * H + h) * N; };

  at::parallel_for(0, p.nseq * H, 1, [&](int64_t begin, int64_t end) {
    Head<scalar_t> hd(p);
    std::vector<acc_t> dS(PN), zero(PN, acc_t(0)), gy(P), ddecay(N), ckpt, buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / H, h = task % H;
      const Segment sg = segment(p, i);
      hd.set(sg.b, h);
      const int64_t len = sg.t1 - sg.t0;
      const int64_t K = std::max<int64_t>(1, int64_t(std::ceil(std::sqrt(double(len)))));
      const int64_t nblk = (len + K - 1) / K;
      ckpt.resize(std::max<int64_t>(nblk, 1) * PN);
      buf.resize(K * PN);
      acc_t* dA = &dA_part[(i * H + h) * N];
      acc_t* dbias = &dbias_part[(i * H + h) * N];
      acc_t* dD = &dD_part[(i * H + h) * P];
      std::fill(dA, dA + N, acc_t(0));
      std::fill(dbias, dbias + N, acc_t(0));
      std::fill(dD, dD + P, acc_t(0));

      // ckpt[j]: the state before step t0 + j*K (before any reset there); ckpt[0] is the initial state.
      load_initial(p, i, h, ckpt.data());
      for (int64_t j = 1; j < nblk; ++j) {
        acc_t* S = ckpt.data() + j * PN;
        std::copy(S - PN, S, S);
        for (int64_t t = sg.t0 + (j - 1) * K; t < sg.t0 + j * K; ++t) {
          if (t > sg.t0 && resets_at(p, sg.b, t)) std::fill(S, S + PN, acc_t(0));
          hd.load(t, false);
          hd.advance(S);
        }
      }

      for (int64_t a = 0; a < PN; ++a) {
        dS[a] = p.dfinal_states.ptr
                    ? static_cast<const acc_t*>(p.dfinal_states.ptr)[p.dfinal_states.at(i, h, a / N, a % N)]
                    : acc_t(0);
      }
      for (int64_t j = nblk - 1; j >= 0; --j) {
        const int64_t tb = sg.t0 + j * K, te = std::min(tb + K, sg.t1);
        // Recompute the block's states s_t into buf.
        std::copy(ckpt.begin() + j * PN, ckpt.begin() + (j + 1) * PN, buf.begin());
        for (int64_t t = tb; t < te; ++t) {
          acc_t* S = buf.data() + (t - tb) * PN;
          if (t > tb) std::copy(S - PN, S, S);
          if (t > sg.t0 && resets_at(p, sg.b, t)) std::fill(S, S + PN, acc_t(0));
          hd.load(t, false);
          hd.advance(S);
        }
        for (int64_t t = te - 1; t >= tb; --t) {
          const bool reset = t > sg.t0 && resets_at(p, sg.b, t);
          const acc_t* St = buf.data() + (t - tb) * PN;
          const acc_t* Sprev = reset ? zero.data() : (t == tb ? ckpt.data() + j * PN : St - PN);
          hd.load(t, true);
          const scalar_t* dout = static_cast<const scalar_t*>(p.dout.ptr);
          for (int64_t a = 0; a < P; ++a) {
            const acc_t go = acc_t(dout[p.dout.at(sg.b, t, h, a)]);
            if (p.z.ptr) {
              const acc_t zv = hd.z(t, a), sz = sigmoid(zv);
              gy[a] = go * zv * sz;
              const acc_t dz = go * hd.y(St, a) * sz * (acc_t(1) + zv * (acc_t(1) - sz));
              static_cast<scalar_t*>(p.dz.ptr)[p.dz.at(sg.b, t, h, a)] = scalar_t(dz);
            } else {
              gy[a] = go;
            }
            dD[a] += gy[a] * hd.x[a];
          }
          // dC, dk and ddecay accumulate over the headdim rows; dk's slot becomes dB at the end.
          acc_t* __restrict dC = &dC_part[part_bl(sg.b, t, h)];
          acc_t* __restrict dk = &dB_part[part_bl(sg.b, t, h)];
          std::fill(dC, dC + N, acc_t(0));
          std::fill(dk, dk + N, acc_t(0));
          std::fill(ddecay.begin(), ddecay.end(), acc_t(0));
          scalar_t* dx = static_cast<scalar_t*>(p.dx.ptr);
          const acc_t* __restrict Cn = hd.C.data();
          const acc_t* __restrict dc = hd.decay.data();
          acc_t* __restrict dd = ddecay.data();
          for (int64_t a = 0; a < P; ++a) {
            acc_t* __restrict ds = dS.data() + a * N;
            const acc_t* __restrict st = St + a * N;
            const acc_t* __restrict sp = Sprev + a * N;
            const acc_t g = gy[a], xa = hd.x[a];
            for (int64_t n = 0; n < N; ++n) {
              ds[n] += Cn[n] * g;
              dC[n] += st[n] * g;
            }
            dx[p.dx.at(sg.b, t, h, a)] = scalar_t(hd.D[a] * g + dot(ds, hd.k.data(), N));
            for (int64_t n = 0; n < N; ++n) {
              dk[n] += ds[n] * xa;
              dd[n] += ds[n] * sp[n];
              ds[n] *= dc[n];
            }
          }
          scalar_t* ddt = static_cast<scalar_t*>(p.ddt.ptr);
          for (int64_t n = 0; n < N; ++n) {
            const acc_t dlog = dd[n] * dc[n];  // gradient of delta*A
            const acc_t ddelta = dk[n] * hd.Bv[n] + dlog * hd.A[n];
            dA[n] += dlog * hd.delta[n];
            const acc_t dv = ddelta * hd.ddelta_ddt[n];
            ddt[p.ddt.at(sg.b, t, h, n)] = scalar_t(dv);
            dbias[n] += dv;
            dk[n] *= hd.delta[n];  // now dB
          }
          if (reset) std::fill(dS.begin(), dS.end(), acc_t(0));
        }
      }
      if (p.dinitial_states.ptr) {
        for (int64_t a = 0; a < PN; ++a)
          store_as(p.dinitial_states.ptr, p.init_dtype, p.dinitial_states.at(i, h, a / N, a % N), dS[a]);
      }
    }
  });

  // dB, dC: sum over the heads of each group, in head order.
  const int64_t G = p.ngroups, hpg = p.heads_per_group;
  at::parallel_for(0, p.batch * p.seqlen, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / p.seqlen, t = row % p.seqlen;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t n = 0; n < N; ++n) {
          acc_t sb = 0, sc = 0;
          for (int64_t h = g * hpg; h < (g + 1) * hpg; ++h) {
            sb += dB_part[part_bl(b, t, h) + n];
            sc += dC_part[part_bl(b, t, h) + n];
          }
          static_cast<scalar_t*>(p.dB.ptr)[p.dB.at(b, t, g, n)] = scalar_t(sb);
          static_cast<scalar_t*>(p.dC.ptr)[p.dC.at(b, t, g, n)] = scalar_t(sc);
        }
    }
  });
  // dA, ddt_bias, dD: sum over segments (then over n or p for the per-head shapes), in order.
  for (int64_t h = 0; h < H; ++h) {
    acc_t bias_head = 0, D_head = 0;
    for (int64_t n = 0; n < N; ++n) {
      acc_t sa = 0, sb = 0;
      for (int64_t i = 0; i < p.nseq; ++i) {
        sa += dA_part[(i * H + h) * N + n];
        sb += dbias_part[(i * H + h) * N + n];
      }
      if (p.dA.ptr) store_as(p.dA.ptr, p.A_dtype, p.dA.at(h, n), sa);
      if (p.ddt_bias.ptr && !p.dt_bias_per_head) store_as(p.ddt_bias.ptr, p.dt_bias_dtype, p.ddt_bias.at(h, n), sb);
      bias_head += sb;
    }
    if (p.ddt_bias.ptr && p.dt_bias_per_head) store_as(p.ddt_bias.ptr, p.dt_bias_dtype, p.ddt_bias.at(h, 0), bias_head);
    for (int64_t a = 0; a < P; ++a) {
      acc_t sd = 0;
      for (int64_t i = 0; i < p.nseq; ++i) sd += dD_part[(i * H + h) * P + a];
      if (p.dD.ptr && !p.D_per_head) store_as(p.dD.ptr, p.D_dtype, p.dD.at(h, a), sd);
      D_head += sd;
    }
    if (p.dD.ptr && p.D_per_head) store_as(p.dD.ptr, p.D_dtype, p.dD.at(h, 0), D_head);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_cpu(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                                           const at::Tensor& B, const at::Tensor& C, int64_t chunk_size,
                                           const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                                           const c10::optional<at::Tensor>& dt_bias,
                                           const c10::optional<at::Tensor>& initial_states,
                                           const c10::optional<at::Tensor>& seq_idx,
                                           const c10::optional<at::Tensor>& cu_seqlens, bool dt_softplus,
                                           double dt_limit_lo, double dt_limit_hi, bool return_final_states) {
  FwdArgs r = prepare_fwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                          dt_softplus, dt_limit_lo, dt_limit_hi, return_final_states);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "issm_fwd",
                                  [&] { fwd_kernel<scalar_t>(r.p); });
  return {r.out, r.final_states, at::empty({0}, x.options().dtype(at::kFloat))};  // the CPU backward recomputes
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
bwd_cpu(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
        int64_t chunk_size, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
        const c10::optional<at::Tensor>& dt_bias, const c10::optional<at::Tensor>& initial_states,
        const c10::optional<at::Tensor>& seq_idx, const c10::optional<at::Tensor>& cu_seqlens, bool dt_softplus,
        double dt_limit_lo, double dt_limit_hi, const at::Tensor& dout,
        const c10::optional<at::Tensor>& dfinal_states, const c10::optional<at::Tensor>& /*chunk_states*/) {
  BwdArgs r = prepare_bwd(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                          dt_softplus, dt_limit_lo, dt_limit_hi, dout, dfinal_states);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "issm_bwd",
                                  [&] { bwd_kernel<scalar_t>(r.p); });
  return {r.dx, r.ddt, r.dA, r.dB, r.dC, r.dD, r.dz, r.ddt_bias, r.dinitial_states};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CPU, m) {
  m.impl("issm_fwd", &fwd_cpu);
  m.impl("issm_bwd", &bwd_cpu);
}

}  // namespace issm
}  // namespace ssm_ext
