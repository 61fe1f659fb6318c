"""The timing helper's call order (fake callables, no timing values) and `dqar bench` end to end."""
from __future__ import annotations

import pytest

from dqar.eval.timing import Contender, interleaved_timing


# ------------------------------------------------------------------------------------------------
# timing helper: order of calls, not timing values
# ------------------------------------------------------------------------------------------------

def test_interleaved_timing_call_order():
    calls: list[str] = []

    def make(name):
        def fn():
            calls.append(name)
            return name.upper()
        return fn

    result = interleaved_timing({"baseline": make("b"), "candidate": make("c")}, rounds=3, warmup_runs=2,
                                measure_memory=False)
    # Warm-up alternates too, then B, C, B, C, ... for each timed round.
    assert calls == ["b", "c"] * 2 + ["b", "c"] * 3
    assert list(result) == ["baseline", "candidate"]
    assert len(result["baseline"].samples) == 3 and len(result["candidate"].samples) == 3
    assert result["candidate"].last_output == "C"
    assert result["baseline"].median == sorted(result["baseline"].samples)[1]
    assert result["baseline"].peak_mem_bytes is None


def test_interleaved_timing_setup_and_teardown_wrap_every_call():
    calls: list[str] = []
    contender = Contender(fn=lambda: calls.append("run") or 7,
                          setup=lambda: calls.append("setup"),
                          teardown=lambda out: calls.append(f"teardown:{out}"))
    interleaved_timing({"a": lambda: calls.append("a"), "x": contender}, rounds=1, warmup_runs=1,
                       measure_memory=False)
    assert calls == ["a", "setup", "run", "teardown:7"] * 2


def test_interleaved_timing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rounds=0"):
        interleaved_timing({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="warmup_runs=-1"):
        interleaved_timing({"a": lambda: None}, rounds=1, warmup_runs=-1)
    with pytest.raises(ValueError, match="at least one"):
        interleaved_timing({}, rounds=1)
    with pytest.raises(TypeError, match="'a'"):
        interleaved_timing({"a": 3}, rounds=1)
