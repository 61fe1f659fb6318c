"""The adaptive schedule: error control from the measured forecast error, with exact expectations."""
from dataclasses import replace

import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.method.cache import CacheEntry
from dqar.method.error_control import ErrorControl
from dqar.method.forecast import advance
from dqar.method.hooks import HOOK_ATTR
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


def run_measured(model, config):
    """Images, summary and the error control's (step, layer, branch, target, age, error) list, read before
    removal resets it."""
    ctl = apply_dqar(model, config)
    try:
        images = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        return images, ctl.summary(), list(ctl.error_control.errors)
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
    # Next refresh (Newton's remainder): C = error / ((5 - 0)(5 - 2)); the next forecast extrapolates from
    # steps 2 and 5, so its predicted error at age a is C (3 + a) a; refresh at the first age past 0.01.
    c = expected / 15
    h = next((a for a in range(1, 6) if c * (3 + a) * a > 0.01), 6)
    for a in range(1, h):
        assert control.may_forecast((1, "cond", "mlp"), 5 + a)
    assert not control.may_forecast((1, "cond", "mlp"), 5 + h)


def test_the_predicted_error_is_exact_on_a_cubic_trajectory():
    """Newton's remainder is exact for a cubic under order 2: f(s) = s^3 v has a third derivative of 6 v, so
    the forecast from points p errs by prod(s - p) * v, and the constant measured at one compute predicts
    the error of a later forecast exactly, whatever the (uneven) gaps."""
    v = torch.linspace(-1, 1, 32).reshape(1, 4, 8)
    f = lambda s: v * s ** 3                                                          # noqa: E731
    norm = torch.full((1,), 2.0)
    config = DQARConfig(schedule="adaptive", tolerance=1e9, max_age=50, forecast_order=2, adaptive_scope="module")
    control = ErrorControl(config)
    key = (0, "cond", "block")
    control.observe(key, make_entry([(s, f(s)) for s in (0, 1, 3)], order=2), f(7), 7, (None, norm))
    measured = control.errors[-1][-1]
    assert measured == pytest.approx(float(v.norm()) / 2.0 * (7 - 0) * (7 - 1) * (7 - 3), rel=1e-5)
    control.observe(key, make_entry([(s, f(s)) for s in (1, 3, 7)], order=2), f(12), 12, (None, norm))
    predicted = measured / (7 * 6 * 4) * (12 - 1) * (12 - 3) * (12 - 7)
    assert control.errors[-1][-1] == pytest.approx(predicted, rel=1e-5)


def test_the_step_scope_decides_once_per_step_for_every_module(model):
    config = DQARConfig(schedule="adaptive", warmup=0.0, tolerance=5.0, max_age=3, forecast_order=1,
                        targets=("attn", "mlp"))
    _, s, _ = run(model, config)
    modules = 4 * 2 * 2                                   # layers x targets x branches
    assert s["reuse_events"] > 0
    assert set(s["events_per_step"]) <= {0, modules}


