// Dense causal HSTU attention, forward (CUDA): out(t) = sum_{j <= t} silu(alpha q_t.k_j) / n
// * mask(t, j) v_j per (sequence, head). No softmax, so no running max: a CTA owns 128 queries
// (8 warps x 16 rows; 64 = 4 x 16 on the fp32 FFMA path), keeps O in registers (at most 128
// registers on the tensor cores: 2 CTAs = 16 warps per SM) and walks the key tiles (kBN) 0 .. its
// diagonal through a cp.async pipeline (kStages) with one barrier per tile:
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

// One 16-row tile per warp. 8 warps on the tensor cores (128 queries: each K / V tile staged
// once per 128 queries), 4 on the fp32 FFMA path (its tiles are twice the bytes).
template <typename T>
constexpr int kFwdWarps = kTensorCores<T> ? 8 : 4;
template <typename T>
constexpr int kFwdThreads = kFwdWarps<T> * 32;
template <typename T>
constexpr int kBM = kFwdWarps<T> * 16;
// Keys per tile: 32 at d 128 on the tensor cores (S is 16 registers: the kernel fits 128
// registers with no spills), else 64.
template <typename T, int D>
constexpr int kBN = kTensorCores<T> && D >= 128 ? 32 : 64;
// K / V pipeline depth: 3 stages on the tensor cores (d 128: Q 32 KB + 3 x 16 KB = 80 KB, two
// CTAs per SM), 2 on the fp32 path (its tiles are twice the bytes).
template <typename T>
constexpr int kStages = kTensorCores<T> ? 3 : 2;
// CTAs per SM the register budget is set for (tensor cores: 2 x 256 threads -> <= 128 registers).
template <typename T>
constexpr int kMinCtas = kTensorCores<T> ? 2 : 1;

template <typename T, int D>
constexpr size_t fwd_smem() {
  return size_t(kBM<T> + 2 * kStages<T> * kBN<T, D>) * D * sizeof(T) +
         size_t(kFwdWarps<T>) * scratch_floats<T, kBN<T, D> / 8>() * 4;
}

// w = silu(alpha s) / n without the mask; c = 1 / n. fp16 / bf16: with y = alpha s and x = y / 2
// (ha = alpha / 2), silu(y) = y (1 + tanh(y / 2)) / 2 = x (1 + tanh x): one MUFU op and 3 FP ops.
// fp32: ha = alpha, x = y, silu(y) = x sigmoid(x) as before.
template <typename T>
__device__ __forceinline__ float silu_w(float s, float ha, float c) {
  const float x = s * ha;
  if constexpr (kTensorCores<T>) return fmaf(x, mma::tanh_approx(x), x) * c;
  else return x * mma::sigmoid_io<T>(x) * c;
}

