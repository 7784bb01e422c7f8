// Every ssm_ext op schema, in one place. Kernels register per device in their family's files.
#include <Python.h>
#include <torch/library.h>

// `import ssm_ext._C` loads this library, which runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(ssm_ext, m) {
  // causal depthwise conv1d (csrc/causal_conv1d)
  m.def("causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, "
        "Tensor? initial_states, bool return_final_states, bool silu) -> (Tensor, Tensor)");
  m.def("causal_conv1d_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, "
        "Tensor? initial_states, Tensor dout, Tensor? dfinal_states, bool silu) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, "
        "bool silu, Tensor? cache_seqlens, Tensor? conv_state_indices) -> Tensor");
  m.def("causal_conv1d_varlen_states(Tensor x, Tensor cu_seqlens, int state_len) -> Tensor");

  // first-order scan h_t = a_t*h_{t-1} + b_t*x_t, y_t = c_t*h_t (csrc/scan)
  m.def("scan_fwd(Tensor x, Tensor a, Tensor? b, Tensor? c, Tensor? initial_state, bool store_states, "
        "ScalarType? out_dtype) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("scan_bwd(Tensor x, Tensor a, Tensor? b, Tensor? c, Tensor? initial_state, Tensor? states, "
        "Tensor? chunk_states, Tensor dy, Tensor? dfinal_state) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ISSM chunked scan, per-state decay (csrc/issm); absent gradients come back as empty tensors.
  // chunk_states: what the CUDA forward keeps for the backward (the state entering each 64-step chunk
  // and the chunks' decay products, fp32) when z is absent, else empty; the backward then skips
  // recomputing the forward. Opaque: pass issm_fwd's output or None.
  m.def("issm_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, Tensor? D, Tensor? z, "
        "Tensor? dt_bias, Tensor? initial_states, Tensor? seq_idx, Tensor? cu_seqlens, bool dt_softplus, "
        "float dt_limit_lo, float dt_limit_hi, bool return_final_states) -> (Tensor out, Tensor final_states, "
        "Tensor chunk_states)");
  m.def("issm_bwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, Tensor? D, Tensor? z, "
        "Tensor? dt_bias, Tensor? initial_states, Tensor? seq_idx, Tensor? cu_seqlens, bool dt_softplus, "
        "float dt_limit_lo, float dt_limit_hi, Tensor dout, Tensor? dfinal_states, Tensor? chunk_states) -> (Tensor dx, Tensor ddt, "
        "Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, Tensor ddt_bias, Tensor dinitial_states)");

  // gated RMSNorm (csrc/norm)
  m.def("rmsnorm_gated_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? z, float eps, int group_size, "
        "bool norm_before_gate) -> (Tensor out, Tensor rstd)");
  m.def("rmsnorm_gated_bwd(Tensor dout, Tensor x, Tensor weight, Tensor? bias, Tensor? z, Tensor rstd, "
        "int group_size, bool norm_before_gate) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dz)");

  // HSTU pointwise-SiLU attention on jagged sequences, dense and block-sparse (csrc/hstu_bsa)
  m.def("hstu_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor x_offsets, int n, int num_heads, float alpha, "
        "Tensor? attn_mask) -> Tensor");
  m.def("hstu_attn_bwd(Tensor q, Tensor k, Tensor v, Tensor x_offsets, int n, int num_heads, float alpha, "
        "Tensor? attn_mask, Tensor dout) -> (Tensor, Tensor, Tensor)");
  m.def("hstu_bsa_topk(Tensor q, Tensor k, Tensor x_offsets, int n, int num_heads, float alpha, "
        "int block_size, int block_counts) -> Tensor");
  m.def("hstu_bsa_fwd(Tensor q, Tensor k, Tensor v, Tensor? u, Tensor gates, Tensor block_idx, "
        "Tensor x_offsets, int n, int num_heads, float alpha, int block_size, int window_size, "
        "Tensor? attn_mask) -> Tensor");
  m.def("hstu_bsa_bwd(Tensor q, Tensor k, Tensor v, Tensor? u, Tensor gates, Tensor block_idx, "
        "Tensor x_offsets, int n, int num_heads, float alpha, int block_size, int window_size, "
        "Tensor? attn_mask, Tensor dout) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
