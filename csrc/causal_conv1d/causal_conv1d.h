// Causal depthwise conv1d: the params struct shared by the CPU and CUDA kernels, and the
// argument checking that both devices go through before any kernel runs.
#pragma once
#include <ATen/ATen.h>
#include <tuple>

#include "common/load.h"
#include "common/view.h"

namespace ssm_ext {
namespace conv1d {

struct ConvParams {
  int64_t batch = 0, dim = 0, seqlen = 0, width = 0;
  bool silu = false;
  bool channel_last = false;  // x, out, dout, dx have stride 1 along D (else along L)

  View3 x, out;               // forward
  View3 dout, dx;             // backward
  View3 initial_states, dinitial_states, final_states, dfinal_states;  // (b, D, W-1); ptr may be null

  const void* weight = nullptr;  // (D, W), strides below
  int64_t weight_sd = 0, weight_sw = 0;
  Dtype weight_dtype = Dtype::f32;
  const void* bias = nullptr;    // (D,) or null
  int64_t bias_sd = 0;
  Dtype bias_dtype = Dtype::f32;
  const int32_t* seq_idx = nullptr;  // (b, L) contiguous, or null

  // Backward: fp32 partial sums of dweight (n_part, D, W) and dbias (n_part, D), summed after.
  float* dweight_part = nullptr;
  float* dbias_part = nullptr;
};

struct UpdateParams {
  int64_t batch = 0, dim = 0, seqlen = 0, width = 0, state_len = 0;
  bool silu = false;
  View3 x, out, conv_state;
  const void* weight = nullptr;
  int64_t weight_sd = 0, weight_sw = 0;
  Dtype weight_dtype = Dtype::f32;
  const void* bias = nullptr;
  int64_t bias_sd = 0;
  Dtype bias_dtype = Dtype::f32;
  const int32_t* cache_seqlens = nullptr;       // (b,) or null
  const int32_t* conv_state_indices = nullptr;  // (b,) or null
  int64_t pool_size = 0;                        // conv_state.size(0)
};


// Validated, layout-normalised arguments and freshly allocated outputs. Kernels read bias
// in the weight's dtype: `bias` holds the cast copy when they differ.
struct ConvArgs {
  at::Tensor x, seq_idx, bias;
  ConvParams p;
};
struct FwdArgs : ConvArgs {
  at::Tensor out, final_states;
};
struct BwdArgs : ConvArgs {
  at::Tensor dout, dx, dinitial_states;
};

FwdArgs prepare_fwd(const at::Tensor& x, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& seq_idx,
                    const c10::optional<at::Tensor>& initial_states, bool return_final_states,
                    bool silu);
BwdArgs prepare_bwd(const at::Tensor& x, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias,
                    const c10::optional<at::Tensor>& seq_idx,
                    const c10::optional<at::Tensor>& initial_states, const at::Tensor& dout,
                    const c10::optional<at::Tensor>& dfinal_states, bool silu);
// Allocates n_part fp32 partial sums of dweight / dbias for the device kernel to fill.
void alloc_param_partials(BwdArgs& a, int64_t n_part, at::Tensor& dweight_part,
                          at::Tensor& dbias_part);
// Sums the partials in a fixed order (deterministic) and casts to the parameters' dtypes.
std::tuple<at::Tensor, at::Tensor> finish_param_grads(const at::Tensor& dweight_part,
                                                      const at::Tensor& dbias_part,
                                                      const at::Tensor& weight,
                                                      const c10::optional<at::Tensor>& bias);
struct UpdateArgs {
  at::Tensor out, bias;
  UpdateParams p;
};
UpdateArgs prepare_update(const at::Tensor& x, const at::Tensor& conv_state,
                          const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                          bool silu, const c10::optional<at::Tensor>& cache_seqlens,
                          const c10::optional<at::Tensor>& conv_state_indices);
void check_varlen_states(const at::Tensor& x, const at::Tensor& cu_seqlens, int64_t state_len);


}  // namespace conv1d
}  // namespace ssm_ext
