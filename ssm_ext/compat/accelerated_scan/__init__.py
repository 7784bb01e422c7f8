"""Twin of accelerated-scan: `scan(gates, tokens)` on (B, C, T), x_t = gates_t*x_{t-1} + tokens_t.
Any T (the original needs a power of two), fp32 state for fp16/bf16 inputs. The original's
`warp`, `scalar` and `ref` modules all map to this one function."""
import torch

from ssm_ext._ops import ops


def scan(gates: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    if gates.dim() != 3 or gates.shape != tokens.shape:
        raise ValueError(f"gates and tokens must both be (batch, channels, time) of one shape, got gates "
                         f"{tuple(gates.shape)} and tokens {tuple(tokens.shape)}")
    if gates.dtype != tokens.dtype:
        raise ValueError(f"gates and tokens must have one dtype, got gates {gates.dtype} and tokens {tokens.dtype}")
    # (B, C, T) viewed as the op's (B, L, D); the output keeps the (B, C, T) layout.
    y = ops.scan_fwd(tokens.transpose(1, 2), gates.transpose(1, 2), None, None, None, False, None)[0]
    return y.transpose(1, 2)
