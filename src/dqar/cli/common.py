"""Options and helpers shared by the subcommands: model resolution, device, class lists, seeds, output paths."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from . import UsageError

EMBEDDED = "embedded"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=EMBEDDED,
                        help="'embedded' (the shipped digits DiT, default), a preset name (random weights: "
                             "speed work only) or a .safetensors weights file")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice, usually one per core)")


# ----------------------------------------------------------------------------- guidance scale

FALLBACK_CFG_SCALE = 1.5        # DiT's FID setting, for models without a card
CARD_CFG_KEY = "recommended_cfg_scale"


def _card_cfg_text() -> str | None:
    """The embedded card's recommended scale as text, for --help; None when the card cannot be read.

    Read straight from the packaged JSON (no torch import), so `dqar --help` stays fast and never fails:
    a missing or corrupt card is reported when a command actually needs it.
    """
    from importlib import resources

    try:
        text = resources.files("dqar.digits").joinpath("assets", "dit_digits.json").read_text(encoding="utf-8")
        value = json.loads(text).get(CARD_CFG_KEY)
        return str(float(value))
    except (OSError, ValueError, TypeError, AttributeError, ModuleNotFoundError):
        return None


def cfg_scale_help(pixart: bool = False) -> str:
    """--cfg-scale's help, with the defaults spelled out (the card's value read now)."""
    card = _card_cfg_text()
    embedded = (f"{card} for the embedded model (its card's {CARD_CFG_KEY})" if card is not None
                else f"the embedded model card's {CARD_CFG_KEY} for the embedded model")
    pixart_text = ", 4.5 for PixArt (its pipeline's default)" if pixart else ""
    return (f"classifier-free guidance scale (default: {embedded}{pixart_text}, "
            f"{FALLBACK_CFG_SCALE} (DiT's FID setting) for other models)")


def add_cfg_scale_option(parser: argparse.ArgumentParser, pixart: bool = False) -> None:
    """--cfg-scale with default None: resolve it with `default_cfg_scale(args.model)` after parsing."""
    parser.add_argument("--cfg-scale", type=float, default=None, help=cfg_scale_help(pixart))


def default_cfg_scale(model_spec: str) -> float:
    """The embedded model card's recommended guidance scale; 1.5 (DiT's FID setting) for every other model.

    A missing or corrupt card, or a card whose value is not a finite number >= 0, is an error naming the
    card file, never a silent fallback.
    """
    if model_spec != EMBEDDED:
        return FALLBACK_CFG_SCALE
    from dqar.digits.embedded import DIT_CARD, asset_path, model_card

    card = model_card()
    value = card.get(CARD_CFG_KEY, FALLBACK_CFG_SCALE)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UsageError(f"model card {str(asset_path(DIT_CARD))!r}: {CARD_CFG_KEY}={value!r} is not a finite "
                         "number >= 0; fix the card or pass --cfg-scale")
    return float(value)


# ----------------------------------------------------------------------------- seeds

# The seeds dqar.sampling.sample accepts (its MAX_SEED; a test keeps the two equal): non-negative and within
# torch.Generator.manual_seed's range, outside which torch raises "Overflow when unpacking long long" in the
# middle of sampling. Kept here as numbers so building the parser never imports torch.
SEED_MIN, SEED_MAX = 0, 2**63 - 1
SEED_RANGE_TEXT = "[0, 2**63 - 1]"


def check_seed(value: int, option: str = "--seed", count: int = 1) -> int:
    """Refuse a seed torch cannot take; with `count` > 1 the seeds value .. value + count - 1 must all fit."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{option}={value!r} is not an integer")
    last = value + max(count, 1) - 1
    if value < SEED_MIN or last > SEED_MAX:
        used = f" (the run uses seeds {value}..{last})" if count > 1 and value >= SEED_MIN else ""
        raise UsageError(f"{option}={value} is not allowed{used}: seeds are integers in {SEED_RANGE_TEXT}")
    return value


# ----------------------------------------------------------------------------- output paths

def check_out_dir(path: str | Path, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be created or written.

    The folder may exist (as a folder) or not; what must not happen is an existing file in its place or
    in place of one of its parents, or a first existing ancestor that this user cannot write into.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option}={str(path)!r} is an existing file, not a folder; pass a folder path")
    ancestor = path
    while not ancestor.exists():
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise UsageError(f"{option}={str(path)!r} cannot be created: {str(ancestor)!r} is a file, not a folder")
    if ancestor.exists() and not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{option}={str(path)!r} is not writable: no write permission on {str(ancestor)!r}")
    return path


