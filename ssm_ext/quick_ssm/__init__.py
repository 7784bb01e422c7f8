"""Quick SSM's API on ssm_ext's scan kernels: `from ssm_ext.quick_ssm import scan, SSM`."""
from ssm_ext.scan import RMSNorm, SSM, scan, scan_step  # noqa: F401

__all__ = ["scan", "scan_step", "SSM", "RMSNorm"]
