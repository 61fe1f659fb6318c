"""Forecasting and the block target: exact on polynomials, exact against an independent computation at 16
bits, within the quantizer's bound at 8/4 bits, fires, restores, and keeps no state between generations."""
import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.method.cache import CacheEntry
from dqar.method.forecast import advance, differences, extrapolate, miss_terms
from dqar.method.quant import QMAX, store
from dqar.sampling import sample

LABELS, SEEDS, STEPS = [1, 7], [3, 4], 12


def run_history(values, order, bits=16, granularity="tensor", keep_all=False):
    """Feed (step, tensor) pairs through advance() as the controller does; returns the last entry (or all)."""
    entry, entries = None, []
    for step, value in values:
        new = CacheEntry(0, "cond", "attn", step)
        new.output, new.d1, new.d2, new.steps = advance(
            entry, value, step, order, lambda t, slot: store(t, bits, granularity))
        entry = new
        entries.append(entry)
    return entries if keep_all else entry


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("points", [1, 2, 3])
@pytest.mark.parametrize("bits", [16, 8])
def test_the_miss_from_the_new_difference_equals_fresh_minus_forecast(order, points, bits):
    """miss_terms reads the error off the difference the fresh output completes; it must equal the
    forecast's own error, for every order and history length, from a quantized history too (the forecast and
    the new differences both read the stored values); with `images` the same for the first rows."""
    g = torch.Generator().manual_seed(order * 10 + points)
    history = [(s, torch.randn(2, 5, 4, generator=g)) for s in (0, 2, 3)[:points]]
    previous = run_history(history, order, bits=bits)
    fresh, step = torch.randn(2, 5, 4, generator=g), 7
    diffs = differences(previous, fresh, step, order)
    a, b, factor = miss_terms(previous, fresh, step, order, diffs)
    expected = fresh - extrapolate(previous, step, order, torch.float32)
    torch.testing.assert_close((a if b is None else a - b) * factor, expected, rtol=1e-5, atol=1e-5)
    assert b is not None or any(a is d for d in diffs)       # a subtraction to come, or a difference kept
    a1, b1, factor1 = miss_terms(previous, fresh, step, order, diffs, slice(0, 1))
    assert factor1 == factor and a1.shape[0] == 1
    torch.testing.assert_close((a1 if b1 is None else a1 - b1) * factor, expected[:1], rtol=1e-5, atol=1e-5)


def test_order_1_is_exact_on_a_linear_trajectory():
    a, b = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[0.25, 0.5, -1.0]])
    entry = run_history([(s, a + s * b) for s in (0, 1, 4)], order=1)      # uneven gaps
    for s in (5, 6, 9):
        assert torch.equal(extrapolate(entry, s, 1, torch.float32), a + s * b)


def test_order_2_is_exact_on_a_quadratic_with_uneven_gaps():
    a, b, c = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.25]), torch.tensor([0.125, -0.25])
    f = lambda s: a + s * b + s * s * c                                           # noqa: E731
    entry = run_history([(s, f(s)) for s in (0, 2, 3, 7)], order=2)
    assert entry.steps == (2, 3, 7)
    for s in (8, 10, 13):
        assert torch.equal(extrapolate(entry, s, 2, torch.float32), f(s))
    # Order 1 on the same quadratic is not exact: the test above can tell the orders apart.
    linear = run_history([(s, f(s)) for s in (0, 2, 3, 7)], order=1)
    assert not torch.equal(extrapolate(linear, 10, 1, torch.float32), f(10))


