"""The FLOP profile behind ideal_speedup: measured once per model, hooked targets and input shape, in the
first forward that sees them.

The root hook runs that forward under torch's FlopCounterMode; each hooked module adds its own share
while it runs. A profile maps (target, layer) -> FLOPs of one branch's call of that module, ("kv", layer)
-> the K/V projection FLOPs a K/V reuse skips, and "total" -> one branch's whole forward. The controller
reads profiles; only this module writes them.

Profiles outlive one apply_dqar: the FLOPs of a model's forward do not depend on its weights or on what
DQAR decides, and measuring under FlopCounterMode costs several plain forwards on a small model, so a
second generation with a fresh apply_dqar (every benchmark round does that) reuses the first one's.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


# model -> hooked targets -> input shape -> profile; weak, so a profile never keeps a model alive.
_PROFILES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def shared_profiles(model: nn.Module, targets: tuple) -> dict:
    """The profiles measured for `model` with hooks on `targets` in any earlier apply_dqar (filled in place)."""
    return _PROFILES.setdefault(model, {}).setdefault(tuple(targets), {})


class FlopProfiler:
    """Profiles per input shape, and the module FLOPs gathered while one is being measured."""

    def __init__(self, profiles: dict | None = None):
        self.profiles: dict[tuple, dict] = {} if profiles is None else profiles
        self.counter: FlopCounterMode | None = None      # set only while a profile is measured
        self._acc: dict = {}
        self._branches = 1
        self._uncounted = 0.0      # FLOPs of DQAR's own statistics inside the measured forward

    @property
    def measuring(self) -> bool:
        return self.counter is not None

    def measure(self, key: tuple, branches: int, run: Callable[[], object]):
        """Run `run()` under a FLOP counter and keep the profile of input shape `key`; returns run()'s output."""
        mapping = {}
        if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
            # torch's counter has no formula for the CPU flash kernel; attention FLOPs are the same.
            mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
        self.counter, self._acc, self._branches = FlopCounterMode(display=False, custom_mapping=mapping), {}, branches
        self._uncounted = 0.0
        try:
            with self.counter:
                out = run()
            # Events are counted per branch; a branch is 1 / branches of the batch.
            model_flops = self.counter.get_total_flops() - self._uncounted
            self.profiles[key] = {**self._acc, "total": model_flops / max(branches, 1)}
        finally:
            self.counter = None
        return out

    def uncounted(self, run: Callable[[], object]):
        """Run DQAR's own statistics (attention entropy): their FLOPs are overhead, not model work a reuse
        skips, so they stay out of the profile."""
        if self.counter is None:
            return run()
        before = self.counter.get_total_flops()
        out = run()
        self._uncounted += self.counter.get_total_flops() - before
        return out

    def module_call(self, target: str, layer: int, run: Callable[[], object], kv_flops: float | None = None,
                    accumulate: bool = False):
        """Run one hooked module inside a measured forward and record its per-branch FLOPs (added to what the
        entry holds with `accumulate`: the stack target's one entry gathers every block)."""
        before, uncounted_before = self.counter.get_total_flops(), self._uncounted
        out = run()
        per_branch = 1.0 / self._branches
        own = self.counter.get_total_flops() - before - (self._uncounted - uncounted_before)
        self._acc[(target, layer)] = own * per_branch + (self._acc.get((target, layer), 0.0) if accumulate else 0.0)
        if kv_flops is not None:
            self._acc[("kv", layer)] = kv_flops * per_branch
        return out
