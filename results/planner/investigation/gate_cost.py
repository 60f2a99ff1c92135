"""All-True gate cost on the shipped digits UNet: plain compiled vs bcc residual vs bcc output mode."""
import statistics, time, torch, bcc
from bcc.tools.bench.workloads import build_workload
from bcc.config import DEFAULT_INDUCTOR_OPTIONS
torch.set_num_threads(2)
w = build_workload("digits-unet", steps=20, n=20)
plain = torch.compile(w.model, fullgraph=True, dynamic=False, options=dict(DEFAULT_INDUCTOR_OPTIONS))
variants = {"plain": plain}
for mode in ("residual", "output"):
    variants[mode] = bcc.compile(w.model, lambda n: bcc.Schedule(torch.ones(20, len(n), dtype=torch.bool), n),
                                 blocks=w.blocks, mode=mode)
for v in variants.values():
    w.run(v)
times = {k: [] for k in variants}
for r in range(5):
    for k, v in variants.items():
        t0 = time.perf_counter(); w.run(v); times[k].append(time.perf_counter() - t0)
base = statistics.median(times["plain"])
for k, ts in times.items():
    print(k, f"median {statistics.median(ts):.3f}s", f"vs plain {statistics.median(ts)/base - 1:+.1%}",
          "repeats", [f"{t / p - 1:+.1%}" for t, p in zip(ts, times["plain"])])
