"""The adaptive schedule's error control, as an adaptive ODE solver picks its step size.

Whenever a module computes, the error of the forecast its cache would have given for this step is
known at the price of one pass over the output (Newton's remainder is the divided difference the fresh
output completes, dqar.method.forecast.forecast_miss):

    e = max over images of || g * (forecast - fresh) || / || x ||

with g the adaLN gate that scales the module's output and x the block input it is added to (for the block
target g = 1 and the cached tensor is the block's residual): the module's effect on the block, not its
own relative change, which over-weights modules whose output the gate then shrinks.

The next refresh comes from the remainder of Newton's interpolation: a forecast of order k from history
points p0..pk errs at step s like C * (s - p0) * ... * (s - pk). The measured error at this compute gives
C; the next forecast extrapolates from the new history (this step and the k before it), so the next
refresh is the first step whose predicted error C * prod(s' - q) passes `tolerance`, at the latest
after `max_age` steps. Unlike a power of the age alone, the product sees how far apart the history points
are: a history computed at close steps extrapolates poorly far ahead, and the controller knows it.

`adaptive_scope` says who shares a decision. "module": each (layer, branch, target) refreshes on its own.
"step": one decision per step for every cached module: the effects are summed (the errors of all modules
reach the same output) and the whole step refreshes when that sum would pass `tolerance`; all modules then
keep the same history positions, as under a fixed interval. A module without a measurement yet (too little
history) refreshes at the next step.
"""
from __future__ import annotations

import math

import torch

from .config import DQARConfig
from .forecast import differences, forecast_miss
from .stats import per_sample_norm

_TINY = 1e-12
_STEP_KEY = ("step",)


def remainder_factor(step: int, history: tuple) -> float:
    """prod over the history positions of (step - p): the step-dependent part of Newton's remainder."""
    return math.prod(step - p for p in history)


class ErrorControl:
    def __init__(self, config: DQARConfig):
        self.tolerance = config.tolerance
        self.max_age = config.max_age
        self.order = config.forecast_order
        self.per_step = config.adaptive_scope == "step"
        self.reset()

    def reset(self) -> None:
        self._refresh_at: dict[tuple, int] = {}      # key -> first step that must compute
        self.errors: list[tuple] = []                 # (step, layer, branch, target, age, error) measured
        self._step: int | None = None                 # step-wide scope: the step being summed
        self._step_constant = 0.0                     # sum of the modules' remainder constants C
        self._step_history: tuple = ()                # history positions after this step's compute
        self._step_unmeasured = False                 # some module had nothing to measure yet

    def may_forecast(self, key: tuple, step_index: int) -> bool:
        if self.per_step:
            self._close_step(step_index)
            key = _STEP_KEY
        return step_index < self._refresh_at.get(key, step_index)

    def observe(self, key: tuple, previous, fresh: torch.Tensor, step_index: int, effect,
                diffs: tuple | None = None) -> None:
        """Measure the forecast error at a compute and plan this key's (or this step's) next refresh.
        `diffs`: this compute's forecast.differences(...), when the caller formed them for the cache."""
        if self.per_step:
            self._close_step(step_index)
        if previous is None or previous.output is None or effect is None or effect[1] is None:
            self._plan(key, step_index, None, ())
            return
        gate, input_norm = effect
        age = step_index - previous.steps[-1]
        if diffs is None:
            diffs = differences(previous, fresh, step_index, self.order)
        miss, factor, new = forecast_miss(previous, fresh, step_index, self.order, diffs)
        if gate is not None:
            # (n, T, D) * (n, 1, D); a miss the cache keeps (a new difference) is not written. (A norm over the
            # tokens first, then the gate, would skip this pass but reduces over a strided dimension: 15x slower.)
            miss = miss.mul_(gate.unsqueeze(1)) if new else miss * gate.unsqueeze(1)
        norms = per_sample_norm(miss)
        # A handful of images: the ratio and its maximum in Python cost less than three more tensor ops.
        error = max(a / (b + _TINY) for a, b in zip(norms.tolist(), input_norm.tolist())) * abs(factor)
        self.errors.append((step_index, key[0], key[1], key[2], age, error))
        used = previous.steps[-(min(self.order, len(previous.steps) - 1) + 1):]
        constant = error / remainder_factor(step_index, used)
        self._plan(key, step_index, constant, (used + (step_index,))[1:])

    def _plan(self, key: tuple, step_index: int, constant: float | None, history: tuple) -> None:
        if not self.per_step:
            self._refresh_at[key] = step_index + (1 if constant is None else self.next_age(constant, step_index,
                                                                                           history))
            return
        if constant is None:
            self._step_unmeasured = True
        else:
            self._step_constant += constant
            self._step_history = history
        self._step = step_index

    def _close_step(self, step_index: int) -> None:
        """Step-wide scope: once a later step asks, the summed measurements of the last compute plan it."""
        if self._step is None or step_index <= self._step:
            return
        if self._step_unmeasured or not self._step_history:
            age = 1
        else:
            age = self.next_age(self._step_constant, self._step, self._step_history)
        self._refresh_at[_STEP_KEY] = self._step + age
        self._step, self._step_constant, self._step_history, self._step_unmeasured = None, 0.0, (), False

    def next_age(self, constant: float, step_index: int, history: tuple) -> int:
        """The refresh age h in [1, max_age]: every forecast before it (ages 1..h-1) has a predicted error
        constant * prod(step + age - q) within tolerance (h = 1: the next step computes)."""
        if constant <= 0:
            return self.max_age
        h = 1
        while h < self.max_age and constant * remainder_factor(step_index + h, history) <= self.tolerance:
            h += 1
        return h

    def summary(self) -> dict:
        values = [e[-1] for e in self.errors]
        return {"measured": len(values), "mean": sum(values) / len(values) if values else None,
                "max": max(values) if values else None}
