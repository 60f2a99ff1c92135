"""A small CNN digit classifier for 16x16 bcc-digits images.

Used to score generated samples: :func:`classify` gives the predicted label
(class-conditional accuracy of a sampler) and :func:`features` the 128-d
penultimate activations (for a Fréchet distance between sample sets).
Inputs are images in [-1, 1] of shape (N, 1, 16, 16) (or (N, 16, 16)).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bcc.tools.digits.data import IMAGE_SIZE, NUM_CLASSES, load_digits

PACKAGE_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_CLASSIFIER_PATH = PACKAGE_DATA_DIR / "digits_classifier.safetensors"
FEATURE_DIM = 128

__all__ = [
    "DEFAULT_CLASSIFIER_PATH",
    "FEATURE_DIM",
    "DigitsClassifier",
    "train_classifier",
    "evaluate_classifier",
    "save_classifier",
    "load_classifier",
    "classify",
    "logits",
    "features",
]


class DigitsClassifier(nn.Module):
    """4 conv layers (32, 32 | pool | 64, 64 | pool) -> FC 128 (features) -> FC 10."""

    def __init__(self, num_classes: int = NUM_CLASSES, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.conv = nn.Sequential(
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        )
        side = IMAGE_SIZE // 4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * side * side, feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def _prep(images: Any, device: torch.device) -> torch.Tensor:
    x = torch.as_tensor(images).detach()
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images (N, 1, H, W) or (N, H, W) in [-1, 1], got {tuple(x.shape)}")
    x = x.to(device=device, dtype=torch.float32)
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    return x


def _random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate every image by up to ``max_shift`` pixels (background fill -1)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen)
    out = torch.empty_like(x)
    for k in range(n):
        dy, dx = int(offs[k, 0]), int(offs[k, 1])
        out[k] = padded[k, :, dy : dy + h, dx : dx + w]
    return out


@torch.no_grad()
def evaluate_classifier(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    pred = classify(images, model=model)
    return float((pred == torch.as_tensor(labels).to(pred.device)).float().mean())


def train_classifier(
    *,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    log: Any = print,
) -> tuple[DigitsClassifier, dict[str, Any]]:
    """Train on the train split; returns ``(model in eval mode, info)``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_digits("train")
    x_test, y_test = load_digits("test")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        tot_loss = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb = _random_shift(x_train[idx], gen)
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += float(loss.detach()) * len(idx)
        model.eval()
        if log is not None and (epoch % 5 == 4 or epoch == epochs - 1):
            acc = evaluate_classifier(model, x_test, y_test)
            log(f"epoch {epoch + 1}/{epochs}  loss {tot_loss / len(x_train):.4f}  test acc {acc:.4f}  ({time.time() - t0:.1f}s)")
    model.eval()
    info = {
        "test_accuracy": round(evaluate_classifier(model, x_test, y_test), 4),
        "train_accuracy": round(evaluate_classifier(model, x_train, y_train), 4),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_seconds": round(time.time() - t0, 1),
        "num_train": len(x_train),
        "num_test": len(x_test),
        "feature_dim": FEATURE_DIM,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, info


def save_classifier(model: DigitsClassifier, path: str | os.PathLike | None = None, info: dict | None = None) -> Path:
    """Weights to ``path`` (safetensors) and ``info`` to the same name with ``.json``."""
    from safetensors.torch import save_file

    path = Path(path) if path is not None else DEFAULT_CLASSIFIER_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(info or {}, indent=2) + "\n")
    _cached_default.cache_clear()
    return path


def load_classifier(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu") -> DigitsClassifier:
    """Load the trained classifier (eval mode). Raises FileNotFoundError/ValueError with a retrain hint."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_CLASSIFIER_PATH
    hint = "Train it with `python examples/train_classifier.py` (well under a minute on one CPU core)."
    if not path.is_file():
        raise FileNotFoundError(f"bcc-digits classifier weights not found at {path}. {hint}")
    model = DigitsClassifier()
    try:
        model.load_state_dict(load_file(str(path)))
    except Exception as exc:
        raise ValueError(f"bcc-digits classifier weights at {path} could not be loaded ({type(exc).__name__}: {exc}). {hint}") from exc
    return model.to(device).eval()


@functools.lru_cache(maxsize=1)
def _cached_default() -> DigitsClassifier:
    return load_classifier()


def _model_or_default(model: DigitsClassifier | None) -> DigitsClassifier:
    return model if model is not None else _cached_default()


@torch.no_grad()
def _run(model: DigitsClassifier, images: Any, fn: str, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    x = _prep(images, device)
    outs = [getattr(model, fn)(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    if was_training:
        model.train()
    if not outs:
        return torch.empty(0, FEATURE_DIM if fn == "features" else NUM_CLASSES)
    return torch.cat(outs)


def classify(images: Any, model: DigitsClassifier | None = None, *, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels (N,) int64 for images in [-1, 1]; ``model`` defaults to the packaged classifier."""
    return _run(_model_or_default(model), images, "forward", batch_size).argmax(dim=1).cpu()


def logits(images: Any, model: DigitsClassifier | None = None, *, batch_size: int = 512) -> torch.Tensor:
    """Class logits (N, 10)."""
    return _run(_model_or_default(model), images, "forward", batch_size).cpu()


def features(images: Any, model: DigitsClassifier | None = None, *, batch_size: int = 512) -> torch.Tensor:
    """Penultimate features (N, 128) float32 for images in [-1, 1]."""
    return _run(_model_or_default(model), images, "features", batch_size).cpu()
