"""Schedules: ReusableLayers(p) against hand-computed tables, orders, depth phases, gate, interval."""
import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.models import build_dit
from dqar.sampling import sample
from dqar.method.schedules import (StepState, build_schedule, depth_layer_count, entropy_threshold, layer_order,
                                   live_fields, reusable_layer_count)

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


# --------------------------------------------------------------------------------------------------
# Depth schedule at the default warmup (issue 15 item 27)
# --------------------------------------------------------------------------------------------------

def _plan_sizes(config, steps, layers):
    sched = build_schedule(config)
    plans = [sched.plan(StepState(i, steps, layers, snr=1.0), "cond", {}) for i in range(steps)]
    assert all(p == set(range(len(p))) for p in plans)          # always a shallow prefix
    return [len(p) for p in plans]


@pytest.mark.parametrize("layers, shallow, mid", [(28, 3, 13), (8, 1, 4), (12, 1, 6)])
def test_depth_schedule_runs_every_phase_at_the_default_warmup(layers, shallow, mid):
    # Defaults: warmup 0.4, phases ends 0.3 / 0.7 / 1.0 with 3/28, 13/28, 1 of the layers. The phases run on
    # the clock of the reuse window, q = (p - 0.4) / 0.6, so with 50 steps (p = i/49), by hand:
    #   p >= 0.4  <=> i >= 19.6  -> reuse from step 20;
    #   q < 0.3   <=> p < 0.58   <=> i < 28.42 -> steps 20..28 (9 steps) shallow;
    #   q < 0.7   <=> p < 0.82   <=> i < 40.18 -> steps 29..40 (12 steps) mid;  steps 41..49 (9 steps) all.
    # Layer counts: round(3/28 * L), round(13/28 * L): 3, 13 at 28; 1 (0.86), 4 (3.71) at 8; 1 (1.29), 6 (5.57) at 12.
    cfg = DQARConfig(schedule="depth")
    assert cfg.warmup == 0.4
    expected = [0] * 20 + [shallow] * 9 + [mid] * 12 + [layers] * 9
    assert _plan_sizes(cfg, 50, layers) == expected


def test_depth_schedule_at_warmup_zero_is_the_seeds_progress_rule():
    # w = 0: q = p, the seed's "progress < 0.3 / < 0.7 / else" on p = i/49 itself:
    # p < 0.3 <=> i < 14.7 (steps 0..14), p < 0.7 <=> i < 34.3 (steps 15..34), then steps 35..49.
    assert _plan_sizes(DQARConfig(schedule="depth", warmup=0.0), 50, 28) == [3] * 15 + [13] * 20 + [28] * 15


def test_depth_phase_edges_are_exact_despite_float_error():
    # 51 steps, p = i/50. At i = 29, q = (0.58 - 0.4) / 0.6 = 0.3 exactly (0.29999999999999993 in floats):
    # the seed's rule "q < 0.3 is early" puts it in the middle phase. At i = 41, q = 0.7: the last phase.
    sizes = _plan_sizes(DQARConfig(schedule="depth"), 51, 28)
    assert sizes[19] == 0 and sizes[20] == 3 and sizes[28] == 3 and sizes[29] == 13
    assert sizes[40] == 13 and sizes[41] == 28 and sizes[50] == 28


def test_depth_schedule_warmup_one_never_reuses():
    assert _plan_sizes(DQARConfig(schedule="depth", warmup=1.0), 11, 8) == [0] * 11
    assert build_schedule(DQARConfig(schedule="depth", warmup=1.0)).reusable_ever(8) == frozenset()


# --------------------------------------------------------------------------------------------------
# Layer rounding: the slides' single floor or the public code's double floor (issue 15 item 28)
# --------------------------------------------------------------------------------------------------

# (p, w, l, L) -> code: floor((p - w) / (1 - w) * floor(l * L)); computed by hand.
CODE_TABLE = [
    (1.00, 0.4, 0.33, 8, 2), (0.70, 0.4, 0.33, 8, 1), (0.69, 0.4, 0.33, 8, 0), (0.988, 0.4, 0.33, 28, 8),
    (0.60, 0.4, 0.33, 28, 3), (0.30, 0.4, 1.00, 8, 0), (0.70, 0.4, 0.50, 28, 7), (0.55, 0.1, 0.66, 12, 3),
]


