"""Where bcc's extra host time goes on the GPU: one command after the GPU check showed it.

The GPU check (`gpu_results.md`) found PixArt-alpha fp16 host-bound on the H200 without
CUDA graphs (GPU time per call = host time per call) and bcc's all-True schedule 5 ms a
call slower than plain `torch.compile` there, also with ``strategy="specialize"``, whose
all-True graph is the plain graph (same kernels on the CPU, counted from inductor's output
code). This measures, for plain, specialise and the branch graph (the branch graph only if
the budget allows its compile), alternating, one trajectory each per round:

* host time per call, the trajectory's first call (bcc's staleness check runs there) apart;
* a torch.profiler trace of one trajectory: kernel launches and CUDA kernels per call, and
  the ops by self CPU time;
* a cProfile of one trajectory: the Python functions by own time.

    PYTHONPATH=.whl/site python3 results/gpu/host_profile.py --budget-s 240 --out "$OUT"
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import gpu_check  # noqa: E402  (puts bcc on the path, from the checkout)

import bcc  # noqa: E402
from bcc.config import DEFAULT_INDUCTOR_OPTIONS  # noqa: E402
from bcc.tools.bench.workloads import build_workload  # noqa: E402

START = time.perf_counter()


def _host_times(w, fn, device) -> tuple[list[float], list[float]]:
    calls = gpu_check.Calls(fn, device)
    gpu_check.sync(device)
    w.run(calls)
    gpu_check.sync(device)
    return calls.host, calls.gpu_ms()


def _profile(w, fn, device) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        w.run(fn)
        gpu_check.sync(device)
    ev = prof.key_averages()
    launches = sum(e.count for e in ev if "LaunchKernel" in e.key or "cuLaunch" in e.key)
    kernels = sum(e.count for e in ev if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA)
    head = f"kernel launches per call {launches / w.steps:.1f}, CUDA device events per call {kernels / w.steps:.1f}\n"
    return head + ev.table(sort_by="self_cpu_time_total", row_limit=35)


def _cprofile(w, fn) -> str:
    pr = cProfile.Profile()
    pr.enable()
    w.run(fn)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(35)
    return s.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workload", default="pixart-alpha")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    args.out.mkdir(parents=True, exist_ok=True)
    w = build_workload(args.workload, latent=args.latent, steps=args.steps, device=device, dtype=dtype)
    w.model.requires_grad_(False)
    T = args.steps
    probe = bcc.compile(w.model, lambda n: bcc.Schedule.all_compute(T, n), blocks=w.blocks, backend="eager")
    w.run(probe)
    names = probe.bcc_schedule.block_names
    every = {"plain": lambda: torch.compile(w.model, fullgraph=True, options=DEFAULT_INDUCTOR_OPTIONS),
             "specialize": lambda: bcc.compile(w.model, bcc.Schedule.all_compute(T, names), strategy="specialize"),
             "branch": lambda: bcc.compile(w.model, bcc.Schedule.all_compute(T, names))}
    results: dict = {"card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "workload": w.describe, "variants": {}}
    fns = {}

    def write():
        results["elapsed_s"] = time.perf_counter() - START
        (args.out / "host_profile.json").write_text(json.dumps(results, indent=1))

    for tag, make in every.items():
        compile_guess = max([r.get("compile_s", 0) for r in results["variants"].values()] + [40]) * (
            2.5 if tag == "branch" else 1)
        if args.budget_s - (time.perf_counter() - START) < compile_guess + 30:
            results["variants"][tag] = {"skipped": "budget"}
            write()
            continue
        try:
            fn = make()
            t0 = time.perf_counter()
            w.run(fn)
            gpu_check.sync(device)
            fns[tag] = fn
            results["variants"][tag] = {"compile_s": time.perf_counter() - t0}
        except Exception as e:  # one variant's failure loses no other's
            results["variants"][tag] = gpu_check.error_record(e)
        write()
        print(f"[{time.perf_counter() - START:6.1f}s] {tag}: {results['variants'][tag]}", flush=True)
    host = {t: [] for t in fns}
    first = {t: [] for t in fns}
    gpu = {t: [] for t in fns}
    for _ in range(args.rounds):
        for tag, fn in fns.items():
            h, g = _host_times(w, fn, device)
            first[tag].append(1000 * h[0])
            host[tag] += [1000 * x for x in h[1:]]
            gpu[tag] += g[1:]
    for tag, fn in fns.items():
        r = results["variants"][tag]
        r.update(call_host_ms=statistics.median(host[tag]), first_call_host_ms=statistics.median(first[tag]),
                 call_gpu_ms=statistics.median(gpu[tag]) if gpu[tag] else None,
                 call_host_ms_spread=[min(host[tag]), max(host[tag])])
        try:
            text = _profile(w, fn, device) + "\n\n# cProfile, one trajectory\n" + _cprofile(w, fn)
            (args.out / f"profile_{tag}.txt").write_text(text)
            r["launches"] = text.splitlines()[0]
        except Exception as e:
            r["profile"] = gpu_check.error_record(e)
        write()
        print(f"[{time.perf_counter() - START:6.1f}s] {tag}: {r}", flush=True)


if __name__ == "__main__":
    main()
