// CUDA forward kernels for causal conv1d: a vectorised kernel per layout for widths 2..4,
// a fallback for any width and strides, the final-states and varlen-states kernels, and
// the decode update.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/causal_conv1d_cuda.cuh"
#include "causal_conv1d/causal_conv1d_math.h"
#include "common/cuda_utils.cuh"

namespace ssm_ext {
namespace conv1d {
namespace {

// ---- channel-first (L contiguous): each thread owns kVecs * N consecutive time steps of one
// row; the W-1 inputs before them come from the previous lane by shuffle (lane 0 reads them).
template <typename T, int W, int kVecs, bool kHasSeq>
__global__ __launch_bounds__(kCfThreads) void fwd_cf_kernel(ConvParams p) {
  constexpr int N = kVecElems<T> * kVecs;
  const int64_t row = blockIdx.x, b = row / p.dim, d = row % p.dim;
  const int64_t t0 = (int64_t(blockIdx.y) * kCfThreads + threadIdx.x) * N;
  const bool active = t0 < p.seqlen;
  const T* x = static_cast<const T*>(p.x.ptr) + b * p.x.sb + d * p.x.sd;

  float xv[W - 1 + N];  // xv[W-1+i] = x[t0+i]
  int sq[kHasSeq ? W - 1 + N : 1];
  load_cf_window<T, W, kVecs, kHasSeq>(p, x, b, d, t0, active, xv, sq);
  if (!active) return;

  float w[W], bias;
  load_weights_fixed<W>(p, d, w, bias);
  float out[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float acc = bias;
#pragma unroll
    for (int k = 0; k < W; ++k) acc += (!kHasSeq || sq[i + k] == sq[W - 1 + i]) ? w[k] * xv[i + k] : 0.f;
    if (p.silu) acc = silu_f(acc);
    out[i] = (kHasSeq && sq[W - 1 + i] < 0) ? 0.f : acc;
  }
  T* o = static_cast<T*>(p.out.ptr) + b * p.out.sb + d * p.out.sd + t0;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) store_vec(o + v * kVecElems<T>, out + v * kVecElems<T>);
}

// ---- channel-last (D contiguous): each thread owns N channels and kClSteps time steps,
// keeping the last W-1 inputs in registers; kUnroll loads are issued before use.
template <typename T, int W, bool kHasSeq>
__global__ __launch_bounds__(kClThreads) void fwd_cl_kernel(ConvParams p) {
  constexpr int N = kVecElems<T>;
  constexpr int kUnroll = 4;
  const int64_t c0 = (int64_t(blockIdx.x) * kClThreads + threadIdx.x) * N;
  const int64_t t0 = int64_t(blockIdx.y) * kClSteps, b = blockIdx.z;
  if (c0 >= p.dim) return;
  const int64_t t_end = min(t0 + kClSteps, p.seqlen);

  float w[W][N], bias[N];
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float wi[W];
    load_weights_fixed<W>(p, c0 + i, wi, bias[i]);
#pragma unroll
    for (int k = 0; k < W; ++k) w[k][i] = wi[k];
  }
  float win[W][N];  // win[k] = x at t-(W-1)+k; win[W-1] is the current step
  int swin[W];
  load_cl_halo<T, W, kHasSeq>(p, b, c0, t0, win, swin);

