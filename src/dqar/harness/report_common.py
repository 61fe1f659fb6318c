"""What every section of `dqar report` shares: cell formatting and the rules that pick comparable rows.

Cells: a value that was not measured and a config field that does not apply to a row (per
`dqar.method.schedules.live_fields`: warmup of the uncached model, layer fraction of an interval
schedule) both print as "–". Speed leads with the FLOP-count bound (`ideal_speedup`, no timing noise);
a measured speedup is printed only with the range of its timed runs, never from a single run, and
carries "!" when it exceeds its own FLOP bound (which only timing noise can do). The work share (`calls`:
executed attention / MLP / block calls, counted for every contender) needs no timing at all.
"""
from __future__ import annotations

import math

import numpy as np

from dqar.method.schedules import live_fields

from .rows import SweepRow

DASH = "–"


class Missing(Exception):
    """A section cannot be built from these rows; the message says why."""


# ------------------------------------------------------------------------------------------------
# cells
# ------------------------------------------------------------------------------------------------

def fmt(v, spec: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return DASH
    return format(v, spec)


def pct(v, spec: str = ".0f") -> str:
    return fmt(None if v is None else 100.0 * v, spec) + ("%" if v is not None else "")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def setting(row: SweepRow, name: str, spec: str | None = ".2f") -> str:
    """Config field `name` of the row, or a dash where it cannot change the row's images."""
    if name not in live_fields(row.config) or name not in row.config:
        return DASH
    v = row.config[name]
    if isinstance(v, (list, tuple)):
        return "+".join(str(x) for x in v)
    return fmt(v, spec) if spec is not None and isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def label(row: SweepRow) -> str:
    return row.name or row.key


def measured(row: SweepRow) -> float | None:
    """The measured speedup where it may be shown (timed >= 2 times on both sides), else None."""
    if row.is_reference:
        return 1.0
    return row.speedup if row.speedup is not None and row.measured_range() is not None else None


def above_bound(row: SweepRow) -> bool:
    """A shown measured speedup above the row's own FLOP bound: timing noise, flagged wherever shown."""
    m = measured(row)
    return m is not None and not row.is_reference and row.ideal_speedup is not None and m > row.ideal_speedup


def calls_cell(row: SweepRow) -> str:
    """'0.38/0.38/1.00': the executed share of attention / MLP / block calls (counted), a dash where not."""
    c = row.calls
    if not c:
        return DASH
    return "/".join(fmt(c.get(k), ".2f") for k in ("attn", "mlp", "block"))


def work_cell(row: SweepRow) -> str:
    """The work share (mean executed share of attention and MLP calls), a dash where not counted."""
    return fmt(row.work_share(), ".3f")


def ideal_cell(row: SweepRow) -> str:
    return fmt(row.ideal_speedup, ".3f")


def measured_cell(row: SweepRow) -> str:
    """'1.034 (0.98–1.09)' with the run range, 'ref.' for the reference, a dash for a single run."""
    if row.is_reference:
        return "ref."
    m = measured(row)
    if m is None:
        return DASH
    lo, hi = row.measured_range()
    return f"{m:.3f} ({lo:.2f}{DASH}{hi:.2f})" + (" !" if above_bound(row) else "")


# ------------------------------------------------------------------------------------------------
# which rows compare
# ------------------------------------------------------------------------------------------------

def is_plain_static(row: SweepRow) -> bool:
    """A cell of seed 000's grid: the static schedule with nothing else changed."""
    c = row.config
    return (row.variant is None and c.get("schedule") == "static" and c.get("mode") == "output"
            and c.get("order") == "shallow" and c.get("cache_bits") == 16 and list(c.get("targets", [])) == ["attn"])


def same_except(a: SweepRow, b: SweepRow, field: str) -> bool:
    """Same variant, and configs equal on every field except `field` that could change either's images."""
    if a.variant != b.variant:
        return False
    ca, cb = a.config, b.config
    # A field counts if it is live in either config: kv_bits is inert for an output-mode point but live
    # for its K/V twin, so it must match.
    keys = (live_fields(ca) | live_fields(cb)) - {field}
    return all(ca.get(k) == cb.get(k) for k in keys)


def pairs(rows: list[SweepRow], field: str, a, b_values) -> list[tuple[SweepRow, SweepRow]]:
    """(row with field=a, row with field in b_values) whose configs agree on everything else."""
    out = []
    for rb in rows:
        if rb.config.get(field) in b_values and rb.config.get(field) != a:
            match = next((ra for ra in rows if ra.config.get(field) == a and same_except(ra, rb, field)), None)
            if match is not None:
                out.append((match, rb))
    return out


def pareto_front(points: list[dict]) -> list[dict]:
    """Points not dominated in (higher speedup, lower quality value), sorted by speedup."""
    front = []
    for p in points:
        dominated = any(q is not p and q["speedup"] >= p["speedup"] and q["quality"] <= p["quality"]
                        and (q["speedup"] > p["speedup"] or q["quality"] < p["quality"]) for q in points)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p["speedup"])


def interpolate(front: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear y at x over sorted (x, y) points; None outside their range."""
    if not front:
        return None
    xs = [p[0] for p in front]
    if x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, [p[1] for p in front]))
