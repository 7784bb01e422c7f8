// CUDA backward kernels for causal conv1d. dz = dout * act'(pre) is recomputed from x;
// dx(s) = sum_k w[k] dz(s+W-1-k). dweight/dbias are written as per-block fp32 partials and
// summed in a fixed order afterwards (deterministic, no atomics).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/causal_conv1d_cuda.cuh"
#include "causal_conv1d/causal_conv1d_math.h"
#include "common/cuda_utils.cuh"

namespace ssm_ext {
namespace conv1d {
namespace {

// Sums W+1 per-thread values over the block; thread 0 writes them as partial `part`.
template <int W, int kThreads>
__device__ __forceinline__ void write_block_partial(const ConvParams& p, int64_t part, int64_t d,
                                                    float (&v)[W + 1]) {
  __shared__ float red[kThreads / 32][W + 1];
#pragma unroll
  for (int k = 0; k <= W; ++k)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0)
#pragma unroll
    for (int k = 0; k <= W; ++k) red[warp][k] = v[k];
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k <= W; ++k) {
      float s = 0.f;
      for (int i = 0; i < kThreads / 32; ++i) s += red[i][k];
      if (k < W) p.dweight_part[(part * p.dim + d) * W + k] = s;
      else p.dbias_part[part * p.dim + d] = s;
    }
  }
}

