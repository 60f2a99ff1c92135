"""Paired PSNR of a region cached as a residual of its entering stream, against the same
blocks cached one by one, on both shipped models (no timing: fidelity only).

    python results/planner/investigation/region_residual.py --out results/planner/investigation

A region used to be cached whole; since a region's output may be a residual of what its
start module reads, a run of DiT layers keeps the residual stream the per-layer caches keep.
This measures whether that closes the gap (was: every-2, 41.2 dB as blocks, 38.5 dB whole).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import bcc
from bcc.tools.bench.workloads import build_workload
from bcc.tools.metrics import paired_report


def measure(name: str, every: list[int], n: int) -> dict:
    w = build_workload(name, n=n)
    profile = bcc.calibrate(w.model, lambda m, cond, seed: w.run(m, seed=seed), [0], seeds=[100],
                            blocks=w.blocks, scheduler=w.scheduler, progress=False)
    blocks = list(profile.block_names)
    span = bcc.region(blocks[0], blocks[-1])
    ref = w.run(w.model)
    out = {"workload": w.describe, "blocks": blocks, "region": span, "rows": []}
    for unit, names in (("blocks", blocks), ("region", [span])):
        model = bcc.compile(w.model, bcc.Schedule.every(every[0], w.steps, names))
        for k in every:
            model.set_schedule(bcc.Schedule.every(k, w.steps, names))
            rep = paired_report(w.run(model), ref)
            out[f"{unit}_slots"] = [{"block": s.block, "output": s.output, "residual_base": s.base}
                                    for s in model.bcc_slots()]
            out["rows"].append({"unit": unit, "every": k, "psnr_db": rep["psnr_db"]})
            print(f"{name} {unit:6s} every-{k}: {rep['psnr_db']:.2f} dB", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=["digits-dit", "digits-unet"])
    ap.add_argument("--every", nargs="+", type=int, default=[2, 3, 4])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.manual_seed(0)
    res = {w: measure(w, args.every, args.n) for w in args.workloads}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "region_residual.json").write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
