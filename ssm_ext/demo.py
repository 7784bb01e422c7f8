"""`python -m ssm_ext.demo`: run every op family on CUDA (when built and present) or the CPU,
check each against its float64 reference, and time it at a moderate size.

Each family is one function in FAMILIES taking a `Demo`; it calls `demo.check` and `demo.time`.
Exit code 1 when any check fails.
"""
import statistics
import sys
import time

import torch

import ssm_ext
from ssm_ext.causal_conv1d import causal_conv1d_fn, causal_conv1d_update, causal_conv1d_varlen_states
from ssm_ext.hstu_bsa import hstu_attention, triton_hstu_attention_with_bsa
from ssm_ext.issm import ISSM_chunk_scan_combined
from ssm_ext.norm import rmsnorm_fn
from ssm_ext.quick_ssm import scan as quick_scan
from ssm_ext.quick_ssm import scan_step
from ssm_ext.reference import causal_conv1d as ref_conv
from ssm_ext.reference import hstu_bsa as ref_hstu
from ssm_ext.reference import issm as ref_issm
from ssm_ext.reference import norm as ref_norm
from ssm_ext.reference import scan as ref_scan

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


class Demo:
    def __init__(self, device):
        self.device, self.cuda = device, device == "cuda"
        self.dtypes = [torch.float32, torch.bfloat16] if self.cuda else [torch.float32]
        self.bench_dtype = torch.bfloat16 if self.cuda else torch.float32
        self.failures = 0

    def randn(self, *shape, dtype=torch.float32, channel_last=False):
        """(b, D, L)-shaped tensor; channel_last makes it D-contiguous."""
        if channel_last:
            shape = shape[:-2] + (shape[-1], shape[-2])
        t = torch.randn(*shape, dtype=dtype, device=self.device)
        return t.transpose(-1, -2) if channel_last else t

    def check(self, name, got, want, tol):
        got, want = got.detach().double().cpu(), want.detach().double().cpu()
        err = (got - want).norm().item() / max(want.norm().item(), 1e-30)
        ok = got.shape == want.shape and err <= tol
        self.failures += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<56} rel err {err:.1e} (tol {tol:.0e})")

    def time(self, name, fn, reps=10, warmup=3):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(); fn(); end.record(); end.synchronize()
                times.append(start.elapsed_time(end) * 1e3)
            else:
                t0 = time.perf_counter(); fn(); times.append((time.perf_counter() - t0) * 1e6)
        print(f"  time  {name:<56} {statistics.median(times):10.1f} us")


