"""diffusers' cache hooks as named baselines on the same weights, and a count of what every contender computes.

Each peer runs one of diffusers' caches on a `DiTTransformer2DModel` carrying the source DiT's weights
(`dqar.models.diffusers_port`), behind the project DiT's call `model(x, t, y)`. What each needed on a DiT:

- taylorseer: its default patterns (`^transformer_blocks.*attn`, matched whole) hook nothing on DiT, whose
  blocks name attention `attn1` and the MLP `ff`; the peer hooks those (option `targets`, default both).
- fastercache: `tensor_format="BCHW"`; `class_labels` in the batch-split list (else a cond-only call keeps the
  labels of both branches); and its [uncond | cond] batch order: `sample()` batches [cond | uncond], so the
  peer swaps the halves in and out (else the *conditional* branch is the one approximated). Needs CFG.
- seacache: a cache context with step index, step count and sigma on every call, and a vision callback (x_t,
  one (C, 1, H, W) frame per image). Its spectral filter assumes flow matching, x_t = (1 - s) x0 + s eps; a
  DDIM x_t = a x0 + b eps has the signal-to-noise ratio of the flow-matching sample x_t / (a + b) at
  s = b / (a + b): that is the latent and sigma it gets.
- fbc, magcache: a cache context (their state is keyed by it). magcache's magnitude ratios come from its
  calibration mode, run once when the baseline is made on a fixed set: `calibration_images` images (labels
  spread over the classes, seeds from `calibration_seed`, far from the harness's), `calibration_steps` steps of
  `calibration_sampler` at `calibration_cfg_scale`; another step count uses them interpolated (`nearest_interp`).

Options keep diffusers' defaults (fastercache's `attention_weight` is the 0.5 it falls back to). The hooks
keep state between generations (PAB and FirstBlockCache then reuse it, or crash on a new batch size), so a
peer resets them at step 0, which it learns from the sampler: `sample(peer, ...,
observers=sampling_observers(peer))`; without that it raises.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from dqar.sampling import SAMPLERS, sample

PEERS = ("taylorseer", "seacache", "fastercache", "fbc", "magcache")
KINDS = ("attn", "mlp", "block")
_CONTEXT = "dqar-batch"           # one cache context: sample() runs both CFG branches in one batch


# ----------------------------------------------------------------------------- options

def _number(integer: bool, lo=None, hi=None, lo_open: bool = False, optional: bool = False):
    def parse(v):
        if optional and (v is None or str(v).strip().lower() == "none"):
            return None
        v = (int if integer else float)(v.strip()) if isinstance(v, str) else v
        typed = isinstance(v, int) if integer else isinstance(v, (int, float)) and math.isfinite(v)
        if isinstance(v, bool) or not typed or (lo is not None and (v <= lo if lo_open else v < lo)) \
                or (hi is not None and v > hi):
            raise ValueError
        return v if integer else float(v)
    bounds = [f"{'>' if lo_open else '>='} {lo}" * (lo is not None), f"<= {hi}" * (hi is not None)]
    text = " ".join(["an integer" if integer else "a finite number", " and ".join(b for b in bounds if b)])
    return parse, text.strip() + " or none" * optional


_int, _real = partial(_number, True), partial(_number, False)


def _span():
    def parse(v):
        if isinstance(v, str):
            v = v.strip().strip("()[]").split(",")
        lo, hi = (_real()[0](p) for p in v)       # exactly two finite numbers
        if not lo < hi:
            raise ValueError
        return [lo, hi]
    return parse, "two numbers low,high with low < high (timesteps run 999 to 0)"


def _choice(*values: str):
    def parse(v):
        if v not in values:
            raise ValueError
        return v
    return parse, "one of " + ", ".join(values)


def _targets():
    def parse(v):
        parts = [p.strip() for p in v.split(",")] if isinstance(v, str) else list(v)
        if not parts or not set(parts) <= {"attn", "mlp"}:
            raise ValueError
        return ",".join(k for k in ("attn", "mlp") if k in parts)
    return parse, "attn, mlp or attn,mlp"


# name -> option -> (default, (parser, what is allowed)). pab's defaults live in baselines.py.
_SPECS = {
    "pab": {"block_skip_range": (None, _int(1)), "timestep_range": (None, _span())},
    "taylorseer": {"cache_interval": (5, _int(1)), "disable_cache_before_step": (3, _int(1)),
                   "disable_cache_after_step": (None, _int(0, optional=True)), "max_order": (1, _int(0, 4)),
                   "taylor_factors_dtype": ("bfloat16", _choice("bfloat16", "float16", "float32")),
                   "targets": ("attn,mlp", _targets())},
    "fbc": {"threshold": (0.05, _real(0.0))},
    "seacache": {"threshold": (0.25, _real(0.0)), "residual_order": (1, _int(0, 1)),
                 "retention_steps": (1, _int(0)), "cache_end_steps": (1, _int(0)),
                 "max_consecutive_cached": (2, _int(0)), "power_exp": (3.0, _real(0.0, lo_open=True))},
    "fastercache": {"spatial_attention_block_skip_range": (2, _int(1)),
                    "spatial_attention_timestep_skip_range": ([-1.0, 681.0], _span()),
                    "unconditional_batch_skip_range": (5, _int(1)),
                    "unconditional_batch_timestep_skip_range": ([-1.0, 641.0], _span()),
                    "low_frequency_weight_update_timestep_range": ([99.0, 901.0], _span()),
                    "high_frequency_weight_update_timestep_range": ([-1.0, 301.0], _span()),
                    "alpha_low_frequency": (1.1, _real()), "alpha_high_frequency": (1.1, _real()),
                    "attention_weight": (0.5, _real())},
    "magcache": {"threshold": (0.06, _real(0.0)), "max_skip_steps": (3, _int(0)),
                 "retention_ratio": (0.2, _real(0.0, 1.0)), "calibration_steps": (50, _int(2, 1000)),
                 "calibration_images": (8, _int(1)), "calibration_seed": (2**32, _int(0, 2**62)),
                 "calibration_sampler": ("ddim", _choice(*SAMPLERS)),
                 "calibration_cfg_scale": (1.5, _real(0.0))},
}


def validate_options(name: str, options=None) -> dict:
    """The options given for baseline `name`, parsed (values may be strings, as `key=value` on a command
    line gives them); an unknown name or a bad value raises ValueError naming it and what is allowed."""
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"options={options!r}: must be a mapping of option name to value")
    options, spec = dict(options or {}), _SPECS.get(name)
    if spec is None:
        if options:
            raise ValueError(f"baseline {name!r} takes no options; got {', '.join(map(str, options))}")
        return {}
    out = {}
    for key, raw in options.items():
        if key not in spec:
            raise ValueError(f"baseline {name!r} has no option {key!r}; allowed: {', '.join(spec)}")
        parse, allowed = spec[key][1]
        try:
            out[key] = parse(raw)
        except (TypeError, ValueError):
            raise ValueError(f"baseline {name!r} option {key}={raw!r} is not allowed: must be {allowed}") from None
    return out


def default_settings(name: str) -> dict:
    """The settings a peer runs with when given no options (JSON-safe)."""
    return copy.deepcopy({key: default for key, (default, _) in _SPECS[name].items()})


# ----------------------------------------------------------------------------- counting module calls

def _rows(args, kwargs) -> int:
    x = args[0] if args else kwargs.get("hidden_states")
    return int(x.shape[0]) if isinstance(x, torch.Tensor) else 0


def _probes(model: nn.Module) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
    """Per layer, the first submodule the attention, the MLP and the block run: each runs only when its
    module computes, whatever wraps that module's forward (DQAR, diffusers' hooks, a cache)."""
    for m in model.modules():
        blocks = getattr(m, "transformer_blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) and hasattr(blocks[0], "attn1"):
            return [(b.attn1.to_q, b.ff.net[0], b.norm1) for b in blocks]
        blocks = getattr(m, "blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) and hasattr(blocks[0], "mlp"):
            return [(b.attn.qkv, b.mlp.fc1, b.adaLN_modulation) for b in blocks]
    raise ValueError(f"{type(model).__name__} has no DiT blocks (blocks[i].attn/mlp or "
                     "transformer_blocks[i].attn1/ff) to count")


class CallCounts(dict):
    """{"attn", "mlp", "block"} -> share of the calls an uncached run of the same steps and batch makes
    that actually ran (None when nothing ran); `executed` / `expected` hold the counts. A call counts its
    batch rows, so a call on one CFG branch (FasterCache's skipped unconditional branch) counts half."""

    def __init__(self, model: nn.Module, root: bool = True):
        super().__init__()
        self.layers = _probes(model)
        self.clear_counts()
        self._handles = [model.register_forward_pre_hook(self._root, with_kwargs=True)] if root else []
        for layer in self.layers:
            for kind, probe in zip(KINDS, layer):
                self._handles.append(probe.register_forward_pre_hook(partial(self._hit, kind), with_kwargs=True))

    def _root(self, _module, args, kwargs):
        self.expect(_rows(args, kwargs))

    def _hit(self, kind, _module, args, kwargs):
        self.executed[kind] += _rows(args, kwargs)

    def expect(self, rows: int) -> None:
        for kind in KINDS:
            self.expected[kind] += rows * len(self.layers)

    def clear_counts(self) -> None:
        self.executed, self.expected = dict.fromkeys(KINDS, 0), dict.fromkeys(KINDS, 0)

    def shares(self) -> dict:
        return {k: self.executed[k] / self.expected[k] if self.expected[k] else None for k in KINDS}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextmanager
def count_module_calls(model: nn.Module):
    """Count the attention, MLP and block calls `model` (a DiT, a DQAR-hooked DiT, the int8 baseline, a peer,
    PAB, a diffusers DiT/PixArt transformer) executes inside the block; on exit the yielded `CallCounts`
    holds each share. The counting hooks are removed on exit."""
    counts = CallCounts(model)
    try:
        yield counts
    finally:
        counts.remove()
        counts.update(counts.shares())


# ----------------------------------------------------------------------------- the peers

class PeerDiT(nn.Module):
    """A ported DiT under one of diffusers' caches; `reuse_stats()` reports its last generation."""

    name = ""
    CACHE_ATTRS: tuple[str, ...] = ()     # hook-state attributes that hold cached tensors
    MIN_DEPTH = 1

    def __init__(self, model: nn.Module, options: dict, device: torch.device | str = "cpu"):
        super().__init__()
        from dqar.models.diffusers_port import DiffusersDiT

        if model.config.depth < self.MIN_DEPTH:
            raise ValueError(f"baseline {self.name!r} needs a model with at least {self.MIN_DEPTH} blocks")
        self.settings = {**default_settings(self.name), **options}
        self.config = model.config
        self.port = DiffusersDiT(model).to(device)
        self.transformer = self.port.transformer
        self._device = torch.device(device)
        self._calls = CallCounts(self.port, root=False)
        self._announced = None
        self._next_step: int | None = None
        self._branches, self._batch = ("cond",), 0
        self._peak_bytes = 0
        self._install(self.settings)
        self._registry().invalidate_child_registries_cache()
        if not any(self._registries()):
            raise RuntimeError(f"baseline {self.name!r}: diffusers' hooks attached to nothing on the port")

    def _registry(self):
        from diffusers.hooks import HookRegistry

        return HookRegistry.check_if_exists_or_initialize(self.transformer)

    def _registries(self):
        for m in self.transformer.modules():
            reg = m.__dict__.get("_diffusers_hook")
            if reg is not None and reg.hooks:
                yield reg

    # sample()'s observer protocol: the step about to run.
    def on_step_begin(self, info) -> None:
        self._announced = info

    def on_step_end(self, info) -> None:
        pass

    def _begin_generation(self, info) -> None:
        self._registry().reset_stateful_hooks()
        self._calls.clear_counts()
        self._peak_bytes = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        info, self._announced = self._announced, None
        if info is None or int(t.flatten()[0]) != info.timestep:
            raise RuntimeError(f"baseline {self.name!r} needs the sampler's step: call sample(model, ..., "
                               "observers=dqar.harness.peers.sampling_observers(model))")
        if info.step_index == 0:
            self._begin_generation(info)
        elif info.step_index != self._next_step:
            raise RuntimeError(f"baseline {self.name!r}: step {info.step_index} follows no step {info.step_index - 1}")
        self._next_step = info.step_index + 1
        self._branches, self._batch = tuple(info.branches), x.shape[0]
        self._calls.expect(x.shape[0])
        a, s = info.alpha, info.sigma
        # diffusers' DiT has no cache_context(); this is what that method does on models that have it.
        _set_cache_context(self.transformer, CacheContext(_CONTEXT, step_index=info.step_index, timestep=info.timestep,
                                                          num_inference_steps=info.total_steps, sigma=s / (a + s)))
        try:
            out = self._call(x, t, y, info)
            self._peak_bytes = max(self._peak_bytes, self._cache_bytes())
        finally:
            _set_cache_context(self.transformer, None)
        return out

    def _call(self, x, t, y, info) -> torch.Tensor:
        return self.port(x, t, y)

    def _cache_bytes(self) -> int:
        seen, total = set(), 0
        for reg in self._registries():
            for hook in reg.hooks.values():
                states = [getattr(hook, "state", None)]
                if getattr(hook, "state_manager", None) is not None:
                    states.append(hook.state_manager.get_state())
                for state in states:
                    for attr in self.CACHE_ATTRS:
                        for ten in _tensors(getattr(state, attr, None)):
                            key = (ten.data_ptr(), ten.numel())
                            if key not in seen:
                                seen.add(key)
                                total += ten.numel() * ten.element_size()
        return total

    def reuse_stats(self) -> dict:
        """The last generation: attention + MLP calls skipped (`reuse_events`, per CFG branch like DQAR's
        events) and their share, the peak bytes the hooks cached, and every kind's executed share (`calls`)."""
        done = self._calls.executed["attn"] + self._calls.executed["mlp"]
        total = self._calls.expected["attn"] + self._calls.expected["mlp"]
        per_branch = max(1, self._batch // len(self._branches))
        return {"reuse_events": round((total - done) / per_branch), "cache_bytes": self._peak_bytes,
                "reuse_fraction": 1 - done / total if total else 0.0, "calls": self._calls.shares()}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (dict, list, tuple)):
        for v in (obj.values() if isinstance(obj, dict) else obj):
            yield from _tensors(v)


class TaylorSeerDiT(PeerDiT):
    name, CACHE_ATTRS = "taylorseer", ("taylor_factors",)

    def _install(self, o):
        from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

        names = {"attn": "attn1", "mlp": "ff"}       # the other options are TaylorSeerCacheConfig's fields
        fields = {k: v for k, v in o.items() if k not in ("targets", "taylor_factors_dtype")}
        apply_taylorseer_cache(self.transformer, TaylorSeerCacheConfig(
            **fields, taylor_factors_dtype=getattr(torch, o["taylor_factors_dtype"]),
            cache_identifiers=[rf"transformer_blocks\.\d+\.{names[k]}" for k in o["targets"].split(",")]))


class FirstBlockCacheDiT(PeerDiT):
    name, CACHE_ATTRS, MIN_DEPTH = "fbc", ("head_block_residual", "tail_block_residuals"), 2

    def _install(self, o):
        from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

        apply_first_block_cache(self.transformer, FirstBlockCacheConfig(threshold=o["threshold"]))


class FasterCacheDiT(PeerDiT):
    name, CACHE_ATTRS = "fastercache", ("cache", "low_frequency_delta", "high_frequency_delta")

    def _install(self, o):
        from diffusers.hooks import FasterCacheConfig, apply_faster_cache

        weight = o["attention_weight"]      # the other options are FasterCacheConfig's fields
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in o.items() if k != "attention_weight"}
        apply_faster_cache(self.transformer, FasterCacheConfig(
            **fields, attention_weight_callback=lambda _module: weight, tensor_format="BCHW",
            current_timestep_callback=lambda: self.port.timestep,
            _unconditional_conditional_input_kwargs_identifiers=["hidden_states", "timestep", "class_labels"]))

    def _call(self, x, t, y, info):
        if info.branches == ("uncond", "cond"):
            return self.port(x, t, y)
        if info.branches != ("cond", "uncond"):
            raise ValueError("baseline 'fastercache' needs classifier-free guidance (cfg_scale != 1): it "
                             "approximates the unconditional branch")
        half = x.shape[0] // 2

        def swap(v):   # [cond | uncond] <-> [uncond | cond]
            return torch.cat([v[half:], v[:half]])

        return swap(self.port(swap(x), swap(t), swap(y)))


