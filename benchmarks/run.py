"""Benchmark runner: python -m benchmarks.run [--op NAME ...] [--quick] [--out DIR] [--device cuda|cpu]

Each family module benchmarks/<family>.py (listed in FAMILIES) defines
  OURS   the ssm_ext module it times,
  PEERS  {import name: source folder under $SSM_EXT_PEERS},
  cases(device, quick) -> list of dicts with
    op, label, params (sizes, dtype, ...),
    modes   {"fwd" | "fwd+bwd": (bytes moved at the floor, FLOPs)},
    make(mode) -> dict of input tensors; in "fwd+bwd" the ones to differentiate require grad
                  and "dout" is the gradient fed to backward,
    impls(mods) -> {name: fn(inputs) -> output} for the imported modules mods {name: module};
                   a reason string in place of fn skips that implementation (reported, not run),
  and optionally peak_mem: the modes whose peak memory is measured, one call per implementation.
"""
import argparse
import datetime
import importlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

FAMILIES = ["causal_conv1d", "scan", "issm", "hstu_bsa"]
NOMINAL_BW = 3.02e12  # B/s and FLOP/s of the H100 floors in ALGORITHMS.md section 1
PEAK_FLOPS = 722e12
# A GPU spin (~1 ms) before each rep lets the CPU queue the whole rep, so the events time the
# device rather than Python launch overhead (matters for the tiny decode kernels).
SPIN_CYCLES = 2_000_000
OURS_NAME = "ssm_ext"
# Timing one implementation in one mode takes about BUDGET_S at most: slow peers (Quick SSM's scan
# takes about half a second a call at L = 1M) get fewer reps, never fewer than MIN_REPS.
BUDGET_S = 1.5
MIN_REPS = 3


def import_noted(name, notes, what):
    try:
        return importlib.import_module(name)
    except Exception as e:  # a missing or broken module only drops its column
        notes.append(f"{what} {name} skipped: {type(e).__name__}: {e}")


def import_peer(name, folder, notes):
    try:
        return importlib.import_module(name)
    except Exception:
        root = os.environ.get("SSM_EXT_PEERS")
        if not root:
            notes.append(f"peer {name} skipped: not installed and SSM_EXT_PEERS unset")
            return None
        sys.path.insert(0, str(Path(root) / folder))
        return import_noted(name, notes, f"peer (from {Path(root) / folder})")


def time_us(step, reps, cuda, before=lambda i: None, warmup=10):
    """(median microseconds of step(i), reps timed) after warm-up; before(i) runs untimed."""
    for i in range(2):  # warm-up; the first call may compile, the second sizes reps to BUDGET_S
        before(i)
        t0 = time.perf_counter()
        step(i)
        if cuda:
            torch.cuda.synchronize()
    reps = max(MIN_REPS, min(reps, int(BUDGET_S / (time.perf_counter() - t0))))
    for i in range(2, min(warmup, reps)):
        before(i)
        step(i)
    if not cuda:
        ts = []
        for i in range(reps):
            before(i)
            t0 = time.perf_counter()
            step(i)
            ts.append((time.perf_counter() - t0) * 1e6)
        return statistics.median(ts), reps
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    torch.cuda.synchronize()
    for i, (start, end) in enumerate(events):
        before(i)
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        step(i)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in events), reps


