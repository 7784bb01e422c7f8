// ISSM chunked scan (SPEC.md section 3): gated linear attention with a per-key decay. Per head
// h, state n, group g = h / (nheads / ngroups):
//   delta_t[n] = clamp(phi(dt_t[h,n] + dt_bias[h,n]), lo, hi)     phi = softplus or identity
//   s_t[p,n]   = exp(delta_t[n]*A[h,n]) * s_{t-1}[p,n] + delta_t[n]*B_t[g,n]*x_t[h,p]
//   y_t[p]     = sum_n C_t[g,n]*s_t[p,n] + D[h(,p)]*x_t[h,p],    out = y * silu(z) or y
// The params struct shared by the CPU and CUDA kernels, and the argument checking both go through.
//
// Sequences: the state starts at initial_states (or 0) at the start of every segment (a batch
// row, or with cu_seqlens one packed sequence of batch row 0), and is reset to 0 inside a
// segment wherever seq_idx changes from one step to the next.
#pragma once
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include "common/load.h"

namespace ssm_ext {
namespace issm {

// A strided view of up to 4 dims; a null ptr means "absent". A stride of 0 broadcasts: D of
// shape (H,) is seen as (H, P) with s1 = 0, dt_bias of shape (H,) as (H, N) with s1 = 0.
struct View4 {
  void* ptr = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  C10_HOST_DEVICE int64_t at(int64_t i0, int64_t i1, int64_t i2 = 0, int64_t i3 = 0) const {
    return i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3;
  }
};

inline View4 view4(const at::Tensor& t) {
  View4 v;
  if (!t.defined() || t.numel() == 0) return v;
  v.ptr = t.data_ptr();
  int64_t* s[4] = {&v.s0, &v.s1, &v.s2, &v.s3};
  for (int64_t d = 0; d < t.dim(); ++d) *s[d] = t.stride(d);
  return v;
}

struct IssmParams {
  int64_t batch = 0, seqlen = 0, nheads = 0, headdim = 0, dstate = 0, ngroups = 0;
  int64_t heads_per_group = 1;
  int64_t chunk_size = 256;  // a tuning hint: results do not depend on it
  int64_t nseq = 0;          // segments: batch, or cu_seqlens.size(0) - 1 with cu_seqlens

  bool dt_softplus = false;  // phi = softplus (identity above 20) or identity
  double dt_lo = 0.0, dt_hi = 0.0;  // the clamp, always applied; hi may be +inf
  float dt_lo_f = 0.f, dt_hi_f = 0.f;  // the same in fp32 (the CUDA kernels' clamp, converted once)
  bool D_per_head = false;          // D is (H,) (else (H, P))
  bool dt_bias_per_head = false;    // dt_bias is (H,) (else (H, N))

  // x, dt, B, C, z and out (and dout, dx, ddt, dB, dC, dz) share one dtype; the small
  // tensors each have their own (parameters are often fp32 under bf16 activations).
  Dtype in_dtype = Dtype::f32;
  Dtype A_dtype = Dtype::f32, D_dtype = Dtype::f32, dt_bias_dtype = Dtype::f32,
        init_dtype = Dtype::f32;

  View4 x, z, out;             // (batch, seqlen, nheads, headdim); out contiguous
  View4 dt;                    // (batch, seqlen, nheads, dstate)
  View4 B, C;                  // (batch, seqlen, ngroups, dstate)
  View4 A;                     // (nheads, dstate)
  View4 D;                     // (nheads, headdim), s1 = 0 when D is (nheads,); or absent
  View4 dt_bias;               // (nheads, dstate), s1 = 0 when (nheads,); or absent
  View4 initial_states;        // (nseq, nheads, headdim, dstate) in init_dtype, or absent
  View4 final_states;          // (nseq, nheads, headdim, dstate) fp32 (fp64 for fp64 x), or absent
  const int32_t* seq_idx = nullptr;  // (batch, seqlen)
  int64_t seq_idx_sb = 0, seq_idx_sl = 0;
  const void* cu_seqlens = nullptr;  // (nseq + 1,) int32 or int64; batch == 1
  bool cu_seqlens_i64 = false;

  // backward: dout like x; dfinal_states like final_states (or absent). Gradients are
  // contiguous, in the dtype of their input; dD and ddt_bias have D's and dt_bias's shape.
  View4 dout, dfinal_states;
  View4 dx, ddt, dB, dC, dz, dA, dD, ddt_bias, dinitial_states;
};

// Segment i: batch row b, steps [t0, t1).
struct Segment {
  int64_t b, t0, t1;
};

C10_HOST_DEVICE inline Segment segment(const IssmParams& p, int64_t i) {
  if (!p.cu_seqlens) return {i, 0, p.seqlen};
  if (p.cu_seqlens_i64) {
    const int64_t* cu = static_cast<const int64_t*>(p.cu_seqlens);
    return {0, cu[i], cu[i + 1]};
  }
  const int32_t* cu = static_cast<const int32_t*>(p.cu_seqlens);
  return {0, int64_t(cu[i]), int64_t(cu[i + 1])};
}

// Whether the state is reset to 0 before step t (t > the segment's first step).
C10_HOST_DEVICE inline bool resets_at(const IssmParams& p, int64_t b, int64_t t) {
  if (!p.seq_idx) return false;
  const int32_t* s = p.seq_idx + b * p.seq_idx_sb;
  return s[t * p.seq_idx_sl] != s[(t - 1) * p.seq_idx_sl];
}

struct FwdArgs {
  at::Tensor out, final_states;
  at::Tensor seq_idx, cu_seqlens;  // kept alive (contiguous copies) while the kernel runs
  IssmParams p;
};
struct BwdArgs {
  at::Tensor dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states;
  at::Tensor seq_idx, cu_seqlens;
  IssmParams p;
};

FwdArgs prepare_fwd(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& C, int64_t chunk_size, const c10::optional<at::Tensor>& D,
                    const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& dt_bias,
                    const c10::optional<at::Tensor>& initial_states, const c10::optional<at::Tensor>& seq_idx,
                    const c10::optional<at::Tensor>& cu_seqlens, bool dt_softplus, double dt_limit_lo,
                    double dt_limit_hi, bool return_final_states);

BwdArgs prepare_bwd(const at::Tensor& x, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& B,
                    const at::Tensor& C, int64_t chunk_size, const c10::optional<at::Tensor>& D,
                    const c10::optional<at::Tensor>& z, const c10::optional<at::Tensor>& dt_bias,
                    const c10::optional<at::Tensor>& initial_states, const c10::optional<at::Tensor>& seq_idx,
                    const c10::optional<at::Tensor>& cu_seqlens, bool dt_softplus, double dt_limit_lo,
                    double dt_limit_hi, const at::Tensor& dout, const c10::optional<at::Tensor>& dfinal_states);

}  // namespace issm
}  // namespace ssm_ext
