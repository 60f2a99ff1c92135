"""GPU-only checks for a session that is lent a GPU (one short script, run once).

What it measures, per model (SD-1.5-config UNet and PixArt-alpha-config DiT, random
weights, batch 2 as with guidance), all side by side in one process, alternating,
medians, CUDA-synchronised at trajectory ends only:

1. fp16 (or --dtype) trajectory time: plain ``torch.compile`` vs bcc at the all-True
   schedule (gate overhead), every-2 and every-3;
2. host syncs: ``torch.profiler`` counts of ``cudaStreamSynchronize`` /
   ``cudaDeviceSynchronize`` / ``aten::item`` / ``aten::_local_scalar_dense`` in one
   trajectory of each (bcc keeps the schedule and the step on the CPU, so its
   branches should add none);
3. CUDA graphs: bcc with ``strategy="specialize"`` (one branch-free graph per schedule
   row) and inductor's ``triton.cudagraphs`` (what ``mode="reduce-overhead"`` turns on),
   vs the plain model under ``mode="reduce-overhead"``; errors are recorded, not raised;
4. bf16: bcc vs plain outputs (relative error) and timing.

Writes ``gpu_results.json`` and ``gpu_results.md`` under ``--out`` (default ``$OUT`` or
``results/gpu``), naming the card. ``--device cpu --tiny`` runs the same code on tiny
models to check the script itself.

    python examples/gpu_check.py --out "$OUT"
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from pathlib import Path

import torch

import bcc
from bcc.tools.bench.workloads import build_workload
from bcc.config import DEFAULT_INDUCTOR_OPTIONS

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "aten::item", "aten::_local_scalar_dense")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(w, variants, repeats, device):
    out = {k: [] for k in variants}
    for fn, before in variants.values():
        before and before()
        w.run(fn)
    for _ in range(repeats):
        for k, (fn, before) in variants.items():
            before and before()
            _sync(device)
            t0 = time.perf_counter()
            w.run(fn)
            _sync(device)
            out[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in out.items()}


def _syncs(w, fn, before):
    from torch.profiler import ProfilerActivity, profile

    before and before()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        w.run(fn)
    counts = {e: 0 for e in SYNC_EVENTS}
    for ev in prof.events():
        if ev.name in counts:
            counts[ev.name] += 1
    return counts


def check(name, latent, device, dtype, repeats, log):
    w = build_workload(name, latent=latent, steps=20, device=device, dtype=dtype)
    r = {"model": w.describe, "dtype": str(dtype)}
    probe = bcc.compile(w.model, lambda n: bcc.Schedule.all_compute(20, n), blocks=w.blocks, backend="eager")
    w.run(probe)
    names = probe.bcc_schedule.block_names
    sched = {"all": bcc.Schedule.all_compute(20, names), "every-2": bcc.Schedule.every(2, 20, names),
             "every-3": bcc.Schedule.every(3, 20, names)}
    opts = dict(DEFAULT_INDUCTOR_OPTIONS)
    plain = torch.compile(w.model, fullgraph=True, options=opts)
    fast = bcc.compile(w.model, sched["all"])
    variants = {"plain": (plain, None)}
    variants.update({f"bcc[{k}]": (fast, (lambda s=s: fast.set_schedule(s))) for k, s in sched.items()})
    t = _time(w, variants, repeats, device)
    r["seconds"] = t
    r["speedup"] = {k: t["plain"] / v for k, v in t.items()}
    r["gate_overhead"] = t["bcc[all]"] / t["plain"] - 1
    log(f"{name}: {json.dumps(r['speedup'])}")
    r["syncs"] = {"plain": _syncs(w, plain, None),
                  "bcc[every-2]": _syncs(w, fast, lambda: fast.set_schedule(sched["every-2"]))}
    try:
        graphs = dict(opts, **{"triton.cudagraphs": True})
        spec = bcc.compile(w.model, sched["all"], strategy="specialize", inductor_options=graphs)
        plain_ro = torch.compile(w.model, fullgraph=True, mode="reduce-overhead")
        v2 = {"plain[reduce-overhead]": (plain_ro, None)}
        v2.update({f"spec+cudagraphs[{k}]": (spec, (lambda s=s: spec.set_schedule(s))) for k, s in sched.items()})
        t2 = _time(w, v2, repeats, device)
        r["cudagraphs"] = {"seconds": t2, "speedup": {k: t2["plain[reduce-overhead]"] / v for k, v in t2.items()}}
    except Exception as e:  # recorded: the point is to learn whether it works
        r["cudagraphs"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                           "trace": traceback.format_exc()[-2000:]}
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models (checks the script, not the GPU)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "results/gpu"))
    args = ap.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    models = [("unet-tiny", 8), ("pixart", 8)] if args.tiny else [("sd15", 64), ("pixart-alpha", 64)]
    results = {"card": card, "torch": torch.__version__, "command": "python examples/gpu_check.py", "models": {}}
    for name, latent in models:
        for dtype in (getattr(torch, args.dtype), torch.bfloat16):
            key = f"{name}/{dtype}".replace("torch.", "")
            try:
                results["models"][key] = check(name, latent, device, dtype, args.repeats, log)
            except Exception as e:
                results["models"][key] = {"error": f"{type(e).__name__}: {e}"[:500], "trace": traceback.format_exc()[-2000:]}
            (out / "gpu_results.json").write_text(json.dumps(results, indent=1, default=str))
    lines = [f"# GPU checks on {card}", "", f"torch {torch.__version__}; `python examples/gpu_check.py`", "",
             "| model | gate overhead | every-2 | every-3 | syncs plain / bcc | CUDA graphs (specialize) vs reduce-overhead |",
             "|---|---|---|---|---|---|"]
    for key, r in results["models"].items():
        if "error" in r:
            lines.append(f"| {key} | error: {r['error'][:120]} | | | | |")
            continue
        cg = r["cudagraphs"]
        cgs = cg.get("error") or ", ".join(f"{k} {v:.2f}x" for k, v in cg["speedup"].items())
        lines.append(f"| {key} | {r['gate_overhead']:+.1%} | {r['speedup']['bcc[every-2]']:.2f}x | "
                     f"{r['speedup']['bcc[every-3]']:.2f}x | {r['syncs']['plain']} / {r['syncs']['bcc[every-2]']} | {cgs} |")
    (out / "gpu_results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
