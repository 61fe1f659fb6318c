"""The shipped default model: the digits DiT (EMA weights), its evaluator and their model cards.

Assets live in the package (`dqar/digits/assets/`) and are found through importlib.resources, so they resolve from an
installed wheel as well as from a source checkout. Every weights file carries a SHA-256 of its tensor bytes in
its metadata: safetensors only validates the header, so a file whose data bytes were damaged would otherwise
load silently and sample garbage.
"""
from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

import torch

from dqar.models.dit import DIT_PRESETS, DiT
from dqar.models.io import WeightsError, load_dit, read_safetensors, save_dit

from .evaluator import load_evaluator_file, save_evaluator

DIT_FILE = "dit_digits_ema.safetensors"
DIT_CARD = "dit_digits.json"
EVALUATOR_FILE = "evaluator.safetensors"
EVALUATOR_CARD = "evaluator.json"
ASSET_FILES = (DIT_FILE, DIT_CARD, EVALUATOR_FILE, EVALUATOR_CARD)
PRESET = "DiT-Digits"
# Shapes a digits weights file may have: the shipped one and a wider candidate (issue 14 capacity test).
DIGITS_PRESETS = (PRESET, "DiT-Digits-W")
DIGEST_KEY = "dqar_tensor_sha256"

_keep_open = ExitStack()   # holds extracted copies alive when the package is imported from a zip


class EmbeddedAssetError(WeightsError):
    """A shipped (or user-supplied) embedded asset that is missing, unreadable or damaged."""


def asset_path(name: str) -> Path:
    """Filesystem path of a packaged asset, resolved through importlib.resources."""
    if name not in ASSET_FILES:
        raise ValueError(f"unknown embedded asset {name!r}; allowed: {', '.join(ASSET_FILES)}")
    ref = resources.files("dqar.digits").joinpath("assets", name)
    path = Path(_keep_open.enter_context(resources.as_file(ref)))
    if not path.is_file():
        raise EmbeddedAssetError(
            f"embedded asset {str(path)!r} is missing from the installed package; reinstall dqar or rebuild it "
            "with `dqar train-model --out DIR --install`"
        )
    return path


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _verify(path: Path, what: str) -> None:
    tensors, metadata = read_safetensors(path, what)
    expected = metadata.get(DIGEST_KEY)
    if expected is None:
        raise EmbeddedAssetError(f"{what} file {str(path)!r} has no '{DIGEST_KEY}' checksum; it was not written "
                                 "by `dqar train-model`")
    if tensor_digest(tensors) != expected:
        raise EmbeddedAssetError(f"{what} file {str(path)!r} is corrupted: its tensor data does not match the "
                                 "checksum stored in the file")


def _wrap(exc: WeightsError) -> EmbeddedAssetError:
    return exc if isinstance(exc, EmbeddedAssetError) else EmbeddedAssetError(str(exc))


def save_embedded_dit(model: DiT, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return save_dit(model, path, {DIGEST_KEY: tensor_digest(tensors), **(extra_metadata or {})})


def save_embedded_evaluator(model, path: str | Path) -> Path:

    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return save_evaluator(model, path, {DIGEST_KEY: tensor_digest(tensors)})


def load_embedded_model(path: str | Path | None = None) -> DiT:
    """The digits DiT in eval mode: the shipped EMA weights, or a file written by `dqar train-model`."""
    path = Path(path) if path is not None else asset_path(DIT_FILE)
    try:
        _verify(path, "embedded DiT weights")
        model = load_dit(path)
    except WeightsError as exc:
        raise _wrap(exc) from None
    if all(model.config != DIT_PRESETS[name] for name in DIGITS_PRESETS):
        raise EmbeddedAssetError(f"embedded DiT weights file {str(path)!r} has shape {model.config.to_dict()}, "
                                 f"not one of the digits presets {', '.join(DIGITS_PRESETS)}")
    return model.eval()


def load_evaluator(path: str | Path | None = None):
    """The digits evaluator CNN (`dqar.digits.evaluator.DigitsEvaluator`) in eval mode."""

    path = Path(path) if path is not None else asset_path(EVALUATOR_FILE)
    try:
        _verify(path, "evaluator weights")
        return load_evaluator_file(path)
    except WeightsError as exc:
        raise _wrap(exc) from None


def _read_card(path: Path) -> dict:
    if not path.is_file():
        raise EmbeddedAssetError(f"model card {str(path)!r} does not exist")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EmbeddedAssetError(f"model card {str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(card, dict):
        raise EmbeddedAssetError(f"model card {str(path)!r} holds a {type(card).__name__}, expected a JSON object")
    return card


def model_card(path: str | Path | None = None) -> dict:
    """The DiT's model card: shape, data, schedule, training run, measured quality, reproduce command."""
    return _read_card(Path(path) if path is not None else asset_path(DIT_CARD))


def evaluator_card(path: str | Path | None = None) -> dict:
    return _read_card(Path(path) if path is not None else asset_path(EVALUATOR_CARD))
