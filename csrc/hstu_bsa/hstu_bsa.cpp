// Argument checking for the HSTU attention ops, shared by CPU and CUDA.
#include "hstu_bsa/hstu_bsa.h"

#include <c10/util/intrusive_ptr.h>

#include <cmath>
#include <mutex>

#include "common/checks.h"

namespace ssm_ext {
namespace hstu_bsa {
namespace {

Mat mat(const at::Tensor& t) {
  Mat m;
  if (!t.defined() || t.numel() == 0) return m;
  m.ptr = t.data_ptr();
  m.st = t.stride(0);
  m.sc = t.stride(1);
  return m;
}

Mat3 mat3(const at::Tensor& t) {
  Mat3 m;
  if (!t.defined() || t.numel() == 0) return m;
  m.ptr = t.data_ptr();
  m.s0 = t.stride(0);
  m.s1 = t.stride(1);
  m.s2 = t.stride(2);
  return m;
}

const char* kPadded = " (the padded length, invalid_attn_mask.size(-1))";

// x_offsets' values: 0 first, never decreasing, T last; returns the longest sequence.
int64_t read_offsets_values(const at::Tensor& offsets, int64_t total) {
  const at::Tensor host = offsets.cpu();
  const int64_t* o = host.data_ptr<int64_t>();
  const int64_t batch = host.size(0) - 1;
  TORCH_CHECK(o[0] == 0, msg("x_offsets[0] must be 0, got ", o[0]));
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(o[b + 1] >= o[b], msg("x_offsets must not decrease: x_offsets[", b + 1, "] = ", o[b + 1],
                                      " < x_offsets[", b, "] = ", o[b]));
    TORCH_CHECK(o[b + 1] <= total, msg("x_offsets[", b + 1, "] = ", o[b + 1], " is past the end of q (",
                                       total, " rows)"));
    longest = std::max(longest, o[b + 1] - o[b]);
  }
  TORCH_CHECK(o[batch] == total, msg("x_offsets[-1] = ", o[batch], " must equal q.size(0) = ", total,
                                     " (the number of jagged rows)"));
  return longest;
}

// Reading GPU offsets costs a device sync, which at short lengths was most of an op's time
// (every layer, forward and backward, passes the same x_offsets). So a GPU tensor once checked
// is remembered: the same tensor (a weak reference keeps its TensorImpl from being reused) at the
// same version (any in-place write bumps it) and the same T is not read again.
int64_t check_offsets_values(const at::Tensor& offsets, int64_t total) {
  if (!offsets.is_cuda()) return read_offsets_values(offsets, total);
  struct Checked {
    c10::weak_intrusive_ptr<c10::TensorImpl> impl{c10::intrusive_ptr<c10::TensorImpl>()};
    uint32_t version = 0;
    int64_t total = -1, longest = 0;
  };
  constexpr int kRemembered = 16;
  static std::mutex mutex;
  static Checked checked[kRemembered];
  static int next = 0;
  const uint32_t version = offsets._version();
  {
    const std::lock_guard<std::mutex> lock(mutex);
    for (const Checked& c : checked)
      if (c.total == total && c.version == version && c.impl.lock().get() == offsets.unsafeGetTensorImpl())
        return c.longest;
  }
  const int64_t longest = read_offsets_values(offsets, total);  // throws on bad values: nothing remembered
  const std::lock_guard<std::mutex> lock(mutex);
  checked[next] = Checked{c10::weak_intrusive_ptr<c10::TensorImpl>(offsets.getIntrusivePtr()), version, total, longest};
  next = (next + 1) % kRemembered;
  return longest;
}

// q, k (T, H*dim_qk), x_offsets (B+1) int64, n, num_heads, alpha. Fills the sizes, q, k and
// the offsets; returns x_offsets made contiguous.
at::Tensor check_qk(HstuParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& x_offsets,
                    int64_t n, int64_t num_heads, double alpha) {
  check_ndim(q, "q", 2, "(T, num_heads * attention_dim)");
  check_input_dtype(q, "q");
  TORCH_CHECK(num_heads > 0, msg("num_heads must be positive, got ", num_heads));
  TORCH_CHECK(q.size(1) % num_heads == 0, msg("q.size(1) = ", q.size(1), " (num_heads * attention_dim) is "
                                              "not divisible by num_heads = ", num_heads));
  check_same_device(k, "k", q, "q");
  check_dtype(k, "k", q.scalar_type());
  check_shape(k, "k", q.sizes(), "(T, num_heads * attention_dim) like q");
  TORCH_CHECK(std::isfinite(alpha), "alpha must be finite");
  check_ndim(x_offsets, "x_offsets", 1, "(B + 1) sequence offsets");
  check_dtype(x_offsets, "x_offsets", at::kLong);
  check_same_device(x_offsets, "x_offsets", q, "q");
  TORCH_CHECK(x_offsets.size(0) >= 1, "x_offsets must have B + 1 >= 1 entries, got none");
  TORCH_CHECK(n > 0, msg("n", kPadded, " must be positive, got ", n));
  p.batch = x_offsets.size(0) - 1;
  p.total = q.size(0);
  p.heads = num_heads;
  p.dim_qk = q.size(1) / num_heads;
  p.n = n;
  p.alpha = alpha;
  p.dtype = dtype_of(q);
  p.q = mat(q);
  p.k = mat(k);
  at::Tensor offsets = x_offsets.contiguous();
  p.offsets = offsets.data_ptr<int64_t>();
  p.max_len = check_offsets_values(offsets, p.total);
  TORCH_CHECK(p.max_len <= n, msg("n = ", n, kPadded, " is smaller than the longest sequence in x_offsets (",
                                  p.max_len, " rows)"));
  return offsets;
}

// v (T, H*dim_v) like q's dtype and device.
void check_v(HstuParams& p, const at::Tensor& v, const at::Tensor& q) {
  check_ndim(v, "v", 2, "(T, num_heads * linear_dim)");
  check_same_device(v, "v", q, "q");
  check_dtype(v, "v", q.scalar_type());
  TORCH_CHECK(v.size(0) == p.total, msg("v must have T = ", p.total, " rows like q, got shape ",
                                        shape_str(v.sizes())));
  TORCH_CHECK(v.size(1) % p.heads == 0, msg("v.size(1) = ", v.size(1), " (num_heads * linear_dim) is "
                                            "not divisible by num_heads = ", p.heads));
  p.dim_v = v.size(1) / p.heads;
  p.v = mat(v);
}

void check_same_as(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name,
                   const char* meaning) {
  check_same_device(t, name, ref, ref_name);
  check_dtype(t, name, ref.scalar_type());
  check_shape(t, name, ref.sizes(), meaning);
}

void check_mask(HstuParams& p, const c10::optional<at::Tensor>& attn_mask, const at::Tensor& q) {
  if (!attn_mask.has_value()) return;
  const at::Tensor& m = *attn_mask;
  check_ndim(m, "attn_mask", 3, "(1 or B, n, n)");
  check_same_device(m, "attn_mask", q, "q");
  check_float(m, "attn_mask", /*allow_double=*/!m.is_cuda());
  TORCH_CHECK((m.size(0) == 1 || m.size(0) == p.batch) && m.size(1) >= p.max_len && m.size(2) >= p.max_len,
              msg("attn_mask must have shape (1 or B = ", p.batch, ", >= L, >= L) with L = ", p.max_len,
                  " the longest sequence, got ", shape_str(m.sizes())));
  p.mask = mat3(m);
  p.mask_batch = m.size(0);
  p.mask_dtype = dtype_of(m);
}

void check_block_size(HstuParams& p, int64_t block_size) {
  TORCH_CHECK(block_size > 0, msg("block_size must be positive, got ", block_size));
  p.block_size = block_size;
}

// u, gates, block_idx, window_size, attn_mask of the block-sparse ops (after check_qk, check_v).
void check_bsa(HstuParams& p, const at::Tensor& q, const at::Tensor& v, const c10::optional<at::Tensor>& u,
               const at::Tensor& gates, const at::Tensor& block_idx, int64_t block_size, int64_t window_size,
               const c10::optional<at::Tensor>& attn_mask) {
  if (u.has_value()) {
    check_same_as(*u, "u", v, "v", "(T, num_heads * linear_dim) like v");
    p.u = mat(*u);
  }
  check_ndim(gates, "gates", 3, "(T, num_heads, 3)");
  check_same_device(gates, "gates", q, "q");
  check_input_dtype(gates, "gates");
  check_shape(gates, "gates", {p.total, p.heads, 3}, "(T, num_heads, 3)");
  p.gates = mat3(gates);
  p.gates_dtype = dtype_of(gates);
  check_ndim(block_idx, "block_idx", 3, "(T, num_heads, block_counts)");
  check_same_device(block_idx, "block_idx", q, "q");
  check_dtype(block_idx, "block_idx", at::kInt);
  TORCH_CHECK(block_idx.size(0) == p.total && block_idx.size(1) == p.heads,
              msg("block_idx must have shape (T, num_heads, block_counts) with (T, num_heads) = ",
                  shape_str({p.total, p.heads}), ", got ", shape_str(block_idx.sizes())));
  p.block_idx = mat3(block_idx);
  p.block_counts = block_idx.size(2);
  check_block_size(p, block_size);
  TORCH_CHECK(window_size >= 0, msg("window_size must be >= 0, got ", window_size));
  p.window_size = window_size;
  check_mask(p, attn_mask, q);
}

void check_dout(HstuParams& p, const at::Tensor& dout, const at::Tensor& q) {
  check_ndim(dout, "dout", 2, "(T, num_heads * linear_dim)");
  check_same_device(dout, "dout", q, "q");
  check_dtype(dout, "dout", q.scalar_type());
  check_shape(dout, "dout", {p.total, p.heads * p.dim_v}, "(T, num_heads * linear_dim)");
  p.dout = mat(dout);
}

at::Tensor new_out(const HstuParams& p, const at::Tensor& q) {
  return at::empty({p.total, p.heads * p.dim_v}, q.options());
}

}  // namespace

AttnFwdArgs prepare_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& x_offsets, int64_t n, int64_t num_heads, double alpha,
                             const c10::optional<at::Tensor>& attn_mask) {
  AttnFwdArgs r;
  r.offsets = check_qk(r.p, q, k, x_offsets, n, num_heads, alpha);
  check_v(r.p, v, q);
  check_mask(r.p, attn_mask, q);
  r.out = new_out(r.p, q);
  r.p.out = mat(r.out);
  return r;
}

