"""Hugging Face diffusers models: load a `DiTPipeline` or a text-conditional pipeline (PixArt-alpha/-Sigma, SD3, Flux,
Sana, HunyuanDiT, and the video pipelines CogVideoX, Wan, LTX-Video; their call details are in
`dqar.models.pipelines`) and sample with per-image seeds.

A model spec is a hub id (`facebook/DiT-XL-2-256`) or a local folder holding `model_index.json` (what
`save_pretrained` writes). Both go through `DiffusionPipeline.from_pretrained`, so the tests, which load
tiny pipelines from a temp folder, exercise the same path a hub id takes. Image k comes from its own CPU
`torch.Generator` seeded with seeds[k], which diffusers uses for row k of the initial latents, so it does
not depend on the batch or the device.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from dqar.method.noise import is_flow_matching
from dqar.models.pipelines import TEXT_FAMILIES, check_options, generate_text, prompt_token_counts, text_family
from dqar.sampling import to_uint8

SUPPORTED = ("DiTPipeline", *TEXT_FAMILIES)
# "pipeline" keeps the scheduler the pipeline was saved with (the only choice for flow matching).
SAMPLERS = ("ddim", "dpm", "pipeline")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# DiT checkpoints embed num_classes + 1 labels; DiTPipeline hard-codes 1000 as the null (unconditional) label.
DIT_NULL_CLASS = 1000
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubModelError(ValueError):
    """A diffusers model that cannot be loaded or used; a ValueError so the CLI reports it in one line."""


def is_diffusers_spec(spec: str) -> bool:
    """True for a folder with model_index.json, or for an `owner/name` hub id that is not a local path."""
    from dqar.models.dit import DIT_PRESETS

    if spec in DIT_PRESETS:  # "DiT-XL/2" looks like owner/name but is our own preset
        return False
    path = Path(spec)
    if path.is_dir():
        return (path / "model_index.json").is_file()
    if path.exists() or path.suffix == ".safetensors":
        return False
    return bool(_HUB_ID.match(spec))


def _offline_message(spec: str, exc: BaseException) -> str:
    return (f"model {spec!r} is not available offline: it is neither a local folder nor in the Hugging Face "
            f"cache, and the hub could not be reached ({type(exc).__name__}). On a machine with internet, "
            f"save it with `DiffusionPipeline.from_pretrained({spec!r}).save_pretrained(FOLDER)` (or "
            f"`huggingface-cli download {spec} --local-dir FOLDER`), copy FOLDER here and pass --model FOLDER")


def load_pipeline(spec: str, *, device: torch.device | str = "cpu", dtype: str = "float32",
                  sampler: str | None = None):
    """Load a supported diffusers pipeline from a hub id or local folder, on `device`, with `sampler`'s scheduler."""
    if dtype not in DTYPES:
        raise HubModelError(f"dtype={dtype!r} is not known; allowed: {', '.join(DTYPES)}")
    from diffusers import DiffusionPipeline

    path = Path(spec)
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise HubModelError(f"folder {spec!r} has no model_index.json: not a diffusers pipeline folder "
                            "(save one with pipeline.save_pretrained(folder))")
    try:
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:  # older huggingface_hub: its HTTP errors are OSErrors already
        HfHubHTTPError = OSError
    if path.is_dir():
        _check_model_index(path, spec)
    try:
        pipe = DiffusionPipeline.from_pretrained(spec)
    except (OSError, ConnectionError, HfHubHTTPError) as exc:
        if path.is_dir():
            raise HubModelError(f"cannot load diffusers folder {spec!r}: {exc}") from exc
        raise HubModelError(_offline_message(spec, exc)) from exc
    except ValueError as exc:
        # diffusers' own complaint (a component missing or of the wrong class), kept to its first line.
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = ("; this model keeps some modules in float32 and needs accelerate to load: pip install -e \".[hub]\""
                if "low_cpu_mem_usage" in first else "")
        raise HubModelError(f"cannot load diffusers pipeline {spec!r}: {first}{hint}") from exc
    name = type(pipe).__name__
    if name not in SUPPORTED:
        raise HubModelError(f"model {spec!r} is a {name}; supported pipelines: {', '.join(SUPPORTED)}")
    if getattr(pipe, "scheduler", None) is None:
        raise HubModelError(f"model {spec!r}: its {name} has no scheduler (model_index.json lists none), and DQAR "
                            "reads the denoising steps from it; save the pipeline with its scheduler")
    if sampler is not None:
        set_sampler(pipe, sampler)
    pipe.set_progress_bar_config(disable=True)
    # Cast after loading: the loader's dtype keyword changed name across diffusers releases.
    pipe = pipe.to(device=device, dtype=DTYPES[dtype])
    check_finite_weights(pipe, spec)
    return pipe


