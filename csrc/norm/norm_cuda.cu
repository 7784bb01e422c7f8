// CUDA kernels for the gated RMSNorm (norm.h). Same semantics as norm_cpu.cpp.
//
// Forward: one CTA per row (grid-stride over rows). Warp w owns groups w, w + nwarps, ...: its
// lanes sum u^2 over the group's channels, a fixed xor-shuffle tree gives every lane the sum,
// lane 0 writes rstd (fp32, the op's output). After a barrier every thread writes its channels.
// Backward: a CTA owns a fixed block of rows. Phase 1 (warp per (row, group)) writes the
// group's mean(g*w*yhat) to a scratch tensor; phase 2 (thread per channel, rows in order) writes
// dx, dz and sums dweight/dbias over the block's rows into per-CTA partials; a second kernel
// adds the partials over the blocks in order. No atomics: the results are bitwise reproducible.
// Loads are scalar: consecutive threads read consecutive channels, which coalesces when the
// channel stride is 1 (the common case) and stays correct for any strides.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "norm/norm.h"

namespace ssm_ext {
namespace norm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float sigmoid_f(float v) { return 1.f / (1.f + __expf(-v)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// u (what is normalised), x, and silu(z) (1 without z) of channel c of row r.
template <typename T>
struct Chan {
  float x, z, sz, u;
};

template <typename T>
__device__ __forceinline__ Chan<T> load_chan(const RmsNormParams& p, int64_t r, int64_t c) {
  Chan<T> v;
  v.x = float(static_cast<const T*>(p.x)[r * p.x_rs + c * p.x_cs]);
  v.z = 0.f;
  v.sz = 1.f;
  if (p.z) {
    v.z = float(static_cast<const T*>(p.z)[r * p.z_rs + c * p.z_cs]);
    v.sz = v.z * sigmoid_f(v.z);
  }
  v.u = (p.z && !p.norm_before_gate) ? v.x * v.sz : v.x;
  return v;
}

template <typename T>
__global__ __launch_bounds__(kThreads) void fwd_kernel(RmsNormParams p) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float* rstd_out = static_cast<float*>(p.rstd);
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    for (int64_t g = warp; g < p.ngroups; g += kWarps) {
      float ss = 0.f;
      for (int64_t c = g * p.group_size + lane; c < (g + 1) * p.group_size; c += 32) {
        const float u = load_chan<T>(p, r, c).u;
        ss += u * u;
      }
      ss = warp_sum(ss);
      if (lane == 0) rstd_out[r * p.ngroups + g] = rsqrtf(ss / float(p.group_size) + float(p.eps));
    }
    __syncthreads();  // rstd (global) visible to the block
    T* out = static_cast<T*>(p.out) + r * p.dim;
    for (int64_t c = threadIdx.x; c < p.dim; c += kThreads) {
      const Chan<T> v = load_chan<T>(p, r, c);
      const float rstd = rstd_out[r * p.ngroups + c / p.group_size];
      float o = v.u * rstd * load_as<float>(p.weight, p.w_dtype, c * p.w_s);
      if (p.bias) o += load_as<float>(p.bias, p.b_dtype, c * p.b_s);
      if (p.z && p.norm_before_gate) o *= v.sz;
      out[c] = T(o);
    }
  }
}

// gc = dout (times silu(z) when the gate follows the norm); gw = gc * w; yhat = u * rstd.
template <typename T>
__device__ __forceinline__ float grad_in(const RmsNormParams& p, int64_t r, int64_t c, const Chan<T>& v) {
  const float go = float(static_cast<const T*>(p.dout)[r * p.dout_rs + c * p.dout_cs]);
  return (p.z && p.norm_before_gate) ? go * v.sz : go;
}

template <typename T>
__global__ __launch_bounds__(kThreads) void bwd_kernel(RmsNormParams p, int64_t rows_per_block, float* mean,
                                                       float* dw_part, float* db_part) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r0 = int64_t(blockIdx.x) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < p.rows ? r0 + rows_per_block : p.rows;
  const float* rstd_in = static_cast<const float*>(p.rstd);
  // Phase 1: mean over each group of gw * yhat, per (row, group) of the block.
  const int64_t pairs = (r1 - r0) * p.ngroups;
  for (int64_t q = warp; q < pairs; q += kWarps) {
    const int64_t r = r0 + q / p.ngroups, g = q % p.ngroups;
    const float rstd = rstd_in[r * p.ngroups + g];
    float dot = 0.f;
    for (int64_t c = g * p.group_size + lane; c < (g + 1) * p.group_size; c += 32) {
      const Chan<T> v = load_chan<T>(p, r, c);
      dot += grad_in<T>(p, r, c, v) * load_as<float>(p.weight, p.w_dtype, c * p.w_s) * (v.u * rstd);
    }
    dot = warp_sum(dot);
    if (lane == 0) mean[r * p.ngroups + g] = dot / float(p.group_size);
  }
  __syncthreads();
  // Phase 2: per channel, rows in order.
  for (int64_t c = threadIdx.x; c < p.dim; c += kThreads) {
    const float w = load_as<float>(p.weight, p.w_dtype, c * p.w_s);
    const float b = p.bias ? load_as<float>(p.bias, p.b_dtype, c * p.b_s) : 0.f;
    const int64_t g = c / p.group_size;
    float dw = 0.f, db = 0.f;
    for (int64_t r = r0; r < r1; ++r) {
      const Chan<T> v = load_chan<T>(p, r, c);
      const float rstd = rstd_in[r * p.ngroups + g];
      const float gc = grad_in<T>(p, r, c, v);
      const float yhat = v.u * rstd;
      dw += gc * yhat;
      db += gc;
      const float du = rstd * (gc * w - yhat * mean[r * p.ngroups + g]);
      T* dx = static_cast<T*>(p.dx) + r * p.dim;
      if (!p.z) {
        dx[c] = T(du);
        continue;
      }
      const float s = sigmoid_f(v.z), dsilu = s * (1.f + v.z * (1.f - s));
      T* dz = static_cast<T*>(p.dz) + r * p.dim;
      if (p.norm_before_gate) {
        const float go = float(static_cast<const T*>(p.dout)[r * p.dout_rs + c * p.dout_cs]);
        dx[c] = T(du);
        dz[c] = T(go * (yhat * w + b) * dsilu);
      } else {
        dx[c] = T(du * v.sz);
        dz[c] = T(du * v.x * dsilu);
      }
    }
    dw_part[int64_t(blockIdx.x) * p.dim + c] = dw;
    db_part[int64_t(blockIdx.x) * p.dim + c] = db;
  }
}

