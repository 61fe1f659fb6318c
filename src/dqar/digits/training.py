"""Train the embedded class-conditional DiT with the DiT recipe, on CPU, seeded and reproducible.

Recipe (Peebles & Xie 2023, scaled to a 2.5M-parameter model and a 1,437-image set): epsilon prediction with
an MSE loss, the 1000-step linear beta schedule that sampling uses (taken from `sampling.make_scheduler`, so
training and sampling cannot drift apart), 10% label dropout (the model's `class_dropout_prob`) to learn the
unconditional branch that classifier-free guidance needs, AdamW without weight decay, and an EMA of the weights
that is what ships. The learning rate is constant after a short warmup, as in DiT, so a run stopped after N
steps holds exactly the weights a run with `steps=N` would produce (checkpoints are reproducible). Two changes
from the paper's ImageNet settings, both because the run is a few thousand steps rather than 400k: a higher
learning rate (1e-3 instead of 1e-4) and an EMA decay of 0.999 with the usual (1+n)/(10+n) warmup instead of
0.9999, whose horizon would exceed the run.

Every random draw (init, data order, timesteps, noise, label dropout) comes from generators seeded by `seed`,
so a run with the same settings and thread count reproduces the same weights.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import DigitsSplit, random_affine, random_shift
from dqar.models.dit import DIT_PRESETS, DiT, build_dit
from dqar.models.io import load_dit
from dqar.sampling import make_scheduler


LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class DiTTrainConfig:
    preset: str = "DiT-Digits"
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    # More EMAs of the same run, kept beside the shipped one (0: the raw weights), so the averaging length can
    # be chosen after training from one run instead of one run per decay.
    extra_ema_decays: tuple[float, ...] = ()
    max_shift: int = 0
    rotate_deg: float = 0.0                    # affine jitter: rotation drawn uniformly in +-rotate_deg
    scale_jitter: float = 0.0                  # affine jitter: isotropic scale drawn in 1 +- scale_jitter
    # Augment only examples noised at timestep >= augment_from_t; below it the model sees the exact scans,
    # so its last denoising steps learn their pixel grid while the noisy ones keep the augmentation's variety.
    augment_from_t: int = 0
    # Min-SNR-gamma loss weighting (Hang et al. 2023): each example's epsilon MSE weighted by
    # min(SNR_t, gamma) / SNR_t, so the near-clean timesteps, whose gradients conflict with the rest and barely
    # move the sample, stop dominating. 0 keeps DiT's unweighted "simple" loss.
    min_snr_gamma: float = 0.0
    lr_schedule: str = "constant"              # "constant" (DiT) or "cosine" (decay to min_lr_ratio * lr)
    min_lr_ratio: float = 0.05
    seed: int = 0
    log_every: int = 50
    init_from: str | None = None               # weights file to start from (fine-tuning) instead of a fresh init

    def __post_init__(self):
        if self.preset not in DIT_PRESETS:
            raise ValueError(f"preset={self.preset!r} is not known; allowed: {', '.join(DIT_PRESETS)}")
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: must be an integer >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} is not allowed: must be > 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r} is not allowed: must be in [0, 1)")
        for decay in self.extra_ema_decays:
            if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
                raise ValueError(f"extra_ema_decays={self.extra_ema_decays!r} is not allowed: each decay must be "
                                 "a number in [0, 1) (0: the raw weights)")
        if len(set(self.extra_ema_decays)) != len(self.extra_ema_decays) or self.ema_decay in self.extra_ema_decays:
            raise ValueError(f"extra_ema_decays={self.extra_ema_decays!r} is not allowed: decays must differ from "
                             f"each other and from ema_decay={self.ema_decay!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is not known; allowed: {', '.join(LR_SCHEDULES)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} is not allowed: must be in [0, 1]")
        if not 0.0 <= self.rotate_deg <= 45.0:
            raise ValueError(f"rotate_deg={self.rotate_deg!r} is not allowed: must be in [0, 45]")
        if not 0.0 <= self.scale_jitter < 0.5:
            raise ValueError(f"scale_jitter={self.scale_jitter!r} is not allowed: must be in [0, 0.5)")
        if self.max_shift < 0:
            raise ValueError(f"max_shift={self.max_shift!r} is not allowed: must be >= 0")
        if isinstance(self.augment_from_t, bool) or not isinstance(self.augment_from_t, int) \
                or not 0 <= self.augment_from_t < 1000:
            raise ValueError(f"augment_from_t={self.augment_from_t!r} is not allowed: must be an integer timestep "
                             "in [0, 1000)")
        if not (math.isfinite(self.min_snr_gamma) and self.min_snr_gamma >= 0.0):
            raise ValueError(f"min_snr_gamma={self.min_snr_gamma!r} is not allowed: must be a finite number >= 0 "
                             "(0: unweighted loss)")


@dataclass
class TrainResult:
    ema: DiT                                   # the weights that ship (eval mode)
    model: DiT                                 # the raw trained weights
    extra_emas: dict[float, DiT] = field(default_factory=dict)   # decay -> EMA, for cfg.extra_ema_decays
    loss_log: list[dict] = field(default_factory=list)   # one row per log_every steps
    final_loss: float = float("nan")           # mean training loss over the last 10% of steps
    wall_time_s: float = 0.0
    config: DiTTrainConfig | None = None

    def summary(self) -> dict:
        return {"final_loss": self.final_loss, "wall_time_s": self.wall_time_s, **asdict(self.config)}


def training_alphas_cumprod() -> torch.Tensor:
    """alphas_cumprod of the sampler's own scheduler (1000 steps, linear betas 1e-4..0.02), float32."""
    return make_scheduler("ddim").alphas_cumprod.to(torch.float32).clone()


