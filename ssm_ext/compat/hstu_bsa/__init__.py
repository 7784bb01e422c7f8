"""Twin of the seed's HSTU-BSA packages `speed_exp.triton_bsa` / `speed_exp.triton` (and, as
`.model.GateModel`, of `model.GateModel`): re-exports ssm_ext.hstu_bsa."""
from ssm_ext.hstu_bsa import (  # noqa: F401
    GateModel,
    TritonHSTUBSAAttention,
    triton_block_sparse_attn,
    triton_hstu_attention_with_bsa,
)
