"""Does an input-adaptive decision (First Block Cache-like) buy fidelity per FLOP here?

Reads the planner speed runs (``results/planner/speed/speed.json``) and, for every peer
setting, finds the bcc schedule (static: Eq. 7, step-level, every-N, searched) with the best
paired PSNR at a compute fraction no higher than the peer's. Compute fractions are executed
FLOPs / all-compute FLOPs on both sides (FlopCounterMode), so the comparison leaves out how
fast each implementation is: it asks only whether deciding per batch chooses better steps
to skip than a schedule fixed in advance.

    python results/planner/investigation/adaptive.py > results/planner/investigation/adaptive.md
"""
import json
import sys
from pathlib import Path

src = Path(sys.argv[1] if len(sys.argv) > 1 else "results/planner/speed/speed.json")
data = json.loads(src.read_text())["workloads"]
print("# Static schedules vs the peers' decisions at equal compute (FLOPs)\n")
print(f"From `{src}` (`python results/planner/investigation/adaptive.py`). For each peer setting: "
      "its executed compute fraction and paired PSNR (20 digits, seed 0, DDIM-20, guidance 3), and the "
      "bcc schedule with the best paired PSNR at a compute fraction no higher than the peer's.\n")
wins = total = 0
for name, r in data.items():
    fid, sched = r.get("fidelity", {}), r["schedules"]
    pts = [(s["compute_fraction"], fid[k]["psnr_db"], k) for k, s in sched.items() if k in fid]
    rows = (r.get("peers") or {}).get("rows", [])
    if not rows:
        continue
    print(f"## {name}\n")
    print("| peer setting | decides | compute fraction | paired PSNR dB | bcc at ≤ that fraction | fraction | PSNR dB | Δ dB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        f, p = row["compute_fraction"], row["psnr_db"]
        best = max((q for q in pts if q[0] <= f + 1e-9), key=lambda q: q[1], default=None)
        adaptive = {"FBC": "per batch, from its input", "MagCache": "by calibrated ratios",
                    "TaylorSeer": "fixed; forecasts outputs"}.get(row["label"].split()[0], "fixed in advance")
        if best is None:
            print(f"| {row['label']} | {adaptive} | {f:.3f} | {p:.1f} | — | — | — | — |")
            continue
        total += 1
        wins += best[1] >= p
        print(f"| {row['label']} | {adaptive} | {f:.3f} | {p:.1f} | {best[2]} | {best[0]:.3f} | {best[1]:.1f} | "
              f"{best[1] - p:+.1f} |")
    print()
print(f"bcc's static schedule has at least the peer's paired PSNR at no more compute in {wins} of {total} settings.")
