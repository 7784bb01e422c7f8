// Host-side switches from run-time values to the compile-time parameters of CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "common/checks.h"

namespace ssm_ext {

template <typename F>
void bool_switch(bool v, F&& f) {
  if (v) f(std::true_type{});
  else f(std::false_type{});
}

// Calls f with a value of the element type of t (float32, float16 or bfloat16).
template <typename F>
void dispatch_io_dtype(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, msg(name, " must be float32, float16 or bfloat16 on CUDA, got ", t));
  }
}

}  // namespace ssm_ext
