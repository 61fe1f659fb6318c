"""The one path that starts and ends denoising steps for a hooked model.

Three callers know when a step begins: `dqar.sampling.sample` (it runs the loop), the root hook on a
diffusers transformer (it sees the timestep the pipeline passes) and a pipeline's prompt encoding (it
announces the batch order and the prompt's token count before step 0). All of them go through a
`StepDriver`, which turns what they know into one `controller.begin_step` / `end_step` pair per step,
so the controller itself never has to know who drives it.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .controller import DQARController
from .stats import latent_norm, schedule_snr

# The attribute under which apply_dqar leaves its record on the model.
HOOK_ATTR = "_dqar_hooked"


@dataclass
class StepInfo:
    """What a sampler knows about one denoising step."""

    step_index: int
    total_steps: int
    timestep: int
    alpha: float                # sqrt(alphas_cumprod[t])
    sigma: float                # sqrt(1 - alphas_cumprod[t])
    x: torch.Tensor             # (N, C, H, W) current noisy sample x_t of the cond branch, one row per image
    branches: tuple[str, ...]   # how the model's batch is split: ("cond", "uncond") under CFG
    x0: torch.Tensor | None = None  # (N, C, H, W) the model's x0 prediction; set at step end

    @property
    def progress(self) -> float:
        return self.step_index / max(self.total_steps - 1, 1)

    @property
    def schedule_snr(self) -> float:
        return schedule_snr(self.alpha, self.sigma)


class GenerationInProgress(RuntimeError):
    """A second generation started on a hooked model while another thread is running one."""


class StepDriver:
    """Feeds one controller its steps; remembers what a pipeline announced before step 0."""

    def __init__(self, controller: DQARController):
        self.controller = controller
        self.prompt_length = 1                  # token count of the prompt being generated (1: class label)
        self.announced_branches: tuple[str, ...] | None = None
        self._owner: int | None = None          # thread running the current generation

    def announce(self, *, branches: tuple[str, ...] | None = None, prompt_length: int | None = None) -> None:
        """What a pipeline's prompt encoding tells before its steps: batch order and prompt token count."""
        if prompt_length is not None:
            if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 1:
                raise ValueError(f"prompt_length={prompt_length!r} is not allowed: must be an integer >= 1")
            self.prompt_length = prompt_length
        if branches is not None:
            self.announced_branches = tuple(branches)

    def begin(self, info: StepInfo) -> None:
        self._claim(info.step_index)
        self.controller.begin_step(info.step_index, info.total_steps, snr=info.schedule_snr,
                                   latent_norm=latent_norm(info.x), branches=info.branches,
                                   prompt_length=self.prompt_length)

    def end(self, info: StepInfo) -> None:
        self.controller.end_step(info.x0, info.x)
        if info.step_index == info.total_steps - 1:
            self.controller.end_generation()
            self._owner = None

    def abort(self) -> None:
        """A generation stopped half-way (an exception): forget its cache so nothing stale is reused later."""
        self.controller.reset()
        self._owner = None

    def _claim(self, step_index: int) -> None:
        me = threading.get_ident()
        busy = self._owner is not None and self._owner != me and self.controller.active
        if busy:
            raise GenerationInProgress(
                "this DQAR-hooked model is running a generation in another thread; a hooked model serves one "
                "generation at a time (its cache holds that generation's activations): wait for it, or hook "
                "a separate copy of the model per thread")
        if step_index == 0 or self._owner is None:
            self._owner = me


def step_driver(model) -> StepDriver | None:
    """The driver of a model hooked by apply_dqar, or None."""
    record = model.__dict__.get(HOOK_ATTR) if hasattr(model, "__dict__") else None
    return record.driver if record is not None else None
