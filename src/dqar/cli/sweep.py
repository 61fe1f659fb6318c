"""`dqar sweep`: a grid of DQAR configurations plus named baselines, one JSON line per finished point.

    dqar sweep --grid warmup=0.2,0.3,0.4 layers=0.33,0.66,1.0 --grid order=deep layers=0.33,1.0 \\
               --baselines none,static,ptq-int8,interval-attn-mlp,kv --n 200 --steps 50 --out results.jsonl

Each `--grid` is one Cartesian product; give it several times for several products (duplicates are
measured once). A grid name is a `dqar generate` option (`layers`, `cache-bits`) or a DQARConfig field
(`layer_fraction`, `cache_bits`); values are parsed like that option. Values are separated by commas,
or by semicolons for fields whose single value already contains commas (`targets=attn;attn,mlp`,
`snr-range=0.5,50;1,20`). Fields not in a grid take the DQAR options given (`--tau0 30`), then
DQARConfig's defaults. Entropy per step is recorded on the `none` row (a short hooked pass beside the
timed reference) and wherever the schedule needs it (gate, policy); other points are timed without it.

Baselines other than DQAR configurations take settings with `--baseline-option NAME:KEY=VALUE` (repeatable);
several values separated by ';' give one point each (a product over that baseline's options, like a grid):

    dqar sweep --baselines none,seacache,magcache,taylorseer \
               --baseline-option 'seacache:threshold=0.1;0.25;0.5' --baseline-option taylorseer:max_order=2 ...

Such a point is named after its options ('seacache threshold=0.1'), and its row records every setting it ran
with (`variant_settings`). Every row records the share of attention, MLP and block calls the point executed
(`calls`), DQAR's and every baseline's alike. The guidance scale defaults to the model card's (as in `dqar
generate`), and each row stores the scale it ran at.

Re-running the same command resumes: points whose key (config + settings) is already in `--out` are
skipped. Sample images of each point are kept in `<out stem>.samples/` for `dqar report`. A second sweep
into a results file that a running sweep holds is refused at once (exit 2), never run beside it.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from . import UsageError
from .bench import BASELINE_HELP, check_baseline_options
from .common import add_cfg_scale_option, add_features_option, add_model_options, default_cfg_scale
from .dqar_options import OPTIONS, add_dqar_options, config_overrides

# Mirrors dqar.harness.sweep.BASELINES without importing torch at module top (a test keeps them equal).
BASELINE_NAMES = ("none", "static", "ptq-int8", "interval-attn-mlp", "kv", "pab", "taylorseer", "seacache",
                  "fastercache", "fbc", "magcache")
# Names that run the loaded model under a DQAR configuration: they take no --baseline-option.
DQAR_BASELINES = ("none", "static", "interval-attn-mlp", "kv")
# Fields whose one value is itself a comma list: their value lists are separated by ';' only.
_COMPOUND = {"snr_range", "targets", "kv_bits", "depth_phases"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    add_features_option(parser)
    parser.add_argument("--grid", nargs="+", action="append", default=None, metavar="NAME=V1,V2",
                        help="one Cartesian product of config values, e.g. --grid warmup=0.2,0.4 layers=0.33,1.0; "
                             "repeat --grid for more products")
    parser.add_argument("--baselines", default="", metavar="LIST",
                        help=f"comma list of named comparison points: {', '.join(BASELINE_NAMES)} "
                             "(DQAR configurations: none = the uncached model; static: warmup 0.4, layers 0.33; "
                             "interval-attn-mlp: FORA, attn+mlp recomputed every 3rd step; kv: K/V caching on the "
                             f"static schedule. Baseline models: {BASELINE_HELP})")
    parser.add_argument("--baseline-option", action="append", default=None, metavar="NAME:KEY=VALUE",
                        help="a setting of baseline NAME (named in --baselines), repeatable, e.g. "
                             "--baseline-option seacache:threshold=0.1 --baseline-option pab:timestep_range=100,700; "
                             "several values separated by ';' (quote them) give one point each, e.g. "
                             "'seacache:threshold=0.1;0.25;0.5'. The settings per baseline are listed in "
                             "dqar.harness.peers; an unknown name is refused with the allowed ones, a bad value with "
                             "what is allowed, before anything runs; "
                             f"{', '.join(DQAR_BASELINES)} and ptq-int8 take none (default: each baseline's own "
                             "settings)")
    parser.add_argument("--out", required=True, help="results file (JSON lines); appended to, resumed from")
    parser.add_argument("--n", type=int, default=100, help="images per point, one batch (default 100)")
    parser.add_argument("--classes", default=None,
                        help="comma list of class labels cycled over the images (default: every class in turn)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--sampler", default="ddim", choices=("ddim", "dpm"), help="scheduler (default ddim)")
    add_cfg_scale_option(parser)
    parser.add_argument("--seed", type=int, default=0, help="base seed; image k uses seed + k (default 0)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed generations per point and of the shared reference; the median counts "
                             "(default 1: the report then shows the FLOP bound only, since one run has no spread; "
                             "give >= 2, better 3 with --warmup-runs 1, for measured speedups)")
    parser.add_argument("--warmup-runs", type=int, default=0,
                        help="untimed generations before each point's timing (default 0: a generation is long "
                             "next to one-time costs; raise it for tiny runs)")
    parser.add_argument("--save-samples", type=int, default=32,
                        help="images per point kept for the report's image grid (default 32)")
    parser.add_argument("--max-points", type=int, default=None,
                        help="stop after measuring this many new points (the rest on the next run)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (default: a bar on stderr counting generations, with an ETA)")
    parser.add_argument("--evaluator", default=None, metavar="PATH",
                        help="digits evaluator weights for FID/accuracy with a --model weights file (e.g. a "
                             "training checkpoint); --model embedded uses the shipped evaluator")
    add_dqar_options(parser)


def _field_table() -> dict[str, tuple[str, object, str]]:
    """Every accepted grid name -> (field, parser, shown name)."""
    table = {}
    for option, (fld, parse, _) in OPTIONS.items():
        table[option] = (fld, parse, option)
        table[fld] = (fld, parse, option)
        table[fld.replace("_", "-")] = (fld, parse, option)
    return table


def parse_grid_token(token: str) -> tuple[str, list]:
    """'layers=0.33,1.0' -> ('layer_fraction', [0.33, 1.0]); UsageError naming what is wrong."""
    name, sep, values = token.partition("=")
    name = name.strip()
    if not sep or not name:
        raise UsageError(f"--grid item {token!r} must look like NAME=V1,V2 (e.g. warmup=0.2,0.4)")
    table = _field_table()
    if name not in table:
        allowed = ", ".join(sorted(OPTIONS))
        raise UsageError(f"--grid name {name!r} is not a DQAR option or config field; allowed: {allowed} "
                         "(or their DQARConfig field names)")
    fld, parse, shown = table[name]
    sep_char = ";" if fld in _COMPOUND or ";" in values else ","
    texts = [v.strip() for v in values.split(sep_char)]
    if not values.strip() or any(not v for v in texts):
        raise UsageError(f"--grid {token!r}: empty value in the list for {name!r}; give values like "
                         f"{name}=A{sep_char}B")
    parsed = []
    for text in texts:
        try:
            parsed.append(parse(text))
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--grid {token!r}: value {text!r} for {shown!r} could not be parsed "
                             f"({getattr(parse, '__name__', parse)}: {exc})") from None
    return fld, parsed


def parse_grids(grids: list[list[str]] | None) -> list[dict]:
    """Each --grid's product as config-override dicts, in order (a field named twice in one grid is an error)."""
    cells = []
    for tokens in grids or []:
        axes: dict[str, list] = {}
        for token in tokens:
            fld, values = parse_grid_token(token)
            if fld in axes:
                raise UsageError(f"--grid names {fld!r} twice in one product ({' '.join(tokens)})")
            axes[fld] = values
        for combo in itertools.product(*axes.values()):
            cells.append(dict(zip(axes, combo)))
    return cells


