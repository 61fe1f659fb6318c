"""DQAR inside diffusers pipelines (tiny DiT and PixArt built from config, loaded from disk like a hub id)."""
import numpy as np
import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.method.hooks import get_step_driver, get_controller

import hub_fixtures  # noqa: E402  (tests/ is on the path)


@pytest.fixture(scope="module")
def dit_pipe(tmp_path_factory):
    from diffusers import DiTPipeline

    folder = hub_fixtures.build_tiny_dit_pipeline(tmp_path_factory.mktemp("dit"))
    return DiTPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def pixart_pipe(tmp_path_factory):
    from diffusers import PixArtAlphaPipeline

    folder = hub_fixtures.build_tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart"))
    return PixArtAlphaPipeline.from_pretrained(folder)


def run_dit(pipe):
    return pipe(class_labels=[1, 2], num_inference_steps=8, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def run_pixart(pipe):
    return pipe("a photo of a cat", num_inference_steps=6, guidance_scale=4.5, height=16, width=16,
                generator=torch.Generator().manual_seed(0), output_type="np", max_sequence_length=16,
                use_resolution_binning=False).images


def test_dit_pipeline_fires_and_restores(dit_pipe):
    plain = run_dit(dit_pipe)
    ctl = apply_dqar(dit_pipe, DQARConfig(warmup=0.25, layer_fraction=1.0))
    try:
        hooked = run_dit(dit_pipe)
        s = ctl.summary()
        again = run_dit(dit_pipe)
    finally:
        remove_dqar(dit_pipe)
    # steps 0..7, p = i/7, floor((p - 0.25)/0.75 * 2) layers, 2 branches ([cond | uncond] detected)
    expected = [2 * max(0, int((i / 7 - 0.25) / 0.75 * 2 + 1e-9)) if i / 7 >= 0.25 else 0 for i in range(8)]
    assert s["events_per_step"] == expected and s["reuse_events"] > 0
    assert s["ideal_speedup"] > 1.0
    assert not np.array_equal(hooked, plain) and np.array_equal(hooked, again)
    assert np.array_equal(run_dit(dit_pipe), plain)
    assert get_controller(dit_pipe) is None


def test_dit_pipeline_without_reuse_is_identical(dit_pipe):
    plain = run_dit(dit_pipe)
    ctl = apply_dqar(dit_pipe, DQARConfig(warmup=1.0))
    try:
        out = run_dit(dit_pipe)
    finally:
        remove_dqar(dit_pipe)
    assert np.array_equal(out, plain) and ctl.summary()["reuse_events"] == 0


def test_dit_pipeline_branches_are_separate_and_kv_runs(dit_pipe):
    ctl = apply_dqar(dit_pipe, DQARConfig(warmup=0.0, layer_fraction=1.0))
    try:
        ctl.end_generation = lambda: None
        run_dit(dit_pipe)
        assert ctl.branches == ("cond", "uncond")
        cond = ctl.cache.get(0, "cond", "attn").output.dequantize()
        uncond = ctl.cache.get(0, "uncond", "attn").output.dequantize()
        assert not torch.equal(cond, uncond)
    finally:
        remove_dqar(dit_pipe)
    plain = run_dit(dit_pipe)
    ctl = apply_dqar(dit_pipe, DQARConfig(warmup=0.25, layer_fraction=1.0, mode="kv", record_entropy=True))
    try:
        kv = run_dit(dit_pipe)
        s = ctl.summary()
    finally:
        remove_dqar(dit_pipe)
    assert s["reuse_events"] > 0 and not np.array_equal(kv, plain)
    assert s["entropy_per_step"][0] is not None


def test_pixart_pipeline_fires_and_restores(pixart_pipe):
    plain = run_pixart(pixart_pipe)
    ctl = apply_dqar(pixart_pipe, DQARConfig(warmup=0.2, layer_fraction=1.0, targets=("attn", "mlp")))
    try:
        hooked = run_pixart(pixart_pipe)
        s = ctl.summary()
        assert ctl.branches == ("uncond", "cond")
    finally:
        remove_dqar(pixart_pipe)
    assert s["reuse_events"] > 0 and len(s["events_per_step"]) == 6
    assert not np.array_equal(hooked, plain)
    assert np.array_equal(run_pixart(pixart_pipe), plain)
    assert "encode_prompt" not in pixart_pipe.__dict__


def _forwards_on_instances(pipe):
    t = pipe.transformer
    return ["forward" in m.__dict__ for m in [t, *t.modules()]]


def test_dit_pipeline_schedule_none_is_identical_and_removal_leaves_no_forward(dit_pipe):
    plain = run_dit(dit_pipe)
    before = _forwards_on_instances(dit_pipe)
    ctl = apply_dqar(dit_pipe, DQARConfig(schedule="none", record_entropy=True))
    try:
        out = run_dit(dit_pipe)
        s = ctl.summary()
    finally:
        remove_dqar(dit_pipe)
    assert np.array_equal(out, plain) and s["reuse_events"] == 0
    assert s["entropy_per_step"][0] is not None            # hooked and measuring, yet no reuse
    assert _forwards_on_instances(dit_pipe) == before and not any(before)


def test_dit_pipeline_kv_mode_differs_from_output_mode(dit_pipe):
    outs = {}
    for mode in ("output", "kv"):
        ctl = apply_dqar(dit_pipe, DQARConfig(warmup=0.25, layer_fraction=1.0, mode=mode))
        try:
            outs[mode] = run_dit(dit_pipe)
            assert ctl.summary()["reuse_events"] > 0
        finally:
            remove_dqar(dit_pipe)
    assert not np.array_equal(outs["output"], outs["kv"])


def test_a_forward_set_before_dqar_survives_removal(dit_pipe):
    # accelerate's offload hooks, for one, live in the instance's own forward attribute.
    attn = dit_pipe.transformer.transformer_blocks[0].attn1
    calls = []
    own = lambda *a, **k: (calls.append(1), type(attn).forward(attn, *a, **k))[1]  # noqa: E731
    attn.forward = own
    try:
        apply_dqar(dit_pipe, DQARConfig(warmup=0.25, layer_fraction=1.0))
        remove_dqar(dit_pipe)
        assert attn.__dict__["forward"] is own
        run_dit(dit_pipe)
        assert calls
    finally:
        del attn.forward


def test_a_scheduler_swapped_after_apply_is_followed(dit_pipe):
    from diffusers import DDIMScheduler

    original = dit_pipe.scheduler
    original.set_timesteps(4)          # the stale scheduler now knows 4 of the 8 timesteps the new one makes
    ctl = apply_dqar(dit_pipe, DQARConfig(warmup=0.25, layer_fraction=1.0))
    try:
        dit_pipe.scheduler = DDIMScheduler.from_config(original.config)
        run_dit(dit_pipe)
        s = ctl.summary()
        assert ctl.step.total_steps == 8 and len(s["events_per_step"]) == 8
        # steps 0..7, p = i/7: floor((p - 0.25)/0.75 * 2) layers x 2 branches, as with the original scheduler
        assert s["events_per_step"] == [0, 0, 0, 0, 0, 2, 2, 4]
    finally:
        remove_dqar(dit_pipe)
        dit_pipe.scheduler = original


def test_a_bare_transformer_needs_its_scheduler(dit_pipe):
    with pytest.raises(ValueError, match="scheduler="):
        apply_dqar(dit_pipe.transformer, DQARConfig())
    ctl = apply_dqar(dit_pipe.transformer, DQARConfig(warmup=0.25, layer_fraction=1.0),
                     scheduler=dit_pipe.scheduler)
    try:
        run_dit(dit_pipe)        # the pipeline calls the hooked transformer as usual
        assert ctl.summary()["reuse_events"] > 0
    finally:
        remove_dqar(dit_pipe.transformer)


def test_pixart_cfg_sharing_works_in_uncond_cond_order(pixart_pipe):
    plain = run_pixart(pixart_pipe)
    attn = pixart_pipe.transformer.transformer_blocks[0].attn1
    ctl = apply_dqar(pixart_pipe, DQARConfig(warmup=0.2, layer_fraction=0.01, cfg_sharing=True,
                                             cfg_sharing_eps=10.0))
    calls = []                     # (full input, what was computed on, output) per call of block 0's attention
    hook = attn.forward
    inner = hook._compute
    hook._compute = lambda *a, **k: (calls[-1].append(a[1]), inner(*a, **k))[1]   # a[0]: branch count
    pre = attn.register_forward_pre_hook(lambda m, args: calls.append([args[0]]))
    post = attn.register_forward_hook(lambda m, args, out: calls[-1].append(out))
    try:
        shared = run_pixart(pixart_pipe)
        s = ctl.summary()
    finally:
        pre.remove()
        post.remove()
        remove_dqar(pixart_pipe)
    assert s["share_events"] > 0 and s["reuse_events"] == s["share_events"]
    assert not np.array_equal(shared, plain)
    shared_calls = [c for c in calls if c[1].shape[0] * 2 == c[0].shape[0]]
    assert shared_calls
    for full, computed, out in shared_calls:
        n = full.shape[0]
        assert torch.equal(computed, full[n // 2:])          # PixArt is [uncond | cond]: cond is the second half
        assert torch.equal(out[: n // 2], out[n // 2:])


def test_the_prompt_length_moves_the_gate_threshold(pixart_pipe):
    # tau(p_len) = tau0 * sqrt(p_len / 64). With tau0 just above the largest entropy measured, a 64-token
    # prompt passes the gate everywhere while the real prompt (a few tokens) is held to about a third.
    from dqar.models import hub

    ctl = apply_dqar(pixart_pipe, DQARConfig(schedule="none", record_entropy=True))
    try:
        run_pixart(pixart_pipe)
        entropies = [e for e in ctl.summary()["entropy_per_step"] if e is not None]
        seen_length = ctl.step.prompt_length
    finally:
        remove_dqar(pixart_pipe)
    assert seen_length == hub.prompt_lengths(pixart_pipe, ["a photo of a cat"], 16)[0] > 1
    cfg = DQARConfig(schedule="gate", warmup=0.0, tau0=1.05 * max(entropies), snr_range=(0.0, 1e12))
    events = {}
    for forced in (None, 64):
        ctl = apply_dqar(pixart_pipe, cfg)
        driver = get_step_driver(pixart_pipe)
        if forced is not None:
            # Whatever the pipeline's prompt encoding announces, the driver keeps the forced length.
            driver.announce = lambda prompt_length=None, _announce=driver.announce, **kw: _announce(
                prompt_length=forced if prompt_length is not None else None, **kw)
        try:
            run_pixart(pixart_pipe)
            events[forced] = (ctl.step.prompt_length, ctl.summary()["reuse_events"])
        finally:
            remove_dqar(pixart_pipe)
    assert events[None][0] == seen_length and events[64][0] == 64
    assert events[64][1] > events[None][1]
