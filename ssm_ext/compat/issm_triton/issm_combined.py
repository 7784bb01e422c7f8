"""Twin of `issm_triton.issm_combined`."""
from ssm_ext.issm import ISSM_chunk_scan_combined  # noqa: F401