// ---- channel-first: one block per row (see CfLoads). The W-1 dz values after a thread's
// vector come from the next lane by shuffle; lane 31 computes them from the next vectors.
// dweight/dbias accumulate over the row and are reduced once, so the partials are per batch.
template <typename T, int W, bool kHasSeq>
__global__ __launch_bounds__(kCfThreads, 8) void bwd_cf_kernel(ConvParams p) {
  constexpr int E = kVecElems<T>;
  constexpr int64_t kChunk = int64_t(kCfThreads) * E;
  const int64_t row = blockIdx.x, b = row / p.dim, d = row % p.dim, L = p.seqlen;
  const bool last_lane = (threadIdx.x & 31) == 31;
  const T* x = static_cast<const T*>(p.x.ptr) + b * p.x.sb + d * p.x.sd;
  const T* dout = static_cast<const T*>(p.dout.ptr) + b * p.dout.sb + d * p.dout.sd;
  const int* seq = p.seq_idx + b * L;
  T* dx_row = static_cast<T*>(p.dx.ptr) + b * p.dx.sb + d * p.dx.sd;

  CfLoads<T, W, kHasSeq> cur;
  cf_load_own<T, W, kHasSeq, true>(p, x, dout, seq, int64_t(threadIdx.x) * E, cur);
  cf_load_neighbours<T, W, kHasSeq, true>(p, x, dout, seq, int64_t(threadIdx.x) * E, cur);
  float w[W], bias, init[W - 1];
  load_weights_fixed<W>(p, d, w, bias);
#pragma unroll
  for (int j = 0; j < W - 1; ++j) init[j] = threadIdx.x == 0 ? state_at<T, float>(p.initial_states, b, d, j) : 0.f;
  const int s_last = kHasSeq ? seq[L - 1] : 0;
  float part[W + 1];
#pragma unroll
  for (int k = 0; k <= W; ++k) part[k] = 0.f;

  for (int64_t c0 = 0; c0 < L; c0 += kChunk) {
    const int64_t t = c0 + int64_t(threadIdx.x) * E;
    CfLoads<T, W, kHasSeq> nxt;  // the next chunk, loaded while this one is computed
    cf_load_own<T, W, kHasSeq, true>(p, x, dout, seq, t + kChunk, nxt);
    cf_load_neighbours<T, W, kHasSeq, true>(p, x, dout, seq, t + kChunk, nxt);
    float xv[W - 1 + E];
    int sq[kHasSeq ? W - 1 + E : 1];
    cf_window<T, W, kHasSeq>(cur, t, init, xv, sq);

    // dz[i] = dz(t+i) for i < E + W - 1; sqr[j] = seq(t+E+j)
    float dz[E + W - 1];
    int sqr[W - 1];
#pragma unroll
    for (int i = 0; i < E; ++i) {
      float pre = bias;
#pragma unroll
      for (int k = 0; k < W; ++k) pre += (!kHasSeq || sq[i + k] == sq[W - 1 + i]) ? w[k] * xv[i + k] : 0.f;
      const float gi = (kHasSeq && sq[W - 1 + i] < 0) ? 0.f : unpack_one<T>(cur.g[0], i);
      dz[i] = p.silu ? gi * dsilu_f(pre) : gi;
    }
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
      dz[E + j] = __shfl_down_sync(0xffffffffu, dz[j], 1);
      sqr[j] = kHasSeq ? __shfl_down_sync(0xffffffffu, sq[W - 1 + j], 1) : 0;
    }
    if (last_lane) {  // the next warp's first steps (0 past the end: x_next, g_next are 0)
#pragma unroll
      for (int j = 0; j < W - 1; ++j) {
        const int st = kHasSeq ? cur.s_next[j] : 0;
        float pre = bias;
#pragma unroll
        for (int k = 0; k < W; ++k) {
          const int m = E + j - (W - 1) + k;  // position relative to t
          const float xm = m < E ? xv[W - 1 + m] : unpack_one<T>(cur.x_next, m - E);
          const int sm = !kHasSeq ? 0 : (m < E ? sq[W - 1 + m] : cur.s_next[m - E]);
          pre += (sm == st) ? w[k] * xm : 0.f;
        }
        const float gj = (kHasSeq && st < 0) ? 0.f : unpack_one<T>(cur.g_next, j);
        dz[E + j] = p.silu ? gj * dsilu_f(pre) : gj;
        sqr[j] = st;
      }
    }

    if (t < L) {
      float dx[E];
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const int si = kHasSeq ? sq[W - 1 + i] : 0;
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < W; ++k) {
          const int m = i + W - 1 - k;
          const int sm = !kHasSeq ? 0 : (m < E ? sq[W - 1 + m] : sqr[m - E]);
          acc += (sm == si) ? w[k] * dz[m] : 0.f;
        }
        const int64_t j = t + i - L + W - 1;
        if (j >= 0 && si == s_last) acc += state_at<T, float>(p.dfinal_states, b, d, j);
        dx[i] = acc;
#pragma unroll
        for (int k = 0; k < W; ++k) part[k] += (!kHasSeq || sq[i + k] == si) ? dz[i] * xv[i + k] : 0.f;
        part[W] += dz[i];
      }
      store_vec(dx_row + t, dx);
      if (t == 0 && p.dinitial_states.ptr != nullptr) {
        const View3& di = p.dinitial_states;
#pragma unroll
        for (int s = -(W - 1); s < 0; ++s) {  // positions before x: they belong to seq(0)
          float acc = 0.f;
#pragma unroll
          for (int k = 0; k < W; ++k) {
            const int m = s + W - 1 - k;
            if (m >= 0) acc += (!kHasSeq || sq[W - 1 + m] == sq[W - 1]) ? w[k] * dz[m] : 0.f;
          }
          static_cast<T*>(di.ptr)[b * di.sb + d * di.sd + (W - 1 + s) * di.sl] = T(acc);
        }
      }
    }
    cur = nxt;
  }
  write_block_partial<W, kCfThreads>(p, b, d, part);
}

