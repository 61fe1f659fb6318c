"""DQAR on every supported diffusers family: tiny random transformers through their real scheduler's loop."""
import warnings

import numpy as np
import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.method.hooks import get_step_driver
from dqar.method.layouts import find_layout
from dqar.method.streams import BlockStreams, OutputForm

ff = pytest.importorskip("family_fixtures")

REUSE_ALL = dict(schedule="static", warmup=0.0, layer_fraction=1.0)


def _no_instance_forwards(model):
    return not any("forward" in m.__dict__ for m in [model, *model.modules()])


@pytest.mark.parametrize("name", sorted(ff.FAMILIES))
@pytest.mark.parametrize("targets", [("attn", "mlp"), ("block",)])
def test_family_reuses_changes_repeats_and_restores(name, targets):
    family, model, sched = ff.build(name)
    plain = ff.denoise(family, model, sched)
    assert torch.isfinite(plain).all()
    ctl = apply_dqar(model, DQARConfig(targets=targets, **REUSE_ALL), scheduler=sched)
    try:
        hooked = ff.denoise(family, model, sched)
        s = ctl.summary()
        again = ff.denoise(family, model, sched)
    finally:
        remove_dqar(model)
    layers = len(find_layout(model).blocks(model))
    assert s["num_layers"] == layers and s["unmatched_timesteps"] == 0
    # static, 6 steps: floor(p * L) layers reuse at p = i / 5; every step was found from the scheduler
    assert len(s["events_per_step"]) == 6 and s["events_per_step"][0] == 0 and s["reuse_events"] > 0
    assert not torch.allclose(hooked, plain, atol=1e-4)
    assert torch.equal(hooked, again)
    assert torch.equal(ff.denoise(family, model, sched), plain) and _no_instance_forwards(model)


@pytest.mark.parametrize("name", ["sd3", "flux", "sana", "wan"])
def test_flow_matching_snr_is_one_minus_sigma_over_sigma_squared(name):
    family, model, sched = ff.build(name)
    ctl = apply_dqar(model, DQARConfig(schedule="none"), scheduler=sched)
    try:
        ff.denoise(family, model, sched, steps=5)
        snr = ctl.summary()["snr_per_step"]
        x0_snr = ctl.summary()["x0_snr_per_step"]
    finally:
        remove_dqar(model)
    sigmas = [float(s) for s in sched.sigmas[:5]]
    assert snr == pytest.approx([((1 - s) / s) ** 2 for s in sigmas], rel=1e-6)
    assert all(v is not None and np.isfinite(v) for v in x0_snr)


def test_flux_single_blocks_have_attention_but_no_mlp_target():
    family, model, sched = ff.build("flux")
    ctl = apply_dqar(model, DQARConfig(targets=("attn", "mlp"), **REUSE_ALL), scheduler=sched)
    try:
        hooked = [m for m in model.modules() if "forward" in m.__dict__]
        ctl.end_generation = lambda: None          # keep the cache to look at it
        ff.denoise(family, model, sched)
        double_mlp, single_mlp = ctl.cache.get(0, "cond", "mlp"), ctl.cache.get(2, "cond", "mlp")
        single_attn = ctl.cache.get(2, "cond", "attn")
    finally:
        remove_dqar(model)
    # root + 2 double blocks x (attn, ff) + 2 single blocks x attn
    assert len(hooked) == 1 + 4 + 2
    assert double_mlp is not None and single_mlp is None and single_attn is not None
    # the single block's attention runs over text (5) + image (16) tokens
    assert single_attn.output.dequantize().shape == (2, 21, 16)