AttnBwdArgs prepare_attn_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& x_offsets, int64_t n, int64_t num_heads, double alpha,
                             const c10::optional<at::Tensor>& attn_mask, const at::Tensor& dout) {
  AttnBwdArgs r;
  r.offsets = check_qk(r.p, q, k, x_offsets, n, num_heads, alpha);
  check_v(r.p, v, q);
  check_mask(r.p, attn_mask, q);
  check_dout(r.p, dout, q);
  r.dq = at::empty(q.sizes(), q.options());
  r.dk = at::empty(k.sizes(), k.options());
  r.dv = at::empty(v.sizes(), v.options());
  r.p.dq = mat(r.dq);
  r.p.dk = mat(r.dk);
  r.p.dv = mat(r.dv);
  return r;
}

TopkArgs prepare_topk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& x_offsets, int64_t n,
                      int64_t num_heads, double alpha, int64_t block_size, int64_t block_counts) {
  TopkArgs r;
  r.offsets = check_qk(r.p, q, k, x_offsets, n, num_heads, alpha);
  check_block_size(r.p, block_size);
  TORCH_CHECK(block_counts > 0, msg("block_counts must be positive, got ", block_counts));
  r.p.block_counts = block_counts;
  r.block_idx = at::empty({r.p.total, num_heads, block_counts}, q.options().dtype(at::kInt));
  r.p.block_idx = mat3(r.block_idx);
  return r;
}

