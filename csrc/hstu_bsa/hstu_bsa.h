// HSTU pointwise-SiLU attention on jagged sequences, dense and block-sparse (SPEC.md section 6):
// the params struct shared by the CPU and CUDA kernels, and the argument checking both go
// through.
//
// For sequence b (rows x_offsets[b] .. x_offsets[b+1]-1), head h, query t and key j <= t
// (positions within the sequence): w(t, j) = silu(alpha * q_t . k_j) / n * mask(t, j).
//   dense:     o(t) = sum_{j <= t} w(t, j) v_j
//   block-sparse, blocks of block_size keys, kbar_c / vbar_c the means over complete block c:
//     o_cmp(t) = sum over complete blocks c ending at or before t of silu(alpha q_t . kbar_c) / n vbar_c
//     o_slc(t) = sum over the blocks c listed in block_idx[t, h] of sum_{j in c, j <= t} w(t, j) v_j
//     o_swa(t) = sum_{t - window_size < j <= t} w(t, j) v_j   (0 when window_size == 0)
//     out(t)   = u_t * (g_cmp o_cmp + g_slc o_slc + g_swa o_swa)
#pragma once
#include <ATen/ATen.h>

#include "common/load.h"

namespace ssm_ext {
namespace hstu_bsa {

// Element (t, c) of a 2-D tensor lives at ptr[t*st + c*sc]; a null ptr means "absent".
struct Mat {
  void* ptr = nullptr;
  int64_t st = 0, sc = 0;
};

// Element (i, j, k) of a 3-D tensor lives at ptr[i*s0 + j*s1 + k*s2]; a null ptr means "absent".
struct Mat3 {
  void* ptr = nullptr;
  int64_t s0 = 0, s1 = 0, s2 = 0;
};

struct HstuParams {
  int64_t batch = 0;          // B sequences
  int64_t total = 0;          // T jagged rows = x_offsets[B]
  int64_t heads = 0;          // H
  int64_t dim_qk = 0;         // per-head width of q and k
  int64_t dim_v = 0;          // per-head width of v and u
  int64_t n = 0;              // padded length: w is divided by n; n >= max_len
  int64_t max_len = 0;        // longest sequence
  double alpha = 0;
  int64_t block_size = 0, block_counts = 0, window_size = 0;
  const int64_t* offsets = nullptr;  // x_offsets (B+1), on the tensors' device
  Dtype dtype = Dtype::f32;   // q, k, v, u, out, dout and their gradients
  Mat q, k;                   // (T, H*dim_qk): head h is columns h*dim_qk ..
  Mat v, u;                   // (T, H*dim_v); u absent means 1
  Mat3 gates;                 // (T, H, 3): g_cmp, g_slc, g_swa
  Dtype gates_dtype = Dtype::f32;
  Mat3 block_idx;             // (T, H, S) int32; entries < 0 are empty slots
  Mat3 mask;                  // (1 or B, >= max_len, >= max_len), multiplies w; absent means 1
  int64_t mask_batch = 0;     // 1: one mask for every sequence; B: one each
  Dtype mask_dtype = Dtype::f32;
  Mat out;                    // (T, H*dim_v)
  // backward
  Mat dout;                   // (T, H*dim_v)
  Mat dq, dk, dv, du;         // like q, k, v, u (du absent when u is)
  Mat3 dgates;                // like gates, in gates' dtype
};

struct AttnFwdArgs {
  at::Tensor out, offsets;
  HstuParams p;
};
struct AttnBwdArgs {
  at::Tensor dq, dk, dv, offsets;
  HstuParams p;
};
struct TopkArgs {
  at::Tensor block_idx, offsets;
  HstuParams p;
};
struct BsaFwdArgs {
  at::Tensor out, offsets;
  HstuParams p;
};
struct BsaBwdArgs {
  at::Tensor dq, dk, dv, du, dgates, offsets;
  HstuParams p;
};

// The checks read x_offsets' values on the host (a copy, and a sync, for a CUDA x_offsets):
// offsets must start at 0, never decrease, end at T, and no sequence may be longer than n.
AttnFwdArgs prepare_attn_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& x_offsets, int64_t n, int64_t num_heads, double alpha,
                             const c10::optional<at::Tensor>& attn_mask);
AttnBwdArgs prepare_attn_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& x_offsets, int64_t n, int64_t num_heads, double alpha,
                             const c10::optional<at::Tensor>& attn_mask, const at::Tensor& dout);
TopkArgs prepare_topk(const at::Tensor& q, const at::Tensor& k, const at::Tensor& x_offsets, int64_t n,
                      int64_t num_heads, double alpha, int64_t block_size, int64_t block_counts);
BsaFwdArgs prepare_bsa_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const c10::optional<at::Tensor>& u, const at::Tensor& gates,
                           const at::Tensor& block_idx, const at::Tensor& x_offsets, int64_t n,
                           int64_t num_heads, double alpha, int64_t block_size, int64_t window_size,
                           const c10::optional<at::Tensor>& attn_mask);
BsaBwdArgs prepare_bsa_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const c10::optional<at::Tensor>& u, const at::Tensor& gates,
                           const at::Tensor& block_idx, const at::Tensor& x_offsets, int64_t n,
                           int64_t num_heads, double alpha, int64_t block_size, int64_t window_size,
                           const c10::optional<at::Tensor>& attn_mask, const at::Tensor& dout);

}  // namespace hstu_bsa
}  // namespace ssm_ext
