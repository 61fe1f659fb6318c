"""Model CPU offload with DQAR applied, on CPU: diffusers' enable_model_cpu_offload needs an accelerator, so the
same accelerate hook it installs per component (cpu_offload_with_hook) is installed here with the CPU as the
execution device; what is tested is how its forward wrapper and DQAR's compose."""
from __future__ import annotations

import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.models import hub

accelerate = pytest.importorskip("accelerate")
pf = pytest.importorskip("pipeline_fixtures")

REUSE = DQARConfig(schedule="static", warmup=0.0, layer_fraction=1.0)
KW = dict(prompts=["a photo of a cat"], steps=3, cfg_scale=4.0, max_sequence_length=8)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = pf.build_tiny_sd3_pipeline(tmp_path_factory.mktemp("offload") / "sd3")
    pipe = hub.load_pipeline(str(folder))
    plain = hub.generate(pipe, [1], **KW)
    ctl = apply_dqar(pipe, REUSE)
    try:
        cached = hub.generate(pipe, [1], controller=ctl, **KW)
    finally:
        remove_dqar(pipe)
    return folder, plain, cached


def _offload(pipe):
    _, hook = accelerate.cpu_offload_with_hook(pipe.transformer, execution_device=torch.device("cpu"))
    return hook


def test_dqar_applied_after_offload_reuses_and_removal_keeps_the_offload_hook(reference):
    folder, plain, cached = reference
    pipe = hub.load_pipeline(str(folder))
    _offload(pipe)
    wrapper = pipe.transformer.__dict__["forward"]
    ctl = apply_dqar(pipe, REUSE)
    try:
        images = hub.generate(pipe, [1], controller=ctl, **KW)
        assert ctl.summary()["reuse_events"] > 0
    finally:
        remove_dqar(pipe)
    assert torch.equal(images, cached)
    assert pipe.transformer.__dict__["forward"] is wrapper          # accelerate's wrapper is back in place
    assert torch.equal(hub.generate(pipe, [1], **KW), plain)


def test_offload_added_after_dqar_survives_remove_dqar(reference):
    folder, plain, cached = reference
    pipe = hub.load_pipeline(str(folder))
    ctl = apply_dqar(pipe, REUSE)
    _offload(pipe)
    try:
        assert torch.equal(hub.generate(pipe, [1], controller=ctl, **KW), cached)
    finally:
        remove_dqar(pipe)
    assert hasattr(pipe.transformer, "_hf_hook") and "forward" in pipe.transformer.__dict__
    assert torch.equal(hub.generate(pipe, [1], **KW), plain)                 # offloaded, unhooked: plain images
    accelerate.hooks.remove_hook_from_module(pipe.transformer)
    assert torch.equal(hub.generate(pipe, [1], **KW), plain)


def test_an_unknown_wrapper_on_top_leaves_the_hook_inert_with_a_warning(reference):
    folder, plain, _ = reference
    pipe = hub.load_pipeline(str(folder))
    apply_dqar(pipe, REUSE)
    hooked = pipe.transformer.forward
    pipe.transformer.forward = lambda *a, **k: hooked(*a, **k)
    with pytest.warns(RuntimeWarning, match="wrapped again after apply_dqar"):
        remove_dqar(pipe)
    assert torch.equal(hub.generate(pipe, [1], **KW), plain)
