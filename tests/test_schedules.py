"""Schedules: ReusableLayers(p) against hand-computed tables, orders, depth phases, gate, interval."""
import pytest

from dqar import DQARConfig
from dqar.method.schedules import (StepState, build_schedule, depth_layer_count, entropy_threshold, layer_order,
                            reusable_layer_count)

# (p, w, l, L) -> floor((p - w) / (1 - w) * l * L), 0 if p < w; computed by hand.
TABLE = [
    (0.30, 0.4, 0.33, 28, 0), (0.40, 0.4, 0.33, 28, 0), (0.50, 0.4, 0.33, 28, 1), (1.00, 0.4, 0.33, 28, 9),
    (0.70, 0.4, 0.50, 28, 7), (0.80, 0.2, 1.00, 28, 21), (1.00, 0.1, 1.00, 28, 28), (0.55, 0.1, 0.66, 28, 9),
    (1.00, 0.4, 0.33, 8, 2), (1.00, 0.4, 0.50, 8, 4), (1.00, 0.4, 0.66, 8, 5), (0.70, 0.4, 1.00, 8, 4),
    (0.90, 0.0, 1.00, 8, 7), (1.00, 1.0, 1.00, 8, 0),
]


@pytest.mark.parametrize("p, w, l, L, expected", TABLE)
def test_reusable_layers_table(p, w, l, L, expected):
    assert reusable_layer_count(p, w, l, L) == expected


def _step(i, total=11, layers=8, snr=1.0, prompt_length=1):
    return StepState(i, total, layers, snr=snr, latent_norm=1.0, prompt_length=prompt_length)


def test_shallow_deep_random_select_different_layers():
    plans = {}
    for order in ("shallow", "deep", "random"):
        sched = build_schedule(DQARConfig(schedule="static", warmup=0.0, layer_fraction=0.5, order=order))
        plans[order] = sched.plan(_step(10), "cond", {})
    assert plans["shallow"] == {0, 1, 2, 3} and plans["deep"] == {4, 5, 6, 7}
    assert len(plans["random"]) == 4 and plans["random"] == set(layer_order("random", 8, 0)[:4])
    assert layer_order("random", 8, 0) != layer_order("random", 8, 1)


def test_depth_phases_scale_to_depth():
    phases = DQARConfig().depth_phases
    assert [depth_layer_count(p, phases, 28) for p in (0.0, 0.29, 0.3, 0.69, 0.7, 1.0)] == [3, 3, 13, 13, 28, 28]
    sched = build_schedule(DQARConfig(schedule="depth", warmup=0.0))
    assert sched.plan(_step(1), "cond", {}) == {0, 1, 2, 3, 4, 5, 6, 7}.intersection(range(1))
    assert sched.plan(_step(5), "cond", {}) == {0, 1, 2, 3}
    assert sched.plan(_step(10), "cond", {}) == set(range(8))


def test_gate_needs_low_entropy_and_snr_in_window():
    cfg = DQARConfig(schedule="gate", warmup=0.0, tau0=16.0, snr_range=(0.5, 50.0))
    assert entropy_threshold(16.0, 1) == 2.0 and entropy_threshold(16.0, 64) == 16.0
    sched = build_schedule(cfg)
    ents = {0: 1.0, 1: 3.0, 2: 1.99}
    assert sched.plan(_step(5, snr=5.0), "cond", ents) == {0, 2}
    assert sched.plan(_step(5, snr=0.1), "cond", ents) == set()
    assert sched.plan(_step(5, snr=60.0), "cond", ents) == set()
    assert sched.plan(_step(5, snr=5.0, prompt_length=16), "cond", ents) == {0, 1, 2}
    gated = build_schedule(DQARConfig(schedule="gate", gate_with="static", warmup=0.0, layer_fraction=0.25,
                                      tau0=16.0))
    assert gated.plan(_step(10, snr=5.0), "cond", ents) == {0}


def test_interval_computes_every_nth_step_after_warmup():
    sched = build_schedule(DQARConfig(schedule="interval", warmup=0.5, interval=3))
    reuse = [bool(sched.plan(_step(i), "cond", {})) for i in range(11)]
    # warmup ends at step 5 (p = 0.5): compute 5, reuse 6, 7, compute 8, reuse 9, 10
    assert reuse == [False] * 6 + [True, True, False, True, True]


def test_none_schedule_never_reuses():
    assert build_schedule(DQARConfig(schedule="none")).plan(_step(10), "cond", {0: 0.0}) == set()