@pytest.mark.parametrize("p, w, l, L, expected", CODE_TABLE)
def test_code_rounding_table(p, w, l, L, expected):
    assert reusable_layer_count(p, w, l, L, rounding="code") == expected


def test_the_roundings_differ_where_the_inner_floor_drops_a_fraction():
    # a = 0.98: slides floor(0.98 * 9.24) = 9, code floor(0.98 * 9) = 8.
    assert reusable_layer_count(0.988, 0.4, 0.33, 28) == 9
    assert reusable_layer_count(0.988, 0.4, 0.33, 28, rounding="slides") == 9
    assert reusable_layer_count(0.988, 0.4, 0.33, 28, rounding="code") == 8


def test_slides_and_code_rounding_on_the_8_layer_model_over_50_steps():
    # w = 0.4, l = 0.33, L = 8, p = i/49, a = (p - 0.4) / 0.6. By hand:
    # slides floor(2.64 a): 1 from a >= 1/2.64 (p >= 0.6273, i >= 31), 2 from a >= 2/2.64 (p >= 0.8545, i >= 42);
    # code floor(a * floor(2.64)) = floor(2a): 1 from a >= 0.5 (p >= 0.7, i >= 35), 2 only at a = 1 (i = 49).
    slides = [0] * 31 + [1] * 11 + [2] * 8
    code = [0] * 35 + [1] * 14 + [2]
    assert sum(slides) == 27 and sum(code) == 16          # the layer-steps issue 15 names
    assert _plan_sizes(DQARConfig(warmup=0.4, layer_fraction=0.33), 50, 8) == slides
    assert _plan_sizes(DQARConfig(warmup=0.4, layer_fraction=0.33, layer_rounding="slides"), 50, 8) == slides
    assert _plan_sizes(DQARConfig(warmup=0.4, layer_fraction=0.33, layer_rounding="code"), 50, 8) == code
    assert DQARConfig().layer_rounding == "slides"


def test_code_rounding_reaches_the_same_layers_at_the_end():
    # floor(1 * floor(l L)) == floor(l L): both roundings can reuse the same layers, so both cache the same ones.
    for l, L in ((0.33, 8), (0.5, 12), (0.66, 28), (1.0, 4)):
        slides = build_schedule(DQARConfig(layer_fraction=l))
        code = build_schedule(DQARConfig(layer_fraction=l, layer_rounding="code"))
        assert slides.reusable_ever(L) == code.reusable_ever(L) == frozenset(range(int(l * L + 1e-9)))


def test_layer_rounding_is_live_only_where_a_static_schedule_plans():
    base = DQARConfig().to_dict()
    assert "layer_rounding" in live_fields({**base, "schedule": "static"})
    assert "layer_rounding" in live_fields({**base, "schedule": "gate", "gate_with": "static"})
    for schedule in ("none", "depth", "interval", "adaptive", "policy"):
        assert "layer_rounding" not in live_fields({**base, "schedule": schedule})
    assert "layer_rounding" not in live_fields({**base, "schedule": "gate", "gate_with": "depth"})


# --------------------------------------------------------------------------------------------------
# The public code's deep-layer SNR floor as a gate option (issue 15 item 29)
# --------------------------------------------------------------------------------------------------

ALL_LOW = {i: 0.1 for i in range(8)}       # every layer's entropy far below tau


def _gate(**kw):
    return build_schedule(DQARConfig(schedule="gate", warmup=0.0, tau0=16.0, snr_range=(0.0, 1e9), **kw))


