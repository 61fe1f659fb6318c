"""diffusers models through dqar.models.hub: tiny DiT and PixArt pipelines saved to disk and loaded like a hub id."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dqar.models import hub
from dqar.sampling import to_uint8
from dqar.cli import main
from hub_fixtures import build_tiny_dit_pipeline, build_tiny_pixart_pipeline

PROMPTS = ["a photo of a cat", "red dog"]  # 5 + EOS and 2 + EOS tokens


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    return build_tiny_dit_pipeline(tmp_path_factory.mktemp("hub") / "tiny-dit")


@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory):
    return build_tiny_pixart_pipeline(tmp_path_factory.mktemp("hub") / "tiny-pixart")


@pytest.fixture(scope="module")
def dit_pipe(dit_folder):
    return hub.load_pipeline(str(dit_folder), sampler="ddim")


@pytest.fixture(scope="module")
def pixart_pipe(pixart_folder):
    return hub.load_pipeline(str(pixart_folder), sampler="dpm")


def test_spec_detection(dit_folder, tmp_path):
    assert hub.is_diffusers_spec(str(dit_folder))
    assert hub.is_diffusers_spec("facebook/DiT-XL-2-256")
    assert hub.is_diffusers_spec("PixArt-alpha/PixArt-XL-2-512x512")
    assert not hub.is_diffusers_spec("DiT-XL/2")  # our preset, not a hub id
    assert not hub.is_diffusers_spec("embedded")
    assert not hub.is_diffusers_spec("weights/model.safetensors")
    assert not hub.is_diffusers_spec(str(tmp_path))  # a folder without model_index.json
    with pytest.raises(hub.HubModelError, match="has no model_index.json"):
        hub.load_pipeline(str(tmp_path))


def test_unreachable_hub_id_says_offline_and_how_to_pass_a_folder(capsys):
    with pytest.raises(hub.HubModelError) as info:
        hub.load_pipeline("dqar-tests-nonexistent/no-such-model")
    message = str(info.value)
    assert "'dqar-tests-nonexistent/no-such-model' is not available offline" in message
    assert "save_pretrained(FOLDER)" in message and "--model FOLDER" in message
    rc = main(["sample", "--model", "dqar-tests-nonexistent/no-such-model", "--n", "1", "--schedule", "none"])
    assert rc == 2
    assert "is not available offline" in capsys.readouterr().err


def test_loading_sets_the_sampler_and_shapes(dit_pipe, pixart_pipe):
    assert type(dit_pipe.scheduler).__name__ == "DDIMScheduler"
    assert type(pixart_pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert dit_pipe.scheduler.config.beta_schedule == "linear"
    assert hub.pipeline_kind(dit_pipe) == "dit" and hub.pipeline_kind(pixart_pipe) == "pixart"
    assert hub.num_classes(dit_pipe) == 1000
    assert hub.image_shape(dit_pipe) == (16, 16, 3) and hub.image_shape(pixart_pipe) == (16, 16, 3)
    assert hub.prompt_lengths(pixart_pipe, PROMPTS) == [6, 3]


def test_dit_pipeline_per_sample_seeds(dit_pipe):
    imgs = hub.generate(dit_pipe, [5, 6], class_labels=[3, 4], steps=3, cfg_scale=1.5)
    assert imgs.shape == (2, 16, 16, 3) and imgs.dtype == torch.uint8
    # Exactly what the pipeline gives for one generator per image.
    ref = dit_pipe(class_labels=[3, 4], guidance_scale=1.5, num_inference_steps=3, output_type="pt",
                   generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)]).images
    assert torch.equal(imgs, to_uint8(ref, (0.0, 1.0)))
    # Image k depends only on its own seed and label, not on the rest of the batch.
    alone = hub.generate(dit_pipe, [6], class_labels=[4], steps=3, cfg_scale=1.5)
    assert torch.equal(alone[0], imgs[1])
    assert not torch.equal(imgs[0], imgs[1])
    with pytest.raises(hub.HubModelError, match="class label 1000 is outside"):
        hub.generate(dit_pipe, [0], class_labels=[1000], steps=1)
    with pytest.raises(hub.HubModelError, match="pass class labels, not prompts"):
        hub.generate(dit_pipe, [0], prompts=["a cat"], steps=1)


def test_pixart_pipeline_per_sample_seeds(pixart_pipe):
    imgs = hub.generate(pixart_pipe, [1, 2], prompts=PROMPTS, steps=3, cfg_scale=4.5)
    assert imgs.shape == (2, 16, 16, 3) and imgs.dtype == torch.uint8
    alone = hub.generate(pixart_pipe, [2], prompts=PROMPTS[1:], steps=3, cfg_scale=4.5)
    assert torch.equal(alone[0], imgs[1])
    other_prompt = hub.generate(pixart_pipe, [2], prompts=PROMPTS[:1], steps=3, cfg_scale=4.5)
    assert not torch.equal(other_prompt[0], imgs[1])  # the text conditions the image
    with pytest.raises(hub.HubModelError, match="text-conditional: pass prompts"):
        hub.generate(pixart_pipe, [0], class_labels=[1], steps=1)


def _reuse_everything():
    from dqar import DQARConfig

    return DQARConfig(schedule="static", warmup=0.0, layer_fraction=1.0)


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_dqar_under_diffusers_reuses_and_removal_restores(kind, dit_pipe, pixart_pipe):
    from dqar import apply_dqar, remove_dqar

    pipe = dit_pipe if kind == "dit" else pixart_pipe
    inputs = {"class_labels": [3, 4]} if kind == "dit" else {"prompts": PROMPTS}
    cfg = 1.5 if kind == "dit" else 4.5
    plain = hub.generate(pipe, [5, 6], steps=4, cfg_scale=cfg, **inputs)
    controller = apply_dqar(pipe, _reuse_everything())
    try:
        cached = hub.generate(pipe, [5, 6], steps=4, cfg_scale=cfg, controller=controller, **inputs)
        summary = controller.summary()
        if kind == "pixart":
            assert controller.step.prompt_length == 6  # the longest prompt of the batch, EOS included
    finally:
        remove_dqar(pipe)
    # Static schedule, 2 layers, 4 steps: floor(p * 2) layers at p = 0, 1/3, 2/3, 1 -> 0, 0, 1, 2 layers,
    # shallow first. `b` is what one reused (layer, step) counts (one per CFG branch).
    b = summary["events_per_step"][2]
    assert b > 0
    assert summary["events_per_step"] == [0, 0, b, 2 * b]
    assert summary["events_per_layer"] == [2 * b, b] and summary["reuse_events"] == 3 * b
    assert not torch.equal(cached, plain)  # the cache fired and changed pixels
    assert torch.equal(hub.generate(pipe, [5, 6], steps=4, cfg_scale=cfg, **inputs), plain)


def test_cli_samples_a_diffusers_dit_folder(dit_folder, dit_pipe, tmp_path, capsys):
    out = tmp_path / "dit"
    rc = main(["sample", "--model", str(dit_folder), "--classes", "3,4", "--n", "1", "--steps", "3",
               "--seed", "5", "--batch-size", "2", "--out", str(out), "--schedule", "none"])
    assert rc == 0, capsys.readouterr().err
    with np.load(out / "samples.npz") as data:
        arr = data["arr_0"]
    expected = hub.generate(dit_pipe, [5, 6], class_labels=[3, 4], steps=3, cfg_scale=1.5).numpy()
    np.testing.assert_array_equal(arr, expected)
    assert json.loads((out / "run.json").read_text())["identity"]["kind"] == "hub-dit"


def test_cli_samples_pixart_under_dqar(pixart_folder, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a photo of a cat\n\nred dog\n")
    out = tmp_path / "pixart"
    rc = main(["sample", "--model", str(pixart_folder), "--prompts-file", str(prompts_file), "--n", "1",
               "--steps", "3", "--sampler", "dpm", "--batch-size", "2", "--out", str(out),
               "--schedule", "static", "--warmup", "0", "--layers", "1"])
    assert rc == 0, capsys.readouterr().err
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape == (2, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    stats = json.loads((out / "reuse_stats.json").read_text())
    assert stats["reuse_events"] > 0 and stats["images"] == 2 and stats["batches"] == 1
    assert json.loads((out / "run.json").read_text())["identity"]["prompts"] == PROMPTS


def test_a_pipeline_with_nan_weights_is_refused_at_load_naming_component_and_tensor(dit_folder, tmp_path, capsys):
    import shutil

    from diffusers import DiTPipeline

    folder = tmp_path / "nan-dit"
    shutil.copytree(dit_folder, folder)
    pipe = DiTPipeline.from_pretrained(folder)
    with torch.no_grad():
        pipe.transformer.proj_out_2.weight[0, :4] = float("nan")
    pipe.save_pretrained(folder)
    with pytest.raises(hub.HubModelError, match=r"nan-dit.*transformer tensor 'proj_out_2\.weight' has 4 NaN or inf"):
        hub.load_pipeline(str(folder))
    rc = main(["sample", "--model", str(folder), "--classes", "3", "--steps", "2", "--out", str(tmp_path / "o"),
               "--schedule", "none"])
    err = capsys.readouterr().err
    # (diffusers' own logger may print a "Logging error" into a stream an earlier test's capture closed: only
    # our last line is ours)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("dqar sample: error: model") and "proj_out_2.weight" in last
    assert not (tmp_path / "o").exists()


def test_nan_images_from_a_pipeline_are_refused_not_written_black(dit_folder):
    pipe = hub.load_pipeline(str(dit_folder), sampler="ddim")
    with torch.no_grad():
        # Finite weights whose activations overflow: the weight check passes, the images are NaN.
        pipe.transformer.proj_out_2.weight.fill_(3e38)
        pipe.transformer.proj_out_2.bias.fill_(3e38)
    with pytest.raises(hub.HubModelError, match=r"produced NaN or inf values \(seeds 5\.\.6\)"):
        hub.generate(pipe, [5, 6], class_labels=[3, 4], steps=2, cfg_scale=1.5)


@pytest.fixture(scope="module")
def pixart_sigma_pipe(tmp_path_factory):
    folder = build_tiny_pixart_pipeline(tmp_path_factory.mktemp("hub") / "tiny-pixart-sigma", sigma=True)
    return hub.load_pipeline(str(folder), sampler="dpm")


def test_pixart_sigma_pipeline_under_dqar(pixart_sigma_pipe):
    from dqar import apply_dqar, remove_dqar

    pipe = pixart_sigma_pipe
    assert type(pipe).__name__ == "PixArtSigmaPipeline" and hub.pipeline_kind(pipe) == "pixart"
    plain = hub.generate(pipe, [5, 6], prompts=PROMPTS, steps=4, cfg_scale=4.5)
    controller = apply_dqar(pipe, _reuse_everything())
    try:
        cached = hub.generate(pipe, [5, 6], prompts=PROMPTS, steps=4, cfg_scale=4.5, controller=controller)
        again = hub.generate(pipe, [5, 6], prompts=PROMPTS, steps=4, cfg_scale=4.5, controller=controller)
        summary = controller.summary()
        assert controller.branches == ("uncond", "cond") and controller.step.prompt_length == 6
    finally:
        remove_dqar(pipe)
    assert summary["events_per_step"] == [0, 0, 2, 4] and summary["unmatched_timesteps"] == 0
    assert not torch.equal(cached, plain) and torch.equal(cached, again)
    assert torch.equal(hub.generate(pipe, [5, 6], prompts=PROMPTS, steps=4, cfg_scale=4.5), plain)
    with pytest.raises(hub.HubModelError, match="text-conditional: pass prompts"):
        hub.generate(pipe, [0], class_labels=[1], steps=1)
