// Reading and writing elements whose dtype is only known at run time (weights, biases,
// outputs of a requested dtype).
// The GPU kernels use them for small tensors read once per thread; the CPU loops per element.
#pragma once
#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>

namespace ssm_ext {

enum class Dtype : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

inline Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    case at::kDouble: return Dtype::f64;
    default: return Dtype::f32;
  }
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t load_as(const void* p, Dtype t, int64_t i) {
  switch (t) {
    case Dtype::f16: return acc_t(float(static_cast<const c10::Half*>(p)[i]));
    case Dtype::bf16: return acc_t(float(static_cast<const c10::BFloat16*>(p)[i]));
    case Dtype::f64: return acc_t(static_cast<const double*>(p)[i]);
    default: return acc_t(static_cast<const float*>(p)[i]);
  }
}

template <typename acc_t>
C10_HOST_DEVICE inline void store_as(void* p, Dtype t, int64_t i, acc_t v) {
  switch (t) {
    case Dtype::f16: static_cast<c10::Half*>(p)[i] = c10::Half(float(v)); break;
    case Dtype::bf16: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(float(v)); break;
    case Dtype::f64: static_cast<double*>(p)[i] = double(v); break;
    default: static_cast<float*>(p)[i] = float(v);
  }
}

}  // namespace ssm_ext
