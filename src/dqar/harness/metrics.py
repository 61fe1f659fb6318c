"""Quality metrics for cached-vs-uncached comparisons: Frechet distance (FID), KID, PSNR, SSIM, accuracy.

Images are (N, C, H, W) floats in [-1, 1] (what `dqar.sampling.sample` returns). Feature statistics are
computed in float64 because the covariance square root of near-identical sets is a difference of large,
nearly equal numbers: float32 leaves FID noise larger than the effect being measured.

Feature extractors are plain callables `images -> (N, D)`:
- `EvaluatorFeatures(evaluator)`: the embedded digits classifier's penultimate features; offline, the
  default for the embedded model (FID numbers are then comparable within this project, not with papers).
- `InceptionFeatures()`: the standard Inception-v3 pool features through torchmetrics'
  FrechetInceptionDistance; needs torch-fidelity and its downloaded weights, never required here.
Two references are used: held-out real data (`fid_vs_data`) and the uncached samples of the same seeds
(`fid_vs_baseline`, which isolates what caching changed from what the model gets wrong anyway).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]
DATA_RANGE = 2.0          # images live in [-1, 1]
SSIM_KERNEL = 11          # torchmetrics' (and Wang et al.'s) default Gaussian window
_SQRTM_EPS = 1e-6         # diagonal offset when sqrtm of a singular covariance product is not finite


# ------------------------------------------------------------------------------------------------
# Frechet distance
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D, D) of a feature set, float64; precompute once for a fixed reference."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def _as_features(feats, name: str) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) feature array, got shape {tuple(arr.shape)}")
    if arr.shape[0] < 2:
        raise ValueError(f"{name} has {arr.shape[0]} row(s): a covariance needs at least 2 samples")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def feature_stats(feats, name: str = "features") -> FeatureStats:
    """Float64 mean and unbiased covariance of (N, D) features (tensor or array)."""
    arr = _as_features(feats, name)
    return FeatureStats(arr.mean(axis=0), np.cov(arr, rowvar=False).reshape(arr.shape[1], arr.shape[1]),
                        arr.shape[0])


def frechet_distance_from_stats(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})."""
    from scipy import linalg

    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    diff = a.mu - b.mu
    with warnings.catch_warnings():
        # N <= D makes the product singular; scipy warns, and the non-finite case is handled just below.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        # Few samples relative to D make the product singular; a small ridge is the usual (pytorch-fid) fix.
        offset = np.eye(a.sigma.shape[0]) * _SQRTM_EPS
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        # sqrtm of a PSD product is real; imaginary parts are round-off, but only if they are tiny.
        imag = np.abs(covmean.imag).max()
        if imag > 1e-3 * max(1.0, np.abs(covmean.real).max()):
            raise ArithmeticError(f"sqrtm produced an imaginary component of {imag:.3g}: covariances are unstable")
        covmean = covmean.real
    value = float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * np.trace(covmean))
    # Identical sets can land a hair below zero through round-off; a distance is never negative.
    return max(value, 0.0)


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets, in float64."""
    return frechet_distance_from_stats(feature_stats(feats_a, "feats_a"), feature_stats(feats_b, "feats_b"))


def fid_from_features(feats, reference: Union[torch.Tensor, np.ndarray, FeatureStats]) -> float:
    """FID of `feats` against a reference given as features or precomputed `FeatureStats`."""
    ref = reference if isinstance(reference, FeatureStats) else feature_stats(reference, "reference")
    return frechet_distance_from_stats(feature_stats(feats, "feats"), ref)


# ------------------------------------------------------------------------------------------------
# Kernel Inception Distance (unbiased MMD^2, cubic polynomial kernel)
# ------------------------------------------------------------------------------------------------

def kernel_distance(feats_a, feats_b, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> float:
    """Unbiased MMD^2 with k(x, y) = (gamma x.y + coef)^degree, gamma = 1/D by default (KID, Binkowski 2018).

    Unlike FID it is unbiased in N, so it stays meaningful for the few hundred images a CPU run makes.
    """
    x, y = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if degree < 1:
        raise ValueError(f"degree={degree} is not allowed: must be >= 1")
    g = 1.0 / x.shape[1] if gamma is None else float(gamma)
    kxx = (g * x @ x.T + coef) ** degree
    kyy = (g * y @ y.T + coef) ** degree
    kxy = (g * x @ y.T + coef) ** degree
    m, n = x.shape[0], y.shape[0]
    # The diagonal k(x_i, x_i) pairs a sample with itself, which is what biases the plain estimate.
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


# ------------------------------------------------------------------------------------------------
# Paired image metrics (same seed, cached vs uncached)
# ------------------------------------------------------------------------------------------------

def _check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(a.shape)}")
    # float64 so PSNR of nearly identical images is not dominated by float32 round-off.
    return a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB over the whole batch for images in [-1, 1] (data range 2); inf when identical."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    a, b = _check_pair(a, b)
    return float(peak_signal_noise_ratio(a, b, data_range=DATA_RANGE))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM for images in [-1, 1] (data range 2); 1.0 when identical.

    The standard 11-pixel Gaussian window is used unless the image is smaller, then the largest odd
    window that fits, so 8x8 test images still get a defined value.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = _check_pair(a, b)
    side = min(a.shape[-2], a.shape[-1])
    kernel = SSIM_KERNEL if side >= SSIM_KERNEL else max(1, side - (1 - side % 2))
    return float(structural_similarity_index_measure(a, b, data_range=DATA_RANGE, kernel_size=kernel))


def accuracy(pred, labels) -> float:
    """Fraction of predictions equal to labels; `pred` may be class indices (N,) or scores (N, K)."""
    pred = torch.as_tensor(pred)
    labels = torch.as_tensor(labels)
    if pred.ndim == 2:
        pred = pred.argmax(dim=1)
    if pred.shape != labels.shape or pred.ndim != 1:
        raise ValueError(f"pred {tuple(pred.shape)} and labels {tuple(labels.shape)} must both be (N,)")
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty batch is undefined")
    return float((pred.to(labels.device).long() == labels.long()).double().mean())


# ------------------------------------------------------------------------------------------------
# Feature extractors
# ------------------------------------------------------------------------------------------------

class EvaluatorFeatures:
    """Penultimate features of the embedded digits evaluator (offline)."""

    name = "evaluator"

    def __init__(self, evaluator, batch_size: int = 512):
        if not hasattr(evaluator, "features"):
            raise TypeError(f"{type(evaluator).__name__} has no .features(images) method")
        self.evaluator = evaluator
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # Real data arrives on the CPU while the evaluator may sit on the GPU: follow the evaluator.
        params = getattr(self.evaluator, "parameters", None)
        first = next(iter(params()), None) if callable(params) else None
        device = first.device if first is not None else images.device
        chunks = [self.evaluator.features(images[i:i + self.batch_size].to(device))
                  for i in range(0, images.shape[0], self.batch_size)]
        return torch.cat(chunks).detach().to("cpu", torch.float64)


class InceptionFeatures:
    """Inception-v3 2048-d pool features via torchmetrics (needs torch-fidelity and its cached weights)."""

    name = "inception"

    def __init__(self, device: torch.device | str = "cpu", batch_size: int = 64):
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance

            fid = FrechetInceptionDistance(feature=2048, normalize=False)
        except (ImportError, ModuleNotFoundError) as exc:
            raise RuntimeError(
                "Inception FID needs torch-fidelity (pip install torch-fidelity) and its Inception weights; "
                f"use the embedded evaluator's features instead ({exc})") from exc
        except Exception as exc:  # download failures surface as URLError/OSError/HTTPError
            raise RuntimeError(
                "Inception FID weights are not available (no internet and not in the torch hub cache); "
                f"use the embedded evaluator's features instead ({type(exc).__name__}: {exc})") from exc
        self.inception = fid.inception.to(device).eval()
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # The network takes uint8 RGB and resizes to 299 itself; grey images are repeated to 3 channels.
        u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if u8.shape[1] == 1:
            u8 = u8.repeat(1, 3, 1, 1)
        elif u8.shape[1] != 3:
            raise ValueError(f"Inception features need 1 or 3 channels, got {u8.shape[1]}")
        chunks = [self.inception(u8[i:i + self.batch_size].to(self.device))
                  for i in range(0, u8.shape[0], self.batch_size)]
        return torch.cat(chunks).to("cpu", torch.float64)


FEATURE_EXTRACTORS = ("evaluator", "inception")


def make_feature_extractor(kind: str, evaluator=None, device: torch.device | str = "cpu") -> FeatureExtractor:
    """'evaluator' (needs the embedded evaluator) or 'inception' (needs torch-fidelity weights)."""
    if kind == "evaluator":
        if evaluator is None:
            raise ValueError("feature extractor 'evaluator' needs an evaluator (dqar.digits.embedded.load_evaluator())")
        return EvaluatorFeatures(evaluator)
    if kind == "inception":
        return InceptionFeatures(device)
    raise ValueError(f"feature extractor {kind!r} is not known; allowed: {', '.join(FEATURE_EXTRACTORS)}")


def real_data_stats(extractor: FeatureExtractor, split: str = "test") -> FeatureStats:
    """Feature statistics of the held-out real digits (the embedded model's FID reference)."""
    from dqar.digits.data import load_split

    return feature_stats(extractor(load_split(split).images), f"real {split} features")


def fid_vs_data(images: torch.Tensor, extractor: FeatureExtractor, real) -> float:
    """FID of generated images against real data (`real`: features or FeatureStats)."""
    return fid_from_features(extractor(images), real)


def fid_vs_baseline(images: torch.Tensor, baseline, extractor: FeatureExtractor) -> float:
    """FID of cached samples against the uncached samples of the same seeds.

    `baseline` is the uncached images (N, C, H, W), or their precomputed features / FeatureStats.
    """
    if isinstance(baseline, torch.Tensor) and baseline.ndim == 4:
        baseline = extractor(baseline)
    return fid_from_features(extractor(images), baseline)
