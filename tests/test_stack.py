"""The stack target: one residual for the whole chain of blocks, the same images as the block target under a
schedule that decides per step, 1/L of its history."""
import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.sampling import sample

LABELS, SEEDS, STEPS = [1, 7], [3, 4], 12
ff = pytest.importorskip("family_fixtures")


def run(model, config):
    ctl = apply_dqar(model, config)
    try:
        images = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        again = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        return images, again, ctl.summary()
    finally:
        remove_dqar(model)


@pytest.mark.parametrize("order", [0, 1, 2])
def test_the_stack_forecasts_what_the_blocks_forecast_with_one_history(model, baseline, order):
    common = dict(schedule="interval", interval=3, warmup=0.0, forecast_order=order)
    blocks, _, sb = run(model, DQARConfig(targets=("block",), **common))
    stack, again, ss = run(model, DQARConfig(targets=("stack",), **common))
    assert ss["reuse_events"] > 0 and not torch.allclose(stack, baseline, atol=1e-3)
    # The sum of the blocks' forecasts is the forecast of their sum (extrapolation is linear): equal up to
    # float rounding of the different summation order.
    torch.testing.assert_close(stack, blocks, rtol=1e-5, atol=1e-5)
    assert torch.equal(stack, again)                                            # nothing survives a generation
    layers = 4
    skipped_steps = [i for i, e in enumerate(sb["events_per_step"]) if e]
    assert [i for i, e in enumerate(ss["events_per_step"]) if e] == skipped_steps
    assert ss["reuse_events"] * layers == sb["reuse_events"]                   # one decision per branch and step
    assert ss["ideal_speedup"] == pytest.approx(sb["ideal_speedup"], rel=1e-9)
    assert ss["peak_cache_bytes"] * layers == sb["peak_cache_bytes"]


def test_the_stack_with_nothing_reusable_is_the_plain_model(model, baseline):
    for config in (DQARConfig(schedule="interval", interval=3, warmup=1.0, targets=("stack",), forecast_order=2),
                   DQARConfig(schedule="none", targets=("stack",))):
        images, _, s = run(model, config)
        assert s["reuse_events"] == 0 and torch.equal(images, baseline)


def test_removal_restores_every_block(model, baseline):
    apply_dqar(model, DQARConfig(schedule="interval", interval=2, warmup=0.0, targets=("stack",)))
    remove_dqar(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0), baseline)


def test_adaptive_control_of_the_stack_measures_and_skips(model, baseline):
    config = DQARConfig(schedule="adaptive", tolerance=5.0, max_age=3, warmup=0.0, targets=("stack",),
                        forecast_order=1)
    images, again, s = run(model, config)
    assert s["reuse_events"] > 0 and s["forecast_error"]["measured"] > 0
    assert torch.equal(images, again) and not torch.equal(images, baseline)
    tiny = DQARConfig(schedule="adaptive", tolerance=1e-12, warmup=0.0, targets=("stack",), forecast_order=1)
    images, _, s = run(model, tiny)
    assert s["reuse_events"] == 0 and torch.equal(images, baseline)


def test_quantized_stack_history_counts_its_bytes(model):
    common = dict(schedule="interval", interval=3, warmup=0.0, targets=("stack",), forecast_order=2)
    _, _, full = run(model, DQARConfig(**common))
    _, _, int8 = run(model, DQARConfig(cache_bits=8, **common))
    assert int8["reuse_events"] == full["reuse_events"] > 0
    assert 0.25 <= int8["peak_cache_bytes"] / full["peak_cache_bytes"] < 0.3      # int8 codes + scales vs fp32


@pytest.mark.parametrize("name", ["pixart-sigma", "wan", "hunyuandit"])
def test_the_stack_on_single_chain_families(name):
    family, model, sched = ff.build(name)
    plain = ff.denoise(family, model, sched, steps=8)
    config = DQARConfig(schedule="interval", interval=2, warmup=0.0, targets=("stack",), forecast_order=1)
    ctl = apply_dqar(model, config, scheduler=sched)
    try:
        hooked = ff.denoise(family, model, sched, steps=8)
        s = ctl.summary()
    finally:
        remove_dqar(model)
    assert s["reuse_events"] > 0 and torch.isfinite(hooked).all()
    assert not torch.allclose(hooked, plain, atol=1e-5)
    assert torch.equal(ff.denoise(family, model, sched, steps=8), plain)


@pytest.mark.parametrize("name, why", [("flux", "runs two block lists"), ("sd3", "blocks return two streams")])
def test_two_stream_families_are_refused_clearly(name, why):
    family, model, sched = ff.build(name)
    with pytest.raises(ValueError, match=rf"targets=\('stack',\) cannot run on \w+: .*{why}.*use targets=\('block',\)"):
        apply_dqar(model, DQARConfig(schedule="interval", interval=2, targets=("stack",)), scheduler=sched)
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("kwargs, match", [
    (dict(targets=("stack", "attn")), r"'stack' caches the whole stack's residual"),
    (dict(targets=("stack",), schedule="static"), r"follows a schedule that decides per step: none, interval, adaptive"),
    (dict(targets=("stack",), schedule="policy"), r"schedule='policy' decides per layer"),
])
def test_bad_stack_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DQARConfig(**kwargs)
