"""Twin of `quick_ssm.layers`."""
from ssm_ext.scan import RMSNorm, SSM  # noqa: F401
