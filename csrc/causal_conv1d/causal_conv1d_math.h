// The convolution at one point, written once for the CPU kernel and the CUDA fallback
// kernel (any width, any strides). The fast CUDA kernels compute the same formulas on
// vectors. Positions: x index i in [-(W-1), L); i < 0 reads initial_states (or 0).
//   pre(t)  = bias + sum_k w[k] * xe(t-(W-1)+k) * [seq(t-(W-1)+k) == seq(t)]
//   out(t)  = act(pre(t)), 0 where seq(t) < 0
//   dz(t)   = dout(t) * act'(pre(t))                      (0 for t >= L or seq(t) < 0)
//   dxe(i)  = sum_k w[k] * dz(i+W-1-k) * [seq(i) == seq(i+W-1-k)] + dfinal(i-L+W-1) * [seq(i) == seq(L-1)]
//   final(j) = xe(L-(W-1)+j) * [seq(L-(W-1)+j) == seq(L-1)]
// seq(i) for i < 0 is seq(0): initial states continue the first sequence.
#pragma once
#include <cmath>

#include "causal_conv1d/causal_conv1d.h"

namespace ssm_ext {
namespace conv1d {

template <typename acc_t>
C10_HOST_DEVICE inline acc_t sigmoid(acc_t v) {
  return acc_t(1) / (acc_t(1) + ::exp(-v));
}

C10_HOST_DEVICE inline int32_t seq_at(const ConvParams& p, int64_t b, int64_t i) {
  if (p.seq_idx == nullptr) return 0;
  return p.seq_idx[b * p.seqlen + (i < 0 ? 0 : i)];
}

template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t state_at(const View3& v, int64_t b, int64_t d, int64_t j) {
  if (v.ptr == nullptr) return acc_t(0);
  return acc_t(static_cast<const scalar_t*>(v.ptr)[b * v.sb + d * v.sd + j * v.sl]);
}

template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t xe_at(const ConvParams& p, int64_t b, int64_t d, int64_t i) {
  if (i >= 0) return acc_t(static_cast<const scalar_t*>(p.x.ptr)[b * p.x.sb + d * p.x.sd + i * p.x.sl]);
  return state_at<scalar_t, acc_t>(p.initial_states, b, d, p.width - 1 + i);
}

// w: the row's W weights, already converted.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t pre_at(const ConvParams& p, int64_t b, int64_t d, int64_t t,
                                   const acc_t* w, acc_t bias) {
  const int32_t s = seq_at(p, b, t);
  acc_t acc = bias;
  for (int64_t k = 0; k < p.width; ++k) {
    const int64_t i = t - (p.width - 1) + k;
    if (seq_at(p, b, i) == s) acc += w[k] * xe_at<scalar_t, acc_t>(p, b, d, i);
  }
  return acc;
}

template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t out_at(const ConvParams& p, int64_t b, int64_t d, int64_t t,
                                   const acc_t* w, acc_t bias) {
  if (seq_at(p, b, t) < 0) return acc_t(0);
  const acc_t v = pre_at<scalar_t, acc_t>(p, b, d, t, w, bias);
  return p.silu ? v * sigmoid(v) : v;
}

template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t dz_at(const ConvParams& p, int64_t b, int64_t d, int64_t t,
                                  const acc_t* w, acc_t bias) {
  if (t >= p.seqlen || seq_at(p, b, t) < 0) return acc_t(0);
  const acc_t g = acc_t(static_cast<const scalar_t*>(p.dout.ptr)[b * p.dout.sb + d * p.dout.sd + t * p.dout.sl]);
  if (!p.silu) return g;
  const acc_t v = pre_at<scalar_t, acc_t>(p, b, d, t, w, bias);
  const acc_t sg = sigmoid(v);
  return g * sg * (acc_t(1) + v * (acc_t(1) - sg));
}

// dz: returns dz(t) for t in [0, L + W - 1) (the CPU passes a row buffer, the GPU recomputes).
template <typename scalar_t, typename acc_t, typename DzFn>
C10_HOST_DEVICE inline acc_t dxe_at(const ConvParams& p, int64_t b, int64_t d, int64_t i,
                                   const acc_t* w, DzFn dz) {
  const int64_t W = p.width;
  const int32_t s = seq_at(p, b, i);
  acc_t acc = 0;
  for (int64_t k = 0; k < W; ++k) {
    const int64_t t = i + W - 1 - k;
    if (t >= 0 && t < p.seqlen && seq_at(p, b, t) == s) acc += w[k] * dz(t);
  }
  const int64_t j = i - p.seqlen + W - 1;
  if (j >= 0 && seq_at(p, b, i) == seq_at(p, b, p.seqlen - 1))
    acc += state_at<scalar_t, acc_t>(p.dfinal_states, b, d, j);
  return acc;
}

template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t final_at(const ConvParams& p, int64_t b, int64_t d, int64_t j) {
  const int64_t i = p.seqlen - (p.width - 1) + j;
  if (p.seqlen > 0 && seq_at(p, b, i) != seq_at(p, b, p.seqlen - 1)) return acc_t(0);
  return xe_at<scalar_t, acc_t>(p, b, d, i);
}

template <typename acc_t>
C10_HOST_DEVICE inline void load_row_weights(const ConvParams& p, int64_t d, acc_t* w, acc_t* bias) {
  for (int64_t k = 0; k < p.width; ++k)
    w[k] = load_as<acc_t>(p.weight, p.weight_dtype, d * p.weight_sd + k * p.weight_sw);
  *bias = p.bias == nullptr ? acc_t(0) : load_as<acc_t>(p.bias, p.bias_dtype, d * p.bias_sd);
}

}  // namespace conv1d
}  // namespace ssm_ext
