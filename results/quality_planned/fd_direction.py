"""Why paired PSNR and FD-digits disagree: where a row's samples move, in classifier feature
space, relative to the uncached baseline and to the real digits.

Reads the samples the quality bench keeps in its ``--resume`` folder (one folder per cell,
``baseline_seed*.pt``, ``fewer_seed*.pt``, ``planned_seed*.pt``) and, per seed, reports

* FD-digits of each row against the real digits (what Table 1 shows) and against the
  baseline's own samples (distance to the uncached *model*, not to the data);
* the paired feature error: mean squared distance between the features of samples made
  from the same noise;
* how much of the row's mean feature shift points along the direction from the baseline's
  feature mean to the real digits' (cosine; negative: away from the real data).

    python results/quality_planned/fd_direction.py runs/quality_partial/unet_ddim20 --out results/quality_planned
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bcc.tools.digits import features, load_digits
from bcc.tools.metrics import feature_stats, frechet_distance

ROWS = ("fewer", "planned")


def _fd(fa: torch.Tensor, fb: torch.Tensor) -> float:
    return frechet_distance(*feature_stats(fa), *feature_stats(fb))


def analyse(cell: Path, real_f: torch.Tensor) -> dict:
    seeds = sorted(int(p.stem.split("seed")[1]) for p in cell.glob("baseline_seed*.pt"))
    out: dict = {"cell": cell.name, "seeds": seeds, "rows": {r: [] for r in ("baseline", *ROWS)}}
    mu_real = real_f.mean(0)
    for seed in seeds:
        base_f = features(torch.load(cell / f"baseline_seed{seed}.pt"))
        to_real = mu_real - base_f.mean(0)
        out["rows"]["baseline"].append({"seed": seed, "fd_real": _fd(base_f, real_f)})
        for row in ROWS:
            path = cell / f"{row}_seed{seed}.pt"
            if not path.exists():
                continue
            f = features(torch.load(path))
            shift = f.mean(0) - base_f.mean(0)
            cos = float(torch.nn.functional.cosine_similarity(shift, to_real, dim=0))
            out["rows"][row].append({
                "seed": seed, "fd_real": _fd(f, real_f), "fd_baseline": _fd(f, base_f),
                "paired_feature_mse": float(((f - base_f) ** 2).sum(1).mean()),
                "mean_shift_norm": float(shift.norm()), "shift_cos_to_real": cos})
    return out


def _mean(rows: list[dict], key: str) -> str:
    vals = [r[key] for r in rows]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.3f} ± {sd:.3f}"


def report(results: list[dict]) -> str:
    lines = ["| cell | row | FD to real | FD to baseline samples | paired feature MSE | mean shift | cos(shift, to real) |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        lines.append(f"| {res['cell']} | baseline | {_mean(res['rows']['baseline'], 'fd_real')} | — | — | — | — |")
        for row in ROWS:
            rs = res["rows"][row]
            if rs:
                lines.append(f"| {res['cell']} | {row} | " + " | ".join(
                    _mean(rs, k) for k in ("fd_real", "fd_baseline", "paired_feature_mse", "mean_shift_norm",
                                           "shift_cos_to_real")) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cells", nargs="+", type=Path, help="the quality bench's per-cell resume folders")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    real, _ = load_digits("all")
    real_f = features(real)
    results = [analyse(c, real_f) for c in args.cells]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fd_direction.json").write_text(json.dumps(results, indent=1) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
