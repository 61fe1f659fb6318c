"""`dqar train-model`: train the embedded digits DiT and its evaluator, write the four asset files.

The files go to --out (a local folder, never the package by default). `--install` then copies them over the
shipped assets in `dqar/digits/assets/` (an editable install or source checkout); the manual equivalent is
`cp OUT/dit_digits_ema.safetensors OUT/dit_digits.json OUT/evaluator.safetensors OUT/evaluator.json
src/dqar/digits/assets/`. Measured quality is added to the cards afterwards by `benchmarks/embedded_quality.py`.
"""
from __future__ import annotations

import argparse
import dataclasses

from . import UsageError

DEFAULT_OUT = "embedded-model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder for the assets (default ./{DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=4000, help="DiT optimizer steps (default 4000)")
    parser.add_argument("--batch-size", type=int, default=64, help="DiT batch size (default 64)")
    parser.add_argument("--lr", type=float, default=1e-3, help="DiT peak learning rate (default 1e-3)")
    parser.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the shipped weights (0.999)")
    parser.add_argument("--extra-ema", default="",
                        help="comma-separated further EMA decays of the same run, each written to OUT/ema-DECAY/ "
                             "(0: the raw weights); e.g. 0,0.998,0.999 (default: none)")
    parser.add_argument("--preset", default="DiT-Digits", help="DiT preset to train (default DiT-Digits)")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                        help="after warmup: constant (DiT; checkpoints equal shorter runs) or cosine decay "
                             "to --min-lr-ratio x lr at the last step (default constant)")
    parser.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine floor as a share of --lr (0.05)")
    parser.add_argument("--max-shift", type=int, default=0, help="augmentation: random shift in pixels (0)")
    parser.add_argument("--rotate", type=float, default=0.0, help="augmentation: random rotation +-degrees (0)")
    parser.add_argument("--scale-jitter", type=float, default=0.0,
                        help="augmentation: random isotropic scale 1 +- this (0)")
    parser.add_argument("--augment-from-t", type=int, default=0,
                        help="augment only examples noised at timestep >= this (0..999; 0: all)")
    parser.add_argument("--min-snr-gamma", type=float, default=0.0,
                        help="weight each example's loss by min(SNR, gamma) / SNR (Min-SNR; 0: unweighted, DiT's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for init, data order, noise, timesteps (0)")
    parser.add_argument("--init-from", default=None,
                        help="fine-tune: start from this DiT weights file (.safetensors of --preset's shape), or "
                             "'embedded' for the shipped model, instead of a fresh init (default: fresh)")
    parser.add_argument("--evaluator-epochs", type=int, default=20, help="evaluator CNN epochs (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--only", choices=("both", "dit", "evaluator"), default="both",
                        help="train only one of the two (the DiT's weights do not depend on the evaluator run)")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="also write the DiT files every N steps; each checkpoint equals a --steps N run")
    parser.add_argument("--install", action="store_true",
                        help="after training, copy the four files over the package's shipped assets")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def reproduce_command(args: argparse.Namespace) -> str:
    parts = ["dqar train-model", f"--out {args.out}", f"--preset {args.preset}", f"--steps {args.steps}",
             f"--batch-size {args.batch_size}", f"--lr {args.lr:g}", f"--lr-schedule {args.lr_schedule}",
             f"--min-lr-ratio {args.min_lr_ratio:g}", f"--max-shift {args.max_shift}", f"--rotate {args.rotate:g}",
             f"--scale-jitter {args.scale_jitter:g}", f"--ema-decay {args.ema_decay:g}", f"--seed {args.seed}",
             f"--evaluator-epochs {args.evaluator_epochs}"]
    if args.augment_from_t:
        parts.append(f"--augment-from-t {args.augment_from_t}")
    if args.min_snr_gamma:
        parts.append(f"--min-snr-gamma {args.min_snr_gamma:g}")
    if args.extra_ema:
        parts.append(f"--extra-ema {args.extra_ema}")
    if args.init_from is not None:
        parts.append(f"--init-from {args.init_from}")
    if args.threads is not None:
        parts.append(f"--threads {args.threads}")
    if args.only != "both":
        parts.append(f"--only {args.only}")
    return " ".join(parts)


def _write_json(path, obj) -> None:
    import json

    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def install_assets(out) -> list:
    """Copy the four asset files from `out` into the package's assets folder; returns the destinations."""
    import shutil
    from importlib import resources
    from pathlib import Path

    from dqar.digits.embedded import ASSET_FILES

    dest = Path(str(resources.files("dqar.digits").joinpath("assets")))
    if not dest.is_dir():
        raise UsageError(f"--install: the package's assets folder {str(dest)!r} is not a writable folder "
                         "(installed from a wheel?); copy the files by hand instead")
    missing = [name for name in ASSET_FILES if not (out / name).is_file()]
    if missing:
        raise UsageError(f"--install: {str(out / missing[0])!r} does not exist")
    return [Path(shutil.copy2(out / name, dest / name)) for name in ASSET_FILES]