def causal_conv1d(d):
    b, D, L, W = 2, 64, 97, 4
    print(f"  checks: x ({b}, {D}, {L}), width {W}, bias, silu, seq_idx, initial_states")
    for dtype in d.dtypes:
        tol = TOL[dtype]
        for cl in (False, True):
            tag = f"{str(dtype)[6:]} {'channel-last' if cl else 'channel-first'}"
            x = d.randn(b, D, L, dtype=dtype, channel_last=cl).requires_grad_()
            w = d.randn(D, W, dtype=dtype).requires_grad_()
            bias = d.randn(D, dtype=dtype).requires_grad_()
            init = d.randn(b, D, W - 1, dtype=dtype, channel_last=cl).requires_grad_()
            seq = (torch.rand(b, L, device=d.device) < 0.05).cumsum(1).int()
            out, final = causal_conv1d_fn(x, w, bias, seq, init, return_final_states=True, activation="silu")
            gout, gfinal = torch.randn_like(out), torch.randn_like(final)
            grads = torch.autograd.grad([out, final], [x, w, bias, init], [gout, gfinal])
            leaves = [t.detach().double().requires_grad_() for t in (x, w, bias, init)]
            r_out, r_final = ref_conv.causal_conv1d(leaves[0], leaves[1], leaves[2], seq, leaves[3], "silu")
            r_grads = torch.autograd.grad([r_out, r_final], leaves, [gout.double(), gfinal.double()])
            d.check(f"causal_conv1d_fn {tag} out", out, r_out, tol)
            d.check(f"causal_conv1d_fn {tag} final_states", final, r_final, 0.0)
            for n, g, rg in zip(("dx", "dweight", "dbias", "dinitial_states"), grads, r_grads):
                d.check(f"causal_conv1d_fn {tag} {n}", g, rg, tol)
        # prefill with return_final_states, then decode token by token from the returned state
        steps = 5
        x = d.randn(b, D, L + steps, dtype=dtype)
        w, bias = d.randn(D, W, dtype=dtype), d.randn(D, dtype=dtype)
        out, state = causal_conv1d_fn(x[..., :L], w, bias, return_final_states=True, activation="silu")
        ys = [causal_conv1d_update(x[..., L + t], state, w, bias, "silu") for t in range(steps)]
        r_out, r_final = ref_conv.causal_conv1d(x, w, bias, activation="silu")
        d.check(f"prefill + {steps} x causal_conv1d_update {str(dtype)[6:]} out",
                torch.cat([out, torch.stack(ys, -1)], -1), r_out, tol)
        d.check(f"prefill + {steps} x causal_conv1d_update {str(dtype)[6:]} conv_state", state, r_final, 0.0)
        lens = torch.tensor([0, 1, 7, 40, 3])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32).to(d.device)
        xv = d.randn(int(lens.sum()), D, dtype=dtype)
        d.check(f"causal_conv1d_varlen_states {str(dtype)[6:]}", causal_conv1d_varlen_states(xv, cu, 6),
                ref_conv.causal_conv1d_varlen_states(xv, cu, 6), 0.0)

    # timings at a moderate size
    dt = d.bench_dtype
    b, D, L = (4, 2048, 4096) if d.cuda else (2, 256, 512)
    print(f"  timings: x ({b}, {D}, {L}) {str(dt)[6:]}, width {W}, bias, silu")
    w, bias = d.randn(D, W, dtype=dt).requires_grad_(), d.randn(D, dtype=dt).requires_grad_()
    for cl in (False, True):
        layout = "channel-last" if cl else "channel-first"
        x = d.randn(b, D, L, dtype=dt, channel_last=cl).requires_grad_()
        gout = torch.randn_like(x)
        d.time(f"causal_conv1d_fn {layout} fwd", lambda: causal_conv1d_fn(x, w, bias, activation="silu"))
        d.time(f"causal_conv1d_fn {layout} fwd+bwd", lambda: torch.autograd.grad(
            causal_conv1d_fn(x, w, bias, activation="silu"), [x, w, bias], gout))
    bu, Du = (64, 8192) if d.cuda else (8, 512)
    xu, state = d.randn(bu, Du, dtype=dt), d.randn(bu, Du, W - 1, dtype=dt)
    wu, bu_ = d.randn(Du, W, dtype=dt), d.randn(Du, dtype=dt)
    d.time(f"causal_conv1d_update ({bu}, {Du})", lambda: causal_conv1d_update(xu, state, wu, bu_, "silu"))


def scan(d):
    B, L, D = 2, 300, 48
    print(f"  checks: (B, L, D) = ({B}, {L}, {D}), initial and final state, checkpoint on/off")
    for dtype in d.dtypes:
        tol = TOL[dtype]
        x, b, c = (torch.randn(B, L, D, device=d.device, dtype=dtype).requires_grad_() for _ in range(3))
        a = torch.rand(B, L, D, device=d.device, dtype=dtype).requires_grad_()
        h0 = torch.randn(B, D, device=d.device).requires_grad_()
        leaves = [t.detach().double().requires_grad_() for t in (x, a, b, c, h0)]
        r_y, r_h = ref_scan.scan(*leaves)
        gy, gh = torch.randn_like(r_y), torch.randn_like(r_h)
        r_grads = torch.autograd.grad([r_y, r_h], leaves, [gy, gh])
        for ckpt in (True, False):
            tag = f"{str(dtype)[6:]} checkpoint={ckpt}"
            y, h = quick_scan(x, a, b, c, checkpoint=ckpt, initial_state=h0, return_final_state=True)
            grads = torch.autograd.grad([y, h], [x, a, b, c, h0], [gy.to(y.dtype), gh.float()])
            d.check(f"scan {tag} y", y, r_y, tol)
            d.check(f"scan {tag} final state", h, r_h, tol)
            for n, g, rg in zip(("dx", "da", "db", "dc", "dinitial_state"), grads, r_grads):
                d.check(f"scan {tag} {n}", g, rg, tol)
        h = h0.detach().float()
        ys = []
        for t in range(L):
            y_t, h = scan_step(h, x[:, t].detach(), a[:, t].detach(), b[:, t].detach(), c[:, t].detach())
            ys.append(y_t)
        d.check(f"scan_step x {L} {str(dtype)[6:]}", torch.stack(ys, 1), r_y, tol)
    dt = d.bench_dtype
    B, L, D = (8, 4096, 1536) if d.cuda else (2, 512, 256)
    print(f"  timings: (B, L, D) = ({B}, {L}, {D}) {str(dt)[6:]}")
    x, a, b, c = (torch.rand(B, L, D, device=d.device, dtype=dt).requires_grad_() for _ in range(4))
    gy = torch.randn_like(x)
    d.time("scan fwd", lambda: quick_scan(x, a, b, c))
    d.time("scan fwd+bwd (checkpoint)", lambda: torch.autograd.grad(quick_scan(x, a, b, c), [x, a, b, c], gy))


