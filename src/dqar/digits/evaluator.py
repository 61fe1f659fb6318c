"""The digits evaluator: a small CNN that scores generated digits (class accuracy) and embeds them (FID).

It plays Inception's role for the embedded model: `predict` checks that a sample shows the class it was asked
for, `features` (the 128-d penultimate layer) is the space FID is computed in. It trains on the same fixed
train split as the DiT, so held-out test digits are unseen by both.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .data import IMAGE_SIZE, NUM_CLASSES, DigitsSplit, random_shift
from dqar.models.io import WeightsError, check_state_dict, read_safetensors

ARCH_KEY = "dqar_evaluator_arch"
ARCH = {"name": "digits-cnn", "input": [1, IMAGE_SIZE, IMAGE_SIZE], "channels": [32, 64], "features": 128,
        "classes": NUM_CLASSES}


class DigitsEvaluator(nn.Module):
    """conv-conv-pool x2, then a 128-d feature layer and a 10-way linear head; input (N, 1, 16, 16) in [-1, 1]."""

    def __init__(self, c1: int = 32, c2: int = 64, feature_dim: int = 128, num_classes: int = NUM_CLASSES):
        super().__init__()

        def conv(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.body = nn.Sequential(conv(1, c1), conv(c1, c1), nn.MaxPool2d(2),           # (N, c1, 8, 8)
                                  conv(c1, c2), conv(c2, c2), nn.MaxPool2d(2))          # (N, c2, 4, 4)
        self.fc = nn.Linear(c2 * 16, feature_dim)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"evaluator input has shape {tuple(images.shape)}; expected (N, 1, {IMAGE_SIZE}, "
                             f"{IMAGE_SIZE}) images in [-1, 1]")
        # Samples can overshoot [-1, 1]; the sampler's to_uint8 clamps too, so score what would be saved.
        return images.float().clamp(-1, 1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 128) penultimate activations (after ReLU), the space FID is measured in."""
        x = self.body(self._check(images)).flatten(1)
        return F.relu(self.fc(x))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(images)))                          # (N, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) class ids; switches to eval mode for the call and restores the previous mode."""
        was_training = self.training
        self.eval()
        try:
            return self.logits(images).argmax(dim=1)
        finally:
            self.train(was_training)


@dataclass(frozen=True)
class EvaluatorTrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 5e-4
    max_shift: int = 1
    seed: int = 0


@torch.no_grad()
def accuracy(model: DigitsEvaluator, data: DigitsSplit, batch_size: int = 512) -> float:
    correct = 0
    for i in range(0, len(data), batch_size):
        correct += int((model.predict(data.images[i:i + batch_size]) == data.labels[i:i + batch_size]).sum())
    return correct / max(len(data), 1)


def train_evaluator(data: DigitsSplit, cfg: EvaluatorTrainConfig = EvaluatorTrainConfig(),
                    progress: bool = True) -> tuple[DigitsEvaluator, dict]:
    """Train on `data` with 1-pixel shift augmentation; returns the model (eval mode) and a summary."""
    torch.manual_seed(cfg.seed)
    model = DigitsEvaluator()
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = -(-len(data) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    bar = None
    if progress:
        bar = tqdm(total=cfg.epochs * steps_per_epoch, desc="train evaluator", unit="step")
    start = time.perf_counter()
    model.train()
    last_loss = float("nan")
    for _ in range(cfg.epochs):
        order = torch.randperm(len(data), generator=gen)
        total, count = 0.0, 0
        for i in range(0, len(data), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = random_shift(data.images[idx], cfg.max_shift, gen)
            loss = F.cross_entropy(model(x), data.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
            if bar is not None:
                bar.update(1)
        last_loss = total / count
        if bar is not None:
            bar.set_postfix(loss=f"{last_loss:.4f}")
    if bar is not None:
        bar.close()
    model.eval()
    summary = {"final_train_loss": last_loss, "train_accuracy": accuracy(model, data),
               "wall_time_s": time.perf_counter() - start, **asdict(cfg)}
    return model, summary


def save_evaluator(model: DigitsEvaluator, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {ARCH_KEY: json.dumps(ARCH), **(extra_metadata or {})}
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return path


def load_evaluator_file(path: str | Path) -> DigitsEvaluator:
    """Load evaluator weights (eval mode) or raise WeightsError naming the file."""
    tensors, metadata = read_safetensors(path, "evaluator weights")
    if metadata.get(ARCH_KEY) != json.dumps(ARCH):
        raise WeightsError(f"evaluator weights file {str(path)!r} is for another architecture "
                           f"({metadata.get(ARCH_KEY)!r}); expected {ARCH['name']}")
    model = DigitsEvaluator()
    check_state_dict(model, tensors, f"evaluator weights file {str(path)!r}")
    model.load_state_dict(tensors)
    return model.eval()
