// First-order scan h_t = a_t*h_{t-1} + b_t*x_t, y_t = c_t*h_t over (B, L, D): the params
// struct shared by the CPU and CUDA kernels, and the argument checking both go through.
#pragma once
#include <ATen/ATen.h>

#include "common/load.h"
#include "common/view.h"

namespace ssm_ext {
namespace scan {

// The forward saves h every kChunk steps (chunk_states[:, j] = h_{j*kChunk - 1}, the initial state
// for j = 0) so the backward can recompute h chunk by chunk without a (B, L, D) tensor.
// Mirrored by SCAN_CHUNK in ssm_ext/_ops.py. The CUDA kernels' tiles are kChunk steps long.
constexpr int64_t kChunk = 32;

inline int64_t num_chunks(int64_t seqlen) { return (seqlen + kChunk - 1) / kChunk; }

struct ScanParams {
  int64_t batch = 0, seqlen = 0, dim = 0;
  View3 x, a, b, c;            // (B, L, D); b or c absent means 1
  View3 initial_state;         // (B, D), any float dtype, or absent
  Dtype initial_dtype = Dtype::f32;
  View3 y;                     // (B, L, D) in y_dtype
  Dtype y_dtype = Dtype::f32;
  View3 final_state;           // (B, D), fp32 (fp64 for fp64 inputs)
  View3 states;                // (B, L, D) h_t, fp32 (fp64), or absent
  View3 chunk_states;          // (B, num_chunks(L), D) like final_state, or absent
  // backward
  View3 dy, dfinal_state;      // dy in dy_dtype; dfinal_state like final_state, or absent
  Dtype dy_dtype = Dtype::f32;
  View3 dx, da, db, dc, dinitial_state;
};

struct FwdArgs {
  at::Tensor y, final_state, states, chunk_states;
  ScanParams p;
};
struct BwdArgs {
  at::Tensor dx, da, db, dc, dinitial_state;
  ScanParams p;
};

// (B, num_chunks(L), D), laid out like x: a row's chunk states are contiguous when x's time
// steps are, so the kernels that walk rows along L write them in whole sectors.
at::Tensor empty_chunk_states(const at::Tensor& x, const at::TensorOptions& opt);

FwdArgs prepare_fwd(const at::Tensor& x, const at::Tensor& a, const c10::optional<at::Tensor>& b,
                    const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& initial_state,
                    bool store_states, c10::optional<at::ScalarType> out_dtype);
BwdArgs prepare_bwd(const at::Tensor& x, const at::Tensor& a, const c10::optional<at::Tensor>& b,
                    const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& initial_state,
                    const c10::optional<at::Tensor>& states, const c10::optional<at::Tensor>& chunk_states,
                    const at::Tensor& dy, const c10::optional<at::Tensor>& dfinal_state);

}  // namespace scan
}  // namespace ssm_ext
