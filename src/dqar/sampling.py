"""Sampling loop over diffusers schedulers with classifier-free guidance and one generator per sample.

Image k depends only on its own seed (EDM's convention), so paired cached-vs-uncached comparisons and
sharded multi-process runs see the same starting noise whatever the batch size. A DQAR-hooked model's
step driver is told when each step begins and, with the x0 prediction, when it ends; so are any other
observers.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from .method.step import StepInfo, step_driver

SAMPLERS = ("ddim", "dpm")
BRANCHES_CFG = ("cond", "uncond")
BRANCHES_COND = ("cond",)


class StepObserver(Protocol):
    def on_step_begin(self, info: StepInfo) -> None: ...

    def on_step_end(self, info: StepInfo) -> None: ...


MAX_SEED = 2**63 - 1    # torch.Generator.manual_seed takes a signed 64-bit integer


def _is_integer(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def validate_labels_and_seeds(class_labels: Sequence[int], seeds: Sequence[int], null_class: int) -> None:
    """One integer seed per image, labels in [0, null_class): the null class is guidance's, not a request."""
    if len(class_labels) == 0:
        raise ValueError("class_labels is empty: pass at least one label")
    if len(class_labels) != len(seeds):
        raise ValueError(f"got {len(class_labels)} class labels but {len(seeds)} seeds: one seed per image")
    for label in class_labels:
        if not _is_integer(label) or not 0 <= int(label) < null_class:
            raise ValueError(f"class label {label!r} is not allowed: labels are integers in [0, {null_class}) "
                             f"({null_class} is the null class that classifier-free guidance uses)")
    for seed in seeds:
        if not _is_integer(seed) or not 0 <= int(seed) <= MAX_SEED:
            raise ValueError(f"seed {seed!r} is not allowed: seeds are integers in [0, 2**63 - 1]")


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
    `num_classes`) for the unconditional half. Guidance is skipped when `cfg_scale == 1`. A half-precision
    model gets its input in its own dtype; the sampler's state and the returned images stay float32.
    """
    validate_sampling_args(sampler, steps, cfg_scale)
    cfg = getattr(model, "config", None)
    null_class = cfg.num_classes if null_class is None else null_class
    validate_labels_and_seeds(class_labels, seeds, null_class)
    if sample_shape is None:
        sample_shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    channels = sample_shape[0]
    denoiser = denoiser or (lambda x, t, y: model(x, t, y))
    dtype = model_dtype(model)
    driver = step_driver(model)
    try:
        return _denoise(denoiser, class_labels, seeds, steps, sampler, cfg_scale, channels, sample_shape,
                        null_class, driver, observers, device, progress, dtype)
    except BaseException:
        if driver is not None:
            driver.abort()      # a half-finished generation must not leave its cache to a later call
        raise


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype the model computes in (its parameters'); float32 for a model without any."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) > 1:
        raise TypeError(f"the model's parameters mix dtypes {sorted(map(str, dtypes))}: cast it to one "
                        "(model.to(torch.bfloat16)) before sampling")
    return dtypes.pop() if dtypes else torch.float32


def _denoise(denoiser, class_labels, seeds, steps, sampler, cfg_scale, channels, sample_shape, null_class,
             driver, observers, device, progress, dtype=torch.float32) -> torch.Tensor:
    # The scheduler's state and the guidance stay in float32; the model is fed (and answers in) its own dtype.
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
        iterator = tqdm(iterator, total=len(timesteps), desc="sampling", unit="step", leave=False)
    for i, t in iterator:
        t_int = int(t)
        alpha, sigma = float(acp[t_int].sqrt()), float((1 - acp[t_int]).sqrt())
        info = StepInfo(i, len(timesteps), t_int, alpha, sigma, x, branches)
        if driver is not None:
            driver.begin(info)
        for obs in observers:
            obs.on_step_begin(info)
        x_in = torch.cat([x, x]) if use_cfg else x
        t_in = torch.full((x_in.shape[0],), t_int, device=device, dtype=torch.long)
        out = denoiser(scheduler.scale_model_input(x_in, t).to(dtype), t_in, y_in).float()
        if use_cfg:
            out = guide(*out.chunk(2), cfg_scale, channels)
        eps = out[:, :channels]
        info.x0 = (x - sigma * eps) / alpha
        if driver is not None:
            driver.end(info)
        for obs in observers:
            obs.on_step_end(info)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Float images (N, C, H, W) in `value_range` (the sampler's [-1, 1]; diffusers pipelines give [0, 1]
    with output_type='pt') to uint8 (N, H, W, C), clamped."""
    low, high = value_range
    return ((images.float().clamp(low, high) - low) * (255.0 / (high - low))).round().to(torch.uint8) \
        .permute(0, 2, 3, 1).cpu()
