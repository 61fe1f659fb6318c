"""Attach DQAR to a model without forking it: one registry of block layouts, instance-level wrappers.

`apply_dqar(model_or_pipeline, config)` wraps, per block, the forward of the attention module (and of
the MLP when targeted) on the *instance*, plus the root model's forward; `remove_dqar` puts back
whatever each instance had before (its own attribute, e.g. an accelerate offload wrapper, or none, so
the class's forward shows through again): the original forward exactly. The wrappers hold no data:
all state lives in the DQARController. The wrapper of one module is a `TargetHook` (dqar.method.target),
the root's a `RootHook` (dqar.method.root). Steps are started and ended by the model's `StepDriver`
(dqar.method.step), FLOPs measured by its `FlopProfiler` (dqar.method.flops). Which modules are wrapped
comes from the model's `BlockLayout` (dqar.method.layouts): every block of its block lists, per block the
targets it has (a Flux single-stream block has no MLP target).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.nn as nn

from .config import DQARConfig
from .controller import DQARController
from .flops import FlopProfiler, shared_profiles
from .layouts import BlockLayout, find_layout
from .probes import BlockProbe
from .root import _MISSING, RootHook, _restore_attr, watch_prompt
from .stack import StackHook, StackState, stack_problem
from .step import HOOK_ATTR, StepDriver
from .target import TargetHook


# ----------------------------------------------------------------------------- public API
@dataclass
class _Hooked:
    """What apply_dqar leaves on the model: the state, its driver, and what to put back on removal."""

    controller: DQARController
    driver: StepDriver
    wrapped: list
    restore: list


def _split_pipeline(obj):
    """(model, scheduler, pipeline or None) from a model or a diffusers pipeline."""
    if isinstance(obj, nn.Module):
        return obj, None, None
    model = getattr(obj, "transformer", None)
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_dqar expects a DiT model or a diffusers pipeline with .transformer, "
                        f"got {type(obj).__name__}")
    return model, getattr(obj, "scheduler", None), obj


def apply_dqar(model_or_pipeline, config: DQARConfig | None = None, *, scheduler=None) -> DQARController:
    """Hook DQAR into a model (our DiT, diffusers DiT/PixArt) or a diffusers pipeline; returns its controller.

    A bare diffusers transformer learns its step from the timestep input, which needs the scheduler
    that produces those timesteps: pass the pipeline, or the transformer with `scheduler=`.
    """
    config = config if config is not None else DQARConfig()
    if not isinstance(config, DQARConfig):
        raise TypeError(f"config must be a DQARConfig, got {type(config).__name__}")
    model, pipe_scheduler, pipe = _split_pipeline(model_or_pipeline)
    if HOOK_ATTR in model.__dict__:
        raise RuntimeError(f"DQAR is already applied to this {type(model).__name__}; call remove_dqar first")
    if _is_compiled(model):
        raise TypeError(f"apply_dqar got a compiled {type(model._orig_mod).__name__} (torch.compile's wrapper): apply DQAR to "
                        "the plain model first, then compile it (torch.compile(model) after apply_dqar)")
    layout = find_layout(model)
    if layout.drives_itself and scheduler is None and pipe_scheduler is None:
        # Without one no step would ever begin and the model would run uncached without a word.
        where = (f"a {type(pipe).__name__} whose scheduler is None" if pipe is not None
                 else f"a bare {type(model).__name__}")
        raise ValueError(
            f"apply_dqar on {where} needs the scheduler that drives its transformer: pass a pipeline with "
            "its scheduler (apply_dqar(pipe, config)) or apply_dqar(transformer, config, scheduler=...)")
    blocks = layout.blocks(model)
    per_block = [layout.targets(block) for block in blocks]
    _check_targets(config, layout, model, per_block)
    _check_csb_topk(config, layout, per_block)
    ctl = DQARController(config, num_layers=len(blocks))
    driver, flops = StepDriver(ctl), FlopProfiler(shared_profiles(model, config.targets))
    wrapped, restore = [], []
    if config.targets == ("stack",):
        state = StackState(len(blocks))
        wrapped += [_replace_forward(block, StackHook(ctl, flops, i, block, state)) for i, block in enumerate(blocks)]
        per_block = []          # nothing else is wrapped
    for layer, (block, modules) in enumerate(zip(blocks, per_block)):
        probe = BlockProbe(block, layout, ctl.config.error_images) if ctl.needs_effect else None
        if probe is not None:
            restore.append(probe.remove)
        for target in config.targets:
            if target in modules:
                module = modules[target]
                wrapped.append(_replace_forward(module, TargetHook(ctl, flops, layer, target, module, layout, probe)))
    wrapped.append(_replace_forward(model, RootHook(driver, flops, model, layout, scheduler, pipe)))
    if pipe is not None and hasattr(pipe, "encode_prompt") and layout.cfg_order is not None:
        restore.append(watch_prompt(pipe, driver, layout.cfg_order))
    model.__dict__[HOOK_ATTR] = _Hooked(ctl, driver, wrapped, restore)
    return ctl


def _is_compiled(model) -> bool:
    return type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod")


def _check_targets(config: DQARConfig, layout: BlockLayout, model, per_block) -> None:
    """Every requested target exists somewhere, and K/V mode only where attention is plain SDPA."""
    name = type(model).__name__
    if config.targets == ("stack",):
        problem = stack_problem(layout, layout.blocks(model), model)
        if problem is not None:
            raise ValueError(f"DQARConfig.targets=('stack',) cannot run on {name}: {problem}; the stack target needs "
                             "one chain of single-tensor blocks (use targets=('block',))")
        return
    for target in config.targets:
        if not any(target in modules for modules in per_block):
            raise ValueError(f"DQARConfig.targets has {target!r}, but no block of {name} has one (looked for "
                             f"attributes {', '.join(layout.target_attrs.get(target, ()))})")
    if config.mode == "kv":
        for layer, modules in enumerate(per_block):
            attn = modules.get("attn")
            if attn is not None and layout.attention_ops(attn) is None:
                raise ValueError(f"DQARConfig.mode='kv' needs plain self-attention, but layer {layer} of {name} "
                                 f"runs {type(getattr(attn, 'processor', attn)).__name__} (joint, linear or rotary "
                                 "attention); use mode='output'")


def _check_csb_topk(config: DQARConfig, layout: BlockLayout, per_block) -> None:
    """A salient-channel count larger than the cached tensors' channels fails here, not mid-generation."""
    topk = config.csb_topk
    bits = config.resolved_kv_bits if config.mode == "kv" else (config.cache_bits,)
    if not per_block or all(b == 16 for b in bits) or not topk or topk < 1:
        return              # nothing is quantized, so no channels are kept aside
    attn = per_block[0].get("attn")
    ops = layout.attention_ops(attn) if attn is not None else None
    if ops is not None:
        channels = ops.cache_channels(attn, config.mode)
    else:
        out = getattr(attn, "to_out", None)
        channels = out[0].out_features if out is not None else getattr(attn, "inner_dim", None)
        if channels is None:
            return
    if topk > channels:
        what = "the head dim of K/V" if config.mode == "kv" else "the attention/MLP output width"
        raise ValueError(f"DQARConfig.csb_topk={topk!r} is not allowed for this model: {what} is {channels} "
                         f"channels, so a count must be in 1..{channels} (or a fraction < 1)")


