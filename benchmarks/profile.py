"""Per-kernel CUDA times of our implementation on the benchmark cases (torch.profiler).

python -m benchmarks.profile --op issm hstu_attn [--case DEST3D] [--mode fwd fwd+bwd] [--reps 5] [--plain]
Prints, for each selected case and mode, the kernels sorted by total CUDA time over --reps steps.
--plain runs the same steps without torch.profiler, for an outside profiler (ncu, nsys).
"""
import argparse
import importlib

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.run import FAMILIES, OURS_NAME, import_noted


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", nargs="+", required=True, help="family or op names")
    ap.add_argument("--case", nargs="*", default=[], help="substrings of the case labels to keep")
    ap.add_argument("--mode", nargs="+", default=["fwd", "fwd+bwd"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=15, help="kernels listed per case")
    ap.add_argument("--plain", action="store_true", help="no torch.profiler (run under ncu or nsys)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    for family in FAMILIES:
        fam = importlib.import_module(f"benchmarks.{family}")
        cases = [c for c in fam.cases(dev, False) if (family in args.op or c["op"] in args.op)
                 and all(s in c["label"] for s in args.case)]
        if not cases:
            continue
        mods = {OURS_NAME: import_noted(fam.OURS, [], "ours")}
        for case in cases:
            for mode in (m for m in args.mode if m in case["modes"]):
                t = case["make"](mode)
                fn = case["impls"](mods)[OURS_NAME]

                def step():
                    for v in t.values():
                        v.grad = None
                    out = fn(t)
                    if mode == "fwd+bwd":
                        out.backward(t["dout"])

                for _ in range(3):  # warm-up: first-call allocations and lazy initialisation
                    step()
                torch.cuda.synchronize()
                if args.plain:
                    for _ in range(args.reps):
                        step()
                    torch.cuda.synchronize()
                    continue
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.reps):
                        step()
                    torch.cuda.synchronize()
                print(f"\n== {case['op']} | {case['label']} | {mode}: per-kernel CUDA time over {args.reps} steps")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=90))


if __name__ == "__main__":
    main()