// dweight[c] (dbias[c]) = sum over blocks, in block order.
__global__ __launch_bounds__(kThreads) void sum_parts_kernel(RmsNormParams p, int64_t nblk, const float* dw_part,
                                                             const float* db_part) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= p.dim) return;
  float sw = 0.f, sb = 0.f;
  for (int64_t k = 0; k < nblk; ++k) {
    sw += dw_part[k * p.dim + c];
    sb += db_part[k * p.dim + c];
  }
  store_as(p.dweight, p.w_dtype, c, sw);
  if (p.dbias) store_as(p.dbias, p.b_dtype, c, sb);
}

std::tuple<at::Tensor, at::Tensor> fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& z,
                                            double eps, int64_t group_size, bool norm_before_gate) {
  FwdArgs r = prepare_fwd(x, weight, bias, z, eps, group_size, norm_before_gate);
  const c10::cuda::CUDAGuard guard(x.device());
  if (r.p.rows == 0 || r.p.dim == 0) return {r.out, r.rstd};
  dispatch_io_dtype(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(r.p.rows, 65535 * 16));
    fwd_kernel<T><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(r.p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {r.out, r.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_cuda(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& z, const at::Tensor& rstd, int64_t group_size, bool norm_before_gate) {
  BwdArgs r = prepare_bwd(dout, x, weight, bias, z, rstd, group_size, norm_before_gate);
  const c10::cuda::CUDAGuard guard(x.device());
  RmsNormParams& p = r.p;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (p.dim == 0) return {r.dx, r.dweight, r.dbias, r.dz};
  // A fixed number of rows per block for a given shape: at most 1024 blocks, at least 8 rows.
  const int64_t rows_per_block = std::max<int64_t>(8, (p.rows + 1023) / 1024);
  const int64_t nblk = (p.rows + rows_per_block - 1) / rows_per_block;
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({std::max<int64_t>(p.rows * p.ngroups, 1)}, f32);
  at::Tensor dw_part = at::empty({std::max<int64_t>(nblk * p.dim, 1)}, f32);
  at::Tensor db_part = at::empty({std::max<int64_t>(nblk * p.dim, 1)}, f32);
  dispatch_io_dtype(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    if (nblk > 0) {
      bwd_kernel<T><<<static_cast<unsigned>(nblk), kThreads, 0, stream>>>(
          p, rows_per_block, mean.data_ptr<float>(), dw_part.data_ptr<float>(), db_part.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    sum_parts_kernel<<<ceil_div(p.dim, kThreads), kThreads, 0, stream>>>(p, nblk, dw_part.data_ptr<float>(),
                                                                        db_part.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {r.dx, r.dweight, r.dbias, r.dz};
}

}  // namespace

TORCH_LIBRARY_IMPL(ssm_ext, CUDA, m) {
  m.impl("rmsnorm_gated_fwd", &fwd_cuda);
  m.impl("rmsnorm_gated_bwd", &bwd_cuda);
}

}  // namespace norm
}  // namespace ssm_ext
