"""A bidirectional ISSM decoder layer in the style of DEST3D / StreamPETR's
`_SingleDirectionISSMLayer`, trained on a small synthetic 3-D task.

The queries are the scan's states (dstate = number of queries): each query's features become
its initial state, the points are the scan's inputs, and B, C and dt come from the 3-D offset
between every point and every query anchor, so each query decides which points it absorbs.
The points pass through a causal depthwise conv + silu (ssm_ext.causal_conv1d), the scan runs
over the serialised points in both directions, and the two outputs and final states are
averaged: the point features are updated from the scan output (gated RMSNorm with z), the
queries from the final states.

Task: every query must predict the Gaussian-weighted mean (sigma 0.3) of a value field sampled
at the points around its anchor. Runs on the GPU when ssm_ext's ISSM CUDA kernel is
registered, else on the CPU.

    python examples/issm_decoder_layer.py [--steps 40] [--points 300] [--queries 32]
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssm_ext.causal_conv1d import causal_conv1d_fn
from ssm_ext.compat.issm_triton.issm_combined import ISSM_chunk_scan_combined
from ssm_ext.compat.issm_triton.layernorm_gated import RMSNorm as RMSNormGated


class BiISSMDecoderLayer(nn.Module):
    def __init__(self, d_model=64, expand=2, num_heads=4, d_conv=4, d_dist=16, chunk_size=64,
                 dt_min=0.001, dt_max=0.1, A_init_range=(1.0, 16.0)):
        super().__init__()
        self.d_inner = expand * d_model
        self.nheads, self.headdim = num_heads, self.d_inner // num_heads
        self.chunk_size = chunk_size
        # per point: z (gate), x and the two scalar B/C biases (through the conv), a dt bias per head
        self.key_proj = nn.Linear(d_model, 2 * self.d_inner + 2 + num_heads, bias=False)
        conv_dim = self.d_inner + 2
        self.conv_w = nn.ParameterList(nn.Parameter(torch.randn(conv_dim, d_conv) / math.sqrt(d_conv))
                                       for _ in range(2))          # one conv per scan direction
        self.conv_b = nn.ParameterList(nn.Parameter(torch.zeros(conv_dim)) for _ in range(2))
        self.query_proj = nn.Linear(d_model, self.d_inner, bias=False)
        self.dist_mlp = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, d_dist, bias=False))
        self.bc_proj = nn.Linear(d_dist, 2, bias=False)
        self.dt_proj = nn.Linear(d_dist, num_heads, bias=False)
        dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log = nn.Parameter(torch.log(torch.empty(num_heads).uniform_(*A_init_range)))
        self.D = nn.Parameter(torch.ones(num_heads))
        self.key_norm = RMSNormGated(self.d_inner, eps=1e-5, norm_before_gate=False)
        self.out_key_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.query_norm = nn.LayerNorm(self.d_inner)
        self.out_query_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.query_ffn = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                       nn.Linear(4 * d_model, d_model))

    def _scan(self, xbc, dt, A, dist_bc, init, direction):
        """One direction over (b, L, ...) inputs already in scan order."""
        b, L, _ = xbc.shape
        H, P = self.nheads, self.headdim
        xbc = causal_conv1d_fn(xbc.transpose(1, 2), self.conv_w[direction], self.conv_b[direction],
                               activation="silu").transpose(1, 2)
        x, b_bias, c_bias = torch.split(xbc, [self.d_inner, 1, 1], dim=-1)
        B = (dist_bc[..., 0] + b_bias).unsqueeze(2)  # (b, L, 1, Nq): one group
        C = (dist_bc[..., 1] + c_bias).unsqueeze(2)
        return ISSM_chunk_scan_combined(x.reshape(b, L, H, P), dt, A, B, C, chunk_size=self.chunk_size,
                                        D=self.D, dt_bias=self.dt_bias, initial_states=init,
                                        dt_softplus=True, return_final_states=True)

    def forward(self, queries, anchors, feats, points):
        """queries (b, Nq, d_model), anchors (b, Nq, 3), feats (b, L, d_model), points (b, L, 3),
        the points already serialised (sorted). Returns updated (queries, feats)."""
        b, Nq, _ = queries.shape
        L = feats.shape[1]
        H, P = self.nheads, self.headdim
        z, xbc, dt_tok = torch.split(self.key_proj(feats), [self.d_inner, self.d_inner + 2, H], dim=-1)
        init = self.query_proj(queries).view(b, Nq, H, P).permute(0, 2, 3, 1)  # (b, H, P, Nq)

        delta = points[:, :, None] - anchors[:, None]                          # (b, L, Nq, 3)
        delta = torch.sign(delta) * torch.log2(delta.abs() * 64 + 1) / 8      # log-scaled offsets
        dist = self.dist_mlp(delta)                                            # (b, L, Nq, d_dist)
        dist_bc = self.bc_proj(dist)                                           # (b, L, Nq, 2)
        dt = self.dt_proj(dist).permute(0, 1, 3, 2) + dt_tok[..., None]       # (b, L, H, Nq); bias fused
        A = -torch.exp(self.A_log)[:, None].expand(H, Nq)

        y_f, s_f = self._scan(xbc, dt, A, dist_bc, init, 0)
        flip = lambda t: torch.flip(t, dims=[1])  # noqa: E731
        y_b, s_b = self._scan(flip(xbc), flip(dt), A, flip(dist_bc), init, 1)
        y = (y_f + flip(y_b)) / 2
        states = (s_f + s_b) / 2                                               # (b, H, P, Nq)

        feats = feats + self.out_key_proj(self.key_norm(y.reshape(b, L, self.d_inner), z))
        q = states.permute(0, 3, 1, 2).reshape(b, Nq, self.d_inner)
        queries = queries + self.out_query_proj(self.query_norm(q))
        return queries + self.query_ffn(queries), feats


class Model(nn.Module):
    def __init__(self, d_model, layers, out_dim):
        super().__init__()
        self.point_embed = nn.Sequential(nn.Linear(3 + out_dim, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.query_embed = nn.Sequential(nn.Linear(3, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.layers = nn.ModuleList(BiISSMDecoderLayer(d_model) for _ in range(layers))
        self.head = nn.Linear(d_model, out_dim)

    def forward(self, points, values, anchors):
        order = points[..., 0].argsort(dim=1)  # serialise the points along x
        idx = order[..., None]
        points = points.gather(1, idx.expand_as(points))
        values = values.gather(1, idx.expand_as(values))
        feats = self.point_embed(torch.cat([points, values], -1))
        queries = self.query_embed(anchors)
        for layer in self.layers:
            queries, feats = layer(queries, anchors, feats, points)
        return self.head(queries)


def make_batch(n, L, Nq, out_dim, field, device):
    points = torch.rand(n, L, 3, device=device) * 2 - 1
    values = torch.sin(points @ field)                                         # (n, L, out_dim)
    anchors = torch.rand(n, Nq, 3, device=device) * 1.6 - 0.8
    w = torch.exp(-((anchors[:, :, None] - points[:, None]) ** 2).sum(-1) / (2 * 0.3 ** 2))  # (n, Nq, L)
    target = (w @ values) / w.sum(-1, keepdim=True)
    return points, values, anchors, target


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--points", type=int, default=300)
    ap.add_argument("--queries", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=64)
    args = ap.parse_args()
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("ssm_ext::issm_fwd", "CUDA")
    device = "cuda" if torch.cuda.is_available() and has_cuda_kernel else "cpu"
    torch.manual_seed(0)
    out_dim = 4
    field = torch.randn(3, out_dim, device=device) * 2
    model = Model(args.d_model, args.layers, out_dim).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    print(f"device {device}: {args.layers} bidirectional ISSM layers, {args.points} points, "
          f"{args.queries} queries (dstate), {sum(p.numel() for p in model.parameters())} parameters")
    t0 = time.perf_counter()
    for step in range(args.steps + 1):
        points, values, anchors, target = make_batch(args.batch, args.points, args.queries, out_dim, field, device)
        loss = F.mse_loss(model(points, values, anchors), target)
        if step % 10 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f} s)")
        if step == args.steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    baseline = F.mse_loss(target.mean(1, keepdim=True).expand_as(target), target).item()
    print(f"final loss {loss.item():.4f} (predicting the batch mean: {baseline:.4f})")


if __name__ == "__main__":
    main()
