"""`dqar train-policy --features v2`: rows from runs that forecast, labels from the measured harm, the MLP.

Writes to --out: `rows.jsonl` (one row per (run, step, layer, branch) where a module computed with a history
that could have forecast: the v2 features and the measured harm), `policy_digits.safetensors` + `.json`
(format dqar-policy/2; the card names the features it needs) and `report.json`. See docs/POLICY.md,
"Policy v2 (issue 17)", and dqar.harness.policy_v2 for the data and labels.
"""
from __future__ import annotations

import argparse
import math

from . import UsageError

V2_DEFAULTS = {"n_runs": 12, "per_class": 10, "p_forecast": "0.3,0.5,0.7,0.85", "max_age": 6, "forecast_order": 2,
               "label_tolerance": None, "warmup": 0.0, "label_scale": "none", "max_cache_age": None,
               "error_images": 0, "targets": "attn,mlp", "branch_decisions": "each", "error_targets": None}
TARGET_CHOICES = ("attn,mlp", "block")


def add_v2_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", choices=("v1", "v2", "v2-noentropy"), default="v1",
                        help="v1: the seed's five features, labels from uncached traces (default); v2: adds cache "
                             "age and the last measured forecast error, labels from runs that forecast; "
                             "v2-noentropy: v2 without the attention entropy (no attention statistic at run time)")
    d = V2_DEFAULTS
    parser.add_argument("--n-runs", type=int, default=None,
                        help=f"v2: training generations, one batch each (default {d['n_runs']})")
    parser.add_argument("--per-class", type=int, default=None,
                        help=f"v2: images per class in each run's batch (default {d['per_class']}: the benchmark's "
                             "batch, so the measured errors are maxima over as many images as in use)")
    parser.add_argument("--p-forecast", default=None,
                        help=f"v2: comma list of forecast probabilities, one per run in turn (default {d['p_forecast']})")
    parser.add_argument("--max-age", type=int, default=None,
                        help=f"v2: oldest cache a training run forecasts from; the policy never goes past it "
                             f"(default {d['max_age']})")
    parser.add_argument("--forecast-order", type=int, default=None,
                        help=f"v2: forecast order of the training runs, to use with the policy (default "
                             f"{d['forecast_order']})")
    parser.add_argument("--label-tolerance", type=float, default=None,
                        help="v2: label 1 where the measured harm <= this (default: the median harm at cache age 2, "
                             "as harmful as a typical forecast of a fixed interval 3)")
    parser.add_argument("--warmup", type=float, default=None, help=f"v2: warmup of the training runs (default {d['warmup']:g})")
    parser.add_argument("--max-cache-age", type=int, default=None,
                        help="v2: the oldest cache the policy may forecast from, recorded in the file; every row "
                             "still trains the MLP (default: the oldest in the rows, --max-age)")
    parser.add_argument("--label-scale", choices=("none", "step"), default=None,
                        help="v2: 'step' divides each harm by its step's median one-step harm before labelling, "
                             f"'none' labels the raw harm (default {d['label_scale']})")
    parser.add_argument("--error-images", type=int, default=None,
                        help="v2: measure forecast errors (feature and harm) over this many images per CFG branch, "
                             "as a run with --error-images does; recorded in the card's use_with (default 0: all)")
    parser.add_argument("--targets", default=None,
                        help=f"v2: what the training runs cache and measure, {' or '.join(TARGET_CHOICES)} (the error "
                             "feature sums a layer's targets); recorded in the card's use_with (default attn,mlp)")
    parser.add_argument("--error-targets", default=None,
                        help="v2: measure the forecast error of these targets only (a comma list from --targets, e.g. "
                             "mlp; the error feature and harm are then their sum), as a run with --error-targets "
                             "does; recorded in the card's use_with (default: every target)")
    parser.add_argument("--branch-decisions", default=None,
                        help="v2: each (every CFG branch measured and decided on its own, default) or cond (the "
                             "conditional branch measured, its plan serving both: rows of that branch only), as a "
                             "run with --branch-decisions does; recorded in the card's use_with")