def test_deep_snr_floor_refuses_the_last_third_of_the_layers_below_the_floor():
    # L = 8: the code's "deep" layers are those >= 2 * 8 // 3 = 5, i.e. 5, 6, 7.
    floor = _gate(gate_deep_snr_floor=1.0)
    assert floor.plan(_step(5, snr=0.5), "cond", ALL_LOW) == {0, 1, 2, 3, 4}
    assert floor.plan(_step(5, snr=0.999), "cond", ALL_LOW) == {0, 1, 2, 3, 4}
    assert floor.plan(_step(5, snr=1.0), "cond", ALL_LOW) == set(range(8))      # "snr < floor" refuses, not <=
    assert floor.plan(_step(5, snr=7.0), "cond", ALL_LOW) == set(range(8))
    # Off by default: the same steps reuse every layer.
    assert DQARConfig().gate_deep_snr_floor is None
    assert _gate().plan(_step(5, snr=0.5), "cond", ALL_LOW) == set(range(8))
    # L = 28: deep = 18..27; L = 12: 8..11.
    assert floor.plan(StepState(5, 11, 28, snr=0.5), "cond", {i: 0.1 for i in range(28)}) == set(range(18))
    assert floor.plan(StepState(5, 11, 12, snr=0.5), "cond", {i: 0.1 for i in range(12)}) == set(range(8))


def test_deep_snr_floor_applies_on_top_of_the_gates_base_schedule_and_entropy():
    ents = {0: 0.1, 1: 9.0, 5: 0.1, 6: 0.1, 7: 9.0}
    floor = _gate(gate_deep_snr_floor=2.0)
    assert floor.plan(_step(5, snr=1.5), "cond", ents) == {0}
    assert floor.plan(_step(5, snr=2.5), "cond", ents) == {0, 5, 6}
    deep_first = build_schedule(DQARConfig(schedule="gate", gate_with="static", order="deep", warmup=0.0,
                                           layer_fraction=0.5, tau0=16.0, snr_range=(0.0, 1e9),
                                           gate_deep_snr_floor=2.0))
    # static deep-first at p = 1 offers 4 layers: 7, 6, 5, 4; the floor leaves 4 below SNR 2.
    assert deep_first.plan(_step(10, snr=1.0), "cond", ALL_LOW) == {4}
    assert deep_first.plan(_step(10, snr=3.0), "cond", ALL_LOW) == {4, 5, 6, 7}


def test_deep_snr_floor_is_live_only_for_the_gate():
    base = DQARConfig().to_dict()
    assert "gate_deep_snr_floor" in live_fields({**base, "schedule": "gate"})
    for schedule in ("none", "static", "depth", "interval", "adaptive", "policy"):
        assert "gate_deep_snr_floor" not in live_fields({**base, "schedule": schedule})


@pytest.mark.parametrize("layers, slides, code", [(8, 27, 16), (12, 45, 31), (28, 126, 123)])
def test_the_static_ramps_share_of_module_calls_as_the_readme_states(layers, slides, code):
    # README: at w = 0.4, l = 0.33 and 50 steps the static schedule reuses 27/400 (6.75%), 45/600 (7.5%),
    # 126/1400 (9.0%) of the layer-steps; the public code's rounding 16/400, 31/600, 123/1400.
    for rounding, expected in (("slides", slides), ("code", code)):
        sizes = _plan_sizes(DQARConfig(warmup=0.4, layer_fraction=0.33, layer_rounding=rounding), 50, layers)
        assert sum(sizes) == expected
    assert round(100 * slides / (50 * layers), 2) == {8: 6.75, 12: 7.5, 28: 9.0}[layers]


def test_the_reuse_fraction_of_a_run_is_the_ramps_share():
    # A 12-layer model (the shipped model's shape), 50 steps with CFG: 45 layer-steps x 2 branches reused of 1200.
    model = build_dit("DiT-Digits").randomize_(0, std=0.02).eval()
    ctl = apply_dqar(model, DQARConfig(warmup=0.4, layer_fraction=0.33))
    try:
        with torch.no_grad():
            sample(model, [3], [0], steps=50, cfg_scale=1.5)
        s = ctl.summary()
    finally:
        remove_dqar(model)
    assert s["reuse_events"] == 90 and s["compute_events"] == 1200 - 90 and s["reuse_fraction"] == 0.075
