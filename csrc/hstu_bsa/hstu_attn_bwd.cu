// Dense causal HSTU attention, backward (CUDA), deterministic: two passes, no atomics.
//   s = alpha q_t.k_j, w = silu(s) / n * mask(t, j), dP(t, j) = dout_t . v_j,
//   dS = alpha dP mask / n silu'(s):  dv_j = sum_t w dout_t, dk_j = sum_t dS q_t, dq_t = sum_j dS k_j.
// dk/dv pass: a CTA owns 64 keys (K, V resident in shared memory) and walks the query tiles
// from its diagonal to the end of the sequence, computing S^T = K Q^T and dP^T = V dO^T, so
// w^T and dS^T are already the A operands of dV += w^T dO and dK += dS^T Q.
// dq pass: the forward's shape (hstu_tile.cuh: a CTA owns 128 queries, 8 warps x 16 rows, at
// most 128 registers so 2 CTAs = 16 warps per SM; fp32: 64 queries, 4 warps), Q and dO resident,
// walking the key tiles (32 keys at d 128 on the tensor cores, else 64) up to its diagonal
// through the forward's K / V ring (walk_kv_tiles): S = Q K^T, dP = dO V^T, dQ += dS K.
// attn_mask is a template parameter of the dq pass. Each output element is summed by one thread
// in a fixed order, so results are bitwise reproducible.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "hstu_bsa/hstu_tile.cuh"

