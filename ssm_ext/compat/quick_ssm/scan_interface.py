"""Twin of `quick_ssm.scan_interface`: re-exports ssm_ext.quick_ssm.scan_interface."""
from ssm_ext.quick_ssm.scan_interface import scan, scan_step  # noqa: F401
