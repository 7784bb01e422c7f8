// Argument checking and layout normalisation for the conv1d ops, shared by CPU and CUDA.
#include "causal_conv1d/causal_conv1d.h"

#include "common/checks.h"

namespace ssm_ext {
namespace conv1d {

namespace {

// Channel-last when D has stride 1 and L does not; anything else that is not L-contiguous
// is copied to the contiguous layout. The fake kernels in ssm_ext/_ops.py mirror this rule.
bool is_channel_last(const at::Tensor& x) { return x.stride(2) != 1 && x.stride(1) == 1; }

at::Tensor normalise_layout(const at::Tensor& t, bool channel_last) {
  if (channel_last) {
    return t.stride(1) == 1 ? t : t.transpose(1, 2).contiguous().transpose(1, 2);
  }
  return t.stride(2) == 1 ? t : t.contiguous();
}

at::Tensor empty_in_layout(int64_t b, int64_t d, int64_t l, bool channel_last,
                           const at::TensorOptions& opts) {
  return channel_last ? at::empty({b, l, d}, opts).transpose(1, 2) : at::empty({b, d, l}, opts);
}

// Checks weight (dim, width >= 2) against x and fills the weight fields of P (ConvParams or
// UpdateParams).
template <typename P>
void set_weight(P& p, const at::Tensor& weight, const at::Tensor& x) {
  check_ndim(weight, "weight", 2, "(dim, width)");
  check_same_device(weight, "weight", x, "x");
  check_input_dtype(weight, "weight");
  TORCH_CHECK(weight.size(0) == x.size(1), msg("weight must have shape (dim, width) with dim = ", x.size(1),
                                               " (x.size(1)), got ", shape_str(weight.sizes())));
  TORCH_CHECK(weight.size(1) >= 2, msg("weight must have width >= 2, got shape ", shape_str(weight.sizes())));
  p.width = weight.size(1);
  p.weight = weight.data_ptr();
  p.weight_sd = weight.stride(0);
  p.weight_sw = weight.stride(1);
  p.weight_dtype = dtype_of(weight);
}

// Checks bias (dim,) and returns it in the weight's dtype.
template <typename P>
at::Tensor set_bias(P& p, const c10::optional<at::Tensor>& bias, const at::Tensor& weight,
                    const at::Tensor& x) {
  if (!bias.has_value()) return at::Tensor();
  check_same_device(*bias, "bias", x, "x");
  check_input_dtype(*bias, "bias");
  check_shape(*bias, "bias", {weight.size(0)}, "(dim,)");
  at::Tensor b = bias->scalar_type() == weight.scalar_type() ? *bias : bias->to(weight.scalar_type());
  p.bias = b.data_ptr();
  p.bias_sd = b.stride(0);
  p.bias_dtype = dtype_of(b);
  return b;
}

// Checks what the forward and backward share and fills a.x, a.seq_idx, a.bias and a.p.
void check_common(ConvArgs& a, const at::Tensor& x_in, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& seq_idx,
                  const c10::optional<at::Tensor>& initial_states, bool silu) {
  ConvParams& p = a.p;
  check_ndim(x_in, "x", 3, "(batch, dim, seqlen)");
  check_input_dtype(x_in, "x");
  const int64_t B = x_in.size(0), D = x_in.size(1), L = x_in.size(2);
  TORCH_CHECK(L >= 1, msg("x must have seqlen >= 1, got shape ", shape_str(x_in.sizes())));
  set_weight(p, weight, x_in);
  const int64_t W = p.width;
  p.batch = B;
  p.dim = D;
  p.seqlen = L;
  a.bias = set_bias(p, bias, weight, x_in);
  if (seq_idx.has_value()) {
    check_same_device(*seq_idx, "seq_idx", x_in, "x");
    check_dtype(*seq_idx, "seq_idx", at::kInt);
    check_shape(*seq_idx, "seq_idx", {B, L}, "(batch, seqlen)");
    a.seq_idx = seq_idx->contiguous();
    p.seq_idx = a.seq_idx.data_ptr<int32_t>();
  }
  if (initial_states.has_value()) {
    check_same_device(*initial_states, "initial_states", x_in, "x");
    check_dtype(*initial_states, "initial_states", x_in.scalar_type());
    check_shape(*initial_states, "initial_states", {B, D, W - 1}, "(batch, dim, width - 1)");
    p.initial_states = view_bdl(*initial_states);
  }
  p.channel_last = is_channel_last(x_in);
  p.silu = silu;
  a.x = normalise_layout(x_in, p.channel_last);
  p.x = view_bdl(a.x);
}

}  // namespace

FwdArgs prepare_fwd(const at::Tensor& x, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& seq_idx,
                    const c10::optional<at::Tensor>& initial_states, bool return_final_states,
                    bool silu) {
  FwdArgs a;
  check_common(a, x, weight, bias, seq_idx, initial_states, silu);
  const auto& p = a.p;
  a.out = empty_in_layout(p.batch, p.dim, p.seqlen, p.channel_last, x.options());
  a.p.out = view_bdl(a.out);
  a.final_states = return_final_states
                       ? empty_in_layout(p.batch, p.dim, p.width - 1, p.channel_last, x.options())
                       : at::empty({0}, x.options());
  a.p.final_states = view_bdl(a.final_states);
  return a;
}

BwdArgs prepare_bwd(const at::Tensor& x, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& seq_idx,
                    const c10::optional<at::Tensor>& initial_states, const at::Tensor& dout,
                    const c10::optional<at::Tensor>& dfinal_states, bool silu) {
  BwdArgs a;
  check_common(a, x, weight, bias, seq_idx, initial_states, silu);
  const auto& p = a.p;
  check_same_device(dout, "dout", x, "x");
  check_dtype(dout, "dout", x.scalar_type());
  check_shape(dout, "dout", {p.batch, p.dim, p.seqlen}, "(batch, dim, seqlen)");
  a.dout = normalise_layout(dout, p.channel_last);
  a.p.dout = view_bdl(a.dout);
  if (dfinal_states.has_value()) {
    check_same_device(*dfinal_states, "dfinal_states", x, "x");
    check_dtype(*dfinal_states, "dfinal_states", x.scalar_type());
    check_shape(*dfinal_states, "dfinal_states", {p.batch, p.dim, p.width - 1},
                "(batch, dim, width - 1)");
    a.p.dfinal_states = view_bdl(*dfinal_states);
  }
  a.dx = empty_in_layout(p.batch, p.dim, p.seqlen, p.channel_last, x.options());
  a.p.dx = view_bdl(a.dx);
  a.dinitial_states = initial_states.has_value()
                          ? empty_in_layout(p.batch, p.dim, p.width - 1, p.channel_last, x.options())
                          : at::empty({0}, x.options());
  a.p.dinitial_states = view_bdl(a.dinitial_states);
  return a;
}

void alloc_param_partials(BwdArgs& a, int64_t n_part, at::Tensor& dweight_part,
                          at::Tensor& dbias_part) {
  auto opts = a.x.options().dtype(at::kFloat);
  dweight_part = at::empty({n_part, a.p.dim, a.p.width}, opts);
  dbias_part = at::empty({n_part, a.p.dim}, opts);
  a.p.dweight_part = dweight_part.data_ptr<float>();
  a.p.dbias_part = dbias_part.data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor> finish_param_grads(const at::Tensor& dweight_part,
                                                      const at::Tensor& dbias_part,
                                                      const at::Tensor& weight,
                                                      const c10::optional<at::Tensor>& bias) {
  at::Tensor dweight = dweight_part.sum(0).to(weight.scalar_type());
  at::Tensor dbias = bias.has_value() ? dbias_part.sum(0).to(bias->scalar_type())
                                      : at::empty({0}, weight.options());
  return {dweight, dbias};
}

UpdateArgs prepare_update(const at::Tensor& x, const at::Tensor& conv_state,
                          const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          bool silu, const c10::optional<at::Tensor>& cache_seqlens,
                          const c10::optional<at::Tensor>& conv_state_indices) {
  UpdateArgs a;
  UpdateParams& p = a.p;
  check_ndim(x, "x", 3, "(batch, dim, seqlen)");
  check_input_dtype(x, "x");
  const int64_t B = x.size(0), D = x.size(1), L = x.size(2);
  set_weight(p, weight, x);
  const int64_t W = p.width;
  check_ndim(conv_state, "conv_state", 3, "(batch, dim, state_len)");
  check_same_device(conv_state, "conv_state", x, "x");
  check_dtype(conv_state, "conv_state", x.scalar_type());
  TORCH_CHECK(conv_state.size(1) == D && conv_state.size(2) >= W - 1,
              msg("conv_state must have shape (batch, dim, state_len) with dim = ", D,
                  " and state_len >= width - 1 = ", W - 1, ", got ", shape_str(conv_state.sizes())));
  if (conv_state_indices.has_value()) {
    check_same_device(*conv_state_indices, "conv_state_indices", x, "x");
    check_dtype(*conv_state_indices, "conv_state_indices", at::kInt);
    check_shape(*conv_state_indices, "conv_state_indices", {B}, "(batch,)");
    TORCH_CHECK(conv_state_indices->is_contiguous(), "conv_state_indices must be contiguous");
    p.conv_state_indices = conv_state_indices->data_ptr<int32_t>();
  } else {
    TORCH_CHECK(conv_state.size(0) == B, msg("conv_state must have batch size ", B,
                " (x.size(0)) when conv_state_indices is None, got ",
                shape_str(conv_state.sizes())));
  }
  if (cache_seqlens.has_value()) {
    check_same_device(*cache_seqlens, "cache_seqlens", x, "x");
    check_dtype(*cache_seqlens, "cache_seqlens", at::kInt);
    check_shape(*cache_seqlens, "cache_seqlens", {B}, "(batch,)");
    TORCH_CHECK(cache_seqlens->is_contiguous(), "cache_seqlens must be contiguous");
    p.cache_seqlens = cache_seqlens->data_ptr<int32_t>();
  }
  a.bias = set_bias(p, bias, weight, x);
  p.batch = B;
  p.dim = D;
  p.seqlen = L;
  p.state_len = conv_state.size(2);
  p.pool_size = conv_state.size(0);
  p.silu = silu;
  a.out = at::empty({B, D, L}, x.options());
  p.x = view_bdl(x);
  p.out = view_bdl(a.out);
  p.conv_state = view_bdl(conv_state);
  return a;
}

void check_varlen_states(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t state_len) {
  check_ndim(x, "x", 2, "(total_tokens, dim)");
  check_input_dtype(x, "x");
  check_ndim(cu_seqlens, "cu_seqlens", 1, "(nseq + 1,)");
  check_same_device(cu_seqlens, "cu_seqlens", x, "x");
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong,
              msg("cu_seqlens must have dtype int32 or int64, got ", cu_seqlens.scalar_type()));
  TORCH_CHECK(cu_seqlens.size(0) >= 1, "cu_seqlens must hold at least one offset (0)");
  TORCH_CHECK(state_len >= 1, msg("state_len must be >= 1, got ", state_len));
}

}  // namespace conv1d
}  // namespace ssm_ext