def _train_evaluator(args, out, train, test, data_card, env, progress) -> None:
    import sys

    from dqar.digits.embedded import EVALUATOR_CARD, EVALUATOR_FILE, save_embedded_evaluator
    from dqar.digits.evaluator import ARCH, EvaluatorTrainConfig, accuracy, train_evaluator

    evaluator, summary = train_evaluator(train, EvaluatorTrainConfig(epochs=args.evaluator_epochs, seed=args.seed),
                                         progress=progress)
    held_out = accuracy(evaluator, test)
    save_embedded_evaluator(evaluator, out / EVALUATOR_FILE)
    _write_json(out / EVALUATOR_CARD, {
        "name": "dqar digits evaluator", "architecture": ARCH, "data": data_card,
        "held_out_accuracy": held_out, "held_out_images": len(test),
        "training": {**summary, "command": reproduce_command(args), "environment": env},
        "use": "evaluator accuracy of generated digits against the requested class; FID in the 128-d "
               "penultimate features (DigitsEvaluator.features)",
    })
    print(f"evaluator: held-out accuracy {held_out:.4f} on {len(test)} test digits "
          f"({summary['wall_time_s']:.0f} s)", file=sys.stderr)


def parse_extra_ema(spec: str) -> tuple[float, ...]:
    """--extra-ema as a tuple of decays; anything but comma-separated numbers is refused here."""
    decays = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            decays.append(float(part))
        except ValueError:
            raise UsageError(f"--extra-ema={spec!r}: {part!r} is not a number; give decays in [0, 1) separated "
                             "by commas, e.g. 0,0.998,0.999") from None
    return tuple(decays)


def _write_dit(out, result, args, data_card, env, decay: float | None = None) -> None:
    """Weights, card and loss log of a finished run or checkpoint (the card's command reproduces exactly it);
    each extra EMA goes to its own subfolder, a complete model folder of its own."""
    from dqar.digits.data import IMAGE_SIZE
    from dqar.digits.embedded import DIT_CARD, DIT_FILE, save_embedded_dit, tensor_digest
    from dqar.digits.training import decay_binds

    decay = result.config.ema_decay if decay is None else decay
    for extra, average in result.extra_emas.items():
        sub = out / f"ema-{extra:g}"
        sub.mkdir(exist_ok=True)
        _write_dit(sub, dataclasses.replace(result, ema=average, extra_emas={}), args, data_card, env, extra)

    with open(out / "dit_loss.csv", "w", encoding="utf-8") as f:
        f.write("step,loss,lr,elapsed_s\n")
        for row in result.loss_log:
            f.write(f"{row['step']},{row['loss']:.6f},{row['lr']:.6g},{row['elapsed_s']:.2f}\n")
    save_embedded_dit(result.ema, out / DIT_FILE, {"dqar_weights": "ema" if decay else "raw"})
    config = result.ema.config
    steps = result.config.steps
    if args.lr_schedule == "constant" or steps == args.steps:
        command = reproduce_command(argparse.Namespace(**{**vars(args), "steps": steps}))
    else:   # a cosine run decays over all its steps, so its checkpoint is not a shorter run's result
        command = f"{reproduce_command(args)} --checkpoint-every {args.checkpoint_every} (its step-{steps} checkpoint)"
    _write_json(out / DIT_CARD, {
        "name": "dqar embedded digits DiT", "preset": result.config.preset, "config": config.to_dict(),
        "image_shape": [config.in_channels, config.input_size, config.input_size],
        "resolution": f"{IMAGE_SIZE}x{IMAGE_SIZE} grey, pixel space (no VAE)", "tokens": config.num_tokens,
        "parameters": sum(p.numel() for p in result.ema.parameters()),
        "weights": (("the raw trained weights (no EMA)" if not decay else f"EMA of the trained weights, decay {decay:g}"
                     + ("" if decay_binds(decay, steps) else
                        f" (never reached in {steps} steps: the (1+n)/(10+n) warm-up ramp decides the average)"))),
        "weights_sha256": tensor_digest(result.ema.state_dict()),
        "data": data_card,
        "schedule": {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                     "prediction": "epsilon", "loss": "MSE", "label_dropout": config.class_dropout_prob},
        "training": {**result.summary(), "steps_trained": steps, "optimizer": "AdamW",
                     "lr_schedule": ("linear warmup, then constant (DiT)" if result.config.lr_schedule == "constant"
                                     else f"linear warmup, then cosine decay to {result.config.min_lr_ratio:g} x lr"),
                     "augmentation": {"max_shift_px": result.config.max_shift, "rotate_deg": result.config.rotate_deg,
                                      "scale_jitter": result.config.scale_jitter,
                                      "from_timestep": result.config.augment_from_t},
                     "loss_weighting": (f"min(SNR, {result.config.min_snr_gamma:g}) / SNR (Min-SNR)"
                                        if result.config.min_snr_gamma else "none (DiT's simple loss)"),
                     "final_loss_definition": "mean training MSE over the last 10% of steps",
                     "loss_log": "dit_loss.csv beside the weights in the --out folder",
                     "command": command, "environment": env},
        "metrics": {},
    })


