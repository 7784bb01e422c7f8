"""Twin of `causal_conv1d.causal_conv1d_varlen`."""
from ssm_ext.causal_conv1d import causal_conv1d_varlen_states  # noqa: F401
