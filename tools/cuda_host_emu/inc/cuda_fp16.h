// Host emulation of the cuda_fp16.h pieces the kernels use on the host: the packed pair and its
// round-to-nearest conversion (scan_strips.cu's stores); mma.cuh's pack2 is replaced by transform.py.
#pragma once
#include <c10/util/Half.h>
struct __half2 { c10::Half x, y; };
inline __half2 __floats2half2_rn(float a, float b) { return {c10::Half(a), c10::Half(b)}; }
