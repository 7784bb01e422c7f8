"""ssm_ext: fast, compile-friendly CPU/CUDA kernels for state-space models and sparse attention."""
from . import _ops  # noqa: F401  (registers torch.ops.ssm_ext.*)
from . import causal_conv1d, hstu_bsa, scan
from ._ops import has_cuda_kernels

__version__ = "0.1.0"
__all__ = ["causal_conv1d", "hstu_bsa", "scan", "has_cuda_kernels"]
