"""How close a resampled plan's samples are to a freshly calibrated one's (the shipped digits models).

A :class:`bcc.Plan` serves a step count it has no profile for by resampling the nearest
profile over normalised time (:func:`bcc.plan.budget.resample_profile`). This measures what
that costs: for each model and each pair ``T -> T'`` it calibrates at ``T`` and at ``T'``
(DDIM, guidance 3, 10 labels x 2 seeds of 4, as the quality benchmark), builds the schedule
for ``T'`` at the same budget from each (``Plan(profile_T).schedule_for(T')``, resampled,
and ``Plan(profile_T').schedule_for(T')``, fresh), samples ``n`` digits from the same noise
with both and with the uncached model at ``T'``, and reports paired PSNR / SSIM / label
flips of resampled vs fresh and of each vs uncached, with both schedules' compute
fractions and how many mask entries they share. Per-block and step-level granularity.

    python -m bcc.tools.bench.resample --n 300 --out results/pipelines
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import bcc
from bcc.tools.bench.quality import ALL_BLOCKS
from bcc.tools.digits import default_model_dir, load_digits_model, make_scheduler, sample
from bcc.tools.metrics import paired_report

PAIRS = ((20, 25), (50, 30))
GRANULARITIES = ("block", "step")


def _sampler(model, conditioner, train_sched, steps, guidance):
    def run(denoiser, labels, seed, noise=None):
        return sample(denoiser, conditioner, make_scheduler("ddim", train_sched), labels, num_steps=steps,
                      guidance_scale=guidance, seed=seed, noise=noise)
    return run


def _images(run, denoiser, n, chunk):
    labels = torch.arange(n) % 10
    noise = torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(20_000))
    with torch.no_grad():
        return torch.cat([run(denoiser, labels[i:i + chunk], 0, noise[i:i + chunk]) for i in range(0, n, chunk)])


def _paired(a, b):
    r = paired_report(a, b)
    return {"psnr_db": r["psnr_db"], "ssim": r["ssim"], "label_flip_rate": r["label_flip_rate"]}


def bench(arch, src, dst, *, n, budget, guidance, chunk, log):
    model, conditioner, train_sched = load_digits_model(default_model_dir(arch))
    blocks = "attention" if arch == "dit" else ALL_BLOCKS
    profiles = {}
    for steps in (src, dst):
        run_t = _sampler(model, conditioner, train_sched, steps, guidance)
        t0 = time.perf_counter()
        profiles[steps] = bcc.calibrate(model, lambda m, label, seed: run_t(m, [label] * 4, seed), list(range(10)),
                                        seeds=[100, 101], scheduler=make_scheduler("ddim", train_sched),
                                        guidance_scale=guidance, blocks=blocks, progress=False)
        log(f"   {arch}: calibrated at {steps} steps in {time.perf_counter() - t0:.0f} s")
    run = _sampler(model, conditioner, train_sched, dst, guidance)
    uncached = _images(run, model, n, chunk)
    result = {"arch": arch, "from_steps": src, "to_steps": dst, "n": n, "budget": budget, "guidance": guidance,
              "solver": "ddim", "blocks": blocks, "granularity": {}}
    for granularity in GRANULARITIES:
        resampled = bcc.Plan(profiles[src], budget=budget, granularity=granularity).schedule_for(dst)
        fresh = bcc.Plan(profiles[dst], budget=budget, granularity=granularity).schedule_for(dst)
        fresh = fresh.reorder(resampled.block_names)
        imgs = {name: _images(run, bcc.compile(model, s, backend="eager"), n, chunk)
                for name, s in (("resampled", resampled), ("fresh", fresh))}
        row = {
            "compute_fraction": {"resampled": resampled.compute_fraction(), "fresh": fresh.compute_fraction()},
            "threshold": {"resampled": resampled.meta["threshold"], "fresh": fresh.meta["threshold"]},
            "mask_agreement": float((resampled.mask == fresh.mask).double().mean()),
            "resampled_vs_fresh": _paired(imgs["resampled"], imgs["fresh"]),
            "resampled_vs_uncached": _paired(imgs["resampled"], uncached),
            "fresh_vs_uncached": _paired(imgs["fresh"], uncached),
        }
        result["granularity"][granularity] = row
        log(f"   {arch} {src}->{dst} {granularity}: resampled vs fresh {row['resampled_vs_fresh']['psnr_db']:.1f} dB; "
            f"vs uncached {row['resampled_vs_uncached']['psnr_db']:.1f} / {row['fresh_vs_uncached']['psnr_db']:.1f} dB "
            f"(fractions {row['compute_fraction']['resampled']:.3f} / {row['compute_fraction']['fresh']:.3f})")
    return result


def markdown(report) -> str:
    lines = ["# Resampled vs freshly calibrated schedules (digits models)", "",
             f"Command: `{report['command']}` ({report['threads']} torch thread, {report['seconds']:.0f} s).", "",
             "DDIM, guidance 3, budget {budget} (compute fraction of the whole denoiser's FLOPs), {n} digits from "
             "the same noise per row; the profile at T is resampled to T' over normalised time "
             "(`bcc.Plan(profile_T, budget=...).schedule_for(T')`), the fresh one is calibrated at T'. Paired "
             "PSNR/SSIM/label flips; 'uncached' is the plain model at T'.".format(**report["results"][0]), "",
             "| model | T -> T' | granularity | resampled vs fresh | resampled vs uncached | fresh vs uncached | "
             "fraction resampled / fresh | masks equal |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        for g, row in r["granularity"].items():
            p = lambda k: f"{row[k]['psnr_db']:.1f} dB / {row[k]['ssim']:.3f} / {100 * row[k]['label_flip_rate']:.1f}%"  # noqa: E731
            lines.append(f"| {r['arch']} | {r['from_steps']} -> {r['to_steps']} | {g} | {p('resampled_vs_fresh')} | "
                         f"{p('resampled_vs_uncached')} | {p('fresh_vs_uncached')} | "
                         f"{row['compute_fraction']['resampled']:.3f} / {row['compute_fraction']['fresh']:.3f} | "
                         f"{100 * row['mask_agreement']:.0f}% |")
    lines += ["", "Cells: PSNR / SSIM / label-flip rate. 'masks equal' counts identical mask entries: the same "
              "refresh pattern shifted by one step (every other step, from one step later) differs in most "
              "entries while it recomputes as often, so read it with the fractions and the paired metrics."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bcc.tools.bench.resample", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", choices=["unet", "dit"], default=["unet", "dit"])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--budget", type=float, default=0.667)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--chunk", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/pipelines")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    command = "python -m bcc.tools.bench.resample " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    results = [bench(arch, src, dst, n=args.n, budget=args.budget, guidance=args.guidance, chunk=args.chunk, log=log)
               for arch in args.arch for src, dst in PAIRS]
    report = {"command": command, "threads": args.threads, "seconds": time.perf_counter() - t0, "results": results}
    (out / "resample.json").write_text(json.dumps(report, indent=1))
    (out / "resample.md").write_text(markdown(report))
    log(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
