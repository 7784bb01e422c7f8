"""Runs each causal_conv1d CUDA kernel a few times at the benchmark size, for ncu / nsys."""
import torch

from ssm_ext.causal_conv1d import causal_conv1d_fn, causal_conv1d_update

b, D, L, W = 8, 4096, 4096, 4
dt = torch.bfloat16
w = torch.randn(D, W, device="cuda", dtype=dt, requires_grad=True)
bias = torch.randn(D, device="cuda", dtype=dt, requires_grad=True)
for layout in ("channel-first", "channel-last"):
    x = (torch.randn(b, L, D, device="cuda", dtype=dt).transpose(1, 2) if layout == "channel-last"
         else torch.randn(b, D, L, device="cuda", dtype=dt)).requires_grad_()
    for _ in range(3):
        y = causal_conv1d_fn(x, w, bias, activation="silu")
        y.backward(torch.randn_like(y))
state = torch.randn(64, 8192, W - 1, device="cuda", dtype=dt)
for _ in range(3):
    causal_conv1d_update(torch.randn(64, 8192, device="cuda", dtype=dt), state, w.detach()[:1].expand(8192, W),
                         bias.detach()[:1].expand(8192), activation="silu")
torch.cuda.synchronize()
