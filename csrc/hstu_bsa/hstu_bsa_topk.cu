// Top-k block selection of HSTU block-sparse attention (CUDA), the CPU op's semantics exactly:
// for query t (head h) the candidates are the complete blocks c < t / BS, scored
// silu(alpha q_t . kbar_c), and the block holding t with +inf; the best block_counts in
// descending score, ties to the lower index, NaN scored -inf, then -1 padding.
//
// 1. block_means_kernel: kbar per (block, head), fp32 sums; for fp16 / bf16 stored as hi + lo
//    in the input dtype (the pair carries the fp32 mean).
// 2. topk_kernel: a CTA owns 64 queries of one (sequence, head) and walks tiles of 64 block
//    means: scores = Q kbar_hi^T + Q kbar_lo^T on the tensor cores (q is exact in its dtype, so
//    this is the fp32 score to ~2^-16), FFMA for fp32. The scores go through shared memory;
//    one thread per query keeps its running best list (score, index) sorted in a global scratch
//    row, inserting only what beats the current last entry. Blocks arrive in increasing index
//    and an insertion goes after equal scores, which gives the lower-index tie rule for free.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "hstu_bsa/hstu_tile.cuh"

namespace ssm_ext {
namespace hstu_bsa {
namespace {

constexpr int kBC = 64;           // block means per tile
constexpr int kScoreW = kBC + 1;  // padded score row

template <typename T, int D>
constexpr size_t topk_smem() {
  return size_t(kRows + 4 * kBC) * D * sizeof(T) + size_t(kRows) * kScoreW * 4;
}

struct TopkBufs {
  const void* kb_hi;
  const void* kb_lo;        // null for fp32
  const int64_t* cblk;      // complete blocks before each sequence
  float* scores;            // (T, H, s_eff) scratch: the running best scores
  int s_eff;                // min(block_counts, max_len / BS + 1): no query keeps more
};

// Inserts (score, c) into a row's list kept sorted by descending score, equal scores in the
// order they came (increasing c). Returns the new count.
__device__ __forceinline__ int insert(float* sc, int32_t* id, int64_t ids, int count, int cap, float score, int c) {
  int pos;
  if (count < cap) pos = count++;
  else if (score > sc[cap - 1]) pos = cap - 1;
  else return count;
  while (pos > 0 && sc[pos - 1] < score) {
    sc[pos] = sc[pos - 1];
    id[pos * ids] = id[(pos - 1) * ids];
    --pos;
  }
  sc[pos] = score;
  id[pos * ids] = c;
  return count;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) topk_kernel(const HstuParams p, const Operand Q, const TopkBufs B,
                                                        int n_tiles) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];  // 1024: see Tile::addr
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sH = sQ + kRows * D;     // kbar hi, 2 stages
  T* sL = sH + 2 * kBC * D;   // kbar lo, 2 stages
  float* sS = reinterpret_cast<float*>(sL + 2 * kBC * D);
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const int64_t start = p.offsets[b];
  const int len = static_cast<int>(p.offsets[b + 1] - start);
  const int q0 = (n_tiles - 1 - static_cast<int>(blockIdx.y)) * kRows;
  if (q0 >= len) return;
  const int bs = static_cast<int>(p.block_size);
  const int last = min(len, q0 + kRows) - 1;
  const int n_cand = last / bs;  // blocks 0 .. n_cand - 1 can be candidates of some row
  const int n_bt = (n_cand + kBC - 1) / kBC;

  const T* gQ = static_cast<const T*>(Q.ptr) + start * Q.st + h * Q.hs;
  load_tile<T, D, kRows>(sQ, gQ + q0 * Q.st, Q.st, len - q0, Q.cols, Q.ptr, tid);
  const int64_t kst = p.heads * D;
  const T* gH = static_cast<const T*>(B.kb_hi) + B.cblk[b] * kst + h * D;
  const T* gL = B.kb_lo ? static_cast<const T*>(B.kb_lo) + B.cblk[b] * kst + h * D : nullptr;
  auto load_kb = [&](int bt) {
    const int c0 = bt * kBC, st = bt & 1;
    load_tile<T, D, kBC>(sH + st * kBC * D, gH + c0 * kst, kst, n_cand - c0, D, B.kb_hi, tid);
    if (gL) load_tile<T, D, kBC>(sL + st * kBC * D, gL + c0 * kst, kst, n_cand - c0, D, B.kb_lo, tid);
  };
  if (n_bt > 0) load_kb(0);
  mma::cp_async_commit();

