"""DQAR inside diffusers pipelines (tiny DiT and PixArt built from config, loaded from disk like a hub id)."""
import numpy as np
import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.hooks import get_controller

hub_fixtures = pytest.importorskip("hub_fixtures")


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