// ---- channel-last: thread owns E channels and steps [t0, t0+kClBwdSteps); it streams t
// from t0 to the tile's end + W-2 in groups of U steps, the next group loaded before the
// current one is computed. xb/dzb hold x and dz for the W-1 steps before the group, then it.
template <typename T, int W, bool kHasSeq>
__global__ __launch_bounds__(kClBwdThreads, kClBwdBlocksPerSm) void bwd_cl_kernel(ConvParams p) {
  constexpr int E = kClBwdElems, U = kClBwdUnroll;
  const int64_t c0 = (int64_t(blockIdx.x) * kClBwdThreads + threadIdx.x) * E;
  const int64_t t0 = int64_t(blockIdx.y) * kClBwdSteps, b = blockIdx.z, L = p.seqlen;
  if (c0 >= p.dim) return;
  const int64_t t_end = min(t0 + kClBwdSteps, L);
  const int64_t t_stop = t_end + W - 1;  // dz is needed up to t_end - 1 + W - 1
  const T* x = static_cast<const T*>(p.x.ptr) + b * p.x.sb + c0;
  const T* dout = static_cast<const T*>(p.dout.ptr) + b * p.dout.sb + c0;
  const int* seq = p.seq_idx + b * L;
  T* dx = static_cast<T*>(p.dx.ptr) + b * p.dx.sb + c0;

  float xb[W - 1 + U][E], gb[U][E], dzb[W - 1 + U][E];
  int sb[W - 1 + U];
  auto load_group = [&](int64_t tg, float (*xg)[E], float (*gg)[E], int* sg) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = tg + u;
      if (t < L) {
        load_vec<T, E>(x + t * p.x.sl, xg[u]);
        load_vec<T, E>(dout + t * p.dout.sl, gg[u]);
      } else {
#pragma unroll
        for (int i = 0; i < E; ++i) xg[u][i] = gg[u][i] = 0.f;
      }
      sg[u] = (kHasSeq && t < L) ? seq[t] : 0;
    }
  };
  load_group(t0, xb + W - 1, gb, sb + W - 1);
  load_cl_halo<T, W, kHasSeq, E>(p, b, c0, t0, xb, sb);
  float w[W][E], bias[E];
  load_weights_block<W, E>(p, c0, w, bias);
  const int s_last = kHasSeq ? seq[L - 1] : 0;
  float dw[W][E], db[E];
#pragma unroll
  for (int i = 0; i < E; ++i) {
    db[i] = 0.f;
#pragma unroll
    for (int k = 0; k < W; ++k) dw[k][i] = 0.f;
#pragma unroll
    for (int j = 0; j < W - 1; ++j) dzb[j][i] = 0.f;
  }

  for (int64_t tb = t0; tb < t_stop; tb += U) {
    float nx[U][E], ng[U][E];
    int ns[U];
    if (tb + U < t_stop) load_group(tb + U, nx, ng, ns);
    // Step tb + u. kChecked: the group may cross the tile's or the sequence's ends (first and
    // last groups); the others skip every boundary test.
    auto step = [&](int u, auto checked) {
      constexpr bool kChecked = decltype(checked)::value;
      const int64_t t = tb + u;
      if (kChecked && t >= t_stop) return;
      const int st = sb[W - 1 + u];
      const bool live = (!kChecked || t < L) && !(kHasSeq && st < 0);
#pragma unroll
      for (int i = 0; i < E; ++i) {
        float pre = bias[i];
#pragma unroll
        for (int k = 0; k < W; ++k) pre += (!kHasSeq || sb[u + k] == st) ? w[k][i] * xb[u + k][i] : 0.f;
        const float gi = live ? gb[u][i] : 0.f;
        const float dzi = p.silu ? gi * dsilu_f(pre) : gi;
        dzb[W - 1 + u][i] = dzi;
        if (!kChecked || t < t_end) {
#pragma unroll
          for (int k = 0; k < W; ++k) dw[k][i] += (!kHasSeq || sb[u + k] == st) ? dzi * xb[u + k][i] : 0.f;
          db[i] += dzi;
        }
      }
      // dx(s) for s = t-(W-1), or dinitial_states for s < 0 in the first tile
      const int64_t s = t - (W - 1);
      const int ss = sb[u];  // seq(s)
      if (!kChecked || s >= t0 || (t0 == 0 && p.dinitial_states.ptr != nullptr)) {
        float out[E];
        const int64_t j = s - L + W - 1;
#pragma unroll
        for (int i = 0; i < E; ++i) {
          float acc = 0.f;
#pragma unroll
          for (int k = 0; k < W; ++k)
            acc += (!kHasSeq || sb[W - 1 + u - k] == ss) ? w[k][i] * dzb[W - 1 + u - k][i] : 0.f;
          if (kChecked && j >= 0 && ss == s_last) acc += state_at<T, float>(p.dfinal_states, b, c0 + i, j);
          out[i] = acc;
        }
        if (!kChecked || s >= t0) {
          store_vec<T, E>(dx + s * p.dx.sl, out);
        } else {
          const View3& di = p.dinitial_states;
#pragma unroll
          for (int i = 0; i < E; ++i)
            static_cast<T*>(di.ptr)[b * di.sb + (c0 + i) * di.sd + (W - 1 + s) * di.sl] = T(out[i]);
        }
      }
    };
    if (tb >= t0 + W - 1 && tb + U <= t_end) {
#pragma unroll
      for (int u = 0; u < U; ++u) step(u, std::false_type{});
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u) step(u, std::true_type{});
    }
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
#pragma unroll
      for (int i = 0; i < E; ++i) {
        xb[j][i] = xb[U + j][i];
        dzb[j][i] = dzb[U + j][i];
      }
      sb[j] = sb[U + j];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int i = 0; i < E; ++i) {
        xb[W - 1 + u][i] = nx[u][i];
        gb[u][i] = ng[u][i];
      }
      sb[W - 1 + u] = ns[u];
    }
  }
  const int64_t part = b * gridDim.y + blockIdx.y;
