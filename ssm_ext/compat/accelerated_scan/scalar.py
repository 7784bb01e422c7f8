"""Twin of `accelerated_scan.scalar`."""
from ssm_ext.compat.accelerated_scan import scan  # noqa: F401
