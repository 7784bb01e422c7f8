"""ssm_ext: fast, compile-friendly CPU/CUDA kernels for state-space models and sparse attention."""
from . import _ops  # noqa: F401  (registers torch.ops.ssm_ext.*)
from . import causal_conv1d, hstu_bsa, issm, norm, scan
from ._ops import has_cuda_kernels
from .issm import ISSM_chunk_scan_combined
from .norm import RMSNormGated, rmsnorm_fn

__version__ = "0.1.0"
__all__ = ["causal_conv1d", "hstu_bsa", "issm", "norm", "scan", "has_cuda_kernels", "ISSM_chunk_scan_combined",
           "RMSNormGated", "rmsnorm_fn"]
