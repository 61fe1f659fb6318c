"""The adaptive schedule's error control, as an adaptive ODE solver picks its step size.

Whenever a module computes, the error of the forecast its cache would have given for this step is
known at the price of one pass over the output (Newton's remainder is the divided difference the fresh
output completes, dqar.method.forecast.miss_terms):

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

The measurement waits for the step's end: each compute queues the terms of its miss and the rows of its
block input (tensors that exist anyway, or views of them), and the first decision of a later step (or
`resolve`) turns the queue into errors with a few stacked tensor operations instead of four per module and
branch, which on a small model cost their dispatch whatever their size. No decision reads a measurement of
its own step, so none changes. `error_images` = k > 0 measures k images of each branch only, spread over
it (dqar.method.stats.spread_rows), so the stacks are small; the queue is measured early once what it keeps
alive passes a byte budget, and a large miss at once (while its tensors are in cache).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .config import DQARConfig
from .forecast import differences, miss_terms
from .probes import InputRows
from .stats import per_sample_norm, spread_rows

_TINY = 1e-12
_STEP_KEY = ("step",)
_ALL = slice(None)
# Misses stacked into one tensor at most (2 MiB of fp32).
_BATCH_ELEMENTS = 1 << 19
# A larger miss is measured at once, while its tensors are in cache: at the step's end, stacking it costs
# more in memory traffic than the dispatch it saves (embedded model, block target, every module measured at
# every step: 20 images per branch deferred 5.0% of the run, at once 3.9%; 2 images per branch deferred 2.0%,
# at once 2.4%; benchmarks/decision_cost.py).
_DEFER_ELEMENTS = 1 << 16
# A queue that keeps more than this alive (distinct storages; many are the cache's own anyway) is measured at
# once rather than at the step's end: a large model measuring every image would otherwise hold an activation
# per module and branch.
_HELD_BYTES = 1 << 27


def remainder_factor(step: int, history: tuple) -> float:
    """prod over the history positions of (step - p): the step-dependent part of Newton's remainder."""
    return math.prod(step - p for p in history)


@dataclass
class _Measurement:
    """One compute's queued measurement; `a` None: nothing to compare with (first compute or no effect)."""

    key: tuple
    step: int
    age: int = 0
    a: torch.Tensor | None = None             # fresh - forecast = factor * (a - b), over k images
    b: torch.Tensor | None = None             # None: fresh - forecast = factor * a
    gate: torch.Tensor | None = None          # (k, D) adaLN gate, or None (block target)
    size: object = None                       # (k,) block input norms, or InputRows to take them from
    factor: float = 1.0
    history: tuple = ()                       # the history positions the forecast used


# (key, step, (error, age) or None) of each compute, in commit order, once measured.
Measured = Callable[[tuple, int, "tuple[float, int] | None"], None]


