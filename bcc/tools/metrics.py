"""Offline quality metrics for generated images (built for the 16x16 bcc-digits model).

No Inception weights are available offline, so FID is replaced by **FD-digits**: the Fréchet
distance between Gaussians fitted to the 128-d penultimate features of the packaged digit
classifier (:func:`bcc.tools.digits.features`). It is NOT comparable with Inception FID.
Distribution metrics compare samples with real data; paired metrics (PSNR, SSIM, label flips)
compare a candidate batch (e.g. block-cached) with a reference made from the same noise.
Images are ``(N, C, H, W)`` in [-1, 1]; the digits classifier takes one channel, so pass
``feature_fn`` / ``classifier`` for other images.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = [
    "frechet_distance", "feature_stats", "fd_digits", "class_accuracy", "precision_recall",
    "psnr", "mean_psnr", "ssim", "label_flip_rate", "paired_report", "distribution_report",
]

Tensor = torch.Tensor


def _as_images(x: Any, name: str) -> Tensor:
    t = torch.as_tensor(x).detach()
    if t.ndim != 4 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty image batch of shape (N, C, H, W) in [-1, 1]; got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; expected finite images in [-1, 1]")
    return t


def _as_pair(a: Any, b: Any) -> tuple[Tensor, Tensor]:
    a, b = _as_images(a, "a"), _as_images(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired metrics need images of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b


def _as_features(x: Any, name: str, min_rows: int) -> Tensor:
    t = torch.as_tensor(x).detach()
    if t.ndim != 2 or t.shape[0] < min_rows or t.shape[1] == 0:
        raise ValueError(f"{name} must be a feature matrix (N, D) with N >= {min_rows}; got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf; expected finite features")
    return t


def _feature_pair(a: Tensor, b: Tensor, feature_fn: Any, min_rows: int) -> tuple[Tensor, Tensor]:
    fn = feature_fn or _default_features
    fa, fb = _as_features(fn(a), "features of the first images", min_rows), _as_features(fn(b), "features of the second images", min_rows)
    if fa.shape[1] != fb.shape[1]:
        raise ValueError(f"feature dims differ: {fa.shape[1]} vs {fb.shape[1]}")
    return fa, fb


def feature_stats(features: Any) -> tuple[Tensor, Tensor]:
    """Mean and covariance of a feature matrix, in float64.

    Args:
        features: ``(N, D)`` tensor or array, ``N >= 2``.
    Returns:
        ``(mu, sigma)``: ``(D,)`` mean and ``(D, D)`` unbiased covariance (like ``np.cov``).
    Example:
        >>> mu, sigma = feature_stats(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
        >>> mu.tolist(), sigma.tolist()
        ([1.0, 2.0], [[2.0, 2.0], [2.0, 2.0]])
    """
    f = _as_features(features, "features", 2)
    return f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1])


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2))``, computed in float64.

    Args:
        mu1, mu2: ``(D,)`` means.
        sigma1, sigma2: ``(D, D)`` symmetric positive semi-definite covariances (singular is fine).
    Returns:
        The distance as a float, >= 0 (rounding noise below zero is clamped).
    Example:
        >>> frechet_distance(torch.zeros(2), torch.eye(2), torch.tensor([3.0, 4.0]), torch.eye(2))
        25.0
    """
    mu1, mu2 = (torch.as_tensor(m).detach().to(torch.float64) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s).detach().to(torch.float64) for s in (sigma1, sigma2))
    d = mu1.shape[0] if mu1.ndim == 1 else -1
    if d < 1 or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError("frechet_distance expects means of shape (D,) and covariances of shape (D, D); got "
                         f"{tuple(mu1.shape)}, {tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}")
    if not all(bool(torch.isfinite(t).all()) for t in (mu1, mu2, s1, s2)):
        raise ValueError("frechet_distance got NaN or inf in a mean or covariance")
    # s1 s2 is not symmetric, so its root would need a general (Schur) sqrtm, which is fragile
    # for singular covariances. M = s1^(1/2) s2 s1^(1/2) is symmetric PSD with the same non-zero
    # eigenvalues (AB and BA share them; A = s1^(1/2), B = s1^(1/2) s2), so
    # tr((s1 s2)^(1/2)) = sum(sqrt(eig(M))), and symmetric eigensolvers stay accurate.
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    sqrt_s1 = (v * w.clamp_min(0).sqrt()) @ v.T  # tiny negative eigenvalues are rounding noise
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    fd = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean
    return max(float(fd), 0.0)


