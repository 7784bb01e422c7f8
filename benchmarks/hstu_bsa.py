"""hstu_bsa: HSTU attention, dense and block-sparse, bf16, 8 sequences x 4 heads x d 128.

Rows
- hstu_attn: our dense causal op (ops.hstu_attn_fwd, jagged (T, H*d), every sequence L long)
  against torch's flash SDPA (causal, (8, 4, L, 128), the flash backend forced) on the same
  tokens. SDPA reads q, k, v as strided (B, H, L, d) views of the jagged tensors and its output
  is returned as (T, H*d) without a copy (flash writes (B, L, H, d)).
- hstu_bsa: the public triton_hstu_attention_with_bsa (top-k selection + block-sparse attention,
  plus its padded_q / padded_k copies), block_size 64, block_counts 16, window 512, gates as a
  tensor, against the public dense hstu_attention on the same inputs (the "ssm_ext_dense"
  column: dense time / sparse time, the speedup), on random q, k ("random": neighbouring queries
  select unrelated blocks) and on q, k with a shared slowly varying positional component
  ("local": neighbouring queries select neighbouring blocks, as in sequence data).

Floors (ALGORITHMS.md section 1): dense fwd 2 L^2 d FLOPs per (sequence, head) (QK^T and PV over
the causal half), fwd+bwd 3.5x that; bytes q, k, v, out (fwd) and + dout, dq, dk, dv (fwd+bwd).
Sparse: 4 d FLOPs per (query, key) pair visited, counting per query min(16, own + 1) blocks of
64 keys (at most t + 1 keys), min(512, t + 1) window keys and t / 64 block means, overlaps
counted twice (the kernels do compute them twice); bytes q, k, v, u, out, gates, block_idx
(fwd) and + dout, dq, dk, dv, du, dgates (fwd+bwd).
"""
import math

import torch

OURS = "ssm_ext.hstu_bsa"
PEERS = {}
H, D = 4, 128
BS, COUNTS, WINDOW = 64, 16, 512


def _sdpa(t, B, L):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (t[x].view(B, L, H, D).transpose(1, 2) for x in "qkv")
    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(backends):
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return o.transpose(1, 2).reshape(B * L, H * D)


def _positional(B, L, device):
    """(B*L, H*D) slowly varying features of the position (frequencies 1/4096 .. 1/256 rad per
    row): q_t . k_j is largest for nearby t, j. With it, a 128-query tile selects about 20
    distinct blocks at block_size 64 and block_counts 16 (on random q, k: every earlier block)."""
    pos = torch.arange(L, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.linspace(math.log(1 / 4096), math.log(1 / 256), D // 2, device=device))
    return torch.cat([torch.sin(pos * freq), torch.cos(pos * freq)], 1).repeat(B, H)


def _make(B, L, dtype, device, with_u, local=False):
    def make(mode):
        grad = mode == "fwd+bwd"
        T = B * L
        t = {x: torch.randn(T, H * D, device=device) * 0.5 for x in "qkv"}
        if local:  # neighbouring queries select neighbouring blocks (sequence data with locality)
            code = _positional(B, L, device)
            t["q"] += code
            t["k"] += code
        t = {x: y.to(dtype).requires_grad_(grad) for x, y in t.items()}
        if with_u:
            t["u"] = torch.randn(T, H * D, device=device, dtype=dtype).requires_grad_(grad)
            t["gates"] = torch.rand(T, H, 3, device=device, dtype=dtype).requires_grad_(grad)
        t["off"] = torch.arange(B + 1, device=device, dtype=torch.int64) * L
        if grad:
            t["dout"] = torch.randn(T, H * D, device=device, dtype=dtype)
        return t
    return make


def _dense_case(B, L, dtype, device):
    import ssm_ext  # noqa: F401
    ops = torch.ops.ssm_ext
    alpha = 1.0 / math.sqrt(D)

    def impls(mods):
        fns = {"torch_sdpa_flash": lambda t: _sdpa(t, B, L)}
        if "ssm_ext" in mods:
            fns["ssm_ext"] = lambda t: ops.hstu_attn_fwd(t["q"], t["k"], t["v"], t["off"], L, H, alpha, None)
        return fns

    s = torch.finfo(dtype).bits // 8
    tensor = B * L * H * D * s
    flops = 2.0 * L * L * D * B * H
    dt = str(dtype).removeprefix("torch.")
    return {"op": "hstu_attn", "label": f"B{B} H{H} L{L} d{D} {dt}",
            "params": {"batch": B, "heads": H, "seqlen": L, "dim": D, "dtype": dt, "causal": True},
            "modes": {"fwd": (4 * tensor, flops), "fwd+bwd": (11 * tensor, 3.5 * flops)},
            "peak_mem": ("fwd+bwd",), "make": _make(B, L, dtype, device, False), "impls": impls}


def _sparse_pairs(L):
    """(query, key) pairs the block-sparse kernels visit per (sequence, head)."""
    t = torch.arange(L, dtype=torch.float64)
    own = torch.floor(t / BS)
    slc = torch.minimum(torch.minimum(own + 1, torch.tensor(float(COUNTS))) * BS, t + 1)
    return float((slc + torch.clamp(t + 1, max=WINDOW) + torch.floor((t + 1) / BS)).sum())


def _sparse_case(B, L, dtype, device, local):
    from ssm_ext.hstu_bsa import hstu_attention, triton_hstu_attention_with_bsa

    def impls(mods):
        if "ssm_ext" not in mods:
            return {}
        inv = torch.zeros(1, 1, 1, device=device).expand(1, L, L)  # only its size is used
        return {
            "ssm_ext": lambda t: triton_hstu_attention_with_bsa(
                H, D, D, t["q"], t["k"], t["v"], t["u"], t["off"], inv, t["gates"], block_counts=COUNTS,
                block_size=BS, window_size=WINDOW)[0],
            "ssm_ext_dense": lambda t: hstu_attention(H, D, D, t["q"], t["k"], t["v"], t["off"], inv)[0],
        }

    s = torch.finfo(dtype).bits // 8
    tensor = B * L * H * D * s
    small = B * L * H * (3 * s + 4 * COUNTS)  # gates, block_idx
    flops = 4.0 * D * _sparse_pairs(L) * B * H
    dt = str(dtype).removeprefix("torch.")
    data = "local" if local else "random"
    return {"op": "hstu_bsa", "label": f"B{B} H{H} L{L} d{D} bs{BS} k{COUNTS} w{WINDOW} {dt} {data}",
            "params": {"batch": B, "heads": H, "seqlen": L, "dim": D, "dtype": dt, "block_size": BS,
                       "block_counts": COUNTS, "window_size": WINDOW, "data": data},
            "modes": {"fwd": (5 * tensor + small, flops), "fwd+bwd": (14 * tensor + 2 * small, 3.5 * flops)},
            "peak_mem": ("fwd+bwd",), "make": _make(B, L, dtype, device, True, local), "impls": impls}


def cases(device, quick):
    if device.type == "cuda":
        lengths = [1024, 4096] if quick else [1024, 2048, 4096, 8192, 16384]
        B, dtype = 8, torch.bfloat16
    else:  # tiny sizes: they only smoke-test the runner
        lengths, B, dtype = [128], 2, torch.float32
    return ([_dense_case(B, L, dtype, device) for L in lengths]
            + [_sparse_case(B, L, dtype, device, local) for local in (False, True) for L in lengths])
