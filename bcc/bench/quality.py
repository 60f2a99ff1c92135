"""The paper's Table 1 on the shipped digits model.

For each solver and step count T: the uncached baseline at T steps; the baseline at
fewer steps T' with the same *measured* cost as caching; and naive caching with the
automatic schedule (Eq. 7 at a compute budget); and caching with scale-shift
trained by distillation for that schedule (``bcc.train_scale_shift``). Each row: FD-digits against the 5,000
real digits (mean ± sd over seeds; NOT Inception FID), class accuracy, precision /
recall, paired PSNR / SSIM / label flips against the baseline from the same noise,
measured speedup (compiled models, alternating runs, medians) and the predicted
compute fraction. Floors: real-vs-real and seed-to-seed FD-digits.

    python -m bcc.bench.quality --configs ddim-20 dpm-20 --n 2000 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import bcc
from bcc.digits import default_model_dir, load_digits, load_digits_model, make_grid, make_scheduler, sample
from bcc.metrics import distribution_report, fd_digits, paired_report

ALL_BLOCKS = ["*.attentions.*", "*.resnets.*", "*.upsamplers.*", "*.downsamplers.*"]


def _sampler(model, conditioner, scheduler, steps, guidance):
    def run(denoiser, labels, seed, noise=None):
        return sample(denoiser, conditioner, scheduler, labels, num_steps=steps, guidance_scale=guidance,
                      seed=seed, noise=noise)
    return run


def _generate(run, denoiser, labels, seed, chunk):
    g = torch.Generator().manual_seed(10_000 + seed)
    noise = torch.randn(len(labels), 1, 16, 16, generator=g)
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


def bench_config(arch, solver, steps, *, n, seeds, budget, blocks, guidance, chunk, repeats, out_dir, log,
                 ss_iterations=150, ss_kind="table", ss_loss="output"):
    model, conditioner, train_sched = load_digits_model(default_model_dir(arch))
    if arch == "dit":
        blocks = "attention"  # every transformer block: nearly all of a DiT's FLOPs
    scheduler = make_scheduler(solver, train_sched)
    run_t = _sampler(model, conditioner, scheduler, steps, guidance)
    log(f"== {arch} {solver}-{steps}: calibrating")
    profile = bcc.calibrate(model, lambda m, label, seed: run_t(m, [label] * 4, seed), list(range(10)), seeds=[100, 101],
                            scheduler=scheduler, guidance_scale=guidance, blocks=blocks, progress=False)
    schedule = bcc.Schedule.for_budget(profile, budget)
    log(f"   training scale-shift ({ss_kind}, {ss_loss} loss, {ss_iterations} trajectories of 8)")
    t0 = time.perf_counter()
    ss = bcc.train_scale_shift(model, schedule, lambda m, label, seed: run_t(m, [label] * 8, seed), list(range(10)),
                               iterations=ss_iterations, kind=ss_kind, loss=ss_loss, seed=5000, progress=False)
    ss_seconds = time.perf_counter() - t0
    ss.save(out_dir / f"{arch}_{solver}{steps}_scale_shift.safetensors")
    cached = bcc.compile(model, schedule)
    cached_ss = bcc.compile(model, schedule, scale_shift=ss)
    plain = torch.compile(model, fullgraph=True, options=dict(bcc.config.DEFAULT_INDUCTOR_OPTIONS))
    speed_labels = list(range(10)) * 2
    med = _time({"plain": plain, "bcc": cached, "bcc_ss": cached_ss}, run_t, speed_labels, repeats)
    measured = med["plain"] / med["bcc"]
    fewer = max(1, round(steps / measured))
    log(f"   schedule fraction {schedule.compute_fraction():.3f} (ideal {schedule.ideal_speedup():.2f}x), "
        f"measured {measured:.2f}x -> fewer-steps baseline at {fewer} steps")
    run_f = _sampler(model, conditioner, make_scheduler(solver, train_sched), fewer, guidance)
    plain_f = torch.compile(model, fullgraph=True, options=dict(bcc.config.DEFAULT_INDUCTOR_OPTIONS))
    med_f = _time({"plain": plain, "fewer": plain_f}, lambda m, l, s: (run_t if m is plain else run_f)(m, l, s),
                  speed_labels, repeats)
    real, _ = load_digits("all")
    labels = torch.arange(n) % 10
    rows = {"baseline": [], "fewer": [], "cached": [], "cached_ss": []}
    samples = {}
    baselines = []
    eager_cached = bcc.compile(model, schedule, backend="eager")
    eager_ss = bcc.compile(model, schedule, backend="eager", scale_shift=ss)
    for seed in seeds:
        log(f"   seed {seed}: sampling {n} x 4")
        outs = {"baseline": _generate(run_t, model, labels, seed, chunk),
                "fewer": _generate(run_f, model, labels, seed, chunk),
                "cached": _generate(run_t, eager_cached, labels, seed, chunk),
                "cached_ss": _generate(run_t, eager_ss, labels, seed, chunk)}
        base = outs["baseline"]
        for name, imgs in outs.items():
            samples.setdefault(name, imgs[:40])
            d = distribution_report(imgs, labels, real)
            d.update({f"paired_{k}": v for k, v in paired_report(imgs, base).items() if k != "n"})
            rows[name].append(d)
        baselines.append(base)
    # Seed-to-seed floor: the same model and settings, only the noise differs.
    seed_to_seed = [fd_digits(a, b) for a, b in zip(baselines, baselines[1:])]
    result = {
        "arch": arch, "solver": solver, "steps": steps, "fewer_steps": fewer, "n": n, "seeds": list(seeds),
        "guidance": guidance, "budget": budget, "blocks": blocks,
        "compute_fraction": schedule.compute_fraction(), "ideal_speedup": schedule.ideal_speedup(),
        "threshold": schedule.meta["threshold"],
        "speedup": {"cached": measured, "cached_ss": med["plain"] / med["bcc_ss"],
                    "fewer": med["plain"] / med_f["fewer"] if "fewer" in med_f else None},
        "median_seconds": {"plain": med["plain"], "bcc": med["bcc"], "bcc_ss": med["bcc_ss"], "fewer": med_f.get("fewer")},
        "scale_shift": {"kind": ss_kind, "loss": ss_loss, "iterations": ss_iterations, "train_seconds": ss_seconds,
                        "parameters": ss.num_parameters(), "overhead": med["bcc_ss"] / med["bcc"] - 1,
                        "loss_first": ss.history[0][f"loss_{ss_loss}"], "loss_last10": statistics.mean(
                            h[f"loss_{ss_loss}"] for h in ss.history[-10:])},
        "rows": rows,
        "seed_to_seed_fd": seed_to_seed,
    }
    # Rows: 2 x baseline, 2 x fewer steps, 2 x cached, 2 x cached + scale-shift; columns are digits 0-9.
    grid = make_grid(torch.cat([samples[k][:20] for k in ("baseline", "fewer", "cached", "cached_ss")]), nrow=10, scale=3)
    grid.save(out_dir / f"{arch}_{solver}{steps}_grid.png")
    schedule.save(out_dir / f"{arch}_{solver}{steps}_schedule.json")
    return result


def _agg(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def floors(n, seeds):
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
        for row, steps, speed, frac in (("baseline", r["steps"], 1.0, 1.0),
                                        ("fewer steps", r["fewer_steps"], r["speedup"]["fewer"], r["fewer_steps"] / r["steps"]),
                                        ("cached", r["steps"], r["speedup"]["cached"], r["compute_fraction"]),
                                        ("cached + scale-shift", r["steps"], r["speedup"]["cached_ss"], r["compute_fraction"])):
            key = {"fewer steps": "fewer", "cached + scale-shift": "cached_ss"}.get(row, row)
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
        lines.append(f"- {r['arch']} {r['solver']}-{r['steps']}: seed-to-seed FD-digits floor {s2s[0]:.2f} ± {s2s[1]:.2f}; "
                     f"schedule threshold {r['threshold']:.3f}, ideal speedup {r['ideal_speedup']:.2f}x.")
        t = r["scale_shift"]
        lines.append(f"  Scale-shift: {t['kind']} form, {t['loss']} loss, {t['iterations']} trajectories, "
                     f"{t['parameters']:,} parameters, trained in {t['train_seconds'] / 60:.1f} min; "
                     f"loss {t['loss_first']:.2e} -> {t['loss_last10']:.2e} (last 10); "
                     f"time per trajectory vs naive caching {t['overhead']:+.1%}.")
    return "\n".join(lines) + "\n"


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
    ap.add_argument("--ss-loss", choices=["output", "block"], default="output")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of OUT/quality.json for configurations this run does not measure")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    blocks = "attention" if args.blocks == "attention" else ALL_BLOCKS
    results, commands = [], []
    if args.merge and (out_dir / "quality.json").exists():
        old = json.loads((out_dir / "quality.json").read_text())
        commands = old.get("commands") or [old["command"]]
        results = old["results"]
    command = "python -m bcc.bench.quality " + " ".join(argv if argv is not None else sys.argv[1:])
    commands = commands + [command]
    for arch, cfg in [(a, c) for c in args.configs for a in args.arch]:
        solver, steps = cfg.split("-")
        key = (arch, solver, int(steps))
        results = [r for r in results if (r["arch"], r["solver"], r["steps"]) != key]
        results.append(bench_config(arch, solver, int(steps), n=args.n, seeds=args.seeds, budget=args.budget,
                                    blocks=blocks, guidance=args.guidance, chunk=args.chunk, repeats=args.repeats,
                                    out_dir=out_dir, log=log, ss_iterations=args.ss_iterations,
                                    ss_kind=args.ss_kind, ss_loss=args.ss_loss))
        results.sort(key=lambda r: (r["steps"], r["solver"] != "ddim", r["arch"] != "unet"))
        floor = floors(args.n, args.seeds)
        (out_dir / "quality.json").write_text(json.dumps(
            {"command": command, "commands": commands, "threads": args.threads, "floors": floor, "results": results},
            indent=1, default=str))
        (out_dir / "quality.md").write_text(markdown(results, floor, commands, args.threads))
        log(markdown(results, floor, commands, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
