// Argument checking for the scan ops, shared by CPU and CUDA.
#include "scan/scan.h"

#include "common/checks.h"

namespace ssm_ext {
namespace scan {
namespace {

at::ScalarType state_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// x, a, b, c: (B, L, D), one float dtype, one device. Fills the sizes and input views.
void check_inputs(ScanParams& p, const at::Tensor& x, const at::Tensor& a,
                  const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& c,
                  const c10::optional<at::Tensor>& initial_state) {
  check_ndim(x, "x", 3, "(batch, seqlen, dim)");
  check_input_dtype(x, "x");
  auto same = [&](const at::Tensor& t, const char* name) {
    check_same_device(t, name, x, "x");
    check_shape(t, name, x.sizes(), "(batch, seqlen, dim) like x");
    check_dtype(t, name, x.scalar_type());
  };
  same(a, "a");
  if (b.has_value()) same(*b, "b");
  if (c.has_value()) same(*c, "c");
  p.batch = x.size(0);
  p.seqlen = x.size(1);
  p.dim = x.size(2);
  p.x = view_bld(x);
  p.a = view_bld(a);
  if (b.has_value()) p.b = view_bld(*b);
  if (c.has_value()) p.c = view_bld(*c);
  if (initial_state.has_value()) {
    check_same_device(*initial_state, "initial_state", x, "x");
    check_input_dtype(*initial_state, "initial_state");
    check_shape(*initial_state, "initial_state", {p.batch, p.dim}, "(batch, dim)");
    p.initial_state = view_bld(*initial_state);
    p.initial_dtype = dtype_of(*initial_state);
  }
}

}  // namespace

at::Tensor empty_chunk_states(const at::Tensor& x, const at::TensorOptions& opt) {
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  if (x.stride(1) == 1 && L > 1) return at::empty({B, D, num_chunks(L)}, opt).transpose(1, 2);
  return at::empty({B, num_chunks(L), D}, opt);
}

FwdArgs prepare_fwd(const at::Tensor& x, const at::Tensor& a, const c10::optional<at::Tensor>& b,
                    const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& initial_state,
                    bool store_states, c10::optional<at::ScalarType> out_dtype) {
  FwdArgs r;
  ScanParams& p = r.p;
  check_inputs(p, x, a, b, c, initial_state);
  const at::ScalarType yt = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(yt == at::kFloat || yt == at::kHalf || yt == at::kBFloat16 || yt == at::kDouble,
              msg("out_dtype must be a floating dtype, got ", yt));
  // Outputs keep x's layout (empty_like): a (B, C, T) tensor viewed as (B, L, D) stays (B, C, T).
  r.y = at::empty_like(x, x.options().dtype(yt));
  r.final_state = at::empty({p.batch, p.dim}, x.options().dtype(state_dtype(x)));
  // Either the full states or, for the recomputing backward, h at every chunk start.
  const auto sopt = x.options().dtype(state_dtype(x));
  r.states = store_states ? at::empty_like(x, sopt) : at::empty({0}, sopt);
  r.chunk_states = store_states ? at::empty({0}, sopt) : empty_chunk_states(x, sopt);
  p.y = view_bld(r.y);
  p.y_dtype = dtype_of(r.y);
  p.final_state = view_bld(r.final_state);
  p.states = view_bld(r.states);
  p.chunk_states = view_bld(r.chunk_states);
  return r;
}

BwdArgs prepare_bwd(const at::Tensor& x, const at::Tensor& a, const c10::optional<at::Tensor>& b,
                    const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& initial_state,
                    const c10::optional<at::Tensor>& states, const c10::optional<at::Tensor>& chunk_states,
                    const at::Tensor& dy, const c10::optional<at::Tensor>& dfinal_state) {
  BwdArgs r;
  ScanParams& p = r.p;
  check_inputs(p, x, a, b, c, initial_state);
  check_same_device(dy, "dy", x, "x");
  check_input_dtype(dy, "dy");
  check_shape(dy, "dy", x.sizes(), "(batch, seqlen, dim) like x");
  p.dy = view_bld(dy);
  p.dy_dtype = dtype_of(dy);
  if (states.has_value() && states->numel() > 0) {
    check_same_device(*states, "states", x, "x");
    check_dtype(*states, "states", state_dtype(x));
    check_shape(*states, "states", x.sizes(), "(batch, seqlen, dim) like x");
    p.states = view_bld(*states);
  } else if (chunk_states.has_value() && chunk_states->numel() > 0) {
    check_same_device(*chunk_states, "chunk_states", x, "x");
    check_dtype(*chunk_states, "chunk_states", state_dtype(x));
    check_shape(*chunk_states, "chunk_states", {p.batch, num_chunks(p.seqlen), p.dim},
                "(batch, ceil(seqlen / 32), dim)");
    p.chunk_states = view_bld(*chunk_states);
  }
  if (dfinal_state.has_value()) {
    check_same_device(*dfinal_state, "dfinal_state", x, "x");
    check_dtype(*dfinal_state, "dfinal_state", state_dtype(x));
    check_shape(*dfinal_state, "dfinal_state", {p.batch, p.dim}, "(batch, dim)");
    p.dfinal_state = view_bld(*dfinal_state);
  }
  auto like = [&](const c10::optional<at::Tensor>& t) {
    return t.has_value() ? at::empty_like(*t) : at::empty({0}, x.options());
  };
  r.dx = at::empty_like(x);
  r.da = at::empty_like(a);
  r.db = like(b);
  r.dc = like(c);
  r.dinitial_state = initial_state.has_value() ? at::empty({p.batch, p.dim}, initial_state->options())
                                               : at::empty({0}, x.options());
  p.dx = view_bld(r.dx);
  p.da = view_bld(r.da);
  p.db = view_bld(r.db);
  p.dc = view_bld(r.dc);
  p.dinitial_state = view_bld(r.dinitial_state);
  return r;
}

}  // namespace scan
}  // namespace ssm_ext
