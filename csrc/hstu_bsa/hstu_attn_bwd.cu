// Dense causal HSTU attention, backward (CUDA), deterministic: two passes, no atomics.
//   s = alpha q_t.k_j, w = silu(s) / n * mask(t, j), dP(t, j) = dout_t . v_j,
//   dS = alpha dP mask / n silu'(s):  dv_j = sum_t w dout_t, dk_j = sum_t dS q_t, dq_t = sum_j dS k_j.
// dk/dv pass: a CTA owns 128 keys (fp32: 64; K, V resident in shared memory) and walks the
// 32-query tiles from its diagonal to the end of the sequence through a Q / dO cp.async ring
// (walk_kv_tiles with KEEP = 1), computing S^T = K Q^T and dP^T = V dO^T, so w^T and dS^T are
// already the A operands of dV += w^T dO and dK += dS^T Q. Warps come in pairs sharing 32 keys:
// one accumulates dV, the other dK (g^T = the silu' factor handed over in shared memory).
// dq pass: the forward's shape (hstu_tile.cuh: a CTA owns 128 queries, 8 warps x 16 rows, at
// most 128 registers so 2 CTAs = 16 warps per SM; fp32: 64 queries, 4 warps), Q and dO resident,
// walking the key tiles (32 keys at d 128 on the tensor cores, else 64) up to its diagonal
// through the forward's K / V ring (walk_kv_tiles): S = Q K^T, dP = dO V^T, dQ += dS K.
// attn_mask is a template parameter of both passes. Each output element is summed by one thread
// in a fixed order, so results are bitwise reproducible.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "hstu_bsa/hstu_tile.cuh"

