"""Train a stack of Quick-SSM-style layers (ssm_ext.quick_ssm.layers.SSM) on selective copy:
a sequence of noise tokens with K marked data tokens scattered in it; after a separator the
model must output the K data tokens in order. Runs on the GPU if present, else the CPU.

    python examples/ssm_selective_copy.py [--steps 800] [--layers 2] [--width 64]
"""
import argparse
import sys
import time

import torch
import torch.nn as nn

from ssm_ext.quick_ssm.layers import SSM

VOCAB, NOISE, SEP = 10, 10, 11  # data tokens 0..9, then noise and separator


def batch(n, length, k, device):
    """Inputs (n, length + k) and targets for the last k positions."""
    x = torch.full((n, length + k), NOISE, dtype=torch.long)
    data = torch.randint(0, VOCAB, (n, k))
    for i in range(n):
        pos = torch.randperm(length - 1)[:k].sort().values
        x[i, pos] = data[i]
    x[:, length - 1] = SEP
    return x.to(device), data.to(device)


class Model(nn.Module):
    def __init__(self, width, layers, device, compute_dtype):
        super().__init__()
        self.embed = nn.Embedding(VOCAB + 2, width, device=device)
        self.layers = nn.ModuleList(SSM(width, state_size_mult=2.0, device=device, compute_dtype=compute_dtype)
                                    for _ in range(layers))
        self.head = nn.Linear(width, VOCAB, device=device)

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    # bf16 scan inputs on the GPU (state stays fp32 inside the kernel); fp32 on the CPU
    model = Model(args.width, args.layers, device, torch.bfloat16 if device == "cuda" else torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batch(args.batch, args.length, args.k, device)
        logits = model(x)[:, -args.k:]
        loss = loss_fn(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 100) == 0 or step == args.steps:
            done = step * 30 // args.steps
            sys.stdout.write(f"\r[{'#' * done}{'.' * (30 - done)}] step {step}/{args.steps} loss {loss.item():.3f}")
            sys.stdout.flush()
    with torch.no_grad():
        x, y = batch(512, args.length, args.k, device)
        acc = (model(x)[:, -args.k:].argmax(-1) == y).float().mean().item()
    print(f"\n{device}: final loss {loss.item():.4f}, token accuracy {acc:.3f} "
          f"(chance {1 / VOCAB:.2f}), {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
