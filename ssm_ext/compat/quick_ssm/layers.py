"""Twin of `quick_ssm.layers`: re-exports ssm_ext.quick_ssm.layers."""
from ssm_ext.quick_ssm.layers import RMSNorm, SSM  # noqa: F401