@pytest.mark.parametrize("name", ["flux", "sd3", "cogvideox"])
def test_the_block_target_caches_both_streams(name):
    family, model, sched = ff.build(name)
    ctl = apply_dqar(model, DQARConfig(targets=("block",), **REUSE_ALL), scheduler=sched)
    block = find_layout(model).blocks(model)[0]
    seen = []
    handle = block.register_forward_hook(lambda m, args, kwargs, out: seen.append((kwargs, out)), with_kwargs=True)
    try:
        ctl.end_generation = lambda: None
        ff.denoise(family, model, sched)
        entry = ctl.cache.get(0, "cond", "block")
    finally:
        handle.remove()
        remove_dqar(model)
    text, image = seen[0][0]["encoder_hidden_states"], seen[0][0]["hidden_states"]
    assert entry.output.dequantize().shape[1] == text.shape[1] + image.shape[1]
    # at the last step block 0 was reused: both of its streams are the inputs plus the stored residuals
    kwargs, out = seen[-1]
    names = ("hidden_states", "encoder_hidden_states") if name == "cogvideox" else (
        "encoder_hidden_states", "hidden_states")
    residual = OutputForm(out).unpack(entry.output.dequantize())
    for stream, r, got in zip(names, residual, out):
        assert torch.equal(got, kwargs[stream] + r)


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("targets", [("attn", "mlp"), ("block",)])
def test_forecasting_on_flux(order, targets):
    family, model, sched = ff.build("flux")
    plain = ff.denoise(family, model, sched, steps=8)
    cfg = DQARConfig(schedule="interval", interval=2, warmup=0.0, layer_fraction=1.0, targets=targets,
                     forecast_order=order)
    ctl = apply_dqar(model, cfg, scheduler=sched)
    try:
        out = ff.denoise(family, model, sched, steps=8)
        s = ctl.summary()
    finally:
        remove_dqar(model)
    assert s["reuse_events"] > 0 and torch.isfinite(out).all() and not torch.equal(out, plain)


def test_forecast_orders_differ_on_sd3():
    family, model, sched = ff.build("sd3")
    outs = []
    for order in (0, 1, 2):
        cfg = DQARConfig(schedule="interval", interval=2, warmup=0.0, layer_fraction=1.0, forecast_order=order)
        apply_dqar(model, cfg, scheduler=sched)
        try:
            outs.append(ff.denoise(family, model, sched, steps=8))
        finally:
            remove_dqar(model)
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_quantized_cache_on_joint_attention(name):
    family, model, sched = ff.build(name)
    result = {}
    for bits in (16, 8):
        ctl = apply_dqar(model, DQARConfig(cache_bits=bits, **REUSE_ALL), scheduler=sched)
        try:
            out = ff.denoise(family, model, sched)
            result[bits] = (out, ctl.summary())
        finally:
            remove_dqar(model)
    (o16, s16), (o8, s8) = result[16], result[8]
    assert s8["reuse_events"] == s16["reuse_events"] > 0 and torch.isfinite(o8).all()
    assert s8["peak_cache_bytes"] < 0.5 * s16["peak_cache_bytes"]
    assert torch.allclose(o8, o16, atol=0.5) and not torch.equal(o8, o16)


def test_sd3_cfg_branches_are_cached_separately():
    family, model, sched = ff.build("sd3")
    ctl = apply_dqar(model, DQARConfig(**REUSE_ALL), scheduler=sched)
    try:
        get_step_driver(model).announce(branches=("uncond", "cond"))
        ctl.end_generation = lambda: None
        hooked = ff.denoise(family, model, sched, cfg=True)
        assert ctl.branches == ("uncond", "cond")
        cond = ctl.cache.get(0, "cond", "attn").output.dequantize()
        uncond = ctl.cache.get(0, "uncond", "attn").output.dequantize()
        s = ctl.summary()
    finally:
        remove_dqar(model)
    assert cond.shape[0] == uncond.shape[0] == 2 and not torch.equal(cond, uncond)
    assert s["reuse_events"] > 0 and torch.isfinite(hooked).all()
    # reuse per branch: each reused (layer, step) counts once per branch
    assert all(e % 2 == 0 for e in s["events_per_step"])


