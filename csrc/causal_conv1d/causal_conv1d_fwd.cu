// CUDA forward kernels for causal conv1d: a vectorised kernel per layout for widths 2..4,
// a fallback for any width and strides, the final-states and varlen-states kernels, and
// the decode update.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "causal_conv1d/causal_conv1d.h"
#include "causal_conv1d/causal_conv1d_cuda.cuh"
#include "causal_conv1d/causal_conv1d_math.h"
#include "common/checks.h"
#include "common/cuda_utils.cuh"

namespace ssm_ext {
namespace conv1d {
namespace {

// ---- channel-first (L contiguous): see CfLoads; weights are loaded once per row.
template <typename T, int W, bool kHasSeq, int kVecs>
__global__ __launch_bounds__(kCfThreads) void fwd_cf_kernel(ConvParams p) {
  constexpr int E = kVecElems<T>, N = E * kVecs;
  constexpr int kChunk = kCfThreads * N;
  const int64_t row = blockIdx.x, b = row / p.dim, d = row % p.dim;
  const int L = static_cast<int>(p.seqlen);
  const T* x = static_cast<const T*>(p.x.ptr) + b * p.x.sb + d * p.x.sd;
  const int* seq = p.seq_idx + b * p.seqlen;
  T* o = static_cast<T*>(p.out.ptr) + b * p.out.sb + d * p.out.sd;

  CfLoads<T, W, kHasSeq, kVecs> cur;
  cf_load_own<T, W, kHasSeq, false>(p, x, nullptr, seq, int(threadIdx.x) * N, cur);
  cf_load_neighbours<T, W, kHasSeq, false>(p, x, nullptr, seq, int(threadIdx.x) * N, cur);
  float w[W], bias, init[W - 1];
  load_weights_fixed<W>(p, d, w, bias);
#pragma unroll
  for (int j = 0; j < W - 1; ++j) init[j] = threadIdx.x == 0 ? state_at<T, float>(p.initial_states, b, d, j) : 0.f;

  for (int c0 = 0; c0 < L; c0 += kChunk) {
    const int t = c0 + int(threadIdx.x) * N;
    CfLoads<T, W, kHasSeq, kVecs> nxt;  // the next chunk, loaded while this one is computed
    cf_load_own<T, W, kHasSeq, false>(p, x, nullptr, seq, t + kChunk, nxt);
    cf_load_neighbours<T, W, kHasSeq, false>(p, x, nullptr, seq, t + kChunk, nxt);
    float xv[W - 1 + N];
    int sq[kHasSeq ? W - 1 + N : 1];
    cf_window<T, W, kHasSeq>(cur, t, init, xv, sq);
    float out[N];
#pragma unroll
    for (int i = 0; i < N; ++i) {
      float acc = bias;
#pragma unroll
      for (int k = 0; k < W; ++k) acc += (!kHasSeq || sq[i + k] == sq[W - 1 + i]) ? w[k] * xv[i + k] : 0.f;
      if (p.silu) acc = silu_f(acc);
      out[i] = (kHasSeq && sq[W - 1 + i] < 0) ? 0.f : acc;
    }
#pragma unroll
    for (int v = 0; v < kVecs; ++v)
      if (t + v * E < L) store_vec(o + t + v * E, out + v * E);
    cur = nxt;
  }
}

// ---- channel-last (D contiguous): each thread owns E channels and kClSteps time steps.
// buf holds, raw, the W-1 inputs before the current group of U steps and then the group;
// the next group is loaded before the current one is computed, so loads stay in flight.
template <typename T, int W, bool kHasSeq>
__global__ __launch_bounds__(kClThreads) void fwd_cl_kernel(ConvParams p) {
  constexpr int E = kVecElems<T>, U = kClUnroll;
  const int64_t c0 = (int64_t(blockIdx.x) * kClThreads + threadIdx.x) * E;
  const int64_t t0 = int64_t(blockIdx.y) * kClSteps, b = blockIdx.z;
  if (c0 >= p.dim) return;
  const int64_t t_end = min(t0 + kClSteps, p.seqlen);
  const T* x = static_cast<const T*>(p.x.ptr) + b * p.x.sb + c0;
  const int* seq = p.seq_idx + b * p.seqlen;
  const uint4 zero = make_uint4(0, 0, 0, 0);

  uint4 buf[W - 1 + U];
  int sbuf[W - 1 + U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    buf[W - 1 + u] = t0 + u < t_end ? load_raw(x + (t0 + u) * p.x.sl) : zero;
    sbuf[W - 1 + u] = (kHasSeq && t0 + u < t_end) ? seq[t0 + u] : 0;
  }
#pragma unroll
  for (int j = 0; j < W - 1; ++j) {
    const int64_t t = t0 - (W - 1) + j;
    if (t >= 0) {
      buf[j] = load_raw(x + t * p.x.sl);
    } else {  // before x: the initial states (or 0), packed like x
      T* e = reinterpret_cast<T*>(&buf[j]);
#pragma unroll
      for (int i = 0; i < E; ++i) e[i] = T(state_at<T, float>(p.initial_states, b, c0 + i, W - 1 + t));
    }
    sbuf[j] = kHasSeq ? seq_at(p, b, t) : 0;
  }
  float w[W][E], bias[E];
  load_weights_block<W, E>(p, c0, w, bias);

  T* o = static_cast<T*>(p.out.ptr) + b * p.out.sb + c0;
  for (int64_t tb = t0; tb < t_end; tb += U) {
    uint4 nxt[U];
    int snxt[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = tb + U + u;
      nxt[u] = t < t_end ? load_raw(x + t * p.x.sl) : zero;
      snxt[u] = (kHasSeq && t < t_end) ? seq[t] : 0;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = tb + u;
      if (t >= t_end) break;
      const int st = sbuf[W - 1 + u];
      float out[E];
#pragma unroll
      for (int i = 0; i < E; ++i) {
        float acc = bias[i];
#pragma unroll
        for (int k = 0; k < W; ++k)
          acc += (!kHasSeq || sbuf[u + k] == st) ? w[k][i] * unpack_one<T>(buf[u + k], i) : 0.f;
        if (p.silu) acc = silu_f(acc);
        out[i] = (kHasSeq && st < 0) ? 0.f : acc;
      }
      store_vec(o + t * p.out.sl, out);
    }
#pragma unroll
    for (int j = 0; j < W - 1; ++j) {
      buf[j] = buf[U + j];
      sbuf[j] = sbuf[U + j];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      buf[W - 1 + u] = nxt[u];
      sbuf[W - 1 + u] = snxt[u];
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
    width_switch(W, [&](auto kW) {
      bool_switch(p.seq_idx != nullptr, [&](auto kSeq) {
        fwd_cf_kernel<T, decltype(kW)::value, decltype(kSeq)::value, kCfVecs><<<rows, kCfThreads, 0, stream>>>(p);
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
    dispatch_io_dtype(a.x.scalar_type(), "x", [&](auto tag) {
      launch_fwd<decltype(tag)>(a.p, c10::cuda::getCurrentCUDAStream());
    });
  }
  return {a.out, a.final_states};
}

// ---- decode: one thread per (batch, channel). The W-1 inputs before token 0 are read once
// into registers; outputs and the new state come from them, so no load waits on a store.
template <typename T, int W>
__global__ void update_kernel(UpdateParams p) {
  const int64_t d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, b = blockIdx.y;
  if (d >= p.dim) return;
  const T* x = static_cast<const T*>(p.x.ptr) + b * p.x.sb + d * p.x.sd;
  T* out = static_cast<T*>(p.out.ptr) + b * p.out.sb + d * p.out.sd;
  const int64_t pool_row = p.conv_state_indices ? p.conv_state_indices[b] : b;
  if (pool_row < 0) {
    for (int64_t t = 0; t < p.seqlen; ++t) out[t * p.out.sl] = T(0.f);
    return;
  }
  CUDA_KERNEL_ASSERT(pool_row < p.pool_size && "conv_state_indices must be < conv_state.size(0)");
  T* state = static_cast<T*>(p.conv_state.ptr) + pool_row * p.conv_state.sb + d * p.conv_state.sd;
  const int S = int(p.state_len), L = int(p.seqlen);
  const int64_t ss = p.conv_state.sl;
  // The W-1 inputs before token 0 start at head - (W-1), wrapped into [0, S).
  const int head = p.cache_seqlens ? ((p.cache_seqlens[b] % S) + S) % S : S;
  T keep[W - 1];  // the W-1 inputs before token 0, kept for the shifted state
#pragma unroll
  for (int i = 0; i < W - 1; ++i) {
    const int j = head - (W - 1) + i;
    keep[i] = state[(j < 0 ? j + S : j) * ss];
  }
  const T x0 = x[0];
  float w[W], bias;
  load_weights_fixed<W>(p, d, w, bias);
  float win[W];
#pragma unroll
  for (int i = 0; i < W - 1; ++i) win[i] = float(keep[i]);
  int pos = head;  // circular buffer: where token t goes
  for (int t = 0; t < L; ++t) {
    const T xt = t == 0 ? x0 : x[t * p.x.sl];
    win[W - 1] = float(xt);
    float acc = bias;
#pragma unroll
    for (int k = 0; k < W; ++k) acc += w[k] * win[k];
    out[t * p.out.sl] = T(p.silu ? silu_f(acc) : acc);
#pragma unroll
    for (int k = 0; k < W - 1; ++k) win[k] = win[k + 1];
    if (p.cache_seqlens) {
      state[pos * ss] = xt;
      pos = pos + 1 == S ? 0 : pos + 1;
    }
  }
  if (!p.cache_seqlens) {
    // Shift left by L and append x: new[i] = old[i+L] (i+L < S) else x[i+L-S]. Old entries
    // at or past S-(W-1) are in `keep`; earlier ones are read before being overwritten.
    const T* old_tail = keep;
    for (int i = 0; i < S; ++i) {
      const int src = i + L;
      T v;
      if (src >= S) v = x[(src - S) * p.x.sl];
      else if (src >= S - (W - 1)) {
#pragma unroll
        for (int j = 0; j < W - 1; ++j) if (src == S - (W - 1) + j) v = old_tail[j];
      } else v = state[src * ss];
      state[i * ss] = v;
    }
  }
}

at::Tensor update_cuda(const at::Tensor& x, at::Tensor& conv_state, const at::Tensor& weight,
                       const c10::optional<at::Tensor>& bias, bool silu,
                       const c10::optional<at::Tensor>& cache_seqlens,
                       const c10::optional<at::Tensor>& conv_state_indices) {
  const c10::cuda::CUDAGuard guard(x.device());
  UpdateArgs a = prepare_update(x, conv_state, weight, bias, silu, cache_seqlens, conv_state_indices);
  UpdateParams& p = a.p;
  TORCH_CHECK(p.width <= kUpdateMaxWidth, msg("causal_conv1d_update on CUDA supports weight widths up to ",
              kUpdateMaxWidth, ", got weight of shape ", shape_str(weight.sizes())));
  if (a.out.numel() == 0) return a.out;
  dim3 grid(ceil_div(p.dim, 128), p.batch);
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_io_dtype(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    update_width_switch(p.width, [&](auto kW) { update_kernel<T, decltype(kW)::value><<<grid, 128, 0, stream>>>(p); });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return a.out;
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
    dispatch_io_dtype(x.scalar_type(), "x", [&](auto tag) {
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