@pytest.mark.parametrize("scope, tolerance", [("step", 5.0), ("module", 0.5)])
def test_adaptive_fires_and_no_decision_state_survives(model, baseline, scope, tolerance):
    config = DQARConfig(schedule="adaptive", warmup=0.0, tolerance=tolerance, max_age=4, forecast_order=1,
                        targets=("attn", "mlp"), adaptive_scope=scope)
    ctl = apply_dqar(model, config)
    try:
        first = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        s1 = ctl.summary()
        second = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        s2 = ctl.summary()
        # The block probes let go of each block's input when the block returns (no activation outlives it).
        probes = [undo.__self__ for undo in model.__dict__[HOOK_ATTR].restore if hasattr(undo, "__self__")]
        assert len(probes) == len(model.blocks) and all(p._input is None for p in probes)
    finally:
        remove_dqar(model)
    assert s1["reuse_events"] > 0 and not torch.equal(first, baseline)
    assert torch.equal(first, second) and s1["events_per_step"] == s2["events_per_step"]
    assert s1["forecast_error"] == s2["forecast_error"]
    # Removal takes the block probes away too.
    assert all(not b._forward_pre_hooks and not b._forward_hooks and not b.adaLN_modulation._forward_hooks
               for b in model.blocks)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tolerance=0.0), r"tolerance=0.0 is not allowed: must be a finite number > 0"),
    (dict(tolerance=-1.0), r"tolerance=-1.0 is not allowed"),
    (dict(tolerance=float("nan")), r"tolerance=nan is not allowed"),
    (dict(tolerance=float("inf")), r"tolerance=inf is not allowed"),
    (dict(max_age=0), r"max_age=0 is not allowed: must be an integer >= 1"),
    (dict(max_age=2.5), r"max_age=2.5 is not allowed"),
    (dict(schedule="adaptive", mode="kv"), r"schedule='adaptive' is not allowed: the adaptive schedule"),
    (dict(error_images=-1), r"error_images=-1 is not allowed: must be an integer >= 0 \(0: every image\)"),
    (dict(error_images=1.5), r"error_images=1.5 is not allowed"),
    (dict(error_images=True), r"error_images=True is not allowed"),
    (dict(schedule="adaptive", branch_decisions="uncond"), r"branch_decisions='uncond' is not allowed: must be one "
                                                           r"of each, cond"),
    (dict(schedule="interval", branch_decisions="cond"), r"branch_decisions='cond' is not allowed: applies to the "
                                                         r"schedules that measure forecast errors"),
    (dict(schedule="adaptive", targets=("attn", "mlp"), error_targets=("block",)),
     r"error_targets=\('block',\) is not allowed: must be None \(every target\) or a non-empty tuple"),
    (dict(schedule="static", targets=("attn", "mlp"), error_targets=("mlp",)),
     r"error_targets=\('mlp',\) is not allowed: applies to the schedules that measure"),
])
def test_bad_adaptive_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DQARConfig(**kwargs)


def test_adaptive_under_inference_mode_makes_the_same_images(model):
    # Inference-mode tensors keep no version counter: the block probes take the input norm on entry there.
    config = DQARConfig(schedule="adaptive", warmup=0.0, tolerance=5.0, max_age=4, forecast_order=1,
                        targets=("attn", "mlp"))
    images, summary, _ = run(model, config)
    with torch.inference_mode():
        again, summary_again, _ = run(model, config)
    assert summary["reuse_events"] > 0 and summary_again["reuse_events"] == summary["reuse_events"]
    assert torch.equal(images, again)


def _two_image_miss():
    """A forecast (order 0: the last output) that misses image 1 by far more than image 0."""
    previous = make_entry([(2, torch.zeros(2, 4, 8))], order=0)
    fresh = torch.zeros(2, 4, 8)
    fresh[0] += 0.1
    fresh[1] += 1.0
    return previous, fresh


@pytest.mark.parametrize("images, expected", [(0, 1.0 * 32 ** 0.5 / 4.0), (2, 1.0 * 32 ** 0.5 / 4.0),
                                              (1, 0.1 * 32 ** 0.5 / 2.0)])
def test_error_images_measures_only_some_images(images, expected):
    # Input norms 2 (image 0) and 4 (image 1): the error is the largest ||miss|| / ||x|| over the images measured.
    control = ErrorControl(DQARConfig(schedule="adaptive", forecast_order=0, error_images=images))
    previous, fresh = _two_image_miss()
    control.observe((0, "cond", "block"), previous, fresh, 3, (None, torch.tensor([2.0, 4.0])))
    assert control.errors[-1][-1] == pytest.approx(expected, rel=1e-6)


def test_error_images_are_spread_over_the_branch():
    from dqar.method.stats import spread_rows
    rows = lambda n, k: list(range(n))[spread_rows(n, k)]                         # noqa: E731
    assert rows(100, 2) == [0, 50] and rows(20, 3) == [0, 6, 12] and rows(5, 1) == [0]
    assert rows(4, 0) == rows(4, 4) == rows(4, 9) == [0, 1, 2, 3]


