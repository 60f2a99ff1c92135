"""Scale-shift ablation on the shipped digits UNet: which loss, which parametrisation.

The paper does not say whether its distillation loss matches each block's output or the
model's output, nor how the timestep enters beyond "a linear layer". This trains all
four combinations (loss: output | block; form: table | linear) for the same schedule,
iterations and seeds, and measures paired fidelity against the uncached model from the
same noise (PSNR, SSIM, label flips) next to naive caching.

    python examples/scale_shift_ablation.py --schedule results/quality/unet_ddim20_schedule.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import bcc
from bcc.tools.digits import default_model_dir, load_digits_model, make_scheduler, sample
from bcc.tools.metrics import paired_report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["unet", "dit"], default="unet")
    ap.add_argument("--schedule", default="results/quality/unet_ddim20_schedule.json")
    ap.add_argument("--solver", default="ddim")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--n", type=int, default=500, help="evaluation images")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--losses", nargs="+", default=["output", "block"], choices=["output", "block", "trajectory", "final"])
    ap.add_argument("--kinds", nargs="+", default=["table", "linear"], choices=["table", "linear"])
    ap.add_argument("--guided", action="store_true",
                    help="also train each variant with the guided loss (guidance_scale=3: compare u + 3 (c - u))")
    ap.add_argument("--groups", nargs="+", type=int, default=[1], choices=[1, 2],
                    help="batch groups to try: 2 gives each guidance half its own correction")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/scale_shift")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, conditioner, train_sched = load_digits_model(default_model_dir(args.arch))
    schedule = bcc.Schedule.load(args.schedule)
    scheduler = make_scheduler(args.solver, train_sched)
    steps = schedule.num_steps

    def run(m, labels, seed=0, noise=None, grad=False):
        return sample(m, conditioner, scheduler, labels, num_steps=steps, guidance_scale=3.0, seed=seed, noise=noise,
                      grad=grad)

    labels = [i % 10 for i in range(args.n)]
    noise = torch.randn(args.n, 1, 16, 16, generator=torch.Generator().manual_seed(123))
    base = run(model, labels, noise=noise)
    rows = [{"variant": "naive caching", **paired_report(run(bcc.compile(model, schedule, backend="eager"), labels,
                                                              noise=noise), base)}]
    variants = [(loss, g, k, n) for loss in args.losses for g in ((False, True) if args.guided else (False,))
                for k in args.kinds for n in args.groups]
    for loss, guided, kind, groups in variants:
        t0 = time.perf_counter()
        ss = bcc.train_scale_shift(model, schedule, lambda m, label, seed: run(m, [label] * 8, seed, grad=loss == "final"),
                                   list(range(10)), iterations=args.iterations, kind=kind, loss=loss,
                                   lr=args.lr, seed=5000, progress=False, guidance_scale=3.0 if guided else None,
                                   groups=groups)
        seconds = time.perf_counter() - t0
        imgs = run(bcc.compile(model, schedule, backend="eager", scale_shift=ss), labels, noise=noise)
        per_half = ", per guidance half" if groups == 2 else ""
        rows.append({"variant": f"scale-shift {kind}, {'guided ' if guided else ''}{loss} loss{per_half}",
                     "train_seconds": seconds,
                     "parameters": ss.num_parameters(), **paired_report(imgs, base)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python examples/scale_shift_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    tag = (args.arch if args.lr == 5e-3 else f"{args.arch}_lr{args.lr:g}") + args.tag
    (out / f"ablation_{tag}.json").write_text(json.dumps({"command": command, "schedule": args.schedule,
                                                               "iterations": args.iterations, "rows": rows}, indent=1))
    lines = [f"# Scale-shift ablation ({args.arch}, {args.solver}-{steps}, compute fraction "
             f"{schedule.compute_fraction():.3f})", "", f"Command: `{command}`", "",
             f"{args.iterations} training trajectories of 8 guided images each (lr {args.lr:g}), the same seeds for every variant; "
             f"paired metrics on {args.n} images against the uncached model from the same noise.", "",
             "| variant | parameters | train time | PSNR dB | SSIM | label flips |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r.get('parameters', 0):,} | "
                     f"{r['train_seconds'] / 60:.1f} min | " if "train_seconds" in r else f"| {r['variant']} | — | — | ")
        lines[-1] += f"{r['psnr_db']:.2f} | {r['ssim']:.3f} | {r['label_flip_rate']:.1%} |"
    (out / f"ablation_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
