"""Twin of `quick_ssm`: re-exports ssm_ext.quick_ssm."""
from ssm_ext.quick_ssm import RMSNorm, SSM, scan, scan_step  # noqa: F401
