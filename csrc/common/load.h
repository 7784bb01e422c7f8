// Reading small parameter tensors (weights, biases) whose dtype is only known at run time.
// Used once per row or thread, so the switch costs nothing next to the streamed data.
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cstdint>

namespace ssm_ext {

enum class Dtype : int { f32 = 0, f16 = 1, bf16 = 2, f64 = 3 };

template <typename acc_t>
C10_HOST_DEVICE inline acc_t load_as(const void* p, Dtype t, int64_t i) {
  switch (t) {
    case Dtype::f16: return acc_t(float(static_cast<const c10::Half*>(p)[i]));
    case Dtype::bf16: return acc_t(float(static_cast<const c10::BFloat16*>(p)[i]));
    case Dtype::f64: return acc_t(static_cast<const double*>(p)[i]);
    default: return acc_t(static_cast<const float*>(p)[i]);
  }
}

}  // namespace ssm_ext
