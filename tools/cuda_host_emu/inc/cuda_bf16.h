// Host emulation: nothing of cuda_bf16.h is used on the host (mma.cuh's pack2 is replaced by transform.py).
#pragma once
