// Host emulation of the cuda_bf16.h pieces the kernels use on the host: the packed pair and its
// round-to-nearest conversion (scan_strips.cu's stores); mma.cuh's pack2 is replaced by transform.py.
#pragma once
#include <c10/util/BFloat16.h>
struct __nv_bfloat162 { c10::BFloat16 x, y; };
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {c10::BFloat16(a), c10::BFloat16(b)}; }
