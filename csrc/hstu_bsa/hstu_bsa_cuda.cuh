// Host-side pieces shared by the block-sparse forward and backward launchers.
#pragma once
#include "hstu_bsa/hstu_tile.cuh"

namespace ssm_ext {
namespace hstu_bsa {

// What the block-sparse kernels read besides HstuParams.
struct BsaOperands {
  Operand q, k, v, da;          // da = dout * u (backward only)
  const void* kbar = nullptr;   // (total blocks, H, D) block means of k, in q's dtype
  const void* vbar = nullptr;   // same for v
  const int64_t* cblk = nullptr;  // complete blocks before each sequence
};

inline void check_cuda_bsa(HstuParams& p) {
  TORCH_CHECK(p.block_counts <= 65535, msg("hstu_bsa on CUDA supports block_counts up to 65535, got ",
                                           p.block_counts));
  // Blocks longer than every sequence all behave alike (no complete block, every key in block
  // 0), so the kernels may use 32-bit block arithmetic.
  p.block_size = std::min<int64_t>(p.block_size, p.max_len + 1);
}

// The operands, padded head width and block means of one call.
struct BsaInputs {
  at::Tensor keep_q, keep_k, keep_v, keep_da, cblk, kbar, vbar, unused;
  BsaOperands X;
  int D = 32;
  BsaInputs(const HstuParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& offsets, cudaStream_t stream) {
    D = padded_dim(std::max(p.dim_qk, p.dim_v));
    X.q = make_operand(q, p.heads, p.dim_qk, keep_q);
    X.k = make_operand(k, p.heads, p.dim_qk, keep_k);
    X.v = make_operand(v, p.heads, p.dim_v, keep_v);
    cblk = block_offsets(offsets, p.block_size);
    block_means(p, k, p.dim_qk, cblk, D, /*want_lo=*/false, kbar, unused, stream);
    block_means(p, v, p.dim_v, cblk, D, /*want_lo=*/false, vbar, unused, stream);
    X.kbar = kbar.data_ptr();
    X.vbar = vbar.data_ptr();
    X.cblk = cblk.data_ptr<int64_t>();
  }
};

void launch_bsa_fwd(const HstuParams& p, const BsaOperands& X, at::ScalarType dtype, int D, cudaStream_t stream);

}  // namespace hstu_bsa
}  // namespace ssm_ext