class SeaCacheDiT(PeerDiT):
    name, CACHE_ATTRS, MIN_DEPTH = "seacache", ("history",), 2

    def _install(self, o):
        from diffusers.hooks import SeaCacheConfig, apply_sea_cache

        self._vision: list[torch.Tensor] = []     # the options are SeaCacheConfig's fields
        apply_sea_cache(self.transformer, SeaCacheConfig(
            **o, raw_vision_callback=lambda _module, _args, _kwargs: self._vision))

    def _call(self, x, t, y, info):
        # The flow-matching form of x_t (see the module docstring): one (C, 1, H, W) frame per image.
        self._vision = list((info.x / (info.alpha + info.sigma)).unsqueeze(2).unbind(0))
        try:
            return self.port(x, t, y)
        finally:
            self._vision = []


class MagCacheDiT(PeerDiT):
    name, CACHE_ATTRS = "magcache", ("previous_residual",)

    def _install(self, o):
        from diffusers.hooks import MagCacheConfig, apply_mag_cache
        from diffusers.hooks.hooks import CacheContext

        self._mag = None
        steps, n, k = o["calibration_steps"], o["calibration_images"], self.config.num_classes
        # Calibration never skips. Its step count is one past the run's: at the count diffusers prints the
        # ratios to stdout and clears them; they are read from the tail hook's state instead.
        apply_mag_cache(self.transformer, MagCacheConfig(calibrate=True, num_inference_steps=steps + 1))
        self._registry().invalidate_child_registries_cache()
        sample(self, [i * k // n for i in range(n)], [o["calibration_seed"] + i for i in range(n)], steps=steps,
               sampler=o["calibration_sampler"], cfg_scale=o["calibration_cfg_scale"], observers=[self],
               device=self._device)
        manager = self.transformer.transformer_blocks[-1]._diffusers_hook.get_hook("mag_cache_block_hook").state_manager
        manager.set_context(CacheContext(_CONTEXT))
        ratios = [float(r) for r in manager.get_state().calibration_ratios]
        manager.set_context(None)
        if len(ratios) != steps:
            raise RuntimeError(f"magcache calibration gave {len(ratios)} ratios for {steps} steps")
        self.settings["mag_ratios"] = ratios
        self._mag = MagCacheConfig(threshold=o["threshold"], max_skip_steps=o["max_skip_steps"],
                                   retention_ratio=o["retention_ratio"], num_inference_steps=steps,
                                   mag_ratios=torch.tensor(ratios))
        apply_mag_cache(self.transformer, self._mag)     # replaces the calibration hooks

    def _begin_generation(self, info):
        super()._begin_generation(info)
        if self._mag is not None and info.total_steps != self._mag.num_inference_steps:
            from diffusers.hooks.mag_cache import nearest_interp

            self._mag.num_inference_steps = info.total_steps
            self._mag.mag_ratios = nearest_interp(torch.tensor(self.settings["mag_ratios"]), info.total_steps)


_CLASSES = {c.name: c for c in (TaylorSeerDiT, SeaCacheDiT, FasterCacheDiT, FirstBlockCacheDiT, MagCacheDiT)}


def make_peer(name: str, model: nn.Module, device: torch.device | str = "cpu", options=None) -> PeerDiT:
    """Peer `name` on a diffusers port of `model` (left untouched), on `device`, with `options` over the defaults."""
    if name not in _CLASSES:
        raise ValueError(f"peer {name!r} is not known; allowed: {', '.join(PEERS)}")
    return _CLASSES[name](model, validate_options(name, options), device)


def sampling_observers(model) -> tuple:
    """What `sample()` must be given as `observers` for `model`: the peer itself, or nothing."""
    return (model,) if isinstance(model, PeerDiT) else ()
