// Argument checking for the ISSM ops, shared by CPU and CUDA.
#include "issm/issm.h"

#include <cmath>
#include <cstdio>
#include <string>

#include "common/checks.h"

namespace ssm_ext {
namespace issm {
namespace {

// %g through snprintf: numbers never go through an ostream (see common/checks.h).
std::string num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

at::ScalarType state_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// An optional small float tensor (A, D, dt_bias, initial_states): any float dtype, x's device.
void check_param(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_same_device(t, name, x, "x");
  check_input_dtype(t, name);
}

struct Inputs {
  at::Tensor seq_idx, cu_seqlens;
};

// Checks everything the forward and backward share and fills the sizes, options and input views.
Inputs check_inputs(IssmParams& p, const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A,
                    const at::Tensor& B, const at::Tensor& C, int64_t chunk_size,
                    const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
                    const c10::optional<at::Tensor>& dt_bias, const c10::optional<at::Tensor>& initial_states,
                    const c10::optional<at::Tensor>& seq_idx, const c10::optional<at::Tensor>& cu_seqlens,
                    bool dt_softplus, double lo, double hi) {
  Inputs in;
  check_ndim(x, "x", 4, "(batch, seqlen, nheads, headdim)");
  check_input_dtype(x, "x");
  check_ndim(B, "B", 4, "(batch, seqlen, ngroups, dstate)");
  const int64_t b = x.size(0), L = x.size(1), H = x.size(2), P = x.size(3);
  const int64_t G = B.size(2), N = B.size(3);
  auto same_dtype = [&](const at::Tensor& t, const char* name) {
    check_same_device(t, name, x, "x");
    check_dtype(t, name, x.scalar_type());
  };
  same_dtype(B, "B");
  check_shape(B, "B", {b, L, G, N}, "(batch, seqlen, ngroups, dstate) with x's batch and seqlen");
  TORCH_CHECK(G >= 1 && H % G == 0, msg("nheads (x.size(2) = ", H, ") must be a multiple of ngroups (B.size(2) = ",
                                        G, ")"));
  same_dtype(C, "C");
  check_shape(C, "C", B.sizes(), "(batch, seqlen, ngroups, dstate) like B");
  same_dtype(dt, "dt");
  check_shape(dt, "dt", {b, L, H, N}, "(batch, seqlen, nheads, dstate)");
  check_param(A, "A", x);
  check_shape(A, "A", {H, N}, "(nheads, dstate)");
  TORCH_CHECK(chunk_size > 0, msg("chunk_size must be > 0, got ", chunk_size));
  TORCH_CHECK(!std::isnan(lo) && !std::isnan(hi) && lo <= hi,
              msg("dt_limit must be (lo, hi) with lo <= hi, got (", num(lo), ", ", num(hi), ")"));

  p.batch = b;
  p.seqlen = L;
  p.nheads = H;
  p.headdim = P;
  p.dstate = N;
  p.ngroups = G;
  p.heads_per_group = H / G;
  p.chunk_size = chunk_size;
  p.nseq = b;
  p.dt_softplus = dt_softplus;
  p.dt_lo = lo;
  p.dt_hi = hi;
  p.dt_lo_f = static_cast<float>(lo);
  p.dt_hi_f = static_cast<float>(hi);
  p.in_dtype = dtype_of(x);
  p.x = view4(x);
  p.dt = view4(dt);
  p.B = view4(B);
  p.C = view4(C);
  p.A = view4(A);
  p.A_dtype = dtype_of(A);

  if (z.has_value()) {
    same_dtype(*z, "z");
    check_shape(*z, "z", x.sizes(), "(batch, seqlen, nheads, headdim) like x");
    p.z = view4(*z);
  }
  if (D.has_value()) {
    check_param(*D, "D", x);
    TORCH_CHECK(D->sizes() == at::IntArrayRef({H, P}) || D->sizes() == at::IntArrayRef({H}),
                msg("D must have shape (nheads, headdim) = ", shape_str({H, P}), " or (nheads,) = ",
                    shape_str({H}), ", got ", shape_str(D->sizes())));
    p.D = view4(*D);
    p.D_per_head = D->dim() == 1;
    p.D_dtype = dtype_of(*D);
  }
  if (dt_bias.has_value()) {
    check_param(*dt_bias, "dt_bias", x);
    TORCH_CHECK(dt_bias->sizes() == at::IntArrayRef({H, N}) || dt_bias->sizes() == at::IntArrayRef({H}),
                msg("dt_bias must have shape (nheads, dstate) = ", shape_str({H, N}), " or (nheads,) = ",
                    shape_str({H}), ", got ", shape_str(dt_bias->sizes())));
    p.dt_bias = view4(*dt_bias);
    p.dt_bias_per_head = dt_bias->dim() == 1;
    p.dt_bias_dtype = dtype_of(*dt_bias);
  }
  if (seq_idx.has_value()) {
    check_same_device(*seq_idx, "seq_idx", x, "x");
    check_dtype(*seq_idx, "seq_idx", at::kInt);
    check_shape(*seq_idx, "seq_idx", {b, L}, "(batch, seqlen)");
    in.seq_idx = *seq_idx;
    p.seq_idx = in.seq_idx.numel() ? in.seq_idx.data_ptr<int32_t>() : nullptr;
    p.seq_idx_sb = in.seq_idx.stride(0);
    p.seq_idx_sl = in.seq_idx.stride(1);
  }
  if (cu_seqlens.has_value()) {
    const at::Tensor& cu = *cu_seqlens;
    check_same_device(cu, "cu_seqlens", x, "x");
    TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong,
                msg("cu_seqlens must have dtype int32 or int64, got ", cu.scalar_type()));
    check_ndim(cu, "cu_seqlens", 1, "(nseq + 1,) offsets");
    TORCH_CHECK(cu.size(0) >= 1, "cu_seqlens must hold at least one offset (0)");
    TORCH_CHECK(b == 1, msg("with cu_seqlens the sequences are packed into one batch row: x must have batch 1, got ",
                            b));
    in.cu_seqlens = cu.contiguous();
    if (!cu.is_cuda()) {  // values are checked where reading them costs no device sync
      const int64_t n = cu.size(0);
      auto at = [&](int64_t i) {
        return cu.scalar_type() == at::kInt ? int64_t(in.cu_seqlens.data_ptr<int32_t>()[i])
                                            : in.cu_seqlens.data_ptr<int64_t>()[i];
      };
      TORCH_CHECK(at(0) == 0, msg("cu_seqlens must start at 0, got ", at(0)));
      TORCH_CHECK(at(n - 1) == L, msg("cu_seqlens must end at seqlen (x.size(1) = ", L, "), got ", at(n - 1)));
      for (int64_t i = 1; i < n; ++i)
        TORCH_CHECK(at(i) >= at(i - 1), msg("cu_seqlens must be non-decreasing, got ", at(i - 1), " then ", at(i),
                                            " at index ", i));
    }
    p.cu_seqlens = in.cu_seqlens.data_ptr();
    p.cu_seqlens_i64 = cu.scalar_type() == at::kLong;
    p.nseq = cu.size(0) - 1;
  }
  if (initial_states.has_value()) {
    check_param(*initial_states, "initial_states", x);
    check_shape(*initial_states, "initial_states", {p.nseq, H, P, N},
                cu_seqlens.has_value() ? "(nseq, nheads, headdim, dstate), one per cu_seqlens sequence"
                                       : "(batch, nheads, headdim, dstate)");
    p.initial_states = view4(*initial_states);
    p.init_dtype = dtype_of(*initial_states);
  }
  return in;
}

}  // namespace

FwdArgs prepare_fwd(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& C, int64_t chunk_size, const c10::optional<at::Tensor>& D,
                    const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& dt_bias,
                    const c10::optional<at::Tensor>& initial_states, const c10::optional<at::Tensor>& seq_idx,
                    const c10::optional<at::Tensor>& cu_seqlens, bool dt_softplus, double dt_limit_lo,
                    double dt_limit_hi, bool return_final_states) {
  FwdArgs r;
  IssmParams& p = r.p;
  Inputs in = check_inputs(p, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                           dt_softplus, dt_limit_lo, dt_limit_hi);
  r.seq_idx = in.seq_idx;
  r.cu_seqlens = in.cu_seqlens;
  r.out = at::empty(x.sizes(), x.options());
  r.final_states = return_final_states
                       ? at::empty({p.nseq, p.nheads, p.headdim, p.dstate}, x.options().dtype(state_dtype(x)))
                       : at::empty({0}, x.options().dtype(state_dtype(x)));
  p.out = view4(r.out);
  p.final_states = view4(r.final_states);
  return r;
}

BwdArgs prepare_bwd(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& C, int64_t chunk_size, const c10::optional<at::Tensor>& D,
                    const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& dt_bias,
                    const c10::optional<at::Tensor>& initial_states, const c10::optional<at::Tensor>& seq_idx,
                    const c10::optional<at::Tensor>& cu_seqlens, bool dt_softplus, double dt_limit_lo,
                    double dt_limit_hi, const at::Tensor& dout, const c10::optional<at::Tensor>& dfinal_states) {
  BwdArgs r;
  IssmParams& p = r.p;
  Inputs in = check_inputs(p, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
                           dt_softplus, dt_limit_lo, dt_limit_hi);
  r.seq_idx = in.seq_idx;
  r.cu_seqlens = in.cu_seqlens;
  check_same_device(dout, "dout", x, "x");
  check_dtype(dout, "dout", x.scalar_type());
  check_shape(dout, "dout", x.sizes(), "(batch, seqlen, nheads, headdim) like x");
  p.dout = view4(dout);
  if (dfinal_states.has_value()) {
    check_same_device(*dfinal_states, "dfinal_states", x, "x");
    check_dtype(*dfinal_states, "dfinal_states", state_dtype(x));
    check_shape(*dfinal_states, "dfinal_states", {p.nseq, p.nheads, p.headdim, p.dstate},
                "(nseq, nheads, headdim, dstate) like final_states");
    p.dfinal_states = view4(*dfinal_states);
  }
  auto like = [&](const c10::optional<at::Tensor>& t) {
    return t.has_value() ? at::empty(t->sizes(), t->options()) : at::empty({0}, x.options());
  };
  r.dx = at::empty(x.sizes(), x.options());
  r.ddt = at::empty(dt.sizes(), dt.options());
  r.dA = at::empty(A.sizes(), A.options());
  r.dB = at::empty(B.sizes(), B.options());
  r.dC = at::empty(C.sizes(), C.options());
  r.dD = like(D);
  r.dz = like(z);
  r.ddt_bias = like(dt_bias);
  r.dinitial_states = like(initial_states);
  p.dx = view4(r.dx);
  p.ddt = view4(r.ddt);
  p.dA = view4(r.dA);
  p.dB = view4(r.dB);
  p.dC = view4(r.dC);
  p.dD = view4(r.dD);
  p.dz = view4(r.dz);
  p.ddt_bias = view4(r.ddt_bias);
  p.dinitial_states = view4(r.dinitial_states);
  return r;
}

}  // namespace issm
}  // namespace ssm_ext