def _replace_forward(module: nn.Module, hook) -> tuple[nn.Module, object, object]:
    """Install `hook` as the instance's forward; returns (module, what to put back on removal, the hook)."""
    previous = module.__dict__.get("forward", _MISSING)
    module.forward = hook
    return module, previous, hook


def _unwrap(module: nn.Module, previous, hook) -> None:
    """Take `hook` out of `module`'s forward. Usually it is the forward itself; a wrapper installed on top of it
    later (accelerate's offload hook: `enable_model_cpu_offload` after apply_dqar) keeps the forward it
    wrapped in `_old_forward`, and there it is replaced by what the hook replaced, so the wrapper stays."""
    current = module.__dict__.get("forward", _MISSING)
    if current is hook:
        _restore_attr(module, "forward", previous)
    elif module.__dict__.get("_old_forward") is hook:
        module._old_forward = previous if previous is not _MISSING else type(module).forward.__get__(module)
    elif current is previous:
        return                  # someone already put back what the hook replaced
    else:
        # Wrapped by something unknown: the hook stays in its chain, inert (the controller is reset below,
        # and an inactive controller makes every hook call the original forward).
        warnings.warn(f"DQAR: the forward of this {type(module).__name__} was wrapped again after apply_dqar by "
                      "something DQAR does not know; its hook is left in that chain, inactive", RuntimeWarning,
                      stacklevel=3)


def get_controller(model_or_pipeline) -> DQARController | None:
    model, _, _ = _split_pipeline(model_or_pipeline)
    found = model.__dict__.get(HOOK_ATTR)
    return found.controller if found else None


def get_step_driver(model_or_pipeline) -> StepDriver | None:
    """The driver that starts the hooked model's steps (announce a prompt's token count through it)."""
    model, _, _ = _split_pipeline(model_or_pipeline)
    found = model.__dict__.get(HOOK_ATTR)
    return found.driver if found else None


def remove_dqar(model_or_pipeline) -> None:
    """Restore every wrapped forward; the model is then exactly the unhooked one."""
    model, _, _ = _split_pipeline(model_or_pipeline)
    found = model.__dict__.pop(HOOK_ATTR, None)
    if found is None:
        raise RuntimeError(f"DQAR is not applied to this {type(model).__name__}")
    for module, previous, hook in found.wrapped:
        _unwrap(module, previous, hook)
    for undo in found.restore:
        undo()
    found.controller.reset()
