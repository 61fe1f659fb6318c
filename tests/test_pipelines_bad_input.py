"""Bad input around diffusers pipelines: one-line errors naming what was given and what is supported."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.cli import main
from dqar.models import hub

pf = pytest.importorskip("pipeline_fixtures")
from hub_fixtures import build_tiny_dit_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {"sd3": pf.build_tiny_sd3_pipeline(root / "sd3"), "flux": pf.build_tiny_flux_pipeline(root / "flux"),
            "hunyuandit": pf.build_tiny_hunyuandit_pipeline(root / "hunyuandit"),
            "dit": build_tiny_dit_pipeline(root / "dit")}


def _error(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err, err
    last = err[-1]            # diffusers' own logging may print above; the error is our last line
    assert last.startswith(f"dqar {argv[0]}: error: ")
    return last


def test_an_unsupported_pipeline_class_is_named_with_the_supported_ones(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    last = _error(capsys, ["sample", "--model", str(tmp_path / "ddpm"), "--prompt", "a cat", "--schedule", "none"])
    assert "is a DDPMPipeline; supported pipelines: DiTPipeline, PixArtAlphaPipeline" in last
    assert "StableDiffusion3Pipeline, FluxPipeline, SanaPipeline, HunyuanDiTPipeline" in last


def test_a_wan_folder_without_accelerate_says_to_install_it(tmp_path):
    # Wan keeps some modules in float32, which diffusers loads only through accelerate.
    try:
        import accelerate  # noqa: F401
        pytest.skip("accelerate is installed: Wan folders load")
    except ImportError:
        pass
    pf.build_tiny_wan_pipeline().save_pretrained(tmp_path / "wan")
    with pytest.raises(hub.HubModelError, match=r"cannot load diffusers pipeline .*wan.*needs accelerate to load: "
                                                r"pip install"):
        hub.load_pipeline(str(tmp_path / "wan"))


def test_a_pipeline_without_a_scheduler_is_refused(folders, tmp_path, capsys):
    folder = tmp_path / "no-scheduler"
    shutil.copytree(folders["sd3"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    last = _error(capsys, ["sample", "--model", str(folder), "--prompt", "a cat", "--schedule", "none"])
    assert "StableDiffusion3Pipeline has no scheduler" in last and "DQAR reads the denoising steps" in last
    pipe = hub.load_pipeline(str(folders["sd3"]))
    pipe.scheduler = None
    with pytest.raises(ValueError, match="on a StableDiffusion3Pipeline whose scheduler is None needs the scheduler"):
        apply_dqar(pipe, DQARConfig())


@pytest.mark.parametrize("model, extra, message", [
    ("dit", ["--prompt", "a cat"], "--prompt / --negative-prompt are for PixArt and the other text-to-image"),
    ("dit", ["--guidance-scale", "3"], "--guidance-scale is for text-to-image pipelines; "),
    ("dit", ["--height", "32"], "--height is for text-to-image pipelines"),
    ("sd3", ["--classes", "3"], "--classes is for class-conditional models; "),
    ("sd3", ["--guidance-scale", "3"], "--guidance-scale is Flux's distilled guidance; StableDiffusion3Pipeline "
                                       "takes --cfg-scale"),
    ("sd3", ["--sampler", "ddim"], "sampler='ddim' does not apply to StableDiffusion3Pipeline: its "
                                   "FlowMatchEulerDiscreteScheduler is flow matching"),
    ("sd3", ["--height", "10"], "--height=10 is not allowed for StableDiffusion3Pipeline: must be a positive "
                                "multiple of 4"),
    ("flux", ["--negative-prompt", "blurry"], "--negative-prompt on Flux needs true CFG: give --cfg-scale > 1"),
    ("hunyuandit", ["--max-sequence-length", "8"], "--max-sequence-length does not apply to HunyuanDiTPipeline"),
    ("sd3", ["--num-frames", "9"], "--num-frames is for video pipelines (CogVideoX, Wan, LTX-Video); "
                                   "StableDiffusion3Pipeline makes images"),
    ("dit", ["--num-frames", "9"], "--num-frames is for text-to-image pipelines"),
])
@pytest.mark.parametrize("command", ["sample", "bench"])
def test_options_that_do_not_fit_the_model_are_refused(command, model, extra, message, folders, tmp_path, capsys):
    prompt = [] if model == "dit" or "--classes" in extra else ["--prompt", "a cat"]
    out = ["--out", str(tmp_path / "o")] if command == "sample" else ["--n", "1"]
    last = _error(capsys, [command, "--model", str(folders[model]), *prompt, *out, "--steps", "1",
                           "--schedule", "none", *extra])
    assert message in last
    assert not (tmp_path / "o").exists()


def test_compile_before_apply_dqar_is_refused_on_a_pipeline(folders):
    pipe = hub.load_pipeline(str(folders["sd3"]))
    pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")
    with pytest.raises(TypeError, match="compiled SD3Transformer2DModel.*apply DQAR to the plain model first, "
                                        r"then compile it"):
        apply_dqar(pipe, DQARConfig())


def test_a_model_cast_to_another_dtype_uses_a_cache_of_its_own_dtype(folders):
    # The cache holds the dtype of the model that computed it: a cast between generations starts a fresh cache in
    # the new dtype (half the bytes in bf16), and a cast in the middle of one hands reused outputs back in the
    # dtype the model now runs, never a dtype error.
    pipe = hub.load_pipeline(str(folders["sd3"]))
    kw = dict(prompts=["a cat"], steps=3, cfg_scale=4.0, max_sequence_length=8)
    ctl = apply_dqar(pipe, DQARConfig(schedule="static", warmup=0.0, layer_fraction=1.0))
    try:
        hub.generate(pipe, [1], controller=ctl, **kw)
        fp32 = ctl.summary()["peak_cache_bytes"]
        pipe.to(torch.bfloat16)
        images = hub.generate(pipe, [1], controller=ctl, **kw)
        s = ctl.summary()
        assert {e.output.dequantize().dtype for e in ctl.cache.entries.values()} == {torch.bfloat16}
    finally:
        remove_dqar(pipe)
    assert s["reuse_events"] > 0 and s["peak_cache_bytes"] * 2 == fp32 and images.dtype == torch.uint8


def test_a_transformer_cast_in_the_middle_of_a_generation_gets_reuse_in_its_new_dtype():
    ff = pytest.importorskip("family_fixtures")
    family, model, sched = ff.build("sd3")
    ctl = apply_dqar(model, DQARConfig(schedule="static", warmup=0.0, layer_fraction=1.0), scheduler=sched)
    sched.set_timesteps(4)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = family.conditioning(1)
    try:
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                if i == 2:       # the cache holds float32 outputs of steps 0 and 1
                    model.to(torch.bfloat16)
                    x = x.to(torch.bfloat16)
                    cond = {k: v.to(torch.bfloat16) for k, v in cond.items()}
                out = model(hidden_states=x, timestep=t.expand(1), return_dict=False, **cond)[0]
                assert out.dtype == x.dtype
                x = sched.step(out, t, x, return_dict=False)[0].to(out.dtype)
        s = ctl.summary()
    finally:
        remove_dqar(model)
    assert s["events_per_step"][2] > 0 and torch.isfinite(x.float()).all()