def setup_torch(args: argparse.Namespace):
    """Apply --threads and --device; returns the torch.device."""
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads={args.threads} is not allowed: must be >= 1")
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device={args.device!r} is not a torch device (e.g. cpu, cuda, cuda:0)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device={args.device!r} asked for CUDA but this torch build sees no GPU")
    if device.type == "meta":
        raise UsageError(f"--device={args.device!r} holds no data (shapes only); use cpu or a GPU")
    try:
        # A device torch knows by name may still be absent here (cuda:7 on a 1-GPU machine, mps off a Mac):
        # found now, not as a traceback when the model moves.
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        text = str(exc).strip()
        first = text.splitlines()[0].split(". ")[0][:160] if text else type(exc).__name__
        raise UsageError(f"--device={args.device!r} is not usable on this machine ({first})") from None
    return device


def resolve_model(spec: str, seed: int = 0, quiet: bool = False):
    """(model, description) for 'embedded', a preset name or a weights file."""
    from dqar.models.dit import DIT_PRESETS, build_dit
    from dqar.models.io import load_dit

    if spec == EMBEDDED:
        from dqar.digits.embedded import load_embedded_model

        return load_embedded_model(), "embedded digits DiT"
    if spec in DIT_PRESETS:
        if not quiet:
            print(f"warning: --model {spec} has random weights: use it for speed work only, "
                  "its images and quality numbers mean nothing", file=sys.stderr)
        return build_dit(spec).randomize_(seed).eval(), f"{spec} (random weights)"
    path = Path(spec)
    if (path / "model_index.json").is_file():
        raise UsageError(f"--model={spec!r} is a diffusers pipeline folder; pipelines run through "
                         "`dqar sample --model ...`")
    if path.suffix == ".safetensors" or path.exists():
        return load_dit(path), str(path)
    hint = ""
    if "/" in spec:
        hint = ("; diffusers pipelines (a hub id such as facebook/DiT-XL-2-256, or a local pipeline folder) "
                "run through `dqar sample --model ...`")
    raise UsageError(
        f"--model={spec!r} is neither 'embedded', a preset ({', '.join(DIT_PRESETS)}) nor an existing weights file"
        + hint
    )


def parse_classes(text: str | None, num_classes: int, n: int) -> list[int]:
    """Comma list of class labels (default: cycle 0..num_classes-1), each in [0, num_classes)."""
    if n < 1:
        raise UsageError(f"--n={n} is not allowed: must be >= 1")
    if text is None:
        labels = list(range(num_classes))
    else:
        try:
            labels = [int(tok) for tok in text.split(",") if tok.strip()]
        except ValueError:
            raise UsageError(f"--classes={text!r} must be a comma-separated list of integers") from None
        if not labels:
            raise UsageError(f"--classes={text!r} names no class")
    for label in labels:
        if not 0 <= label < num_classes:
            raise UsageError(f"class label {label} is outside [0, {num_classes}) for this model")
    return labels


FEATURE_CHOICES = ("evaluator", "inception")


def add_features_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", default="evaluator", choices=FEATURE_CHOICES,
                        help="FID feature space: evaluator (the embedded digits CNN, offline; default) or inception "
                             "(Inception-v3 through torchmetrics/torch-fidelity, needs its weights cached)")


def quality_tools(model_spec: str, features: str, device, evaluator_path: str | None = None):
    """(evaluator, extractor, real-data stats) for the quality block; Nones where not measurable.

    The evaluator (accuracy, and FID features by default) exists for the embedded model or a given
    --evaluator file; Inception features work for any model, with real-data stats only for the digits.
    """
    evaluator = extractor = real_stats = None
    digits = model_spec == EMBEDDED or evaluator_path is not None
    if digits:
        from dqar.digits.embedded import load_evaluator

        evaluator = load_evaluator(evaluator_path).to(device).eval()
    if features == "inception":
        from dqar.harness.metrics import InceptionFeatures

        try:
            extractor = InceptionFeatures(device)
        except RuntimeError as exc:
            raise UsageError(f"--features inception: {exc}") from None
    elif evaluator is not None:
        from dqar.harness.metrics import EvaluatorFeatures

        extractor = EvaluatorFeatures(evaluator)
    if digits and extractor is not None:
        from dqar.harness.metrics import real_data_stats

        real_stats = real_data_stats(extractor, "test")
    return evaluator, extractor, real_stats
