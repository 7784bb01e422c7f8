// Dense causal HSTU attention, forward (CUDA): out(t) = sum_{j <= t} silu(alpha q_t.k_j) / n
// * mask(t, j) v_j per (sequence, head). No softmax, so no running max: a CTA owns 128 queries
// (8 warps x 16 rows; 64 = 4 x 16 on the fp32 FFMA path), keeps O in registers (at most 128
// registers on the tensor cores: 2 CTAs = 16 warps per SM) and walks the key tiles (32 keys at
// d 128 on the tensor cores, else 64) 0 .. its diagonal through a cp.async ring (3 stages; 2 on
// fp32) with one barrier per tile (walk_kv_tiles in hstu_tile.cuh, shared with the dq pass):
// S = Q K^T, P = silu(alpha S) / n (masked on the diagonal tile and where attn_mask is given),
// O += P V with P reused from the accumulators. attn_mask is a template parameter, so the
// unmasked kernel carries no per-element mask loads.
// Grid (B*H, query tiles), the heaviest (last) tiles first; tiles past a sequence exit.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "hstu_bsa/hstu_tile.cuh"

namespace ssm_ext {
namespace hstu_bsa {
namespace {

// The CTA shape (kQWarps x 16 rows, kKeyTile-key tiles, kKvStages-deep K / V ring) is shared
// with the dq pass: hstu_tile.cuh.
template <typename T, int D>
constexpr size_t fwd_smem() {
  return size_t(kQRows<T> + 2 * kKvStages<T> * kKeyTile<T, D>) * D * sizeof(T) +
         size_t(kQWarps<T>) * scratch_floats<T, kKeyTile<T, D> / 8>() * 4;
}

template <typename T, int D, bool MASK>
__global__ void __launch_bounds__(kQThreads<T>, kQMinCtas<T>) dense_fwd_kernel(const HstuParams p, const Operand Q,
                                                                              const Operand K, const Operand V,
                                                                              int n_tiles) {
  constexpr int NTH = kQThreads<T>, BM = kQRows<T>, S = kKvStages<T>, BN = kKeyTile<T, D>, NT = BN / 8;
  extern __shared__ __align__(1024) unsigned char smem_raw[];  // 1024: see Tile::addr
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;       // S stages
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

  const T* gQ = static_cast<const T*>(Q.ptr) + start * Q.st + h * Q.hs;
  const T* gK = static_cast<const T*>(K.ptr) + start * K.st + h * K.hs;
  const T* gV = static_cast<const T*>(V.ptr) + start * V.st + h * V.hs;
  load_tile<T, D, BM, NTH>(sQ, gQ + q0 * Q.st, Q.st, len - q0, Q.cols, Q.ptr, tid);  // rides in group 0
  const int last = min(len, q0 + BM) - 1;  // the last query of the tile
  const int n_kt = last / BN + 1;

  const float ha = silu_ha<T>(static_cast<float>(p.alpha));
  const float c = 1.f / static_cast<float>(p.n);
  const int row_last = q0 + r0 + 15;  // the warp's last row
  int64_t mrow[2] = {0, 0};
  if constexpr (MASK) mask_rows(mrow, p, b, q0 + r0, lane);
  float o[D / 8][4];
  zero(o);
  walk_kv_tiles<T, D, BN, S, NTH>(sK, sV, K, gK, V, gV, len, n_kt, tid, [&](int it, const T* tK, const T* tV) {
    const int k0 = it * BN;
    // Warps whose rows all precede the tile skip it (their P would be 0); the others still
    // take part in the barriers.
    if (k0 > row_last) return;
    float s[NT][4];
    zero(s);
    gemm_abt<T, D, NT>(s, sQ, r0, tK, 0, lane);
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = silu_w<T>(s[j][e], ha, c);
    }
    // A mask, or some key of the tile after some row.
    if (MASK || k0 + BN - 1 > q0 + r0) causal_mask<MASK>(s, p, mrow, q0 + r0, k0, len, lane);
    gemm_pb<T, D, NT>(o, s, tV, 0, wscratch, lane);
  });
  T* out = static_cast<T*>(p.out.ptr) + (start + q0) * p.out.st + h * p.dim_v * p.out.sc;
  store_frag<T, D>(o, out, p.out, r0, len - q0, static_cast<int>(p.dim_v), 1.f, lane);
}

template <typename T, int D, bool MASK>
void launch_fwd(const HstuParams& p, const Operand& Q, const Operand& K, const Operand& V, int n_tiles,
                cudaStream_t stream) {
  constexpr size_t smem = fwd_smem<T, D>();
  set_smem(dense_fwd_kernel<T, D, MASK>, smem);
  dense_fwd_kernel<T, D, MASK><<<dim3(static_cast<unsigned>(p.batch * p.heads), n_tiles), kQThreads<T>, smem,
                                 stream>>>(p, Q, K, V, n_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    const int n_tiles = static_cast<int>((p.max_len + kQRows<T> - 1) / kQRows<T>);
    TORCH_CHECK(n_tiles <= 65535, msg("sequences up to ", 65535 * kQRows<T>, " rows on CUDA, got ", p.max_len));
    if (p.mask.ptr) launch_fwd<T, kD, true>(p, Q, K, V, n_tiles, stream);
    else launch_fwd<T, kD, false>(p, Q, K, V, n_tiles, stream);
  });
  return r.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("hstu_attn_fwd", &attn_fwd_cuda); }

}  // namespace hstu_bsa
}  // namespace ssm_ext
