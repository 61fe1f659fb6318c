"""`dqar train-policy`: trace the embedded model, calibrate the labels, train the reuse policy, write it.

Writes to --out: `traces.jsonl` (one row per seed, step, layer, branch), `calibration.jsonl` (single-position
reuse measurements), `policy_digits.safetensors` + `policy_digits.json` (the policy and its card) and
`report.json`. `--install` copies the two policy files over the package's shipped policy (`dqar/digits/assets/`).
`--features v2` trains policy v2 instead (dqar.cli.train_policy_v2: rows from runs that forecast).
"""
from __future__ import annotations

import argparse

import math

from . import UsageError
from .common import add_cfg_scale_option, add_model_options, check_out_dir, check_seed
from .train_policy_v2 import add_v2_arguments, run_v2, v2_settings

DEFAULT_OUT = "out/policy"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--n-seeds", type=int, default=32, help="traced generations, one seed each (default 32)")
    parser.add_argument("--first-seed", type=int, default=10_000,
                        help="trace seeds are first-seed + k, class k %% num_classes; kept apart from the "
                             "benchmark's seeds 0.. so the policy is measured on images it never saw "
                             "(default 10000)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--sampler", default="ddim", help="ddim | dpm (default ddim)")
    add_cfg_scale_option(parser)
    parser.add_argument("--calib-positions", type=int, default=40,
                        help="(step, layer, branch) positions measured by single-position reuse (default 40)")
    parser.add_argument("--calib-seeds", type=int, default=4,
                        help="trace seeds each calibration position is measured on (default 4)")
    parser.add_argument("--quality-psnr", type=float, default=30.0,
                        help="whole-image quality budget in dB PSNR against the uncached image (default 30)")
    parser.add_argument("--reuse-fraction", type=float, default=0.25,
                        help="fraction of (step, layer, branch) positions a run is expected to reuse; the budget "
                             "is split over that many positions (default 0.25)")
    parser.add_argument("--from", dest="from_dir", default=None,
                        help="reuse traces.jsonl and calibration.jsonl from an earlier --out folder (same model and "
                             "sampling settings) instead of generating them again (default: trace anew)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="decision threshold stored in the file (default 0.5)")
    parser.add_argument("--epochs", type=int, default=800, help="full-batch Adam epochs (default 800)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 1e-2)")
    parser.add_argument("--l2", type=float, default=1e-4, help="L2 penalty on the weights (default 1e-4, seed 002)")
    parser.add_argument("--val-fraction", type=float, default=0.25,
                        help="seeds held out for validation (default 0.25)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, init and positions (default 0)")
    parser.add_argument("--install", action="store_true",
                        help="copy the policy files over the package's shipped policy (dqar/digits/assets/)")
    parser.add_argument("--json", action="store_true",
                        help="print the report as one JSON object on stdout (no progress bars)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_v2_arguments(parser)


def reproduce_command(args: argparse.Namespace, cfg_scale: float) -> str:
    parts = ["dqar train-policy", f"--model {args.model}", f"--out {args.out}", f"--n-seeds {args.n_seeds}",
             f"--first-seed {args.first_seed}", f"--steps {args.steps}", f"--sampler {args.sampler}",
             f"--cfg-scale {cfg_scale:g}", f"--calib-positions {args.calib_positions}",
             f"--calib-seeds {args.calib_seeds}", f"--quality-psnr {args.quality_psnr:g}",
             f"--reuse-fraction {args.reuse_fraction:g}", f"--threshold {args.threshold:g}",
             f"--epochs {args.epochs}", f"--lr {args.lr:g}", f"--l2 {args.l2:g}",
             f"--val-fraction {args.val_fraction:g}", f"--seed {args.seed}"]
    if args.from_dir:
        parts.append(f"--from {args.from_dir}")
    if args.threads is not None:
        parts.append(f"--threads {args.threads}")
    return " ".join(parts)


def _check(args: argparse.Namespace) -> None:
    for name, minimum in (("n_seeds", 2), ("steps", 3), ("calib_positions", 3), ("calib_seeds", 1), ("epochs", 1)):
        value = getattr(args, name)
        if value < minimum:
            raise UsageError(f"--{name.replace('_', '-')}={value} is not allowed: must be >= {minimum}")
    if args.calib_seeds > args.n_seeds:
        raise UsageError(f"--calib-seeds={args.calib_seeds} exceeds --n-seeds={args.n_seeds}: calibration uses "
                         "traced seeds")
    if not 0.0 < args.reuse_fraction <= 1.0:
        raise UsageError(f"--reuse-fraction={args.reuse_fraction} is not allowed: must be in (0, 1]")
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold={args.threshold} is not allowed: must be in [0, 1]")
    if not 0.0 < args.val_fraction < 1.0:
        raise UsageError(f"--val-fraction={args.val_fraction} is not allowed: must be in (0, 1)")
    for name in ("quality_psnr", "lr", "l2"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            bound = "> 0" if name == "lr" else ">= 0"
            raise UsageError(f"--{name.replace('_', '-')}={value} is not allowed: must be a finite number {bound}")
    check_seed(args.seed)
    check_seed(args.first_seed, "--first-seed", count=args.n_seeds)
    check_out_dir(args.out)
    if args.from_dir is not None:
        check_from_dir(args.from_dir)
    if args.install:
        install_destination()       # refused now, not after the whole training


def _check_v2(args: argparse.Namespace) -> None:
    """The shared options --features v2 reads (its own are checked by v2_settings)."""
    for name, minimum in (("steps", 4), ("epochs", 1)):
        if getattr(args, name) < minimum:
            raise UsageError(f"--{name}={getattr(args, name)} is not allowed: must be >= {minimum}")
    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold={args.threshold} is not allowed: must be in [0, 1]")
    if not 0.0 < args.val_fraction < 1.0:
        raise UsageError(f"--val-fraction={args.val_fraction} is not allowed: must be in (0, 1)")
    for name in ("lr", "l2"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
            raise UsageError(f"--{name}={value} is not allowed: must be a finite number {'> 0' if name == 'lr' else '>= 0'}")
    check_seed(args.seed)
    check_seed(args.first_seed, "--first-seed")
    check_out_dir(args.out)
    if args.install:
        install_destination()


def check_from_dir(from_dir: str) -> None:
    from pathlib import Path

    src = Path(from_dir)
    if not src.is_dir():
        what = "is a file, not a folder" if src.exists() else "does not exist"
        raise UsageError(f"--from={from_dir!r} {what}; pass the --out folder of an earlier run")
    for name in ("traces.jsonl", "calibration.jsonl"):
        if not (src / name).is_file():
            raise UsageError(f"--from={from_dir!r}: {str(src / name)!r} does not exist")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _trace_fields() -> dict:
    from dqar.method.stats import POLICY_FEATURE_NAMES

    fields = {"seed": ("an integer", _is_int), "step": ("an integer", _is_int), "layer": ("an integer", _is_int),
              "branch": ("a string", lambda v: isinstance(v, str)), "total_steps": ("an integer", _is_int),
              "rel_change": ("a finite number >= 0", lambda v: _is_finite(v) and v >= 0)}
    fields.update({name: ("a finite number", _is_finite) for name in POLICY_FEATURE_NAMES})
    return fields


CALIBRATION_FIELDS = {
    "seed": ("an integer", _is_int), "step": ("an integer", _is_int), "layer": ("an integer", _is_int),
    "branch": ("a string", lambda v: isinstance(v, str)),
    "rel_change": ("a finite number >= 0", lambda v: _is_finite(v) and v >= 0),
    "mse": ("a finite number >= 0", lambda v: _is_finite(v) and v >= 0),
}


def check_rows(rows: list, path, fields: dict) -> None:
    """Every record of a --from file is an object with the fields the training reads, of the right kind."""
    if not rows:
        raise UsageError(f"--from: {str(path)!r} holds no records")
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UsageError(f"--from: {str(path)!r} record {n} is a JSON {type(row).__name__}, not an object")
        missing = [name for name in fields if name not in row]
        if missing:
            raise UsageError(f"--from: {str(path)!r} record {n} lacks the field(s) {', '.join(missing)}; each record "
                             f"needs {', '.join(fields)} (written by `dqar train-policy`)")
        for name, (kind, ok) in fields.items():
            if not ok(row[name]):
                raise UsageError(f"--from: {str(path)!r} record {n}: {name}={row[name]!r} is not {kind}")


class _Progress:
    """A progress(k, total) callback drawing a tqdm bar with an ETA (nothing when disabled)."""

    def __init__(self, enabled: bool, desc: str, unit: str):
        self.enabled, self.desc, self.unit, self.bar = enabled, desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            import sys

            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    import time
    from datetime import date
    from pathlib import Path

    from dqar.sampling import validate_sampling_args

    from .common import default_cfg_scale, resolve_model, setup_torch

    v2 = v2_settings(args)
    if v2:
        _check_v2(args)
    else:
        _check(args)
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else default_cfg_scale(args.model)
    validate_sampling_args(args.sampler, args.steps, cfg_scale)
    setup_torch(args)
    if args.device != "cpu":
        raise UsageError(f"--device={args.device!r}: train-policy runs on the CPU (batch-1 traces gain nothing "
                         "from a GPU)")
    if v2:
        say = (lambda *a: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
        return run_v2(args, v2, cfg_scale, say, not (args.json or args.no_progress), _Progress)

    from dqar.harness import policy_training as pt
    from dqar.method.policy import save_policy

    if args.from_dir:
        # Read and check the earlier run's files before the model is built or --out is created.
        src = Path(args.from_dir)
        rows, records = pt.read_jsonl(src / "traces.jsonl"), pt.read_jsonl(src / "calibration.jsonl")
        check_rows(rows, src / "traces.jsonl", _trace_fields())
        check_rows(records, src / "calibration.jsonl", CALIBRATION_FIELDS)
        traced = sorted({r["seed"] for r in rows})
        wanted = [args.first_seed + k for k in range(args.n_seeds)]
        if traced != wanted or {r["total_steps"] for r in rows} != {args.steps}:
            raise UsageError(f"--from={args.from_dir!r} holds traces of seeds {traced[:1]}..{traced[-1:]} at "
                             f"{sorted({r['total_steps'] for r in rows})} steps, not the requested --n-seeds/"
                             "--first-seed/--steps")
    model, described = resolve_model(args.model)
    # Traced positions per generation: steps 2.. (step 0 has no cached output, step 1's rows lack the previous
    # entropy), every layer, both CFG branches.
    positions_available = (args.steps - 2) * model.config.depth * (2 if cfg_scale != 1.0 else 1)
    if not args.from_dir and args.calib_positions > positions_available:
        raise UsageError(f"--calib-positions={args.calib_positions} exceeds the {positions_available} (step, layer, "
                         f"branch) positions a {args.steps}-step trace of this {model.config.depth}-layer model has")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    show = not (args.json or args.no_progress)
    start = time.perf_counter()

    nc = model.config.num_classes
    seeds = [args.first_seed + k for k in range(args.n_seeds)]
    labels = [k % nc for k in range(args.n_seeds)]
    if args.from_dir:
        calib_seeds = seeds[:args.calib_seeds]
        say(f"reusing traces and calibration from {src}; regenerating {len(calib_seeds)} reference images")
        bar = _Progress(show, "reference images", "image")
        reference = {}
        try:
            for k, s in enumerate(calib_seeds):
                reference[s] = pt.sample(model, [labels[k]], [s], steps=args.steps, sampler=args.sampler,
                                         cfg_scale=cfg_scale)
                bar(k + 1, len(calib_seeds))
        finally:
            bar.close()
    else:
        say(f"tracing {len(seeds)} uncached generations ({args.steps} {args.sampler} steps, cfg {cfg_scale:g})")
        bar = _Progress(show, "tracing", "generation")
        try:
            rows, images = pt.collect_traces(model, labels, seeds, steps=args.steps, sampler=args.sampler,
                                             cfg_scale=cfg_scale, progress=bar)
        finally:
            bar.close()
        positions = pt.sample_positions(rows, args.calib_positions, args.seed)
        calib_seeds = seeds[:args.calib_seeds]
        say(f"calibrating: {len(positions)} single-position reuse runs x {len(calib_seeds)} seeds")
        reference = {s: images[k:k + 1] for k, s in enumerate(seeds)}
        bar = _Progress(show, "calibrating", "position")
        try:
            records = pt.calibrate(model, rows, reference, dict(zip(seeds, labels)), positions=positions,
                                   seeds=calib_seeds, steps=args.steps, sampler=args.sampler, cfg_scale=cfg_scale,
                                   progress=bar)
        finally:
            bar.close()
    t_trace = time.perf_counter() - start
    pt.write_jsonl(out / "calibration.jsonl", records)
    calibration = pt.fit_calibration(records)
    say("measuring error compounding of a real multi-position run (static w0.4 l0.33)")
    compounding = pt.compounding_factor(model, rows, calibration, reference, dict(zip(seeds, labels)),
                                        seeds=calib_seeds, steps=args.steps, sampler=args.sampler,
                                        cfg_scale=cfg_scale)
    t_calib = time.perf_counter() - start - t_trace

    positions_per_run = len({(r["step"], r["layer"], r["branch"]) for r in rows if r["seed"] == seeds[0]})
    reuse_count = max(1, round(args.reuse_fraction * positions_per_run))
    delta = pt.Delta.from_budget(calibration, args.quality_psnr, reuse_count, compounding["factor"])
    y = pt.label_rows(rows, delta.rel_change_max)
    for r, lab in zip(rows, y.tolist()):
        r["label"] = int(lab)
    pt.write_jsonl(out / "traces.jsonl", rows)

    command = reproduce_command(args, cfg_scale)
    info = {
        "trained_on": {"model": described, "weights_file_sha256": _file_sha256(args.model), "sampler": args.sampler, "steps": args.steps, "cfg_scale": cfg_scale,
                       "seeds": [seeds[0], seeds[-1]], "n_seeds": len(seeds), "rows": len(rows),
                       "positive_rate": float(y.mean())},
        "labels": {"rule": "1 if rel_change <= rel_change_max (single-position reuse predicted to keep PSNR >= "
                           "position_psnr against the uncached image)", **vars(delta)},
        "calibration": calibration.to_dict(),
        "compounding": compounding,
        "training": {"epochs": args.epochs, "lr": args.lr, "l2": args.l2, "optimizer": "Adam, full batch",
                     "val_fraction": args.val_fraction, "seed": args.seed, "split": "by sample seed"},
        "command": command,
        "date": date.today().isoformat(),
    }
    say(f"training on {len(rows)} rows ({float(y.mean()):.1%} labelled reuse-safe)")
    fit = pt.fit_policy(pt.feature_matrix(rows), y, [r["seed"] for r in rows], val_fraction=args.val_fraction,
                        epochs=args.epochs, lr=args.lr, l2=args.l2, threshold=args.threshold, seed=args.seed)
    seconds = time.perf_counter() - start
    notes = [f"delta: per-position PSNR >= {delta.position_psnr:.1f} dB <=> rel_change <= {delta.rel_change_max:.4g}; "
             f"Spearman(rel_change, PSNR) = {calibration.spearman_rel_vs_psnr:.3f}"]
    return write_policy_report(fit, info, out, args, say, group_name="seeds", notes=notes,
                               wall_seconds={"trace_and_calibration": round(t_trace, 1),
                                             "compounding": round(t_calib, 1), "total": round(seconds, 1)})


def write_policy_report(fit, info: dict, out: Path, args, say, *, group_name: str, wall_seconds: dict,
                        notes: list[str] = ()) -> int:
    """Save a trained policy with its card (validation metrics, wall time) and report.json, install it if
    asked, and tell the user (JSON on stdout with --json)."""
    import json

    from dqar.method.policy import save_policy

    m = fit.metrics()
    info["validation"] = {"accuracy": m["val_accuracy"], "auc": m["val_auc"], "positive_rate": m["val_positive_rate"],
                          "rows": m["n_val"], group_name: m["val_seeds"], "train_accuracy": m["train_accuracy"]}
    info["wall_seconds"] = wall_seconds
    st_path, json_path = save_policy(fit.policy, out / "policy_digits.safetensors", info)
    report = {"policy": str(st_path), "card": str(json_path), **info}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.install:
        report["installed"] = [str(p) for p in install_policy(st_path, json_path)]
    if args.json:
        print(json.dumps(report))
        return 0
    for line in notes:
        say(line)
    v = info["validation"]
    auc = f"{v['auc']:.3f}" if v["auc"] is not None else "n/a (one class)"
    say(f"validation accuracy {v['accuracy']:.3f}, AUC {auc} (positive rate {v['positive_rate']:.3f}); "
        f"wrote {st_path} and {json_path} in {wall_seconds['total']:.0f} s")
    return 0


def _file_sha256(spec: str) -> str | None:
    """SHA-256 of the weights file the policy was trained on, so the card names the exact model."""
    import hashlib
    from pathlib import Path

    if spec == "embedded":
        from dqar.digits.embedded import DIT_FILE, asset_path

        path = asset_path(DIT_FILE)
    else:
        path = Path(spec)
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install_destination():
    """The package's assets folder, or a UsageError when the policy cannot be installed there."""
    import os
    from importlib import resources
    from pathlib import Path

    dest = Path(str(resources.files("dqar.digits").joinpath("assets")))
    if not dest.is_dir():
        raise UsageError(f"--install: the package's assets folder {str(dest)!r} is not a folder (installed from a "
                         "wheel?); copy the two files by hand instead")
    if not os.access(dest, os.W_OK | os.X_OK):
        raise UsageError(f"--install: the package's assets folder {str(dest)!r} is not writable; copy the two files "
                         "by hand with the needed rights instead")
    return dest


def install_policy(st_path, json_path) -> list:
    """Copy the policy files over the package's shipped ones (an editable install or source checkout)."""
    import shutil

    from dqar.method.policy import SHIPPED_NAME

    dest = install_destination()
    targets = [dest / f"{SHIPPED_NAME}.safetensors", dest / f"{SHIPPED_NAME}.json"]
    for src, dst in zip((st_path, json_path), targets):
        shutil.copyfile(src, dst)
    return targets
