// HSTU block-sparse attention, forward (CUDA): out(t) = u_t * (g_cmp o_cmp + g_slc o_slc + g_swa o_swa)
// (SPEC.md section 6; notes/hstu_bsa.md). Gates are per row, so each branch's weights are
// scaled by their gate and every branch adds into one O accumulator.
//
// A CTA owns 128 queries of one (sequence, head), 4 warps x 32 rows (64 = 4 x 16 on the fp32
// FFMA path):
//  1. compressed: tiles of 64 block means (kbar, vbar from block_means_kernel), weight
//     silu(alpha q.kbar_c) / n * g_cmp for complete blocks c with (c + 1) BS - 1 <= t;
//  2. selected + window in one pass over the union of the key tiles that any row selects or
//     that meet the window band (a bitmap over key tiles, build_key_tiles). Per key tile the
//     rows' selections become a multiplicity tile mult(t, j) (build_mult), and
//     w(t, j) = silu(alpha q.k_j) / n * mask(t, j) * (g_slc mult(t, j) + g_swa [t - W < j <= t]),
//     so silu is computed once where the branches overlap.
// Same 2-stage cp.async pipeline and warp products as the dense kernel (hstu_tile.cuh).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "hstu_bsa/hstu_bsa_cuda.cuh"

namespace ssm_ext {
namespace hstu_bsa {

// 16-row tiles per warp (as in the dense forward): 2 on the tensor cores, 1 on the fp32 path.
template <typename T>
constexpr int kMT = kTensorCores<T> ? 2 : 1;
template <typename T>
constexpr int kBM = kWarps * 16 * kMT<T>;

// The multiplicity tile takes 1 byte a count when block_counts <= 255 (wide = false), else 2:
// at bf16 D = 128 the 1-byte tile keeps two CTAs per SM.
template <typename T, int D>
constexpr size_t bsa_fwd_smem(int words, bool wide) {
  return size_t(kBM<T> + 4 * kRows) * D * sizeof(T) + size_t(kWarps) * scratch_floats<T, kRows / 8>() * 4 +
         size_t(kBM<T>) * 3 * 4 + size_t(kBM<T>) * kRows * (wide ? 2 : 1) + size_t(words) * 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) bsa_fwd_kernel(const HstuParams p, const BsaOperands X, int n_qt,
                                                              int words) {
  constexpr int MT = kMT<T>, BM = kBM<T>;
  static_assert(BM <= kThreads, "one thread per query row builds the tile sets");
  extern __shared__ __align__(1024) unsigned char smem_raw[];  // 1024: see Tile::addr
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;          // 2 stages of kRows keys
  T* sV = sK + 2 * kRows * D;   // 2 stages
  float* scratch = reinterpret_cast<float*>(sV + 2 * kRows * D);
  float* sgate = scratch + kWarps * scratch_floats<T, kRows / 8>();  // [BM][3]: g_cmp, g_slc, g_swa
  const bool wide = p.block_counts > 255;
  uint8_t* mult8 = reinterpret_cast<uint8_t*>(sgate + BM * 3);        // [BM][kRows], 1 or 2 bytes
  uint16_t* mult16 = reinterpret_cast<uint16_t*>(mult8);
  uint32_t* bits = reinterpret_cast<uint32_t*>(mult8 + BM * kRows * (wide ? 2 : 1));
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int64_t b = blockIdx.x / p.heads, h = blockIdx.x % p.heads;
  const int64_t start = p.offsets[b];
  const int len = static_cast<int>(p.offsets[b + 1] - start);
  const int q0 = (n_qt - 1 - static_cast<int>(blockIdx.y)) * BM;
  if (q0 >= len) return;
  float* wscratch = scratch + w * scratch_floats<T, kRows / 8>();
  const int r0 = w * 16 * MT;  // the warp's first row in the tile
  const int bs = static_cast<int>(p.block_size);
  const int last = min(len, q0 + BM) - 1;

  const T* gQ = static_cast<const T*>(X.q.ptr) + start * X.q.st + h * X.q.hs;
  const T* gK = static_cast<const T*>(X.k.ptr) + start * X.k.st + h * X.k.hs;
  const T* gV = static_cast<const T*>(X.v.ptr) + start * X.v.st + h * X.v.hs;
  const int64_t mst = p.heads * D;  // row stride of the means
  const T* gKb = static_cast<const T*>(X.kbar) + X.cblk[b] * mst + h * D;
  const T* gVb = static_cast<const T*>(X.vbar) + X.cblk[b] * mst + h * D;
  load_tile<T, D, BM>(sQ, gQ + q0 * X.q.st, X.q.st, len - q0, X.q.cols, X.q.ptr, tid);
  mma::cp_async_commit();
  const float alpha = static_cast<float>(p.alpha), inv_n = 1.f / static_cast<float>(p.n);
  const bool has_mask = p.mask.ptr != nullptr;
  const int wnd = static_cast<int>(min(p.window_size, int64_t(len)));
  if (tid < BM) {  // the rows' gates (0 past the sequence; g_swa 0 without a window)
    const bool ok = q0 + tid < len;
    sgate[tid * 3 + 0] = ok ? gate_at(p, p.gates, start + q0 + tid, h, 0) : 0.f;
    sgate[tid * 3 + 1] = ok ? gate_at(p, p.gates, start + q0 + tid, h, 1) : 0.f;
    sgate[tid * 3 + 2] = ok && wnd > 0 ? gate_at(p, p.gates, start + q0 + tid, h, 2) : 0.f;
  }
  build_key_tiles(p, start, h, len, q0, BM, bits, words, tid);  // its barriers publish sgate too

  float o[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) zero(o[mt]);

  // 1. compressed branch: blocks 0 .. n_cmp - 1.
  const int n_cmp = (last + 1) / bs;
  const int n_ct = (n_cmp + kRows - 1) / kRows;
  auto load_means = [&](int ct, int st) {
    const int c0 = ct * kRows;
    load_tile<T, D, kRows>(sK + st * kRows * D, gKb + c0 * mst, mst, n_cmp - c0, D, X.kbar, tid);
    load_tile<T, D, kRows>(sV + st * kRows * D, gVb + c0 * mst, mst, n_cmp - c0, D, X.vbar, tid);
  };
  if (n_ct > 0) load_means(0, 0);
  mma::cp_async_commit();
  for (int ct = 0; ct < n_ct; ++ct) {
    if (ct + 1 < n_ct) {
      load_means(ct + 1, (ct + 1) & 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    __syncthreads();
    const int st = ct & 1, c0 = ct * kRows;
    float s[MT][kRows / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) zero(s[mt]);
    gemm_abt_mt<T, D, kRows / 8, MT>(s, sQ, r0, sK + st * kRows * D, 0, lane);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int j = 0; j < kRows / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = r0 + 16 * mt + frag_row(lane, e), t = q0 + r, c = c0 + frag_col(lane, j, e);
          const float x = alpha * s[mt][j][e];
          s[mt][j][e] = (c + 1) * bs <= t + 1 ? x * mma::sigmoid_io<T>(x) * inv_n * sgate[r * 3] : 0.f;
        }
      }
    }
    gemm_pb_mt<T, D, kRows / 8, MT>(o, s, sV + st * kRows * D, 0, wscratch, lane);
    __syncthreads();
  }

