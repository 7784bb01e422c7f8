"""Twin of `quick_ssm.scan_interface`."""
from ssm_ext.scan import scan, scan_step  # noqa: F401
