"""Twin of DEST3D's / StreamPETR's `issm_triton` package:
`from ssm_ext.compat.issm_triton import ISSM_chunk_scan_combined, RMSNormGated, rmsnorm_fn`."""
from .issm_combined import ISSM_chunk_scan_combined  # noqa: F401
from .layernorm_gated import RMSNorm, RMSNormGated, rms_norm_ref, rmsnorm_fn  # noqa: F401