def parse_baselines(text: str) -> list[str]:
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    for name in names:
        if name not in BASELINE_NAMES:
            raise UsageError(f"--baselines name {name!r} is not known; allowed: {', '.join(BASELINE_NAMES)}")
    return list(dict.fromkeys(names))


def parse_baseline_options(items, names) -> dict[str, dict[str, list]]:
    """['seacache:threshold=0.1;0.2', ...] -> {'seacache': {'threshold': [0.1, 0.2]}}, each value parsed by the
    baseline; UsageError naming what is wrong (the form, a baseline not in --baselines, an option or value)."""
    out: dict[str, dict[str, list]] = {}
    for item in items or []:
        name, sep, rest = item.partition(":")
        key, eq, values = rest.partition("=")
        name, key = name.strip(), key.strip()
        if not sep or not eq or not name or not key:
            raise UsageError(f"--baseline-option {item!r} must look like NAME:KEY=VALUE "
                             "(e.g. seacache:threshold=0.1, or 'seacache:threshold=0.1;0.2' for two points)")
        if name not in BASELINE_NAMES:
            raise UsageError(f"--baseline-option {item!r}: baseline {name!r} is not known; allowed: "
                             f"{', '.join(BASELINE_NAMES)}")
        if name not in names:
            raise UsageError(f"--baseline-option {item!r}: baseline {name!r} is not in --baselines; add it there")
        if name in DQAR_BASELINES:
            raise UsageError(f"--baseline-option {item!r}: {name!r} runs the model under a DQAR configuration and "
                             "takes no options; vary DQAR with --grid or the DQAR options")
        texts = [v.strip() for v in values.split(";")]
        if any(not v for v in texts):
            raise UsageError(f"--baseline-option {item!r}: empty value for {key!r}; give values like {key}=A;B")
        per = out.setdefault(name, {})
        if key in per:
            raise UsageError(f"--baseline-option names {name}:{key} twice; give its values once, separated by ';'")
        per[key] = [check_baseline_options(name, {key: text})[key] for text in texts]
    return out


def _value_text(v) -> str:
    if isinstance(v, (tuple, list)):
        return "/".join(_value_text(x) for x in v)
    return str(v)


