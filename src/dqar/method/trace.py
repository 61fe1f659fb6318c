"""Policy-training traces: at each computed attention output, the seed's features and how far reusing the
cached output instead would have been off."""
from __future__ import annotations

import torch

from .cache import CacheEntry
from .schedules import StepState
from .stats import policy_features


def trace_row(step: StepState, layer: int, branch: str, fresh: torch.Tensor, cached: CacheEntry | None,
              entropy: float | None) -> dict | None:
    """One row, or None when there is nothing cached to compare with yet."""
    if cached is None or cached.output is None:
        return None
    previous = cached.output.dequantize().float()
    fresh = fresh.float()
    rel = float((fresh - previous).norm() / (fresh.norm() + 1e-12))
    feats = policy_features(entropy if entropy is not None else float("nan"), step.snr or 0.0,
                            step.latent_norm or 0.0, step.progress, step.prompt_length)
    return {"step": step.step_index, "total_steps": step.total_steps, "layer": layer, "branch": branch,
            "features": feats, "rel_change": rel, "cached_step": cached.step}