  // 2. selected + window: the key tiles of the bitmap, in increasing order.
  auto load_kv = [&](int kt, int st) {
    const int k0 = kt * kRows;
    load_tile<T, D, kRows>(sK + st * kRows * D, gK + k0 * X.k.st, X.k.st, len - k0, X.k.cols, X.k.ptr, tid);
    load_tile<T, D, kRows>(sV + st * kRows * D, gV + k0 * X.v.st, X.v.st, len - k0, X.v.cols, X.v.ptr, tid);
  };
  int cur = next_bit(bits, words, 0);
  if (cur >= 0) load_kv(cur, 0);
  mma::cp_async_commit();
  for (int i = 0; cur >= 0; ++i) {
    const int nxt = next_bit(bits, words, cur + 1);
    if (nxt >= 0) {
      load_kv(nxt, (i + 1) & 1);
      mma::cp_async_commit();
      mma::cp_async_wait<1>();
    } else {
      mma::cp_async_wait<0>();
    }
    const int st = i & 1, k0 = cur * kRows;
    if (wide) build_mult(p, start, h, len, q0, k0, BM, mult16, tid);
    else build_mult(p, start, h, len, q0, k0, BM, mult8, tid);
    __syncthreads();
    if (k0 <= q0 + r0 + 16 * MT - 1) {  // else every key of the tile is after the warp's rows
      float s[MT][kRows / 8][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) zero(s[mt]);
      gemm_abt_mt<T, D, kRows / 8, MT>(s, sQ, r0, sK + st * kRows * D, 0, lane);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int j = 0; j < kRows / 8; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = r0 + 16 * mt + frag_row(lane, e), t = q0 + r, kc = frag_col(lane, j, e), kj = k0 + kc;
            const float x = alpha * s[mt][j][e];
            float c = 0.f;
            if (kj <= t && t < len) {
              const int mi = r * kRows + kc;
              c = sgate[r * 3 + 1] * static_cast<float>(wide ? mult16[mi] : mult8[mi]);
              if (kj > t - wnd) c += sgate[r * 3 + 2];
              if (has_mask && c != 0.f) c *= mask_at(p, b, t, kj);
            }
            s[mt][j][e] = x * mma::sigmoid_io<T>(x) * inv_n * c;
          }
        }
      }
      gemm_pb_mt<T, D, kRows / 8, MT>(o, s, sV + st * kRows * D, 0, wscratch, lane);
    }
    __syncthreads();
    cur = nxt;
  }
  mma::cp_async_wait<0>();  // nothing may be in flight at exit (a tile with no key tiles)

  // out = u * o
  const int dv = static_cast<int>(p.dim_v);
  T* out = static_cast<T*>(p.out.ptr) + (start + q0) * p.out.st + h * dv * p.out.sc;
  const T* u = p.u.ptr ? static_cast<const T*>(p.u.ptr) + (start + q0) * p.u.st + h * dv * p.u.sc : nullptr;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = r0 + 16 * mt + frag_row(lane, e), c = frag_col(lane, dt, e);
        if (q0 + r < len && c < dv) {
          const float uu = u ? static_cast<float>(u[r * p.u.st + c * p.u.sc]) : 1.f;
          out[r * p.out.st + c * p.out.sc] = static_cast<T>(uu * o[mt][dt][e]);
        }
      }
    }
  }
}

