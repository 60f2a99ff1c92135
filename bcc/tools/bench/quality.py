"""The paper's Table 1 on the shipped digits model.

For each solver and step count T: the uncached baseline at T steps; the baseline at
fewer steps T' with the same *measured* cost as caching; and naive caching with the
automatic schedule (Eq. 7 at a compute budget); and caching with scale-shift
trained by distillation for that schedule (``bcc.train_scale_shift``); and the schedule
``bcc.search_schedule`` finds at the same budget of measured time (``planned``: scored on
seeds apart from the evaluation ones; the fewer-steps row then matches its measured speed);
and that searched schedule with scale-shift trained for it (``planned_ss``). Each row: FD-digits against the 5,000
real digits (mean ± sd over seeds; NOT Inception FID), class accuracy, precision /
recall, paired PSNR / SSIM / label flips against the baseline from the same noise,
measured speedup (compiled models, alternating runs, medians) and the predicted
compute fraction. Floors: real-vs-real and seed-to-seed FD-digits.

    python -m bcc.tools.bench.quality --configs ddim-20 dpm-20 --n 2000 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import bcc
from bcc.tools.bench.resume import SS_ROWS, Resume
from bcc.tools.digits import default_model_dir, load_digits, load_digits_model, make_grid, make_scheduler, sample
from bcc.tools.metrics import distribution_report, fd_digits, paired_report

ALL_BLOCKS = ["*.attentions.*", "*.resnets.*", "*.upsamplers.*", "*.downsamplers.*"]


def _sampler(model, conditioner, scheduler, steps, guidance):
    def run(denoiser, labels, seed, noise=None, grad=False):
        return sample(denoiser, conditioner, scheduler, labels, num_steps=steps, guidance_scale=guidance,
                      seed=seed, noise=noise, grad=grad)
    return run


def evaluation_noise(count: int, seed: int) -> torch.Tensor:
    """The starting noise of Table 1's evaluation seed ``seed``: ``count`` digits latents,
    from a generator apart from the training and search seeds.

    Example:
        >>> torch.equal(evaluation_noise(3, 0)[:2], evaluation_noise(2, 0)), tuple(evaluation_noise(3, 0).shape)
        (True, (3, 1, 16, 16))
    """
    return torch.randn(count, 1, 16, 16, generator=torch.Generator().manual_seed(10_000 + seed))


def _generate(run, denoiser, labels, seed, chunk):
    noise = evaluation_noise(len(labels), seed)
    outs = [run(denoiser, labels[i:i + chunk], seed, noise[i:i + chunk]) for i in range(0, len(labels), chunk)]
    return torch.cat(outs)


def _time(models: dict, run, labels, repeats):
    times = {k: [] for k in models}
    for name, m in models.items():  # warm-up (compiles)
        run(m, labels, 0)
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            run(m, labels, 0)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


ROWS = ("baseline", "fewer", "cached", "cached_step", "cached_ss", "planned", "planned_ss")
# Each measured row's median-time key (the plain model's is "plain").
_MEDIAN_KEY = {"cached": "bcc", "cached_step": "bcc_step", "cached_ss": "bcc_ss", "fewer": "fewer", "planned": "bcc_plan",
               "planned_ss": "bcc_plan_ss"}
SEARCH_SEEDS = (1000, 1001)  # the searched row is scored on these, apart from the evaluation seeds


def bench_config(arch, solver, steps, *, n, seeds, budget, blocks, guidance, chunk, repeats, out_dir, log,
                 ss_iterations=150, ss_kind="table", ss_loss="output", ss_groups=1, ss_guided=False, ss_lr=5e-3,
                 rows=ROWS, resume=None):
    """One configuration of the table; ``rows`` picks which rows to measure (the
    baseline always runs: every paired metric is against it). ``resume``: a folder
    where finished phases are kept, so an interrupted run continues (see :class:`bcc.tools.bench.resume.Resume`)."""
    rows = ("baseline",) + tuple(r for r in rows if r != "baseline")
    res = Resume(resume, f"{arch}_{solver}{steps}", {
        "n": n, "seeds": list(seeds), "budget": budget, "blocks": blocks, "guidance": guidance, "chunk": chunk,
        "repeats": repeats}, {"iterations": ss_iterations, "kind": ss_kind, "loss": ss_loss, "groups": ss_groups,
                              "guided": ss_guided, "lr": ss_lr})
    model, conditioner, train_sched = load_digits_model(default_model_dir(arch))
    if arch == "dit":
        blocks = "attention"  # every transformer block: nearly all of a DiT's FLOPs
    scheduler = make_scheduler(solver, train_sched)
    run_t = _sampler(model, conditioner, scheduler, steps, guidance)
    def calibrated():
        log(f"== {arch} {solver}-{steps}: calibrating")
        return bcc.calibrate(model, lambda m, label, seed: run_t(m, [label] * 4, seed), list(range(10)),
                             seeds=[100, 101], scheduler=scheduler, guidance_scale=guidance, blocks=blocks,
                             progress=False)

    profile = None
    if res.file("schedule.json") and res.file("step_schedule.json"):
        log(f"== {arch} {solver}-{steps}: resuming from {res.dir}")
        schedule, step_schedule = (bcc.Schedule.load(res.file(f)) for f in ("schedule.json", "step_schedule.json"))
    else:
        profile = calibrated()
        schedule = bcc.Schedule.for_budget(profile, budget)
        step_schedule = bcc.Schedule.for_budget(profile, budget, granularity="step")
        if res.dir is not None:
            schedule.save(res.keep("schedule.json"))
            step_schedule.save(res.keep("step_schedule.json"))
    result = {"arch": arch, "solver": solver, "steps": steps, "n": n, "seeds": list(seeds),
              "guidance": guidance, "budget": budget, "blocks": blocks, "speedup": {}, "median_seconds": {}}
    plain = torch.compile(model, fullgraph=True, options=dict(bcc.config.DEFAULT_INDUCTOR_OPTIONS))
    timed = {"plain": plain}
    eager = {"baseline": model}
    if "cached" in rows or "cached_ss" in rows:
        result.update(compute_fraction=schedule.compute_fraction(), ideal_speedup=schedule.ideal_speedup(),
                      threshold=schedule.meta["threshold"])
        schedule.save(out_dir / f"{arch}_{solver}{steps}_schedule.json")
    if "cached" in rows:
        timed["bcc"] = bcc.compile(model, schedule)
        eager["cached"] = bcc.compile(model, schedule, backend="eager")
    if "cached_step" in rows:
        result.update(compute_fraction_step=step_schedule.compute_fraction(),
                      ideal_speedup_step=step_schedule.ideal_speedup(), threshold_step=step_schedule.meta["threshold"])
        step_schedule.save(out_dir / f"{arch}_{solver}{steps}_step_schedule.json")
        timed["bcc_step"] = bcc.compile(model, step_schedule)
        eager["cached_step"] = bcc.compile(model, step_schedule, backend="eager")
    if "planned" in rows or "planned_ss" in rows:
        planned, timed["bcc_plan"], eager["planned"] = _planned(
            res, result, model, profile or calibrated(), run_t, budget, chunk, repeats, log, out_dir / f"{arch}_{solver}{steps}")
    train = functools.partial(_scale_shift, res, model, run_t, log, out_dir / f"{arch}_{solver}{steps}", dict(
        iterations=ss_iterations, kind=ss_kind, loss=ss_loss, lr=ss_lr, groups=ss_groups,
        guidance_scale=guidance if ss_guided else None))
    if "cached_ss" in rows:
        result["scale_shift"], ss = train("cached_ss", schedule)
        timed["bcc_ss"] = bcc.compile(model, schedule, scale_shift=ss)
        eager["cached_ss"] = bcc.compile(model, schedule, backend="eager", scale_shift=ss)
    if "planned_ss" in rows:
        # The searched schedule with corrections trained for it: a region's correction is
        # fitted to the region's cached residual as a block's is.
        result["planned_scale_shift"], ss_plan = train("planned_ss", planned)
        timed["bcc_plan_ss"] = bcc.compile(model, planned, scale_shift=ss_plan)
        eager["planned_ss"] = bcc.compile(model, planned, backend="eager", scale_shift=ss_plan)
    timing = res.get("timing")
    if timing is None:
        timing = _measure_speed(result, rows, timed, plain, run_t, steps, repeats, log,
                                lambda k: _sampler(model, conditioner, make_scheduler(solver, train_sched), k, guidance))
        res.put("timing", timing)
    for row, kept in SS_ROWS.items():
        if row in rows and row not in timing["speedup"]:
            # New scale-shift parameters on a resumed run: time that row against the plain
            # model and its uncorrected schedule again; the other rows' timings (and the
            # fewer-steps count) are kept.
            base = kept.uncorrected
            if base == "bcc":
                timed.setdefault("bcc", bcc.compile(model, schedule))
            med = _time({k: timed[k] for k in ("plain", base, kept.median)}, run_t, list(range(10)) * 2, repeats)
            timing["speedup"][row] = med["plain"] / med[kept.median]
            timing["median_seconds"].update({kept.median: med[kept.median], kept.plain_median: med["plain"],
                                             kept.base_median: med[base]})
            timing[kept.overhead] = med[kept.median] / med[base] - 1
            res.put("timing", timing)
    result["median_seconds"].update(timing["median_seconds"])
    result["speedup"].update(timing["speedup"])
    for kept in SS_ROWS.values():
        if kept.overhead in timing:
            result[kept.record]["overhead"] = timing[kept.overhead]
    if "fewer_steps" in timing:
        result["fewer_steps"] = fewer = timing["fewer_steps"]
        run_f = _sampler(model, conditioner, make_scheduler(solver, train_sched), fewer, guidance)
    real, _ = load_digits("all")
    labels = torch.arange(n) % 10
    measured_rows = {k: [] for k in rows}
    samples = {}
    baselines = []
    for seed in seeds:
        log(f"   seed {seed}: sampling {n} x {len(rows)}")
        outs = {k: res.images(f"{k}_seed{seed}.pt", lambda k=k: _generate(run_f if k == "fewer" else run_t,
                                                                            eager.get(k, model), labels, seed, chunk))
                for k in rows}
        base = outs["baseline"]
        for name, imgs in outs.items():
            samples.setdefault(name, imgs[:40])
            d = distribution_report(imgs, labels, real)
            d.update({f"paired_{k}": v for k, v in paired_report(imgs, base).items() if k != "n"})
            measured_rows[name].append(d)
        baselines.append(base)
    result["rows"] = measured_rows
    # Seed-to-seed floor: the same model and settings, only the noise differs.
    result["seed_to_seed_fd"] = [fd_digits(a, b) for a, b in zip(baselines, baselines[1:])]
    # Two grid rows per measured row; columns are digits 0-9.
    grid = make_grid(torch.cat([samples[k][:20] for k in rows]), nrow=10, scale=3)
    grid.save(out_dir / f"{arch}_{solver}{steps}_grid{'' if set(rows) == set(ROWS) else '_' + '_'.join(rows[1:])}.png")
    return result


def _scale_shift(res, model, run_t, log, stem, params, row, schedule):
    """Scale-shift for ``schedule`` (row ``row``'s), trained by distillation or kept from an
    earlier run; its training record and the parameters."""
    key, name = SS_ROWS[row].record, SS_ROWS[row].params_file
    if res.file(name) and res.get(key):
        ss, record = bcc.ScaleShift.load(res.file(name)), dict(res.get(key))
    else:
        guided = params["guidance_scale"] is not None
        log(f"   training scale-shift for the {row} row ({params['kind']}, {params['loss']} loss"
            f"{', guided' if guided else ''}, groups {params['groups']}, {params['iterations']} trajectories of 8)")
        t0 = time.perf_counter()
        ss = bcc.train_scale_shift(model, schedule, lambda m, label, seed: run_t(m, [label] * 8, seed,
                                                                              grad=params["loss"] == "final"),
                                   list(range(10)), seed=5000, progress=False, **params)
        loss = params["loss"]
        record = {"kind": params["kind"], "loss": loss, "groups": params["groups"], "guided_loss": guided,
                  "iterations": params["iterations"], "lr": params["lr"], "train_seconds": time.perf_counter() - t0,
                  "parameters": ss.num_parameters(), "loss_first": ss.history[0][f"loss_{loss}"],
                  "loss_first10": statistics.mean(h[f"loss_{loss}"] for h in ss.history[:10]),
                  "loss_last10": statistics.mean(h[f"loss_{loss}"] for h in ss.history[-10:])}
        if res.dir is not None:
            ss.save(res.keep(name))
            res.put(key, record)
    ss.save(f"{stem}_{name}")
    return record, ss


def _planned(res, result, model, profile, run_t, budget, chunk, repeats, log, stem):
    """The searched row: :func:`bcc.search_schedule` at the budget of a cost model measured
    on the compiled model, scored on :data:`SEARCH_SEEDS`; the schedule, its compiled and eager models."""
    fast = bcc.compile(model, bcc.Schedule.all_compute(profile.num_steps, profile.block_names))
    if res.file("planned_schedule.json") and res.get("search"):
        planned = bcc.Schedule.load(res.file("planned_schedule.json"))
        result["search"] = dict(res.get("search"))
    else:
        labels = list(range(10)) * 2
        run_t(fast, labels, 0)  # compile outside the cost model's timing
        cost = bcc.CostModel.measure(fast, lambda m: run_t(m, labels, 0), profile, repeats=repeats)
        log(f"   searching a schedule at {budget} of the measured cost (fit within "
            f"{cost.meta['fit_max_rel_error']:.1%})")
        found = bcc.search_schedule(fast, lambda m, seed: _generate(run_t, m, labels, seed, chunk), profile, budget,
                                    cost=cost, seeds=SEARCH_SEEDS, progress=False)
        planned = found.schedule
        result["search"] = {**found.to_dict(), "cost_fit_max_rel_error": cost.meta["fit_max_rel_error"]}
        if res.dir is not None:
            planned.save(res.keep("planned_schedule.json"))
            res.put("search", result["search"])
    planned.save(f"{stem}_planned_schedule.json")
    flops = profile
    if planned.block_names != profile.block_names:
        # A region schedule: its own compiled model, and its FLOPs counted on its blocks.
        fast = fast.bcc_recompile(planned)
        flops = bcc.calibrate(model, lambda m, label, seed: run_t(m, [label], seed), [0], seeds=[0],
                              blocks=list(planned.block_names), progress=False)
    fast.set_schedule(planned)
    result["compute_fraction_planned"] = planned.compute_fraction(flops.block_flops, flops.rest_flops)
    return planned, fast, bcc.compile(model, planned, backend="eager")


def _measure_speed(result, rows, timed, plain, run_t, steps, repeats, log, sampler_at) -> dict:
    """Median trajectory times of the compiled models and the fewer-steps baseline
    whose step count matches the measured speedup of caching."""
    speed_labels = list(range(10)) * 2
    med = _time(timed, run_t, speed_labels, repeats)
    out = {"median_seconds": dict(med), "speedup": {}}
    for name, key in _MEDIAN_KEY.items():
        if name != "fewer" and key in med:
            out["speedup"][name] = med["plain"] / med[key]
    for kept in SS_ROWS.values():
        if kept.median in med and kept.uncorrected in med:
            out[kept.overhead] = med[kept.median] / med[kept.uncorrected] - 1
    if "fewer" in rows:
        # Fewer steps at the measured cost of caching: the searched schedule's when measured,
        # else the per-block one's, else the step-level one's.
        measured = out["speedup"].get("planned") or out["speedup"].get("cached") or out["speedup"].get("cached_step")
        fewer = max(1, round(steps / measured))
        log(f"   measured {measured:.2f}x -> fewer-steps baseline at {fewer} steps")
        run_f = sampler_at(fewer)
        plain_f = torch.compile(plain._orig_mod, fullgraph=True, options=dict(bcc.config.DEFAULT_INDUCTOR_OPTIONS))
        med_f = _time({"plain": plain, "fewer": plain_f}, lambda m, l, s: (run_t if m is plain else run_f)(m, l, s),
                      speed_labels, repeats)
        out["fewer_steps"] = fewer
        out["speedup"]["fewer"] = med_f["plain"] / med_f["fewer"]
        out["median_seconds"]["fewer"] = med_f["fewer"]
    return out


def merge_result(old: dict, new: dict) -> dict:
    """``new``'s rows and numbers over ``old``'s, keeping what ``new`` did not measure."""
    out = {**old, **{k: v for k, v in new.items() if k not in ("rows", "speedup", "median_seconds")}}
    for k in ("rows", "speedup", "median_seconds"):
        out[k] = {**old.get(k, {}), **new.get(k, {})}
    return out


def _commands(report: dict) -> list:
    return report.get("commands") or ([report["command"]] if "command" in report else [])


def _upsert(results: list, new: dict) -> list:
    """``results`` with ``new``'s configuration merged in row by row, in table order."""
    key = (new["arch"], new["solver"], new["steps"])
    old = next((r for r in results if (r["arch"], r["solver"], r["steps"]) == key), None)
    out = [r for r in results if (r["arch"], r["solver"], r["steps"]) != key]
    out.append(merge_result(old, new) if old is not None else new)
    return sorted(out, key=lambda r: (r["steps"], r["solver"] != "ddim", r["arch"] != "unet"))


def _write_report(out_dir: Path, report: dict) -> str:
    md = markdown(report["results"], report["floors"], report["commands"], report.get("threads"))
    (out_dir / "quality.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "quality.md").write_text(md)
    return md


def _only_rows(new: dict, rows, source: str, note: str | None) -> dict:
    """``new`` cut to ``rows``, for a re-run of some rows in a separate run.

    Its speedups are against that run's plain model; when the scale-shift row comes without
    the naive row it was timed against, that run's plain and naive medians are kept apart
    (``plain_ss_run``, ``bcc_ss_run``) and the row's note says where it came from."""
    out = {**new, "rows": {k: v for k, v in new["rows"].items() if k in rows},
           "speedup": {k: v for k, v in new.get("speedup", {}).items() if k in rows}}
    med = new.get("median_seconds", {})
    out["median_seconds"] = {_MEDIAN_KEY[k]: med[_MEDIAN_KEY[k]] for k in rows if _MEDIAN_KEY.get(k) in med}
    if "cached_ss" in rows and "cached" not in rows and "bcc_ss" in med:
        out["median_seconds"].update(plain_ss_run=med.get("plain_ss_run", med["plain"]),
                                     bcc_ss_run=med.get("bcc_ss_run", med["bcc"]))
        naive = new["speedup"]["cached"]
        out["scale_shift"] = {**new["scale_shift"], "note": "; ".join(filter(None, [
            f"cached + scale-shift row from a separate run ({source}); its speedup and overhead are against "
            f"that run's plain and naive-cached models (naive there: {naive:.2f}x)", note]))}
    return out


def combine(out_dir, sources, log=print, rows=None, note=None) -> list:
    """Merge the results of runs written to other folders (e.g. one per core) into ``out_dir``.

    Each source's configurations replace those in ``out_dir/quality.json`` row by row (rows a
    source did not measure are kept), its commands are appended, and its per-configuration
    files (schedules, scale-shift, grids) are copied beside them. ``rows`` takes only those
    rows from the sources (e.g. a scale-shift row retrained in a separate run; ``note`` is
    added to its description). Returns the merged results.

    >>> import tempfile, json, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> for name, steps in (("a", 20), ("b", 50)):
    ...     (d / name).mkdir()
    ...     r = {"arch": "unet", "solver": "ddim", "steps": steps, "rows": {}, "speedup": {}, "seed_to_seed_fd": [0.2]}
    ...     _ = (d / name / "quality.json").write_text(json.dumps({"commands": [name], "threads": 1, "results": [r],
    ...                                                    "floors": {"real_vs_real_2500": [0.61, 0.02]}}))
    ...     _ = (d / name / f"unet_ddim{steps}_schedule.json").write_text("{}")
    >>> [r["steps"] for r in combine(d / "a", [d / "b"], log=lambda m: None)]
    [20, 50]
    >>> (d / "a" / "unet_ddim50_schedule.json").exists()
    True
    """
    import shutil

    out_dir = Path(out_dir)
    path = out_dir / "quality.json"
    merged = json.loads(path.read_text()) if path.exists() else {"results": []}
    results, commands = merged["results"], _commands(merged)
    for src in map(Path, sources):
        if not (src / "quality.json").exists():
            raise bcc.BccError(bcc.ErrorCode.FILE_INVALID, f"{src} has no quality.json; pass folders "
                               "written by 'bcc bench quality --out DIR'.")
        other = json.loads((src / "quality.json").read_text())
        commands += [c for c in _commands(other) if c not in commands]
        for new in other["results"]:
            if rows is not None:
                new = _only_rows(new, rows, "; ".join(f"`{c}`" for c in _commands(other)), note)
            results = _upsert(results, new)
            for f in src.glob(f"{new['arch']}_{new['solver']}{new['steps']}_*"):
                shutil.copy2(f, out_dir / f.name)
            log(f"merged {new['arch']} {new['solver']}-{new['steps']} from {src}")
        merged.setdefault("floors", other.get("floors"))
        merged.setdefault("threads", other.get("threads"))
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_report(out_dir, {**merged, "commands": commands, "results": results})
    return results


def _agg(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def floors(seeds):
    real, _ = load_digits("all")
    g = torch.Generator().manual_seed(0)
    fds = []
    for _ in seeds:
        perm = torch.randperm(len(real), generator=g)
        fds.append(fd_digits(real[perm[: len(real) // 2]], real[perm[len(real) // 2:]]))
    return {"real_vs_real_2500": _agg(fds)}


def markdown(results, floor, commands, threads=None):
    if isinstance(commands, str):
        commands = [commands]
    lines = [
        "# Quality benchmark (paper Table 1 protocol) on bcc-digits",
        "",
        "Commands (later runs replace the rows of the configurations they measure):",
        "",
        *[f"- `{c}`" for c in commands],
        "",
        "FD-digits is the Fréchet distance in the shipped digit classifier's feature space against all",
        "5,000 real digits — **not** Inception FID. Paired metrics compare with the uncached baseline",
        "from the same noise. Speedups are measured on the CPU (compiled models, alternating runs, medians,",
        f"{threads or 'default'} torch thread(s), batch 20 with guidance). Real-vs-real floor (2,500 vs 2,500 "
        f"real digits): {floor['real_vs_real_2500'][0]:.2f} "
        f"± {floor['real_vs_real_2500'][1]:.2f}.",
        "",
        "| model | solver | row | steps | FD-digits | accuracy | precision / recall | PSNR dB | SSIM | flips | speedup (measured) | compute fraction |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        sp = r["speedup"]
        for row, key, steps, speed, frac in (
                ("baseline", "baseline", r["steps"], 1.0, 1.0),
                ("fewer steps", "fewer", r.get("fewer_steps"), sp.get("fewer"), (r.get("fewer_steps") or 0) / r["steps"]),
                ("cached (per-block schedule)", "cached", r["steps"], sp.get("cached"), r.get("compute_fraction")),
                ("cached (step-level schedule)", "cached_step", r["steps"], sp.get("cached_step"),
                 r.get("compute_fraction_step")),
                ("cached + scale-shift (per-block)", "cached_ss", r["steps"], sp.get("cached_ss"), r.get("compute_fraction")),
                ("cached (searched schedule)", "planned", r["steps"], sp.get("planned"),
                 r.get("compute_fraction_planned")),
                ("cached + scale-shift (searched)", "planned_ss", r["steps"], sp.get("planned_ss"),
                 r.get("compute_fraction_planned"))):
            if key not in r["rows"]:
                continue
            rs = r["rows"][key]
            fd = _agg([x["fd_digits"] for x in rs])
            acc = _agg([x["accuracy"] for x in rs])
            pr = _agg([x["precision"] for x in rs]), _agg([x["recall"] for x in rs])
            ps = _agg([min(x["paired_psnr_db"], 99.0) for x in rs])
            ss = _agg([x["paired_ssim"] for x in rs])
            fl = _agg([x["paired_label_flip_rate"] for x in rs])
            paired = ("—", "—", "—") if row == "baseline" else (f"{ps[0]:.1f}", f"{ss[0]:.3f}", f"{fl[0]:.1%}")
            lines.append(
                f"| {r['arch']} | {r['solver']}-{r['steps']} | {row} | {steps} | {fd[0]:.2f} ± {fd[1]:.2f} | {acc[0]:.1%} | "
                f"{pr[0][0]:.2f} / {pr[1][0]:.2f} | {paired[0]} | {paired[1]} | {paired[2]} | "
                f"{speed:.2f}x | {frac:.3f} |"
            )
    lines.append("")
    for r in results:
        s2s = _agg(r["seed_to_seed_fd"])
        lines.append(f"- {r['arch']} {r['solver']}-{r['steps']}: seed-to-seed FD-digits floor {s2s[0]:.2f} ± {s2s[1]:.2f}"
                     + (f"; per-block schedule threshold {r['threshold']:.3f}, ideal speedup {r['ideal_speedup']:.2f}x."
                        if "threshold" in r else "."))
        if "threshold_step" in r:
            lines.append(f"  Step-level schedule (all blocks refresh together): threshold {r['threshold_step']:.3f}, "
                         f"ideal speedup {r['ideal_speedup_step']:.2f}x.")
        if "search" in r:
            ch = r["search"]["chosen"]
            lines.append(f"  Searched schedule (`bcc.search_schedule`): {ch['family']}, {ch['fraction']:.3f} of the "
                         f"measured cost (fit within {r['search'].get('cost_fit_max_rel_error', float('nan')):.1%}), "
                         f"{ch['psnr_db']:.1f} dB on search seeds {r['search']['seeds']} "
                         f"({len(r['search']['tried'])} schedules scored).")
        for key, what, against in (("scale_shift", "Scale-shift", "naive caching"),
                                    ("planned_scale_shift", "Scale-shift for the searched schedule",
                                     "the searched schedule without it")):
            t = r.get(key)
            if not t:
                continue
            how = (" on the guided prediction" if t.get("guided_loss") else "") + (
                ", a correction per guidance half" if t.get("groups", 1) == 2 else "")
            how += f", lr {t['lr']:g}" if t.get("lr", 5e-3) != 5e-3 else ""
            lines.append(f"  {what}: {t['kind']} form, {t['loss']} loss{how}, {t['iterations']} trajectories, "
                         f"{t['parameters']:,} parameters, trained in {t['train_seconds'] / 60:.1f} min; "
                         f"{_loss_trend(t)}; "
                         f"time per trajectory vs {against} {t.get('overhead', float('nan')):+.1%}.")
            if t.get("note"):
                lines.append(f"  Note: {t['note']}")
    return "\n".join(lines) + "\n"


def _loss_trend(t: dict) -> str:
    # Every training trajectory draws fresh noise and labels, so one trajectory's loss is
    # noisy; compare means of 10. Rows trained before loss_first10 was kept show the first
    # trajectory alone, and say so: the held-out measure is the row's paired PSNR.
    if "loss_first10" in t:
        return f"training loss {t['loss_first10']:.2e} -> {t['loss_last10']:.2e} (mean of first and last 10)"
    return (f"training loss {t['loss_first']:.2e} (first trajectory) -> {t['loss_last10']:.2e} (mean of last 10; "
            "fresh noise each trajectory, so not a held-out curve)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bcc bench quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["ddim-20", "dpm-20", "ddim-50", "dpm-50"])
    ap.add_argument("--arch", nargs="+", choices=["unet", "dit"], default=["unet", "dit"])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budget", type=float, default=0.6, help="compute fraction for the automatic schedule")
    ap.add_argument("--blocks", choices=["attention", "all"], default="all")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default="results/quality")
    ap.add_argument("--ss-iterations", type=int, default=150, help="scale-shift training trajectories")
    ap.add_argument("--ss-kind", choices=["table", "linear"], default="table")
    ap.add_argument("--ss-loss", choices=["output", "block", "final"], default="output")
    ap.add_argument("--ss-groups", type=int, default=1, help="2: a correction per guidance half")
    ap.add_argument("--ss-guided", action="store_true", help="train on the guided prediction u + w (c - u)")
    ap.add_argument("--ss-lr", type=float, default=5e-3, help="scale-shift learning rate (Adam)")
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                    help="rows to measure (the baseline always runs); with --merge the others are kept")
    ap.add_argument("--resume", metavar="DIR", default=None,
                    help="keep each finished phase (schedules, scale-shift, timings, images per row and seed) "
                         "under DIR and skip it when run again with the same parameters")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of OUT/quality.json for configurations this run does not measure")
    ap.add_argument("--combine", nargs="+", metavar="DIR", default=None,
                    help="measure nothing: merge the results in these --out folders into OUT")
    ap.add_argument("--combine-rows", nargs="+", choices=ROWS, default=None,
                    help="with --combine: take only these rows from the folders (the others are kept)")
    ap.add_argument("--note", default=None, help="with --combine-rows cached_ss: added to the row's note")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    if args.combine:
        combine(out_dir, args.combine, rows=args.combine_rows, note=args.note)
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    blocks = "attention" if args.blocks == "attention" else ALL_BLOCKS
    results, commands = [], []
    if args.merge and (out_dir / "quality.json").exists():
        old = json.loads((out_dir / "quality.json").read_text())
        commands, results = _commands(old), old["results"]
    command = "python -m bcc.tools.bench.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    commands = commands + [command]
    for arch, cfg in [(a, c) for c in args.configs for a in args.arch]:
        solver, steps = cfg.split("-")
        new = bench_config(arch, solver, int(steps), n=args.n, seeds=args.seeds, budget=args.budget,
                                    blocks=blocks, guidance=args.guidance, chunk=args.chunk, repeats=args.repeats,
                                    out_dir=out_dir, log=log, ss_iterations=args.ss_iterations,
                                    ss_kind=args.ss_kind, ss_loss=args.ss_loss, ss_groups=args.ss_groups,
                                    ss_guided=args.ss_guided, ss_lr=args.ss_lr, rows=args.rows,
                                    resume=args.resume)
        results = _upsert(results, new)
        log(_write_report(out_dir, {"command": command, "commands": commands, "threads": args.threads,
                                    "floors": floors(args.seeds), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
