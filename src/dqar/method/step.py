"""The one path that starts and ends denoising steps for a hooked model.

Three callers know when a step begins: `dqar.sampling.sample` (it runs the loop), the root hook on a
diffusers transformer (it sees the timestep the pipeline passes) and a pipeline's prompt encoding (it
announces the batch order and the prompt's token count before step 0). All of them go through a
`StepDriver`, which turns what they know into one `controller.begin_step` / `end_step` pair per step,
so the controller itself never has to know who drives it.

Pipelines that run the CFG halves as separate transformer calls at one step (Flux's true CFG, Wan: the prompt's
call, then the negative prompt's) make each call its own branch: the first is "cond", the second "uncond" (a
third would be "call2"). The driver learns how many calls a step takes from the first step of a generation
(every branch past the first has no cache yet there, so nothing is lost), then plans every step for all of
them with the same schedule rules, and sets the controller's branch before each call, so the calls keep
separate histories and never reuse each other's outputs.
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
        # Branch of each separate call at one step, learned this generation (None: one call per step so far).
        self.call_branches: tuple[str, ...] | None = None
        self._calls = 0                         # calls made at the current step
        self._single = True                     # the current step's batch holds one branch

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
        if info.step_index == 0:
            self.call_branches = None
        self._single = info.branches == ("cond",)
        separate = self.call_branches if self._single else None
        self.controller.begin_step(info.step_index, info.total_steps, snr=info.schedule_snr,
                                   latent_norm=latent_norm(info.x), branches=separate or info.branches,
                                   prompt_length=self.prompt_length)
        if separate:
            self.controller.branches = separate[:1]
        self._calls = 1

    def another_call(self) -> bool:
        """One more transformer call at the step in progress: give it its own branch. False when it cannot have
        one (the step's batch already holds both CFG halves, or the generation has ended)."""
        if not (self.controller.active and self._single):
            return False
        names = self.call_branches or ("cond",)
        if self._calls >= len(names):
            names = names + ("uncond" if self._calls == 1 else f"call{self._calls}",)
        self.call_branches = names
        self.controller.branches = (names[self._calls],)
        self._calls += 1
        return True

    def end(self, info: StepInfo) -> None:
        """After the step's first call: its x0 feeds the next step's SNR; the generation ends after the last call."""
        self.controller.end_step(info.x0, info.x)
        self.end_call(info.step_index, info.total_steps)

    def end_call(self, step_index: int, total_steps: int) -> None:
        if step_index == total_steps - 1 and self._calls >= len(self.call_branches or ("cond",)):
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
