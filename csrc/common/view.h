// A strided (batch, channel, time) view shared by the kernels of every family: element
// (b, d, t) lives at ptr[b*sb + d*sd + t*sl]. A null ptr means "absent".
#pragma once
#include <ATen/ATen.h>

namespace ssm_ext {

struct View3 {
  void* ptr = nullptr;
  int64_t sb = 0, sd = 0, sl = 0;
};

// t laid out (batch, channel, time), as conv1d's x.
inline View3 view_bdl(const at::Tensor& t) {
  View3 v;
  if (!t.defined() || t.numel() == 0) return v;
  v.ptr = t.data_ptr();
  v.sb = t.stride(0);
  v.sd = t.stride(1);
  v.sl = t.stride(2);
  return v;
}

// t laid out (batch, time, channel), as the scan's x; a 2-D (batch, channel) t has no time.
inline View3 view_bld(const at::Tensor& t) {
  View3 v;
  if (!t.defined() || t.numel() == 0) return v;
  v.ptr = t.data_ptr();
  v.sb = t.stride(0);
  if (t.dim() == 2) {
    v.sd = t.stride(1);
  } else {
    v.sl = t.stride(1);
    v.sd = t.stride(2);
  }
  return v;
}

}  // namespace ssm_ext