def _default_features(images: Tensor) -> Tensor:
    from bcc.tools.digits import features  # lazy: loads diffusers + classifier weights
    return features(images)


def fd_digits(images_a: Any, images_b: Any, *, feature_fn: Callable[[Tensor], Tensor] | None = None) -> float:
    """FD-digits: Fréchet distance between two image sets in the digit classifier's feature space.

    Not comparable to Inception FID. It is biased upwards for small sets (the floor between
    two real sets of 500 images is not 0), so compare values computed with equal set sizes.

    Args:
        images_a, images_b: ``(N, C, H, W)`` batches in [-1, 1], each with at least 2 images.
        feature_fn: images -> ``(N, D)`` features; defaults to :func:`bcc.tools.digits.features`.
    Returns:
        The distance as a float >= 0.
    Example:
        >>> from bcc.tools.digits import load_digits
        >>> x, _ = load_digits("test")
        >>> round(fd_digits(x, x), 6)
        0.0
    """
    fa, fb = _feature_pair(_as_images(images_a, "images_a"), _as_images(images_b, "images_b"), feature_fn, 2)
    return frechet_distance(*feature_stats(fa), *feature_stats(fb))


def _predict(images: Tensor, classifier: Any) -> Tensor:
    from bcc.tools.digits import DigitsClassifier, classify
    if classifier is None or isinstance(classifier, DigitsClassifier):
        return classify(images, model=classifier)
    with torch.no_grad():  # any other callable: images -> labels (N,) or logits (N, K)
        out = torch.as_tensor(classifier(images))
    return (out.argmax(1) if out.ndim == 2 else out).cpu()


def class_accuracy(images: Any, labels: Any, *, classifier: Any = None) -> float:
    """Fraction of images the classifier assigns to their intended label.

    Args:
        images: ``(N, C, H, W)`` in [-1, 1].
        labels: ``(N,)`` integer labels the images were conditioned on.
        classifier: a :class:`bcc.tools.digits.DigitsClassifier`, any callable returning labels or
            logits, or None for the packaged digits classifier.
    Returns:
        Top-1 accuracy in [0, 1].
    Example:
        >>> from bcc.tools.digits import load_digits
        >>> x, y = load_digits("test")
        >>> class_accuracy(x, y) > 0.95
        True
    """
    x = _as_images(images, "images")
    y = torch.as_tensor(labels)
    if y.shape != (x.shape[0],) or y.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape ({x.shape[0]},); got {y.dtype} {tuple(y.shape)}")
    return float((_predict(x, classifier) == y.cpu()).double().mean())


def _knn_radii(f: Tensor, k: int, chunk: int) -> Tensor:
    # Distance to the k-th nearest *other* point: index k of the sorted row, since the row
    # includes the point itself at distance 0 (as in Kynkäänniemi et al.'s reference code).
    return torch.cat([torch.cdist(f[i:i + chunk], f).kthvalue(k + 1, dim=1).values
                      for i in range(0, f.shape[0], chunk)])


def _coverage(query: Tensor, ref: Tensor, radii: Tensor, chunk: int) -> float:
    # A query point is "on the manifold" of ref if it falls inside any ref point's k-NN ball.
    hits = [(torch.cdist(query[i:i + chunk], ref) <= radii[None]).any(1) for i in range(0, query.shape[0], chunk)]
    return float(torch.cat(hits).double().mean())