namespace ssm_ext {
namespace hstu_bsa {
namespace {

// Query columns per tile in the dk/dv pass (32 at D = 128 keeps dK, dV, S, dP in registers).
template <int D>
constexpr int kQC = D >= 128 ? 32 : 64;

template <typename T, int D>
constexpr size_t dkdv_smem() {
  return size_t(2 * kRows + 4 * kQC<D>) * D * sizeof(T) + size_t(kWarps) * scratch_floats<T, kQC<D> / 8>() * 4;
}
// Q, dO resident (kQRows each) + the K / V ring: bf16 d 128 64 + 48 = 112 KB (2 CTAs per SM on
// the H100's 228 KB), d 64 32 + 48 = 80 KB; fp32 (2 stages of 64 keys) d 128 209 KB.
template <typename T, int D>
constexpr size_t dq_smem() {
  return size_t(2 * kQRows<T> + 2 * kKvStages<T> * kKeyTile<T, D>) * D * sizeof(T) +
         size_t(kQWarps<T>) * scratch_floats<T, kKeyTile<T, D> / 8>() * 4;
}

struct BwdOperands {
  Operand q, k, v, dout;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dense_dkdv_kernel(const HstuParams p, const BwdOperands X, int n_tiles) {
  constexpr int QC = kQC<D>;
  extern __shared__ __align__(1024) unsigned char smem_raw[];  // 1024: see Tile::addr
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kRows * D;
  T* sQ = sV + kRows * D;   // 2 stages
  T* sO = sQ + 2 * QC * D;  // dout, 2 stages
  float* scratch = reinterpret_cast<float*>(sO + 2 * QC * D);
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const int64_t start = p.offsets[b];
  const int len = static_cast<int>(p.offsets[b + 1] - start);
  const int k0 = static_cast<int>(blockIdx.y) * kRows;  // the first tiles have the most queries
  if (k0 >= len) return;
  float* wscratch = scratch + w * scratch_floats<T, QC / 8>();
  const T* gQ = static_cast<const T*>(X.q.ptr) + start * X.q.st + h * X.q.hs;
  const T* gK = static_cast<const T*>(X.k.ptr) + start * X.k.st + h * X.k.hs;
  const T* gV = static_cast<const T*>(X.v.ptr) + start * X.v.st + h * X.v.hs;
  const T* gO = static_cast<const T*>(X.dout.ptr) + start * X.dout.st + h * X.dout.hs;
  load_tile<T, D, kRows>(sK, gK + k0 * X.k.st, X.k.st, len - k0, X.k.cols, X.k.ptr, tid);
  load_tile<T, D, kRows>(sV, gV + k0 * X.v.st, X.v.st, len - k0, X.v.cols, X.v.ptr, tid);
  const int first = k0 / QC, n_qt = (len + QC - 1) / QC;
  auto load_q = [&](int qt) {
    const int t0 = qt * QC, st = qt & 1;
    load_tile<T, D, QC>(sQ + st * QC * D, gQ + t0 * X.q.st, X.q.st, len - t0, X.q.cols, X.q.ptr, tid);
    load_tile<T, D, QC>(sO + st * QC * D, gO + t0 * X.dout.st, X.dout.st, len - t0, X.dout.cols, X.dout.ptr, tid);
  };
  load_q(first);
  mma::cp_async_commit();

  const float alpha = static_cast<float>(p.alpha), inv_n = 1.f / static_cast<float>(p.n);
  const bool has_mask = p.mask.ptr != nullptr;
  float dk[D / 8][4], dv[D / 8][4];
  zero(dk);
  zero(dv);
  for (int qt = first; qt < n_qt; ++qt) {
    if (qt + 1 < n_qt) {
      load_q(qt + 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    const int st = qt & 1, t0 = qt * QC;
    float s[QC / 8][4], dp[QC / 8][4];
    zero(s);
    zero(dp);
    gemm_abt<T, D, QC / 8>(s, sK, w * 16, sQ + st * QC * D, 0, lane);
    gemm_abt<T, D, QC / 8>(dp, sV, w * 16, sO + st * QC * D, 0, lane);
    // Rows are keys j, columns queries t: causal where some t < some j of the warp.
    const bool diag = t0 < k0 + w * 16 + 15;
#pragma unroll
    for (int c = 0; c < QC / 8; ++c) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = alpha * s[c][e];
        const float sg = mma::sigmoid_io<T>(x);
        float m = inv_n;
        if (diag || has_mask) {
          const int j = k0 + w * 16 + frag_row(lane, e), t = t0 + frag_col(lane, c, e);
          if (j > t || t >= len) m = 0.f;
          else if (has_mask) m *= mask_at(p, b, t, j);
        }
        s[c][e] = x * sg * m;
        dp[c][e] = alpha * dp[c][e] * m * sg * (1.f + x * (1.f - sg));
      }
    }
    gemm_pb<T, D, QC / 8>(dv, s, sO + st * QC * D, 0, wscratch, lane);
    gemm_pb<T, D, QC / 8>(dk, dp, sQ + st * QC * D, 0, wscratch, lane);
    __syncthreads();
  }
  T* odk = static_cast<T*>(p.dk.ptr) + (start + k0) * p.dk.st + h * p.dim_qk * p.dk.sc;
  T* odv = static_cast<T*>(p.dv.ptr) + (start + k0) * p.dv.st + h * p.dim_v * p.dv.sc;
  store_frag<T, D>(dk, odk, p.dk, w * 16, len - k0, static_cast<int>(p.dim_qk), 1.f, lane);
  store_frag<T, D>(dv, odv, p.dv, w * 16, len - k0, static_cast<int>(p.dim_v), 1.f, lane);
}

template <typename T, int D, bool MASK>
__global__ void __launch_bounds__(kQThreads<T>, kQMinCtas<T>) dense_dq_kernel(const HstuParams p, const BwdOperands X,
                                                                             int n_tiles) {
  constexpr int NTH = kQThreads<T>, BM = kQRows<T>, S = kKvStages<T>, BN = kKeyTile<T, D>, NT = BN / 8;
  extern __shared__ __align__(1024) unsigned char smem_raw[];  // 1024: see Tile::addr
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sO = sQ + BM * D;      // dout
  T* sK = sO + BM * D;      // S stages
  T* sV = sK + S * BN * D;  // S stages
  float* scratch = reinterpret_cast<float*>(sV + S * BN * D);
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const int64_t start = p.offsets[b];
  const int len = static_cast<int>(p.offsets[b + 1] - start);
  const int q0 = (n_tiles - 1 - static_cast<int>(blockIdx.y)) * BM;
  if (q0 >= len) return;
  float* wscratch = scratch + w * scratch_floats<T, NT>();
  const int r0 = w * 16;  // the warp's first row in the tile
  const T* gQ = static_cast<const T*>(X.q.ptr) + start * X.q.st + h * X.q.hs;
  const T* gK = static_cast<const T*>(X.k.ptr) + start * X.k.st + h * X.k.hs;
  const T* gV = static_cast<const T*>(X.v.ptr) + start * X.v.st + h * X.v.hs;
  const T* gO = static_cast<const T*>(X.dout.ptr) + start * X.dout.st + h * X.dout.hs;
  // Both ride in group 0 of the K / V ring.
  load_tile<T, D, BM, NTH>(sQ, gQ + q0 * X.q.st, X.q.st, len - q0, X.q.cols, X.q.ptr, tid);
  load_tile<T, D, BM, NTH>(sO, gO + q0 * X.dout.st, X.dout.st, len - q0, X.dout.cols, X.dout.ptr, tid);
  const int n_kt = (min(len, q0 + BM) - 1) / BN + 1;

  const float ha = silu_ha<T>(static_cast<float>(p.alpha));
  const float cd = ha / static_cast<float>(p.n);
  const int row_last = q0 + r0 + 15;  // the warp's last row
  int64_t mrow[2] = {0, 0};
  if constexpr (MASK) mask_rows(mrow, p, b, q0 + r0, lane);
  float dq[D / 8][4];
  zero(dq);
  walk_kv_tiles<T, D, BN, S, NTH>(sK, sV, X.k, gK, X.v, gV, len, n_kt, tid, [&](int it, const T* tK, const T* tV) {
    const int k0 = it * BN;
    if (k0 > row_last) return;  // every key of the tile is after the warp's rows
    // g = alpha silu'(alpha S) / n * mask first (S dies into it before dP is live), then
    // dS = dP g and dQ += dS K, dS taken from the accumulators as the A operand.
    float g[NT][4];
    zero(g);
    gemm_abt<T, D, NT>(g, sQ, r0, tK, 0, lane);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) g[j][e] = dsilu_w<T>(g[j][e], ha, cd);
    }
    if (MASK || k0 + BN - 1 > q0 + r0) causal_mask<MASK>(g, p, mrow, q0 + r0, k0, len, lane);
    float ds[NT][4];
    zero(ds);
    gemm_abt<T, D, NT>(ds, sO, r0, tV, 0, lane);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[j][e] *= g[j][e];
    }
    gemm_pb<T, D, NT>(dq, ds, tK, 0, wscratch, lane);
  });
  T* odq = static_cast<T*>(p.dq.ptr) + (start + q0) * p.dq.st + h * p.dim_qk * p.dq.sc;
  store_frag<T, D>(dq, odq, p.dq, r0, len - q0, static_cast<int>(p.dim_qk), 1.f, lane);
}

template <typename T, int D, bool MASK>
void launch_dq(const HstuParams& p, const BwdOperands& X, unsigned bh, cudaStream_t stream) {
  constexpr size_t smem = dq_smem<T, D>();
  set_smem(dense_dq_kernel<T, D, MASK>, smem);
  const int n_qt = static_cast<int>((p.max_len + kQRows<T> - 1) / kQRows<T>);
  dense_dq_kernel<T, D, MASK><<<dim3(bh, n_qt), kQThreads<T>, smem, stream>>>(p, X, n_qt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& x_offsets,
                                                             int64_t n, int64_t num_heads, double alpha,
                                                             const c10::optional<at::Tensor>& attn_mask,
                                                             const at::Tensor& dout) {
  AttnBwdArgs r = prepare_attn_bwd(q, k, v, x_offsets, n, num_heads, alpha, attn_mask, dout);
  HstuParams& p = r.p;
  check_cuda_dims(p);
  const c10::cuda::CUDAGuard guard(q.device());
  if (p.total == 0 || p.batch == 0) return {r.dq, r.dk, r.dv};
  if (p.dim_qk == 0 || p.dim_v == 0) {  // every score is 0 (so w = 0), or every dout . v is
    return {r.dq.zero_(), r.dk.zero_(), r.dv.zero_()};
  }
  at::Tensor k1, k2, k3, k4;
  BwdOperands X;
  X.q = make_operand(q, p.heads, p.dim_qk, k1);
  X.k = make_operand(k, p.heads, p.dim_qk, k2);
  X.v = make_operand(v, p.heads, p.dim_v, k3);
  X.dout = make_operand(dout, p.heads, p.dim_v, k4);
  const int D = padded_dim(std::max(p.dim_qk, p.dim_v));
  const int n_tiles = static_cast<int>((p.max_len + kRows - 1) / kRows);
  TORCH_CHECK(n_tiles <= 65535, msg("sequences up to ", 65535 * kRows, " rows on CUDA, got ", p.max_len));
  if (n_tiles == 0) return {r.dq.zero_(), r.dk.zero_(), r.dv.zero_()};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(p.batch * p.heads), n_tiles);
  dispatch_hstu(q.scalar_type(), D, [&](auto tv, auto dv) {
    using T = decltype(tv);
    constexpr int kD = decltype(dv)::value;
    constexpr size_t s1 = dkdv_smem<T, kD>();
    set_smem(dense_dkdv_kernel<T, kD>, s1);
    dense_dkdv_kernel<T, kD><<<grid, kThreads, s1, stream>>>(p, X, n_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (p.mask.ptr) launch_dq<T, kD, true>(p, X, grid.x, stream);
    else launch_dq<T, kD, false>(p, X, grid.x, stream);
  });
  return {r.dq, r.dk, r.dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("hstu_attn_bwd", &attn_bwd_cuda); }

}  // namespace hstu_bsa
}  // namespace ssm_ext
