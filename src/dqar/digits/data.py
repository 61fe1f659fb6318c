"""The embedded model's data: scikit-learn's 8x8 handwritten digits, upsampled to 16x16, fixed split.

`sklearn.datasets.load_digits` ships 1,797 real scans (UCI optdigits, 10 classes, grey levels 0..16) inside
the scikit-learn wheel, so the data needs no download. DiT-Digits patchifies 16x16 images into 64 tokens, so
each 8x8 image is upsampled 2x with bilinear interpolation (`align_corners=False`: every source pixel covers a
2x2 block of the output and the border is replicated, so no ink is invented outside the original frame), then
mapped from [0, 16] to [-1, 1] (-1 is background). The train/test split is stratified and seeded once
(SPLIT_SEED); the DiT and the evaluator train only on `train`, and FID/accuracy references use only `test`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

IMAGE_SIZE = 16
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0
SPLITS = ("train", "test", "all")
_MAX_GREY = 16.0  # load_digits counts set pixels in a 4x4 block of the 32x32 scan: 0..16


@dataclass(frozen=True)
class DigitsSplit:
    """Images (N, 1, 16, 16) float32 in [-1, 1] and labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def upsample(images_8x8: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) grey levels 0..16 to (N, 1, 16, 16) in [-1, 1] (bilinear, see the module note)."""
    x = torch.as_tensor(np.asarray(images_8x8, dtype=np.float32)).unsqueeze(1) / _MAX_GREY   # (N, 1, 8, 8)
    x = torch.nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0).contiguous()                                     # (N, 1, 16, 16)


@lru_cache(maxsize=1)
def _split_indices() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(index, test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                           stratify=digits.target)
    return digits.images, digits.target.astype(np.int64), np.sort(train_idx), np.sort(test_idx)


def load_split(split: str = "train") -> DigitsSplit:
    """The fixed 'train' (1,437 images), 'test' (360) or 'all' (1,797) split."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not known; allowed: {', '.join(SPLITS)}")
    images, targets, train_idx, test_idx = _split_indices()
    idx = {"train": train_idx, "test": test_idx, "all": np.arange(len(targets))}[split]
    return DigitsSplit(upsample(images[idx]), torch.as_tensor(targets[idx]))


def train_split() -> DigitsSplit:
    return load_split("train")


def test_split() -> DigitsSplit:
    return load_split("test")


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `max_shift` pixels in x and y, filling with background (-1).

    Digits in this set are centred by the scanner's normalisation, so a 1-pixel jitter (half a source pixel)
    adds variety without producing off-centre digits the test set never shows.
    """
    if max_shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=generator)
    out = torch.empty_like(images)
    for k in range(n):
        dy, dx = int(offsets[k, 0]), int(offsets[k, 1])
        out[k] = padded[k, :, dy:dy + h, dx:dx + w]
    return out


def random_affine(images: torch.Tensor, rotate_deg: float, scale_jitter: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Rotate half the images (drawn at random) by up to +-rotate_deg and scale them by 1 +- scale_jitter.

    Bilinear resampling about the centre; pixels from outside the frame are background (-1). The other half
    keep their exact pixels (an identity grid with align_corners=False samples pixel centres), so the model
    still sees the unblurred scans the test set holds. With both amounts 0 nothing is drawn or changed.
    """
    if rotate_deg <= 0 and scale_jitter <= 0:
        return images
    n = images.shape[0]
    jittered = (torch.rand(n, generator=generator) < 0.5).float()
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(rotate_deg) * jittered
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale_jitter * jittered
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale      # grid maps output -> input coords
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    # grid_sample pads with 0, so sample (x + 1) and shift back: the padding becomes background -1.
    out = torch.nn.functional.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=False)
    return out - 1
