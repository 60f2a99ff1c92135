"""All-True gate cost on the shipped digits models: plain compiled vs bcc (branch and
specialize strategies, residual and output mode), alternating, medians and per-repeat ratios.

    python results/planner/investigation/gate_cost.py --workload digits-unet --repeats 9
"""
import argparse
import json
import statistics
import time

import torch

import bcc
from bcc.config import DEFAULT_INDUCTOR_OPTIONS
from bcc.tools.bench.workloads import build_workload

ap = argparse.ArgumentParser()
ap.add_argument("--workload", default="digits-unet")
ap.add_argument("--repeats", type=int, default=9)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--out", default=None, help="write the medians and ratios as JSON here")
args = ap.parse_args()
torch.set_num_threads(args.threads)
w = build_workload(args.workload, steps=20, n=20)
plain = torch.compile(w.model, fullgraph=True, dynamic=False, options=dict(DEFAULT_INDUCTOR_OPTIONS))
variants = {"plain": plain}
every = lambda n: bcc.Schedule(torch.ones(20, len(n), dtype=torch.bool), n)  # noqa: E731
for strategy in ("branch", "specialize"):
    for mode in ("residual", "output"):
        variants[f"{strategy}/{mode}"] = bcc.compile(w.model, every, blocks=w.blocks, mode=mode, strategy=strategy)
for v in variants.values():  # compile outside the timing
    w.run(v)
times = {k: [] for k in variants}
for r in range(args.repeats):
    for k, v in variants.items():
        t0 = time.perf_counter()
        w.run(v)
        times[k].append(time.perf_counter() - t0)
base = statistics.median(times["plain"])
report = {}
for k, ts in times.items():
    ratios = [t / p - 1 for t, p in zip(ts, times["plain"])]
    report[k] = {"median_s": statistics.median(ts), "vs_plain": statistics.median(ts) / base - 1,
                 "median_of_ratios": statistics.median(ratios), "ratios": ratios}
    print(k, f"median {statistics.median(ts):.3f}s", f"vs plain {statistics.median(ts) / base - 1:+.1%}",
          f"median of per-repeat ratios {statistics.median(ratios):+.1%}", "repeats",
          [f"{x:+.1%}" for x in ratios], flush=True)
if args.out:
    with open(args.out, "w") as f:
        json.dump({"workload": w.describe, "threads": args.threads, "repeats": args.repeats, "variants": report}, f,
                  indent=1)
