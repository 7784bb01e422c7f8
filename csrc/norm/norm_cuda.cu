// CUDA kernels for the gated RMSNorm (norm.h). Same semantics as norm_cpu.cpp.
//
// Forward: one CTA per row (grid-stride over rows). Warp w owns groups w, w + nwarps, ...: its
// lanes sum u^2 over the group's channels, a fixed xor-shuffle tree gives every lane the sum,
// lane 0 writes rstd (fp32, the op's output). After a barrier every thread writes its channels.
// Backward: a CTA owns a fixed block of rows. Phase 1 (warp per (row, group)) writes the
// group's mean(g*w*yhat) to a scratch tensor; phase 2 (thread per channel, rows in order) writes
// dx, dz and sums dweight/dbias over the block's rows into per-CTA partials; a second kernel
// adds the partials over the blocks in order. No atomics: the results are bitwise reproducible.
// The output pass (forward) and the per-channel pass (backward) move 16 bytes per thread and
// access when the channel stride is 1 and rows and pointers are 16-byte aligned with dim a
// multiple of the vector width; otherwise scalar loads, consecutive threads on consecutive
// channels (correct for any strides). The per-group reductions are scalar and warp-strided.
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

// The output of channel c given its loaded inputs.
template <typename T>
__device__ __forceinline__ float fwd_out(const RmsNormParams& p, int64_t c, float x, float z, float rstd) {
  const float sz = p.z ? z * sigmoid_f(z) : 1.f;
  const float u = (p.z && !p.norm_before_gate) ? x * sz : x;
  float o = u * rstd * load_as<float>(p.weight, p.w_dtype, c * p.w_s);
  if (p.bias) o += load_as<float>(p.bias, p.b_dtype, c * p.b_s);
  if (p.z && p.norm_before_gate) o *= sz;
  return o;
}

// kVec: x (and z) have channel stride 1, rows and pointers 16-byte aligned, dim a multiple of
// the vector width: the output pass moves 16 bytes per thread and access.
template <typename T, bool kVec>
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
    if constexpr (kVec) {
      constexpr int V = kVecElems<T>;
      for (int64_t c0 = int64_t(threadIdx.x) * V; c0 < p.dim; c0 += int64_t(kThreads) * V) {
        float xv[V], zv[V], o[V];
        load_vec<T, V>(static_cast<const T*>(p.x) + r * p.x_rs + c0, xv);
        if (p.z) load_vec<T, V>(static_cast<const T*>(p.z) + r * p.z_rs + c0, zv);
#pragma unroll
        for (int j = 0; j < V; ++j)
          o[j] = fwd_out<T>(p, c0 + j, xv[j], p.z ? zv[j] : 0.f, rstd_out[r * p.ngroups + (c0 + j) / p.group_size]);
        store_vec<T, V>(out + c0, o);
      }
    } else {
      for (int64_t c = threadIdx.x; c < p.dim; c += kThreads) {
        const float x = float(static_cast<const T*>(p.x)[r * p.x_rs + c * p.x_cs]);
        const float z = p.z ? float(static_cast<const T*>(p.z)[r * p.z_rs + c * p.z_cs]) : 0.f;
        out[c] = T(fwd_out<T>(p, c, x, z, rstd_out[r * p.ngroups + c / p.group_size]));
      }
    }
  }
}

template <typename T>
bool vec_ok(const RmsNormParams& p, bool bwd) {
  constexpr int V = kVecElems<T>;
  bool ok = p.x_cs == 1 && p.dim % V == 0 && p.x_rs % V == 0 && aligned16(p.x) && aligned16(p.out ? p.out : p.dx);
  if (p.z) ok = ok && p.z_cs == 1 && p.z_rs % V == 0 && aligned16(p.z) && (!bwd || aligned16(p.dz));
  if (bwd) ok = ok && p.dout_cs == 1 && p.dout_rs % V == 0 && aligned16(p.dout) && aligned16(p.dx);
  return ok;
}

// gc = dout (times silu(z) when the gate follows the norm); gw = gc * w; yhat = u * rstd.
template <typename T>
__device__ __forceinline__ float grad_in(const RmsNormParams& p, int64_t r, int64_t c, const Chan<T>& v) {
  const float go = float(static_cast<const T*>(p.dout)[r * p.dout_rs + c * p.dout_cs]);
  return (p.z && p.norm_before_gate) ? go * v.sz : go;
}

