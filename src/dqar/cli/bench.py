"""`dqar bench`: one DQAR configuration against a baseline (default: the uncached model) on the same seeds.

Timing interleaves baseline and DQAR runs after warm-up and reports medians; quality (FID against the
uncached samples and against held-out real digits, PSNR, SSIM, evaluator accuracy) is measured only for
the embedded trained model, whose evaluator and real data exist; random-weight presets get nulls. Both
contenders' work share (executed attention / MLP / block calls) is counted.

    dqar bench --schedule interval --interval 3 --targets attn,mlp --baseline seacache \
               --baseline-option threshold=0.1 --baseline-option max_consecutive_cached=3
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from . import UsageError
from .common import add_cfg_scale_option, add_features_option, add_model_options, default_cfg_scale
from .pipeline_options import (add_prompt_options, add_sampler_option, read_prompts, refuse_text_options,
                               resolve_pipeline_options, resolve_sampler)

_DQAR_OPTIONS = "dqar.cli.dqar_options"
# Mirrors dqar.harness.baselines.BASELINES without importing torch (a test keeps them equal).
BASELINE_CHOICES = ("none", "ptq-int8", "pab", "taylorseer", "seacache", "fastercache", "fbc", "magcache")
BASELINE_HELP = ("'ptq-int8' = int8 dynamic weight quantization without reuse, "
                 "'pab' = diffusers' pyramid attention broadcast (skip range 2 inside timesteps (100, 800)); "
                 "diffusers' other caches on the same weights ported to diffusers' DiT, configured for a DiT: "
                 "'taylorseer' (Taylor forecast of attention and MLP outputs), 'seacache' (spectral residual "
                 "cache), 'fastercache', 'fbc' (first-block cache), 'magcache' (magnitude-ratio cache, "
                 "calibrated on the run's steps, sampler and guidance scale unless its options say otherwise)")


def parse_option_items(items, option: str = "--baseline-option") -> dict:
    """['threshold=0.1', ...] -> {'threshold': '0.1', ...} (values stay text for the baseline to parse)."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise UsageError(f"{option} {item!r} must look like KEY=VALUE (e.g. threshold=0.1)")
        if key in out:
            raise UsageError(f"{option} names {key!r} twice ({out[key]!r} and {value.strip()!r}); give it once")
        out[key] = value.strip()
    return out


