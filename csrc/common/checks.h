// Argument checks shared by every op: each message names the argument and says what was
// expected and what was given.
#pragma once
#include <ATen/ATen.h>
#include <sstream>
#include <string>
#include <vector>

namespace ssm_ext {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected,
                        const char* meaning) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", meaning, " = ",
              shape_str(expected), ", got ", shape_str(t.sizes()));
}

inline void check_float(const at::Tensor& t, const char* name, bool allow_double) {
  auto d = t.scalar_type();
  bool ok = d == at::kFloat || d == at::kHalf || d == at::kBFloat16 ||
            (allow_double && d == at::kDouble);
  TORCH_CHECK(ok, name, " must be float32, float16 or bfloat16",
              allow_double ? " (or float64 on the CPU)" : "", ", got ", d);
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, name, " must have dtype ", expected, ", got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

inline void check_ndim(const at::Tensor& t, const char* name, int64_t ndim, const char* meaning) {
  TORCH_CHECK(t.dim() == ndim, name, " must be ", ndim, "-D ", meaning, ", got a ", t.dim(),
              "-D tensor of shape ", shape_str(t.sizes()));
}

// float32/16/bf16 (float64 on the CPU only).
inline void check_input_dtype(const at::Tensor& t, const char* name) {
  check_float(t, name, /*allow_double=*/!t.is_cuda());
}

}  // namespace ssm_ext