def test_too_little_history_falls_back_to_the_order_it_holds():
    x0 = torch.tensor([1.0, 2.0])
    entry = run_history([(0, x0)], order=2)
    assert entry.d1 is None and torch.equal(extrapolate(entry, 3, 2, torch.float32), x0)
    with pytest.raises(ValueError, match="does not follow"):
        advance(entry, x0, 0, 2, lambda t, slot: store(t, 16, "tensor"))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_history_stays_within_the_quantizers_step(bits):
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(4, 16, 32, generator=g) for _ in range(3))
    f = lambda s: a + 0.1 * s * b + 0.01 * s * s * c                             # noqa: E731
    steps, target = (0, 3, 6, 9), 12
    entries = run_history([(s, f(s)) for s in steps], order=2, bits=bits, keep_all=True)
    entry = entries[-1]
    # Independent bound. Each stored slot is off by at most half its quantization step h = max|x| / Q / 2.
    # With positions s0, s1, s2 = 3, 6, 9 and target 12, writing e_k for the error of stored F(s_k) and
    # q1, q1', q2 for those of the stored D1 (at s2), D1 (at s1) and D2, the forecast
    # F(s2) + 3 D1 + 18 D2 is off by e2 - 2 e1 + e0 + 6 q1 - 3 q1' + 18 q2 (each difference is formed
    # from the stored previous values, so no error is carried further back).
    q = QMAX[bits]
    half_step = lambda t: t.dequantize().abs().max() / q / 2                    # noqa: E731
    h_out = max(half_step(e.output) for e in entries[-3:])
    bound = (4 * h_out + 6 * half_step(entry.d1) + 3 * half_step(entries[-2].d1) + 18 * half_step(entry.d2)) * 1.01
    exact = run_history([(s, f(s)) for s in steps], order=2, bits=16)
    err = (extrapolate(entry, target, 2, torch.float32) - extrapolate(exact, target, 2, torch.float32)).abs().max()
    assert 0 < err <= bound


def capture_fresh_outputs(model, target, layer, step_of):
    """The module's own outputs {step: tensor} each time it really computes, recorded around the original."""
    module = model.blocks[layer] if target == "block" else getattr(model.blocks[layer], target)
    seen = {}
    original = type(module).forward

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen[step_of()] = out.detach().clone() - (args[0] if target == "block" else 0)
        return out

    return module, spy, seen


@pytest.mark.parametrize("target", ["attn", "block"])
def test_16_bit_forecasts_equal_an_independent_newton_extrapolation(model, target):
    layer, order = 1, 2
    cfg = DQARConfig(schedule="interval", interval=3, warmup=0.0, targets=(target,), forecast_order=order)
    ctl = apply_dqar(model, cfg)
    module, spy, fresh = capture_fresh_outputs(model, target, layer, lambda: ctl.step.step_index)
    returned = {}
    hook = module.forward

    def observe(*args, **kwargs):
        out = hook(*args, **kwargs)
        returned[ctl.step.step_index] = out.detach().clone() - (args[0] if target == "block" else 0)
        return out

    module.forward = observe
    # The hook's original forward is the instance-less class forward; spy records each real computation.
    hook.original = lambda *a, **k: spy(module, *a, **k)
    try:
        sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=1.0)       # one branch: cond
        summary = ctl.summary()
    finally:
        module.__dict__.pop("forward", None)
        remove_dqar(model)
    computed = sorted(fresh)
    # Interval 3 computes 0, 3, 6, 9; steps 1 and 2 lack the 3 outputs order 2 needs, so they compute too.
    assert computed == [0, 1, 2, 3, 6, 9] and summary["reuse_events"] > 0
    assert summary["short_history"] == 2 * 4            # steps 1 and 2, in each of the 4 layers
    for s in range(STEPS):
        if s in fresh:
            assert torch.equal(returned[s], fresh[s])
            continue
        known = [c for c in computed if c < s][-3:]
        (s0, s1, s2), (f0, f1, f2) = known, [fresh[c] for c in known]
        d1 = (f2 - f1) / (s2 - s1)
        d2 = (d1 - (f1 - f0) / (s1 - s0)) / (s2 - s0)
        expected = f2 + (s - s2) * d1 + (s - s2) * (s - s1) * d2
        # The block target hands back x + residual; subtracting x again costs a few ulps of |x|.
        assert torch.allclose(returned[s], expected, atol=1e-6 * float(expected.abs().max()), rtol=1e-5), s


