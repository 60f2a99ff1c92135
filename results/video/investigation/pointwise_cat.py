"""Inductor's force_pointwise_cat, priced: plain compiled and bcc (all-True schedule) with and without it,
alternating whole DDIM-20 trajectories in one process (eager beside).

    python results/video/investigation/pointwise_cat.py WORKLOAD REPEATS [OUT.json]
"""
import sys, time, json, statistics, torch
torch.set_num_threads(2)
import bcc
from bcc import BccConfig, Schedule
from bcc.tools.bench.workloads import build_workload
name, reps = sys.argv[1], int(sys.argv[2])
w = build_workload(name, steps=20)
prof = bcc.calibrate(w.model, lambda m, c, seed: w.run(m, seed=seed), [0], seeds=[100], blocks=w.blocks,
                     scheduler=w.scheduler, progress=False)
allT = Schedule.all_compute(w.steps, list(prof.block_names))
base = {"layout_optimization": False}
V = {"eager": w.model,
     "plain": torch.compile(w.model, fullgraph=True, options=dict(base)),
     "plain+pwcat": torch.compile(w.model, fullgraph=True, options={**base, "force_pointwise_cat": True}),
     "bcc": bcc.compile(w.model, allT, config=BccConfig(inductor_options=dict(base))),
     "bcc+pwcat": bcc.compile(w.model, allT, config=BccConfig(inductor_options={**base, "force_pointwise_cat": True}))}
for k, f in V.items():
    s = time.perf_counter(); w.run(f); print(k, "first trajectory", round(time.perf_counter() - s, 1), flush=True)
T = {k: [] for k in V}
for r in range(reps):
    for k, f in V.items():
        s = time.perf_counter(); w.run(f); T[k].append(time.perf_counter() - s)
med = {k: statistics.median(v) for k, v in T.items()}
for k, v in T.items():
    print(f"{k:12s} median {med[k]:.3f}s  vs plain {med[k]/med['plain']-1:+.1%}  repeats", [round(u, 3) for u in v])
json.dump({"workload": name, "describe": w.describe, "repeats": T, "torch": torch.__version__},
          open(sys.argv[3] if len(sys.argv) > 3 else f"pwcat_{name}.json", "w"), indent=1)