def test_measurements_wait_for_a_later_step_and_a_reset_drops_them(monkeypatch):
    control = ErrorControl(DQARConfig(schedule="adaptive", forecast_order=0, adaptive_scope="module"))
    key, (previous, fresh) = (0, "cond", "block"), _two_image_miss()
    control.observe(key, previous, fresh, 3, (None, torch.ones(2)))
    control.may_forecast((1, "cond", "block"), 3)          # same step: nothing it could read
    assert len(control._pending) == 1 and not control._errors
    control.may_forecast(key, 4)                            # a later step's decision measures first
    assert not control._pending and len(control._errors) == 1
    control.observe(key, previous, fresh, 5, (None, torch.ones(2)))
    control.reset()
    assert not control._pending and not control.errors and control.may_forecast(key, 6) is False
    # A queue that would hold too much is measured at once.
    monkeypatch.setattr("dqar.method.error_control._HELD_BYTES", 0)
    control.observe(key, previous, fresh, 3, (None, torch.ones(2)))
    assert not control._pending and len(control._errors) == 1


def test_stacked_measurements_equal_one_at_a_time():
    """Misses of one shape are reduced together: the errors are those of each measured alone."""
    g = torch.Generator().manual_seed(1)
    keys = [(layer, "cond", "mlp") for layer in range(5)]
    cases = [(make_entry([(0, torch.randn(3, 4, 8, generator=g)), (2, torch.randn(3, 4, 8, generator=g))], 1),
              torch.randn(3, 4, 8, generator=g), torch.rand(3, 8, generator=g) + 0.5, torch.rand(3, generator=g) + 1)
             for _ in keys]
    config = DQARConfig(schedule="adaptive", forecast_order=1, adaptive_scope="module")
    together = ErrorControl(config)
    for key, (previous, fresh, gate, norm) in zip(keys, cases):
        together.observe(key, previous, fresh, 4, (gate, norm))
    alone = []
    for key, (previous, fresh, gate, norm) in zip(keys, cases):
        control = ErrorControl(config)
        control.observe(key, previous, fresh, 4, (gate, norm))
        alone.append(control.errors[-1])
    assert [e[:5] for e in together.errors] == [e[:5] for e in alone]
    assert [e[5] for e in together.errors] == pytest.approx([e[5] for e in alone], rel=1e-6)


def test_error_images_in_a_generation(model):
    base = dict(schedule="adaptive", warmup=0.0, tolerance=5.0, max_age=4, forecast_order=1,
                targets=("attn", "mlp"), adaptive_scope="module")

    def measured(config):
        ctl = apply_dqar(model, config)
        try:
            images = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
            return images, ctl.summary(), list(ctl.error_control.errors)
        finally:
            remove_dqar(model)

    every, s_every, e_every = measured(DQARConfig(**base))
    # Two images per branch here: measuring "the first 2" is measuring all of them, the same run exactly.
    same, s_same, _ = measured(DQARConfig(**base, error_images=2))
    assert torch.equal(every, same) and s_every["forecast_error"] == s_same["forecast_error"]
    first, s_first, e_first = measured(DQARConfig(**base, error_images=1))
    assert s_first["reuse_events"] > 0
    # Step 1 measures every module against the same step-0 outputs in both runs: one image of two can only
    # see a smaller or equal maximum, and it does see a smaller one somewhere.
    at_step_1 = lambda errors: {e[1:4]: e[5] for e in errors if e[0] == 1}  # noqa: E731
    one, both = at_step_1(e_first), at_step_1(e_every)
    assert one.keys() == both.keys() and len(one) == 4 * 2 * 2
    assert all(one[k] <= both[k] * (1 + 1e-6) for k in one) and any(one[k] < both[k] * 0.999 for k in one)


def test_an_input_written_in_place_before_the_measurement_is_noticed():
    """The block input's norm is taken at the step's end; a block input written in place after its block ran
    is measured as it then is, and the probe takes its norms on entry from then on."""
    from dqar.method.probes import InputRows

    class Probe:
        _eager = False

    probe, x = Probe(), torch.full((2, 4, 8), 0.5)
    control = ErrorControl(DQARConfig(schedule="adaptive", forecast_order=0))
    previous, fresh = _two_image_miss()
    control.observe((0, "cond", "block"), previous, fresh, 3, (None, InputRows(x, x._version, probe)))
    assert not probe._eager
    x.mul_(2.0)                                          # ||x|| per image: 0.5 * sqrt(32) -> sqrt(32)
    assert control.errors[-1][-1] == pytest.approx(1.0 * 32 ** 0.5 / 32 ** 0.5, rel=1e-6) and probe._eager


