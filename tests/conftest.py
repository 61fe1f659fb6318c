"""Fixtures shared by the DQAR-on-DiT test modules: a tiny seeded DiT and its uncached images.

`baseline` samples the module's own LABELS, SEEDS and STEPS at CFG 2.0; a module that needs something else
defines its own `model` / `baseline`, which take precedence.
"""
import pytest

from dqar.models import build_dit
from dqar.sampling import sample


@pytest.fixture(scope="module")
def model():
    return build_dit("DiT-Tiny").randomize_(0, std=0.2).eval()


@pytest.fixture(scope="module")
def baseline(model, request):
    mod = request.module
    return sample(model, mod.LABELS, mod.SEEDS, steps=mod.STEPS, cfg_scale=2.0)