template <typename T, bool kVec>
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
  // Phase 2: per channel (kVec: per 16-byte group of channels), rows in order.
  constexpr int V = kVec ? kVecElems<T> : 1;
  for (int64_t c0 = int64_t(threadIdx.x) * V; c0 < p.dim; c0 += int64_t(kThreads) * V) {
    float w[V], b[V], dw[V], db[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      w[j] = load_as<float>(p.weight, p.w_dtype, (c0 + j) * p.w_s);
      b[j] = p.bias ? load_as<float>(p.bias, p.b_dtype, (c0 + j) * p.b_s) : 0.f;
      dw[j] = db[j] = 0.f;
    }
    for (int64_t r = r0; r < r1; ++r) {
      float xv[V], zv[V], go[V], dx[V], dz[V];
      const T* xp = static_cast<const T*>(p.x) + r * p.x_rs;
      const T* zp = p.z ? static_cast<const T*>(p.z) + r * p.z_rs : nullptr;
      const T* gp = static_cast<const T*>(p.dout) + r * p.dout_rs;
      if constexpr (kVec) {
        load_vec<T, V>(xp + c0, xv);
        if (zp) load_vec<T, V>(zp + c0, zv);
        load_vec<T, V>(gp + c0, go);
      } else {
        xv[0] = float(xp[c0 * p.x_cs]);
        zv[0] = zp ? float(zp[c0 * p.z_cs]) : 0.f;
        go[0] = float(gp[c0 * p.dout_cs]);
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t c = c0 + j, g = c / p.group_size;
        const float z = zp ? zv[j] : 0.f;
        const float sg = sigmoid_f(z), sz = zp ? z * sg : 1.f;
        const float u = (zp && !p.norm_before_gate) ? xv[j] * sz : xv[j];
        const float rstd = rstd_in[r * p.ngroups + g];
        const float gc = (zp && p.norm_before_gate) ? go[j] * sz : go[j];
        const float yhat = u * rstd;
        dw[j] += gc * yhat;
        db[j] += gc;
        const float du = rstd * (gc * w[j] - yhat * mean[r * p.ngroups + g]);
        const float dsilu = sg * (1.f + z * (1.f - sg));
        if (!zp) {
          dx[j] = du;
          dz[j] = 0.f;
        } else if (p.norm_before_gate) {
          dx[j] = du;
          dz[j] = go[j] * (yhat * w[j] + b[j]) * dsilu;
        } else {
          dx[j] = du * sz;
          dz[j] = du * xv[j] * dsilu;
        }
      }
      T* dxp = static_cast<T*>(p.dx) + r * p.dim + c0;
      T* dzp = zp ? static_cast<T*>(p.dz) + r * p.dim + c0 : nullptr;
      if constexpr (kVec) {
        store_vec<T, V>(dxp, dx);
        if (dzp) store_vec<T, V>(dzp, dz);
      } else {
        dxp[0] = T(dx[0]);
        if (dzp) dzp[0] = T(dz[0]);
      }
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      dw_part[int64_t(blockIdx.x) * p.dim + c0 + j] = dw[j];
      db_part[int64_t(blockIdx.x) * p.dim + c0 + j] = db[j];
    }
  }
}

// dweight[c] (dbias[c]) = sum over blocks, in block order.
__global__ __launch_bounds__(kThreads) void sum_parts_kernel(RmsNormParams p, int64_t nblk, const float* dw_part,
                                                             const float* db_part) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c < p.dim) store_param_grads(p, dw_part, db_part, nblk, c);
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
    bool_switch(vec_ok<T>(r.p, false), [&](auto vec) {
      fwd_kernel<T, decltype(vec)::value><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(r.p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
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
      bool_switch(vec_ok<T>(p, true), [&](auto vec) {
        bwd_kernel<T, decltype(vec)::value><<<static_cast<unsigned>(nblk), kThreads, 0, stream>>>(
            p, rows_per_block, mean.data_ptr<float>(), dw_part.data_ptr<float>(), db_part.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
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