// Runs the forward into p.out (u from p.u, absent = 1); the backward calls it without u for
// the gated attention a(t) it needs for du.
void launch_bsa_fwd(const HstuParams& p, const BsaOperands& X, at::ScalarType dtype, int D, cudaStream_t stream) {
  const int n_kt = static_cast<int>((p.max_len + kRows - 1) / kRows);
  const int words = (n_kt + 31) / 32;
  dispatch_hstu(dtype, D, [&](auto tv, auto dv) {
    using T = decltype(tv);
    constexpr int kD = decltype(dv)::value;
    const int n_qt = static_cast<int>((p.max_len + kBM<T> - 1) / kBM<T>);
    TORCH_CHECK(n_qt <= 65535, msg("sequences up to ", 65535 * kBM<T>, " rows on CUDA, got ", p.max_len));
    const size_t smem = bsa_fwd_smem<T, kD>(words, p.block_counts > 255);
    TORCH_CHECK(smem <= 227 * 1024, msg("hstu_bsa_fwd: sequences too long for the CUDA kernel's tile bitmap (",
                                        p.max_len, " rows)"));
    set_smem(bsa_fwd_kernel<T, kD>, smem);
    bsa_fwd_kernel<T, kD><<<dim3(static_cast<unsigned>(p.batch * p.heads), n_qt), kThreads, smem, stream>>>(
        p, X, n_qt, words);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

namespace {

at::Tensor bsa_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const c10::optional<at::Tensor>& u, const at::Tensor& gates, const at::Tensor& block_idx,
                        const at::Tensor& x_offsets, int64_t n, int64_t num_heads, double alpha, int64_t block_size,
                        int64_t window_size, const c10::optional<at::Tensor>& attn_mask) {
  BsaFwdArgs r = prepare_bsa_fwd(q, k, v, u, gates, block_idx, x_offsets, n, num_heads, alpha, block_size,
                                 window_size, attn_mask);
  HstuParams& p = r.p;
  check_cuda_dims(p);
  check_cuda_bsa(p);
  const c10::cuda::CUDAGuard guard(q.device());
  if (p.total == 0 || p.batch == 0 || p.dim_v == 0) return r.out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  BsaInputs in(p, q, k, v, r.offsets, stream);
  launch_bsa_fwd(p, in.X, q.scalar_type(), in.D, stream);
  return r.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("hstu_bsa_fwd", &bsa_fwd_cuda); }

}  // namespace hstu_bsa
}  // namespace ssm_ext
