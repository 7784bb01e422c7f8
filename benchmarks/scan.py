"""scan: the issue's sizes, ours against Quick SSM's Triton scan (x, a, b, c in (B, L, D)) and
accelerated-scan's Triton `scalar` and CUDA `warp` kernels (gates, tokens in (B, C, T))."""
import torch

OURS = "ssm_ext.quick_ssm"
ACC_PEERS = {"accelerated_scan.scalar": "accelerated-scan", "accelerated_scan.warp": "accelerated-scan"}
PEERS = {"quick_ssm": "quick_ssm", **ACC_PEERS}
WARP_BF16 = ("not run: its bf16 path crashed with an illegal memory access, which would poison the CUDA "
             "context for the rest of the run")


def _size(dtype):
    return torch.finfo(dtype).bits // 8


def _quick_ssm_case(B, L, D, dtype, device):
    def make(mode):
        grad = mode == "fwd+bwd"
        t = {k: torch.randn(B, L, D, device=device, dtype=dtype) for k in "xbc"}
        t["a"] = torch.rand(B, L, D, device=device, dtype=dtype)  # decay in (0, 1): h stays bounded at any L
        for v in t.values():
            v.requires_grad_(grad)
        if grad:
            t["dout"] = torch.randn(B, L, D, device=device, dtype=dtype)
        return t

    def impls(mods):  # ours and Quick SSM share the signature; both in checkpoint mode (no (B, L, D) state kept)
        return {k: (lambda t, m=m: m.scan(t["x"], t["a"], t["b"], t["c"], checkpoint=True))
                for k, m in mods.items() if k not in ACC_PEERS}

    n, s = B * L * D, _size(dtype)
    dt = str(dtype).removeprefix("torch.")
    return {"op": "scan", "label": f"B{B} L{L} D{D} {dt}",
            "params": {"batch": B, "seqlen": L, "dim": D, "dtype": dt, "layout": "B L D", "checkpoint": True},
            # fwd: read x, a, b, c, write y. A single-pass backward recomputes h in-tile from per-tile
            # carries (a few MB), so it reads x, a, b, c, dy and writes dx, da, db, dc: 5 + 9 passes.
            # FLOPs: u = b*x, h = a*h + u, y = c*h (4); backward recomputes h (3), dh = c*dy + a*dh (3),
            # and dx, da, db, dc (4).
            "modes": {"fwd": (5 * n * s, 4 * n), "fwd+bwd": (14 * n * s, 14 * n)},
            "peak_mem": ("fwd+bwd",), "make": make, "impls": impls}


def _accelerated_scan_case(B, C, T, dtype, device):
    def make(mode):
        grad = mode == "fwd+bwd"
        t = {"gates": torch.rand(B, C, T, device=device, dtype=dtype).requires_grad_(grad),
             "tokens": torch.randn(B, C, T, device=device, dtype=dtype).requires_grad_(grad)}
        if grad:
            t["dout"] = torch.randn(B, C, T, device=device, dtype=dtype)
        return t

    def impls(mods):
        fns = {k: (lambda t, m=m: m.scan(t["gates"], t["tokens"])) for k, m in mods.items() if k in ACC_PEERS}
        if dtype == torch.bfloat16 and "accelerated_scan.warp" in fns:
            fns["accelerated_scan.warp"] = WARP_BF16
        for k in mods:
            if k not in PEERS:  # ours, through its accelerated_scan twin (pure Python over the same op)
                from ssm_ext.compat.accelerated_scan import scan
                fns[k] = lambda t: scan(t["gates"], t["tokens"])
        return fns

    n, s = B * C * T, _size(dtype)
    dt = str(dtype).removeprefix("torch.")
    return {"op": "accelerated_scan", "label": f"B{B} C{C} T{T} {dt}",
            "params": {"batch": B, "channels": C, "seqlen": T, "dtype": dt, "layout": "B C T"},
            # fwd: read gates, tokens, write out; bwd reads gates, out (= h), dout, writes dgates, dtokens
            "modes": {"fwd": (3 * n * s, 2 * n), "fwd+bwd": (8 * n * s, 7 * n)},
            "make": make, "impls": impls}


def cases(device, quick):
    if device.type == "cuda":
        sizes, acc = [(8, 4096, 1536), (1, 1 << 20, 256)], (8, 1536, 4096)
    else:  # tiny sizes: they only smoke-test the runner
        sizes, acc = [(2, 64, 32)], (2, 32, 64)
    if quick:  # without L = 1M, where Quick SSM takes about half a second a call
        sizes = sizes[:1]
    dtypes = (torch.float32, torch.bfloat16)
    return ([_quick_ssm_case(*size, dt, device) for size in sizes for dt in dtypes]
            + [_accelerated_scan_case(*acc, dt, device) for dt in dtypes])
