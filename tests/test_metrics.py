"""Tests for bcc.tools.metrics: FD-digits, precision/recall, PSNR/SSIM, flip rate, reports."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings, strategies as st

from bcc.tools import metrics as M


def _rand_cov(d: int, rank: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((d, rank))
    return a @ a.T / rank


def _scipy_fd(mu1, s1, mu2, s2) -> float:
    # Independent reference (the classic pytorch-fid formula): general sqrtm of s1 @ s2.
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


# ---------------------------------------------------------------- Fréchet distance

@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("d, rank1, rank2", [(8, 8, 8), (32, 64, 40), (16, 5, 16), (12, 3, 4)])
def test_frechet_matches_scipy(seed, d, rank1, rank2):
    # rank < d makes a covariance singular (the last two cases).
    rng = np.random.default_rng(100 + seed)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _rand_cov(d, rank1, seed), _rand_cov(d, rank2, seed + 50)
    ours = M.frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), torch.from_numpy(mu2), torch.from_numpy(s2))
    assert ours == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-6)


def test_frechet_accepts_numpy_and_float32():
    mu, s = np.zeros(3), _rand_cov(3, 3, 0)
    assert M.frechet_distance(mu, s, mu + 1, s) == pytest.approx(3.0, rel=1e-9)
    assert M.frechet_distance(torch.zeros(3), torch.eye(3), torch.ones(3), torch.eye(3)) == pytest.approx(3.0)


def test_feature_stats_matches_numpy():
    f = np.random.default_rng(0).standard_normal((40, 6))
    mu, sigma = M.feature_stats(torch.from_numpy(f).float())
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), f.mean(0), atol=1e-6)
    np.testing.assert_allclose(sigma.numpy(), np.cov(f, rowvar=False), atol=1e-6)


def test_fd_self_is_zero_and_grows_with_mean_shift():
    f = torch.randn(300, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu, sigma = M.feature_stats(f)
    assert M.frechet_distance(mu, sigma, mu, sigma) < 1e-9 * float(torch.trace(sigma))
    direction = torch.randn(16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fds = []
    for scale in [0.1, 0.5, 1.0, 3.0]:
        shift = scale * direction
        fd = M.frechet_distance(mu, sigma, mu + shift, sigma)
        # Equal covariances: the trace terms cancel and FD is exactly ||mu1 - mu2||^2.
        assert fd == pytest.approx(float(shift @ shift), rel=1e-7)
        fds.append(fd)
    assert fds == sorted(fds)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_frechet_symmetric_nonnegative(seed, d):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _rand_cov(d, rng.integers(1, d + 2), seed), _rand_cov(d, rng.integers(1, d + 2), seed + 1)
    ab, ba = M.frechet_distance(mu1, s1, mu2, s2), M.frechet_distance(mu2, s2, mu1, s1)
    assert ab >= 0 and ab == pytest.approx(ba, rel=1e-6, abs=1e-9)


def test_fd_digits_custom_feature_fn_on_rgb():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(64, 3, 8, 8, generator=g) * 2 - 1
    flat = lambda x: x.flatten(1)[:, :10]  # noqa: E731
    assert M.fd_digits(a, a, feature_fn=flat) == pytest.approx(0.0, abs=1e-9)
    assert M.fd_digits(a, a + 0.5, feature_fn=flat) == pytest.approx(10 * 0.25, rel=1e-4)


# ---------------------------------------------------------------- precision / recall

def test_precision_recall_identical_and_moved():
    f = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert M.precision_recall(f, f) == (1.0, 1.0)
    assert M.precision_recall(f, f, k=5, chunk=7) == (1.0, 1.0)  # chunking must not change results
    far = f.clone()
    far[:100] += 1000.0  # half of the fakes leave the real manifold
    precision, recall = M.precision_recall(f, far)
    assert precision == 0.5 and recall >= 0.5
    assert M.precision_recall(f, f + 1000.0) == (0.0, 0.0)


def test_precision_falls_with_distance():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g)
    precisions = [M.precision_recall(real, fake + s)[0] for s in (0.0, 1.0, 3.0)]
    assert precisions[0] > 0.8 and precisions == sorted(precisions, reverse=True) and precisions[-1] < 0.2


# ---------------------------------------------------------------- PSNR / SSIM

def test_psnr_identical_and_known_case():
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.isinf(M.psnr(x, x)).all()
    y = x.clone()
    y[1] += 0.1  # mse 0.01 over range 2 -> 10 log10(4 / 0.01)
    p = M.psnr(x, y)
    assert p.shape == (3,) and math.isinf(p[0]) and p[1] == pytest.approx(10 * math.log10(400), rel=1e-5)
    assert M.psnr(x, y, data_range=1.0)[1] == pytest.approx(20.0, rel=1e-5)
    assert M.mean_psnr(x, y) == pytest.approx((100 + 100 + 10 * math.log10(400)) / 3, rel=1e-5)
    assert M.mean_psnr(x, y, cap_db=50.0) == pytest.approx((50 + 50 + 10 * math.log10(400)) / 3, rel=1e-5)


def test_ssim_identity_noise_symmetry():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(4, 3, 16, 16, generator=g) * 2 - 1)
    assert torch.allclose(M.ssim(x, x), torch.ones(4, dtype=torch.float64))
    means = []
    for sigma in [0.02, 0.1, 0.3, 1.0]:
        y = x + sigma * torch.randn(x.shape, generator=g)
        s = M.ssim(x, y)
        assert torch.allclose(s, M.ssim(y, x), atol=1e-12)
        assert (s < 1).all()
        means.append(float(s.mean()))
    assert means == sorted(means, reverse=True)
    assert M.ssim(x, x, win_size=11).shape == (4,)


def test_ssim_constant_images_analytic():
    # No variance anywhere: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a, b = torch.full((1, 1, 16, 16), 0.5), torch.full((1, 1, 16, 16), -0.25)
    c1 = (0.01 * 2.0) ** 2
    expected = (2 * 0.5 * -0.25 + c1) / (0.25 + 0.0625 + c1)
    assert float(M.ssim(a, b)) == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- real digits

@pytest.fixture(scope="module")
def digits():
    from bcc.tools.digits import load_digits
    xt, yt = load_digits("test")
    xr, _ = load_digits("train")
    # The train split is ordered by class: take a seeded random subset, never xr[:500].
    perm = torch.randperm(len(xr), generator=torch.Generator().manual_seed(0))
    noise = torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return xt, yt, xr[perm[:500]], noise


def test_fd_digits_real_vs_noise(digits):
    xt, _, train_sub, noise = digits
    real_fd, noise_fd = M.fd_digits(xt, train_sub), M.fd_digits(xt, noise)
    assert real_fd < 0.05 * noise_fd
    assert M.fd_digits(xt, xt) < 1e-6


def test_classifier_accuracy_and_flip_rate(digits):
    xt, yt, _, _ = digits
    assert M.class_accuracy(xt, yt) >= 0.95
    assert M.label_flip_rate(xt, xt) == 0.0
    shuffled = xt[torch.randperm(len(xt), generator=torch.Generator().manual_seed(0))]
    assert M.label_flip_rate(xt, shuffled) > 0.5
    # Any callable returning logits works as a classifier.
    from bcc.tools.digits import logits
    assert M.class_accuracy(xt, yt, classifier=logits) == M.class_accuracy(xt, yt)


def test_reports(digits):
    xt, yt, train_sub, _ = digits
    rep = M.paired_report(xt, xt, labels=yt)
    assert rep["psnr_db"] == 100.0 and rep["ssim"] == pytest.approx(1.0) and rep["label_flip_rate"] == 0.0
    assert rep["accuracy_candidate"] == rep["accuracy_reference"] >= 0.95
    noisy = (xt + 0.2 * torch.randn(xt.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    rep = M.paired_report(noisy, xt)
    assert rep["psnr_db"] < 30 and rep["ssim"] < 0.95 and "accuracy_candidate" not in rep
    dist = M.distribution_report(xt, yt, train_sub)
    assert set(dist) == {"n", "n_real", "fd_digits", "precision", "recall", "accuracy"}
    assert dist["fd_digits"] == pytest.approx(M.fd_digits(xt, train_sub))
    assert dist["precision"] > 0.6 and dist["recall"] > 0.6 and dist["accuracy"] >= 0.95


# ---------------------------------------------------------------- bad input

_img = torch.zeros(4, 1, 16, 16)
_nan = _img.clone()
_nan[0, 0, 0, 0] = float("nan")


@pytest.mark.parametrize("call, match", [
    (lambda: M.psnr(_img, torch.zeros(4, 1, 8, 8)), "same shape"),
    (lambda: M.ssim(_img, torch.zeros(3, 1, 16, 16)), "same shape"),
    (lambda: M.psnr(torch.zeros(0, 1, 16, 16), torch.zeros(0, 1, 16, 16)), "non-empty"),
    (lambda: M.psnr(torch.zeros(16, 16), torch.zeros(16, 16)), r"\(N, C, H, W\)"),
    (lambda: M.psnr(_nan, _img), "NaN"),
    (lambda: M.ssim(_img, _nan), "NaN"),
    (lambda: M.ssim(_img, _img, win_size=17), "win_size"),
    (lambda: M.ssim(_img, _img, win_size=4), "odd"),
    (lambda: M.label_flip_rate(_img, _img[:2]), "same shape"),
    (lambda: M.class_accuracy(_img, torch.zeros(3, dtype=torch.long)), "labels"),
    (lambda: M.class_accuracy(_img, torch.zeros(4)), "integer"),
    (lambda: M.fd_digits(_nan, _img), "NaN"),
    (lambda: M.fd_digits(_img[:1], _img), r"N >= 2"),
    (lambda: M.fd_digits(_img, _img, feature_fn=lambda x: x.flatten(1) * float("nan")), "NaN"),
    (lambda: M.feature_stats(torch.zeros(1, 3)), r"N >= 2"),
    (lambda: M.feature_stats(torch.zeros(5)), r"\(N, D\)"),
    (lambda: M.frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(2)), r"\(D,\)"),
    (lambda: M.frechet_distance(torch.zeros(3), torch.eye(2), torch.zeros(3), torch.eye(3)), r"\(D, D\)"),
    (lambda: M.frechet_distance(torch.full((2,), float("nan")), torch.eye(2), torch.zeros(2), torch.eye(2)), "NaN"),
    (lambda: M.precision_recall(torch.zeros(3, 2), torch.zeros(10, 2), k=3), r"N >= 4"),
    (lambda: M.precision_recall(torch.zeros(10, 2), torch.zeros(10, 3)), "dims differ"),
    (lambda: M.precision_recall(torch.zeros(10, 2), torch.zeros(10, 2), k=0), "positive integer"),
    (lambda: M.precision_recall(torch.zeros(0, 2), torch.zeros(10, 2)), "real_features"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