def issm(d):
    b, L, H, G, P, N = 2, 100, 4, 2, 8, 16
    print(f"  checks: x ({b}, {L}, {H}, {P}), dstate {N}, {G} groups, D, z, dt_bias, softplus, "
          "initial and final states; gated RMSNorm")
    for dtype in d.dtypes:
        tol = TOL[dtype]
        dev = d.device
        x, z = (torch.randn(b, L, H, P, device=dev, dtype=dtype).requires_grad_() for _ in range(2))
        dt = (torch.randn(b, L, H, N, device=dev) - 1).to(dtype).requires_grad_()
        B, C = (torch.randn(b, L, G, N, device=dev, dtype=dtype).requires_grad_() for _ in range(2))
        A = (-torch.rand(H, N, device=dev) - 0.5).requires_grad_()
        D, dt_bias = torch.randn(H, P, device=dev).requires_grad_(), torch.randn(H, device=dev).requires_grad_()
        h0 = torch.randn(b, H, P, N, device=dev).requires_grad_()
        ins = [x, dt, A, B, C, D, z, dt_bias, h0]
        leaves = [t.detach().double().requires_grad_() for t in ins]
        r_out, r_fs = ref_issm.issm_chunk_scan(*leaves[:5], D=leaves[5], z=leaves[6], dt_bias=leaves[7],
                                               initial_states=leaves[8], dt_softplus=True)
        g_out, g_fs = torch.randn_like(r_out), torch.randn_like(r_fs)
        r_grads = torch.autograd.grad([r_out, r_fs], leaves, [g_out, g_fs])
        out, fs = ISSM_chunk_scan_combined(x, dt, A, B, C, 64, D=D, z=z, dt_bias=dt_bias, initial_states=h0,
                                           dt_softplus=True, return_final_states=True)
        grads = torch.autograd.grad([out, fs], ins, [g_out.to(out.dtype), g_fs.float()])
        tag = str(dtype)[6:]
        d.check(f"issm {tag} out", out, r_out, tol)
        d.check(f"issm {tag} final states", fs, r_fs, 1e-5)
        for n, g, rg in zip(("dx", "ddt", "dA", "dB", "dC", "dD", "dz", "ddt_bias", "dinitial_states"), grads,
                            r_grads):
            d.check(f"issm {tag} {n}", g, rg, tol)
        y = out.detach().reshape(b, L, H * P)
        w = torch.randn(H * P, device=dev)
        d.check(f"rmsnorm_gated {tag}", rmsnorm_fn(y, w, None, z.detach().reshape(y.shape), 1e-5, P, False),
                ref_norm.rmsnorm_gated(y, w, None, z.detach().reshape(y.shape), 1e-5, P, False), tol)
    dt_ = d.bench_dtype
    b, L, H, P, N = (8, 1024, 8, 36, 128) if d.cuda else (2, 512, 8, 36, 64)
    print(f"  timings: x ({b}, {L}, {H}, {P}), dstate {N}, initial and final states, {str(dt_)[6:]}")
    x = torch.randn(b, L, H, P, device=d.device, dtype=dt_).requires_grad_()
    dt = (0.1 * torch.rand(b, L, H, N, device=d.device)).to(dt_).requires_grad_()
    B, C = (torch.randn(b, L, 1, N, device=d.device, dtype=dt_).requires_grad_() for _ in range(2))
    A = (-torch.rand(H, N, device=d.device)).requires_grad_()
    h0 = torch.randn(b, H, P, N, device=d.device).requires_grad_()

    def run():
        return ISSM_chunk_scan_combined(x, dt, A, B, C, 128, initial_states=h0, return_final_states=True)

    out, fs = run()
    g = [torch.randn_like(out), torch.randn_like(fs)]
    d.time("ISSM_chunk_scan_combined fwd", run)
    d.time("ISSM_chunk_scan_combined fwd+bwd", lambda: torch.autograd.grad(run(), [x, dt, A, B, C, h0], g))


