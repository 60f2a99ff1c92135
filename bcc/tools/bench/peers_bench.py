"""The peers in the speed benchmark: timed beside the plain model and compared with bcc.

Each peer setting (:func:`bcc.tools.bench.peers.peer_settings`) runs through the workload's
own sampling loop, eager and (where asked) under ``torch.compile``, alternating with
the plain model on the same backend, so every speedup is a same-run ratio. What each
executed is counted in FLOPs by the adapter; on the trained models the paired PSNR
against the plain model from the same noise is measured too, so peers and bcc can be
compared at equal fidelity (the shipped models) or equal compute fraction (random weights).
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch

from bcc.tools.bench.lowerings import COMPILED_KEYS
from bcc.tools.bench.peers import enable, magcache_ratios, peer_settings

__all__ = ["bench_peers", "compare_with_bcc", "compiled_over_eager", "replay_peers"]


def _alternate_times(w, fns: dict, repeats: int, before: dict | None = None, warm: bool = True) -> dict[str, list]:
    """Whole trajectories of each of ``fns`` in turn, ``repeats`` times; ``before[k]()`` runs
    ahead of each of ``k``'s (a model shared by several schedules swaps its schedule in)."""
    before = before or {}
    times = {k: [] for k in fns}
    for k, fn in fns.items() if warm else ():  # warm-up: a guard miss or first call compiles outside the timing
        before.get(k, lambda: None)()
        w.run(fn)
    for _ in range(repeats):
        for k, fn in fns.items():
            before.get(k, lambda: None)()
            t0 = time.perf_counter()
            w.run(fn)
            times[k].append(time.perf_counter() - t0)
    return times


def _alternate(w, fns: dict, repeats: int) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in _alternate_times(w, fns, repeats).items()}


def _dynamo_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def short_sweep(settings: list) -> list:
    """Each peer's second-mildest and second-most-aggressive settings (its middle, where
    the comparison with bcc is informative): for the big configurations, where one
    eager trajectory takes a minute.

    Example:
        >>> [s.label for s in short_sweep(peer_settings("dit"))][:3]
        ['FBC t=0.08', 'FBC t=0.20', 'TaylorSeer N=3']
    """
    out = []
    for peer in dict.fromkeys(s.peer for s in settings):
        mine = [s for s in settings if s.peer == peer]
        picks = {mine[min(1, len(mine) - 1)].label, mine[max(len(mine) - 2, 0)].label}
        out += [s for s in mine if s.label in picks]
    return out


def bench_peers(w, plain_c, *, repeats: int = 3, compiled: bool = True, eager: bool = True, sweep: str = "full",
                log=print) -> dict[str, Any]:
    """Time every peer setting for workload ``w`` (``sweep``: see ``peer_settings``);
    ``plain_c`` is the compiled plain model."""
    from bcc.tools.metrics import mean_psnr

    settings = peer_settings(w.family)
    if sweep == "short":
        settings = short_sweep(settings)
    # Peers patch the model they run on, so they get a copy and the plain model can be
    # timed beside them, untouched.
    model = copy.deepcopy(w.model)
    ratios = None
    if any(s.peer == "magcache" for s in settings):
        ratios = magcache_ratios(model, w.scheduler, lambda den: w.run(den))
    ref = w.run(w.model) if w.trained else None
    rows, notes = [], []
    # Several peers compile the same model forward under different guards; the default
    # budget of 8 would silently send later ones back to eager.
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 64
    try:
        for s in settings:
            row: dict[str, Any] = {"method": s.peer, "label": s.label, "params": dict(s.params)}
            with enable(model, s, w.scheduler, calibrate=ratios) as den:
                out = w.run(den)  # first trajectory: the adapter's FLOP probe, not timed
                row["compute_fraction"] = den.executed_fraction()
                row["trace"] = _decisions(*den.unit_trace(), w.steps)
                if eager:
                    den.reset_stats()
                    t = _alternate(w, {"plain": w.model, "peer": den}, repeats)
                    row["eager_speedup"] = t["plain"] / t["peer"]
                    row["compute_fraction"] = den.executed_fraction()
            if ref is not None:
                row["psnr_db"] = min(float(mean_psnr(out.float(), ref.float())), 100.0)
            if compiled:
                # Compiled code is shared between modules of one structure, so a setting
                # would reuse the graphs of the one before: start from nothing, so its
                # graphs are its own and counted (the plain model recompiles in the warm-up).
                torch._dynamo.reset()
                g0, b0 = _dynamo_counts()
                with enable(model, s, w.scheduler, calibrate=ratios, compile=True) as den_c:
                    t0 = time.perf_counter()
                    w.run(den_c)
                    row["compile_s"] = time.perf_counter() - t0
                    g1, b1 = _dynamo_counts()
                    w.run(den_c)
                    g2, _ = _dynamo_counts()
                    tc = _alternate(w, {"plain": plain_c, "peer": den_c}, repeats)
                row.update(compiled_speedup=tc["plain"] / tc["peer"], graphs=g1 - g0, breaks=b1 - b0,
                           graphs_second_trajectory=g2 - g1)
            log(f"   peer {s.label}: fraction {row['compute_fraction']:.3f}"
                + (f", eager {row['eager_speedup']:.2f}x" if eager else "")
                + (f", compiled {row['compiled_speedup']:.2f}x ({row['graphs']} graphs, {row['breaks']} breaks)"
                   if compiled else "") + (f", PSNR {row['psnr_db']:.1f}" if "psnr_db" in row else ""))
            rows.append(row)
    finally:
        torch._dynamo.config.recompile_limit = limit
    if not eager:
        notes.append("peers timed compiled only here (their eager speedups are in an earlier run); the compute "
                     "fraction is from one eager trajectory per setting.")
    if not compiled:
        notes.append("peers timed eager only here: compiling them on this model costs a full compile per "
                     "setting and graph (their graph breaks split the model), too long for the CPU run.")
    return {"rows": rows, "notes": notes}


