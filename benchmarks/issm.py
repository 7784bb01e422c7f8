"""issm: the ISSM chunked scan at the DEST3D and StreamPETR layer sizes, ours against fla's
`chunk_gla` (fla-org/flash-linear-attention, Triton; the same math with q = C, k = delta*B,
v = x, g = delta*A, per head: ALGORITHMS.md section 4) and DEST3D's `ISSM_chunk_scan_combined`
(OpenSpaceAI/DEST3D issm_triton, Triton; at the DEST3D size only).

The fla inputs (C broadcast to the heads, delta*B, delta*A) are made outside the timed call,
so fla's column times its kernels alone: a lower bound for a drop-in use. Both peers compute
fp32 products in TF32 (about 1e-3 off); ours stay at ~1e-5.

DEST3D's Triton kernels autotune for minutes at some shapes and may fail to compile: before
its column is timed, one call runs in a subprocess with a time limit (PEER_PROBE_S); a failure
or a timeout becomes a skip with the reason, never a crash or a hang of the whole run.
"""
import os
import subprocess
import sys

import torch

OURS = "ssm_ext.issm"
FLA = "fla.ops.gla.chunk"
DEST3D = "issm_triton.issm_combined"
PEERS = {FLA: "fla", DEST3D: "DEST3D"}
PEER_PROBE_S = int(os.environ.get("SSM_EXT_PEER_PROBE_S", "300"))
_probe_cache = {}


def _size(dtype):
    return torch.finfo(dtype).bits // 8


def _probe(key, script):
    """None if `script` (Python) runs in a fresh process within PEER_PROBE_S, else a reason."""
    if key not in _probe_cache:
        env = dict(os.environ)
        root = env.get("SSM_EXT_PEERS", "")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(root, "DEST3D"), env.get("PYTHONPATH")) if p)
        try:
            r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                               timeout=PEER_PROBE_S)
            tail = (r.stderr.strip().splitlines() or [""])[-1][:300]
            _probe_cache[key] = None if r.returncode == 0 else f"probe failed (rc {r.returncode}): {tail}"
        except subprocess.TimeoutExpired:
            _probe_cache[key] = f"probe call took over {PEER_PROBE_S} s (Triton autotuning/compiling): timed out"
    return _probe_cache[key]


def _dest3d_probe(b, L, H, P, N, chunk, dtype, mode):
    dt = str(dtype).removeprefix("torch.")
    return f"""
import torch
from issm_triton.issm_combined import ISSM_chunk_scan_combined as f
d, g = "cuda", {mode == "fwd+bwd"}
x = torch.randn({b}, {L}, {H}, {P}, device=d, dtype=torch.{dt}).requires_grad_(g)
dt = (0.05 + 0.5 * torch.rand({b}, {L}, {H}, {N}, device=d)).to(torch.{dt}).requires_grad_(g)
A = (-torch.exp(torch.rand({H}, {N}, device=d))).requires_grad_(g)
B = torch.randn({b}, {L}, 1, {N}, device=d, dtype=torch.{dt}).requires_grad_(g)
C = torch.randn({b}, {L}, 1, {N}, device=d, dtype=torch.{dt}).requires_grad_(g)
h0 = torch.randn({b}, {H}, {P}, {N}, device=d).requires_grad_(g)
y, fs = f(x, dt, A, B, C, {chunk}, D=None, initial_states=h0, return_final_states=True)
if g:
    y.backward(torch.randn_like(y))
torch.cuda.synchronize()
"""


