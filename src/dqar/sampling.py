"""Sampling loop over diffusers schedulers with classifier-free guidance and one generator per sample.

Image k depends only on its own seed (EDM's convention), so paired cached-vs-uncached comparisons and
sharded multi-process runs see the same starting noise whatever the batch size. Observers (the DQAR
controller among them) are told when each step begins and, with the x0 prediction, when it ends.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from .method.controller import CONTROLLER_ATTR

SAMPLERS = ("ddim", "dpm")
BRANCHES_CFG = ("cond", "uncond")
BRANCHES_COND = ("cond",)


@dataclass
class StepInfo:
    """What a sampler knows about one denoising step."""

    step_index: int
    total_steps: int
    timestep: int
    alpha: float                # sqrt(alphas_cumprod[t])
    sigma: float                # sqrt(1 - alphas_cumprod[t])
    x: torch.Tensor             # (N, C, H, W) current noisy sample x_t, one row per image (no CFG copy)
    branches: tuple[str, ...]   # how the model's batch is split: ("cond", "uncond") under CFG
    x0: torch.Tensor | None = None  # (N, C, H, W) the model's x0 prediction; set at step end

    @property
    def progress(self) -> float:
        return self.step_index / max(self.total_steps - 1, 1)

    @property
    def schedule_snr(self) -> float:
        return (self.alpha ** 2) / max(self.sigma ** 2, 1e-12)


class StepObserver(Protocol):
    def on_step_begin(self, info: StepInfo) -> None: ...

    def on_step_end(self, info: StepInfo) -> None: ...


def validate_sampling_args(sampler: str, steps: int, cfg_scale: float, train_timesteps: int = 1000) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not known; allowed: {', '.join(SAMPLERS)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= train_timesteps:
        raise ValueError(f"steps={steps!r} is not allowed: must be an integer in [1, {train_timesteps}] "
                         "(the schedule's training timesteps)")
    if not (cfg_scale >= 0 and math.isfinite(cfg_scale)):
        raise ValueError(f"cfg_scale={cfg_scale!r} is not allowed: must be a finite number >= 0")


def make_scheduler(sampler: str, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                   beta_end: float = 0.02):
    """A diffusers scheduler over DiT's linear beta schedule (imported lazily: diffusers is heavy)."""
    if sampler == "ddim":
        from diffusers import DDIMScheduler

        return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                             beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    if sampler == "dpm":
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                                           beta_end=beta_end, beta_schedule="linear",
                                           algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"sampler={sampler!r} is not known; allowed: {', '.join(SAMPLERS)}")


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, *shape) noise; row k comes from its own CPU generator seeded with seeds[k]."""
    rows = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def guide(out_cond: torch.Tensor, out_uncond: torch.Tensor, scale: float, channels: int) -> torch.Tensor:
    """Classifier-free guidance on the first `channels` (epsilon) channels; learned sigma stays conditional."""
    # Written as cond + (s - 1)(cond - uncond), which equals uncond + s(cond - uncond) and is exactly
    # the conditional prediction at s = 1.
    c, u = out_cond[:, :channels], out_uncond[:, :channels]
    eps = c + (scale - 1.0) * (c - u)
    return torch.cat([eps, out_cond[:, channels:]], dim=1)


Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample(model: torch.nn.Module, class_labels: Sequence[int], seeds: Sequence[int], *, steps: int = 50,
           sampler: str = "ddim", cfg_scale: float = 1.5, observers: Sequence[StepObserver] = (),
           device: torch.device | str = "cpu", progress: bool = False, denoiser: Denoiser | None = None,
           sample_shape: tuple[int, int, int] | None = None, null_class: int | None = None) -> torch.Tensor:
    """Generate one image per (label, seed); returns (N, C, H, W) in the model's data range.

    `denoiser(x, t, y)` defaults to `model(x, t, y)`; guidance uses `null_class` (the model's
    `num_classes`) for the unconditional half. Guidance is skipped when `cfg_scale == 1`.
    """
    validate_sampling_args(sampler, steps, cfg_scale)
    if len(class_labels) != len(seeds):
        raise ValueError(f"got {len(class_labels)} class labels but {len(seeds)} seeds: one seed per image")
    cfg = getattr(model, "config", None)
    if sample_shape is None:
        sample_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    channels = sample_shape[0]
    null_class = cfg.num_classes if null_class is None else null_class
    denoiser = denoiser or (lambda x, t, y: model(x, t, y))

    hooked = getattr(model, CONTROLLER_ATTR, None)
    if hooked is not None:
        observers = [hooked[0], *observers]
    scheduler = make_scheduler(sampler)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    acp = scheduler.alphas_cumprod

    x = initial_noise(seeds, sample_shape, device) * scheduler.init_noise_sigma
    y = torch.as_tensor(list(class_labels), dtype=torch.long, device=device)
    use_cfg = cfg_scale != 1.0
    branches = BRANCHES_CFG if use_cfg else BRANCHES_COND
    y_in = torch.cat([y, torch.full_like(y, null_class)]) if use_cfg else y

    iterator = enumerate(timesteps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(timesteps), desc="sampling", unit="step", leave=False)
    for i, t in iterator:
        t_int = int(t)
        alpha, sigma = float(acp[t_int].sqrt()), float((1 - acp[t_int]).sqrt())
        info = StepInfo(i, len(timesteps), t_int, alpha, sigma, x, branches)
        for obs in observers:
            obs.on_step_begin(info)
        x_in = torch.cat([x, x]) if use_cfg else x
        t_in = torch.full((x_in.shape[0],), t_int, device=device, dtype=torch.long)
        out = denoiser(scheduler.scale_model_input(x_in, t), t_in, y_in)
        if use_cfg:
            out = guide(*out.chunk(2), cfg_scale, channels)
        eps = out[:, :channels]
        info.x0 = (x - sigma * eps) / alpha
        for obs in observers:
            obs.on_step_end(info)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images (N, C, H, W) to uint8 (N, H, W, C)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