def _decisions(units: tuple[str, ...], calls, steps: int) -> dict[str, Any]:
    """What a peer computed: ``mask[s][k]`` is whether unit ``k`` ran in any call of step ``s``."""
    mask = [[False] * len(units) for _ in range(steps)]
    for c in calls:
        mask[c.step] = [m or r > 0 for m, r in zip(mask[c.step], c.ran)]
    return {"units": list(units), "mask": mask}


def replay_peers(w, plain_c, rows: list[dict[str, Any]], *, repeats: int = 3, compiled: dict | None = None,
                 log=print) -> dict[str, dict[str, Any]]:
    """bcc compiled running each peer's own decisions: the blocks are the peer's units and
    the schedule is what the peer computed at each step on the timing seed (``row["trace"]``).

    Equal work, so the speedups compare the mechanisms alone: bcc's one graph with gated
    branches against the peer's hooks and graph breaks. A replay is a fixed schedule: it
    does not adapt to other inputs as FBC and MagCache do, and it reuses where TaylorSeer
    extrapolates (its fidelity is measured on the trained models, not assumed, on the seed the
    decisions were recorded on: for an adaptive peer, its own choices for that noise). ``compiled``:
    bcc models already compiled, by their block names (one is made per other unit set).
    Timed alternating with ``plain_c``; per label ``speedup`` over it, or ``error``.
    """
    import bcc
    from bcc.tools.metrics import mean_psnr

    models: dict[tuple[str, ...], Any] = dict(compiled or {})
    variants: dict[str, tuple[Any, Any]] = {}
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        units, mask = tuple(row["trace"]["units"]), torch.tensor(row["trace"]["mask"])
        try:
            schedule = bcc.Schedule(mask, units)
            if units not in models:
                models[units] = bcc.compile(w.model, schedule)
            variants[row["label"]] = (models[units], schedule)
        except bcc.BccError as exc:  # e.g. a unit bcc cannot gate on its own
            out[row["label"]] = {"error": str(exc).splitlines()[0]}
    ref = w.run(w.model) if w.trained else None
    for label, (m, schedule) in list(variants.items()):
        try:
            m.set_schedule(schedule)
            x = w.run(m)  # the first call captures and compiles: outside the timing
        except bcc.BccError as exc:
            out[label] = {"error": str(exc).splitlines()[0]}
            del variants[label]
            continue
        out[label] = {"units": len(schedule.block_names), "compute_steps": int(schedule.mask.any(dim=1).sum())}
        if ref is not None:
            out[label]["psnr_db"] = min(float(mean_psnr(x.float(), ref.float())), 100.0)
    # Warm already (each replay ran above, plain compiled in the bench before).
    times = _alternate_times(w, {"plain": plain_c, **{k: m for k, (m, _) in variants.items()}}, repeats,
                             before={k: (lambda m=m, s=s: m.set_schedule(s)) for k, (m, s) in variants.items()},
                             warm=False)
    plain = statistics.median(times["plain"])
    for label in variants:
        out[label].update(speedup=plain / statistics.median(times[label]), all_s=times[label])
        log(f"   bcc at {label}'s decisions: {out[label]['speedup']:.2f}x" +
            (f", PSNR {out[label]['psnr_db']:.1f}" if "psnr_db" in out[label] else ""))
    for label, r in out.items():
        if "error" in r:
            log(f"   bcc at {label}'s decisions: not replayable ({r['error']})")
    return out


