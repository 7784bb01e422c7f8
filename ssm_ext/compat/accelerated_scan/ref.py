"""Twin of `accelerated_scan.ref`."""
from ssm_ext.compat.accelerated_scan import scan  # noqa: F401