class ErrorControl:
    """`on_measured` hears of every measured compute; with `plans=False` the errors only go there (a meter for
    another schedule, policy v2): no refresh is planned and no error list is kept."""

    def __init__(self, config: DQARConfig, on_measured: Measured | None = None, plans: bool = True):
        if not plans and on_measured is None:
            raise ValueError("an ErrorControl that plans nothing needs on_measured: its errors would go nowhere")
        self.tolerance = config.tolerance
        self.max_age = config.max_age
        self.order = config.forecast_order
        self.images = config.error_images
        self.per_step = plans and config.adaptive_scope == "step"
        # branch_decisions="cond": only the conditional branch is measured; its plan serves every branch.
        self.only_cond = config.branch_decisions == "cond"
        # error_targets: only these are measured; another target of a layer follows the layer's first measured one.
        self.targets = config.error_targets
        self.on_measured = on_measured
        self.plans = plans
        self.reset()

    def reset(self) -> None:
        self._refresh_at: dict[tuple, int] = {}      # key -> first step that must compute
        self._errors: list[tuple] = []                # (step, layer, branch, target, age, error) measured
        self._pending: list[_Measurement] = []        # computes whose error is not formed yet
        self._held = 0                                # bytes the queue keeps alive, about
        self._step: int | None = None                 # step-wide scope: the step being summed
        self._step_constant = 0.0                     # sum of the modules' remainder constants C
        self._step_history: tuple = ()                # history positions after this step's compute
        self._step_unmeasured = False                 # some module had nothing to measure yet

    @property
    def errors(self) -> list[tuple]:
        """(step, layer, branch, target, age, error) of every measured compute so far."""
        self.resolve()
        return self._errors

    def may_forecast(self, key: tuple, step_index: int) -> bool:
        if self._pending and self._pending[0].step < step_index:
            self.resolve()
        if self.per_step:
            self._close_step(step_index)
            key = _STEP_KEY
        else:
            if self.only_cond and key[1] != "cond":
                key = (key[0], "cond", key[2])
            if self.targets is not None and key[2] not in self.targets:
                key = (key[0], key[1], self.targets[0])
        return step_index < self._refresh_at.get(key, step_index)

    def observe(self, key: tuple, previous, fresh: torch.Tensor, step_index: int, effect,
                diffs: tuple | None = None) -> None:
        """Queue the forecast error of a compute; `resolve` measures it and plans this key's (or this step's)
        next refresh. `diffs`: this compute's forecast.differences(...), when the caller formed them. The
        controller hands over only the computes it measures (DQARController.measures: branch_decisions,
        error_targets); may_forecast maps the others to the measured key they follow."""
        if previous is None or previous.output is None or effect is None or effect[1] is None:
            self._pending.append(_Measurement(key, step_index))
            return
        gate, size = effect
        if diffs is None:
            diffs = differences(previous, fresh, step_index, self.order)
        rows = spread_rows(fresh.shape[0], self.images) if self.images else _ALL
        a, b, factor = miss_terms(previous, fresh, step_index, self.order, diffs, rows)
        if rows != _ALL and not (size.__class__ is InputRows and size.sampled):     # the probe cut them already
            gate = None if gate is None else gate[rows]
            size = size.cut(rows) if isinstance(size, InputRows) else size[rows]
        used = previous.steps[-(self.order + 1):]            # the history positions the forecast used
        age = step_index - previous.steps[-1]
        large = a.numel() > _DEFER_ELEMENTS
        if large and not self._pending:
            # A large miss, measured at once while its tensors are in cache, without the queue's bookkeeping
            # (which showed as 1% of a run on the embedded model).
            norms = per_sample_norm(_gated_miss(a, b, gate)).tolist()
            if isinstance(size, InputRows):
                size.changed()
                size = per_sample_norm(size.rows)
            ratio = max(x / (y + _TINY) for x, y in zip(norms, size.tolist()))
            self._settle(key, step_index, age, ratio * abs(factor), used)
            return
        self._pending.append(_Measurement(key, step_index, age, a, b, gate, size, factor, used))
        # What the queue keeps alive, about: the tensors behind a, b and the input rows, each about one branch's
        # full output (a and b are often views of the measured rows).
        self._held += 3 * fresh.nbytes
        if large or self._held > _HELD_BYTES:
            self.resolve()

    def resolve(self) -> None:
        """Measure every queued compute, in commit order, and plan from the errors."""
        if not self._pending:
            return
        pending, self._pending, self._held = self._pending, [], 0
        for m, ratio in zip(pending, _effect_ratios(pending)):
            self._settle(m.key, m.step, m.age, None if ratio is None else ratio * abs(m.factor), m.history)

    def _settle(self, key: tuple, step_index: int, age: int, error: float | None, history: tuple) -> None:
        """Record a measured error (None: nothing to compare with) and plan from it."""
        if not self.plans:
            self.on_measured(key, step_index, None if error is None else (error, age))
            return
        if self.per_step:
            self._close_step(step_index)
        measured = None
        if error is None:
            self._plan(key, step_index, None, ())
        else:
            self._errors.append((step_index, key[0], key[1], key[2], age, error))
            self._plan(key, step_index, error / remainder_factor(step_index, history), (history + (step_index,))[1:])
            measured = (error, age)
        if self.on_measured is not None:
            self.on_measured(key, step_index, measured)

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


def _effect_ratios(pending: list[_Measurement]) -> list[float | None]:
    """Per queued compute: max over its images of ||gate * miss|| / ||block input|| (None: not measured)."""
    measured = [m for m in pending if m.a is not None]
    if not measured:
        return [None] * len(pending)
    one = all(m.a.shape[0] == 1 and m.a.dtype == torch.float32 and isinstance(m.size, InputRows) for m in measured)
    values = iter(_one_image_ratios(measured) if one else _stacked_ratios(measured))
    return [None if m.a is None else next(values) for m in pending]


def _stacked_ratios(measured: list[_Measurement]) -> list[float]:
    """_effect_ratios of measured computes, with one stack per group of equal shapes."""
    misses = iter(_grouped_norms(measured, lambda m: m.a, lambda m: (m.b is None, m.gate is None), _gated_misses))
    sizes = iter(_input_norms(measured))
    # A handful of images: the ratios and their maximum in Python cost less than more tensor ops.
    return [max(a / (b + _TINY) for a, b in zip(next(misses), next(sizes))) for _ in measured]


