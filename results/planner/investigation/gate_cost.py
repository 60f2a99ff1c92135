"""All-True gate cost (or a schedule's, ``--every N``) on the shipped digits models, call by call.

Whole trajectories on this 2-core machine vary by ±20-40% from one repeat to the next,
more than the effect measured, so the denoiser calls of one recorded trajectory are
replayed instead: for every call, plain compiled and each bcc variant (branch and
specialize strategies, residual and output mode) run back to back on the same inputs,
and the overhead is the median over all calls of each variant's time / plain's time.

    python results/planner/investigation/gate_cost.py --workload digits-unet --trajectories 15
"""
import argparse
import json
import statistics
import time

import torch

import bcc
from bcc.config import DEFAULT_INDUCTOR_OPTIONS
from bcc.tools.bench.workloads import build_workload
from bcc.tools.digits import denoiser_arch

ap = argparse.ArgumentParser()
ap.add_argument("--workload", default="digits-unet")
ap.add_argument("--trajectories", type=int, default=15)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--out", default=None, help="write the medians and ratios as JSON here")
ap.add_argument("--regions", action="store_true",
                help="time the branch graph with regions instead of the strategy/mode grid: all blocks as one "
                "region, and on a UNet DeepCache's branch 0 as one region beside the blocks outside it")
ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                help="an inductor option for plain and bcc alike, on top of bcc's defaults (VALUE is read as "
                "JSON, e.g. --option cpp_wrapper=true)")
ap.add_argument("--modes", nargs="+", default=["residual", "output"], help="cache modes of the strategy grid")
ap.add_argument("--strategies", nargs="+", default=["branch", "specialize"], help="strategies of the grid")
ap.add_argument("--every", type=int, default=1,
                help="time Schedule.every(N) instead of the all-True schedule (1); the per-step medians' sum is "
                "then the trajectory estimate")
args = ap.parse_args()
torch.set_num_threads(args.threads)
options = dict(DEFAULT_INDUCTOR_OPTIONS)
for kv in args.option:
    key, _, value = kv.partition("=")
    options[key] = json.loads(value)
w = build_workload(args.workload, steps=20, n=20)
calls = []


class Recorder(torch.nn.Module):
    digits_arch = denoiser_arch(w.model)  # how sample() calls it (the DiT takes the text second)

    def forward(self, *a, **k):
        calls.append((a, k))
        return w.model(*a, **k)


w.run(Recorder())
plain = torch.compile(w.model, fullgraph=True, dynamic=False, options=dict(options))
variants = {"plain": plain}
every = lambda n: bcc.Schedule.every(args.every, len(calls), n)  # noqa: E731
if args.regions:
    names = bcc.find_blocks(w.model, calls[0], blocks=w.blocks)
    variants["branch/blocks"] = bcc.compile(w.model, every(names), inductor_options=options)
    variants["branch/span region"] = bcc.compile(w.model, every([bcc.region(names[0], names[-1])]),
                                                 inductor_options=options)
    if hasattr(w.model, "down_blocks"):
        b0 = bcc.unet_branch(w.model, 0)
        inside = bcc.find_blocks(w.model, calls[0], blocks=[*names, b0])  # b0 and the blocks outside it
        variants["branch/DeepCache b0 region"] = bcc.compile(w.model, every(inside), inductor_options=options)
else:
    for strategy in args.strategies:
        for mode in args.modes:
            variants[f"{strategy}/{mode}"] = bcc.compile(w.model, every, blocks=w.blocks, mode=mode,
                                                         strategy=strategy, inductor_options=options)
with torch.no_grad():
    for v in variants.values():  # compile outside the timing
        for a, k in calls:
            v(*a, **k)
    times = {k: [] for k in variants}
    for _ in range(args.trajectories):
        for a, k in calls:
            for name, v in variants.items():
                t0 = time.perf_counter()
                v(*a, **k)
                times[name].append(time.perf_counter() - t0)
report = {}
for name, ts in times.items():
    ratios = [t / p for t, p in zip(ts, times["plain"])]
    q = statistics.quantiles(ratios, n=4)
    per_step = [statistics.median(ts[i::len(calls)]) for i in range(len(calls))]
    report[name] = {"median_call_s": statistics.median(ts), "median_ratio": statistics.median(ratios),
                    "ratio_quartiles": [q[0], q[2]], "calls": len(ts), "per_step_median_s": per_step,
                    "trajectory_estimate_s": sum(per_step)}
    print(f"{name:22s} median call {statistics.median(ts) * 1e3:7.2f} ms   vs plain, median of per-call ratios "
          f"{statistics.median(ratios) - 1:+.1%} (quartiles {q[0] - 1:+.1%} .. {q[2] - 1:+.1%}, {len(ts)} calls)",
          flush=True)
base = report["plain"]["trajectory_estimate_s"]
for name, r in report.items():
    print(f"{name:22s} sum of per-step medians {r['trajectory_estimate_s']:.3f} s: {base / r['trajectory_estimate_s']:.3f}x "
          "over plain", flush=True)
if args.out:
    with open(args.out, "w") as f:
        json.dump({"workload": w.describe, "threads": args.threads, "trajectories": args.trajectories,
                   "every": args.every,
                   "inductor_options": options,
                   "variants": report}, f, indent=1)