def _check_model_index(path: Path, spec: str) -> None:
    """A folder's model_index.json must be JSON naming a scheduler: DQAR reads the denoising steps from it."""
    import json

    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise HubModelError(f"folder {spec!r}: model_index.json is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(index, dict):
        raise HubModelError(f"folder {spec!r}: model_index.json is not a JSON object")
    entry = index.get("scheduler")
    if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
        name = index.get("_class_name", "pipeline")
        raise HubModelError(f"folder {spec!r}: its {name} has no scheduler (model_index.json 'scheduler' is "
                            f"{entry!r}), and DQAR reads the denoising steps from it; save the pipeline with its "
                            "scheduler (pipe.save_pretrained(folder))")


def check_finite_weights(pipe, spec: str) -> None:
    """Refuse a pipeline whose weights hold NaN or inf: it would run and give flat images without a word."""
    for component, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if (tensor.is_floating_point() and tensor.numel()
                    and not bool(torch.isfinite(tensor).all())):
                bad = int((~torch.isfinite(tensor)).sum())
                raise HubModelError(f"model {spec!r}: {component} tensor {name!r} has {bad} NaN or inf values of "
                                    f"{tensor.numel()}; the weights are damaged")


def set_sampler(pipe, sampler: str) -> None:
    """Replace the pipeline's scheduler with DDIM or DPM-Solver++ built from its own config (same betas), or keep
    it ("pipeline"); a flow-matching scheduler has no betas to rebuild from, so it is always kept."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if sampler in ("ddim", "dpm") and is_flow_matching(pipe.scheduler):
        raise HubModelError(f"sampler={sampler!r} does not apply to {type(pipe).__name__}: its "
                            f"{type(pipe.scheduler).__name__} is flow matching; use sampler 'pipeline' (its own)")
    if sampler == "pipeline":
        return
    if sampler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif sampler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                                 algorithm_type="dpmsolver++", solver_order=2)
    else:
        raise HubModelError(f"sampler={sampler!r} is not known; allowed: {', '.join(SAMPLERS)}")


def pipeline_kind(pipe) -> str:
    """'dit' (class-conditional), 'pixart' or 'text' (the other text-to-image and text-to-video families)."""
    name = type(pipe).__name__
    if name == "DiTPipeline":
        return "dit"
    if name in ("PixArtAlphaPipeline", "PixArtSigmaPipeline"):
        return "pixart"
    if name in TEXT_FAMILIES:
        return "text"
    raise HubModelError(f"{name} is not supported; supported pipelines: {', '.join(SUPPORTED)}")


def num_classes(pipe) -> int:
    """Class labels a DiT pipeline accepts (the embedding's last row is the null class)."""
    return int(pipe.transformer.config.num_embeds_ada_norm)


def image_shape(pipe) -> tuple[int, int, int]:
    """(H, W, C) of the decoded images."""
    size = int(pipe.transformer.config.sample_size) * (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    return size, size, int(pipe.vae.config.out_channels)


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: diffusers draws row k of the latents from generator k."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def prompt_lengths(pipe, prompts: Sequence[str], max_sequence_length: int = 120) -> list[int]:
    """Token count of each prompt as the pipeline's text encoder sees it (its EOS included, padding not)."""
    return prompt_token_counts(pipe, prompts, max_sequence_length)


@torch.no_grad()
def generate(pipe, seeds: Sequence[int], *, class_labels: Sequence[int] | None = None,
             prompts: Sequence[str] | None = None, steps: int = 50, cfg_scale: float = 1.5,
             negative_prompt: str = "", controller=None, max_sequence_length: int | None = None,
             **options) -> torch.Tensor:
    """One image per seed as uint8 (N, H, W, C); DiT takes `class_labels`, the text pipelines `prompts`.

    Guidance follows each pipeline's rule (on when cfg_scale > 1; Flux's CFG is its true CFG). Under DQAR, a
    text pipeline's prompt length (longest prompt of the batch: one batch shares one gate threshold) is
    announced to the hooked pipeline's step driver first; class-conditional DiT keeps prompt length 1.
    `options` (guidance_scale, height, width) go to text pipelines (`dqar.models.pipelines.call_arguments`).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise HubModelError(f"steps={steps!r} is not allowed: must be an integer >= 1")
    if not cfg_scale >= 0:
        raise HubModelError(f"cfg_scale={cfg_scale!r} is not allowed: must be >= 0")
    kind = pipeline_kind(pipe)
    n = len(seeds)
    if kind == "dit":
        if class_labels is None or prompts is not None:
            raise HubModelError("a DiT pipeline is class-conditional: pass class labels, not prompts")
        if options or max_sequence_length is not None:
            raise HubModelError(f"a DiT pipeline takes no {', '.join(options) or 'max_sequence_length'}: "
                                "those are text-to-image options")
        if len(class_labels) != n:
            raise HubModelError(f"got {len(class_labels)} class labels but {n} seeds: one seed per image")
        limit = num_classes(pipe)
        for label in class_labels:
            if not 0 <= int(label) < limit:
                raise HubModelError(f"class label {label} is outside [0, {limit}) for this model")
        out = pipe(class_labels=[int(c) for c in class_labels], guidance_scale=cfg_scale,
                   generator=generators(seeds), num_inference_steps=steps, output_type="pt").images
        return to_uint8(_check_finite_images(out, seeds), (0.0, 1.0))
    label = text_family(pipe).label
    if prompts is None or class_labels is not None:
        raise HubModelError(f"a {label} pipeline is text-conditional: pass prompts (--prompt / --prompts-file)")
    if len(prompts) != n:
        raise HubModelError(f"got {len(prompts)} prompts but {n} seeds: one seed per image")
    check_options(pipe, cfg_scale=cfg_scale, negative_prompt=negative_prompt, max_sequence_length=max_sequence_length,
                  **options)
    out = generate_text(pipe, seeds, prompts, steps=steps, cfg_scale=cfg_scale, negative_prompt=negative_prompt,
                        controller=controller, max_sequence_length=max_sequence_length, **options)
    return to_uint8(_check_finite_images(out, seeds), (0.0, 1.0))


def _check_finite_images(images: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """NaN would become black pixels in uint8: refuse it, naming the usual cause in half precision."""
    if not bool(torch.isfinite(images).all()):
        raise HubModelError(f"the pipeline produced NaN or inf values (seeds {seeds[0]}..{seeds[-1]}); in float16 the "
                            "VAE or attention can overflow: try --dtype bfloat16 or float32")
    return images