def copy_bandwidth(dev):
    """Device-to-device copy bandwidth in B/s of a 1 GiB copy, read + write counted."""
    src = torch.empty(2**30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (time_us(lambda i: dst.copy_(src), 20, True)[0] * 1e-6)


def n_sets(dev, set_bytes):
    """Input copies to rotate over: together over 2x L2 so caches don't flatter, within 1/4 of free memory."""
    if dev.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20)
    fit = int(0.25 * torch.cuda.mem_get_info(dev)[0] // set_bytes)
    return max(1, min(max(2, math.ceil(2 * l2 / set_bytes)), fit))


def peak_bytes(step, before, dev, set_bytes):
    """torch.cuda.max_memory_allocated of one step(0) as if its inputs were all that is allocated:
    the peak above what was allocated before the step (other input sets, left-over grads), plus
    the bytes of its own inputs."""
    before(0)
    torch.cuda.synchronize(dev)
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    step(0)
    torch.cuda.synchronize(dev)
    return torch.cuda.max_memory_allocated(dev) - base + set_bytes


def run_case(case, mode, mods, dev, reps):
    """The row's measurements: times_us, reps, errors, skipped and peak_mem_bytes, each {impl: value}."""
    first = case["make"](mode)
    set_bytes = sum(t.untyped_storage().nbytes() for t in first.values())
    n = n_sets(dev, set_bytes)
    sets = [first] + [case["make"](mode) for _ in range(n - 1)]
    cuda = dev.type == "cuda"

    def before(i):
        for t in sets[i % n].values():
            t.grad = None

    res = {k: {} for k in ("times_us", "reps", "errors", "skipped", "peak_mem_bytes")}
    for name, fn in case["impls"](mods).items():
        if isinstance(fn, str):
            res["skipped"][name] = fn
            continue

        def step(i, fn=fn):
            t = sets[i % n]
            out = fn(t)
            if mode == "fwd+bwd":
                out.backward(t["dout"])

        try:
            res["times_us"][name], res["reps"][name] = time_us(step, reps, cuda, before, warmup=10 if cuda else 2)
            if cuda and mode in case.get("peak_mem", ()):
                res["peak_mem_bytes"][name] = peak_bytes(step, before, dev, set_bytes)
        except Exception as e:  # one failing implementation must not stop the run
            res["errors"][name] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    return res


def fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


def time_cell(row, name):
    return "ERR" if name in row["errors"] else "skip" if name in row["skipped"] else fmt(row["times_us"].get(name))


def mem_cells(row, name, mem):  # peak MB, a column only for implementations measured somewhere
    v = row["peak_mem_bytes"].get(name)
    return [fmt(None if v is None else v / 1e6, ".0f")] if name in mem else []


def print_table(rows, peers):
    mem = {k for r in rows for k in r["peak_mem_bytes"]}
    head = ["op", "case", "mode", "ours us", "floor us", "% floor"] + (["ours MB"] if OURS_NAME in mem else [])
    for p in peers:
        head += [f"{p} us", f"{p}/ours"] + ([f"{p} MB"] if p in mem else [])
    body = []
    for r in rows:
        ours = r["times_us"].get(OURS_NAME)
        floor = r.get("floor_us")
        line = [r["op"], r["case"], r["mode"], time_cell(r, OURS_NAME), fmt(floor),
                fmt(100 * floor / ours if floor and ours else None)] + mem_cells(r, OURS_NAME, mem)
        for p in peers:
            line += [time_cell(r, p), fmt(r["ratios"].get(p), ".2f")] + mem_cells(r, p, mem)
        body.append(line)
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    for line in [head] + body:
        print("  ".join(x.ljust(w) if i < 3 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", nargs="+", help="family or op names to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="fewer reps, fewer cases")
    ap.add_argument("--out", help="folder for the JSON (default: benchmarks/results)")
    ap.add_argument("--device", choices=["cuda", "cpu"])
    args = ap.parse_args()

    notes = []
    if args.device is None and not torch.cuda.is_available():
        notes.append("no CUDA device: CPU smoke run (tiny sizes, wall-clock times, no floors)")
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    reps = (25 if args.quick else 50) if cuda else (5 if args.quick else 10)
    device_name = torch.cuda.get_device_name(dev) if cuda else f"cpu {platform.machine()}"
    copy_bw = copy_bandwidth(dev) if cuda else None
    if cuda:
        print(f"{device_name}: copy bandwidth {copy_bw / 1e9:.0f} GB/s (read + write), "
              f"{100 * copy_bw / NOMINAL_BW:.0f}% of nominal {NOMINAL_BW / 1e9:.0f} GB/s", file=sys.stderr)

    rows, peer_versions = [], {}
    for family in FAMILIES:
        fam = importlib.import_module(f"benchmarks.{family}")
        cases = [c for c in fam.cases(dev, args.quick) if not args.op or family in args.op or c["op"] in args.op]
        if not cases:
            continue
        mods = {OURS_NAME: import_noted(fam.OURS, notes, "ours")}
        for name, folder in fam.PEERS.items():
            mods[name] = import_peer(name, folder, notes)
        mods = {k: m for k, m in mods.items() if m is not None}
        if not mods:
            continue
        # a peer may be a submodule (accelerated_scan.warp): its package carries the version
        peer_versions.update({k: getattr(sys.modules[k.split(".")[0]], "__version__", None)
                              for k in mods if k != OURS_NAME})
        for case in cases:
            for mode, (nbytes, flops) in case["modes"].items():
                res = run_case(case, mode, mods, dev, reps)
                if cuda:  # hand the case's buffers back before the next one allocates
                    torch.cuda.empty_cache()
                times, errors = res["times_us"], res["errors"]
                ours = times.get(OURS_NAME)
                row = {"op": case["op"], "case": case["label"], "mode": mode, "params": case["params"],
                       "bytes": nbytes, "flops": flops, **res,
                       "ratios": {k: t / ours for k, t in times.items() if k != OURS_NAME and ours}}
                if cuda:
                    cmp_us = flops / PEAK_FLOPS * 1e6
                    row["floor_us"] = max(nbytes / copy_bw * 1e6, cmp_us)
                    row["floor_nominal_us"] = max(nbytes / NOMINAL_BW * 1e6, cmp_us)
                    row["fraction_of_floor"] = row["floor_us"] / ours if ours else None
                rows.append(row)
                print(f"{row['op']} | {row['case']} | {mode}: "
                      + ", ".join(f"{k} {t:.1f} us" for k, t in times.items())
                      + "".join(f"; {k} FAILED {e}" for k, e in errors.items()), file=sys.stderr, flush=True)

    peers = list(dict.fromkeys(k for r in rows for k in [*r["times_us"], *r["errors"], *r["skipped"]]
                               if k != OURS_NAME))
    print()
    print_table(rows, peers)
    for r in rows:
        for k, e in r["errors"].items():
            print(f"ERR {r['op']} | {r['case']} | {r['mode']} | {k}: {e}")
        for k, why in r["skipped"].items():
            print(f"SKIP {r['op']} | {r['case']} | {r['mode']} | {k}: {why}")
    for n in notes:
        print("note:", n)

    now = datetime.datetime.now()
    out_dir = Path(args.out) if args.out else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{re.sub(r'[^a-z0-9]+', '-', device_name.lower()).strip('-')}_{now.date().isoformat()}"
    path, k = out_dir / f"{stem}.json", 2
    while path.exists():  # never overwrite an earlier run of the day
        path, k = out_dir / f"{stem}_{k}.json", k + 1
    result = {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "python": platform.python_version(), "date": now.isoformat(timespec="seconds"),
              "quick": args.quick, "reps": reps, "peers": peer_versions,
              "copy_bw_GBps": copy_bw / 1e9 if cuda else None, "nominal_bw_GBps": NOMINAL_BW / 1e9,
              "peak_tflops": PEAK_FLOPS / 1e12, "notes": notes, "rows": rows}
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