def lr_at(step: int, cfg: DiTTrainConfig) -> float:
    """Linear warmup, then constant (checkpoints equal shorter runs) or cosine decay over cfg.steps."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    if cfg.lr_schedule == "constant" or step < cfg.warmup_steps:
        return cfg.lr * warm
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def ema_warmup(step: int) -> float:
    """The EMA decay's warm-up cap at 0-based `step`: (1 + step) / (10 + step). It rises slowly (0.9978 at step
    4,000, 0.9995 only past step 18,000), so in a run of a few thousand steps a larger decay never binds and the
    average is this ramp's: about the last 10% of the steps (an average weighted by about step^8)."""
    return (1 + step) / (10 + step)


def decay_binds(decay: float, steps: int) -> bool:
    """Whether `decay` caps the EMA at some step of a `steps`-step run (otherwise the warm-up ramp decides)."""
    return decay < ema_warmup(steps - 1)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def diffusion_loss(model: DiT, x0: torch.Tensor, y: torch.Tensor, acp: torch.Tensor,
                   generator: torch.Generator, clean: torch.Tensor | None = None,
                   clean_below: int = 0, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps (the DDPM 'simple' loss DiT uses).

    With `clean`, examples drawn at a timestep below `clean_below` use `clean` (the unaugmented images) in
    place of `x0`; the random draws are the same either way. With `min_snr_gamma` > 0 each example's MSE is
    weighted by min(SNR_t, gamma) / SNR_t (Min-SNR weighting for epsilon prediction)."""
    n = x0.shape[0]
    t = torch.randint(0, acp.shape[0], (n,), generator=generator)
    if clean is not None and clean_below > 0:
        x0 = torch.where((t < clean_below).view(n, 1, 1, 1), clean, x0)
    noise = torch.randn(x0.shape, generator=generator)
    a = acp[t].sqrt().view(n, 1, 1, 1)
    s = (1 - acp[t]).sqrt().view(n, 1, 1, 1)
    pred = model(a * x0 + s * noise, t, y, generator=generator)
    if min_snr_gamma <= 0:
        return F.mse_loss(pred[:, : x0.shape[1]], noise)
    snr = acp[t] / (1 - acp[t])
    per_example = (pred[:, : x0.shape[1]] - noise).pow(2).mean(dim=(1, 2, 3))
    return (per_example * snr.clamp(max=min_snr_gamma) / snr).mean()


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled index batches; each epoch is a fresh permutation, the tail rolls into the next one."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _result(ema, model, log, losses, start, cfg, steps_done, extras) -> TrainResult:
    tail = losses[-max(1, steps_done // 10):]
    return TrainResult(ema=ema, model=model, extra_emas=dict(extras), loss_log=list(log),
                       final_loss=sum(tail) / len(tail),
                       wall_time_s=time.perf_counter() - start, config=replace(cfg, steps=steps_done))


def train_dit(data: DigitsSplit, cfg: DiTTrainConfig = DiTTrainConfig(), progress: bool = True,
              checkpoint_every: int = 0,
              on_checkpoint: Callable[[TrainResult], None] | None = None) -> TrainResult:
    """Train a DiT on `data` (images in [-1, 1]); returns the EMA model, raw model and loss log.

    Every `checkpoint_every` steps `on_checkpoint` gets the run so far (config.steps = steps done), which is
    exactly what a run with that many steps returns, so a long run can be stopped at its last checkpoint.
    """
    torch.manual_seed(cfg.seed)                 # weight init draws from the global generator
    model = build_dit(cfg.preset) if cfg.init_from is None else load_dit(cfg.init_from, cfg.preset)
    shape = (model.config.in_channels, model.config.input_size, model.config.input_size)
    if tuple(data.images.shape[1:]) != shape:
        raise ValueError(f"training images have shape {tuple(data.images.shape[1:])} but preset "
                         f"{cfg.preset!r} expects {shape}")
    ema = copy.deepcopy(model).requires_grad_(False)
    extras = {decay: copy.deepcopy(model).requires_grad_(False) for decay in cfg.extra_ema_decays}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    acp = training_alphas_cumprod()
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = _batches(len(data), cfg.batch_size, gen)

    steps = range(cfg.steps)
    bar = None
    if progress:
        bar = tqdm(total=cfg.steps, desc="train DiT", unit="step")
    log, window, losses = [], [], []
    start = time.perf_counter()
    for step in steps:
        idx = next(batches)
        x0 = random_shift(data.images[idx], cfg.max_shift, gen)
        x0 = random_affine(x0, cfg.rotate_deg, cfg.scale_jitter, gen)
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = diffusion_loss(model, x0, data.labels[idx], acp, gen, clean=data.images[idx],
                              clean_below=cfg.augment_from_t, min_snr_gamma=cfg.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        warm = ema_warmup(step)
        update_ema(ema, model, min(cfg.ema_decay, warm))
        for decay, average in extras.items():
            update_ema(average, model, min(decay, warm))
        value = loss.item()
        window.append(value)
        losses.append(value)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            row = {"step": step + 1, "loss": sum(window) / len(window), "lr": lr,
                   "elapsed_s": time.perf_counter() - start}
            log.append(row)
            window = []
            if bar is not None:
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.1e}")
        if bar is not None:
            bar.update(1)
        if checkpoint_every and on_checkpoint is not None and (step + 1) % checkpoint_every == 0 \
                and step + 1 < cfg.steps:
            on_checkpoint(_result(ema, model, log, losses, start, cfg, step + 1, extras))
    if bar is not None:
        bar.close()
    return _result(ema.eval(), model.eval(), log, losses, start, cfg, cfg.steps,
                   {decay: average.eval() for decay, average in extras.items()})
