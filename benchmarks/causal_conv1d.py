"""causal_conv1d: the issue's sizes, ours against Dao-AILab/causal-conv1d (same API, same tensors)."""
import torch

OURS = "ssm_ext.causal_conv1d"
PEERS = {"causal_conv1d": "causal-conv1d"}
W = 4  # conv width


def _size(dtype):
    return torch.finfo(dtype).bits // 8


def _conv_case(b, D, L, dtype, layout, device):
    def seq():  # (b, D, L); channel-last as models make it, a transposed (b, L, D)
        if layout == "channel-last":
            return torch.randn(b, L, D, device=device, dtype=dtype).transpose(1, 2)
        return torch.randn(b, D, L, device=device, dtype=dtype)

    def make(mode):
        grad = mode == "fwd+bwd"
        t = {"x": seq().requires_grad_(grad),
             "weight": torch.randn(D, W, device=device, dtype=dtype).requires_grad_(grad),
             "bias": torch.randn(D, device=device, dtype=dtype).requires_grad_(grad)}
        if grad:
            t["dout"] = seq()  # same layout as out
        return t

    def impls(mods):
        return {k: (lambda t, m=m: m.causal_conv1d_fn(t["x"], t["weight"], t["bias"], activation="silu"))
                for k, m in mods.items()}

    n, s = b * D * L, _size(dtype)
    dt = str(dtype).removeprefix("torch.")
    return {"op": "causal_conv1d", "label": f"b{b} D{D} L{L} W{W} {dt} {layout}",
            "params": {"batch": b, "dim": D, "seqlen": L, "width": W, "dtype": dt, "layout": layout,
                       "bias": True, "activation": "silu"},
            # fwd: read x, write out; bwd adds read x, read dout, write dx (weights negligible)
            "modes": {"fwd": (2 * n * s, 2 * W * n), "fwd+bwd": (5 * n * s, 6 * W * n)},
            "make": make, "impls": impls}


def _update_case(b, D, dtype, device):
    def make(mode):
        return {"x": torch.randn(b, D, device=device, dtype=dtype),
                "conv_state": torch.randn(b, D, W - 1, device=device, dtype=dtype),
                "weight": torch.randn(D, W, device=device, dtype=dtype),
                "bias": torch.randn(D, device=device, dtype=dtype)}

    def impls(mods):
        return {k: (lambda t, m=m: m.causal_conv1d_update(t["x"], t["conv_state"], t["weight"], t["bias"],
                                                          activation="silu"))
                for k, m in mods.items()}

    s = _size(dtype)
    dt = str(dtype).removeprefix("torch.")
    return {"op": "causal_conv1d_update", "label": f"b{b} D{D} state{W - 1} W{W} {dt}",
            "params": {"batch": b, "dim": D, "state_len": W - 1, "width": W, "dtype": dt,
                       "bias": True, "activation": "silu"},
            # read x and state, write state and out
            "modes": {"fwd": ((2 * b * D + 2 * b * D * (W - 1)) * s, 2 * W * b * D)},
            "make": make, "impls": impls}


def cases(device, quick):
    # CPU sizes are tiny: they only smoke-test the runner
    (b, D, L), (ub, uD) = ((8, 4096, 4096), (64, 8192)) if device.type == "cuda" else ((2, 64, 256), (4, 64))
    out = [_conv_case(b, D, L, torch.bfloat16, "channel-first", device),
           _conv_case(b, D, L, torch.bfloat16, "channel-last", device)]
    if not quick:
        out.append(_conv_case(b, D, L, torch.float32, "channel-first", device))
    out.append(_update_case(ub, uD, torch.bfloat16, device))
    return out
