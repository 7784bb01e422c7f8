"""Twin of `speed_exp.triton_bsa.triton_bsa_attention`: re-exports ssm_ext.hstu_bsa."""
from ssm_ext.hstu_bsa import triton_block_sparse_attn  # noqa: F401