BsaFwdArgs prepare_bsa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const c10::optional<at::Tensor>& u, const at::Tensor& gates,
                           const at::Tensor& block_idx, const at::Tensor& x_offsets, int64_t n,
                           int64_t num_heads, double alpha, int64_t block_size, int64_t window_size,
                           const c10::optional<at::Tensor>& attn_mask) {
  BsaFwdArgs r;
  r.offsets = check_qk(r.p, q, k, x_offsets, n, num_heads, alpha);
  check_v(r.p, v, q);
  check_bsa(r.p, q, v, u, gates, block_idx, block_size, window_size, attn_mask);
  r.out = new_out(r.p, q);
  r.p.out = mat(r.out);
  return r;
}

BsaBwdArgs prepare_bsa_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const c10::optional<at::Tensor>& u, const at::Tensor& gates,
                           const at::Tensor& block_idx, const at::Tensor& x_offsets, int64_t n,
                           int64_t num_heads, double alpha, int64_t block_size, int64_t window_size,
                           const c10::optional<at::Tensor>& attn_mask, const at::Tensor& dout) {
  BsaBwdArgs r;
  r.offsets = check_qk(r.p, q, k, x_offsets, n, num_heads, alpha);
  check_v(r.p, v, q);
  check_bsa(r.p, q, v, u, gates, block_idx, block_size, window_size, attn_mask);
  check_dout(r.p, dout, q);
  r.dq = at::empty(q.sizes(), q.options());
  r.dk = at::empty(k.sizes(), k.options());
  r.dv = at::empty(v.sizes(), v.options());
  r.du = u.has_value() ? at::empty(v.sizes(), v.options()) : at::empty({0}, v.options());
  r.dgates = at::empty(gates.sizes(), gates.options());
  r.p.dq = mat(r.dq);
  r.p.dk = mat(r.dk);
  r.p.dv = mat(r.dv);
  r.p.du = mat(r.du);
  r.p.dgates = mat3(r.dgates);
  return r;
}

}  // namespace hstu_bsa
}  // namespace ssm_ext