def v2_settings(args: argparse.Namespace) -> dict:
    """The v2 options with defaults filled in; v2 options given with --features v1 are refused."""
    given = [k for k in V2_DEFAULTS if getattr(args, k) is not None]
    if args.features == "v1":
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} applies only to --features v2 and v2-noentropy")
        return {}
    s = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in V2_DEFAULTS.items()}
    try:
        s["p_forecast"] = [float(t) for t in str(s["p_forecast"]).split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--p-forecast={s['p_forecast']!r} is not allowed: a comma list of numbers in [0, 1]") from None
    if not s["p_forecast"] or not all(0.0 <= p <= 1.0 for p in s["p_forecast"]):
        raise UsageError(f"--p-forecast={args.p_forecast!r} is not allowed: a comma list of numbers in [0, 1]")
    for name, low in (("n_runs", 2), ("per_class", 1), ("max_age", 1), ("max_cache_age", 1), ("error_images", 0)):
        if s[name] is not None and s[name] < low:
            raise UsageError(f"--{name.replace('_', '-')}={s[name]} is not allowed: must be >= {low}")
    if s["targets"] not in TARGET_CHOICES:
        raise UsageError(f"--targets={s['targets']!r} is not allowed: must be one of {', '.join(TARGET_CHOICES)}")
    if "attn" not in s["targets"].split(",") and args.features == "v2":
        raise UsageError(f"--targets {s['targets']} measures no attention entropy, which --features v2 reads; use "
                         "--features v2-noentropy")
    if s["error_targets"] is not None:
        chosen = [t for t in s["error_targets"].split(",") if t]
        if not chosen or len(set(chosen)) != len(chosen) or any(t not in s["targets"].split(",") for t in chosen):
            raise UsageError(f"--error-targets={s['error_targets']!r} is not allowed: a comma list of distinct targets "
                             f"from --targets {s['targets']}")
        s["error_targets"] = ",".join(chosen)
    if s["branch_decisions"] not in ("each", "cond"):
        raise UsageError(f"--branch-decisions={s['branch_decisions']!r} is not allowed: must be each or cond")
    if s["forecast_order"] not in (0, 1, 2):
        raise UsageError(f"--forecast-order={s['forecast_order']} is not allowed: must be 0, 1 or 2")
    tol = s["label_tolerance"]
    if tol is not None and not (math.isfinite(tol) and tol > 0):
        raise UsageError(f"--label-tolerance={tol} is not allowed: must be a finite number > 0")
    if not 0.0 <= s["warmup"] < 1.0:
        raise UsageError(f"--warmup={s['warmup']} is not allowed: must be in [0, 1)")
    return s


def reproduce_v2(args: argparse.Namespace, s: dict, cfg_scale: float) -> str:
    parts = [f"dqar train-policy --features {args.features}", f"--model {args.model}", f"--out {args.out}",
             f"--n-runs {s['n_runs']}", f"--per-class {s['per_class']}", f"--first-seed {args.first_seed}",
             f"--steps {args.steps}", f"--sampler {args.sampler}", f"--cfg-scale {cfg_scale:g}",
             f"--p-forecast {','.join(f'{p:g}' for p in s['p_forecast'])}", f"--max-age {s['max_age']}",
             f"--forecast-order {s['forecast_order']}", f"--warmup {s['warmup']:g}", f"--label-scale {s['label_scale']}",
             f"--threshold {args.threshold:g}",
             f"--epochs {args.epochs}", f"--lr {args.lr:g}", f"--l2 {args.l2:g}",
             f"--val-fraction {args.val_fraction:g}", f"--seed {args.seed}"]
    if s["label_tolerance"] is not None:
        parts.append(f"--label-tolerance {s['label_tolerance']:g}")
    if s["max_cache_age"] is not None:
        parts.append(f"--max-cache-age {s['max_cache_age']}")
    if s["error_images"]:
        parts.append(f"--error-images {s['error_images']}")
    if s["targets"] != V2_DEFAULTS["targets"]:
        parts.append(f"--targets {s['targets']}")
    if s["branch_decisions"] != V2_DEFAULTS["branch_decisions"]:
        parts.append(f"--branch-decisions {s['branch_decisions']}")
    if s["error_targets"] is not None:
        parts.append(f"--error-targets {s['error_targets']}")
    if args.from_dir:
        parts.append(f"--from {args.from_dir}")
    if args.threads is not None:
        parts.append(f"--threads {args.threads}")
    return " ".join(parts)


ROW_FIELDS = ("run", "step", "layer", "branch", "total_steps", "harm")


def read_rows(from_dir: str, s: dict, steps: int) -> list:
    """rows.jsonl of an earlier --features v2 run, checked: every field the training reads, finite."""
    from pathlib import Path

    from dqar.harness.policy_training import read_jsonl
    from dqar.method.stats import POLICY_FEATURE_NAMES_V2

    path = Path(from_dir) / "rows.jsonl"
    if not path.is_file():
        raise UsageError(f"--from={from_dir!r}: {str(path)!r} does not exist (written by --features v2)")
    rows = read_jsonl(path)
    if not rows:
        raise UsageError(f"--from: {str(path)!r} holds no records")
    for n, r in enumerate(rows, 1):
        missing = [k for k in (*ROW_FIELDS, *POLICY_FEATURE_NAMES_V2) if not isinstance(r, dict) or k not in r]
        if missing:
            raise UsageError(f"--from: {str(path)!r} record {n} lacks the field(s) {', '.join(missing)}")
        bad = [k for k in ("harm", *POLICY_FEATURE_NAMES_V2)
               if isinstance(r[k], bool) or not isinstance(r[k], (int, float)) or not math.isfinite(r[k])]
        if bad or r["harm"] < 0:
            k = bad[0] if bad else "harm"
            raise UsageError(f"--from: {str(path)!r} record {n}: {k}={r[k]!r} is not a finite number"
                             f"{' >= 0' if k == 'harm' else ''}")
    measured_over = {r.get("error_images", 0) for r in rows}     # rows before error_images: every image
    if measured_over != {s["error_images"]}:
        raise UsageError(f"--from={from_dir!r} holds rows measured with error_images {sorted(measured_over)}, not "
                         f"--error-images {s['error_images']}")
    # Rows from before these options: attention and MLP, every branch on its own.
    for field, flag in (("targets", "--targets"), ("branch_decisions", "--branch-decisions"),
                        ("error_targets", "--error-targets")):
        found = {r.get(field, V2_DEFAULTS[field]) for r in rows}
        if found != {s[field]}:
            raise UsageError(f"--from={from_dir!r} holds rows measured with {field} {sorted(found)}, not {flag} "
                             f"{s[field]}")
    if {r["total_steps"] for r in rows} != {steps}:
        raise UsageError(f"--from={from_dir!r} holds rows of {sorted({r['total_steps'] for r in rows})} steps, "
                         f"not --steps {steps}")
    return rows


def run_v2(args: argparse.Namespace, s: dict, cfg_scale: float, say, show: bool, progress_cls) -> int:
    import time
    from datetime import date
    from pathlib import Path

    from dqar.harness import policy_training as pt
    from dqar.harness import policy_v2 as pv

    from .common import resolve_model
    from .train_policy import _file_sha256, write_policy_report

    start = time.perf_counter()
    rows = read_rows(args.from_dir, s, args.steps) if args.from_dir else None
    model, described = resolve_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = pv.run_plan(s["n_runs"], s["per_class"], model.config.num_classes, args.first_seed, s["p_forecast"])
    if rows is not None and {r["run"] for r in rows} != {k for k, *_ in plan}:
        raise UsageError(f"--from={args.from_dir!r} holds runs {sorted({r['run'] for r in rows})}, not the "
                         f"{len(plan)} runs of --n-runs {s['n_runs']}")
    if rows is None:
        say(f"{len(plan)} training runs of {len(plan[0][1])} images under random refreshes "
            f"(order {s['forecast_order']}, max age {s['max_age']}, {args.steps} {args.sampler} steps, cfg {cfg_scale:g})")
        bar = progress_cls(show, "runs", "run")
        try:
            rows = pv.collect_rows_v2(model, plan, max_age=s["max_age"], steps=args.steps, cfg_scale=cfg_scale,
                                      sampler=args.sampler, forecast_order=s["forecast_order"], warmup=s["warmup"],
                                      error_images=s["error_images"], targets=tuple(s["targets"].split(",")),
                                      branch_decisions=s["branch_decisions"], error_targets=s["error_targets"],
                                      progress=bar)
        finally:
            bar.close()
    if not rows:
        raise UsageError("the training runs produced no rows (too few steps for the forecast order?)")
    t_rows = time.perf_counter() - start
    scales = pv.step_scales(rows) if s["label_scale"] == "step" else None
    tol = s["label_tolerance"] if s["label_tolerance"] is not None else pv.default_tolerance(rows, scales=scales)
    y = pv.label_rows_v2(rows, tol, scales)
    for r, lab in zip(rows, y.tolist()):
        r["label"] = int(lab)
    pt.write_jsonl(out / "rows.jsonl", rows)
    max_age = int(max(r["cache_age"] for r in rows))
    if s["max_cache_age"] is not None:
        max_age = min(max_age, s["max_cache_age"])
    over = f"{s['error_images']} image(s) per branch" if s["error_images"] else "the batch"
    info = {
        "feature_set": args.features,
        "trained_on": {"model": described, "weights_file_sha256": _file_sha256(args.model), "sampler": args.sampler,
                       "steps": args.steps, "cfg_scale": cfg_scale, "runs": len(plan),
                       "images_per_run": len(plan[0][1]), "seeds": [plan[0][2][0], plan[-1][2][-1]],
                       "rows": len(rows), "positive_rate": float(y.mean()),
                       "targets": s["targets"].split(","), "forecast_order": s["forecast_order"],
                       "max_age": s["max_age"], "p_forecast": s["p_forecast"], "warmup": s["warmup"],
                       "error_images": s["error_images"], "branch_decisions": s["branch_decisions"],
                       "error_targets": s["error_targets"]},
        "labels": {"rule": "1 if harm <= tolerance; harm = the adaLN-gated effect of forecasting there given the "
                           f"actual history, max over {over}, summed over the layer's targets (ErrorControl.observe)"
                           + ("; divided by the step's median one-step harm" if scales else ""), "tolerance": tol,
                   "scale": s["label_scale"], "step_scales": {str(k): v for k, v in sorted((scales or {}).items())},
                   "tolerance_from": "given" if s["label_tolerance"] is not None else "median (scaled) harm at cache age 2"},
        "use_with": {"schedule": "policy", "targets": s["targets"].split(","), "forecast_order": s["forecast_order"],
                     "warmup": s["warmup"], "error_images": s["error_images"],
                     "branch_decisions": s["branch_decisions"],
                     **({"error_targets": s["error_targets"].split(",")} if s["error_targets"] else {})},
        "signal_auc": pv.signal_auc(rows, y),
        "training": {"epochs": args.epochs, "lr": args.lr, "l2": args.l2, "optimizer": "Adam, full batch",
                     "val_fraction": args.val_fraction, "seed": args.seed, "split": "by training run"},
        "command": reproduce_v2(args, s, cfg_scale),
        "date": date.today().isoformat(),
    }
    say(f"training on {len(rows)} rows ({float(y.mean()):.1%} labelled forecast-safe, harm <= {tol:.4g})")
    fit = pv.fit_policy_v2(pv.feature_matrix_v2(rows, args.features), y, [r["run"] for r in rows],
                           max_cache_age=max_age, val_fraction=args.val_fraction, epochs=args.epochs, lr=args.lr,
                           l2=args.l2, threshold=args.threshold, seed=args.seed, feature_set=args.features)
    return write_policy_report(fit, info, out, args, say, group_name="runs",
                               wall_seconds={"rows": round(t_rows, 1), "total": round(time.perf_counter() - start, 1)})