@torch.no_grad()
def _true_cfg(family, models, sched, steps=4, scale=3.0):
    """Flux's true-CFG loop: per step the prompt's call, then the negative prompt's (zeroed text), as two calls;
    `models` = (cond_model, uncond_model), the same model twice or two copies."""
    sched.set_timesteps(steps)
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = family.conditioning(2)
    neg = {**cond, "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])}
    for t in sched.timesteps:
        t_in = (t / 1000).expand(2)
        c = models[0](hidden_states=x, timestep=t_in, return_dict=False, **cond)[0]
        u = models[1](hidden_states=x, timestep=t_in, return_dict=False, **neg)[0]
        x = sched.step(u + scale * (c - u), t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("name", ["flux", "wan"])
def test_separate_cfg_calls_are_separate_branches_with_reuse(name):
    # Flux's true CFG and Wan call the transformer once for the prompt and once for the negative prompt at each
    # step: each call is its own branch, with its own cache, planned by the same schedule rules.
    import copy

    family, model, sched = ff.build(name)
    plain = _run_separate(family, (model, model), sched, name)
    ctl = apply_dqar(model, DQARConfig(**REUSE_ALL), scheduler=sched)
    try:
        hooked = _run_separate(family, (model, model), sched, name)
        s = ctl.summary()
        branches = {b for (_, b, _) in ctl.cache.entries}
        again = _run_separate(family, (model, model), sched, name)
    finally:
        remove_dqar(model)
    assert s["unmatched_timesteps"] == 0 and len(s["events_per_step"]) == 4 and s["reuse_events"] > 0
    assert branches == {"cond", "uncond"} and ctl.active is False    # the generation ended after the last call
    assert not torch.equal(hooked, plain) and torch.equal(hooked, again)
    assert torch.equal(_run_separate(family, (model, model), sched, name), plain) and _no_instance_forwards(model)
    # Never mixed: exactly what two hooked copies give, one seeing only the prompt's calls, one only the negative's.
    copies = [copy.deepcopy(model) for _ in range(2)]
    ctls = [apply_dqar(m, DQARConfig(**REUSE_ALL), scheduler=sched) for m in copies]
    split = _run_separate(family, copies, sched, name)
    assert torch.equal(split, hooked)
    # Each call reused as often as a model that sees it alone: the second call did not run uncached.
    assert s["reuse_events"] == sum(c.summary()["reuse_events"] for c in ctls)


def _run_separate(family, models, sched, name):
    if name == "flux":
        return _true_cfg(family, models, sched)
    sched.set_timesteps(4)
    x = torch.randn((1, *family.latent_shape), generator=torch.Generator().manual_seed(0))
    cond = family.conditioning(1)
    neg = {"encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"])}
    with torch.no_grad():
        for t in sched.timesteps:
            c = models[0](hidden_states=x, timestep=t.expand(1), return_dict=False, **cond)[0]
            u = models[1](hidden_states=x, timestep=t.expand(1), return_dict=False, **neg)[0]
            x = sched.step(u + 4.0 * (c - u), t, x, return_dict=False)[0]
    return x


