"""`dqar bench`: one DQAR configuration against the uncached baseline on the same seeds.

Timing interleaves baseline and DQAR runs after warm-up and reports medians; quality (FID against the
uncached samples and against held-out real digits, PSNR, SSIM, evaluator accuracy) is measured only for
the embedded trained model, whose evaluator and real data exist; random-weight presets get nulls.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from . import UsageError
from .common import add_features_option, add_model_options

_DQAR_OPTIONS = "dqar.cli.dqar_options"
BASELINE_CHOICES = ("none", "ptq-int8", "pab")   # mirrors dqar.harness.baselines.BASELINES without importing torch


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
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "dpm"), help="scheduler (default ddim)")
    parser.add_argument("--cfg-scale", type=float, default=1.5, help="classifier-free guidance scale (default 1.5)")
    parser.add_argument("--seed", type=int, default=0, help="base seed; image k uses seed + k (default 0)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds, each one baseline run then one DQAR run (default 3)")
    parser.add_argument("--warmup-runs", type=int, default=1,
                        help="untimed runs of each before timing (default 1)")
    parser.add_argument("--baseline", default="none", choices=BASELINE_CHOICES,
                        help="what DQAR is timed against: 'none' = the uncached model (default), 'ptq-int8' = "
                             "int8 dynamic weight quantization without reuse, 'pab' = diffusers' pyramid attention "
                             "broadcast on the same weights. Quality is always measured "
                             "against the uncached full-precision samples")
    parser.add_argument("--json", default=None, metavar="PATH|-",
                        help="write the result record as JSON to PATH, or to stdout with '-' (the table then "
                             "goes to stderr; default: no JSON)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (default: a bar on stderr counting generations, with an ETA)")
    opts = _dqar_options()
    if opts is not None:
        opts.add_dqar_options(parser)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("n", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name}={getattr(args, name)} is not allowed: must be >= 1")
    if args.warmup_runs < 0:
        raise UsageError(f"--warmup-runs={args.warmup_runs} is not allowed: must be >= 0")
    if not args.cfg_scale >= 0:
        raise UsageError(f"--cfg-scale={args.cfg_scale} is not allowed: must be >= 0")
    if args.json not in (None, "-"):
        # Checked before any work: a bad path must not cost the whole run (issue: IsADirectoryError at the end).
        if Path(args.json).is_dir():
            raise UsageError(f"--json={args.json!r} is a folder; give a file such as "
                             f"{str(Path(args.json) / 'bench.json')!r}, or '-' for stdout")
        parent = Path(args.json).parent
        if not parent.is_dir():
            raise UsageError(f"--json={args.json!r}: folder {str(parent)!r} does not exist")


def run(args: argparse.Namespace) -> int:
    opts = _dqar_options()
    if opts is None:
        raise UsageError("this install has no DQAR options module (dqar.cli.dqar_options): the DQAR core is missing")
    _check_args(args)
    config = opts.config_from_args(args)

    from dqar.harness.baselines import BaselineUnavailable, make_baseline
    from dqar.harness.bench import format_table, run_bench

    from .common import parse_classes, quality_tools, resolve_model, setup_torch

    device = setup_torch(args)
    model, description = resolve_model(args.model, seed=args.seed)
    model = model.to(device).eval()
    classes = parse_classes(args.classes, model.config.num_classes, args.n)
    labels = [classes[i % len(classes)] for i in range(args.n)]
    seeds = [args.seed + i for i in range(args.n)]

    try:
        baseline_model = make_baseline(args.baseline, model, device)
    except BaselineUnavailable as exc:
        raise UsageError(str(exc)) from None

    evaluator, extractor, real_stats = quality_tools(args.model, args.features, device)

    record = run_bench(model, config, labels=labels, seeds=seeds, steps=args.steps, sampler=args.sampler,
                       cfg_scale=args.cfg_scale, repeats=args.repeats, warmup_runs=args.warmup_runs,
                       evaluator=evaluator, extractor=extractor, real_features=real_stats,
                       baseline_model=baseline_model, device=device, progress=not args.no_progress)

    title = (f"dqar bench: {description}, {args.n} images x {args.steps} {args.sampler} steps, "
             f"cfg {args.cfg_scale}, baseline {args.baseline}, {args.repeats} repeats on {device}")
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
