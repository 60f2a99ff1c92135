"""Which schedules of equal predicted cost keep FD-digits: a probe on one Table 1 cell.

Table 1's UNet cells lose FD-digits to fewer steps although their paired PSNR is higher
(`fd_direction.md`). This probe asks whether *where* the cached steps fall, or a mixture
of fewer steps with caching, changes that at the same predicted cost. It samples one seed
of the cell's protocol (the same noise as Table 1's seed, N images, guidance 3), with
bcc's eager rewrite (exact, nothing compiles), for:

* the baseline, and fewer steps T' (the rows Table 1 compares);
* the searched region schedule Table 1 used (``--planned``), and the same region skipped at
  other steps with the same count (early, spread, late);
* mixtures: T'' steps between T' and T with the region skipped at k of them, k chosen so
  the predicted cost matches.

Costs are the searched schedule's measured per-step block and rest costs (its JSON), as
fractions of T all-compute steps. Reported per row: predicted cost, FD-digits against the
5,000 real digits, paired PSNR against the baseline from the same noise.

    python results/quality_planned/fd_probe.py --solver dpm --steps 20 --planned results/quality_planned/unet_dpm20_planned_schedule.json --out results/quality_planned/fd_probe_unet_dpm20.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import bcc
from bcc.tools.bench.quality import evaluation_noise
from bcc.tools.digits import default_model_dir, load_digits, load_digits_model, make_scheduler, sample
from bcc.tools.metrics import fd_digits, psnr


def _generate(model, conditioner, sched, steps, labels, seed, chunk, denoiser):
    noise = evaluation_noise(len(labels), seed)  # Table 1's noise for this seed
    outs = [sample(denoiser, conditioner, sched, labels[i:i + chunk], num_steps=steps, guidance_scale=3.0,
                   seed=seed, noise=noise[i:i + chunk]) for i in range(0, len(labels), chunk)]
    return torch.cat(outs)


def _mask(steps: int, skips: list[int]) -> list[list[bool]]:
    return [[i not in skips] for i in range(steps)]


def _spread(first: int, last: int, k: int) -> list[int]:
    """k steps spread evenly over [first, last] (adjacent ones where the span is short)."""
    if k == 0:
        return []
    span = last - first
    return sorted({first + round(j * span / max(k - 1, 1)) for j in range(k)}) if k > 1 else [last]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solver", default="dpm")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--planned", type=Path, required=True, help="the cell's searched schedule (a region schedule)")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)

    model, conditioner, train_sched = load_digits_model(default_model_dir("unet"))
    sched = make_scheduler(args.solver, train_sched)
    T = args.steps
    labels = [i % 10 for i in range(args.n)]
    planned = bcc.Schedule.load(args.planned)
    region = planned.block_names[0]
    b, r = planned.block_costs[0], planned.rest_cost
    skip_share = b / (b + r)  # of one step's cost, what skipping the region saves
    plan_skips = [i for i, row in enumerate(planned.mask.tolist()) if not row[0]]
    k0 = len(plan_skips)
    target = (T - k0 * skip_share) / T

    real, _ = load_digits("train")
    rows: list[dict] = []
    base = None

    def run(name, steps, skips):
        nonlocal base
        t0 = time.perf_counter()
        if skips is None:
            x = _generate(model, conditioner, sched, steps, labels, args.seed, args.chunk, model)
        else:
            s = bcc.Schedule(torch.tensor(_mask(steps, skips)), (region,))
            x = _generate(model, conditioner, sched, steps, labels, args.seed, args.chunk,
                          bcc.compile(model, s, backend="eager"))
        if base is None:
            base = x
        row = {"row": name, "steps": steps, "skips": skips or [],
               "cost": (steps - len(skips or []) * skip_share) / T,
               "fd_digits": fd_digits(x, real), "psnr_db": float(psnr(x, base).mean()),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "region": region,
                                        "skip_share": skip_share, "target_cost": target, "rows": rows}, indent=1))

    run("baseline", T, None)
    for tp in sorted({int(T * target), int(T * target) + 1}):
        run(f"fewer {tp}", tp, None)
    run("searched", T, plan_skips)
    half = T // 2
    run("early", T, _spread(2, 1 + half, k0))
    run("spread", T, _spread(2, T - 1, k0))
    run("late", T, _spread(T - half, T - 1, k0))
    # Mixtures: T'' steps, k skips of the region, at the target cost.
    for t2 in range(int(T * target) + 2, T, 2):
        k = round((t2 - target * T) / skip_share)
        if 0 < k < t2 // 2:
            run(f"mix {t2}", t2, _spread(2, t2 - 2, k))


if __name__ == "__main__":
    main()