def _case(name, b, L, H, P, N, chunk, dtype, device, init, dest3d):
    G = 1
    dt_name = str(dtype).removeprefix("torch.")

    def make(mode):
        grad = mode == "fwd+bwd"
        t = {"x": torch.randn(b, L, H, P, device=device, dtype=dtype),
             "dt": (0.05 + 0.5 * torch.rand(b, L, H, N, device=device)).to(dtype),
             "A": -torch.exp(torch.rand(H, N, device=device)),  # parameters in fp32, as the layers keep them
             "B": torch.randn(b, L, G, N, device=device, dtype=dtype),
             "C": torch.randn(b, L, G, N, device=device, dtype=dtype)}
        if init:
            t["h0"] = torch.randn(b, H, P, N, device=device)
        if device.type == "cuda":  # fla's inputs for the same problem
            with torch.no_grad():
                d = t["dt"].float()
                t["fla_q"] = t["C"].expand(b, L, H, N).contiguous()
                t["fla_k"] = (d * t["B"].float()).to(dtype)
                t["fla_g"] = d * t["A"]  # log-decay, fp32
        for v in t.values():
            v.requires_grad_(grad)
        if grad:
            t["dout"] = torch.randn(b, L, H, P, device=device, dtype=dtype)
        return t

    def impls(mods):
        fns = {}
        for k, m in mods.items():
            if k == FLA:
                if device.type != "cuda":
                    fns[k] = "CUDA only (Triton)"
                    continue
                fns[k] = lambda t, m=m: m.chunk_gla(t["fla_q"], t["fla_k"], t["x"], t["fla_g"], scale=1.0,
                                                    initial_state=t.get("h0"), output_final_state=True,
                                                    state_v_first=True)[0]
            elif k == DEST3D:
                if not dest3d:
                    fns[k] = "run at the DEST3D size only (its N = 256 autotuning takes minutes)"
                    continue
                fns[k] = lambda t, m=m: m.ISSM_chunk_scan_combined(
                    t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=None, initial_states=t.get("h0"),
                    return_final_states=True)[0]
            else:
                fns[k] = lambda t, m=m: m.ISSM_chunk_scan_combined(
                    t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=None, initial_states=t.get("h0"),
                    return_final_states=True)[0]
        return fns

    s = _size(dtype)
    X, DT, BC = b * L * H * P * s, b * L * H * N * s, 2 * b * L * G * N * s
    S = b * H * P * N * 4 if init else 0  # initial and final states, fp32
    # ALGORITHMS.md section 1: fwd reads x, dt, B, C, writes out (+ states). fwd+bwd adds a backward
    # that reads x, dt, B, C, dout and writes dx, ddt, dB, dC (+ dinitial_states).
    fwd_bytes = 2 * X + DT + BC + 2 * S
    bwd_bytes = 3 * X + 2 * DT + 2 * BC + 2 * S
    flops = 4 * b * L * H * P * N  # the recurrent form: s = a*s + k*x (2), y = C.s (2) per (p, n)
    case = {"op": "issm", "label": f"{name} b{b} L{L} H{H} P{P} N{N} {dt_name}",
            "params": {"batch": b, "seqlen": L, "nheads": H, "headdim": P, "dstate": N, "ngroups": G,
                       "chunk_size": chunk, "dtype": dt_name, "initial_states": init, "final_states": True},
            # fwd+bwd FLOPs: the backward is about twice the forward (recompute + adjoint)
            "modes": {"fwd": (fwd_bytes, flops), "fwd+bwd": (fwd_bytes + bwd_bytes, 3 * flops)},
            "make": make, "impls": impls, "peak_mem": ("fwd+bwd",)}
    if dest3d and device.type == "cuda":
        inner = impls

        def impls(mods):  # DEST3D's column only after its probes passed (both modes, cached)
            fns = inner(mods)
            if DEST3D in fns and not isinstance(fns[DEST3D], str):
                for mode in case["modes"]:
                    why = _probe((name, dt_name, mode),
                                 _dest3d_probe(b, L, H, P, N, chunk, dtype, mode))
                    if why:
                        fns[DEST3D] = why
                        break
            return fns

        case["impls"] = impls
    return case


def cases(device, quick):
    dtypes = (torch.float32, torch.bfloat16)
    if device.type != "cuda":  # tiny sizes: they only smoke-test the runner
        return [_case("tiny", 1, 64, 2, 4, 8, 32, torch.float32, device, True, False)]
    out = [_case("DEST3D", 8, 1024, 8, 36, 128, 128, dt, device, True, True) for dt in dtypes]
    if not quick:
        out += [_case("StreamPETR", 2, 4096, 8, 64, 256, 256, dt, device, False, False) for dt in dtypes]
    return out
