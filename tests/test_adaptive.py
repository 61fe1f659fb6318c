"""The adaptive schedule: error control from the measured forecast error, with exact expectations."""
import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.method.cache import CacheEntry
from dqar.method.error_control import ErrorControl
from dqar.method.forecast import advance
from dqar.method.quant import store
from dqar.sampling import sample

LABELS, SEEDS, STEPS = [1, 7], [3, 4], 12


def run(model, config):
    ctl = apply_dqar(model, config)
    try:
        images = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        return images, ctl.summary(), ctl
    finally:
        remove_dqar(model)


@pytest.mark.parametrize("targets", [("attn", "mlp"), ("block",)])
def test_a_tiny_tolerance_computes_everything(model, baseline, targets):
    images, s, _ = run(model, DQARConfig(schedule="adaptive", warmup=0.0, tolerance=1e-12, forecast_order=1,
                                         targets=targets))
    assert s["reuse_events"] == 0 and torch.equal(images, baseline)
    assert s["forecast_error"]["measured"] > 0          # it did measure, and every measure said compute


@pytest.mark.parametrize("max_age", [1, 2, 3, 5])
def test_a_huge_tolerance_refreshes_exactly_every_max_age_steps(model, max_age):
    _, s, _ = run(model, DQARConfig(schedule="adaptive", warmup=0.0, tolerance=1e9, max_age=max_age,
                                    targets=("attn",)))
    # Step 0 has nothing to measure against, so step 1 computes too and measures; from then on a compute
    # at step c serves c+1 .. c+max_age-1 (order 0) and the next compute is at c+max_age.
    computed = {0} | set(range(1, STEPS, max_age))
    assert s["events_per_step"] == [0 if i in computed else 8 for i in range(STEPS)]    # 4 layers x 2 branches
    assert s["reuse_events"] == (STEPS - len(computed)) * 8


def make_entry(history, order):
    entry = None
    for step, value in history:
        new = CacheEntry(0, "cond", "attn", step)
        new.output, new.d1, new.d2, new.steps = advance(entry, value, step, order,
                                                        lambda t, slot: store(t, 16, "tensor"))
        entry = new
    return entry


def test_a_linear_second_half_stops_order_1_computing_but_not_order_0():
    """Synthetic trajectory: curved, then exactly linear. Order 1 forecasts a line exactly, so its error
    control stops computing; order 0 (copy) keeps measuring a non-zero error and keeps computing."""
    ones = torch.ones(1, 4, 8)
    f = lambda s: ones * (s * s if s < 6 else 36 + 12 * (s - 6)) / 100.0          # noqa: E731
    norm = torch.full((1,), 100.0)
    computed = {}
    for order in (0, 1):
        config = DQARConfig(schedule="adaptive", tolerance=1e-4, max_age=4, forecast_order=order)
        control = ErrorControl(config)
        entry, key, steps_computed = None, (0, "cond", "attn"), []
        for step in range(20):
            if entry is not None and step >= 6 and control.may_forecast(key, step):
                continue
            control.observe(key, entry, f(step), step, (None, norm))
            entry = make_entry([*(zip(entry.steps, [f(s) for s in entry.steps]) if entry else []), (step, f(step))],
                               order)
            steps_computed.append(step)
        computed[order] = steps_computed
    late = lambda steps: [s for s in steps if s >= 8]                             # noqa: E731
    assert late(computed[0]) == list(range(8, 20))                                 # copy: every step
    assert len(late(computed[1])) == len(range(8, 20, 4))                          # line: only max_age refreshes


def test_the_error_estimate_equals_an_independent_computation():
    config = DQARConfig(schedule="adaptive", tolerance=0.01, max_age=6, forecast_order=1)
    control = ErrorControl(config)
    g = torch.Generator().manual_seed(0)
    f0, f1, fresh = (torch.randn(2, 4, 8, generator=g) for _ in range(3))
    gate, norm = torch.rand(2, 8, generator=g) + 0.5, torch.tensor([3.0, 5.0])
    previous = make_entry([(0, f0), (2, f1)], order=1)
    control.observe((1, "cond", "mlp"), previous, fresh, 5, (gate, norm))
    forecast = f1 + (5 - 2) * (f1 - f0) / 2
    expected = max(float((gate[i] * (forecast[i] - fresh[i])).norm() / norm[i]) for i in range(2))
    step, layer, branch, target, age, error = control.errors[-1]
    assert (step, layer, branch, target, age) == (5, 1, "cond", "mlp", 3)
    assert error == pytest.approx(expected, rel=1e-6)
    # Next refresh: the largest h <= 6 with error * (h / 3)^2 <= 0.01.
    h = max(h for h in range(1, 7) if expected * (h / 3) ** 2 <= 0.01) if expected * (1 / 3) ** 2 <= 0.01 else 1
    if h > 1:
        assert control.may_forecast((1, "cond", "mlp"), 5 + h - 1)
    assert not control.may_forecast((1, "cond", "mlp"), 5 + h)


def test_adaptive_fires_and_no_decision_state_survives(model, baseline):
    config = DQARConfig(schedule="adaptive", warmup=0.0, tolerance=0.5, max_age=4, forecast_order=1,
                        targets=("attn", "mlp"))
    ctl = apply_dqar(model, config)
    try:
        first = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        s1 = ctl.summary()
        second = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        s2 = ctl.summary()
    finally:
        remove_dqar(model)
    assert s1["reuse_events"] > 0 and not torch.equal(first, baseline)
    assert torch.equal(first, second) and s1["events_per_step"] == s2["events_per_step"]
    assert s1["forecast_error"] == s2["forecast_error"]
    # Removal takes the block probes away too.
    assert all(not b._forward_pre_hooks and not b.adaLN_modulation._forward_hooks for b in model.blocks)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tolerance=0.0), r"tolerance=0.0 is not allowed: must be a finite number > 0"),
    (dict(tolerance=-1.0), r"tolerance=-1.0 is not allowed"),
    (dict(tolerance=float("nan")), r"tolerance=nan is not allowed"),
    (dict(tolerance=float("inf")), r"tolerance=inf is not allowed"),
    (dict(max_age=0), r"max_age=0 is not allowed: must be an integer >= 1"),
    (dict(max_age=2.5), r"max_age=2.5 is not allowed"),
    (dict(schedule="adaptive", mode="kv"), r"schedule='adaptive' is not allowed: the adaptive schedule"),
])
def test_bad_adaptive_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DQARConfig(**kwargs)
