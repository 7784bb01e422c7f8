"""Twin of `accelerated_scan.warp`."""
from ssm_ext.compat.accelerated_scan import scan  # noqa: F401
