"""A small generative recommender: an item embedding table, a stack of HSTU layers with
block-sparse attention (ssm_ext.hstu_bsa.TritonHSTUBSAAttention, each with its own GateModel)
and next-item prediction over jagged user histories of different lengths. Runs on the GPU
when the HSTU CUDA kernels are built, else on the CPU.

The synthetic interaction log: items fall into genres; each user likes a few genres and
mostly works through a genre in order (item i, then i + 1), now and then jumping to another
liked genre or to a random item. Trained on most users, it reports recall@10 of the last
item of each held-out user (chance: 10 / number of items).

    python examples/hstu_recommender.py [--steps 300] [--layers 2] [--users 2000]
"""
import argparse
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ssm_ext.hstu_bsa import GateModel, TritonHSTUBSAAttention

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None


def interaction_log(users, items, genres, min_len, max_len, gen):
    """A list of per-user item sequences (int64 tensors) of lengths min_len..max_len."""
    per_genre = items // genres
    seqs = []
    for _ in range(users):
        liked = torch.randperm(genres, generator=gen)[:3]
        length = int(torch.randint(min_len, max_len + 1, (), generator=gen))
        g = int(liked[0])
        item = g * per_genre + int(torch.randint(per_genre, (), generator=gen))
        seq = [item]
        for _ in range(length - 1):
            r = float(torch.rand((), generator=gen))
            if r < 0.75:      # the next item of the same genre
                item = g * per_genre + (item - g * per_genre + 1) % per_genre
            elif r < 0.95:    # jump to a liked genre
                g = int(liked[torch.randint(3, (), generator=gen)])
                item = g * per_genre + int(torch.randint(per_genre, (), generator=gen))
            else:             # anything
                item = int(torch.randint(items, (), generator=gen))
                g = item // per_genre
            seq.append(item)
        seqs.append(torch.tensor(seq))
    return seqs


def jagged(seqs, device):
    """Concatenated inputs (all but the last item), their next-item targets, positions and offsets."""
    inputs = torch.cat([s[:-1] for s in seqs]).to(device)
    targets = torch.cat([s[1:] for s in seqs]).to(device)
    lens = torch.tensor([len(s) - 1 for s in seqs])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(device)
    positions = torch.cat([torch.arange(n) for n in lens.tolist()]).to(device)
    return inputs, targets, positions, offsets


class Recommender(nn.Module):
    def __init__(self, items, max_len, dim, layers, heads, attention_dim, linear_dim, block_size, block_counts,
                 window):
        super().__init__()
        self.max_len = max_len
        self.item = nn.Embedding(items, dim)
        self.pos = nn.Embedding(max_len, dim)
        nn.init.normal_(self.item.weight, std=0.05)
        nn.init.normal_(self.pos.weight, std=0.05)
        self.layers = nn.ModuleList(
            TritonHSTUBSAAttention(dim, linear_dim, attention_dim, heads, block_counts=block_counts,
                                   block_size=block_size, window_size=window, dropout_ratio=0.1)
            for _ in range(layers))
        self.gates = nn.ModuleList(GateModel(attention_dim, hidden_dim=32) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, inputs, positions, offsets):
        """Scores (T, items) of the next item after each input."""
        x = self.item(inputs) + self.pos(positions)
        # the padded length: only its size is used; fixed, so the 1/n weight scale never changes
        n_size = torch.empty(0, self.max_len, self.max_len, device=x.device)
        for layer, gate in zip(self.layers, self.gates):
            x, _, _ = layer(x, offsets, n_size, gate)
        return self.norm(x) @ self.item.weight.t()


def recall_at_10(model, seqs, device, batch=256):
    """Fraction of users whose last item is among the 10 best scores after the rest of the history."""
    model.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            inputs, targets, positions, offsets = jagged(seqs[i:i + batch], device)
            last = offsets[1:] - 1
            top = model(inputs, positions, offsets)[last].topk(10, dim=-1).indices
            hits += (top == targets[last, None]).any(-1).sum().item()
    model.train()
    return hits / len(seqs)


def progress(steps):
    if tqdm is not None:
        return tqdm(range(1, steps + 1), ncols=80)
    return range(1, steps + 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when the HSTU CUDA kernels exist)")
    args = ap.parse_args()
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("ssm_ext::hstu_bsa_fwd", "CUDA")
    device = args.device or ("cuda" if torch.cuda.is_available() and has_cuda_kernel else "cpu")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    min_len, max_len = 6, 97
    seqs = interaction_log(args.users, args.items, genres=25, min_len=min_len, max_len=max_len, gen=gen)
    test, train = seqs[: len(seqs) // 10], seqs[len(seqs) // 10:]
    model = Recommender(args.items, max_len, args.dim, args.layers, heads=2, attention_dim=32, linear_dim=32,
                        block_size=8, block_counts=2, window=8).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    print(f"{len(train)} training users, {len(test)} held out, {args.items} items, lengths {min_len}..{max_len}, "
          f"device {device}")
    t0 = time.perf_counter()
    bar = progress(args.steps)
    for step in bar:
        pick = torch.randint(len(train), (args.batch,), generator=gen).tolist()
        inputs, targets, positions, offsets = jagged([train[i] for i in pick], device)
        loss = F.cross_entropy(model(inputs, positions, offsets), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if tqdm is not None:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        elif step % max(1, args.steps // 50) == 0 or step == args.steps:
            done = step * 30 // args.steps
            sys.stdout.write(f"\r[{'#' * done}{'.' * (30 - done)}] step {step}/{args.steps} loss {loss.item():.3f}")
            sys.stdout.flush()
    print(f"\ntrained in {time.perf_counter() - t0:.1f} s, final loss {loss.item():.3f}")
    print(f"recall@10 on held-out users: {recall_at_10(model, test, device):.3f} "
          f"(chance {10 / args.items:.3f})")


if __name__ == "__main__":
    main()