@pytest.mark.parametrize("images", [1, 2])
def test_modules_of_one_block_share_the_reduction_of_their_input_rows(monkeypatch, images):
    """Attention and MLP of a block hold the same input rows: reduced once, each error still its own (one image:
    norms of the views themselves; more: stacked)."""
    from dqar.method import error_control
    from dqar.method.probes import InputRows

    class Probe:
        _eager = False

    reduced = []
    stacked, listed = error_control._grouped_norms, torch._foreach_norm
    monkeypatch.setattr(error_control, "_grouped_norms",
                        lambda items, *a: reduced.append(len(items)) or stacked(items, *a))
    monkeypatch.setattr(torch, "_foreach_norm", lambda tensors: reduced.append(len(tensors)) or listed(tensors))
    probe = Probe()
    x, y = torch.full((2, 4, 8), 0.5), torch.full((2, 4, 8), 2.0)
    previous, fresh = _two_image_miss()
    control = ErrorControl(DQARConfig(schedule="adaptive", forecast_order=0, error_images=images))
    for key, inp in (((0, "cond", "attn"), x), ((0, "cond", "mlp"), x), ((1, "cond", "attn"), y)):
        control.observe(key, previous, fresh, 3, (None, InputRows(inp[0:2], inp._version, probe)))
    errors = [e[-1] for e in control.errors]
    if images == 1:
        # image 0 only: ||miss|| = 0.1 sqrt(32), ||x_0|| = 0.5 sqrt(32), ||y_0|| = 2 sqrt(32)
        assert errors == pytest.approx([0.2, 0.2, 0.05], rel=1e-6)
        assert reduced == [3 + 2]             # one list: three misses, two distinct input views
    else:
        # both images: image 1's ratio is the larger, 1.0 / 0.5 for x and 1.0 / 2.0 for y
        assert errors == pytest.approx([2.0, 2.0, 0.5], rel=1e-6)
        assert reduced == [3, 2]              # three misses, two distinct input views


def test_one_image_measurements_equal_the_stacked_ones():
    """The one-image path (norms of the views) gives the stacked path's ratios for every kind of miss (two terms
    or one, with a gate or without) and writes none of the terms it is handed."""
    from dqar.method.error_control import _Measurement, _effect_ratios, _one_image_ratios, _stacked_ratios
    from dqar.method.probes import InputRows

    class Probe:
        _eager = False

    g = torch.Generator().manual_seed(0)
    probe, x, y = Probe(), torch.randn(1, 4, 8, generator=g), torch.randn(1, 4, 8, generator=g)

    def one(two_terms, gated, inp):
        return _Measurement((0, "cond", "attn"), 3, 1, torch.randn(1, 4, 8, generator=g),
                            torch.randn(1, 4, 8, generator=g) if two_terms else None,
                            torch.randn(1, 8, generator=g) if gated else None, InputRows(inp, inp._version, probe), 2.0)

    measured = [one(t, gt, inp) for t in (True, False) for gt in (True, False) for inp in (x, y)]
    kept = [(m.a.clone(), None if m.b is None else m.b.clone()) for m in measured]
    fast = _one_image_ratios(measured)
    assert fast == pytest.approx(_stacked_ratios(measured), rel=1e-6) and len(set(fast)) == len(fast)
    assert all(torch.equal(m.a, a) and (b is None or torch.equal(m.b, b)) for m, (a, b) in zip(measured, kept))
    unmeasured = _Measurement((1, "cond", "attn"), 3)
    assert _effect_ratios([unmeasured] + measured) == [None] + fast