def _one_image_ratios(measured: list[_Measurement]) -> list[float]:
    """_effect_ratios where every measurement is of one image (`error_images=1`, float32): the norms of the
    views themselves (torch's multi-tensor ops, a dispatch for the whole list) instead of stacking copies of
    them first, which on a small model is most of the measurement's cost."""
    misses: list = [m.a for m in measured]
    pairs = [i for i, m in enumerate(measured) if m.b is not None]
    if pairs:
        for i, miss in zip(pairs, torch._foreach_sub([measured[i].a for i in pairs], [measured[i].b for i in pairs])):
            misses[i] = miss
    gated = [i for i, m in enumerate(measured) if m.gate is not None]
    if gated:
        # (1, 1, D) per measurement from one stack: a view op per gate costs more than the product it feeds.
        gates = dict(zip(gated, torch.stack([measured[i].gate for i in gated]).unsqueeze(2).unbind(0)))
        fresh = [i for i in gated if measured[i].b is not None]           # differences of our own: scaled in place
        if fresh:
            torch._foreach_mul_([misses[i] for i in fresh], [gates[i] for i in fresh])
        held = [i for i in gated if measured[i].b is None]                # a is the cache's: a new product
        if held:
            for i, miss in zip(held, torch._foreach_mul([misses[i] for i in held], [gates[i] for i in held])):
                misses[i] = miss
    # The modules of one block (attention and MLP) and branch hold the same rows: each view is reduced once.
    distinct: dict[tuple, torch.Tensor] = {}
    keys = []
    for m in measured:
        m.size.changed()            # written in place since: this once the norm is of the changed tensor
        keys.append(_view_key(m.size.rows))
        distinct.setdefault(keys[-1], m.size.rows)
    norms = torch.stack(torch._foreach_norm(misses + list(distinct.values()))).tolist()
    size_of = dict(zip(distinct, norms[len(measured):]))
    return [miss / (size_of[key] + _TINY) for miss, key in zip(norms, keys)]


def _norms(t: torch.Tensor) -> list[list[float]]:
    """Per-sample norms of an (M, k, ...) tensor: M lists of k."""
    return torch.linalg.vector_norm(t.float(), dim=tuple(range(2, t.dim()))).tolist()


def _gated_miss(a: torch.Tensor, b: torch.Tensor | None, gate: torch.Tensor | None) -> torch.Tensor:
    """(k, T, D) gate * (a - b) of one measurement, writing only a tensor of its own (a may be the cache's)."""
    miss = a if b is None else torch.sub(a, b)
    if gate is None:
        return miss
    return miss * gate.unsqueeze(1) if b is None else miss.mul_(gate.unsqueeze(1))


def _gated_misses(chunk: list[_Measurement]) -> torch.Tensor:
    """(M, k, ...) gate * (a - b) of same-shaped measurements; a, b and the gates are not written (they may be
    the cache's own tensors). (A norm over the tokens first, then the gate, would skip the product but
    reduces over a strided dimension: 15x slower.)"""
    if len(chunk) == 1:
        return _gated_miss(chunk[0].a, chunk[0].b, chunk[0].gate).unsqueeze(0)
    if chunk[0].b is not None:
        # One stack for both terms: the views it gathers are most of the cost.
        both = torch.stack([m.a for m in chunk] + [m.b for m in chunk])
        out = torch.sub(both[:len(chunk)], both[len(chunk):])
    else:
        out = torch.stack([m.a for m in chunk])
    if chunk[0].gate is not None:
        out.mul_(torch.stack([m.gate for m in chunk]).unsqueeze(2))
    return out


def _input_norms(measured: list[_Measurement]) -> list[list[float]]:
    """Per measurement: its block input norms, taken on entry or now from the rows it holds."""
    held = [m.size for m in measured if isinstance(m.size, InputRows)]
    for rows in held:
        rows.changed()              # written in place since: this once the norm is of the changed tensor
    if len(measured) == 1:          # measured at once: no concatenation
        return [measured[0].size.tolist() if not held else _norms(held[0].rows.unsqueeze(0))[0]]
    # The modules of one block (attention and MLP) and branch hold the same rows: each view is reduced once.
    distinct: dict[tuple, InputRows] = {}
    for r in held:
        distinct.setdefault(_view_key(r.rows), r)
    norms = dict(zip(distinct, _grouped_norms(list(distinct.values()), lambda r: r.rows, lambda r: (), lambda chunk: (
        chunk[0].rows.unsqueeze(0) if len(chunk) == 1 else torch.stack([r.rows for r in chunk])))))
    taken = [m.size for m in measured if not isinstance(m.size, InputRows)]
    flat = iter(torch.cat(taken).float().tolist() if taken else ())
    return [norms[_view_key(m.size.rows)] if isinstance(m.size, InputRows) else [next(flat) for _ in range(len(m.size))]
            for m in measured]


def _view_key(t: torch.Tensor) -> tuple:
    """Equal for two views of the same elements of one storage (their values then agree)."""
    return t.data_ptr(), t.shape, t.stride(), t.dtype, t.device


def _grouped_norms(items: list, tensor_of, kind_of, stack) -> list[list[float]]:
    """Per item, the per-sample norms (over all but the first dimension of tensor_of(item)) of what `stack`
    forms for a chunk of items: (M, k, ...). Items of one shape, dtype, device and kind_of are stacked, at
    most _BATCH_ELEMENTS per stack (a larger item alone: its stack would be a copy of it)."""
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        t = tensor_of(item)
        groups.setdefault((t.shape, t.dtype, t.device, kind_of(item)), []).append(i)
    out: list = [None] * len(items)
    for members in groups.values():
        size = max(1, _BATCH_ELEMENTS // max(1, tensor_of(items[members[0]]).numel()))
        for first in range(0, len(members), size):
            chunk = members[first:first + size]
            for i, row in zip(chunk, _norms(stack([items[i] for i in chunk]))):
                out[i] = row
    return out
