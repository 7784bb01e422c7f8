// Argument checks shared by every op: each message names the argument and says what was
// expected and what was given.
//
// Messages are built with std::to_string, never with iostreams: some toolchains link a
// private static libstdc++ into the extension whose locale is never initialised, and
// formatting a number through an ostream there crashes. TORCH_CHECK passes a single
// std::string through untouched.
#pragma once
#include <ATen/ATen.h>
#include <string>
#include <type_traits>

namespace ssm_ext {

inline std::string to_text(const char* s) { return s; }
inline std::string to_text(const std::string& s) { return s; }
inline std::string to_text(at::ScalarType t) { return c10::toString(t); }
inline std::string to_text(const at::Device& d) { return d.str(); }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string to_text(T v) { return std::to_string(v); }

template <typename... A>
std::string msg(const A&... a) {
  std::string s;
  ((s += to_text(a)), ...);
  return s;
}

inline std::string shape_str(at::IntArrayRef s) {
  std::string o = "(";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + (s.size() == 1 ? ",)" : ")");
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected,
                        const char* meaning) {
  TORCH_CHECK(t.sizes() == expected, msg(name, " must have shape ", meaning, " = ",
              shape_str(expected), ", got ", shape_str(t.sizes())));
}

inline void check_float(const at::Tensor& t, const char* name, bool allow_double) {
  auto d = t.scalar_type();
  bool ok = d == at::kFloat || d == at::kHalf || d == at::kBFloat16 ||
            (allow_double && d == at::kDouble);
  TORCH_CHECK(ok, msg(name, " must be float32, float16 or bfloat16",
              allow_double ? " (or float64 on the CPU)" : "", ", got ", d));
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected) {
  TORCH_CHECK(t.scalar_type() == expected, msg(name, " must have dtype ", expected, ", got ",
              t.scalar_type()));
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), msg(name, " must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device()));
}

inline void check_ndim(const at::Tensor& t, const char* name, int64_t ndim, const char* meaning) {
  TORCH_CHECK(t.dim() == ndim, msg(name, " must be ", ndim, "-D ", meaning, ", got a ", t.dim(),
              "-D tensor of shape ", shape_str(t.sizes())));
}

// float32/16/bf16 (float64 on the CPU only).
inline void check_input_dtype(const at::Tensor& t, const char* name) {
  check_float(t, name, /*allow_double=*/!t.is_cuda());
}

}  // namespace ssm_ext
