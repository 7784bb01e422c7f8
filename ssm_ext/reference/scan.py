"""Float64 step-by-step reference for the first-order scan (SPEC.md section 2).

Everything is computed in float64 with an explicit loop over time (vectorised over batch
and channels only).  Nothing here calls a cumulative op or shares code with the kernels.
The functions are differentiable with ordinary autograd (no in-place writes into tensors
that need gradients), so the tests use them as the gradient reference.

Semantics (from API_scan.txt), all tensors (B, L, D):

    h_{-1} = initial_state (B, D) or 0
    h_t    = a_t * h_{t-1} + b_t * x_t        (b None means b = 1)
    y_t    = c_t * h_t                         (c None means c = 1)
    final_state = h_{L-1}  (= h_{-1} when L == 0)
"""

import torch

__all__ = ["scan", "scan_step"]

_F64 = torch.float64


def _as64(t):
    return None if t is None else t.to(_F64)


def scan_step(h, x_t, a_t, b_t=None, c_t=None):
    """One step of the recurrence on (B, D) tensors, in float64.

    Returns ``(y_t, h_t)`` with ``h_t = a_t * h + b_t * x_t`` and ``y_t = c_t * h_t``
    (``b_t`` / ``c_t`` None mean 1; ``h`` None means 0).
    """
    x64, a64 = _as64(x_t), _as64(a_t)
    assert x64.shape == a64.shape, f"a_t shape {tuple(a64.shape)} != x_t shape {tuple(x64.shape)}"
    u = x64 if b_t is None else _as64(b_t) * x64
    h_new = u if h is None else a64 * _as64(h) + u
    y = h_new if c_t is None else _as64(c_t) * h_new
    return y, h_new


def scan(x, a, b=None, c=None, initial_state=None):
    """Reference first-order scan.

    x, a, b, c: (B, L, D), any float dtype / strides / device; b, c may be None (= 1).
    initial_state: (B, D) or None (= 0).
    Returns ``(y, final_state)``, both float64: y (B, L, D), final_state (B, D).
    """
    assert x.dim() == 3, "x must be (B, L, D)"
    Bsz, L, D = x.shape
    for name, t in (("a", a), ("b", b), ("c", c)):
        if t is not None:
            assert tuple(t.shape) == (Bsz, L, D), f"{name} shape {tuple(t.shape)} != x shape {(Bsz, L, D)}"
    x64, a64, b64, c64 = _as64(x), _as64(a), _as64(b), _as64(c)
    if initial_state is None:
        h = torch.zeros(Bsz, D, dtype=_F64, device=x.device)
    else:
        assert tuple(initial_state.shape) == (Bsz, D), \
            f"initial_state shape {tuple(initial_state.shape)} != {(Bsz, D)}"
        h = _as64(initial_state)

    # unbind, not x64[:, t]: its backward stacks the step gradients once instead of adding
    # one (B, L, D) tensor per step
    steps = [None if t is None else t.unbind(1) for t in (x64, a64, b64, c64)]
    ys = []
    for t in range(L):
        y_t, h = scan_step(h, *(None if s is None else s[t] for s in steps))
        ys.append(y_t)
    if L == 0:
        y = torch.zeros(Bsz, 0, D, dtype=_F64, device=x.device)
    else:
        y = torch.stack(ys, dim=1)
    return y, h