@pytest.mark.parametrize("targets, images", [(("attn", "mlp"), 0), (("attn", "mlp"), 1), (("block",), 1)])
def test_measured_at_once_or_at_the_step_end_the_same(model, monkeypatch, targets, images):
    """Large misses are measured at once (their own path), small ones queued to the step's end: either way the
    same errors and the same images."""
    config = DQARConfig(schedule="adaptive", warmup=0.0, tolerance=5.0, max_age=4, forecast_order=2,
                        targets=targets, error_images=images)

    def measured():
        ctl = apply_dqar(model, config)
        try:
            return sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0), list(ctl.error_control.errors)
        finally:
            remove_dqar(model)

    queued, queued_errors = measured()
    monkeypatch.setattr("dqar.method.error_control._DEFER_ELEMENTS", 0)
    at_once, at_once_errors = measured()
    assert torch.equal(queued, at_once) and len(queued_errors) == len(at_once_errors) > 0
    assert [e[:5] for e in queued_errors] == [e[:5] for e in at_once_errors]
    assert [e[5] for e in queued_errors] == pytest.approx([e[5] for e in at_once_errors], rel=1e-5)



def test_conditional_decisions_refresh_both_branches_together(model, baseline):
    """branch_decisions="cond" (module scope): only conditional computes are measured and the unconditional
    branch refreshes when the conditional one does; a tiny tolerance still computes everything."""
    config = DQARConfig(schedule="adaptive", adaptive_scope="module", warmup=0.0, tolerance=0.05, max_age=4,
                        forecast_order=1, targets=("attn", "mlp"), branch_decisions="cond")
    images, s, errors = run_measured(model, config)
    assert s["reuse_events"] > 0 and {e[2] for e in errors} == {"cond"}
    each, s_each, _ = run(model, replace(config, branch_decisions="each"))
    assert s_each["reuse_events"] > 0 and not torch.equal(images, each)
    # Every reuse event is a pair: both branches of a layer and target decided alike.
    assert all(n % 2 == 0 for n in s["events_per_step"])
    again, s2, _ = run(model, config)
    assert torch.equal(images, again) and s2["events_per_step"] == s["events_per_step"]
    exact, s0, _ = run(model, replace(config, tolerance=1e-12))
    assert s0["reuse_events"] == 0 and torch.equal(exact, baseline)


def test_probe_hands_the_modules_of_a_block_one_set_of_measured_rows(model):
    """With error_images, attention and MLP of one block and branch share the InputRows the probe cut once."""
    from dqar.method.probes import InputRows

    handed = []
    ctl = apply_dqar(model, DQARConfig(schedule="adaptive", warmup=0.0, tolerance=1e-12, targets=("attn", "mlp"),
                                       forecast_order=1, error_images=1))
    observe = ctl.error_control.observe
    ctl.error_control.observe = lambda key, prev, fresh, step, effect, diffs=None: (
        handed.append((key, step, effect)) or observe(key, prev, fresh, step, effect, diffs))
    try:
        sample(model, LABELS, SEEDS, steps=4, cfg_scale=2.0)
    finally:
        remove_dqar(model)
    by = {}
    for (layer, branch, target), step, effect in handed:
        if effect is not None and isinstance(effect[1], InputRows):
            by.setdefault((layer, branch, step), {})[target] = effect
    assert by and all(e["attn"][1] is e["mlp"][1] and e["attn"][1].sampled for e in by.values())
    assert all(e["attn"][1].rows.shape[0] == 1 and e["attn"][0].shape[0] == 1 for e in by.values())


def test_error_targets_under_the_adaptive_schedule(model, baseline):
    """Module scope with error_targets=("mlp",): only MLP computes are measured and attention refreshes with its
    layer's MLP; a tiny tolerance still computes everything."""
    config = DQARConfig(schedule="adaptive", adaptive_scope="module", warmup=0.0, tolerance=0.05, max_age=4,
                        forecast_order=1, targets=("attn", "mlp"), error_targets=("mlp",))
    _, s, errors = run_measured(model, config)
    assert s["reuse_events"] > 0 and {e[3] for e in errors} == {"mlp"}
    assert all(n % 2 == 0 for n in s["events_per_step"])          # attention and MLP of a layer alike
    exact, s0, _ = run(model, replace(config, tolerance=1e-12))
    assert s0["reuse_events"] == 0 and torch.equal(exact, baseline)
