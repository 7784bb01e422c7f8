"""Twin of `issm_triton.layernorm_gated` (its RMSNorm is the gated one: `import RMSNorm as RMSNormGated`)."""
from ssm_ext.norm import RMSNormGated, rmsnorm_fn  # noqa: F401
from ssm_ext.reference.norm import rmsnorm_gated as _reference

RMSNorm = RMSNormGated


def rms_norm_ref(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, upcast=True):
    """The plain-PyTorch gated RMSNorm, computed in float64 (upcast is accepted and not needed),
    returned in x's dtype."""
    return _reference(x, weight, bias, z, eps, group_size, norm_before_gate).to(x.dtype)