def test_a_second_call_with_both_halves_batched_runs_uncached():
    # A call at a step whose batch already held both CFG halves matches no branch of its own: no reuse, no store.
    family, model, sched = ff.build("sd3")
    ctl = apply_dqar(model, DQARConfig(**REUSE_ALL), scheduler=sched)
    sched.set_timesteps(4)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = family.conditioning(4)
    try:
        get_step_driver(model).announce(branches=("uncond", "cond"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = []
            for t in sched.timesteps:
                first = model(hidden_states=x, timestep=t.expand(4), return_dict=False, **cond)[0]
                events = ctl.reuse_events
                second = model(hidden_states=x, timestep=t.expand(4), return_dict=False, **cond)[0]
                assert ctl.reuse_events == events       # the second call reused nothing
                outs.append((first, second))
        s = ctl.summary()
    finally:
        remove_dqar(model)
    with torch.no_grad():
        uncached = model(hidden_states=x, timestep=sched.timesteps[-1].expand(4), return_dict=False, **cond)[0]
    assert s["unmatched_timesteps"] == 4 and s["reuse_events"] > 0 and torch.equal(outs[-1][1], uncached)
    assert any("second time at step" in str(w.message) for w in caught)


def test_bad_input_is_refused_clearly():
    family, model, sched = ff.build("sd3")
    with pytest.raises(ValueError, match="mode='kv' needs plain self-attention.*SD3Transformer2DModel"):
        apply_dqar(model, DQARConfig(mode="kv"), scheduler=sched)
    with pytest.raises(ValueError, match="needs the scheduler"):
        apply_dqar(model, DQARConfig())
    with pytest.raises(TypeError, match="no block layout for Linear; supported: .*FluxTransformer2DModel"):
        apply_dqar(torch.nn.Linear(2, 2), DQARConfig())
    with pytest.raises(TypeError, match="compiled SD3Transformer2DModel.*apply DQAR to the plain model first"):
        apply_dqar(torch.compile(model), DQARConfig(), scheduler=sched)
    assert _no_instance_forwards(model)


def test_entropy_is_unavailable_on_joint_attention_not_wrong():
    family, model, sched = ff.build("sd3")
    ctl = apply_dqar(model, DQARConfig(schedule="none", record_entropy=True), scheduler=sched)
    try:
        with pytest.warns(RuntimeWarning, match="entropy cannot be measured"):
            ff.denoise(family, model, sched, steps=2)
        s = ctl.summary()
    finally:
        remove_dqar(model)
    assert s["entropy_unavailable"] > 0 and s["entropy_per_step"] == [None, None]


def test_output_form_packs_tuples_with_none_and_round_trips():
    a, b = torch.randn(2, 5, 4), torch.randn(2, 3, 4)
    form = OutputForm((None, a, b))
    packed = form.pack((None, a, b))
    assert packed.shape == (2, 8, 4)
    none, a2, b2 = form.unpack(packed)
    assert none is None and torch.equal(a2, a) and torch.equal(b2, b)
    c = torch.randn(2, 3, 7)                       # different widths pack flat
    form = OutputForm((a, c))
    assert form.pack((a, c)).shape == (2, 1, 41)
    assert all(torch.equal(x, y) for x, y in zip(form.unpack(form.pack((a, c))), (a, c)))
    single = torch.randn(2, 3)
    assert OutputForm(single).pack(single) is single
    with pytest.raises(TypeError, match="tensors or tuples of tensors"):
        OutputForm((a, "text"))


def test_block_streams_add_inverts_residual():
    class Block(torch.nn.Module):
        def forward(self, hidden_states, encoder_hidden_states, temb=None):
            return encoder_hidden_states * 2, hidden_states + 1

    block = Block()
    h, e = torch.randn(2, 4, 3), torch.randn(2, 2, 3)
    streams = BlockStreams(block, ("encoder_hidden_states", "hidden_states"))
    out = block(h, encoder_hidden_states=e)
    r = streams.residual(out, (h,), {"encoder_hidden_states": e})
    assert torch.equal(r[0], out[0] - e) and torch.equal(r[1], out[1] - h)
    back = streams.add(r, (h,), {"encoder_hidden_states": e})
    assert torch.allclose(back[0], out[0]) and torch.allclose(back[1], out[1])
    with pytest.raises(TypeError, match="Block returns a tuple of 2"):
        BlockStreams(block, None).residual(out, (h,), {"encoder_hidden_states": e})


def test_compiled_flux_after_apply_dqar_matches_eager_without_per_step_recompiles():
    """torch.compile (aot_eager, CPU) of a hooked Flux: identical latents to eager (tolerance 1e-5; measured 0),
    and a second generation of a different length compiles no new graph (measured: 9 graphs)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    family, model, sched = ff.build("flux")
    ctl = apply_dqar(model, DQARConfig(**REUSE_ALL), scheduler=sched)
    try:
        eager = ff.denoise(family, model, sched)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")
        out = ff.denoise(family, compiled, sched)
        reuse = ctl.summary()["reuse_events"]
        graphs = counters["stats"]["unique_graphs"]
        ff.denoise(family, compiled, sched, steps=8)
        assert counters["stats"]["unique_graphs"] == graphs <= 16
    finally:
        remove_dqar(model)
        torch._dynamo.reset()
    assert reuse > 0 and (out - eager).abs().max() <= 1e-5
