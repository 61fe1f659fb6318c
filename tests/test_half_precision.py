"""Half precision and torch.compile: the shipped digits model in bf16/fp16 through sample() under DQAR, cache
bytes in the model's own dtype, and a compiled hooked model that neither recompiles per step nor drifts."""
import copy

import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar, sample
from dqar.digits.embedded import load_embedded_model

ff = pytest.importorskip("family_fixtures")

LABELS, SEEDS = [1, 2], [0, 1]
REUSE_ALL = dict(schedule="static", warmup=0.0, layer_fraction=1.0)


@pytest.fixture(scope="module")
def model():
    return load_embedded_model().eval()


def _run(model, steps=6, **kw):
    return sample(model, LABELS, SEEDS, steps=steps, cfg_scale=2.0, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sample_feeds_a_half_precision_model_its_own_dtype(model, dtype):
    reference = _run(model)
    half = copy.deepcopy(model).to(dtype)
    plain = _run(half)
    assert plain.dtype == torch.float32 and torch.isfinite(plain).all()
    # bf16 keeps 8 significant bits, fp16 11: the images stay close to float32's
    assert (plain - reference).abs().max() < (0.15 if dtype == torch.bfloat16 else 0.02)
    peak = {}
    for bits in (16, 8):
        ctl = apply_dqar(half, DQARConfig(cache_bits=bits, **REUSE_ALL))
        try:
            out = _run(half)
            s = ctl.summary()
        finally:
            remove_dqar(half)
        assert s["reuse_events"] > 0 and torch.isfinite(out).all() and not torch.equal(out, plain)
        peak[bits] = s["peak_cache_bytes"]
    ctl = apply_dqar(model, DQARConfig(cache_bits=16, **REUSE_ALL))
    try:
        _run(model)
        fp32_bytes = ctl.summary()["peak_cache_bytes"]
    finally:
        remove_dqar(model)
    # a 16-bit cache keeps the model's own dtype: half of float32's; INT8 is about half of that (+ scales)
    assert peak[16] * 2 == fp32_bytes
    assert 0.5 * peak[16] <= peak[8] < 0.55 * peak[16]
    assert torch.equal(_run(half), plain)


def test_a_model_with_mixed_dtypes_is_refused(model):
    mixed = copy.deepcopy(model)
    mixed.blocks[0].to(torch.bfloat16)
    with pytest.raises(TypeError, match="mix dtypes.*cast it to one"):
        _run(mixed, steps=2)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_diffusers_families_in_bfloat16(name):
    family, transformer, sched = ff.build(name)
    transformer.to(torch.bfloat16)
    plain = ff.denoise(family, transformer, sched, dtype=torch.bfloat16)
    ctl = apply_dqar(transformer, DQARConfig(cache_bits=8, forecast_order=1, schedule="interval", interval=2,
                                             warmup=0.0, layer_fraction=1.0), scheduler=sched)
    try:
        out = ff.denoise(family, transformer, sched, dtype=torch.bfloat16)
        s = ctl.summary()
    finally:
        remove_dqar(transformer)
    # the bf16 timestep (t / 1000 for Flux) still finds its step
    assert s["unmatched_timesteps"] == 0 and s["reuse_events"] > 0
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and not torch.equal(out, plain)


@pytest.mark.parametrize("error_images", [0, 1])
@pytest.mark.parametrize("targets, bits", [(("attn", "mlp"), 8), (("block",), 16)])
def test_adaptive_error_control_in_bfloat16(model, error_images, targets, bits):
    """The measured errors (stacked at the step's end for a sample of images) work on a bf16 model with a bf16
    or INT8 history: reuse happens, every error is finite, and images stay finite."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    config = DQARConfig(schedule="adaptive", tolerance=2.0, max_age=4, warmup=0.0, targets=targets,
                        forecast_order=2, cache_bits=bits, error_images=error_images)
    ctl = apply_dqar(half, config)
    try:
        out = _run(half, steps=10)
        s, errors = ctl.summary(), [e[-1] for e in ctl.error_control.errors]
    finally:
        remove_dqar(half)
    assert s["reuse_events"] > 0 and torch.isfinite(out).all()
    assert errors and all(e == e and e < float("inf") for e in errors)


def test_flux_adaptive_with_sampled_errors_in_bfloat16():
    family, transformer, sched = ff.build("flux")
    transformer.to(torch.bfloat16)
    ctl = apply_dqar(transformer, DQARConfig(schedule="adaptive", tolerance=0.5, max_age=3, warmup=0.0,
                                             targets=("attn", "mlp"), forecast_order=1, error_images=1),
                     scheduler=sched)
    try:
        out = ff.denoise(family, transformer, sched, dtype=torch.bfloat16)
        s = ctl.summary()
    finally:
        remove_dqar(transformer)
    assert s["forecast_error"]["measured"] > 0 and torch.isfinite(out).all()


def _graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_model_after_apply_dqar_matches_eager_without_per_step_recompiles(model):
    """torch.compile (backend aot_eager, CPU) of the hooked model: the images equal eager's within 1e-5 (measured:
    identical), and the number of graphs does not grow with the number of steps or across generations: the
    per-step decisions run outside the compiled graphs (torch.compiler.disable on the hooks)."""
    import torch._dynamo

    hooked = copy.deepcopy(model)
    ctl = apply_dqar(hooked, DQARConfig(**REUSE_ALL))
    try:
        eager = {steps: _run(hooked, steps) for steps in (4, 8)}
        torch._dynamo.reset()
        compiled = torch.compile(hooked, backend="aot_eager")
        denoiser = lambda x, t, y: compiled(x, t, y)  # noqa: E731
        out4 = _run(hooked, 4, denoiser=denoiser)
        after_first = _graphs()
        out8 = _run(hooked, 8, denoiser=denoiser)
        reuse = ctl.summary()["reuse_events"]
        again = _run(hooked, 8, denoiser=denoiser)
        after_all = _graphs()
    finally:
        remove_dqar(hooked)
        torch._dynamo.reset()
    assert reuse > 0
    assert (out4 - eager[4]).abs().max() <= 1e-5 and (out8 - eager[8]).abs().max() <= 1e-5
    assert torch.equal(out8, again)
    assert after_first <= 16 and after_all == after_first
