"""Save and load DiT weights as safetensors, with the shape config in the file's metadata."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .dit import DIT_PRESETS, DiT, DiTConfig

CONFIG_KEY = "dqar_dit_config"


class WeightsError(ValueError):
    """A weights file that cannot be used: missing, not safetensors, corrupt or of another shape."""


def save_dit(model: DiT, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {CONFIG_KEY: json.dumps(model.config.to_dict())}
    metadata.update(extra_metadata or {})
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def read_safetensors(path: str | Path, what: str = "weights") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or a WeightsError that names the file."""
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{what} file {str(path)!r} is a folder, not a .safetensors file")
    if not path.is_file():
        raise WeightsError(f"{what} file {str(path)!r} does not exist")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(
            f"{what} file {str(path)!r} is not a readable safetensors file ({exc}); "
            "DQAR loads only .safetensors weights"
        ) from None
    check_finite(tensors, f"{what} file {str(path)!r}")
    return tensors, metadata


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise WeightsError naming the first floating-point tensor with a NaN or inf value, and how many it has.

    Such weights run without any error and give NaN outputs, which become flat images: refused at load time.
    """
    for name in sorted(tensors):
        t = tensors[name]
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            bad = int(finite.numel() - finite.sum())
            nan = int(torch.isnan(t).sum())
            raise WeightsError(f"{source}: tensor {name!r} has {bad} non-finite values of {t.numel()} ({nan} NaN, "
                               f"{bad - nan} inf); the file is damaged or comes from a diverged training run")


def check_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise WeightsError naming the first missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    for name, ref in expected.items():
        if name not in tensors:
            raise WeightsError(f"{source}: tensor {name!r} is missing (the model expects shape {tuple(ref.shape)})")
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise WeightsError(
                f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)} but the model expects "
                f"{tuple(ref.shape)}; the file is for another model shape"
            )
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise WeightsError(f"{source}: unexpected tensor {extra[0]!r}; the file is for another model")


def load_dit(path: str | Path, preset: str | None = None) -> DiT:
    """Load a DiT from safetensors; the shape comes from `preset` if given, else from the file."""
    tensors, metadata = read_safetensors(path, "DiT weights")
    if preset is not None:
        if preset not in DIT_PRESETS:
            raise WeightsError(f"unknown DiT preset {preset!r}; allowed: {', '.join(DIT_PRESETS)}")
        config = DIT_PRESETS[preset]
    elif CONFIG_KEY in metadata:
        try:
            config = DiTConfig(**json.loads(metadata[CONFIG_KEY]))
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"DiT weights file {str(path)!r} has an invalid shape config: {exc}") from None
    else:
        raise WeightsError(
            f"DiT weights file {str(path)!r} carries no '{CONFIG_KEY}' metadata, so its shape "
            "is unknown: re-save it with dqar.models.save_dit (which records the shape), or load it in Python with "
            "load_dit(path, preset=...)"
        )
    model = DiT(config)
    check_state_dict(model, tensors, f"DiT weights file {str(path)!r}")
    model.load_state_dict(tensors)
    return model.eval()