def check_baseline_options(name: str, raw: dict, option: str = "--baseline-option") -> dict:
    """The options of baseline `name` parsed by the baseline itself; UsageError naming option, value and what
    is allowed."""
    from dqar.harness.peers import validate_options

    try:
        return validate_options(name, raw)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _dqar_options():
    # Looked up lazily so the rest of the CLI still builds if the core's option module is missing.
    if importlib.util.find_spec(_DQAR_OPTIONS) is None:
        return None
    return importlib.import_module(_DQAR_OPTIONS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    add_features_option(parser)
    parser.add_argument("--classes", default=None,
                        help="comma list of class labels cycled over the images (default: every class in turn)")
    parser.add_argument("--n", type=int, default=100, help="images per generation, one batch (default 100)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    add_sampler_option(parser)
    add_cfg_scale_option(parser)
    add_prompt_options(parser)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="weights dtype for diffusers pipelines (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; image k uses seed + k (default 0)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds, each one baseline run then one DQAR run (default 3)")
    parser.add_argument("--warmup-runs", type=int, default=1,
                        help="untimed runs of each before timing (default 1)")
    parser.add_argument("--baseline", default="none", metavar="NAME",
                        help=f"what DQAR is timed against, one of {', '.join(BASELINE_CHOICES)} (default none): "
                             f"'none' = the uncached model, {BASELINE_HELP}. Quality is always measured against the uncached full-precision "
                             "samples")
    parser.add_argument("--baseline-option", action="append", default=None, metavar="KEY=VALUE",
                        help="a setting of --baseline, repeatable, e.g. --baseline-option threshold=0.1 "
                             "--baseline-option timestep_range=100,700 (the settings per baseline are listed in "
                             "dqar.harness.peers; an unknown name is refused with the allowed ones, a bad value with "
                             "what is allowed; 'none' and 'ptq-int8' take none; default: the baseline's own settings)")
    parser.add_argument("--json", default=None, metavar="PATH|-",
                        help="write the result record as JSON to PATH, or to stdout with '-' (the table then "
                             "goes to stderr; default: no JSON)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (default: a bar on stderr counting generations, with an ETA)")
    opts = _dqar_options()
    if opts is not None:
        opts.add_dqar_options(parser)


def _check_args(args: argparse.Namespace) -> dict:
    """Every argument checked before any model loads; returns the baseline's parsed options."""
    if args.baseline not in BASELINE_CHOICES:
        raise UsageError(f"--baseline={args.baseline!r} is not known; allowed: {', '.join(BASELINE_CHOICES)}")
    for name in ("n", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name}={getattr(args, name)} is not allowed: must be >= 1")
    if args.warmup_runs < 0:
        raise UsageError(f"--warmup-runs={args.warmup_runs} is not allowed: must be >= 0")
    if args.cfg_scale is not None and not args.cfg_scale >= 0:
        raise UsageError(f"--cfg-scale={args.cfg_scale} is not allowed: must be >= 0")
    if args.baseline == "fastercache" and args.cfg_scale == 1:
        raise UsageError("--baseline fastercache needs classifier-free guidance (it approximates the unconditional "
                         "branch): give --cfg-scale other than 1")
    options = check_baseline_options(args.baseline, parse_option_items(args.baseline_option))
    if args.json not in (None, "-"):
        # Checked before any work: a bad path must not cost the whole run (issue: IsADirectoryError at the end).
        if Path(args.json).is_dir():
            raise UsageError(f"--json={args.json!r} is a folder; give a file such as "
                             f"{str(Path(args.json) / 'bench.json')!r}, or '-' for stdout")
        parent = Path(args.json).parent
        if not parent.is_dir():
            raise UsageError(f"--json={args.json!r}: folder {str(parent)!r} does not exist")
    return options


def run(args: argparse.Namespace) -> int:
    opts = _dqar_options()
    if opts is None:
        raise UsageError("this install has no DQAR options module (dqar.cli.dqar_options): the DQAR core is missing")
    from dqar.models import hub

    pipeline = hub.is_diffusers_spec(args.model)
    if args.cfg_scale is None and not pipeline:
        args.cfg_scale = default_cfg_scale(args.model)
    baseline_options = _check_args(args)
    config = opts.config_from_args(args)

    from dqar.harness.baselines import BaselineUnavailable, make_baseline
    from dqar.harness.bench import baseline_run_options, format_table, run_bench, variant_settings

    from .common import parse_classes, quality_tools, resolve_model, setup_torch

    device = setup_torch(args)
    seeds = [args.seed + i for i in range(args.n)]
    runner = None
    if pipeline:
        model, labels, runner = _pipeline_setup(args, device, seeds)
        description = f"{type(model).__name__} {args.model}"
    else:
        refuse_text_options(args, args.model)
        if args.dtype != "float32":
            raise UsageError(f"--dtype={args.dtype} applies to diffusers pipelines; {args.model} runs in float32")
        args.sampler = resolve_sampler(args, "dit")
        model, description = resolve_model(args.model, seed=args.seed)
        model = model.to(device).eval()
        classes = parse_classes(args.classes, model.config.num_classes, args.n)
        labels = [classes[i % len(classes)] for i in range(args.n)]

    run_options = baseline_run_options(args.baseline, baseline_options, steps=args.steps, sampler=args.sampler,
                                       cfg_scale=args.cfg_scale)
    try:
        baseline_model = None if pipeline else make_baseline(args.baseline, model, device, options=run_options)
    except BaselineUnavailable as exc:
        raise UsageError(str(exc)) from None

    evaluator, extractor, real_stats = quality_tools(args.model, args.features, device)

    record = run_bench(model, config, labels=labels, seeds=seeds, steps=args.steps, sampler=args.sampler,
                       runner=runner, cfg_scale=args.cfg_scale, repeats=args.repeats, warmup_runs=args.warmup_runs,
                       evaluator=evaluator, extractor=extractor, real_features=real_stats,
                       baseline_model=baseline_model, baseline_name=args.baseline,
                       baseline_settings=variant_settings(args.baseline, baseline_model, run_options),
                       device=device, progress=not args.no_progress)

    title = (f"dqar bench: {description}, {args.n} images x {args.steps} {args.sampler} steps, "
             f"cfg {args.cfg_scale}, baseline {args.baseline}"
             + "".join(f" {k}={v}" for k, v in baseline_options.items())
             + f", {args.repeats} repeats on {device}")
    # allow_nan=False: the record must be strict JSON (no Infinity/NaN) for any consumer.
    text = json.dumps(record, indent=2, allow_nan=False)
    if args.json == "-":
        sys.stdout.write(text + "\n")
        print(format_table(record, title=title), file=sys.stderr)
    else:
        if args.json is not None:
            Path(args.json).write_text(text + "\n")
        print(format_table(record, title=title))
    return 0


def _pipeline_setup(args, device, seeds):
    """(pipeline, labels, runner) for a diffusers pipeline: the runner makes one generation of the N images as
    floats in [-1, 1], the prompt's token count announced to DQAR when it is applied."""
    import torch

    from dqar.method.hooks import get_controller
    from dqar.models import hub

    if args.baseline != "none":
        raise UsageError(f"--baseline {args.baseline} runs on the digits DiT only; a diffusers pipeline is timed "
                         "against its uncached self (--baseline none)")
    pipe = hub.load_pipeline(args.model, device=device, dtype=args.dtype)
    kind = hub.pipeline_kind(pipe)
    args.sampler = resolve_sampler(args, "text" if kind == "text" else "hub-dit")
    hub.set_sampler(pipe, args.sampler)
    if kind == "dit":
        refuse_text_options(args, args.model)
        if args.cfg_scale is None:
            args.cfg_scale = default_cfg_scale(args.model)
        from .common import parse_classes

        classes = parse_classes(args.classes, hub.num_classes(pipe), args.n)
        labels = [classes[i % len(classes)] for i in range(args.n)]
        inputs, options = {"class_labels": labels}, {}
    else:
        from dqar.models.pipelines import text_family

        if args.classes is not None:
            raise UsageError(f"--classes is for class-conditional models; {args.model} is text-to-image "
                             "(use --prompt or --prompts-file)")
        prompts = read_prompts(args)
        if not prompts:
            raise UsageError(f"{args.model} is a text-to-image model: pass --prompt or --prompts-file")
        if args.cfg_scale is None:
            args.cfg_scale = text_family(pipe).default_cfg
        options = resolve_pipeline_options(args, pipe, args.cfg_scale)
        labels = list(range(args.n))          # only counts the images; a text model has no class
        inputs = {"prompts": [prompts[i % len(prompts)] for i in range(args.n)],
                  "negative_prompt": args.negative_prompt}

    def runner(m):
        images = hub.generate(m, seeds, steps=args.steps, cfg_scale=args.cfg_scale, controller=get_controller(m),
                              **inputs, **options)
        return images.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0

    return pipe, labels, runner

