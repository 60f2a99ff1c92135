"""The main demo: block caching on the shipped, trained digits UNet.

Calibrates the per-block change on real guided DDIM trajectories, derives the
paper's automatic schedule for a compute budget, compiles the UNet with bcc, and
trains the scale-shift correction for the schedule (a short distillation), and
generates the same digits from the same noise without caching, with naive caching and
with caching + scale-shift. Prints the blocks, the schedule, the measured speed ratio
next to the ideal one, and paired fidelity; writes a PNG grid (uncached | cached |
cached + scale-shift).

    python examples/demo.py [--budget 0.5] [--steps 20] [--out results/demo.png]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import bcc
from bcc.tools.digits import load_digits_unet, make_ddim_scheduler, make_grid, sample
from bcc.tools.metrics import paired_report

ROOT = Path(__file__).resolve().parents[1]
# Every block of the UNet's down/mid/up stages. On this small 16x16 UNet the attention
# blocks alone hold ~21% of the FLOPs (convolutions dominate at this size), which caps
# the paper's attention-only caching at ~1.26x; at SD scale attention dominates.
BLOCKS = {
    "attention": "attention",
    "all": ["*.attentions.*", "*.resnets.*", "*.upsamplers.*", "*.downsamplers.*"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=0.5, help="target compute fraction of the whole UNet")
    ap.add_argument("--blocks", choices=sorted(BLOCKS), default="all",
                    help="which blocks may be cached: the paper's attention blocks, or all stage blocks")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--per-class", type=int, default=4, help="digits per class in the grid")
    ap.add_argument("--repeats", type=int, default=5, help="timed trajectories per model (medians reported)")
    ap.add_argument("--ss-iterations", type=int, default=40, help="scale-shift training trajectories (0: skip)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(ROOT / "results" / "demo.png"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    unet, conditioner, train_sched = load_digits_unet()
    scheduler = make_ddim_scheduler(train_sched)
    run = lambda model, labels, seed: sample(  # noqa: E731
        model, conditioner, scheduler, labels, num_steps=args.steps, guidance_scale=args.guidance, seed=seed)

    print(f"[1/6] calibrating block change: 10 classes x 2 seeds, DDIM {args.steps} steps, guidance {args.guidance}")
    profile = bcc.calibrate(unet, lambda m, label, seed: run(m, [label] * 4, seed), list(range(10)), seeds=[100, 101],
                            scheduler=scheduler, guidance_scale=args.guidance, blocks=BLOCKS[args.blocks])
    print(profile.summary())
    lowest = profile.rest_flops + sum(profile.block_flops) / profile.num_steps
    print(f"cached blocks hold {100 * sum(profile.block_flops) / (profile.rest_flops + sum(profile.block_flops)):.0f}% "
          f"of the FLOPs; the lowest reachable compute fraction is "
          f"{lowest / (profile.rest_flops + sum(profile.block_flops)):.3f}")

    schedule = bcc.Schedule.for_budget(profile, args.budget)
    print(f"\n[2/6] automatic schedule for compute fraction <= {args.budget} (threshold "
          f"{schedule.meta['threshold']:.3f}): '#' recompute, '.' reuse")
    print(schedule.to_text())
    print(f"predicted compute fraction {schedule.compute_fraction():.3f}, ideal speedup {schedule.ideal_speedup():.2f}x")

    print("\n[3/6] compiling the plain UNet and the bcc UNet (torch.compile / inductor)")
    opts = dict(bcc.config.DEFAULT_INDUCTOR_OPTIONS)
    plain = torch.compile(unet, fullgraph=True, options=opts)
    cached = bcc.compile(unet, schedule)
    labels = [d for _ in range(args.per_class) for d in range(10)]  # each grid row is 0..9
    t0 = time.perf_counter(); run(plain, labels, 0); t_plain_compile = time.perf_counter() - t0
    t0 = time.perf_counter(); run(cached, labels, 0); t_bcc_compile = time.perf_counter() - t0
    print(f"first trajectory (includes compile): plain {t_plain_compile:.1f}s, bcc {t_bcc_compile:.1f}s")

    print(f"\n[4/6] timing {args.repeats} trajectories each, alternating")
    times = {"plain": [], "bcc": []}
    for _ in range(args.repeats):
        for name, model in (("plain", plain), ("bcc", cached)):
            t0 = time.perf_counter()
            run(model, labels, 0)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"median trajectory: plain {med['plain'] * 1e3:.0f} ms, bcc {med['bcc'] * 1e3:.0f} ms -> measured speedup "
          f"{med['plain'] / med['bcc']:.2f}x (ideal {schedule.ideal_speedup():.2f}x, efficiency "
          f"{med['plain'] / med['bcc'] / schedule.ideal_speedup():.2f})")

    rows = {"cached": cached}
    if args.ss_iterations > 0:
        print(f"\n[5/6] training scale-shift for this schedule: {args.ss_iterations} guided trajectories of 8 digits, "
              "model frozen, the uncached UNet as teacher")
        ss = bcc.train_scale_shift(unet, schedule, lambda m, label, seed: run(m, [label] * 8, seed), list(range(10)),
                                   iterations=args.ss_iterations, seed=5000)
        print(f"{ss.num_parameters():,} parameters; output loss {ss.history[0]['loss_output']:.2e} (first) -> "
              f"{statistics.mean(h['loss_output'] for h in ss.history[-10:]):.2e} (last 10)")
        rows["cached + scale-shift"] = bcc.compile(unet, schedule, scale_shift=ss)

    print("\n[6/6] fidelity against the uncached UNet, same noise")
    ref = run(unet, labels, 7)
    outs = []
    for name, model in rows.items():
        out = run(model, labels, 7)
        outs.append(out)
        report = paired_report(out, ref, labels=torch.tensor(labels))
        print(f"{name:>22}: paired PSNR {report['psnr_db']:.1f} dB, SSIM {report['ssim']:.3f}, label flips "
              f"{report['label_flip_rate']:.1%}, class accuracy {report['accuracy_candidate']:.1%} "
              f"(uncached {report['accuracy_reference']:.1%})")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(torch.cat([ref, *outs]), nrow=10, scale=3)
    grid.save(path)
    print(f"wrote {path} (bands of {args.per_class} rows: uncached, {', '.join(rows)}; columns are digits 0-9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