#pragma unroll
  for (int i = 0; i < E; ++i) {
#pragma unroll
    for (int k = 0; k < W; ++k) p.dweight_part[(part * p.dim + c0 + i) * W + k] = dw[k][i];
    p.dbias_part[part * p.dim + c0 + i] = db[i];
  }
}

// ---- any width, any strides. dx: one thread per position; parameters: one thread per
// (batch, channel) row, so the partials are indexed by batch.
template <typename T>
__global__ void bwd_dx_generic_kernel(ConvParams p) {
  extern __shared__ float w_smem[];
  const int64_t row = blockIdx.x, b = row / p.dim, d = row % p.dim, W = p.width;
  if (threadIdx.x == 0) load_row_weights(p, d, w_smem, &w_smem[W]);
  __syncthreads();
  auto dz = [&](int64_t t) { return dz_at<T, float>(p, b, d, t, w_smem, w_smem[W]); };
  for (int64_t i = int64_t(blockIdx.y) * blockDim.x + threadIdx.x - (W - 1); i < p.seqlen;
       i += int64_t(gridDim.y) * blockDim.x) {
    if (i < 0 && p.dinitial_states.ptr == nullptr) continue;
    const float g = dxe_at<T, float>(p, b, d, i, w_smem, dz);
    const View3& v = i >= 0 ? p.dx : p.dinitial_states;
    const int64_t pos = i >= 0 ? i : W - 1 + i;
    static_cast<T*>(v.ptr)[b * v.sb + d * v.sd + pos * v.sl] = T(g);
  }
}

template <typename T>
__global__ void bwd_params_generic_kernel(ConvParams p) {
  extern __shared__ float smem[];  // W weights, the bias, then one partial sum per thread
  const int64_t row = blockIdx.x, b = row / p.dim, d = row % p.dim, W = p.width;
  float* red = smem + W + 1;
  if (threadIdx.x == 0) load_row_weights(p, d, smem, &smem[W]);
  __syncthreads();
  for (int64_t k = 0; k <= W; ++k) {  // k == W: the bias
    float acc = 0.f;
    for (int64_t t = threadIdx.x; t < p.seqlen; t += blockDim.x) {
      const float g = dz_at<T, float>(p, b, d, t, smem, smem[W]);
      const int64_t i = t - (W - 1) + k;
      if (k == W) acc += g;
      else if (seq_at(p, b, i) == seq_at(p, b, t)) acc += g * xe_at<T, float>(p, b, d, i);
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      if (k < W) p.dweight_part[(b * p.dim + d) * W + k] = red[0];
      else p.dbias_part[b * p.dim + d] = red[0];
    }
    __syncthreads();
  }
}

// dweight (D, W) and dbias (D,) = sums over the n_part partials, in a fixed order, written
// in the weight's dtype: one launch instead of a sum and a cast for each.
template <typename WT>
__global__ void sum_partials_kernel(const float* dw_part, const float* db_part, int64_t n_part,
                                    int64_t n_w, int64_t dim, WT* dweight, WT* dbias) {
  const int64_t n = n_w + (dbias ? dim : 0);
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const bool is_w = e < n_w;
    const float* src = is_w ? dw_part + e : db_part + (e - n_w);
    const int64_t stride = is_w ? n_w : dim;
    float acc = 0.f;
    for (int64_t k = 0; k < n_part; ++k) acc += src[k * stride];
    if (is_w) dweight[e] = WT(acc);
    else dbias[e - n_w] = WT(acc);
  }
}

