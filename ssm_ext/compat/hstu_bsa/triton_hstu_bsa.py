"""Twin of `speed_exp.triton_bsa.triton_hstu_bsa`: re-exports ssm_ext.hstu_bsa."""
from ssm_ext.hstu_bsa import TritonHSTUBSAAttention, triton_hstu_attention_with_bsa  # noqa: F401
