"""`dqar sample`: sharded sample generation (torchrun-aware) to PNGs, an ADM-format .npz and reuse stats.

One process without torchrun; under `torchrun --nproc_per_node N -m dqar.harness.sharded_sampling ...` each rank takes every
N-th global batch of the same sample set (seed = --seed + global index). See docs/MULTI_GPU.md.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from . import UsageError
from .common import add_cfg_scale_option, add_model_options, check_out_dir, check_seed
from .dqar_options import add_dqar_options, config_from_args
from .pipeline_options import (add_prompt_options, add_sampler_option, read_prompts, refuse_text_options,
                               resolve_pipeline_options, resolve_sampler)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.epilog = ("--model also takes a diffusers pipeline: a hub id such as facebook/DiT-XL-2-256 or "
                     "black-forest-labs/FLUX.1-dev (needs the hub or its local cache) or a local folder with "
                     "model_index.json: DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline, "
                     "StableDiffusion3Pipeline, FluxPipeline, SanaPipeline, HunyuanDiTPipeline, or the video "
                     "pipelines CogVideoXPipeline, WanPipeline, LTXPipeline (each video is one PNG, its frames side "
                     "by side). Sampling runs under DQAR unless --schedule none.")
    count = parser.add_mutually_exclusive_group()
    # torchrun parses the whole command line with abbreviations on, so `--n` (a prefix of its --nnodes,
    # --nproc-per-node, --node-rank, ...) is refused there as ambiguous: --per-class is the spelling that
    # works everywhere, --n stays for the one-process command (and `dqar generate`'s habit).
    count.add_argument("--per-class", type=int, default=None,
                       help="images per class (or per prompt), as --n in `dqar generate` (default 1); "
                            "--per-class 50 over ImageNet's 1000 classes is FID-50K; works under torchrun")
    count.add_argument("--n", type=int, default=None,
                       help="the same as --per-class (default 1), for the one-process command only: torchrun "
                            "refuses --n as an ambiguous prefix of its own --nnodes/--nproc-per-node, so under "
                            "torchrun write --per-class (or --num-samples)")
    count.add_argument("--num-samples", type=int, default=None,
                       help="total samples instead of --per-class: the first N of the class-major list with "
                            "ceil(N / classes) per class (default: --per-class times the classes); works "
                            "under torchrun")
    parser.add_argument("--classes", default=None, help="comma-separated class labels (default: every class)")
    add_prompt_options(parser)
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    add_sampler_option(parser)
    add_cfg_scale_option(parser, pixart=True)
    parser.add_argument("--seed", type=int, default=0, help="base seed; sample k uses seed + k (default 0)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="images per global batch, per forward pass (default 16); part of the run's settings")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="weights dtype for diffusers models (default float32)")
    parser.add_argument("--out", default=None, help="output folder (default: SAMPLE_DIR/<name from every setting>)")
    parser.add_argument("--sample-dir", default="samples", help="parent of the default output folder (default samples)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dqar_options(parser)


def _counts(args, items: int) -> tuple[int, int]:
    """(num_samples, per_item) from --per-class or --n (per class / prompt) or --num-samples (total)."""
    if args.num_samples is not None:
        if args.num_samples < 1:
            raise UsageError(f"--num-samples={args.num_samples} is not allowed: must be >= 1")
        return args.num_samples, math.ceil(args.num_samples / items)
    option, n = ("--per-class", args.per_class) if args.per_class is not None else ("--n", args.n)
    n = 1 if n is None else n
    if n < 1:
        raise UsageError(f"{option}={n} is not allowed: must be >= 1")
    return n * items, n


def _cfg_scale(args, kind: str, model=None) -> float:
    if args.cfg_scale is not None:
        if not (math.isfinite(args.cfg_scale) and args.cfg_scale >= 0):
            raise UsageError(f"--cfg-scale={args.cfg_scale} is not allowed: must be a finite number >= 0")
        return args.cfg_scale
    if kind in ("pixart", "text"):
        from dqar.models.pipelines import text_family

        return text_family(model).default_cfg  # the pipeline's own default (Flux: 1, no true CFG)
    from .common import default_cfg_scale

    return default_cfg_scale(args.model)


def run(args: argparse.Namespace) -> int:
    import torch

    from dqar.models import hub
    from dqar.harness.distributed import init_distributed, shutdown
    from dqar.harness.sharded_sampling import SampleJob, folder_name, run_job

    from .common import parse_classes, resolve_model, setup_torch

    if args.batch_size < 1:
        raise UsageError(f"--batch-size={args.batch_size} is not allowed: must be >= 1")
    if args.steps < 1:
        raise UsageError(f"--steps={args.steps} is not allowed: must be >= 1")
    check_seed(args.seed)
    if args.out:
        check_out_dir(args.out)
    else:
        check_out_dir(args.sample_dir, "--sample-dir")
    prompts = read_prompts(args)
    device = setup_torch(args)
    dqar_cfg = config_from_args(args)
    if dqar_cfg.schedule == "none":
        dqar_cfg = None  # the plain model, no hooks: the baseline a DQAR run is scored against
    info = init_distributed(device.type)
    model = controller = None
    try:
        if device.type == "cuda" and info.world_size > 1:
            # One GPU per rank: --device cuda means "my GPU" under torchrun.
            device = torch.device("cuda", info.local_rank)
        quiet = not info.is_main
        if hub.is_diffusers_spec(args.model):
            pipe = hub.load_pipeline(args.model, device=device, dtype=args.dtype)
            kind = {"dit": "hub-dit"}.get(hub.pipeline_kind(pipe), hub.pipeline_kind(pipe))
            sampler = resolve_sampler(args, kind)
            hub.set_sampler(pipe, sampler)
            model = pipe
        else:
            # Preset weights are seeded apart from --seed, so the sample seed never changes the model.
            model, _ = resolve_model(args.model, seed=0, quiet=quiet)
            model = model.to(device)
            kind = "dit"
            sampler = resolve_sampler(args, kind)
        options = {}
        if kind in ("pixart", "text"):
            if args.classes is not None:
                raise UsageError(f"--classes is for class-conditional models; {args.model} is text-to-image "
                                 "(use --prompt or --prompts-file)")
            if not prompts:
                raise UsageError(f"{args.model} is a text-to-image model: pass --prompt or --prompts-file")
            options = resolve_pipeline_options(args, model, _cfg_scale(args, kind, model))
            labels, items = [], prompts
        else:
            refuse_text_options(args, args.model)
            if kind == "dit" and args.dtype != "float32":
                raise UsageError(f"--dtype={args.dtype} applies to diffusers models; {args.model} runs in float32")
            n_classes = hub.num_classes(model) if kind == "hub-dit" else model.config.num_classes
            labels = parse_classes(args.classes, n_classes, 1)
            items = labels
        num_samples, per_item = _counts(args, len(items))
        check_seed(args.seed, count=num_samples)
        job = SampleJob(model=args.model, kind=kind, num_samples=num_samples, steps=args.steps,
                        sampler=sampler, cfg_scale=_cfg_scale(args, kind, model), seed=args.seed,
                        batch_size=args.batch_size, per_item=per_item, labels=tuple(labels),
                        prompts=tuple(prompts), negative_prompt=args.negative_prompt,
                        dtype=args.dtype if kind != "dit" else "float32",
                        dqar=_dqar_identity(dqar_cfg), options=tuple(sorted(options.items())))
        if kind == "dit":
            from dqar.sampling import validate_sampling_args

            # Our sampler's limits (e.g. steps <= the 1000 training timesteps), before run.json is written.
            validate_sampling_args(job.sampler, job.steps, job.cfg_scale)
        out_dir = Path(args.out) if args.out else check_out_dir(Path(args.sample_dir) / folder_name(job), "--out")

        if dqar_cfg is not None:
            from dqar.method.hooks import apply_dqar

            controller = apply_dqar(model, dqar_cfg)
        generate = _make_generate(job, model, device, controller)
        result = run_job(job, generate, out_dir, info, controller=controller, progress=not args.no_progress)
        if info.is_main:
            print(f"{result.written} written, {result.skipped} already present, "
                  f"{result.seconds:.1f} s -> {result.out_dir}")
        return 0
    finally:
        if controller is not None:
            from dqar.method.hooks import remove_dqar

            remove_dqar(model)
        shutdown(info)


def _make_generate(job, model, device, controller):
    """Bind the model and the job's labels/prompts into generate(indices, seeds) -> uint8 (N, H, W, C)."""
    from dqar.models import hub

    if job.kind == "dit":
        from dqar.sampling import sample, to_uint8

        def generate(indices, seeds):
            labels = [job.label(i) for i in indices]
            x = sample(model, labels, seeds, steps=job.steps, sampler=job.sampler, cfg_scale=job.cfg_scale,
                       device=device)
            if not bool(x.isfinite().all()):
                raise UsageError(f"--model {job.model}: sampling produced NaN or inf values (images {indices[0]}.."
                                 f"{indices[-1]}); the weights or the settings make the model diverge, and its "
                                 "images would be flat; this batch was not written")
            return to_uint8(x)
    elif job.kind == "hub-dit":
        def generate(indices, seeds):
            return hub.generate(model, seeds, class_labels=[job.label(i) for i in indices], steps=job.steps,
                                cfg_scale=job.cfg_scale, controller=controller)
    else:
        def generate(indices, seeds):
            return hub.generate(model, seeds, prompts=[job.prompt(i) for i in indices], steps=job.steps,
                                cfg_scale=job.cfg_scale, negative_prompt=job.negative_prompt,
                                controller=controller, **dict(job.options))
    return generate


def _dqar_identity(config) -> dict | None:
    """The config as the run's identity; a policy run also names its file's bytes, so a resumed run never
    mixes images made under an old and a new policy (the shipped one changes with retraining)."""
    if config is None:
        return None
    out = config.to_dict()
    if config.schedule == "policy":
        import hashlib

        from dqar.method.policy import shipped_policy_path

        path = Path(config.policy_path) if config.policy_path else shipped_policy_path()
        out["policy_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
    return out


if __name__ == "__main__":
    from . import main

    sys.exit(main(["sample", *sys.argv[1:]]))

