"""SD3, Flux, Sana and HunyuanDiT pipelines assembled from tiny local parts, saved to a folder and run through
`dqar sample` (the CLI in-process) and `dqar.models.hub` the way a hub id runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.cli import main
from dqar.method.hooks import get_step_driver
from dqar.models import hub
from hub_fixtures import build_tiny_pixart_pipeline

pf = pytest.importorskip("pipeline_fixtures")

PROMPTS = ["a photo of a cat", "red dog"]
REUSE = ["--schedule", "static", "--warmup", "0", "--layers", "1"]
# Per family: its builder and the options a tiny model needs (short text, Flux's size, video frames).
FAMILIES = {
    "sd3": (pf.build_tiny_sd3_pipeline, ["--max-sequence-length", "8"]),
    "flux": (pf.build_tiny_flux_pipeline, ["--height", "16", "--width", "16", "--max-sequence-length", "8"]),
    # FLUX.1-schnell's shape: no guidance embedding.
    "flux-schnell": (lambda folder: pf.build_tiny_flux_pipeline(folder, guidance=False),
                     ["--height", "16", "--width", "16", "--max-sequence-length", "8"]),
    "pixart-sigma": (lambda folder: build_tiny_pixart_pipeline(folder, sigma=True), ["--max-sequence-length", "8"]),
    "sana": (pf.build_tiny_sana_pipeline, ["--max-sequence-length", "8"]),
    "hunyuandit": (pf.build_tiny_hunyuandit_pipeline, []),
    # Video: each sample is one image of its 9 frames side by side.
    "cogvideox": (pf.build_tiny_cogvideox_pipeline,
                  ["--height", "16", "--width", "16", "--num-frames", "9", "--max-sequence-length", "8"]),
    "ltx": (pf.build_tiny_ltx_pipeline,
            ["--height", "32", "--width", "32", "--num-frames", "9", "--max-sequence-length", "8"]),
}
# (height, width) of a sample as written: Sana's sizes are multiples of 32; a video is a filmstrip of 9 frames.
SHAPES = {"sana": (32, 32), "cogvideox": (16, 9 * 16), "ltx": (32, 9 * 32)}
CLASS_NAMES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "flux-schnell": "FluxPipeline",
               "sana": "SanaPipeline", "hunyuandit": "HunyuanDiTPipeline", "pixart-sigma": "PixArtSigmaPipeline",
               "cogvideox": "CogVideoXPipeline", "ltx": "LTXPipeline"}


def _keywords(options: list) -> dict:
    """['--max-sequence-length', '8', ...] -> {'max_sequence_length': 8, ...} for hub.generate."""
    return {k[2:].replace("-", "_"): int(v) for k, v in zip(options[::2], options[1::2])}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {name: build(root / name) for name, (build, _) in FAMILIES.items()}


def _sample(folder, out, *extra):
    rc = main(["sample", "--model", str(folder), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--n", "1",
               "--steps", "4", "--seed", "3", "--batch-size", "2", "--out", str(out), "--no-progress", *extra])
    assert rc == 0
    with np.load(out / "samples.npz") as data:
        images = data["arr_0"]
    stats_file = out / "reuse_stats.json"
    return images, (json.loads(stats_file.read_text()) if stats_file.exists() else None)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cli_samples_the_pipeline_reuse_fires_and_repeats(name, folders, tmp_path, capsys):
    folder, options = folders[name], FAMILIES[name][1]
    plain, none_stats = _sample(folder, tmp_path / "none", "--schedule", "none", *options)
    cached, stats = _sample(folder, tmp_path / "dqar", *REUSE, *options)
    again, _ = _sample(folder, tmp_path / "again", *REUSE, *options)
    assert plain.shape == (2, *SHAPES.get(name, (16, 16)), 3) and plain.dtype == np.uint8 and none_stats is None
    assert stats["reuse_events"] > 0 and stats["unmatched_timesteps"] == 0 and stats["images"] == 2
    assert not np.array_equal(cached, plain)          # reuse changed pixels
    np.testing.assert_array_equal(cached, again)      # nothing survived from the first run into the second
    identity = json.loads((tmp_path / "dqar" / "run.json").read_text())["identity"]
    # PixArt keeps its kind and DDIM default from before the other families came
    expected = ("pixart", "ddim") if name == "pixart-sigma" else ("text", "pipeline")
    assert (identity["kind"], identity["sampler"]) == expected and identity["prompts"] == PROMPTS


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hub_generate_per_image_seeds_and_remove_restores(name, folders):
    pipe = hub.load_pipeline(str(folders[name]))
    assert type(pipe).__name__ == CLASS_NAMES[name]
    assert hub.pipeline_kind(pipe) == ("pixart" if name == "pixart-sigma" else "text")
    kw = _keywords(FAMILIES[name][1])
    plain = hub.generate(pipe, [3, 4], prompts=PROMPTS, steps=3, cfg_scale=4.0, **kw)
    alone = hub.generate(pipe, [4], prompts=PROMPTS[1:], steps=3, cfg_scale=4.0, **kw)
    # Image k depends on its own seed and prompt only; LTX's VAE sums in another order at batch 1, which moves a
    # few thousandths of a percent of its pixels by one grey level.
    diff = int((alone[0].int() - plain[1].int()).abs().max())
    assert diff == 0 or (name == "ltx" and diff == 1)
    ctl = apply_dqar(pipe, DQARConfig(schedule="static", warmup=0.0, layer_fraction=1.0))
    try:
        cached = hub.generate(pipe, [3, 4], prompts=PROMPTS, steps=3, cfg_scale=4.0, controller=ctl, **kw)
        s = ctl.summary()
        assert ctl.step.prompt_length > 1             # the prompt's token count reached the gate's tau(p_len)
    finally:
        remove_dqar(pipe)
    assert s["reuse_events"] > 0 and s["unmatched_timesteps"] == 0 and not torch.equal(cached, plain)
    assert torch.equal(hub.generate(pipe, [3, 4], prompts=PROMPTS, steps=3, cfg_scale=4.0, **kw), plain)


@pytest.mark.parametrize("name, extra", [("sd3", []), ("flux", ["--cfg-scale", "3"]), ("cogvideox", [])])
def test_cli_bench_times_a_pipeline_against_its_uncached_self(name, extra, folders, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(folders[name]), "--prompt", PROMPTS[0], "--n", "2", "--steps", "3",
               "--repeats", "1", "--warmup-runs", "0", "--no-progress", "--json", str(out), *REUSE,
               *FAMILIES[name][1], *extra])
    assert rc == 0, capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["dqar"]["reuse_events"] > 0 and record["baseline"]["name"] == "none"
    # Scored against the uncached run without an evaluator: reuse changed pixels, so PSNR is finite.
    assert record["quality"]["psnr"] is not None and 0 < record["quality"]["ssim"] < 1
    assert record["quality"]["accuracy"] is None and record["ideal_speedup"] > 1


def test_flux_distilled_guidance_and_true_cfg_are_separate_knobs(folders):
    pipe = hub.load_pipeline(str(folders["flux"]))
    kw = dict(prompts=PROMPTS[:1], steps=2, max_sequence_length=8, height=16, width=16)
    base = hub.generate(pipe, [1], cfg_scale=1.0, **kw)
    assert torch.equal(base, hub.generate(pipe, [1], cfg_scale=1.0, guidance_scale=3.5, **kw))   # the default
    assert not torch.equal(base, hub.generate(pipe, [1], cfg_scale=1.0, guidance_scale=1.0, **kw))
    true_cfg = hub.generate(pipe, [1], cfg_scale=3.0, negative_prompt="dog", **kw)
    assert not torch.equal(base, true_cfg)
    ctl = apply_dqar(pipe, DQARConfig(schedule="static", warmup=0.0, layer_fraction=1.0))
    try:
        hub.generate(pipe, [1], cfg_scale=3.0, negative_prompt="dog", controller=ctl, **kw)
        assert get_step_driver(pipe).call_branches == ("cond", "uncond")       # two calls per step, two branches
        hub.generate(pipe, [1], cfg_scale=1.0, controller=ctl, **kw)
        assert get_step_driver(pipe).call_branches is None                       # learned anew per generation
    finally:
        remove_dqar(pipe)


def test_wan_pipeline_two_calls_per_step_reuse_per_branch():
    # A video pipeline (refused by dqar sample) hooked from Python: its prompt and negative-prompt calls at each step
    # are two branches; each reuses its own history, as the prompt's call would alone.
    pipe = pf.build_tiny_wan_pipeline()

    def run():
        return pipe(prompt=PROMPTS, negative_prompt=["", ""], height=16, width=16, num_frames=5, num_inference_steps=4,
                    guidance_scale=4.0, max_sequence_length=8, output_type="pt",
                    generator=[torch.Generator().manual_seed(s) for s in (1, 2)]).frames

    plain = run()
    ctl = apply_dqar(pipe, DQARConfig(schedule="static", warmup=0.0, layer_fraction=1.0))
    try:
        cached = run()
        s = ctl.summary()
        branches = {branch for (_, branch, _) in ctl.cache.entries}
        again = run()
    finally:
        remove_dqar(pipe)
    assert plain.shape == (2, 5, 3, 16, 16) and branches == {"cond", "uncond"}
    strip = hub.generate(pipe, [1, 2], prompts=PROMPTS, steps=2, cfg_scale=4.0, height=16, width=16, num_frames=5,
                         max_sequence_length=8)
    assert strip.shape == (2, 16, 5 * 16, 3)          # the frames side by side, as dqar sample writes them
    # static over 3 layers at 4 steps: 0, 1, 2, 3 layers reuse, each in both calls
    assert s["unmatched_timesteps"] == 0 and s["events_per_step"] == [0, 2, 4, 6]
    assert not torch.equal(cached, plain) and torch.equal(cached, again) and torch.equal(run(), plain)


def test_cli_samples_flux_in_bfloat16_with_a_cache_of_half_the_bytes(folders, tmp_path):
    # True CFG on (two calls per step); the cache is kept in the model's dtype, so bf16 halves it.
    options = [*FAMILIES["flux"][1], "--cfg-scale", "3", *REUSE]
    images, fp32 = _sample(folders["flux"], tmp_path / "fp32", *options)
    images16, bf16 = _sample(folders["flux"], tmp_path / "bf16", *options, "--dtype", "bfloat16")
    assert bf16["reuse_events"] == fp32["reuse_events"] > 0 and bf16["unmatched_timesteps"] == 0
    assert bf16["peak_cache_bytes"] * 2 == fp32["peak_cache_bytes"]
    # (the pixels themselves drift by tens of grey levels in bf16 on these random weights: not compared)
    assert images16.shape == images.shape and images16.dtype == np.uint8
