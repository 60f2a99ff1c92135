#!/usr/bin/env python
"""Train the bcc-digits CNN classifier and write bcc/tools/data/digits_classifier.safetensors (+ .json).

    python examples/train_classifier.py [--epochs 20] [--seed 0] [--threads 1] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bcc.tools.digits.classifier import DEFAULT_CLASSIFIER_PATH, save_classifier, train_classifier  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--out", type=Path, default=DEFAULT_CLASSIFIER_PATH)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    model, info = train_classifier(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    path = save_classifier(model, args.out, info)
    print(f"held-out accuracy {info['test_accuracy']:.4f} (train {info['train_accuracy']:.4f}); wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
