"""Options and helpers shared by the subcommands: model resolution, device, class lists."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import UsageError

EMBEDDED = "embedded"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=EMBEDDED,
                        help="'embedded' (the shipped digits DiT, default), a preset name (random weights: "
                             "speed work only) or a .safetensors weights file")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


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
