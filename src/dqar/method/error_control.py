"""The adaptive schedule's error control, as an adaptive ODE solver picks its step size.

Whenever a module computes, the forecast its cache would have given for this step is one fused
multiply-add away, so its error is measured for free:

    e = max over images of || g * (forecast - fresh) || / || x ||

with g the adaLN gate that scales the module's output and x the block input it is added to (for the block
target g = 1 and the cached tensor is the block's residual): the module's effect on the block, not its
own relative change, which over-weights modules whose output the gate then shrinks. A forecast of order
k made `a` steps after the last computed output errs roughly like a^(k+1), so the next refresh comes at
the largest age h <= max_age with e * (h / a)^(k+1) <= tolerance. A module without a measurement yet
(too little history) refreshes at the next step.
"""
from __future__ import annotations

import math

import torch

from .config import DQARConfig
from .forecast import extrapolate

_TINY = 1e-12


class ErrorControl:
    def __init__(self, config: DQARConfig):
        self.tolerance = config.tolerance
        self.max_age = config.max_age
        self.order = config.forecast_order
        self.reset()

    def reset(self) -> None:
        self._refresh_at: dict[tuple, int] = {}      # (layer, branch, target) -> first step that must compute
        self.errors: list[tuple] = []                 # (step, layer, branch, target, age, error) measured

    def may_forecast(self, key: tuple, step_index: int) -> bool:
        return step_index < self._refresh_at.get(key, step_index)

    def observe(self, key: tuple, previous, fresh: torch.Tensor, step_index: int, effect) -> None:
        """Measure the forecast error at a compute and plan this key's next refresh."""
        if previous is None or previous.output is None or effect is None or effect[1] is None:
            self._refresh_at[key] = step_index + 1
            return
        gate, input_norm = effect
        age = step_index - previous.steps[-1]
        delta = extrapolate(previous, step_index, self.order, torch.float32) - fresh.float()
        if gate is not None:
            delta = delta * gate.float().unsqueeze(1)                 # (n, T, D) * (n, 1, D)
        error = float((delta.flatten(1).norm(dim=1) / (input_norm + _TINY)).max())
        self.errors.append((step_index, key[0], key[1], key[2], age, error))
        self._refresh_at[key] = step_index + self.next_age(error, age)

    def next_age(self, error: float, age: int) -> int:
        """Largest h in [1, max_age] with error * (h / age)^(k+1) <= tolerance."""
        if error <= 0:
            return self.max_age
        h = age * (self.tolerance / error) ** (1.0 / (self.order + 1))
        return max(1, min(self.max_age, math.floor(h + 1e-9)))

    def summary(self) -> dict:
        values = [e[-1] for e in self.errors]
        return {"measured": len(values), "mean": sum(values) / len(values) if values else None,
                "max": max(values) if values else None}