template <typename T, int D, bool MASK>
__global__ void __launch_bounds__(kFwdThreads<T>, kMinCtas<T>) dense_fwd_kernel(const HstuParams p, const Operand Q,
                                                                               const Operand K, const Operand V,
                                                                               int n_tiles) {
  constexpr int NTH = kFwdThreads<T>, BM = kBM<T>, S = kStages<T>, BN = kBN<T, D>, NT = BN / 8;
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
  load_tile<T, D, BM, NTH>(sQ, gQ + q0 * Q.st, Q.st, len - q0, Q.cols, Q.ptr, tid);
  const int last = min(len, q0 + BM) - 1;  // the last query of the tile
  const int n_kt = last / BN + 1;
  // Key tile `it` into stage `st`, as one commit group (empty past the last tile, so that
  // group i is always tile i and the wait count below is a constant).
  auto load_kv = [&](int it, int st) {
    if (it < n_kt) {
      const int k0 = it * BN;
      load_tile<T, D, BN, NTH>(sK + st * BN * D, gK + k0 * K.st, K.st, len - k0, K.cols, K.ptr, tid);
      load_tile<T, D, BN, NTH>(sV + st * BN * D, gV + k0 * V.st, V.st, len - k0, V.cols, V.ptr, tid);
    }
    mma::cp_async_commit();
  };
#pragma unroll
  for (int i = 0; i < S - 1; ++i) load_kv(i, i);  // Q rides in group 0

  const float ha = kTensorCores<T> ? 0.5f * static_cast<float>(p.alpha) : static_cast<float>(p.alpha);
  const float c = 1.f / static_cast<float>(p.n);
  const int row_last = q0 + r0 + 15;  // the warp's last row
  // attn_mask offsets of this thread's two rows (frag_row 0 and 8), columns added per element.
  int64_t mrow[2] = {0, 0};
  if constexpr (MASK) {
    const int64_t mb = p.mask_batch == 1 ? 0 : b;
    mrow[0] = mb * p.mask.s0 + int64_t(q0 + r0 + frag_row(lane, 0)) * p.mask.s1;
    mrow[1] = mrow[0] + 8 * p.mask.s1;
  }
  float o[D / 8][4];
  zero(o);
  int st = 0;  // stage of tile it: it % S
#pragma unroll 1
  for (int it = 0; it < n_kt; ++it) {
    mma::cp_async_wait<S - 2>();  // this thread's copies of tile it (and Q) have landed
    __syncthreads();              // everyone's have, and everyone is done with tile it - 1,
    load_kv(it + S - 1, st == 0 ? S - 1 : st - 1);  // so its stage takes tile it + S - 1
    const int k0 = it * BN;
    // Warps whose rows all precede the tile skip it (their P would be 0); the others still
    // take part in the barriers.
    if (k0 <= row_last) {
      float s[NT][4];
      zero(s);
      gemm_abt<T, D, NT>(s, sQ, r0, sK + st * BN * D, 0, lane);
      if (MASK || k0 + BN - 1 > q0 + r0) {  // a mask, or some key of the tile after some row
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int t = q0 + r0 + frag_row(lane, e), kj = k0 + frag_col(lane, j, e);
            float w_ = silu_w<T>(s[j][e], ha, c);
            if (kj > t || t >= len) w_ = 0.f;
            else if constexpr (MASK) w_ *= load_as<float>(p.mask.ptr, p.mask_dtype, mrow[e >> 1] + kj * p.mask.s2);
            s[j][e] = w_;
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[j][e] = silu_w<T>(s[j][e], ha, c);
        }
      }
      gemm_pb<T, D, NT>(o, s, sV + st * BN * D, 0, wscratch, lane);
    }
    st = st + 1 == S ? 0 : st + 1;
  }
  T* out = static_cast<T*>(p.out.ptr) + (start + q0) * p.out.st + h * p.dim_v * p.out.sc;
  store_frag<T, D>(o, out, p.out, r0, len - q0, static_cast<int>(p.dim_v), 1.f, lane);
}

template <typename T, int D, bool MASK>
void launch_fwd(const HstuParams& p, const Operand& Q, const Operand& K, const Operand& V, int n_tiles,
                cudaStream_t stream) {
  constexpr size_t smem = fwd_smem<T, D>();
  set_smem(dense_fwd_kernel<T, D, MASK>, smem);
  dense_fwd_kernel<T, D, MASK><<<dim3(static_cast<unsigned>(p.batch * p.heads), n_tiles), kFwdThreads<T>, smem,
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
    const int n_tiles = static_cast<int>((p.max_len + kBM<T> - 1) / kBM<T>);
    TORCH_CHECK(n_tiles <= 65535, msg("sequences up to ", 65535 * kBM<T>, " rows on CUDA, got ", p.max_len));
    if (p.mask.ptr) launch_fwd<T, kD, true>(p, Q, K, V, n_tiles, stream);
    else launch_fwd<T, kD, false>(p, Q, K, V, n_tiles, stream);
  });
  return r.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("hstu_attn_fwd", &attn_fwd_cuda); }

}  // namespace hstu_bsa
}  // namespace ssm_ext
