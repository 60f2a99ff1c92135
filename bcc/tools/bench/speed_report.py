"""Markdown, JSON and a plot for :mod:`bcc.tools.bench.speed` results.

The plot is the one a reader wants first: measured speedup against the compute
fraction each configuration executes, with the ideal ``1 / fraction`` curve, bcc's
schedules as connected points per workload and the peers as separate markers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bcc.tools.bench.lowerings import EXTRA_LOWERINGS
from bcc.tools.bench.peers_bench import compiled_over_eager

__all__ = ["write_report", "markdown", "plot_frontier"]


def _f(x, fmt=".2f", none="—"):
    return none if x is None else format(x, fmt)


def _overhead(t: dict, key: str = "bcc[all]") -> float | None:
    if key not in t:
        return None
    return t[key]["trajectory_s"] / t["plain"]["trajectory_s"] - 1


def _repeat_ratios(t: dict, key: str = "bcc[all]") -> str:
    """The ratio of each alternated repeat, to show the spread behind the median."""
    if key not in t:
        return "—"
    return ", ".join(f"{b / a - 1:+.1%}" for a, b in zip(t["plain"]["all_s"], t[key]["all_s"]))


def _step_overhead(t: dict) -> float | None:
    """The same from the median latency of each step, summed (less sensitive to one slow step)."""
    if "bcc[all]" not in t:
        return None
    return sum(t["bcc[all]"]["step_s"]) / sum(t["plain"]["step_s"]) - 1


def _memory(mem: dict) -> str:
    """Peak resident growth during a trajectory (a 5 ms sampler; small models stay under its resolution)."""
    plain = mem["plain"]["peak_rss_delta_mb"]
    others = [v["peak_rss_delta_mb"] for k, v in mem.items() if k != "plain"]
    return (f"peak resident growth during a trajectory: plain model {plain:.0f} MiB, bcc variants "
            f"{min(others):.0f}–{max(others):.0f} MiB.")


def _workload_md(r: dict) -> list[str]:
    c, e = r.get("compiled", {}), r.get("eager", {})
    extra = [lw for lw in EXTRA_LOWERINGS if lw.strategy in r["compile"]]  # the other lowerings timed
    lines = [
        f"## {r['workload']}",
        "",
        f"{r['describe']}. {len(r['blocks'])} cached blocks. Command: `{r['command']}` "
        f"({r['threads']} torch thread(s), torch {r['torch']}).",
        "",
        f"- Gate overhead (all-True schedule vs the plain model), compiled: **{_f(_overhead(c), '+.1%')}** per trajectory "
        f"({_f(_step_overhead(c), '+.1%')} from per-step medians; repeat by repeat {_repeat_ratios(c)}); "
        f"eager: {_f(_overhead(e), '+.1%')}"
        + "".join(f"; strategy='{lw.strategy}': {_f(_overhead(c, f'{lw.prefix}[all]'), '+.1%')}" for lw in extra) + ".",
        f"- Compile (first call, cold inductor cache): plain {r['compile']['plain']['first_call_s']:.1f} s, "
        f"bcc {r['compile']['bcc']['first_call_s']:.1f} s (capture + passes + inductor; "
        f"{r['compile']['bcc']['graphs']} graph). Graphs compiled while all schedules ran: "
        f"{r['graphs_during_timing']} (the schedule is a graph input)."
        + "".join(f" strategy='{lw.strategy}': {r['compile'][lw.strategy]['graphs']} graphs, compiled in "
                  f"{r['compile'][lw.strategy]['all_rows_s']:.1f} s in all." for lw in extra),
        f"- Memory: the caches hold {_f(r.get('cache_mb'), '.1f')} MiB; " + _memory(r["memory"]),
        *([f"- Compute fractions: {r['recosted']} (`python -m bcc.tools.bench.speed --recost`)."] if r.get("recosted") else []),
        "",
        "| schedule | compute fraction | ideal | compiled: s / trajectory | speedup | efficiency | eager: s / trajectory "
        "| speedup | efficiency |" + "".join(f" {lw.label}: speedup | efficiency |" for lw in extra)
        + (" paired PSNR dB |" if "fidelity" in r else ""),
        "|---|---|---|---|---|---|---|---|---|" + "---|---|" * len(extra) + ("---|" if "fidelity" in r else ""),
        f"| plain model | 1.000 | 1.00x | {c['plain']['trajectory_s']:.2f} | 1.00x | — | "
        f"{_f(e.get('plain', {}).get('trajectory_s'))} | {'1.00x' if e else '—'} | — |" + " 1.00x | — |" * len(extra)
        + (" — |" if "fidelity" in r else ""),
    ]
    for k, s in r["schedules"].items():
        cells = []
        for backend, t in (("compiled", c), ("eager", e)):
            v = s.get(backend)
            cells += [_f(t.get(f"bcc[{k}]", {}).get("trajectory_s")), _f(v and v["speedup"], ".2f") + ("x" if v else ""),
                      _f(v and v["efficiency"])]
        for lw in extra:
            v = s.get(lw.strategy)
            cells += [_f(v and v["speedup"], ".2f") + ("x" if v else ""), _f(v and v["efficiency"])]
        fid = f" {r['fidelity'][k]['psnr_db']:.1f} |" if "fidelity" in r else ""
        lines.append(f"| bcc {k} | {s['compute_fraction']:.3f} | {s['ideal_speedup']:.2f}x | " + " | ".join(cells) + " |" + fid)
    if r.get("fewer"):
        lines += ["", "Fewer steps: the plain compiled model at fewer steps from the same noise, timed in the same "
                  "alternation; paired against the plain model at the full step count.", "",
                  "| steps | speedup | paired PSNR dB | SSIM |", "|---|---|---|---|"]
        lines += [f"| {f['steps']} | {f['speedup']:.2f}x | {f['psnr_db']:.1f} | {f['ssim']:.3f} |"
                  for f in sorted(r["fewer"].values(), key=lambda f: -f["steps"])]
    if r.get("search"):
        cm = r["cost_model"]
        lines += ["", f"Searched schedules (`plan-F`, :func:`bcc.search_schedule`): budget F of a cost model measured "
                  f"on the compiled model (rest {cm['rest_cost_s'] * 1e3:.1f} ms/step, blocks "
                  f"{sum(cm['block_costs_s']) * 1e3:.1f} ms/step; the fit is within "
                  f"{cm['fit_max_rel_error']:.1%} of the five timed schedules), scored on seeds apart from the "
                  "fidelity seed.", "",
                  "| schedule | family chosen | fraction of measured cost | PSNR dB on the search seeds | scored |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['chosen']['family']} | {v['chosen']['fraction']:.3f} | {v['chosen']['psnr_db']:.1f} "
                  f"| {len(v['tried'])} |" if "chosen" in v else f"| {k} | unreachable: {v['unreachable']} | | | |"
                  for k, v in r["search"].items()]
    if r.get("peers"):
        lines += ["", *_peers_md(r)]
    if "fidelity" in r:
        lines += ["", f"![speed vs paired PSNR]({_frontier_name(r)})"]
    lines.append("")
    return lines


def _peers_md(r: dict) -> list[str]:
    p = r["peers"]
    cmp = {c["label"]: c for c in r.get("peer_comparison", [])}
    lines = [
        "Peers, timed in the same process, each alternating with the plain model on its backend. "
        "Compute fraction = FLOPs executed / full (the adapters count skipped modules); "
        "the last column is bcc compiled at equal fidelity (the fastest bcc schedule with at least the "
        "peer's paired PSNR) on the trained models, at equal compute fraction (interpolated) otherwise. "
        "Faster or slower compares speedups over the plain *compiled* model, i.e. time per trajectory: an "
        "eager peer's speedup over the plain eager model is scaled by plain compiled / plain eager time. "
        "*At the peer's decisions*: bcc compiled with the peer's units as blocks and, as its schedule, what "
        "the peer computed at each step on the timing seed (equal work: the mechanisms alone; a fixed "
        "schedule, not adaptive; reuse where TaylorSeer extrapolates), alternating with plain compiled.",
        "",
        "| method | setting | compute fraction | eager speedup | compiled speedup | graphs / breaks (compiled) "
        "| paired PSNR dB | peer's best vs plain compiled | bcc compiled at equal fidelity or fraction "
        "| bcc compiled at the peer's decisions |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    replays = r.get("peer_replay", {})
    for row in p["rows"]:
        c = cmp.get(row["label"], {})
        vs = "—" if "bcc_speedup" not in c else (
            f"{c['bcc_speedup']:.2f}x{' (' + c['bcc_schedule'] + ')' if 'bcc_schedule' in c else ''} "
            f"{'**faster**' if c['bcc_faster'] else 'slower'}")
        rp = replays.get(row["label"], {})
        if "speedup" in rp:
            db = f", {rp['psnr_db']:.1f} dB" if "psnr_db" in rp else ""
            at = f"{rp['speedup']:.2f}x{db} {'**faster**' if c.get('replay_faster') else 'slower'}"
        else:
            at = f"not replayable: {rp['error'][:80]}" if "error" in rp else "—"
        lines.append(
            f"| {row['method']} | {row['label']} | {_f(row.get('compute_fraction'), '.3f')} | "
            f"{_f(row.get('eager_speedup'))}{'x' if row.get('eager_speedup') else ''} | {_f(row.get('compiled_speedup'))}{'x' if row.get('compiled_speedup') else ''} | "
            f"{row.get('graphs', '—')} / {row.get('breaks', '—')} | {_f(row.get('psnr_db'), '.1f')} | "
            f"{_f(c.get('peer_best_speedup'))}{'x' if c.get('peer_best_speedup') else ''} | {vs} | {at} |")
    if p.get("notes"):
        lines += ["", *[f"- {n}" for n in p["notes"]]]
    return lines


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Speed benchmark",
        "",
        "Whole DDIM trajectories, every variant in one process, alternating, medians over repeats "
        "(`python -m bcc.tools.bench.speed`, also `bcc bench speed`). CPU only: ratios are what count here; "
        "absolute times are this 2-core machine's. The ideal speedup is total FLOPs / executed FLOPs "
        "(FlopCounterMode, attention included); efficiency = measured speedup / ideal. Speedups divide by "
        "the plain model on the same backend. Alternation cancels slow periods only on average (and "
        "other jobs on the two cores make them worse): look at the repeat-by-repeat spread before "
        "trusting a difference of a few percent.",
        "",
    ]
    for r in results.values():
        lines += _workload_md(r)
    lines.append("![speedup vs compute fraction](speed.png)")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    xs = [i / 100 for i in range(20, 101)]
    ax.plot(xs, [1 / x for x in xs], "k--", lw=1, label="ideal (1 / fraction)")
    cmap = plt.get_cmap("tab10")
    for i, r in enumerate(results.values()):
        color = cmap(i % 10)
        pts = sorted((s["compute_fraction"], s["compiled"]["speedup"]) for s in r["schedules"].values() if "compiled" in s)
        ax.plot(*zip(*pts), "o-", color=color, label=f"bcc compiled, {r['workload']}")
        ept = sorted((s["compute_fraction"], s["eager"]["speedup"]) for s in r["schedules"].values() if "eager" in s)
        if ept:
            ax.plot(*zip(*ept), "o", mfc="none", color=color, label=f"bcc eager, {r['workload']}")
        for row in (r.get("peers") or {}).get("rows", []):
            if row.get("compute_fraction") is None:
                continue
            for key, marker in (("compiled_speedup", "s"), ("eager_speedup", "^")):
                if row.get(key):
                    ax.plot(row["compute_fraction"], row[key], marker, color=color, mfc="none", ms=8)
    ax.plot([], [], "s", color="gray", mfc="none", label="peer, compiled")
    ax.plot([], [], "^", color="gray", mfc="none", label="peer, eager")
    ax.set_xlabel("compute fraction (executed FLOPs / full FLOPs)")
    ax.set_ylabel("measured speedup vs plain model")
    ax.set_xlim(0.2, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _frontier_name(r: dict) -> str:
    return "frontier_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in r["workload"]) + ".png"


# bcc's schedule kinds, as the frontier plot groups them.
_KINDS = (("plan-", "bcc planner (search_schedule)", "o-"), ("auto-", "bcc per-block Eq. 7 (paper)", "s--"),
          ("step-", "bcc step-level Eq. 7", "D--"), ("every-", "bcc every-N", "v:"),
          ("region-b", "bcc every-N, DeepCache's branch as one region", "*-"),
          ("region-span", "bcc every-N, all blocks as one region", "h-"))


def plot_frontier(r: dict[str, Any], path: Path) -> None:
    """Measured speedup against paired PSNR for one trained workload: bcc's schedules by
    kind (branch strategy filled, specialize hollow, hybrid half filled), fewer steps and each peer, compiled
    and eager, every speedup over the plain compiled model (an eager peer's is scaled by
    plain compiled / plain eager time where both were timed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    fid = r["fidelity"]
    cmap = plt.get_cmap("tab10")
    for i, (prefix, label, style) in enumerate(_KINDS):
        for backend, how, fill in (("compiled", "", "full"),
                                   *((lw.strategy, f", {lw.label}", lw.fill) for lw in EXTRA_LOWERINGS)):
            pts = sorted((s[backend]["speedup"], fid[k]["psnr_db"]) for k, s in r["schedules"].items()
                         if k.startswith(prefix) and backend in s and k in fid)
            if pts:
                ax.plot(*zip(*pts), style, color=cmap(i), fillstyle=fill, label=label + how, ms=6)
    if r.get("fewer"):
        pts = sorted((f["speedup"], f["psnr_db"]) for f in r["fewer"].values())
        ax.plot(*zip(*pts), "k^-", label="fewer steps (plain compiled)", ms=6)
    rows = [row for row in (r.get("peers") or {}).get("rows", []) if row.get("psnr_db") is not None]
    # An eager peer's time per trajectory against the plain *compiled* model, as in the
    # peer comparison: its speedup over plain eager times plain compiled / plain eager.
    to_compiled = compiled_over_eager(r)
    for i, method in enumerate(dict.fromkeys(row["method"] for row in rows)):
        mine = [row for row in rows if row["method"] == method and row["psnr_db"] < 99]
        for key, marker, how, scale in (("compiled_speedup", "x", "compiled", 1.0),
                                        ("eager_speedup", "P", "eager", to_compiled)):
            pts = [(row[key] * scale, row["psnr_db"]) for row in mine if row.get(key) and scale]
            if pts:
                ax.plot(*zip(*pts), marker, color=cmap((i + 5) % 10), mfc="none" if how == "eager" else None, ms=8,
                        ls="none", label=f"{method} ({how})")
    replays = [v for v in r.get("peer_replay", {}).values() if "psnr_db" in v and v["psnr_db"] < 99]
    if replays:
        ax.plot([v["speedup"] for v in replays], [v["psnr_db"] for v in replays], "*", color="black", mfc="none",
                ms=9, ls="none", label="bcc compiled at a peer's decisions")
    ax.set_xlabel("measured speedup vs the plain compiled model (time per trajectory)")
    ax.set_ylabel("paired PSNR vs the plain model, dB")
    ax.set_title(f"{r['workload']}: speed vs fidelity", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], out: Path) -> None:
    out = Path(out)
    (out / "speed.json").write_text(json.dumps({"workloads": results}, indent=1, default=str))
    (out / "speed.md").write_text(markdown(results))
    plot(results, out / "speed.png")
    for r in results.values():
        if "fidelity" in r:
            plot_frontier(r, out / _frontier_name(r))