def _init_path(spec: str | None) -> str | None:
    """--init-from as a file path ('embedded': the shipped weights); a missing file is refused here, before
    anything is written."""
    from pathlib import Path

    if spec is None:
        return None
    if spec == "embedded":
        from dqar.digits.embedded import DIT_FILE, asset_path

        return str(asset_path(DIT_FILE))
    if not Path(spec).is_file():
        raise UsageError(f"--init-from={spec!r} is not a file: give a DiT weights .safetensors or 'embedded'")
    return spec


def _check_init(path: str | None, preset: str) -> None:
    from dqar.models.io import WeightsError, load_dit

    if path is not None:
        try:
            load_dit(path, preset)
        except WeightsError as exc:
            raise UsageError(f"--init-from: {exc}") from None


def run(args: argparse.Namespace) -> int:
    import platform
    import sys
    from pathlib import Path

    import torch

    from dqar.cli.common import setup_torch
    from dqar.digits.data import SPLIT_SEED, TEST_FRACTION, load_split
    from dqar.digits.training import DiTTrainConfig, train_dit

    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every={args.checkpoint_every} is not allowed: must be >= 0")
    if args.evaluator_epochs < 1:
        raise UsageError(f"--evaluator-epochs={args.evaluator_epochs} is not allowed: must be >= 1")
    try:
        dit_cfg = DiTTrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 ema_decay=args.ema_decay, seed=args.seed, lr_schedule=args.lr_schedule,
                                 min_lr_ratio=args.min_lr_ratio, max_shift=args.max_shift,
                                 rotate_deg=args.rotate, scale_jitter=args.scale_jitter,
                                 augment_from_t=args.augment_from_t, min_snr_gamma=args.min_snr_gamma,
                                 extra_ema_decays=parse_extra_ema(args.extra_ema),
                                 init_from=_init_path(args.init_from))
    except ValueError as exc:
        flags = {"steps=": "--steps=", "batch_size=": "--batch-size=", "preset=": "--preset=",
                 "min_lr_ratio=": "--min-lr-ratio=", "max_shift=": "--max-shift=", "rotate_deg=": "--rotate=",
                 "scale_jitter=": "--scale-jitter=", "ema_decay=": "--ema-decay=", "lr=": "--lr=",
                 "augment_from_t=": "--augment-from-t=", "min_snr_gamma=": "--min-snr-gamma=",
                 "extra_ema_decays=": "--extra-ema: "}
        message = str(exc)
        for field_name, flag in flags.items():
            if message.startswith(field_name):
                message = flag + message[len(field_name):]
                break
        raise UsageError(message) from None
    _check_init(dit_cfg.init_from, args.preset)
    from dqar.digits.training import decay_binds, ema_warmup

    idle = [d for d in (dit_cfg.ema_decay, *dit_cfg.extra_ema_decays) if d and not decay_binds(d, dit_cfg.steps)]
    if idle:
        print(f"note: EMA decay {', '.join(f'{d:g}' for d in idle)} never binds in {dit_cfg.steps} steps: the "
              f"(1+n)/(10+n) warm-up stays below it (it reaches {ema_warmup(dit_cfg.steps - 1):.5f}), so the "
              "average is the warm-up ramp's, the same for every such decay", file=sys.stderr)
    setup_torch(argparse.Namespace(threads=args.threads, device="cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    train, test = load_split("train"), load_split("test")
    data_card = {
        "source": "sklearn.datasets.load_digits (UCI optdigits, 1,797 real 8x8 scans, grey levels 0..16)",
        "preprocessing": "8x8 -> 16x16 bilinear upsampling (torch interpolate, align_corners=False), "
                         "[0,16] -> [-1,1]",
        "split": f"stratified train_test_split, test_size={TEST_FRACTION}, random_state={SPLIT_SEED}",
        "train_images": len(train), "test_images": len(test),
    }
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "machine": platform.machine()}

    if args.only in ("both", "evaluator"):
        _train_evaluator(args, out, train, test, data_card, env, progress)
    if args.only in ("both", "dit"):
        def write(result) -> None:
            _write_dit(out, result, args, data_card, env)

        result = train_dit(train, dit_cfg, progress=progress, checkpoint_every=args.checkpoint_every,
                           on_checkpoint=write)
        write(result)
        print(f"DiT: {dit_cfg.steps} steps in {result.wall_time_s / 60:.1f} min, final loss "
              f"{result.final_loss:.4f}; wrote {out}", file=sys.stderr)
    if args.install:
        for dest in install_assets(out):
            print(f"installed {dest}", file=sys.stderr)
    return 0
