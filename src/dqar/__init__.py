"""DQAR: Dynamic Quantized Attention Reuse for Diffusion Transformers.

Heavy dependencies (diffusers, the harness) are imported lazily so `import dqar` stays fast.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "DQARConfig": "dqar.method.config",
    "DQARController": "dqar.method.controller",
    "Decision": "dqar.method.controller",
    "apply_dqar": "dqar.method.hooks",
    "remove_dqar": "dqar.method.hooks",
    "DiT": "dqar.models.dit",
    "DiTConfig": "dqar.models.dit",
    "build_dit": "dqar.models.dit",
    "load_dit": "dqar.models.io",
    "save_dit": "dqar.models.io",
    "sample": "dqar.sampling",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dqar' has no attribute {name!r}")