std::tuple<at::Tensor, at::Tensor> sum_partials_cuda(const at::Tensor& dweight_part, const at::Tensor& dbias_part,
                                                     const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias) {
  if (bias.has_value() && bias->scalar_type() != weight.scalar_type())
    return finish_param_grads(dweight_part, dbias_part, weight, bias);  // rare: two dtypes
  const int64_t n_part = dweight_part.size(0), dim = weight.size(0), n_w = dim * weight.size(1);
  at::Tensor dweight = at::empty({dim, weight.size(1)}, weight.options());
  at::Tensor dbias = at::empty({bias.has_value() ? dim : 0}, weight.options());
  const int64_t n = n_w + (bias.has_value() ? dim : 0);
  if (n == 0) return {dweight, dbias};
  const unsigned grid = std::min<unsigned>(ceil_div(n, 256), 4096);
  dispatch_io_dtype(weight.scalar_type(), "weight", [&](auto tag) {
    using WT = decltype(tag);
    sum_partials_kernel<WT><<<grid, 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        dweight_part.data_ptr<float>(), dbias_part.data_ptr<float>(), n_part, n_w, dim,
        static_cast<WT*>(dweight.data_ptr()), bias.has_value() ? static_cast<WT*>(dbias.data_ptr()) : nullptr);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dweight, dbias};
}

template <typename T>
void launch_bwd(ConvParams& p, BwdArgs& a, at::Tensor& dweight_part, at::Tensor& dbias_part,
                cudaStream_t stream) {
  const int64_t rows = p.batch * p.dim;
  const int W = p.width;
  if (use_cf_fast_path<T>(p, {p.x, p.dout, p.dx})) {
    alloc_param_partials(a, p.batch, dweight_part, dbias_part);
    width_switch(W, [&](auto kW) {
      bool_switch(p.seq_idx != nullptr, [&](auto kSeq) {
        bwd_cf_kernel<T, decltype(kW)::value, decltype(kSeq)::value><<<rows, kCfThreads, 0, stream>>>(a.p);
      });
    });
  } else if (use_cl_fast_path<T, kClBwdElems>(p, {p.x, p.dout, p.dx})) {
    dim3 grid(ceil_div(p.dim, int64_t(kClBwdThreads) * kClBwdElems), ceil_div(p.seqlen, kClBwdSteps), p.batch);
    alloc_param_partials(a, p.batch * grid.y, dweight_part, dbias_part);
    width_switch(W, [&](auto kW) {
      bool_switch(p.seq_idx != nullptr, [&](auto kSeq) {
        bwd_cl_kernel<T, decltype(kW)::value, decltype(kSeq)::value><<<grid, kClBwdThreads, 0, stream>>>(a.p);
      });
    });
  } else {
    alloc_param_partials(a, p.batch, dweight_part, dbias_part);
    dim3 grid(rows, std::min<unsigned>(ceil_div(p.seqlen + W - 1, 256), 65535));
    bwd_dx_generic_kernel<T><<<grid, 256, (W + 1) * sizeof(float), stream>>>(a.p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bwd_params_generic_kernel<T><<<rows, 256, (W + 1 + 256) * sizeof(float), stream>>>(a.p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& seq_idx, const c10::optional<at::Tensor>& initial_states,
    const at::Tensor& dout, const c10::optional<at::Tensor>& dfinal_states, bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  BwdArgs a = prepare_bwd(x, weight, bias, seq_idx, initial_states, dout, dfinal_states, silu);
  at::Tensor dweight_part, dbias_part;
  if (a.dx.numel() == 0) {
    alloc_param_partials(a, 1, dweight_part, dbias_part);
    dweight_part.zero_();
    dbias_part.zero_();
  } else {
    dispatch_io_dtype(a.x.scalar_type(), "x", [&](auto tag) {
      launch_bwd<decltype(tag)>(a.p, a, dweight_part, dbias_part, c10::cuda::getCurrentCUDAStream());
    });
  }
  auto [dweight, dbias] = sum_partials_cuda(dweight_part, dbias_part, weight, bias);
  return {a.dx, dweight, dbias, a.dinitial_states};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) { m.impl("causal_conv1d_bwd", &bwd_cuda); }

}  // namespace conv1d
}  // namespace ssm_ext