  const T* x = static_cast<const T*>(p.x.ptr) + b * p.x.sb + c0;
  T* o = static_cast<T*>(p.out.ptr) + b * p.out.sb + c0;
  for (int64_t tb = t0; tb < t_end; tb += kUnroll) {
    float cur[kUnroll][N];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (tb + u < t_end) load_vec(x + (tb + u) * p.x.sl, cur[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t t = tb + u;
      if (t >= t_end) break;
#pragma unroll
      for (int i = 0; i < N; ++i) win[W - 1][i] = cur[u][i];
      if (kHasSeq) swin[W - 1] = p.seq_idx[b * p.seqlen + t];
      float out[N];
#pragma unroll
      for (int i = 0; i < N; ++i) {
        float acc = bias[i];
#pragma unroll
        for (int k = 0; k < W; ++k) acc += (!kHasSeq || swin[k] == swin[W - 1]) ? w[k][i] * win[k][i] : 0.f;
        if (p.silu) acc = silu_f(acc);
        out[i] = (kHasSeq && swin[W - 1] < 0) ? 0.f : acc;
      }
      store_vec(o + t * p.out.sl, out);
      shift_window<W, N>(win, swin);
    }
  }
}

// ---- any width, any strides: one thread per output, weights staged in shared memory.
template <typename T>
__global__ void fwd_generic_kernel(ConvParams p) {
  extern __shared__ float w_smem[];  // W weights then the bias
  const int64_t row = blockIdx.x, b = row / p.dim, d = row % p.dim;
  if (threadIdx.x == 0) load_row_weights(p, d, w_smem, &w_smem[p.width]);
  __syncthreads();
  for (int64_t t = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; t < p.seqlen;
       t += int64_t(gridDim.y) * blockDim.x) {
    const float v = out_at<T, float>(p, b, d, t, w_smem, w_smem[p.width]);
    static_cast<T*>(p.out.ptr)[b * p.out.sb + d * p.out.sd + t * p.out.sl] = T(v);
  }
}

template <typename T>
__global__ void final_states_kernel(ConvParams p) {
  const int64_t n = p.batch * p.dim * (p.width - 1);
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e % (p.width - 1), row = e / (p.width - 1), b = row / p.dim, d = row % p.dim;
    const View3& f = p.final_states;
    static_cast<T*>(f.ptr)[b * f.sb + d * f.sd + j * f.sl] = T(final_at<T, float>(p, b, d, j));
  }
}

template <typename T>
void launch_fwd(ConvParams& p, cudaStream_t stream) {
  const int64_t rows = p.batch * p.dim;
  const int W = p.width;
  if (use_cf_fast_path<T>(p, {p.x, p.out})) {
    constexpr int kVecs = kCfVecs;
    dim3 grid(rows, ceil_div(p.seqlen, int64_t(kCfThreads) * kVecElems<T> * kVecs));
    width_switch(W, [&](auto kW) {
      bool_switch(p.seq_idx != nullptr, [&](auto kSeq) {
        fwd_cf_kernel<T, decltype(kW)::value, kVecs, decltype(kSeq)::value><<<grid, kCfThreads, 0, stream>>>(p);
      });
    });
  } else if (use_cl_fast_path<T>(p, {p.x, p.out})) {
    dim3 grid(ceil_div(p.dim, int64_t(kClThreads) * kVecElems<T>), ceil_div(p.seqlen, kClSteps), p.batch);
    width_switch(W, [&](auto kW) {
      bool_switch(p.seq_idx != nullptr, [&](auto kSeq) {
        fwd_cl_kernel<T, decltype(kW)::value, decltype(kSeq)::value><<<grid, kClThreads, 0, stream>>>(p);
      });
    });
  } else {
    dim3 grid(rows, std::min<unsigned>(ceil_div(p.seqlen, 256), 65535));
    fwd_generic_kernel<T><<<grid, 256, (W + 1) * sizeof(float), stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.final_states.ptr != nullptr) {
    final_states_kernel<T><<<std::min<unsigned>(ceil_div(rows * (W - 1), 256), 65535), 256, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias,
                                            const c10::optional<at::Tensor>& seq_idx,
                                            const c10::optional<at::Tensor>& initial_states,
                                            bool return_final_states, bool silu) {
  const c10::cuda::CUDAGuard guard(x.device());
  FwdArgs a = prepare_fwd(x, weight, bias, seq_idx, initial_states, return_final_states, silu);
  if (a.out.numel() > 0) {
    dispatch_io_dtype(a.x.scalar_type(), "causal_conv1d_fwd", [&](auto tag) {
      launch_fwd<decltype(tag)>(a.p, c10::cuda::getCurrentCUDAStream());
    });
  }
  return {a.out, a.final_states};
}

// ---- decode: one thread per (batch, channel); reads the whole window before it writes the state.
template <typename T, int kW>
__global__ void update_kernel(UpdateParams p) {
  const int64_t d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, b = blockIdx.y;
  if (d >= p.dim) return;
  const int W = kW > 0 ? kW : int(p.width);
  const T* x = static_cast<const T*>(p.x.ptr) + b * p.x.sb + d * p.x.sd;
  T* out = static_cast<T*>(p.out.ptr) + b * p.out.sb + d * p.out.sd;
  const int64_t pool_row = p.conv_state_indices ? p.conv_state_indices[b] : b;
  if (pool_row < 0) {
    for (int64_t t = 0; t < p.seqlen; ++t) out[t * p.out.sl] = T(0.f);
    return;
  }
  CUDA_KERNEL_ASSERT(pool_row < p.pool_size && "conv_state_indices must be < conv_state.size(0)");
  T* state = static_cast<T*>(p.conv_state.ptr) + pool_row * p.conv_state.sb + d * p.conv_state.sd;
  const int64_t S = p.state_len, ss = p.conv_state.sl;
  // The W-1 inputs before token 0 start at `head - (W-1)` (mod S).
  const int64_t head = p.cache_seqlens ? ((p.cache_seqlens[b] % S) + S) % S : S;
  float w[kW > 0 ? kW : 1], bias = p.bias ? load_as<float>(p.bias, p.bias_dtype, d * p.bias_sd) : 0.f;
  if (kW > 0) {
#pragma unroll
    for (int k = 0; k < (kW > 0 ? kW : 1); ++k) w[k] = load_as<float>(p.weight, p.weight_dtype, d * p.weight_sd + k * p.weight_sw);
  }
  auto weight = [&](int k) { return kW > 0 ? w[k] : load_as<float>(p.weight, p.weight_dtype, d * p.weight_sd + k * p.weight_sw); };
  auto input = [&](int64_t i) {  // i in [-(W-1), L): the state before token 0, then x
    return i >= 0 ? float(x[i * p.x.sl]) : float(state[(((head + i) % S) + S) % S * ss]);
  };
  for (int64_t t = 0; t < p.seqlen; ++t) {
    float acc = bias;
#pragma unroll
    for (int k = 0; k < W; ++k) acc += weight(k) * input(t - (W - 1) + k);
    out[t * p.out.sl] = T(p.silu ? silu_f(acc) : acc);
  }
  if (p.cache_seqlens) {
    for (int64_t t = 0; t < p.seqlen; ++t) state[(head + t) % S * ss] = x[t * p.x.sl];
  } else {  // shift left by L and append x; reads stay ahead of writes
    for (int64_t i = 0; i < S; ++i) {
      const int64_t src = i + p.seqlen;
      state[i * ss] = src < S ? state[src * ss] : x[(src - S) * p.x.sl];
    }
  }
}

at::Tensor update_cuda(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, bool silu,
                       const c10::optional<at::Tensor>& cache_seqlens,
                       const c10::optional<at::Tensor>& conv_state_indices) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out;
  UpdateParams p = prepare_update(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices, out);
  if (out.numel() == 0) return out;
  dim3 grid(ceil_div(p.dim, 128), p.batch);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_io_dtype(x.scalar_type(), "causal_conv1d_update", [&](auto tag) {
    using T = decltype(tag);
    switch (p.width) {
      case 2: update_kernel<T, 2><<<grid, 128, 0, stream>>>(p); break;
      case 3: update_kernel<T, 3><<<grid, 128, 0, stream>>>(p); break;
      case 4: update_kernel<T, 4><<<grid, 128, 0, stream>>>(p); break;
      default: update_kernel<T, 0><<<grid, 128, 0, stream>>>(p);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---- varlen states: offsets are clamped into [0, total] so bad offsets cannot read out of bounds.
template <typename T, typename idx_t>
__global__ void varlen_states_kernel(const T* x, int64_t x_s0, int64_t x_s1, const idx_t* cu,
                                     int64_t nseq, int64_t total, int64_t dim, int64_t state_len,
                                     T* states) {  // states (nseq, state_len, dim) contiguous
  const int64_t n = nseq * state_len * dim;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = e % dim, j = (e / dim) % state_len, s = e / (dim * state_len);
    const int64_t end = min(max(int64_t(cu[s + 1]), int64_t(0)), total);
    const int64_t start = min(max(int64_t(cu[s]), int64_t(0)), end);
    const int64_t src = end - state_len + j;
    states[e] = src >= start ? x[src * x_s0 + c * x_s1] : T(0.f);
  }
}

at::Tensor varlen_states_cuda(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t state_len) {
  const c10::cuda::CUDAGuard guard(x.device());
  check_varlen_states(x, cu_seqlens, state_len);
  const int64_t nseq = cu_seqlens.size(0) - 1, D = x.size(1);
  at::Tensor states = at::empty({nseq, state_len, D}, x.options());
  const at::Tensor cu = cu_seqlens.contiguous();
  const int64_t n = states.numel();
  if (n > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    const unsigned grid = std::min<unsigned>(ceil_div(n, 256), 65535);
    dispatch_io_dtype(x.scalar_type(), "causal_conv1d_varlen_states", [&](auto tag) {
      using T = decltype(tag);
      if (cu.scalar_type() == at::kInt) {
        varlen_states_kernel<T, int32_t><<<grid, 256, 0, stream>>>(
            static_cast<const T*>(x.data_ptr()), x.stride(0), x.stride(1), cu.data_ptr<int32_t>(),
            nseq, x.size(0), D, state_len, static_cast<T*>(states.data_ptr()));
      } else {
        varlen_states_kernel<T, int64_t><<<grid, 256, 0, stream>>>(
            static_cast<const T*>(x.data_ptr()), x.stride(0), x.stride(1), cu.data_ptr<int64_t>(),
            nseq, x.size(0), D, state_len, static_cast<T*>(states.data_ptr()));
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return states.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) {
  m.impl("causal_conv1d_fwd", &fwd_cuda);
  m.impl("causal_conv1d_update", &update_cuda);
  m.impl("causal_conv1d_varlen_states", &varlen_states_cuda);
}

}  // namespace conv1d
}  // namespace ssm_ext
