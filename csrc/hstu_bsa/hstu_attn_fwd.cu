// Dense causal HSTU attention, forward (CUDA): out(t) = sum_{j <= t} silu(alpha q_t.k_j) / n
// * mask(t, j) v_j per (sequence, head). No softmax, so no running max: a CTA owns 128 queries
// (4 warps x 32 rows; 64 = 4 x 16 on the fp32 FFMA path), keeps O in registers, and walks the
// key tiles 0 .. its diagonal
// through a 2-stage cp.async pipeline: S = Q K^T, P = silu(alpha S) / n (masked on the
// diagonal tile and where attn_mask is given), O += P V with P reused from the accumulators.
// Grid (B*H, query tiles), the heaviest (last) tiles first; tiles past a sequence exit.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "hstu_bsa/hstu_tile.cuh"

namespace ssm_ext {
namespace hstu_bsa {
namespace {

constexpr int kBN = 64;  // keys per tile

// 16-row tiles per warp: 2 on the tensor cores (each K / V fragment read feeds two MMAs), 1 on
// the fp32 FFMA path. A CTA owns kWarps * 16 * MT queries.
template <typename T>
constexpr int kMT = kTensorCores<T> ? 2 : 1;
template <typename T>
constexpr int kBM = kWarps * 16 * kMT<T>;

template <typename T, int D>
constexpr size_t fwd_smem() {
  return size_t(kBM<T> + 4 * kBN) * D * sizeof(T) + size_t(kWarps) * scratch_floats<T, kBN / 8>() * 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dense_fwd_kernel(const HstuParams p, const Operand Q, const Operand K,
                                                             const Operand V, int n_tiles) {
  constexpr int MT = kMT<T>, BM = kBM<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;           // 2 stages
  T* sV = sK + 2 * kBN * D;      // 2 stages
  float* scratch = reinterpret_cast<float*>(sV + 2 * kBN * D);
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const int64_t start = p.offsets[b];
  const int len = static_cast<int>(p.offsets[b + 1] - start);
  const int q0 = (n_tiles - 1 - static_cast<int>(blockIdx.y)) * BM;
  if (q0 >= len) return;
  float* wscratch = scratch + w * scratch_floats<T, kBN / 8>();
  const int r0 = w * 16 * MT;  // the warp's first row in the tile

  const T* gQ = static_cast<const T*>(Q.ptr) + start * Q.st + h * Q.hs;
  const T* gK = static_cast<const T*>(K.ptr) + start * K.st + h * K.hs;
  const T* gV = static_cast<const T*>(V.ptr) + start * V.st + h * V.hs;
  load_tile<T, D, BM>(sQ, gQ + q0 * Q.st, Q.st, len - q0, Q.cols, Q.ptr, tid);
  const int last = min(len, q0 + BM) - 1;  // the last query of the tile
  const int n_kt = last / kBN + 1;
  auto load_kv = [&](int it) {
    const int k0 = it * kBN, st = it & 1;
    load_tile<T, D, kBN>(sK + st * kBN * D, gK + k0 * K.st, K.st, len - k0, K.cols, K.ptr, tid);
    load_tile<T, D, kBN>(sV + st * kBN * D, gV + k0 * V.st, V.st, len - k0, V.cols, V.ptr, tid);
  };
  load_kv(0);
  mma::cp_async_commit();

  const float alpha = static_cast<float>(p.alpha), inv_n = 1.f / static_cast<float>(p.n);
  const bool has_mask = p.mask.ptr != nullptr;
  float o[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) zero(o[mt]);
  for (int it = 0; it < n_kt; ++it) {
    if (it + 1 < n_kt) {
      load_kv(it + 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    const int st = it & 1, k0 = it * kBN;
    // Warps whose rows all precede the tile skip it (their P would be 0); the others still
    // take part in the barriers.
    if (k0 <= q0 + r0 + 16 * MT - 1) {
      float s[MT][kBN / 8][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) zero(s[mt]);
      gemm_abt_mt<T, D, kBN / 8, MT>(s, sQ, r0, sK + st * kBN * D, 0, lane);
      const bool diag = k0 + kBN - 1 > q0 + r0;  // some key of the tile is after some row of the warp
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float x = alpha * s[mt][j][e];
            float w_ = x * mma::sigmoid_io<T>(x) * inv_n;
            if (diag || has_mask) {
              const int t = q0 + r0 + mt * 16 + frag_row(lane, e), kj = k0 + frag_col(lane, j, e);
              if (kj > t || t >= len) w_ = 0.f;
              else if (has_mask) w_ *= mask_at(p, b, t, kj);
            }
            s[mt][j][e] = w_;
          }
        }
      }
      gemm_pb_mt<T, D, kBN / 8, MT>(o, s, sV + st * kBN * D, 0, wscratch, lane);
    }
    __syncthreads();  // the stage is refilled next iteration
  }
  T* out = static_cast<T*>(p.out.ptr) + (start + q0) * p.out.st + h * p.dim_v * p.out.sc;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    store_frag<T, D>(o[mt], out, p.out, r0 + mt * 16, len - q0, static_cast<int>(p.dim_v), 1.f, lane);
}

at::Tensor attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& x_offsets,
                         int64_t n, int64_t num_heads, double alpha, const c10::optional<at::Tensor>& attn_mask) {
  AttnFwdArgs r = prepare_attn_fwd(q, k, v, x_offsets, n, num_heads, alpha, attn_mask);
  HstuParams& p = r.p;
  check_cuda_dims(p);
  const c10::cuda::CUDAGuard guard(q.device());
  if (p.total == 0 || p.batch == 0 || p.dim_v == 0) return r.out;
  if (p.dim_qk == 0) return r.out.zero_();  // silu(0) = 0
  at::Tensor kq, kk, kv;
  const Operand Q = make_operand(q, p.heads, p.dim_qk, kq), K = make_operand(k, p.heads, p.dim_qk, kk),
                V = make_operand(v, p.heads, p.dim_v, kv);
  const int D = padded_dim(std::max(p.dim_qk, p.dim_v));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_hstu(q.scalar_type(), D, [&](auto tv, auto dv) {
    using T = decltype(tv);
    constexpr int kD = decltype(dv)::value;
    const int n_tiles = static_cast<int>((p.max_len + kBM<T> - 1) / kBM<T>);
    TORCH_CHECK(n_tiles <= 65535, msg("sequences up to ", 65535 * kBM<T>, " rows on CUDA, got ", p.max_len));
    constexpr size_t smem = fwd_smem<T, kD>();
    set_smem(dense_fwd_kernel<T, kD>, smem);
    dense_fwd_kernel<T, kD><<<dim3(static_cast<unsigned>(p.batch * p.heads), n_tiles), kThreads, smem, stream>>>(
        p, Q, K, V, n_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return r.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("hstu_attn_fwd", &attn_fwd_cuda); }

}  // namespace hstu_bsa
}  // namespace ssm_ext
