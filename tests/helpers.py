"""Shared test helpers (no test functions here)."""

import torch

_TINY = 1e-30


def rel_err(out, ref):
    """||out - ref|| / max(||ref||, tiny), computed in float64 on the CPU."""
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    num = torch.linalg.vector_norm(out64 - ref64).item()
    den = max(torch.linalg.vector_norm(ref64).item(), _TINY)
    return num / den


def assert_rel(out, ref, tol, what="output"):
    assert torch.isfinite(out.detach().float()).all(), f"{what}: non-finite values"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def make_x(b, D, L, dtype=torch.float32, device="cpu", channel_last=False):
    """x of shape (b, D, L); channel-last means stride(1) == 1 (made as (b, L, D).transpose(1, 2))."""
    if channel_last:
        return torch.randn(b, L, D, dtype=dtype, device=device).transpose(1, 2)
    return torch.randn(b, D, L, dtype=dtype, device=device)


def make_seq_idx(b, L, device="cpu", padding=True, max_run=6):
    """(b, L) int32 sequence ids: several sequences per row (ids increasing from 0), with runs
    of -1 padding between / before / after sequences when ``padding``."""
    rows = []
    for _ in range(b):
        r, sid = [], 0
        while len(r) < L:
            n = int(torch.randint(1, max_run + 1, ()))
            if padding and torch.rand(()) < 0.25:
                r += [-1] * n
            else:
                r += [sid] * n
                sid += 1
        rows.append(r[:L])
    if b == 0:
        return torch.zeros(0, L, dtype=torch.int32, device=device)
    return torch.tensor(rows, dtype=torch.int32, device=device)


def tol_for(dtype):
    return 1e-5 if dtype == torch.float32 else (1e-10 if dtype == torch.float64 else 1e-2)


def schema_args(op, values):
    """Positional arguments for `op` in its schema order, taken by name from `values`, so that
    opcheck tests follow the registered schema."""
    names = [a.name for a in op._schema.arguments]
    missing = [n for n in names if n not in values]
    assert not missing, f"{op}: no test value for schema arguments {missing}"
    return tuple(values[n] for n in names)
