"""bcc bench speed: how fast bcc samples, against the schedule's ideal and the plain model.

For each workload it builds one plain compiled model and one bcc model per backend
(compiled and eager), then times whole trajectories of every variant side by side,
alternating, and reports medians:

* ``plain``: the model as is (eager) or under ``torch.compile`` (same inductor options);
* bcc at the schedules ``all`` (nothing reused: the gate's overhead), ``every-2``,
  ``every-3`` and automatic schedules at compute budgets 0.7 and 0.5, per block
  (``auto-F``, the paper) and step-level (``step-F``), swapped with
  ``set_schedule`` so one compiled graph serves them all (the graph count is recorded).

With each: the ideal speedup from the FLOPs the schedule executes, the efficiency
(measured / ideal), the median per-step latency of computing steps, compile time (cold
inductor cache), the caches' memory and the process's peak resident memory during a
trajectory. ``--specialize`` and ``--hybrid`` time those strategies too
(:mod:`bcc.tools.bench.lowerings`). Peers (DeepCache, diffusers' cache hooks) join through
:mod:`bcc.tools.bench.peers`, and each peer setting's decisions are replayed by bcc
(:func:`bcc.tools.bench.peers_bench.replay_peers`). Nothing here asserts: it measures and
writes Markdown, JSON and a plot.

Example (a few seconds)::

    python -m bcc.tools.bench.speed --workloads unet-tiny --steps 4 --repeats 1 --out results/tmp/speed
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import bcc
from bcc.plan.calibrate import block_flops
from bcc.config import DEFAULT_INDUCTOR_OPTIONS

from bcc.tools.bench.lowerings import EXTRA_LOWERINGS
from bcc.tools.bench.workloads import Workload, build_workload

__all__ = ["main", "bench_workload", "SCHEDULES"]

SCHEDULES = ("all", "every-2", "every-3", "auto-0.7", "auto-0.5", "step-0.7", "step-0.5")
DENSE = ("auto-0.9", "auto-0.8", "auto-0.6", "auto-0.4", "step-0.9", "step-0.8", "step-0.6", "step-0.4", "step-0.3")


class _StepTimer:
    """Stands in for a denoiser and records the wall time of each call."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.times: list[float] = []
        # sample() reads config/dtype/parameters from the denoiser it is given, and its
        # calling convention from digits_arch.
        self.config = getattr(fn, "config", None)
        from bcc.tools.digits.model import denoiser_arch

        self.digits_arch = denoiser_arch(fn) if isinstance(fn, torch.nn.Module) else None

    def __getattr__(self, name):
        return getattr(self.__dict__["fn"], name)

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.times.append(time.perf_counter() - t0)
        return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRss:
    """Samples the resident set every few ms on a side thread (CPU has no allocator peak counter)."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def schedules_for(w: Workload, names, profile) -> dict[str, bcc.Schedule]:
    """The named schedules over the profile's blocks (``all``, ``every-N``, ``auto-F``, ``step-F``)."""
    out = {}
    blocks = profile.block_names
    for key in names:
        if key == "all":
            s = bcc.Schedule.all_compute(w.steps, blocks)
        elif key.startswith("every-"):
            s = bcc.Schedule.every(int(key.split("-")[1]), w.steps, blocks)
        elif key.startswith("auto-"):
            s = bcc.Schedule.for_budget(profile, float(key.split("-")[1]))
        elif key.startswith("step-"):
            s = bcc.Schedule.for_budget(profile, float(key.split("-")[1]), granularity="step")
        elif key.startswith(("plan-", "region-")):
            continue  # searched on the compiled model, or over other blocks (bench_workload)
        else:
            raise ValueError(f"unknown schedule {key!r}; use all, every-N, auto-F (per block), step-F "
                             "(step-level: all blocks refresh together), plan-F (searched at budget F), "
                             "region-bB-N (DeepCache's branch B as one region, every N steps) or region-span-N "
                             "(the first to the last block as one region)")
        out[key] = s
    return out


@dataclass(frozen=True)
class _Variant:
    """One timed denoiser and what to run before each of its trajectories (swap in its schedule)."""

    fn: Callable
    before: Callable[[], Any] | None = None
    run: Callable | None = None  # another loop than the workload's (the fewer-steps baseline)

    def prepare(self) -> Callable:
        """Run ``before`` and return the denoiser to time."""
        if self.before is not None:
            self.before()
        return self.fn


