"""The GPU check: one command of at most 8 minutes that says what bcc does on a GPU.

Per workload (PixArt-alpha config in fp16, then SD-1.5 in fp16, then the numerics of a small
video DiT in fp16 and of PixArt-alpha in bf16, as far as the budget allows; random weights,
batch 2 as with guidance, DDIM), each section in its own ``try`` and each variant inside a
section in its own ``try``, the results written (JSON and Markdown) after every section:

* ``numerics``: final latents of plain eager, plain compiled, bcc all-True (branch graph,
  compiled) and bcc's eager rewrite; relative errors against plain eager, and bcc
  every-2 compiled against its eager rewrite.
* ``branch``: the default lowering (one graph, a ``torch.cond`` per block): trajectory time,
  per-step host time and CUDA-event GPU time, syncs, compiles/recompiles, against plain
  ``torch.compile`` with the same inductor options.
* ``specialize``: ``strategy="specialize"`` (one branch-free graph per distinct row).
* ``cudagraphs``: plain and ``strategy="specialize"`` with inductor's ``triton.cudagraphs``
  (what ``mode="reduce-overhead"`` turns on), same options for both; whether CUDA graphs
  engaged (inductor's skip counter), and the same timings.

Syncs are counted with ``torch.cuda.set_sync_debug_mode("warn")`` inside denoiser calls
only. bcc's branch predicates are ``.item()`` reads of 0-d *CPU* buffers (the schedule
and step live on the host), which are no CUDA syncs and are not counted.

A section starts only if the time left (``--budget-s``, from the script's start) covers
its estimate (compiles measured so far); a skipped one says so in the results.

Set-up on the GPU machine (Python 3.12, torch 2.11 + CUDA 13, no network, no diffusers):
bring the diffusers wheel (pure Python, any platform), from the repository root here::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: -d .whl diffusers==0.42.1

and run there, carrying ``.whl`` (its other needs are in the machine's image)::

    python3 -m pip install -q --no-index --no-deps --target .whl/site .whl/*.whl &&
    PYTHONPATH=.whl/site PYTHONUNBUFFERED=1 python3 examples/gpu_check.py --budget-s 420 --out "$OUT"

bcc itself needs no install: from a checkout the script puts the repository on
``sys.path`` and maps ``passes/`` to ``bcc.passes`` (what ``pip install .`` does). The
machine's own torch is used. A CPU dry run of every section::

    python examples/gpu_check.py --device cpu --tiny --out results/tmp/gpu_dry
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class _PassesFromCheckout(importlib.abc.MetaPathFinder):
    """``bcc.passes`` from the checkout's ``passes/``, asked only after every other finder
    (an installed bcc, editable or not, answers first)."""

    def find_spec(self, name, path=None, target=None):
        if name != "bcc.passes":
            return None
        init = ROOT / "passes" / "__init__.py"
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


sys.path.append(str(ROOT))
sys.meta_path.append(_PassesFromCheckout())

import bcc  # noqa: E402
from bcc.config import DEFAULT_INDUCTOR_OPTIONS  # noqa: E402
from bcc.tools.bench.workloads import build_workload  # noqa: E402

START = time.perf_counter()


def _left(budget: float) -> float:
    return budget - (time.perf_counter() - START)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def error_record(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400],
            "trace": traceback.format_exc()[-1500:]}


class Calls:
    """Wraps a denoiser: host time of each call, CUDA-event GPU time, and (optionally)
    the CUDA syncs inside the call, from ``torch.cuda.set_sync_debug_mode("warn")``."""

    def __init__(self, fn, device: torch.device, count_syncs: bool = False):
        self.fn, self.device, self.count_syncs = fn, device, count_syncs
        self.host: list[float] = []
        self.events: list[tuple] = []
        self.syncs = 0

    def __call__(self, *args, **kwargs):
        cuda = self.device.type == "cuda"
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        t0 = time.perf_counter()
        if self.count_syncs and cuda:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = self.fn(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            self.syncs += sum("synchroniz" in str(w.message) for w in seen)
        else:
            out = self.fn(*args, **kwargs)
        self.host.append(time.perf_counter() - t0)
        if cuda:
            end.record()
            self.events.append((begin, end))
        return out

    def gpu_ms(self) -> list[float]:
        return [b.elapsed_time(e) for b, e in self.events]


def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"compiles": counters["frames"].get("ok", 0), "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"].get("cudagraph_skips", 0)}


def _delta(before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in _dynamo_counts().items()}


def _variant(w, fn, device: torch.device, repeats: int, before=None) -> dict:
    """First trajectory (compiles) timed apart; then ``repeats`` timed ones, then one
    that counts syncs. Dynamo's compiles are counted in the first and after it (recompiles:
    none expected once every row has run)."""
    counts = _dynamo_counts()
    before and before()
    sync(device)
    t0 = time.perf_counter()
    w.run(fn)
    sync(device)
    r = {"first_trajectory_s": time.perf_counter() - t0, "compiles": _delta(counts)["compiles"]}
    counts_after = _dynamo_counts()
    times, host, gpu = [], [], []
    for _ in range(repeats):
        calls = Calls(fn, device)
        before and before()
        sync(device)
        t0 = time.perf_counter()
        w.run(calls)
        sync(device)
        times.append(time.perf_counter() - t0)
        host += calls.host
        gpu += calls.gpu_ms()
    r["trajectory_s"] = statistics.median(times)
    r["step_host_ms"] = 1000 * statistics.median(host)
    r["step_gpu_ms"] = statistics.median(gpu) if gpu else None
    counted = Calls(fn, device, count_syncs=True)
    before and before()
    w.run(counted)
    r["syncs_per_step"] = counted.syncs / len(counted.host) if device.type == "cuda" else None
    r["recompiles"] = _delta(counts_after)["compiles"]
    r["dynamo"] = _delta(counts)
    stats = getattr(fn, "bcc_stats", None)
    if stats is not None:
        s = stats()
        r["bcc_graphs"], r["cache_mib"] = s["graphs"], s["cache_bytes"] / 2**20
    return r


def _run_variants(variants: dict, out: dict, w, device, repeats) -> None:
    for name, (make, before) in variants.items():
        try:
            out[name] = _variant(w, make(), device, repeats, before)
        except Exception as e:  # recorded: one variant's failure never loses another's
            out[name] = error_record(e)
    base = out.get("plain", {}).get("trajectory_s")
    for name, r in out.items():
        if base and isinstance(r, dict) and r.get("trajectory_s"):
            r["speedup_vs_plain"] = base / r["trajectory_s"]


class Check:
    """All sections of one run, written to ``out`` after each."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.compile_s = 30.0 if not args.tiny else 2.0  # per compile, until one is measured
        card = torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"
        self.results = {"card": card, "torch": torch.__version__, "cuda": torch.version.cuda,
                        "python": sys.version.split()[0], "budget_s": args.budget_s,
                        "command": _command(args), "sections": {}}

    def options(self, **extra) -> dict:
        return {**DEFAULT_INDUCTOR_OPTIONS, **extra}

    def compiled(self, model, **options):
        if self.args.backend == "inductor":
            return torch.compile(model, fullgraph=True, options=self.options(**options))
        return torch.compile(model, fullgraph=True, backend=self.args.backend)

    def bcc(self, model, schedule, **kw):
        return bcc.compile(model, schedule, backend=self.args.backend, inductor_options=self.options(**kw.pop("opts", {})),
                           **kw)

    def section(self, key: str, compiles: int, body) -> None:
        need = compiles * self.compile_s + 10
        if _left(self.args.budget_s) < need:
            self.results["sections"][key] = {"skipped": f"budget: {_left(self.args.budget_s):.0f} s left, "
                                                        f"about {need:.0f} s needed"}
        else:
            t0 = time.perf_counter()
            r: dict = {}
            try:
                body(r)
            except Exception as e:
                r.update(error_record(e))
            r["seconds"] = time.perf_counter() - t0
            self.results["sections"][key] = r
            firsts = [v["first_trajectory_s"] for v in r.values() if isinstance(v, dict) and "first_trajectory_s" in v]
            firsts += [v for k, v in r.items() if k.endswith("first_trajectory_s")]
            if firsts:
                self.compile_s = max(self.compile_s, max(firsts))
        self.results["elapsed_s"] = time.perf_counter() - START
        self.write()
        print(f"[{time.perf_counter() - START:6.1f}s] {key}: {json.dumps(_brief(self.results['sections'][key]))}",
              flush=True)

    def write(self) -> None:
        (self.out / "gpu_results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "gpu_results.md").write_text(_markdown(self.results))

    # -- sections ----------------------------------------------------------------------
    def setup(self, r: dict) -> None:
        import diffusers

        r.update(bcc=_relative(Path(bcc.__file__).parent), diffusers=diffusers.__version__,
                 device=str(self.device), tiny=self.args.tiny, backend=self.args.backend)
        if self.device.type == "cuda":
            r["memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30

    def workload(self, name: str, latent: int, dtype: torch.dtype, numerics_only: bool = False) -> None:
        args, device = self.args, self.device
        w = build_workload(name, latent=latent, steps=args.steps, device=device, dtype=dtype)
        w.model.requires_grad_(False)
        T = args.steps
        tag = _tag(name, dtype)
        state: dict = {}

        def numerics(r: dict) -> None:
            ref = w.run(w.model)
            probe = bcc.compile(w.model, lambda n: bcc.Schedule.all_compute(T, n), blocks=w.blocks, backend="eager")
            rewrite = w.run(probe)
            names = state["names"] = probe.bcc_schedule.block_names
            r["blocks"] = len(names)
            r["bcc_eager_rewrite_vs_plain_eager"] = _relerr(rewrite, ref)
            # Kept for the timing sections (their compiles are this section's).
            for key, slot, make in (("plain_compiled_vs_plain_eager", "plain", lambda: self.compiled(w.model)),
                                    ("bcc_all_true_vs_plain_eager", "fast",
                                     lambda: self.bcc(w.model, bcc.Schedule.all_compute(T, names)))):
                try:
                    fn = make()
                    t0 = time.perf_counter()
                    got = w.run(fn)
                    sync(device)
                    r[f"{slot}_first_trajectory_s"] = time.perf_counter() - t0  # its compile
                    r[key] = _relerr(got, ref)
                    state[slot] = fn
                except Exception as e:
                    r[key] = error_record(e)
            try:
                every2 = bcc.Schedule.every(2, T, names)
                fast = state.get("fast")
                if fast is None:
                    raise RuntimeError("bcc all-True did not compile")
                fast.set_schedule(every2)
                eager2 = bcc.compile(w.model, every2, backend="eager")
                r["bcc_every2_compiled_vs_eager_rewrite"] = _relerr(w.run(fast), w.run(eager2))
                r["bcc_every2_vs_plain_eager"] = _relerr(w.run(fast), ref)
            except Exception as e:
                r["bcc_every2_compiled_vs_eager_rewrite"] = error_record(e)

        self.section(f"{tag}:numerics", 2, numerics)
        if numerics_only or "names" not in state:
            return
        names = state["names"]
        sched = {"all": bcc.Schedule.all_compute(T, names), "every-2": bcc.Schedule.every(2, T, names)}

        def branch(r: dict) -> None:
            plain = state["plain"] if "plain" in state else self.compiled(w.model)
            fast = state["fast"] if "fast" in state else self.bcc(w.model, sched["all"])
            variants = {"plain": ((lambda: plain), None)}
            for k, s in sched.items():
                variants[f"bcc[{k}]"] = ((lambda: fast), (lambda s=s: fast.set_schedule(s)))
            _run_variants(variants, r, w, device, args.repeats)

        def specialize(r: dict) -> None:
            spec = self.bcc(w.model, sched["all"], strategy="specialize")
            variants = {f"specialize[{k}]": ((lambda: spec), (lambda s=s: spec.set_schedule(s))) for k, s in sched.items()}
            _run_variants(variants, r, w, device, args.repeats)

        def cudagraphs(r: dict) -> None:
            graphs = {"triton.cudagraphs": True}
            r["asked"] = "inductor_options={'triton.cudagraphs': True} for both"
            spec: dict = {}

            def make_spec():  # built at its first variant's turn, inside that variant's try
                if "m" not in spec:
                    spec["m"] = self.bcc(w.model, sched["all"], strategy="specialize", opts=graphs)
                return spec["m"]
            variants = {"plain": ((lambda: self.compiled(w.model, **graphs)), None)}
            for k, s in sched.items():
                variants[f"specialize+cudagraphs[{k}]"] = (make_spec, (lambda s=s: spec["m"].set_schedule(s)))
            _run_variants(variants, r, w, device, args.repeats)
            for k, v in r.items():
                if isinstance(v, dict) and "dynamo" in v:
                    v["cudagraphs_engaged"] = device.type == "cuda" and v["dynamo"]["cudagraph_skips"] == 0
            try:  # the branch graph asks for CUDA graphs: bcc refuses, never skips silently
                from bcc.lower.compile import RowDispatch

                RowDispatch.check_strategy(bcc.BccConfig(inductor_options=graphs))
                r["branch_refused"] = False
            except bcc.BccError as e:
                r["branch_refused"] = str(e)[:120]

        # CUDA graphs before plain specialise: they are the GPU-only path, specialise is
        # the same graphs without them.
        self.section(f"{tag}:branch", 1, branch)
        self.section(f"{tag}:cudagraphs", 3, cudagraphs)
        self.section(f"{tag}:specialize", 2, specialize)

    def run(self) -> None:
        self.section("setup", 0, self.setup)
        half = torch.float16 if self.device.type == "cuda" else torch.float32
        # The tiny dry run checks the sections' code once; bf16 there would only add compiles.
        # (workload, latent side, dtype, numerics only). The video DiT is small (6 blocks,
        # width 256): its numerics say whether the video path compiles and runs on CUDA.
        plan = ([("pixart", 8, half, False), ("wan-bench", 8, half, True)] if self.args.tiny else
                [("pixart-alpha", 64, half, False), ("sd15", 64, half, False), ("wan-bench", 32, half, True),
                 ("pixart-alpha", 64, torch.bfloat16, True)])
        for name, latent, dtype, numerics_only in plan:
            if self.args.workloads and _tag(name, dtype) not in self.args.workloads and name not in self.args.workloads:
                continue
            try:
                self.workload(name, latent, dtype, numerics_only)
            except Exception as e:  # building the workload failed: record and go on
                self.results["sections"][f"{_tag(name, dtype)}:build"] = error_record(e)
                self.write()


def _tag(name: str, dtype: torch.dtype) -> str:
    """A workload's name in the results and in ``--workloads``: ``pixart-alpha/float16``."""
    return f"{name}/{str(dtype).removeprefix('torch.')}"


def _relative(path: Path) -> str:
    """``path`` relative to the checkout where it lies inside it (results carry no machine paths)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _command(args) -> str:
    # The output folder is the machine's ($OUT on the GPU machine): recorded by name only.
    out = "$OUT" if str(args.out) == os.environ.get("OUT") else _relative(Path(args.out))
    return " ".join(["examples/gpu_check.py", *(out if a == str(args.out) else a for a in sys.argv[1:])])


def _brief(r: dict) -> dict:
    return {k: (v if not isinstance(v, dict) else
                {kk: vv for kk, vv in v.items() if kk in ("error", "trajectory_s", "speedup_vs_plain", "syncs_per_step")})
            for k, v in r.items() if k != "trace"}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if math.isfinite(v) else str(v)
    if isinstance(v, dict) and "error" in v:
        return f"error: {v['error'][:80]}"
    return "" if v is None else str(v)


def _markdown(results: dict) -> str:
    lines = [f"# GPU check on {results['card']}", "",
             f"torch {results['torch']} (CUDA {results['cuda']}), Python {results['python']}; "
             f"`{results['command']}`; {results.get('elapsed_s', 0):.0f} s of a {results['budget_s']} s budget.", ""]
    for key, r in results["sections"].items():
        lines.append(f"## {key}")
        if "skipped" in r or "error" in r:
            lines += [f"{r.get('skipped') or 'error: ' + r['error']}", ""]
        rows = {k: v for k, v in r.items() if isinstance(v, dict) and "trace" not in k}
        flat = {k: v for k, v in r.items() if not isinstance(v, dict) and k not in ("trace", "error", "skipped")}
        if flat:
            lines += [", ".join(f"{k} {_fmt(v)}" for k, v in flat.items()), ""]
        if rows:
            cols = ["trajectory_s", "speedup_vs_plain", "step_host_ms", "step_gpu_ms", "syncs_per_step",
                    "first_trajectory_s", "compiles", "recompiles", "bcc_graphs", "cache_mib", "cudagraphs_engaged",
                    "error"]
            lines += ["| variant | " + " | ".join(cols) + " | graph breaks / cudagraph skips |",
                      "|---" * (len(cols) + 2) + "|"]
            for k, v in rows.items():
                d = v.get("dynamo") or {}
                dyn = " / ".join(str(d.get(x, "")) for x in ("graph_breaks", "cudagraph_skips"))
                lines.append(f"| {k} | " + " | ".join(_fmt(v.get(c)) for c in cols) + f" | {dyn} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    ap.add_argument("--tiny", action="store_true", help="tiny models: checks the script, not the GPU")
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="seconds from the start; a section that would not fit is skipped (default 420, "
                         "inside one 8-minute command)")
    ap.add_argument("--steps", type=int, default=None, help="denoiser calls per trajectory (default 20, tiny 4)")
    ap.add_argument("--repeats", type=int, default=None, help="timed trajectories per variant (default 3, tiny 1)")
    ap.add_argument("--backend", default="inductor",
                    help="torch.compile backend for plain and bcc alike (default inductor; aot_eager for a fast dry run)")
    ap.add_argument("--workloads", nargs="*", default=None,
                    help="run only these (a name such as sd15 or wan-bench, or name/dtype such as pixart-alpha/bfloat16); "
                         "default: all, in order, as far as the budget allows")
    ap.add_argument("--out", default=os.environ.get("OUT", "results/gpu"), help="where gpu_results.{json,md} go")
    args = ap.parse_args()
    args.steps = args.steps or (4 if args.tiny else 20)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device; pass --device cpu --tiny for a dry run")
    torch.manual_seed(0)
    Check(args).run()


if __name__ == "__main__":
    main()
