"""Forecasting a cached module's output from its last computed ones (Newton divided differences).

Order 0 is plain reuse: the last computed output F(s2). Order k extrapolates from the last k+1 computed
outputs of that module and branch at their actual step positions s0 < s1 < s2 (gaps may be uneven):

    D1 = F[s1, s2] = (F(s2) - F(s1)) / (s2 - s1)
    D2 = F[s0, s1, s2] = (F[s1, s2] - F[s0, s1]) / (s2 - s0)
    F(s) ~ F(s2) + (s - s2) D1 + (s - s2)(s - s1) D2

which is exact for polynomials of degree <= k whatever the gaps. A cache entry keeps F(s2), D1 and D2 (not
three raw outputs): the differences have a far smaller range than F, so they lose less under the same
INT8/INT4 quantizer, and at 16 bits (stored as computed) the forecast is the exact Newton polynomial.
Each new difference is formed from the *stored* (dequantized) previous values, so quantization error
does not compound from one refresh to the next.
"""
from __future__ import annotations

from typing import Callable

import torch

FORECAST_ORDERS = (0, 1, 2)


Store = Callable[[torch.Tensor, str], object]     # (tensor, slot name) -> stored payload


def differences(previous, fresh: torch.Tensor, step: int, order: int) -> tuple:
    """(d1, d2) that a compute of `fresh` at `step` adds to the previous entry's history, in the work dtype
    and not yet stored (None where the order or the history has none)."""
    if order == 0 or previous is None or previous.output is None:
        return None, None
    s2 = previous.steps[-1]
    if step <= s2:
        raise ValueError(f"a computed output at step {step} does not follow the last one at step {s2}")
    work = torch.promote_types(fresh.dtype, torch.float32)
    # In-place divisions: one new tensor per difference (same values as (a - b) / gap).
    d1 = torch.sub(fresh.to(work), previous.output.dequantize().to(work)).div_(step - s2)
    d2 = None
    if order >= 2 and previous.d1 is not None:
        d2 = torch.sub(d1, previous.d1.dequantize().to(work)).div_(step - previous.steps[-2])
    return d1, d2


def advance(previous, fresh: torch.Tensor, step: int, order: int, store: Store, diffs: tuple | None = None) -> tuple:
    """(output, d1, d2, steps) after `fresh` was computed at `step`, given the previous cache entry (or None):
    the new stored F(s2) and, for order >= 1, the new stored differences and the positions behind them.
    `diffs` are differences(...) of the same arguments, when the caller already formed them."""
    d1, d2 = differences(previous, fresh, step, order) if diffs is None else diffs
    if d1 is None:
        return store(fresh, "output"), None, None, (step,)
    steps = (previous.steps + (step,))[-(order + 1):]
    # Stored in the model's dtype, as the output is: a bf16 model keeps a bf16 history at 16 bits.
    d1, d2 = d1.to(fresh.dtype), None if d2 is None else d2.to(fresh.dtype)
    return store(fresh, "output"), store(d1, "d1"), None if d2 is None else store(d2, "d2"), steps


def miss_terms(previous, fresh: torch.Tensor, step: int, order: int, diffs: tuple, rows: slice = slice(None)) -> tuple:
    """(a, b, c) with fresh - forecast = c * (a - b) (b None: c * a), the forecast being
    extrapolate(previous, step, order). a and b are tensors that exist anyway (the fresh output, the new or the
    stored differences, or views of them: not to be written), so the subtraction can wait and run for many
    modules at once. `rows`: the batch rows measured (each term is a view of those).

    Newton's remainder is the next divided difference: a forecast of order k misses the fresh output by
    prod over its k + 1 points of (step - p) times the difference of order k + 1 that the fresh output
    completes, which `diffs` (this compute's differences(...)) already holds or is one subtraction from.
    So the miss costs at most one pass over the output, not a forecast and a subtraction."""
    whole = rows == slice(None)
    d1, d2 = diffs
    s2 = previous.steps[-1]
    if order == 0 or previous.d1 is None:                       # the forecast was F(s2) itself
        if d1 is not None:
            return _cut(d1, rows, whole, d1.dtype), None, float(step - s2)
        work = torch.promote_types(fresh.dtype, torch.float32)
        return _cut(fresh, rows, whole, work), _cut(previous.output.dequantize(), rows, whole, work), 1.0
    s1 = previous.steps[-2]
    if order == 1 or previous.d2 is None:                       # the forecast was a line through s1, s2
        if d2 is not None:
            return _cut(d2, rows, whole, d2.dtype), None, float((step - s2) * (step - s1))
        return _cut(d1, rows, whole, d1.dtype), _cut(previous.d1.dequantize(), rows, whole, d1.dtype), float(step - s2)
    return _cut(d2, rows, whole, d2.dtype), _cut(previous.d2.dequantize(), rows, whole, d2.dtype), \
        float((step - s2) * (step - s1))


def _cut(t: torch.Tensor, rows: slice, whole: bool, dtype: torch.dtype) -> torch.Tensor:
    """t's `rows` in `dtype` (a view where nothing changes: the miss is measured often, on small models each
    dispatch shows)."""
    t = t if whole else t[rows]
    return t if t.dtype == dtype else t.to(dtype)


def points(entry) -> int:
    """How many computed outputs an entry's stored differences cover (1 = only F(s2))."""
    return 1 + (entry.d1 is not None) + (entry.d2 is not None)


def extrapolate(history, step: int, order: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """F(step) from a cache entry's stored F(s2), D1, D2 with the highest order it holds up to `order`.

    `out` (a tensor of the work dtype, e.g. a slice of the block's output) receives the forecast in place
    of a new tensor."""
    if order == 0 or history.d1 is None:
        return history.output.dequantize() if out is None else out.copy_(history.output.dequantize())
    s2 = history.steps[-1]
    work = torch.promote_types(dtype, torch.float32)
    if out is not None and out.dtype != work:
        raise ValueError(f"a forecast into a {out.dtype} tensor would round it; it is formed in {work}")
    # One fused multiply-add per slot (alpha scales the second operand), the second one in place: a
    # forecast costs two passes over the history, which matters where a block is cheap.
    out = torch.add(history.output.dequantize().to(work), history.d1.dequantize().to(work), alpha=step - s2,
                    out=out)
    if order >= 2 and history.d2 is not None:
        s1 = history.steps[-2]
        out.add_(history.d2.dequantize().to(work), alpha=(step - s2) * (step - s1))
    return out.to(dtype)