  // The row this thread keeps (threads 0 .. 63).
  const int t = q0 + tid;
  const bool keeper = tid < kRows && t < len;
  const int own = keeper ? t / bs : 0;
  const int64_t row = (start + t) * p.heads + h;
  float* sc = B.scores + row * B.s_eff;
  int32_t* id = static_cast<int32_t*>(p.block_idx.ptr) + (start + t) * p.block_idx.s0 + h * p.block_idx.s1;
  const int64_t ids = p.block_idx.s2;
  int count = 0;
  float thr = 0.f;  // the list's last score once it is full

  const float alpha = static_cast<float>(p.alpha);
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int bt = 0; bt < n_bt; ++bt) {
    if (bt + 1 < n_bt) {
      load_kb(bt + 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    const int st = bt & 1, c0 = bt * kBC;
    float s[kBC / 8][4];
    zero(s);
    gemm_abt<T, D, kBC / 8>(s, sQ, w * 16, sH + st * kBC * D, 0, lane);
    if (gL) gemm_abt<T, D, kBC / 8>(s, sQ, w * 16, sL + st * kBC * D, 0, lane);
#pragma unroll
    for (int j = 0; j < kBC / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float x = alpha * s[j][e];
        const float v = silu_f(x);
        sS[(w * 16 + frag_row(lane, e)) * kScoreW + frag_col(lane, j, e)] = v != v ? ninf : v;
      }
    }
    __syncthreads();
    if (keeper) {
      const int end = min(c0 + kBC, own);
      for (int c = c0; c < end; ++c) {
        const float v = sS[tid * kScoreW + (c - c0)];
        if (count < B.s_eff || v > thr) {
          count = insert(sc, id, ids, count, B.s_eff, v, c);
          if (count == B.s_eff) thr = sc[B.s_eff - 1];
        }
      }
    }
    __syncthreads();  // sS and the stage are rewritten next iteration
  }
  mma::cp_async_wait<0>();
  if (keeper) {
    count = insert(sc, id, ids, count, B.s_eff, std::numeric_limits<float>::infinity(), own);
    for (int64_t s = count; s < p.block_counts; ++s) id[s * ids] = -1;
  }
}

at::Tensor topk_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& x_offsets, int64_t n,
                     int64_t num_heads, double alpha, int64_t block_size, int64_t block_counts) {
  TopkArgs r = prepare_topk(q, k, x_offsets, n, num_heads, alpha, block_size, block_counts);
  HstuParams& p = r.p;
  TORCH_CHECK(p.dim_qk <= kMaxDim, msg("hstu_bsa_topk on CUDA supports attention_dim up to ", kMaxDim, ", got ",
                                      p.dim_qk, "; use the CPU for wider heads"));
  // Blocks longer than every sequence all select block 0 alone: 32-bit block arithmetic below.
  p.block_size = std::min<int64_t>(p.block_size, p.max_len + 1);
  const c10::cuda::CUDAGuard guard(q.device());
  if (p.total == 0 || p.batch == 0) return r.block_idx;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int D = padded_dim(p.dim_qk);
  const at::Tensor cblk = block_offsets(r.offsets, p.block_size);
  at::Tensor kb_hi, kb_lo, keep;
  block_means(p, k, p.dim_qk, cblk, D, /*want_lo=*/true, kb_hi, kb_lo, stream);
  const Operand Q = make_operand(q, p.heads, p.dim_qk, keep);
  TopkBufs B;
  B.kb_hi = kb_hi.data_ptr();
  B.kb_lo = kb_lo.defined() ? kb_lo.data_ptr() : nullptr;
  B.cblk = cblk.data_ptr<int64_t>();
  B.s_eff = static_cast<int>(std::min<int64_t>(block_counts, p.max_len / block_size + 1));
  at::Tensor scores = at::empty({p.total * p.heads * B.s_eff}, q.options().dtype(at::kFloat));
  B.scores = scores.data_ptr<float>();
  const int n_tiles = static_cast<int>((p.max_len + kRows - 1) / kRows);
  TORCH_CHECK(n_tiles <= 65535, msg("sequences up to ", 65535 * kRows, " rows on CUDA, got ", p.max_len));
  dispatch_hstu(q.scalar_type(), D, [&](auto tv, auto dv) {
    using T = decltype(tv);
    constexpr int kD = decltype(dv)::value;
    constexpr size_t smem = topk_smem<T, kD>();
    set_smem(topk_kernel<T, kD>, smem);
    topk_kernel<T, kD><<<dim3(static_cast<unsigned>(p.batch * p.heads), n_tiles), kThreads, smem, stream>>>(p, Q, B,
                                                                                                        n_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return r.block_idx;
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("hstu_bsa_topk", &topk_cuda); }

}  // namespace hstu_bsa
}  // namespace ssm_ext