def hstu_bsa(d):
    H, da, dl, bs, counts, window = 2, 16, 12, 4, 3, 5
    lens = [1, 9, 30, 0, 17]
    n = max(lens)
    off = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=d.device)
    T = sum(lens)
    print(f"  checks: lengths {lens}, H {H}, dqk {da}, dv {dl}, block_size {bs}, block_counts {counts}, "
          f"window {window}, attn_mask")
    mask = (torch.rand(len(lens), n, n, device=d.device) < 0.8).float()
    for dtype in d.dtypes:
        tol = TOL[dtype]
        q, k = (torch.randn(T, H * da, device=d.device, dtype=dtype).requires_grad_() for _ in range(2))
        v, u = (torch.randn(T, H * dl, device=d.device, dtype=dtype).requires_grad_() for _ in range(2))
        gates = torch.rand(T, H, 3, device=d.device).requires_grad_()
        out, _, _ = triton_hstu_attention_with_bsa(H, da, dl, q, k, v, u, off, mask, gates, block_counts=counts,
                                                   block_size=bs, window_size=window, attn_mask=mask)
        idx = torch.ops.ssm_ext.hstu_bsa_topk(q.detach(), k.detach(), off, n, H, da ** -0.5, bs, counts)
        leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v, u, gates)]
        r_out, _ = ref_hstu.hstu_bsa(*leaves, off.cpu(), n, H, bs, counts, window, attn_mask=mask.cpu(),
                                     block_idx=idx.cpu())
        gout = torch.randn_like(r_out)
        grads = torch.autograd.grad(out, [q, k, v, u, gates], gout.to(d.device, dtype))
        r_grads = torch.autograd.grad(r_out, leaves, gout)
        tag = str(dtype)[6:]
        d.check(f"triton_hstu_attention_with_bsa {tag} out", out, r_out, tol)
        for name, g, rg in zip(("dq", "dk", "dv", "du", "dgates"), grads, r_grads):
            d.check(f"triton_hstu_attention_with_bsa {tag} {name}", g, rg, 2 * tol)
        d.check(f"hstu_bsa_topk {tag} == reference", idx.cpu().double(),
                ref_hstu.select_blocks(q.detach().cpu(), k.detach().cpu(), off.cpu(), H, bs, counts).double(), 0.0)
        dense, _, _ = hstu_attention(H, da, dl, q, k, v, off, mask, attn_mask=mask)
        d.check(f"hstu_attention {tag} out", dense,
                ref_hstu.hstu_attention(*leaves[:3], off.cpu(), n, H, attn_mask=mask.cpu()), tol)
    dt = d.bench_dtype
    B, L, H, da, bs, counts, window = (8, 4096, 4, 128, 64, 16, 512) if d.cuda else (4, 512, 2, 64, 32, 4, 64)
    print(f"  timings: {B} sequences of {L}, H {H}, dqk = dv = {da}, {str(dt)[6:]}, block_size {bs}, "
          f"block_counts {counts}, window {window}")
    off = torch.arange(B + 1, device=d.device) * L
    q, k, v, u = (torch.randn(B * L, H * da, device=d.device, dtype=dt).requires_grad_() for _ in range(4))
    gates = torch.rand(B * L, H, 3, device=d.device)
    size = torch.empty(0, L, L, device=d.device)
    gout = torch.randn(B * L, H * da, device=d.device, dtype=dt)

    def sparse():
        return triton_hstu_attention_with_bsa(H, da, da, q, k, v, u, off, size, gates, block_counts=counts,
                                              block_size=bs, window_size=window)[0]

    def dense():
        return hstu_attention(H, da, da, q, k, v, off, size)[0]

    d.time("hstu_attention (dense) fwd", dense, reps=3, warmup=1)
    d.time("hstu_attention (dense) fwd+bwd", lambda: torch.autograd.grad(dense(), [q, k, v], gout), reps=3, warmup=1)
    d.time("triton_hstu_attention_with_bsa fwd", sparse, reps=3, warmup=1)
    d.time("triton_hstu_attention_with_bsa fwd+bwd", lambda: torch.autograd.grad(sparse(), [q, k, v, u], gout),
           reps=3, warmup=1)


FAMILIES = [causal_conv1d, scan, issm, hstu_bsa]


def main():
    cuda = torch.cuda.is_available() and ssm_ext.has_cuda_kernels()
    device = "cuda" if cuda else "cpu"
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"ssm_ext {ssm_ext.__version__}, torch {torch.__version__}, device: {device} ({name})")
    if torch.cuda.is_available() and not cuda:
        print("note: a GPU is present but ssm_ext was built without CUDA kernels; running on the CPU")
    torch.manual_seed(0)
    demo = Demo(device)
    for family in FAMILIES:
        print(f"\n{family.__name__}")
        family(demo)
    print(f"\n{'all checks passed' if demo.failures == 0 else f'{demo.failures} check(s) FAILED'}")
    return 1 if demo.failures else 0


if __name__ == "__main__":
    sys.exit(main())