def build_points(args: argparse.Namespace):
    """Every SweepPoint the options ask for, configs validated (UsageError before anything runs)."""
    from dqar.method.config import DQARConfig
    from dqar.harness.sweep import SweepPoint, baseline_point

    # Entropy is measured only where a schedule needs it (gate, policy) and for the report's per-step
    # curves on the "none" row: measuring it on every point would slow each one against the unhooked
    # reference and bias its speedup down.
    base_values = config_overrides(args)
    try:
        base = DQARConfig(**base_values)
    except ValueError as exc:
        raise UsageError(f"DQAR options: {exc}") from None
    names = parse_baselines(args.baselines)
    options = parse_baseline_options(args.baseline_option, names)
    if "fastercache" in names and args.cfg_scale == 1:
        raise UsageError("--baselines fastercache needs classifier-free guidance (it approximates the unconditional "
                         "branch): give --cfg-scale other than 1")
    points = []
    for name in names:
        axes = options.get(name, {})
        for combo in itertools.product(*axes.values()):
            try:
                points.append(baseline_point(name, base, dict(zip(axes, combo))))
            except ValueError as exc:
                raise UsageError(f"--baselines {name}: {exc}") from None
    for cell in parse_grids(args.grid):
        values = base.to_dict()
        values.update(cell)
        name = " ".join(f"{OPTIONS_BY_FIELD.get(k, k)}={_value_text(v)}" for k, v in cell.items())
        try:
            config = DQARConfig.from_dict(values)
        except ValueError as exc:
            raise UsageError(f"--grid point {name!r}: {exc}") from None
        points.append(SweepPoint(name=name, kind="grid", config=config, grid=dict(cell)))
    if not points:
        raise UsageError("nothing to run: give at least one --grid or --baselines")
    return points


OPTIONS_BY_FIELD = {fld: option for option, (fld, _, _) in OPTIONS.items()}


def _check_args(args: argparse.Namespace) -> None:
    for name in ("n", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name}={getattr(args, name)} is not allowed: must be >= 1")
    for name in ("warmup_runs", "save_samples"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: must be >= 0")
    if args.max_points is not None and args.max_points < 0:
        raise UsageError(f"--max-points={args.max_points} is not allowed: must be >= 0")
    if not args.cfg_scale >= 0:
        raise UsageError(f"--cfg-scale={args.cfg_scale} is not allowed: must be >= 0")
    if args.evaluator is not None and not Path(args.evaluator).is_file():
        raise UsageError(f"--evaluator={args.evaluator!r} is not a file")
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out={args.out!r} is a folder; give a results file such as {str(out / 'results.jsonl')!r}")
    if not out.parent.is_dir():
        raise UsageError(f"--out={args.out!r}: folder {str(out.parent)!r} does not exist")
    side = out.with_name(out.stem + ".samples")
    if side.exists() and not side.is_dir():
        raise UsageError(f"--out={args.out!r}: {str(side)!r}, where its samples go, is not a folder; move it away")


def run(args: argparse.Namespace) -> int:
    if args.cfg_scale is None:
        args.cfg_scale = default_cfg_scale(args.model)     # the model card's, as `dqar generate` does
    _check_args(args)
    points = build_points(args)       # all grid/baseline errors surface here, before any model loads

    from dqar.harness.results_file import ResultsFileBusy, results_lock

    try:
        # Taken before the model loads, so a second sweep into the same file is refused at once.
        with results_lock(args.out):
            return _run(args, points)
    except ResultsFileBusy as exc:
        raise UsageError(str(exc)) from None


def _run(args: argparse.Namespace, points) -> int:
    from dqar.harness.sweep import SweepSettings, run_sweep, weights_digest

    from .common import parse_classes, quality_tools, resolve_model, setup_torch

    device = setup_torch(args)
    model, description = resolve_model(args.model, seed=args.seed)
    model = model.to(device).eval()
    classes = parse_classes(args.classes, model.config.num_classes, args.n)
    settings = SweepSettings(model=args.model, n=args.n, classes=tuple(classes), steps=args.steps,
                             sampler=args.sampler, cfg_scale=args.cfg_scale, seed=args.seed,
                             weights_sha256=weights_digest(model), features=args.features)
    evaluator, extractor, real_stats = quality_tools(args.model, args.features, device, args.evaluator)

    print(f"dqar sweep: {len(points)} points on {description}, {args.n} images x {args.steps} {args.sampler} "
          f"steps, cfg {args.cfg_scale}, {args.repeats} timed run(s) each -> {args.out}", file=sys.stderr)
    result = run_sweep(model, points, settings, args.out, repeats=args.repeats, warmup_runs=args.warmup_runs,
                       device=device, evaluator=evaluator, extractor=extractor, real_features=real_stats,
                       save_samples=args.save_samples, max_points=args.max_points,
                       progress=not args.no_progress,
                       log=lambda msg: print(f"dqar sweep: {msg}", file=sys.stderr))
    left = len(points) - result["skipped"] - result["computed"]
    print(f"dqar sweep: {result['computed']} measured, {result['skipped']} already in {args.out}"
          + (f", {left} left (re-run to continue)" if left else ""), file=sys.stderr)
    return 0
