"""`dqar sample`: sharded sample generation (torchrun-aware) to PNGs, an ADM-format .npz and reuse stats.

One process without torchrun; under `torchrun --nproc_per_node N -m dqar.sample ...` each rank takes every
N-th global batch of the same sample set (seed = --seed + global index). See docs/MULTI_GPU.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from . import UsageError
from .common import add_model_options

_DQAR_OPTIONS = "dqar.cli.dqar_options"


def _has_dqar_options() -> bool:
    return importlib.util.find_spec(_DQAR_OPTIONS) is not None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.epilog = ("--model also takes a diffusers pipeline: a hub id such as facebook/DiT-XL-2-256 (needs the "
                     "hub or its local cache) or a local folder with model_index.json (DiTPipeline or "
                     "PixArtAlphaPipeline).")
    parser.add_argument("--num-samples", "--n", dest="num_samples", type=int, required=True,
                        help="how many samples in the set (e.g. 50000 for FID-50K)")
    parser.add_argument("--classes", default=None,
                        help="comma list of class labels cycled over the sample index "
                             "(default: every class in turn, so 50000 ImageNet samples are 50 per class)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text prompt for PixArt (repeatable; prompts are cycled over the sample index)")
    parser.add_argument("--prompts-file", default=None, help="file with one PixArt prompt per line")
    parser.add_argument("--negative-prompt", default="", help="PixArt negative prompt (default empty)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "dpm"), help="scheduler (default ddim)")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (default 1.5)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; sample k uses seed + k (default 0)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images per global batch, per forward pass (default 16); part of the run's settings")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="weights dtype for diffusers models (default float32)")
    parser.add_argument("--out", default=None, help="output folder (default: SAMPLE_DIR/<name from every setting>)")
    parser.add_argument("--sample-dir", default="samples", help="parent of the default output folder")
    if _has_dqar_options():
        importlib.import_module(_DQAR_OPTIONS).add_dqar_options(parser)


def _dqar_config(args):
    if not _has_dqar_options():
        return None
    return importlib.import_module(_DQAR_OPTIONS).config_from_args(args)


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UsageError(f"--prompts-file={args.prompts_file!r} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts


def _labels(text: str | None, num_classes: int) -> list[int]:
    from .common import parse_classes

    return parse_classes(text, num_classes, 1)


def run(args: argparse.Namespace) -> int:
    import torch

    from dqar import hub
    from dqar.distributed import init_distributed, shutdown
    from dqar.sample import SampleJob, folder_name, run_job

    from .common import resolve_model, setup_torch

    if args.num_samples < 1:
        raise UsageError(f"--num-samples={args.num_samples} is not allowed: must be >= 1")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size={args.batch_size} is not allowed: must be >= 1")
    if args.steps < 1:
        raise UsageError(f"--steps={args.steps} is not allowed: must be >= 1")
    prompts = _read_prompts(args)
    device = setup_torch(args)
    dqar_cfg = _dqar_config(args)
    info = init_distributed(device.type)
    try:
        if device.type == "cuda" and info.world_size > 1:
            # One GPU per rank: --device cuda means "my GPU" under torchrun.
            device = torch.device("cuda", info.local_rank)
        quiet = not info.is_main
        if hub.is_diffusers_spec(args.model):
            pipe = hub.load_pipeline(args.model, device=device, dtype=args.dtype, sampler=args.sampler)
            kind = "hub-dit" if hub.pipeline_kind(pipe) == "dit" else "pixart"
            model = pipe
        else:
            # Preset weights are seeded apart from --seed, so the sample seed never changes the model.
            model, _ = resolve_model(args.model, seed=0, quiet=quiet)
            model = model.to(device)
            kind = "dit"
        if kind == "pixart":
            if args.classes is not None:
                raise UsageError(f"--classes is for class-conditional models; {args.model} takes --prompt")
            if not prompts:
                raise UsageError(f"{args.model} is a PixArt (text-to-image) model: pass --prompt or --prompts-file")
            labels = []
        else:
            if prompts:
                raise UsageError(f"--prompt is for PixArt; {args.model} is class-conditional (use --classes)")
            n_classes = hub.num_classes(model) if kind == "hub-dit" else model.config.num_classes
            labels = _labels(args.classes, n_classes)
        job = SampleJob(model=args.model, kind=kind, num_samples=args.num_samples, steps=args.steps,
                        sampler=args.sampler, cfg_scale=args.cfg_scale, seed=args.seed,
                        batch_size=args.batch_size, labels=tuple(labels), prompts=tuple(prompts),
                        negative_prompt=args.negative_prompt,
                        dtype=args.dtype if kind != "dit" else "float32",
                        dqar=dqar_cfg.to_dict() if dqar_cfg is not None else None)
        out_dir = Path(args.out) if args.out else Path(args.sample_dir) / folder_name(job)

        controller = None
        if dqar_cfg is not None:
            from dqar import apply_dqar

            controller = apply_dqar(model, dqar_cfg)
        generate = _make_generate(job, model, device, controller)
        result = run_job(job, generate, out_dir, info, controller=controller)
        if info.is_main:
            print(f"{result.written} written, {result.skipped} already present, "
                  f"{result.seconds:.1f} s -> {result.out_dir}")
        return 0
    finally:
        shutdown(info)


def _make_generate(job, model, device, controller):
    """Bind the model and the job's labels/prompts into generate(indices, seeds) -> uint8 (N, H, W, C)."""
    from dqar import hub

    if job.kind == "dit":
        from dqar.sampling import sample, to_uint8

        def generate(indices, seeds):
            labels = [job.label(i) for i in indices]
            x = sample(model, labels, seeds, steps=job.steps, sampler=job.sampler, cfg_scale=job.cfg_scale,
                       device=device)
            return to_uint8(x)
    elif job.kind == "hub-dit":
        def generate(indices, seeds):
            return hub.generate(model, seeds, class_labels=[job.label(i) for i in indices], steps=job.steps,
                                cfg_scale=job.cfg_scale, controller=controller)
    else:
        def generate(indices, seeds):
            return hub.generate(model, seeds, prompts=[job.prompt(i) for i in indices], steps=job.steps,
                                cfg_scale=job.cfg_scale, negative_prompt=job.negative_prompt,
                                controller=controller)
    return generate


if __name__ == "__main__":
    from . import main

    sys.exit(main(["sample", *sys.argv[1:]]))