def _time_variants(w: Workload, variants: dict[str, _Variant], repeats: int, log) -> dict:
    """Alternate whole trajectories of every variant ``repeats`` times; medians."""
    totals = {k: [] for k in variants}
    steps = {k: [] for k in variants}
    for variant in variants.values():  # warm-up: first calls capture, compile, allocate
        (variant.run or w.run)(variant.prepare())
    for r in range(repeats):
        for key, variant in variants.items():
            timer = _StepTimer(variant.prepare())
            t0 = time.perf_counter()
            (variant.run or w.run)(timer)
            totals[key].append(time.perf_counter() - t0)
            steps[key].append(timer.times)
        log(f"   repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in totals.items()))
    return {k: {"trajectory_s": statistics.median(v), "all_s": v,
                "step_s": [statistics.median(col) for col in zip(*steps[k])]} for k, v in totals.items()}


def bench_workload(w: Workload, *, schedules=SCHEDULES, repeats: int = 3, eager: bool = True,
                   eager_schedules=("all", "auto-0.5"), specialize: int = 0, hybrid: bool = False,
                   peers: bool | str = False,
                   peer_sweep: str = "full", fewer: Sequence[int] = (), search_seeds: Sequence[int] = (1000, 1001),
                   log=print) -> dict:
    """Measure one workload; returns a JSON-able dict (see the module docstring).

    ``plan-F`` schedules are searched (:func:`bcc.search_schedule`) on the compiled model
    at budget ``F`` of a cost model measured on it, scored on ``search_seeds`` (apart from
    the seed the fidelity is measured on). ``fewer``: step counts of the plain model to
    time and score beside (the trained workloads only).

    ``peers``: ``False``, ``"eager"``, ``"compiled"`` (eager and compiled) or ``"auto"``
    (compiled on the small trained models only: a peer's graph breaks make every setting
    a fresh multi-graph compile, minutes each on the big configs).
    """
    log(f"== {w.name}: {w.describe}")
    t0 = time.perf_counter()
    profile = bcc.calibrate(w.model, lambda m, cond, seed: w.run(m, seed=seed), [0], seeds=[100, 101],
                            blocks=w.blocks, scheduler=w.scheduler, progress=False)
    calib_s = time.perf_counter() - t0
    costs, rest = list(profile.block_flops), profile.rest_flops
    sched = schedules_for(w, schedules, profile)
    log(f"   calibrated {profile.num_blocks} blocks in {calib_s:.0f}s; fractions: "
        + ", ".join(f"{k} {s.compute_fraction(costs, rest):.3f}" for k, s in sched.items()))

    opts = dict(DEFAULT_INDUCTOR_OPTIONS)
    plain_c = torch.compile(w.model, fullgraph=True, options=opts)
    bcc_c = bcc.compile(w.model, sched["all"])
    result: dict[str, Any] = {"workload": w.name, "describe": w.describe, "steps": w.steps,
                              "blocks": list(profile.block_names), "calibration_s": calib_s,
                              "block_flops": costs, "rest_flops": rest, "schedules": {}}
    # Compile times: the first trajectory of each compiled model (the first call compiles).
    comp = {}
    for key, fn in (("plain", plain_c), ("bcc", bcc_c)):
        t0 = time.perf_counter()
        g0 = _graphs()
        fn_timer = _StepTimer(fn)
        w.run(fn_timer)
        comp[key] = {"first_trajectory_s": time.perf_counter() - t0, "first_call_s": fn_timer.times[0],
                     "graphs": _graphs() - g0}
    log(f"   compile (first call): plain {comp['plain']['first_call_s']:.1f}s, bcc {comp['bcc']['first_call_s']:.1f}s")
    result["compile"] = comp
    planned = [k for k in schedules if k.startswith("plan-")]
    searched = _search(w, bcc_c, profile, planned, sched, result, repeats, search_seeds, log) if planned else {}

    def scheduled(model, s) -> _Variant:
        return _Variant(model, lambda: model.set_schedule(s))

    regions = {**_region_schedules(w, [k for k in schedules if k.startswith("region-")], profile, log), **searched}
    variants = {"plain": _Variant(plain_c)}
    variants.update({f"bcc[{k}]": scheduled(bcc_c, s) for k, s in sched.items()})
    variants.update({f"bcc[{k}]": scheduled(r.model, r.schedule) for k, r in regions.items()})
    fewer_w = {k: w.at_steps(k) for k in fewer} if fewer and w.at_steps is not None else {}
    variants.update({f"fewer[{k}]": _Variant(plain_c, run=fw.run) for k, fw in fewer_w.items()})
    for lw in EXTRA_LOWERINGS:
        # specialize: one graph per distinct row (and caches the next row reads), compiled
        # at first use, so only the schedules with at most `specialize` distinct rows (a
        # per-block schedule has up to one per step, each a compile); hybrid: four at most.
        if lw.strategy == "specialize":
            few = {k: s for k, s in sched.items() if len({tuple(r) for r in s.mask.tolist()}) <= specialize}
        else:
            few = dict(sched) if hybrid else {}
        if not few:
            continue
        model = bcc.compile(w.model, sched["all"], strategy=lw.strategy)
        t0 = time.perf_counter()
        for s in few.values():
            model.set_schedule(s)
            w.run(model)
        rows = model.bcc_stats()["graphs"]
        comp[lw.strategy] = {"all_rows_s": time.perf_counter() - t0, "graphs": rows, "schedules": list(few)}
        log(f"   {lw.label}: {rows} graphs compiled in {comp[lw.strategy]['all_rows_s']:.1f}s")
        variants.update({f"{lw.prefix}[{k}]": scheduled(model, s) for k, s in few.items()})
    g0 = _graphs()
    timed = _time_variants(w, variants, repeats, log)
    result["graphs_during_timing"] = _graphs() - g0  # 0: every schedule reuses its model's one graph
    result["compiled"] = timed
    if eager:
        bcc_e = bcc.compile(w.model, sched["all"], backend="eager")
        # The plain compiled model alternates with the eager one here too, so compiled / eager
        # (which puts eager peers on the compiled scale) is a same-phase ratio.
        ev = {"plain": _Variant(w.model), "plain compiled": _Variant(plain_c)}
        ev.update({f"bcc[{k}]": scheduled(bcc_e, sched[k]) for k in eager_schedules if k in sched})
        result["eager"] = _time_variants(w, ev, repeats, log)
    # Memory: one more trajectory per compiled variant, sampled outside the timed runs.
    mem = {}
    for key, variant in variants.items():
        fn = variant.prepare()
        with _PeakRss() as m:
            (variant.run or w.run)(fn)
        mem[key] = {"peak_rss_delta_mb": (m.peak - m.base) / 2**20, "peak_rss_mb": m.peak / 2**20}
    result["cache_mb"] = bcc_c.bcc_stats()["cache_bytes"] / 2**20
    result["memory"] = mem
    result["schedules"] = {k: {"threshold": s.meta.get("threshold"), "mask": s.mask.int().tolist()}
                           for k, s in sched.items()}
    result["schedules"].update({k: {"mask": r.schedule.mask.int().tolist(), "blocks": list(r.schedule.block_names),
                                    "block_flops": r.costs, "rest_flops": r.rest} for k, r in regions.items()})
    for k in result["schedules"]:
        for backend, t, key in (("compiled", result.get("compiled", {}), f"bcc[{k}]"),
                                ("eager", result.get("eager", {}), f"bcc[{k}]"),
                                *((lw.strategy, result.get("compiled", {}), f"{lw.prefix}[{k}]")
                                  for lw in EXTRA_LOWERINGS)):
            if key in t:
                result["schedules"][k][backend] = {"speedup": t["plain"]["trajectory_s"] / t[key]["trajectory_s"]}
    _rows(result, costs, rest)
    if w.trained:
        result["fidelity"] = _fidelity(w, bcc_c, sched)
        result["fidelity"].update({k: _fidelity(w, r.model, {k: r.schedule})[k] for k, r in regions.items()})
    if fewer_w:
        from bcc.tools.metrics import paired_report

        ref = w.run(w.model)
        result["fewer"] = {str(k): {"steps": k, "speedup": timed["plain"]["trajectory_s"] / timed[f"fewer[{k}]"]["trajectory_s"],
                                    "compute_fraction": k / w.steps, **paired_report(fw.run(w.model), ref)}
                           for k, fw in fewer_w.items()}
    if peers:
        from bcc.tools.bench.peers_bench import bench_peers, compare_with_bcc, replay_peers

        compiled_peers = w.trained if peers == "auto" else peers in ("compiled", "compiled-only")
        result["peers"] = bench_peers(w, plain_c, repeats=repeats, compiled=compiled_peers,
                                      eager=peers != "compiled-only", sweep=peer_sweep, log=log)
        result["peer_replay"] = replay_peers(w, plain_c, result["peers"]["rows"], repeats=repeats,
                                             compiled={tuple(profile.block_names): bcc_c}, log=log)
        result["peer_comparison"] = compare_with_bcc(result)
    return result


@dataclass(frozen=True)
class _RegionRun:
    """A region schedule: its own compiled model (other blocks than the profile's) and FLOPs."""

    model: Any
    schedule: bcc.Schedule
    costs: list
    rest: float


def _region_schedules(w: Workload, keys: Sequence[str], profile, log) -> dict[str, _RegionRun]:
    """``region-bB-N``: DeepCache's branch ``B`` (:func:`bcc.unet_branch`) as one region, every
    ``N`` steps; ``region-span-N``: the profile's first to last block as one region. One
    compiled model per region serves its every-N schedules."""
    out: dict[str, _RegionRun] = {}
    models: dict[str, tuple] = {}
    for key in keys:
        _, which, n = key.split("-")
        if which.startswith("b") and not hasattr(w.model, "down_blocks"):
            log(f"   {key}: skipped (DeepCache's branches are a UNet's)")
            continue
        name = (bcc.unet_branch(w.model, int(which[1:])) if which.startswith("b")
                else bcc.region(profile.block_names[0], profile.block_names[-1]))
        s = bcc.Schedule.every(int(n), w.steps, [name])
        if name not in models:
            costs, rest = _region_flops(w, [name])
            model = bcc.compile(w.model, s)
            w.run(model)  # compile now, before the timing counts graphs
            models[name] = (model, costs, rest)
            log(f"   region {name}: {costs[0] / (costs[0] + rest):.3f} of the FLOPs")
        model, costs, rest = models[name]
        out[key] = _RegionRun(model, s, costs, rest)
    return out


def _region_flops(w: Workload, names) -> tuple[list, float]:
    """FLOPs of ``names`` (regions among them) on this workload, from one short calibration."""
    p = bcc.calibrate(w.model, lambda m, cond, seed: w.run(m, seed=seed), [0], seeds=[100],
                      blocks=list(names), scheduler=w.scheduler, progress=False)
    return list(p.block_flops), p.rest_flops


def _search(w: Workload, bcc_c, profile, planned, sched: dict, result: dict, repeats: int, seeds,
            log) -> dict[str, _RegionRun]:
    """Search ``plan-F`` schedules on the compiled model, spending a measured cost model; a
    chosen region schedule comes back as a :class:`_RegionRun` (it runs on its own model)."""
    t0 = time.perf_counter()
    cost = bcc.CostModel.measure(bcc_c, w.run, profile, repeats=repeats)
    result["cost_model"] = {"block_costs_s": list(cost.block_costs), "rest_cost_s": cost.rest_cost,
                            **cost.meta, "measure_s": time.perf_counter() - t0}
    log(f"   cost model: rest {cost.rest_cost * 1e3:.1f} ms/step, blocks {sum(cost.block_costs) * 1e3:.1f} ms/step "
        f"(fit within {cost.meta['fit_max_rel_error']:.1%} of the timed schedules)")
    result["search"] = {}
    regions: dict[str, _RegionRun] = {}
    for key in planned:
        t0 = time.perf_counter()
        try:
            found = bcc.search_schedule(bcc_c, lambda m, seed: w.run(m, seed=seed), profile,
                                        float(key.split("-")[1]), cost=cost, seeds=tuple(seeds), progress=False)
        except bcc.BccError as e:
            if e.code is not bcc.ErrorCode.BUDGET_UNREACHABLE:
                raise
            result["search"][key] = {"unreachable": str(e)}
            log(f"   {key}: {e}")
            continue
        if found.denoiser is bcc_c:
            sched[key] = found.schedule
        else:
            regions[key] = _RegionRun(found.denoiser, found.schedule, *_region_flops(w, found.schedule.block_names))
        result["search"][key] = {**found.to_dict(), "search_s": time.perf_counter() - t0}
        log(f"   {key}: {found.chosen.family}, {found.chosen.psnr_db:.1f} dB on the search seeds, "
            f"{len(found.tried)} schedules scored in {time.perf_counter() - t0:.0f}s")
    return regions


def _fidelity(w: Workload, bcc_model, sched) -> dict:
    """Paired PSNR of each schedule against the plain model from the same noise."""
    from bcc.tools.metrics import paired_report

    ref = w.run(w.model)
    out = {}
    for k, s in sched.items():
        bcc_model.set_schedule(s)
        out[k] = paired_report(w.run(bcc_model), ref)
    return out


def _rows(result: dict, costs, rest) -> None:
    """(Re)compute each schedule's fraction, ideal, speedups and efficiencies from its mask."""
    for k, row in result["schedules"].items():
        s = bcc.Schedule(torch.tensor(row["mask"], dtype=torch.bool), row.get("blocks", result["blocks"]))
        frac = s.compute_fraction(row.get("block_flops", costs), row.get("rest_flops", rest))
        row.update(compute_fraction=frac, ideal_speedup=1 / frac)
        for backend in ("compiled", "eager", *(lw.strategy for lw in EXTRA_LOWERINGS)):
            if backend in row:
                row[backend]["efficiency"] = row[backend]["speedup"] * frac


def recost(out: Path, names) -> None:
    """Recount the FLOP costs of random-weight workloads in ``out/speed.json`` with the
    current counter and recompute fractions, ideals and efficiencies (the timings stay)."""
    from bcc.tools import zoo
    from bcc.tools.bench.speed_report import write_report
    from bcc.tools.bench.workloads import ZOO_WORKLOADS

    data = json.loads((out / "speed.json").read_text())["workloads"]
    for name in names:
        r = data[name]
        spec = ZOO_WORKLOADS[name]
        model, args, kwargs = zoo.build(spec.model, latent=int(r.get("latent") or spec.latent),
                                        batch=int(r.get("batch") or 2))
        costs, rest = block_flops(model, args, kwargs, r["blocks"])
        r.update(block_flops=costs, rest_flops=rest, recosted=(
            "FLOP costs recounted after the run with attention counted (the run's counter rated the fused "
            "CPU attention kernel as free); timings unchanged"))
        _rows(r, costs, rest)
    write_report(data, out)


def main(argv=None) -> int:
    from bcc.tools.bench.speed_report import write_report

    ap = argparse.ArgumentParser(prog="bcc bench speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["sd15", "pixart-alpha", "digits-unet", "digits-dit"])
    ap.add_argument("--latent", type=int, default=None, help="latent side for the random-weight models")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    ap.add_argument("--no-eager", action="store_true", help="skip the eager timings")
    ap.add_argument("--specialize", type=int, nargs="?", const=1000, default=0, metavar="MAX_ROWS",
                    help="also time strategy='specialize' (one compiled graph per distinct schedule row) for "
                    "the schedules with at most MAX_ROWS distinct rows (all when no number is given)")
    ap.add_argument("--hybrid", action="store_true",
                    help="also time strategy='hybrid' (uniform rows specialised, mixed rows through the branch "
                    "graph; four graphs at most) for every schedule")
    ap.add_argument("--peers", choices=["none", "eager", "compiled", "compiled-only", "auto"], default="none",
                    help="also time the peers (DeepCache on UNets, diffusers' cache hooks on DiTs); 'auto' "
                    "compiles them on the digits models only")
    ap.add_argument("--peer-sweep", choices=["full", "short"], default="full",
                    help="'short': two settings per peer (for the big configurations)")
    ap.add_argument("--fewer", nargs="+", type=int, default=[],
                    help="also time and score the plain model at these step counts (trained workloads)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="results/speed")
    ap.add_argument("--merge", action="store_true", help="keep OUT/speed.json's other workloads")
    ap.add_argument("--recost", action="store_true",
                    help="only recount the FLOP costs of --workloads in OUT/speed.json (no timing)")
    args = ap.parse_args(argv)
    if args.recost:
        recost(Path(args.out), args.workloads)
        return 0
    torch.set_num_threads(args.threads)
    import torch._inductor.config as inductor_config

    # Compile times from cold, every run (set here, not in bench_workload: a library call,
    # e.g. from the tests, must not switch off the cache for the rest of its process).
    inductor_config.fx_graph_cache = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bcc.tools.bench.speed " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict[str, Any] = {}
    if args.merge and (out / "speed.json").exists():
        results = json.loads((out / "speed.json").read_text())["workloads"]
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    for name in args.workloads:
        w = build_workload(name, latent=args.latent, steps=args.steps)
        schedules = list(args.schedules)
        if args.peers != "none" and w.trained:
            # A denser bcc curve, so each peer meets a bcc schedule of at least its fidelity.
            schedules += [k for k in DENSE if k not in schedules]
        r = bench_workload(w, schedules=schedules, repeats=args.repeats, eager=not args.no_eager,
                           specialize=args.specialize, hybrid=args.hybrid, peers=False if args.peers == "none" else args.peers,
                           peer_sweep=args.peer_sweep, fewer=args.fewer, log=log)
        r.update(command=command, threads=args.threads, torch=torch.__version__)
        results[name] = r
        write_report(results, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