def _interp(points: list[tuple[float, float]], x: float) -> float | None:
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def compiled_over_eager(result: dict[str, Any]) -> float | None:
    """Plain compiled / plain eager time per trajectory (None unless both were timed): the
    factor that puts an eager speedup on the compiled model's scale. Same-phase when the
    eager phase alternated the compiled model too (``"plain compiled"``), as runs since
    session 17 do; earlier results fall back to the two phases' plain times.

    Example:
        >>> compiled_over_eager({"eager": {"plain": {"trajectory_s": 2.0}, "plain compiled": {"trajectory_s": 1.5}}})
        0.75
    """
    eager = result.get("eager", {})
    plain_e = eager.get("plain", {}).get("trajectory_s")
    plain_c = eager.get("plain compiled", result.get("compiled", {}).get("plain", {})).get("trajectory_s")
    return plain_c / plain_e if plain_c and plain_e else None


def compare_with_bcc(result: dict[str, Any]) -> list[dict[str, Any]]:
    """For each peer row, bcc's compiled speedup at equal fidelity (trained models: the
    fastest schedule, either strategy, whose paired PSNR is at least the peer's) or at
    equal compute fraction (otherwise: interpolated between bcc's measured schedules).

    Both sides are speedups over the *plain compiled* model, so "faster" means less
    time per trajectory: an eager peer's speedup over the plain eager model is scaled by
    the plain models' measured times (compiled / eager), when both were timed.
    """
    out = []
    sched = result["schedules"]
    to_compiled = compiled_over_eager(result) or 1.0
    for row in result.get("peers", {}).get("rows", []):
        speeds = [row["compiled_speedup"]] if row.get("compiled_speedup") is not None else []
        if row.get("eager_speedup") is not None:
            speeds.append(row["eager_speedup"] * to_compiled)
        cmp: dict[str, Any] = {"label": row["label"], "peer_best_speedup": max(speeds)}
        if "fidelity" in result and row.get("psnr_db") is not None:
            # Every strategy is bcc compiled (branch: one graph; specialize: one per row; hybrid: four at most).
            ok = [(s[b]["speedup"], k + ("" if b == "compiled" else f", {b}")) for k, s in sched.items()
                  for b in COMPILED_KEYS if b in s and result["fidelity"][k]["psnr_db"] >= row["psnr_db"]]
            if ok:
                sp, k = max(ok)
                cmp.update(basis="equal fidelity", bcc_speedup=sp, bcc_schedule=k,
                           bcc_psnr_db=result["fidelity"][k.split(",")[0]]["psnr_db"])
        else:
            pts = [(s["compute_fraction"], max(s[b]["speedup"] for b in COMPILED_KEYS if b in s))
                   for s in sched.values() if "compiled" in s]
            sp = _interp(pts, row["compute_fraction"])
            if sp is not None:
                cmp.update(basis="equal compute fraction", bcc_speedup=sp)
        if "bcc_speedup" in cmp:
            cmp["bcc_faster"] = cmp["bcc_speedup"] > cmp["peer_best_speedup"]
        replay = result.get("peer_replay", {}).get(row["label"], {})
        if "speedup" in replay:
            cmp.update(replay_speedup=replay["speedup"], replay_faster=replay["speedup"] > cmp["peer_best_speedup"])
        out.append(cmp)
    return out
