"""Twin of the `causal_conv1d` package: `from ssm_ext.compat.causal_conv1d import causal_conv1d_fn`."""
from ssm_ext.causal_conv1d import causal_conv1d_fn, causal_conv1d_update  # noqa: F401

__version__ = "1.6.1"  # the causal_conv1d API version mirrored