def test_order_0_returns_the_last_computed_output_exactly(model):
    cfg = DQARConfig(schedule="interval", interval=2, warmup=0.0, targets=("attn", "mlp"))
    ctl = apply_dqar(model, cfg)
    try:
        sample(model, LABELS, SEEDS, steps=4, cfg_scale=2.0)
        entry = ctl.cache.get(0, "cond", "mlp")
        assert entry.d1 is None and entry.d2 is None and entry.steps == (2,)
        assert torch.equal(ctl.reuse(entry), entry.output.tensor)
    finally:
        remove_dqar(model)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_block_target_fires_counts_flops_and_resets(model, baseline, order):
    cfg = DQARConfig(schedule="interval", interval=2, warmup=0.2, targets=("block",), forecast_order=order)
    ctl = apply_dqar(model, cfg)
    try:
        first = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        s = ctl.summary()
        second = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
    finally:
        remove_dqar(model)
    assert not torch.equal(first, baseline) and torch.equal(first, second)      # no state survives
    assert s["reuse_events"] > 0 and s["ideal_speedup"] > 1.0
    # A reused block skips everything it does: the bound is far above attention + MLP reuse of the same steps.
    ctl = apply_dqar(model, DQARConfig(schedule="interval", interval=2, warmup=0.2, targets=("attn", "mlp"),
                                       forecast_order=order))
    try:
        sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        modules = ctl.summary()
    finally:
        remove_dqar(model)
    assert s["reuse_events"] * 2 == modules["reuse_events"] and s["ideal_speedup"] > modules["ideal_speedup"]
    slots = 1 + min(order, 2)
    # slots x 4 layers x 2 branches x a (2, 16, 32) residual x 4 bytes (fp32)
    assert s["peak_cache_bytes"] == slots * 4 * 2 * (2 * 16 * 32) * 4


def test_block_target_at_warmup_one_is_the_plain_model(model, baseline):
    ctl = apply_dqar(model, DQARConfig(schedule="interval", warmup=1.0, targets=("block",), forecast_order=2))
    try:
        images = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        assert ctl.summary()["reuse_events"] == 0
    finally:
        remove_dqar(model)
    assert torch.equal(images, baseline)


def test_forecasting_changes_reused_outputs_and_counts_short_history(model, baseline):
    results = {}
    for order in (0, 1, 2):
        ctl = apply_dqar(model, DQARConfig(schedule="interval", interval=2, warmup=0.0,
                                           targets=("attn", "mlp"), forecast_order=order))
        try:
            results[order] = (sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0), ctl.summary())
        finally:
            remove_dqar(model)
    assert not torch.equal(results[0][0], results[1][0]) and not torch.equal(results[1][0], results[2][0])
    # Interval 2 from step 0: step 1 has one computed output, too few for orders 1 and 2 (each module, branch).
    assert results[0][1]["short_history"] == 0
    assert results[1][1]["short_history"] == results[2][1]["short_history"] == 4 * 2 * 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(forecast_order=3), r"forecast_order=3 is not allowed: must be 0"),
    (dict(forecast_order=True), r"forecast_order=True is not allowed"),
    (dict(forecast_order=1, mode="kv"), r"forecast_order=1 is not allowed: forecasting extrapolates"),
    (dict(targets=("block", "attn")), r"use targets=\('block',\) alone"),
    (dict(targets=("block",), mode="kv"), r"mode='kv' caches attention keys/values only"),
])
def test_bad_forecast_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DQARConfig(**kwargs)


def test_diff_bits_store_the_differences_at_their_own_width(model):
    cfg = DQARConfig(schedule="interval", interval=3, warmup=0.0, targets=("attn",), forecast_order=2,
                     cache_bits=8, diff_bits=4)
    ctl = apply_dqar(model, cfg)
    try:
        sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        entry = ctl.cache.get(0, "cond", "attn")
        assert entry.output.bits == 8 and entry.d1.bits == 4 and entry.d2.bits == 4
        assert entry.nbytes == entry.output.nbytes + entry.d1.nbytes + entry.d2.nbytes
        assert entry.d1.nbytes < entry.output.nbytes                      # two 4-bit codes per byte
    finally:
        remove_dqar(model)
    with pytest.raises(ValueError, match=r"diff_bits=3 is not allowed"):
        DQARConfig(diff_bits=3)