namespace ssm_ext {
namespace hstu_bsa {
namespace {

// dk/dv pass shape: a CTA owns kKvPairs x 32 keys (K, V resident); a warp pair shares 32 keys
// (two 16-row tiles, MT = 2): the "dV warp" w < kKvPairs and the "dK warp" w + kKvPairs. Each
// owns one 32 x D accumulator, so at d 128 a warp holds 128 accumulator registers, not 256.
template <typename T>
constexpr int kKvPairs = kTensorCores<T> ? 4 : 2;
template <typename T>
constexpr int kKvThreads = 2 * kKvPairs<T> * 32;
constexpr int kPairKeys = 32;
template <typename T>
constexpr int kKvKeys = kKvPairs<T> * kPairKeys;  // keys per CTA: 128 (fp32: 64)
constexpr int kQCols = 32;                         // queries per tile
// Q / dO ring: the dK warps use tile it - 1 during iteration it (KEEP = 1), so 4 stages keep
// 2 tiles in flight (fp32: 3 stages, 1 in flight; its tiles are twice the bytes).
template <typename T>
constexpr int kQStages = kTensorCores<T> ? 4 : 3;

// K, V resident + the Q / dO ring + g double-buffered per pair (32 x 32 fp32) + fp32 scratch:
// bf16 d 128 64 + 64 + 32 = 160 KB (1 CTA per SM: the registers allow no more), d 64 96 KB;
// fp32 d 128 64 + 96 + 16 + 9 = 185 KB.
template <typename T, int D>
constexpr size_t dkdv_smem() {
  return size_t(2 * kKvKeys<T> + 2 * kQStages<T> * kQCols) * D * sizeof(T) +
         size_t(2 * kKvPairs<T> * kPairKeys * kQCols) * 4 +
         size_t(2 * kKvPairs<T>) * scratch_floats<T, kQCols / 8>() * 4;
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

// Per tile (32 queries) and pair (keys r0 .. r0 + 31 of the CTA): the dV warp computes
// S^T = K Q^T, w^T = silu(alpha S^T) / n * mask and g^T = silu'-factor * mask (one tanh for both),
// publishes g^T in shared memory and adds dV += w^T dO; the dK warp computes dP^T = V dO^T and
// adds dK += (dP^T * g^T) Q for the previous tile, whose g^T the barrier at the top of this
// iteration has published (so it never waits on its partner within an iteration, and the dV
// warp's element-wise work overlaps the dK warp's products). Each warp reads 48 ldmatrix.x4 per
// 128 MMAs per tile (the former 16-key warps: 80 per 128).
template <typename T, int D, bool MASK>
__global__ void __launch_bounds__(kKvThreads<T>, 1) dense_dkdv_kernel(const HstuParams p, const BwdOperands X) {
  constexpr int NP = kKvPairs<T>, NTH = kKvThreads<T>, KB = kKvKeys<T>, QC = kQCols, NT = QC / 8, MT = kPairKeys / 16,
                S = kQStages<T>;
  constexpr int GF = MT * NT * 4 * 32;  // floats of one pair's g^T tile
  extern __shared__ __align__(1024) unsigned char smem_raw[];  // 1024: see Tile::addr
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + KB * D;
  T* sQ = sV + KB * D;      // S stages
  T* sO = sQ + S * QC * D;  // dout, S stages
  float* gbuf = reinterpret_cast<float*>(sO + S * QC * D);  // [2][NP][GF]
  float* scratch = gbuf + 2 * NP * GF;
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const int64_t start = p.offsets[b];
  const int len = static_cast<int>(p.offsets[b + 1] - start);
  const int k0 = static_cast<int>(blockIdx.y) * KB;  // the first tiles have the most queries
  if (k0 >= len) return;
  const bool dv_warp = w < NP;
  const int pair = dv_warp ? w : w - NP, r0 = pair * kPairKeys;  // the pair's first key row in the CTA
  float* wscratch = scratch + w * scratch_floats<T, NT>();
  const T* gQ = static_cast<const T*>(X.q.ptr) + start * X.q.st + h * X.q.hs;
  const T* gK = static_cast<const T*>(X.k.ptr) + start * X.k.st + h * X.k.hs;
  const T* gV = static_cast<const T*>(X.v.ptr) + start * X.v.st + h * X.v.hs;
  const T* gO = static_cast<const T*>(X.dout.ptr) + start * X.dout.st + h * X.dout.hs;
  // Both ride in group 0 of the Q / dO ring, which starts at the diagonal tile (query k0).
  load_tile<T, D, KB, NTH>(sK, gK + k0 * X.k.st, X.k.st, len - k0, X.k.cols, X.k.ptr, tid);
  load_tile<T, D, KB, NTH>(sV, gV + k0 * X.v.st, X.v.st, len - k0, X.v.cols, X.v.ptr, tid);
  const int n_qt = (len - k0 + QC - 1) / QC;

  const float ha = silu_ha<T>(static_cast<float>(p.alpha)), c = 1.f / static_cast<float>(p.n);
  int64_t mrow[MT][2] = {};
  if constexpr (MASK) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) mask_rows<true>(mrow[mt], p, b, k0 + r0 + 16 * mt, lane);
  }
  // Tile it holds queries k0 + it QC ..; the pair's keys see it once its last query reaches them.
  auto live = [&](int it) { return it * QC + QC - 1 >= r0; };
  // g^T tile of (it, pair) in fragment order: float4 i = (mt, j) of lane at [i][lane], so each
  // dK-warp thread reads back exactly what its dV-warp twin wrote (16-byte, conflict-free).
  auto gtile = [&](int it) { return reinterpret_cast<float4*>(gbuf + ((it & 1) * NP + pair) * GF) + lane; };
  float acc[MT][D / 8][4];  // dV (dV warps) or dK / (ha / n) (dK warps)
  zero(acc);
  // The dK warps carry dP^T of tile it to iteration it + 1; the dV warps keep their g^T in the
  // same registers, so the two roles' live sets do not add up.
  float dp[MT][NT][4];
  // dK += (dP^T * g^T) Q of tile j (Q still resident: KEEP = 1).
  auto dk_step = [&](int j) {
    const float4* gt = gtile(j);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const float4 g = gt[(mt * NT + n) * 32];
        dp[mt][n][0] *= g.x;
        dp[mt][n][1] *= g.y;
        dp[mt][n][2] *= g.z;
        dp[mt][n][3] *= g.w;
      }
    }
    gemm_pb_mt<T, D, NT, MT>(acc, dp, sQ + (j % S) * QC * D, 0, wscratch, lane);
  };
  walk_kv_tiles<T, D, QC, S, NTH, 1>(sQ, sO, X.q, gQ + k0 * X.q.st, X.dout, gO + k0 * X.dout.st, len - k0, n_qt, tid,
                                     [&](int it, const T* tQ, const T* tO) {
    if (dv_warp) {
      if (!live(it)) return;
      float s[MT][NT][4];
      zero(s);
      gemm_abt_mt<T, D, NT, MT>(s, sK, r0, tQ, 0, lane);
      // g^T without ha / n (applied to dK at the store, which also keeps fp16 dS clear of subnormals).
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            dp[mt][n][e] = dsilu_w<T>(s[mt][n][e], ha, 1.f);
            s[mt][n][e] = silu_w<T>(s[mt][n][e], ha, c);
          }
        }
      }
      // A mask, or some key of the pair after some query of the tile.
      if (MASK || it * QC < r0 + kPairKeys - 1) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          causal_mask<MASK, true>(s[mt], p, mrow[mt], k0 + r0 + 16 * mt, k0 + it * QC, len, lane);
          causal_mask<MASK, true>(dp[mt], p, mrow[mt], k0 + r0 + 16 * mt, k0 + it * QC, len, lane);
        }
      }
      float4* gt = gtile(it);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          gt[(mt * NT + n) * 32] = make_float4(dp[mt][n][0], dp[mt][n][1], dp[mt][n][2], dp[mt][n][3]);
        }
      }
      gemm_pb_mt<T, D, NT, MT>(acc, s, tO, 0, wscratch, lane);
    } else {
      if (it > 0 && live(it - 1)) dk_step(it - 1);
      if (!live(it)) return;
      zero(dp);
      gemm_abt_mt<T, D, NT, MT>(dp, sV, r0, tO, 0, lane);
    }
  });
  __syncthreads();  // publishes the last tile's g^T
  if (!dv_warp && live(n_qt - 1)) dk_step(n_qt - 1);
  const int nrows = len - k0, dv_cols = static_cast<int>(p.dim_v), dk_cols = static_cast<int>(p.dim_qk);
  if (dv_warp) {
    T* odv = static_cast<T*>(p.dv.ptr) + (start + k0) * p.dv.st + h * p.dim_v * p.dv.sc;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) store_frag<T, D>(acc[mt], odv, p.dv, r0 + 16 * mt, nrows, dv_cols, 1.f, lane);
  } else {
    T* odk = static_cast<T*>(p.dk.ptr) + (start + k0) * p.dk.st + h * p.dim_qk * p.dk.sc;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) store_frag<T, D>(acc[mt], odk, p.dk, r0 + 16 * mt, nrows, dk_cols, ha * c, lane);
  }
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
void launch_dkdv(const HstuParams& p, const BwdOperands& X, unsigned bh, cudaStream_t stream) {
  constexpr size_t smem = dkdv_smem<T, D>();
  set_smem(dense_dkdv_kernel<T, D, MASK>, smem);
  const int n_kt = static_cast<int>((p.max_len + kKvKeys<T> - 1) / kKvKeys<T>);
  dense_dkdv_kernel<T, D, MASK><<<dim3(bh, n_kt), kKvThreads<T>, smem, stream>>>(p, X);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  // Both passes tile a sequence by at least kRows = 64 rows (the grid's y limit).
  const int n_tiles = static_cast<int>((p.max_len + kRows - 1) / kRows);
  TORCH_CHECK(n_tiles <= 65535, msg("sequences up to ", 65535 * kRows, " rows on CUDA, got ", p.max_len));
  if (n_tiles == 0) return {r.dq.zero_(), r.dk.zero_(), r.dv.zero_()};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned bh = static_cast<unsigned>(p.batch * p.heads);
  dispatch_hstu(q.scalar_type(), D, [&](auto tv, auto dv) {
    using T = decltype(tv);
    constexpr int kD = decltype(dv)::value;
    if (p.mask.ptr) {
      launch_dkdv<T, kD, true>(p, X, bh, stream);
      launch_dq<T, kD, true>(p, X, bh, stream);
    } else {
      launch_dkdv<T, kD, false>(p, X, bh, stream);
      launch_dq<T, kD, false>(p, X, bh, stream);
    }
  });
  return {r.dq, r.dk, r.dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("hstu_attn_bwd", &attn_bwd_cuda); }

}  // namespace hstu_bsa
}  // namespace ssm_ext
