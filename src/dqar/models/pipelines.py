"""How each text-to-image and text-to-video diffusers pipeline is called: guidance, prompt length, text length, size.

`dqar.models.hub` loads a pipeline and samples class-conditional DiT itself; every text-conditional family goes
through `generate_text` here, so a family is one `TextFamily` entry. Image k comes from its own CPU generator
seeded with seeds[k], which every one of these pipelines uses for row k of the initial latents.

Guidance: `cfg_scale` is classifier-free guidance in each pipeline's own sense (on when > 1). Flux is the
exception: its `guidance_scale` feeds the distilled guidance embedding of FLUX.1-dev (one call per step), and
classifier-free guidance is its `true_cfg_scale`, which runs the transformer a second time per step on the
negative prompt; `dqar sample --guidance-scale` sets the first, `--cfg-scale` the second.

Video pipelines (CogVideoX, Wan, LTX-Video) return each sample as a filmstrip: its frames side by side, left to
right, in one image of width frames x width, so the sample folders, PNGs and npz of `dqar sample` hold them
as they hold images.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from dqar.method.hooks import get_step_driver


class PipelineOptionError(ValueError):
    """A sampling option a pipeline family does not take, or a value it cannot use."""


@dataclass(frozen=True)
class TextFamily:
    label: str                     # the family's name in messages and the README
    default_cfg: float             # the pipeline's own default guidance scale
    tokenizers: tuple[str, ...]    # attributes of the tokenizer whose token count is the prompt length (first found)
    text_length: int               # tokens that tokenizer reads (the pipeline's default max_sequence_length)
    takes_length: bool = True      # the pipeline has a max_sequence_length argument
    fixed: dict = field(default_factory=dict)   # call arguments always passed
    distilled_guidance: bool = False            # Flux: guidance_scale is the embedded guidance, CFG is true_cfg_scale
    size_multiple: int | None = None            # what the pipeline's own check wants; None: twice the VAE factor
    video: bool = False                         # returns frames (a filmstrip per sample here); takes num_frames


# clean_caption needs bs4/ftfy and rewrites the text after its tokens were counted; resolution binning only knows
# the released sizes, so both are off and the asked-for size is used as given.
_PLAIN_TEXT = {"clean_caption": False, "use_resolution_binning": False}

TEXT_FAMILIES = {
    "PixArtAlphaPipeline": TextFamily("PixArt-alpha", 4.5, ("tokenizer",), 120, fixed=_PLAIN_TEXT),
    "PixArtSigmaPipeline": TextFamily("PixArt-Sigma", 4.5, ("tokenizer",), 120, fixed=_PLAIN_TEXT),
    "StableDiffusion3Pipeline": TextFamily("SD3 / SD3.5", 7.0, ("tokenizer_3", "tokenizer"), 256),
    "FluxPipeline": TextFamily("Flux", 1.0, ("tokenizer_2", "tokenizer"), 512, distilled_guidance=True),
    "SanaPipeline": TextFamily("Sana", 4.5, ("tokenizer",), 300, fixed=_PLAIN_TEXT, size_multiple=32),
    "HunyuanDiTPipeline": TextFamily("HunyuanDiT", 5.0, ("tokenizer",), 77, takes_length=False,
                                     fixed={"use_resolution_binning": False}, size_multiple=16),
    # Sizes and frame counts default to each pipeline's own (CogVideoX 720x480 x 49, Wan 832x480 x 81, LTX 704x512 x 161).
    "CogVideoXPipeline": TextFamily("CogVideoX", 6.0, ("tokenizer",), 226, size_multiple=8, video=True),
    "WanPipeline": TextFamily("Wan", 5.0, ("tokenizer",), 512, size_multiple=16, video=True),
    "LTXPipeline": TextFamily("LTX-Video", 3.0, ("tokenizer",), 128, size_multiple=32, video=True),
}
FLUX_DEFAULT_GUIDANCE = 3.5


def text_family(pipe) -> TextFamily | None:
    return TEXT_FAMILIES.get(type(pipe).__name__)


def native_size(pipe) -> tuple[int | None, int | None]:
    """(height, width) the transformer was trained at, or (None, None) to leave it to the pipeline (Flux)."""
    sample = getattr(pipe.transformer.config, "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if isinstance(sample, int) and isinstance(scale, int):
        return sample * scale, sample * scale
    return None, None


def prompt_token_counts(pipe, prompts: Sequence[str], max_sequence_length: int | None = None) -> list[int]:
    """Each prompt's token count as the family's main text encoder reads it (its EOS included, padding not)."""
    family = text_family(pipe)
    names = family.tokenizers if family is not None else ("tokenizer",)
    tokenizer = next((getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None), None)
    if tokenizer is None:
        return [1] * len(prompts)
    limit = max_sequence_length or (family.text_length if family is not None else 120)
    if tokenizer is not getattr(pipe, names[0], None):
        limit = min(limit, int(getattr(tokenizer, "model_max_length", limit)))
    enc = tokenizer(list(prompts), max_length=limit, truncation=True, add_special_tokens=True)
    return [max(1, int(sum(mask))) for mask in enc["attention_mask"]]


def check_options(pipe, *, cfg_scale: float, negative_prompt: str = "", guidance_scale: float | None = None,
                  max_sequence_length: int | None = None, height: int | None = None,
                  width: int | None = None, num_frames: int | None = None) -> None:
    """Refuse, before any step, an option this family does not take (one line naming it and what applies)."""
    name = type(pipe).__name__
    family = text_family(pipe)
    if family is None:
        raise PipelineOptionError(f"{name} is not a text-to-image pipeline; text pipelines: {', '.join(TEXT_FAMILIES)}")
    if guidance_scale is not None:
        if not family.distilled_guidance:
            raise PipelineOptionError(f"--guidance-scale is Flux's distilled guidance; {name} takes --cfg-scale")
        if not guidance_scale >= 0:
            raise PipelineOptionError(f"--guidance-scale={guidance_scale} is not allowed: must be >= 0")
    if family.distilled_guidance and negative_prompt and not cfg_scale > 1:
        raise PipelineOptionError("--negative-prompt on Flux needs true CFG: give --cfg-scale > 1 (Flux runs the "
                                  "negative prompt as a second transformer call per step)")
    if max_sequence_length is not None:
        if not family.takes_length:
            raise PipelineOptionError(f"--max-sequence-length does not apply to {name}: its text lengths are fixed")
        if max_sequence_length < 1:
            raise PipelineOptionError(f"--max-sequence-length={max_sequence_length} is not allowed: must be >= 1")
    if num_frames is not None:
        if not family.video:
            raise PipelineOptionError(f"--num-frames is for video pipelines (CogVideoX, Wan, LTX-Video); {name} "
                                      "makes images")
        if num_frames < 1:
            raise PipelineOptionError(f"--num-frames={num_frames} is not allowed: must be >= 1")
    multiple = family.size_multiple or 2 * int(getattr(pipe, "vae_scale_factor", 1) or 1)
    for option, value in (("--height", height), ("--width", width)):
        if value is not None and (value < 1 or value % multiple):
            raise PipelineOptionError(f"{option}={value} is not allowed for {name}: must be a positive multiple of "
                                      f"{multiple}")


def call_arguments(pipe, prompts: Sequence[str], *, cfg_scale: float, negative_prompt: str = "",
                   guidance_scale: float | None = None, max_sequence_length: int | None = None,
                   height: int | None = None, width: int | None = None, num_frames: int | None = None) -> dict:
    """The keyword arguments of `pipe(...)` for these prompts, guidance and size (generators and steps aside)."""
    family = text_family(pipe)
    kw = dict(family.fixed)
    kw["prompt"] = list(prompts)
    if family.distilled_guidance:
        kw["guidance_scale"] = FLUX_DEFAULT_GUIDANCE if guidance_scale is None else float(guidance_scale)
        kw["true_cfg_scale"] = float(cfg_scale)
        # diffusers runs true CFG only when a negative prompt is given; "" is a valid one.
        kw["negative_prompt"] = [negative_prompt] * len(prompts) if cfg_scale > 1 else None
    else:
        kw["guidance_scale"] = float(cfg_scale)
        # One per prompt: HunyuanDiT refuses a string next to a list of prompts.
        kw["negative_prompt"] = [negative_prompt] * len(prompts)
    if family.takes_length:
        kw["max_sequence_length"] = max_sequence_length or family.text_length
    native_h, native_w = native_size(pipe)
    # None leaves the size to the pipeline (Wan and LTX have numbers as defaults, not None).
    for key, value in (("height", height or native_h), ("width", width or native_w), ("num_frames", num_frames)):
        if value is not None:
            kw[key] = value
    return kw


@torch.no_grad()
def generate_text(pipe, seeds: Sequence[int], prompts: Sequence[str], *, steps: int, cfg_scale: float,
                  negative_prompt: str = "", controller=None, guidance_scale: float | None = None,
                  max_sequence_length: int | None = None, height: int | None = None,
                  width: int | None = None, num_frames: int | None = None) -> torch.Tensor:
    """One image per seed, float (N, C, H, W) in [0, 1] (a video's frames side by side: W = frames x width);
    under DQAR the batch's longest prompt is announced to the hooked pipeline's step driver first (one batch
    shares one gate threshold)."""
    kw = call_arguments(pipe, prompts, cfg_scale=cfg_scale, negative_prompt=negative_prompt,
                        guidance_scale=guidance_scale, max_sequence_length=max_sequence_length, height=height,
                        width=width, num_frames=num_frames)
    driver = get_step_driver(pipe) if controller is not None else None
    if driver is not None:
        driver.announce(prompt_length=max(prompt_token_counts(pipe, prompts, kw.get("max_sequence_length"))))
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(generator=generators, num_inference_steps=steps, output_type="pt", **kw)
    if not text_family(pipe).video:
        return out.images
    frames = out.frames                                    # (N, F, C, H, W)
    n, f, c, h, w = frames.shape
    return frames.permute(0, 2, 3, 1, 4).reshape(n, c, h, f * w)
