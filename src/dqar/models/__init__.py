"""Model definitions: the compact DiT and its weight files."""
from .dit import DIT_PRESETS, DiT, DiTConfig, build_dit
from .io import WeightsError, load_dit, save_dit

__all__ = ["DIT_PRESETS", "DiT", "DiTConfig", "WeightsError", "build_dit", "load_dit", "save_dit"]
