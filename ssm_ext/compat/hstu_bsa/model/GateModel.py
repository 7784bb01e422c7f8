"""Twin of `model.GateModel`: re-exports ssm_ext.hstu_bsa.GateModel."""
from ssm_ext.hstu_bsa import GateModel  # noqa: F401
