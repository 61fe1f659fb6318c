"""The wrapper around the model's own forward: the FLOP profile once per input shape and branch count, and for diffusers models
the step, its noise level and the CFG batch order, read from the timestep the pipeline passes.

The bookkeeping runs outside torch.compile (`torch.compiler.disable`): it is Python state that changes every
step, and guarding a compiled graph on it would recompile at every step. The model's own forward between
the two bookkeeping calls is what a compiled model traces.
"""
from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn as nn

from .flops import FlopProfiler
from .layouts import BlockLayout
from .noise import match_step, noise_levels, prediction_kind, x0_prediction
from .step import StepDriver, StepInfo

_MISSING = object()


class RootHook:
    def __init__(self, driver: StepDriver, flops: FlopProfiler, model: nn.Module, layout: BlockLayout,
                 scheduler=None, pipe=None):
        self.driver, self.ctl, self.flops, self.model, self.layout = driver, driver.controller, flops, model, layout
        self._scheduler, self._pipe = scheduler, pipe     # an explicit scheduler wins over the pipeline's
        self.original = model.forward
        # HunyuanDiT's pipeline passes the timestep positionally: where it sits in the forward's arguments.
        try:
            params = list(inspect.signature(self.original).parameters)
        except (TypeError, ValueError):
            params = []
        self._timestep_pos = params.index("timestep") if "timestep" in params else None
        self._warned_timestep = False
        self._warned_repeat = False
        self._last_ended: tuple | None = None             # (step index, total) of the last step that ended
        self._repeat: tuple | None = None                 # (step index, total) of a further call at that step
        self._suspended = False                           # this call runs uncached (controller paused)

    def __call__(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        info, measured = self._before(x, args, kwargs)
        try:
            out = measured() if measured is not None else self.original(*args, **kwargs)
        except BaseException:
            self._abort()
            raise
        self._after(info, x, out)
        return out

    @torch.compiler.disable
    def _before(self, x, args, kwargs):
        self._repeat = None
        info = self._step_from_timestep(x, args, kwargs) if self.layout.drives_itself else None
        if info is not None:
            self.driver.begin(info)
        # The same batch is b images under CFG or 2b without: per-branch FLOPs differ, so both are in the key.
        key = (tuple(x.shape), len(self.ctl.branches))
        try:
            if key in self.flops.profiles:
                self.ctl.count_forward(self.flops.profiles[key])
                return info, None
        except BaseException:
            self._abort()
            raise
        return info, lambda: self._measure(key, args, kwargs)

    @torch.compiler.disable
    def _measure(self, key, args, kwargs):
        out = self.flops.measure(key, len(self.ctl.branches), lambda: self.original(*args, **kwargs))
        self.ctl.count_forward(self.flops.profiles[key])
        return out

    @torch.compiler.disable
    def _abort(self):
        if self.ctl.active or self._suspended:
            self.driver.abort()
        self._suspended = False
        self._last_ended = None

    @torch.compiler.disable
    def _after(self, info, x, out):
        if self._suspended:
            self.ctl.active, self._suspended = True, False
        if info is not None and self.ctl.active:
            self._end_step_from_output(info, x, out)
        elif self._repeat is not None and self.ctl.active:
            self.driver.end_call(*self._repeat)

    @property
    def scheduler(self):
        # The pipeline's is read at call time: swapping pipe.scheduler after apply_dqar must be seen.
        return self._scheduler if self._scheduler is not None else getattr(self._pipe, "scheduler", None)

    # diffusers: the pipeline calls the transformer once per step with the timestep as input.
    def _step_from_timestep(self, x, args, kwargs) -> StepInfo | None:
        t = kwargs.get("timestep")
        if t is None and self._timestep_pos is not None and len(args) > self._timestep_pos:
            t = args[self._timestep_pos]
        sched = self.scheduler
        if t is None or sched is None or getattr(sched, "timesteps", None) is None:
            return None
        t_val = float(torch.as_tensor(t).flatten()[0])
        steps = [float(s) for s in sched.timesteps]
        index = match_step(t_val, steps)
        if index is None:
            self._unmatched_timestep(t_val)
            return None
        if self._last_ended == (index, len(steps)) and len(steps) > 1:
            if self.driver.another_call():
                self._repeat = (index, len(steps))
            else:
                self._repeated_step(index)
            return None
        n = x.shape[0]
        announced = self.driver.announced_branches
        if announced is not None and n % len(announced) == 0:
            branches = announced
        elif self.layout.detect_branches is not None:
            branches = self.layout.detect_branches(self.model, kwargs, n)
        else:
            branches = ("cond",)
        t_step = steps[index]
        alpha, sigma = noise_levels(sched, index, t_step)
        b = n // len(branches)
        cond = x[branches.index("cond") * b:][:b]
        return StepInfo(index, len(steps), int(round(t_step)), alpha, sigma, cond, branches)

    def _unmatched_timestep(self, t_val: float) -> None:
        # Not a step of this scheduler (a pipeline that calls the transformer outside its loop): run uncached.
        self.ctl.unmatched_timesteps += 1
        if not self._warned_timestep:
            self._warned_timestep = True
            warnings.warn(f"DQAR: the transformer was called at timestep {t_val:g}, which is not one of its "
                          "scheduler's timesteps; such calls run without reuse (counted in "
                          "summary()['unmatched_timesteps'])", RuntimeWarning, stacklevel=4)

    def _repeated_step(self, index: int) -> None:
        # A further call at a step whose batch held both CFG halves already (or after the generation ended): it
        # matches no branch the cache holds, so it runs without reuse and without storing anything.
        self.ctl.unmatched_timesteps += 1
        if self.ctl.active:
            self.ctl.active, self._suspended = False, True
        if not self._warned_repeat:
            self._warned_repeat = True
            warnings.warn(f"DQAR: the transformer was called a second time at step {index}, and that call cannot "
                          "be a CFG branch of its own (the step's batch held both halves already, or the generation "
                          "had ended); such calls run uncached (counted in summary()['unmatched_timesteps'])",
                          RuntimeWarning, stacklevel=4)

    def _end_step_from_output(self, info: StepInfo, x, out):
        sample = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        n, c = x.shape[0], x.shape[1]
        branches = self.ctl.branches
        b = n // len(branches)
        i = branches.index("cond") if "cond" in branches else 0
        pred = sample[i * b:(i + 1) * b, :c]
        info.x0 = x0_prediction(prediction_kind(self.scheduler), info.x, pred, info.alpha, info.sigma)
        self.driver.end(info)
        self._last_ended = (info.step_index, info.total_steps)


def watch_prompt(pipe, driver: StepDriver, cfg_order: tuple):
    """A pipeline that batches both CFG halves in one call ([uncond | cond] for PixArt, SD3, Sana, ...) says
    whether guidance is on in its encode_prompt call; that tells the driver the batch order, and the prompt's
    attention mask (where encode_prompt returns one second) its token count. Returns the undo function."""
    original = pipe.encode_prompt
    previous = pipe.__dict__.get("encode_prompt", _MISSING)
    signature = inspect.signature(original)

    def encode_prompt(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            cfg = bound.arguments.get("do_classifier_free_guidance", True)
        except TypeError:
            cfg = True
        driver.announce(branches=cfg_order if cfg else ("cond",))
        result = original(*args, **kwargs)
        # The prompt's token count (padding excluded, EOS included) feeds tau(p_len) and the policy; the
        # batch shares one threshold, so the longest prompt of the batch decides.
        mask = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.numel() and not mask.is_floating_point():
            driver.announce(prompt_length=max(1, int(mask.sum(dim=1).max())))
        return result

    pipe.encode_prompt = encode_prompt
    return lambda: _restore_attr(pipe, "encode_prompt", previous)


def _restore_attr(obj, name: str, previous) -> None:
    if previous is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        setattr(obj, name, previous)
