"""Twin of `causal_conv1d.causal_conv1d_interface`."""
from ssm_ext.causal_conv1d import (  # noqa: F401
    causal_conv1d_fn,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)