def precision_recall(real_features: Any, fake_features: Any, k: int = 3, *, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with k-NN manifold estimates.

    Precision: fraction of fake samples inside the k-NN ball of at least one real sample
    (fidelity). Recall: fraction of real samples inside the k-NN ball of some fake sample
    (coverage). Distances are float64 and computed in ``chunk``-row blocks to bound memory.

    Args:
        real_features, fake_features: ``(N, D)`` and ``(M, D)`` features, ``N, M > k``.
        k: neighbourhood size (the paper uses 3); chunk: rows per distance block.
    Returns:
        ``(precision, recall)``, each in [0, 1].
    Example:
        >>> f = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
        >>> precision_recall(f, f)
        (1.0, 1.0)
        >>> precision_recall(f, f + 100.0)
        (0.0, 0.0)
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    real = _as_features(real_features, "real_features", k + 1)
    fake = _as_features(fake_features, "fake_features", k + 1)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dims differ: real {real.shape[1]} vs fake {fake.shape[1]}")
    precision = _coverage(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _knn_radii(fake, k, chunk), chunk)
    return precision, recall


def psnr(a: Any, b: Any, data_range: float = 2.0) -> Tensor:
    """Per-image peak signal-to-noise ratio in dB (float64).

    Args:
        a, b: ``(N, C, H, W)`` batches of the same shape.
        data_range: max - min of the pixel range (2 for [-1, 1]).
    Returns:
        ``(N,)`` tensor; ``inf`` where the two images are identical.
    Example:
        >>> x = torch.zeros(2, 1, 4, 4)
        >>> psnr(x, x + 0.1).round(decimals=3).tolist(), psnr(x, x).tolist()
        ([26.021, 26.021], [inf, inf])
    """
    a, b = _as_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)  # mse == 0 -> inf, deliberately


def mean_psnr(a: Any, b: Any, data_range: float = 2.0, *, cap_db: float = 100.0) -> float:
    """Mean of :func:`psnr` over the batch, each image capped at ``cap_db``.

    The cap keeps the mean finite and informative when some images are bit-identical
    (common for cached vs. uncached samplers); 100 dB is far above any visible difference.

    Args:
        a, b, data_range: as in :func:`psnr`.
        cap_db: upper limit applied per image before averaging.
    Returns:
        Mean PSNR in dB.
    Example:
        >>> x = torch.zeros(2, 1, 4, 4)
        >>> round(mean_psnr(x, torch.cat([x[:1], x[1:] + 0.1])), 2)  # (100 + 26.02) / 2
        63.01
    """
    return float(psnr(a, b, data_range).clamp(max=cap_db).mean())


def _gaussian_window(win_size: int, sigma: float) -> Tensor:
    r = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()  # normalised, so a constant image keeps its value under the filter
    return g[:, None] * g[None, :]


def ssim(a: Any, b: Any, data_range: float = 2.0, *, win_size: int = 7, sigma: float = 1.5) -> Tensor:
    """Per-image structural similarity (Wang et al., 2004), averaged over channels.

    Standard constants K1 = 0.01, K2 = 0.03 and a Gaussian window with sigma 1.5, but
    ``win_size`` defaults to 7 instead of the usual 11: on 16x16 images an 11x11 window leaves
    only a 6x6 map of valid positions. Only valid positions are used (no padding) and local
    statistics are Gaussian-weighted without sample-covariance correction, as in the paper.

    Args:
        a, b: ``(N, C, H, W)`` batches of the same shape, H and W >= ``win_size``.
        data_range: max - min of the pixel range (2 for [-1, 1]).
        win_size, sigma: odd window side and Gaussian standard deviation.
    Returns:
        ``(N,)`` float64 tensor, 1 for identical images.
    Example:
        >>> x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        >>> ssim(x, x).tolist()
        [1.0, 1.0]
    """
    a, b = _as_pair(a, b)
    if int(win_size) != win_size or win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd positive integer; got {win_size!r}")
    _, c, h, w = a.shape
    if h < win_size or w < win_size:
        raise ValueError(f"ssim needs images at least win_size={win_size} on each side; got {h}x{w}")
    x, y = a.double(), b.double()
    win = _gaussian_window(int(win_size), sigma).expand(c, 1, win_size, win_size)

    def filt(t: Tensor) -> Tensor:  # depthwise: each channel is filtered on its own
        return torch.nn.functional.conv2d(t, win, groups=c)

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return smap.flatten(1).mean(1)


