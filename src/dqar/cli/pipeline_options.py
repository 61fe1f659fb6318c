"""Options of the diffusers text-to-image and text-to-video pipelines (SD3, Flux, Sana, PixArt, HunyuanDiT, CogVideoX,
Wan, LTX-Video), shared by `dqar sample` and `dqar bench`: prompts, Flux's distilled guidance, image size, frames,
text length, and the scheduler choice.

Argparse only here (no torch), so `dqar --help` stays fast; the checks that need the loaded pipeline run in
`resolve_pipeline_options` and name the option, its value and what the model takes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import UsageError

SAMPLER_CHOICES = ("ddim", "dpm", "pipeline")
# Options that only text-to-image pipelines take: (attribute, option) pairs.
TEXT_ONLY = (("prompt", "--prompt"), ("prompts_file", "--prompts-file"), ("negative_prompt", "--negative-prompt"),
             ("guidance_scale", "--guidance-scale"), ("height", "--height"), ("width", "--width"),
             ("max_sequence_length", "--max-sequence-length"), ("num_frames", "--num-frames"))


def add_sampler_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sampler", default=None, choices=SAMPLER_CHOICES,
                        help="scheduler: ddim, dpm (DPM-Solver++ 2M, built from the model's betas) or pipeline (the "
                             "scheduler a diffusers pipeline was saved with); default: pipeline for SD3, Flux, Sana, "
                             "HunyuanDiT and the video pipelines (flow-matching models take only that), ddim for DiT "
                             "and PixArt")


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", action="append", default=None,
                        help="text prompt for a text-to-image pipeline (repeatable; prompts are cycled over the sample "
                             "index; default: none, a text model then needs --prompts-file)")
    parser.add_argument("--prompts-file", default=None, help="file with one prompt per line (default none)")
    parser.add_argument("--negative-prompt", default="",
                        help="negative prompt of classifier-free guidance (default empty; on Flux it needs --cfg-scale > 1)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="Flux only: the distilled guidance fed to FLUX.1-dev's guidance embedding (default 3.5; "
                             "ignored by the model when it has no guidance embedding, as FLUX.1-schnell); on Flux "
                             "--cfg-scale > 1 is true CFG: a second transformer call per step on the negative prompt")
    parser.add_argument("--height", type=int, default=None,
                        help="image height in pixels for text pipelines (default: the transformer's native size; "
                             "Flux: its pipeline's default, 1024 on the released models)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default as --height)")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="frames per video for CogVideoX, Wan and LTX-Video (default: the pipeline's own, 49, 81 "
                             "and 161); each video is written as one image, its frames side by side")
    parser.add_argument("--max-sequence-length", type=int, default=None,
                        help="text tokens the pipeline's T5/Gemma encoder reads (default: the pipeline's own: "
                             "PixArt 120, SD3 256, Flux 512, Sana 300; HunyuanDiT's are fixed)")


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if path.is_dir():
            raise UsageError(f"--prompts-file={args.prompts_file!r} is a folder, not a file")
        if not path.is_file():
            raise UsageError(f"--prompts-file={args.prompts_file!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"--prompts-file={args.prompts_file!r} is not UTF-8 text ({exc.reason})") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    return prompts


def refuse_text_options(args, model: str) -> None:
    """A class-conditional model was given a text-pipeline option: name the first one."""
    if read_prompts(args) or args.negative_prompt:
        raise UsageError(f"--prompt / --negative-prompt are for PixArt and the other text-to-image pipelines; {model} "
                         "is class-conditional (use --classes)")
    for attr, option in TEXT_ONLY:
        if getattr(args, attr, None) not in (None, "", []):
            raise UsageError(f"{option} is for text-to-image pipelines; {model} is class-conditional (use --classes)")


def resolve_sampler(args, kind: str) -> str:
    """The --sampler default per kind; 'pipeline' exists only for diffusers pipelines."""
    if args.sampler is None:
        return "pipeline" if kind == "text" else "ddim"
    if args.sampler == "pipeline" and kind == "dit":
        raise UsageError(f"--sampler pipeline is for diffusers pipelines; {args.model} takes ddim or dpm")
    return args.sampler


def resolve_pipeline_options(args, pipe, cfg_scale: float) -> dict:
    """The text pipeline's call options from the command line, checked against the loaded pipeline; only the
    ones given (the rest keep each pipeline's default, and stay out of the run's identity)."""
    from dqar.models.pipelines import PipelineOptionError, check_options

    options = {k: getattr(args, k) for k in ("guidance_scale", "height", "width", "max_sequence_length", "num_frames")
               if getattr(args, k, None) is not None}
    try:
        check_options(pipe, cfg_scale=cfg_scale, negative_prompt=args.negative_prompt, **options)
    except PipelineOptionError as exc:
        raise UsageError(f"--model {args.model}: {exc}") from None
    return options
