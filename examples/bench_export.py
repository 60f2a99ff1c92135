"""Benchmark the torch.compile backend and the AOTInductor package (measures, asserts nothing).

For each model, side by side in one run:

* compile time (first call) of plain ``torch.compile`` vs ``torch.compile(backend="bcc")``,
  each in a fresh process with an empty inductor cache, alternating, repeated;
* per-step latency over whole trajectories of plain ``torch.compile``, the bcc backend
  and the AOTInductor package from ``bcc.export`` (loaded with ``bcc.load_exported``),
  alternating in one process, medians over repeats; plus the package's build time and
  its largest difference from the compiled module.

    OMP_NUM_THREADS=1 python examples/bench_export.py --models unet-tiny dit --out results/export
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

def _inductor() -> dict:
    """bcc's default inductor settings, given to the plain model too (one place decides them)."""
    import bcc

    return dict(bcc.BccConfig().inductor_options)


def _setup(name: str, latent: int, batch: int, steps: int):
    import bcc
    from bcc.tools import zoo

    model, args, kwargs = zoo.build(name, latent=latent, batch=batch)
    schedule = bcc.Schedule.every(2, steps, bcc.find_blocks(model, (args, kwargs)))
    spec = zoo.spec_of(model)
    inputs = [spec.step_inputs(model, step=s, num_steps=steps) for s in range(steps)]
    return model, schedule, inputs


def _compiled(model, schedule, variant: str):
    if variant == "plain":
        return torch.compile(model, fullgraph=True, dynamic=False, options=_inductor())
    return torch.compile(model, backend="bcc", fullgraph=True, dynamic=False,
                         options={"schedule": schedule, "inductor_options": _inductor()})


def _child(variant: str, name: str, latent: int, batch: int, steps: int) -> None:
    """One compile in a fresh process: prints the first call's seconds as JSON."""
    torch.set_num_threads(1)
    model, schedule, inputs = _setup(name, latent, batch, steps)
    fn = _compiled(model, schedule, variant)
    a, k = inputs[0]
    with torch.no_grad():
        start = time.perf_counter()
        fn(*a, **k)
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds}))


def _compile_time(variant: str, name: str, latent: int, batch: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": cache,
               "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
        out = subprocess.run([sys.executable, __file__, "--child", variant, name, str(latent), str(batch), str(steps)],
                             capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def _trajectory_seconds(fn, inputs) -> list[float]:
    times = []
    with torch.no_grad():
        for a, k in inputs:
            start = time.perf_counter()
            fn(*a, **k)
            times.append(time.perf_counter() - start)
    return times


def bench_model(name: str, latent: int, batch: int, steps: int, repeats: int, workdir: Path) -> dict:
    import bcc

    torch._dynamo.reset()
    row: dict = {"model": name, "latent": latent, "batch": batch, "steps": steps, "schedule": "every 2"}
    compile_s: dict[str, list[float]] = {"plain": [], "bcc": []}
    for _ in range(repeats):
        for variant in ("plain", "bcc"):
            compile_s[variant].append(_compile_time(variant, name, latent, batch, steps))
    row["compile_s"] = {v: statistics.median(s) for v, s in compile_s.items()}
    row["compile_s_all"] = compile_s
    row["compile_ratio"] = row["compile_s"]["bcc"] / row["compile_s"]["plain"]

    model, schedule, inputs = _setup(name, latent, batch, steps)
    start = time.perf_counter()
    ep = bcc.export(model, schedule, inputs[0])
    row["export_s"] = time.perf_counter() - start
    start = time.perf_counter()
    path = bcc.save_exported(ep, workdir / f"{name}.pt2", aoti=True)
    row["aoti_build_s"] = time.perf_counter() - start
    runners = {"plain": _compiled(model, schedule, "plain"), "bcc": _compiled(model, schedule, "bcc"),
               "aoti": bcc.load_exported(path)}
    outs = {}
    for variant, fn in runners.items():  # warm-up trajectory (compiles), kept to compare outputs
        with torch.no_grad():
            outs[variant] = [torch.utils._pytree.tree_leaves(fn(*a, **k))[0] for a, k in inputs]
    row["aoti_vs_bcc_max_abs_diff"] = max(float((x - y).abs().max()) for x, y in zip(outs["aoti"], outs["bcc"]))
    step_s: dict[str, list[float]] = {v: [] for v in runners}
    for r in range(repeats * 2):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for variant in order:
            step_s[variant].append(statistics.mean(_trajectory_seconds(runners[variant], inputs)))
    row["step_ms"] = {v: 1000 * statistics.median(s) for v, s in step_s.items()}
    row["aoti_over_bcc_step"] = row["step_ms"]["aoti"] / row["step_ms"]["bcc"]
    row["ideal_speedup"] = schedule.ideal_speedup()
    return row


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# bcc backend and AOTInductor package: compile time and per-step latency",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} torch thread(s); the machine was "
        "shared with other jobs, so absolute times are noisy; ratios come from runs side by side.",
        "",
        "Compile time = first call (Dynamo + bcc rewrite + inductor), each in a fresh process with an empty "
        "inductor cache, median of the repeats. Step latency = mean step time over a whole trajectory "
        "(schedule: all blocks recompute every 2nd step), median over alternating repeats.",
        "",
        "| model | steps | compile plain | compile bcc | ratio bcc/plain | export | AOTI build | step plain | "
        "step bcc | step AOTI | AOTI/bcc | max diff AOTI vs bcc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} (latent {r['latent']}, batch {r['batch']}) | {r['steps']} | {r['compile_s']['plain']:.1f} s | "
            f"{r['compile_s']['bcc']:.1f} s | {r['compile_ratio']:.2f}x | {r['export_s']:.1f} s | {r['aoti_build_s']:.1f} s | "
            f"{r['step_ms']['plain']:.2f} ms | {r['step_ms']['bcc']:.2f} ms | {r['step_ms']['aoti']:.2f} ms | "
            f"{r['aoti_over_bcc_step']:.2f} | {r['aoti_vs_bcc_max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        variant, name, latent, batch, steps = argv[1:6]
        _child(variant, name, int(latent), int(batch), int(steps))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["unet-tiny", "dit"])
    p.add_argument("--latent", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="results/export")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in args.models:
            rows.append(bench_model(name, args.latent, args.batch, args.steps, args.repeats, Path(work)))
            print(json.dumps(rows[-1]), flush=True)
    meta = {"command": "OMP_NUM_THREADS=1 python examples/bench_export.py " + " ".join(argv),
            "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores)", "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    (out / "bench_export.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "bench_export.md").write_text(_markdown(rows, meta))
    print(_markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