def label_flip_rate(a: Any, b: Any, *, classifier: Any = None) -> float:
    """Fraction of pairs whose predicted labels differ (e.g. cached vs. uncached samples).

    Args:
        a, b: ``(N, C, H, W)`` batches of the same shape, paired by index.
        classifier: as in :func:`class_accuracy`.
    Returns:
        Flip rate in [0, 1].
    Example:
        >>> from bcc.tools.digits import load_digits
        >>> x, _ = load_digits("test")
        >>> label_flip_rate(x, x)
        0.0
    """
    a, b = _as_pair(a, b)
    return float((_predict(a, classifier) != _predict(b, classifier)).double().mean())


def paired_report(candidate: Any, reference: Any, *, labels: Any = None, classifier: Any = None) -> dict[str, float]:
    """Paired metrics of a candidate batch against a reference made from the same noise.

    Args:
        candidate, reference: ``(N, C, H, W)`` batches in [-1, 1] of the same shape.
        labels: optional ``(N,)`` conditioning labels; adds both batches' class accuracy.
        classifier: as in :func:`class_accuracy`.
    Returns:
        ``{"n", "psnr_db" (mean, capped at 100), "ssim", "label_flip_rate"}`` plus
        ``"accuracy_candidate"`` and ``"accuracy_reference"`` when labels are given.
    Example:
        >>> from bcc.tools.digits import load_digits
        >>> x, y = load_digits("test")
        >>> paired_report(x, x, labels=y)["label_flip_rate"]
        0.0
    """
    cand, ref = _as_pair(candidate, reference)
    report = {"n": cand.shape[0], "psnr_db": mean_psnr(cand, ref), "ssim": float(ssim(cand, ref).mean()),
              "label_flip_rate": label_flip_rate(cand, ref, classifier=classifier)}
    if labels is not None:
        report["accuracy_candidate"] = class_accuracy(cand, labels, classifier=classifier)
        report["accuracy_reference"] = class_accuracy(ref, labels, classifier=classifier)
    return report


def distribution_report(images: Any, labels: Any, real_images: Any, *, k: int = 3,
                        feature_fn: Callable[[Tensor], Tensor] | None = None, classifier: Any = None) -> dict[str, float]:
    """Distribution metrics of generated images against real images.

    Args:
        images: generated ``(N, C, H, W)`` in [-1, 1], N > k.
        labels: ``(N,)`` labels the images were conditioned on, or None to skip accuracy.
        real_images: real ``(M, C, H, W)`` in [-1, 1], M > k; use a class-balanced set.
        k, feature_fn, classifier: as in :func:`precision_recall` / :func:`fd_digits` / :func:`class_accuracy`.
    Returns:
        ``{"n", "n_real", "fd_digits", "precision", "recall"}`` and ``"accuracy"`` if labels given.
    Example:
        >>> from bcc.tools.digits import load_digits
        >>> x, y = load_digits("test")
        >>> r = distribution_report(x, y, x)
        >>> round(r["fd_digits"], 6), r["precision"], r["recall"], r["accuracy"] > 0.95
        (0.0, 1.0, 1.0, True)
    """
    x, real = _as_images(images, "images"), _as_images(real_images, "real_images")
    fx, fr = _feature_pair(x, real, feature_fn, k + 1)  # once, shared by FD and precision/recall
    precision, recall = precision_recall(fr, fx, k=k)
    report = {"n": x.shape[0], "n_real": real.shape[0],
              "fd_digits": frechet_distance(*feature_stats(fx), *feature_stats(fr)),
              "precision": precision, "recall": recall}
    if labels is not None:
        report["accuracy"] = class_accuracy(x, labels, classifier=classifier)
    return report
