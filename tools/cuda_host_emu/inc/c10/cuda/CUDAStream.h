#pragma once
#include <cuda_runtime.h>
namespace c10 { namespace cuda { struct EmuStream { operator cudaStream_t() const { return nullptr; } };
inline EmuStream getCurrentCUDAStream() { return {}; } } }
