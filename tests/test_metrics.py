"""Metrics against closed forms on tiny seeded inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dqar.harness import metrics
from dqar.harness.metrics import (FeatureStats, accuracy, feature_stats, fid_from_features, fid_vs_baseline,
                               frechet_distance, frechet_distance_from_stats, kernel_distance, psnr, ssim)


def _exact_gaussian_sample(rng: np.random.Generator, mean: np.ndarray, var: np.ndarray, n: int) -> np.ndarray:
    """Samples whose empirical mean and (unbiased) covariance are exactly `mean` and diag(var)."""
    z = rng.standard_normal((n, mean.size))
    z -= z.mean(axis=0)
    # Whiten so the sample covariance is exactly I, then scale: the closed form is then exact, not approximate.
    cov = np.cov(z, rowvar=False)
    w = np.linalg.cholesky(np.linalg.inv(cov))
    z = z @ w
    return z * np.sqrt(var) + mean


def test_frechet_distance_matches_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, var1 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 4.0, 0.25])
    mu2, var2 = np.array([1.0, 1.0, 0.5]), np.array([9.0, 1.0, 0.25])
    a = _exact_gaussian_sample(rng, mu1, var1, 50)
    b = _exact_gaussian_sample(rng, mu2, var2, 70)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    # = (1 + 0 + 6.25) + (1 + 9 - 6) + (4 + 1 - 4) + (0.25 + 0.25 - 0.5) = 12.25 (hand check of the formula)
    assert expected == pytest.approx(12.25, abs=1e-12)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-8)
    assert frechet_distance(torch.from_numpy(b), a) == pytest.approx(expected, abs=1e-8)


def test_frechet_distance_from_stats_closed_form():
    a = FeatureStats(np.array([0.0, 0.0]), np.diag([1.0, 4.0]), 10)
    b = FeatureStats(np.array([3.0, 4.0]), np.diag([4.0, 4.0]), 10)
    # 25 + (1 + 4 - 2*2) + (4 + 4 - 2*4) = 26
    assert frechet_distance_from_stats(a, b) == pytest.approx(26.0, abs=1e-10)


def test_frechet_distance_identical_sets_is_zero():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(40, 8, generator=g)
    assert abs(frechet_distance(feats, feats.clone())) < 1e-6
    # Fewer samples than dimensions: singular covariance, still ~0 and finite.
    few = torch.randn(5, 16, generator=g)
    assert abs(frechet_distance(few, few)) < 1e-6


def test_fid_from_features_accepts_precomputed_stats():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g) + 0.5
    assert fid_from_features(x, feature_stats(y)) == fid_from_features(x, y) == frechet_distance(x, y)


def test_fid_vs_baseline_with_images_and_extractor():
    g = torch.Generator().manual_seed(2)
    imgs = torch.rand(6, 1, 4, 4, generator=g) * 2 - 1
    flat = lambda im: im.flatten(1)[:, :3].double()  # noqa: E731 - a fake extractor: first 3 pixels
    assert abs(fid_vs_baseline(imgs, imgs.clone(), flat)) < 1e-6
    shifted = imgs + 0.5
    # A constant shift moves only the mean: FID = 3 * 0.5^2.
    assert fid_vs_baseline(shifted, imgs, flat) == pytest.approx(0.75, abs=1e-9)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(np.zeros(5), np.zeros((5, 1)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(np.random.default_rng(0).random((4, 3)), np.random.default_rng(1).random((4, 2)))


def test_kernel_distance_hand_computed():
    # d = 1, gamma = 1, k(x, y) = (xy + 1)^3; x = [0, 1], y = [2, 3]
    # Kxx off-diagonal: k(0,1) = 1; Kyy: k(2,3) = 343; Kxy mean: (1 + 1 + 27 + 64) / 4 = 23.25
    x, y = np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]])
    assert kernel_distance(x, y) == pytest.approx(1 + 343 - 2 * 23.25, abs=1e-12)


def test_psnr_identical_is_inf_and_known_noise():
    a = torch.zeros(2, 1, 4, 4, dtype=torch.float64)  # float64 so 0.2 is 0.2 to 1e-16
    assert psnr(a, a.clone()) == math.inf
    # Half the pixels off by 0.2, half by -0.2: MSE = 0.04, PSNR = 10 log10(2^2 / 0.04) = 20 dB exactly.
    noise = torch.full((2, 1, 4, 4), 0.2, dtype=torch.float64)
    noise[:, :, ::2] = -0.2
    # torchmetrics converts ln to log10 with a float32 constant: agreement is to ~1e-6 dB.
    assert psnr(a + noise, a) == pytest.approx(20.0, abs=1e-5)
    # One pixel of 32 off by 1.0: MSE = 1/32, PSNR = 10 log10(4 * 32).
    b = a.clone()
    b[0, 0, 1, 2] = 1.0
    assert psnr(b, a) == pytest.approx(10 * math.log10(128), abs=1e-5)


def test_ssim_identical_is_one_and_noise_lowers_it():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    assert ssim(a, a.clone()) == pytest.approx(1.0, abs=1e-12)
    noisy = (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    assert 0.0 < ssim(noisy, a) < 0.95
    small = torch.rand(2, 1, 8, 8, generator=g) * 2 - 1
    assert ssim(small, small.clone()) == pytest.approx(1.0, abs=1e-12)


def test_paired_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        ssim(torch.zeros(4, 4), torch.zeros(4, 4))


def test_accuracy_indices_and_scores():
    labels = torch.tensor([0, 1, 2, 3])
    assert accuracy(torch.tensor([0, 1, 0, 3]), labels) == 0.75
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert accuracy(scores, [0, 1, 1]) == pytest.approx(2 / 3, abs=1e-15)
    with pytest.raises(ValueError, match="must both be"):
        accuracy(torch.tensor([0, 1]), labels)


def test_feature_extractor_choice_errors_are_clear():
    with pytest.raises(ValueError, match="'bogus' is not known; allowed: evaluator, inception"):
        metrics.make_feature_extractor("bogus")
    with pytest.raises(ValueError, match="needs an evaluator"):
        metrics.make_feature_extractor("evaluator")


def test_evaluator_features_batches_and_returns_float64():
    class FakeEvaluator:
        def __init__(self):
            self.batches = []

        def features(self, images):
            self.batches.append(images.shape[0])
            return images.flatten(1)[:, :2].float()

    ev = FakeEvaluator()
    ext = metrics.EvaluatorFeatures(ev, batch_size=3)
    out = ext(torch.arange(7 * 4, dtype=torch.float32).reshape(7, 1, 2, 2))
    assert ev.batches == [3, 3, 1]
    assert out.dtype == torch.float64 and out.shape == (7, 2)
    assert out[6].tolist() == [24.0, 25.0]
