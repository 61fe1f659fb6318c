"""Attach DQAR to a model without forking it: one registry of block layouts, instance-level wrappers.

`apply_dqar(model_or_pipeline, config)` wraps, per block, the forward of the attention module (and of
the MLP when targeted) on the *instance*, plus the root model's forward; `remove_dqar` puts back
whatever each instance had before (its own attribute, e.g. an accelerate offload wrapper, or none, so
the class's forward shows through again): the original forward exactly. The wrappers hold no data:
all state lives in the DQARController. The reuse decision per (layer, branch) is one call,
`controller.should_reuse`; everything else here is plumbing: split the batch by CFG branch, compute
only the branches that must, stitch the outputs back together. Steps are started and ended by the
model's `StepDriver` (dqar.method.step), FLOPs measured by its `FlopProfiler` (dqar.method.flops).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import DQARConfig
from .controller import DQARController
from .flops import FlopProfiler
from .layouts import BlockLayout, find_layout
from .probes import BlockProbe
from .stats import attention_entropy, sample_query_rows
from .step import HOOK_ATTR, StepDriver, StepInfo



# ----------------------------------------------------------------------------- batch plumbing
def _slice_call(args, kwargs, n, start, stop):
    """Slice every tensor argument whose batch dimension is n."""
    cut = lambda v: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v  # noqa: E731
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _hidden_states(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


class _TargetHook:
    """The wrapper around one attention/MLP module; decides per branch, computes only what it must."""

    def __init__(self, ctl: DQARController, flops: FlopProfiler, layer: int, target: str, module: nn.Module,
                 layout: BlockLayout, probe: BlockProbe | None = None):
        self.ctl, self.flops, self.layer, self.target, self.module, self.layout = ctl, flops, layer, target, module, layout
        self.probe = probe                         # block input norm and gates, for the adaptive schedule
        self.original = module.forward
        self.is_attn = target == "attn"
        self.is_block = target == "block"          # caches the block's residual (output - input)
        self.rows: torch.Tensor | None = None
        self._warned_entropy = False

    def __call__(self, *args, **kwargs):
        if not self.ctl.active:
            return self.original(*args, **kwargs)
        if self.flops.measuring:
            x = _hidden_states(args, kwargs)
            kv = (2.0 * x.shape[1] * self.layout.ops.kv_weight_numel(self.module) * x.shape[0]
                  if self.is_attn else None)
            return self.flops.module_call(self.target, self.layer, lambda: self._decide_and_run(*args, **kwargs), kv)
        return self._decide_and_run(*args, **kwargs)

    def _decide_and_run(self, *args, **kwargs):
        ctl = self.ctl
        x = _hidden_states(args, kwargs)
        n = x.shape[0]
        branches = ctl.branches
        if n % len(branches):
            raise ValueError(f"DQAR: a batch of {n} does not split into the step's branches {branches}; "
                             "under CFG the model must see [cond | uncond] halves of equal size")
        if ctl.config.mode == "kv" and self.is_attn:
            return self._kv(x, n, branches, args, kwargs)
        decisions = [ctl.should_reuse(self.layer, b, self.target) for b in branches]
        if not any(d.use_cache for d in decisions):
            # Two branches are always cond and uncond (in either order); should_share is False at once
            # when sharing is off, so the common path pays one attribute test.
            share = self.is_attn and len(branches) == 2 and ctl.should_share(self.layer)
            if share:
                # Cond computes on its half; the uncond half takes that fresh output (either batch order).
                c = branches.index("cond")
                args, kwargs = _slice_call(args, kwargs, n, c * (n // 2), (c + 1) * (n // 2))
                out, ents = self._compute(*args, **kwargs)
                self._commit_chunks(("cond",), out, ents, c * (n // 2))
                ctl.count_share(self.layer, self.target)
                return torch.cat([out, out])
            out, ents = self._compute(*args, **kwargs)
            self._commit_chunks(branches, self._cached_form(out, x), ents, 0)
            return out
        b = n // len(branches)
        parts = []
        for i, (branch, d) in enumerate(zip(branches, decisions)):
            if d.use_cache:
                cached = self._checked(ctl.reuse(d.entry), b).to(x.dtype)
                parts.append(x[i * b:(i + 1) * b] + cached if self.is_block else cached)
            else:
                sub_args, sub_kwargs = _slice_call(args, kwargs, n, i * b, (i + 1) * b)
                out, ents = self._compute(*sub_args, **sub_kwargs)
                self._commit_chunks((branch,), self._cached_form(out, _hidden_states(sub_args, sub_kwargs)), ents,
                                    i * b)
                parts.append(out)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _cached_form(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What the cache keeps of a fresh output: the output itself, or a block's residual."""
        return out - x if self.is_block else out

    def _checked(self, cached: torch.Tensor, batch: int) -> torch.Tensor:
        """A cached output is per image: a batch that changed size mid-generation must never broadcast it."""
        if cached.shape[0] != batch:
            raise RuntimeError(
                f"DQAR: layer {self.layer} {self.target} cached a batch of {cached.shape[0]} per branch but this "
                f"step runs {batch}; the batch size must stay the same for a whole generation (start a new "
                "one at step 0)")
        return cached

    def _compute(self, *args, **kwargs):
        """Run the module; for attention with statistics on, go through q/k so entropy comes for free."""
        if not (self.is_attn and self.ctl.config.needs_entropy):
            return self.original(*args, **kwargs), None
        x = _hidden_states(args, kwargs)
        extra = [k for k, v in kwargs.items() if v is not None and k != "hidden_states"]
        if len(args) > 1 or extra:
            # Masked or cross attention: q/k here would not be what the module attends with.
            self._entropy_unavailable(extra or ["a second positional argument"])
            return self.original(*args, **kwargs), None
        ops, m = self.layout.ops, self.module
        q, k, v = ops.qkv(m, x)
        if self.rows is None or self.rows.numel() > q.shape[2]:
            cfg = self.ctl.config
            self.rows = sample_query_rows(q.shape[2], cfg.entropy_rows, cfg.entropy_seed + self.layer)
        ents = attention_entropy(q, k, self.rows)
        return ops.attend(m, q, k, v), ents

    def _entropy_unavailable(self, why: list) -> None:
        self.ctl.entropy_unavailable += 1
        if not self._warned_entropy:
            self._warned_entropy = True
            warnings.warn(f"DQAR: layer {self.layer} attention is called with {', '.join(map(str, why))}, so its "
                          "entropy cannot be measured; schedules that read entropy never reuse it "
                          "(counted in summary()['entropy_unavailable'])", RuntimeWarning, stacklevel=3)

    def _commit_chunks(self, branches, out, ents, first_row):
        """Commit each branch's share of `out`, which starts at batch row `first_row` of the block's input."""
        chunks = out.chunk(len(branches)) if len(branches) > 1 else (out,)
        if ents is None:
            ent_chunks = (None,) * len(branches)
        else:
            ent_chunks = ents.chunk(len(branches)) if len(branches) > 1 else (ents,)
        start = first_row
        for branch, o, e in zip(branches, chunks, ent_chunks):
            effect = self.probe.effect(self.target, start, start + o.shape[0]) if self.probe is not None else None
            self.ctl.commit(self.layer, branch, output=o, target=self.target,
                            entropy=float(e.mean()) if e is not None else None, effect=effect)
            start += o.shape[0]

    def _kv(self, x, n, branches, args, kwargs):
        """K/V mode: Q is always fresh; K and V come from the cache on reuse (mixes noise levels)."""
        ctl, ops, m = self.ctl, self.layout.ops, self.module
        b = n // len(branches)
        outs = []
        for i, branch in enumerate(branches):
            xi = x[i * b:(i + 1) * b] if len(branches) > 1 else x
            d = ctl.should_reuse(self.layer, branch, "attn")
            if d.use_cache:
                ctl.reuse(d.entry)
                q = ops.q_only(m, xi)
                k = self._checked(d.entry.keys.dequantize(), b).to(q.dtype)
                v = d.entry.values.dequantize().to(q.dtype)
                outs.append(ops.attend(m, q, k, v))
            else:
                q, k, v = ops.qkv(m, xi)
                ent = None
                if ctl.config.needs_entropy:
                    if self.rows is None:
                        self.rows = sample_query_rows(q.shape[2], ctl.config.entropy_rows,
                                                      ctl.config.entropy_seed + self.layer)
                    ent = float(attention_entropy(q, k, self.rows).mean())
                ctl.commit(self.layer, branch, keys=k, values=v, entropy=ent)
                outs.append(ops.attend(m, q, k, v))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class _RootHook:
    """Wraps the model's forward: FLOP profile once per input shape; for diffusers, steps from the timestep."""

    def __init__(self, driver: StepDriver, flops: FlopProfiler, model: nn.Module, layout: BlockLayout,
                 scheduler=None, pipe=None):
        self.driver, self.ctl, self.flops, self.model, self.layout = driver, driver.controller, flops, model, layout
        self._scheduler, self._pipe = scheduler, pipe     # an explicit scheduler wins over the pipeline's
        self.original = model.forward
        self._warned_timestep = False

    def __call__(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        info = self._step_from_timestep(x, kwargs) if self.layout.drives_itself else None
        if info is not None:
            self.driver.begin(info)
        try:
            out = self._forward(tuple(x.shape), args, kwargs)
        except BaseException:
            if self.ctl.active:
                self.driver.abort()
            raise
        if info is not None and self.ctl.active:
            self._end_step_from_output(info, x, out)
        return out

    def _forward(self, key, args, kwargs):
        if key in self.flops.profiles:
            self.ctl.count_forward(self.flops.profiles[key])
            return self.original(*args, **kwargs)
        out = self.flops.measure(key, len(self.ctl.branches), lambda: self.original(*args, **kwargs))
        self.ctl.count_forward(self.flops.profiles[key])
        return out

    @property
    def scheduler(self):
        # The pipeline's is read at call time: swapping pipe.scheduler after apply_dqar must be seen.
        return self._scheduler if self._scheduler is not None else getattr(self._pipe, "scheduler", None)

    # diffusers: the pipeline calls the transformer once per step with the timestep as input.
    def _step_from_timestep(self, x, kwargs) -> StepInfo | None:
        t = kwargs.get("timestep")
        sched = self.scheduler
        if t is None or sched is None or getattr(sched, "timesteps", None) is None:
            return None
        t_val = float(torch.as_tensor(t).flatten()[0])
        steps = [float(s) for s in sched.timesteps]
        if t_val not in steps:
            self._unmatched_timestep(t_val)
            return None
        n = x.shape[0]
        announced = self.driver.announced_branches
        if announced is not None and n % len(announced) == 0:
            branches = announced
        elif self.layout.detect_branches is not None:
            branches = self.layout.detect_branches(self.model, kwargs, n)
        else:
            branches = ("cond",)
        acp = sched.alphas_cumprod[int(round(t_val))]
        alpha, sigma = float(acp.sqrt()), float((1 - acp).sqrt())
        b = n // len(branches)
        cond = x[branches.index("cond") * b:][:b]
        return StepInfo(steps.index(t_val), len(steps), int(round(t_val)), alpha, sigma, cond, branches)

    def _unmatched_timestep(self, t_val: float) -> None:
        # Not a step of this scheduler (a pipeline that calls the transformer outside its loop): run uncached.
        self.ctl.unmatched_timesteps += 1
        if not self._warned_timestep:
            self._warned_timestep = True
            warnings.warn(f"DQAR: the transformer was called at timestep {t_val:g}, which is not one of its "
                          "scheduler's timesteps; such calls run without reuse (counted in "
                          "summary()['unmatched_timesteps'])", RuntimeWarning, stacklevel=3)

    def _end_step_from_output(self, info: StepInfo, x, out):
        sample = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        n, c = x.shape[0], x.shape[1]
        branches = self.ctl.branches
        b = n // len(branches)
        i = branches.index("cond") if "cond" in branches else 0
        eps = sample[i * b:(i + 1) * b, :c]
        info.x0 = (info.x - info.sigma * eps) / info.alpha
        self.driver.end(info)


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
    layout = find_layout(model)
    if layout.drives_itself and scheduler is None and pipe_scheduler is None:
        # Without one no step would ever begin and the model would run uncached without a word.
        raise ValueError(
            f"apply_dqar on a bare {type(model).__name__} needs the scheduler that drives it: pass the "
            "pipeline (apply_dqar(pipe, config)) or apply_dqar(transformer, config, scheduler=pipe.scheduler)")
    blocks = list(getattr(model, layout.blocks_attr))
    _check_csb_topk(config, layout, blocks)
    ctl = DQARController(config, num_layers=len(blocks))
    driver, flops = StepDriver(ctl), FlopProfiler()
    wrapped, restore = [], []
    for layer, block in enumerate(blocks):
        probe = BlockProbe(block, layout) if config.schedule == "adaptive" else None
        if probe is not None:
            restore.append(probe.remove)
        for target in config.targets:
            module = block if target == "block" else getattr(block, layout.target_attrs[target])
            wrapped.append(_replace_forward(module, _TargetHook(ctl, flops, layer, target, module, layout, probe)))
    wrapped.append(_replace_forward(model, _RootHook(driver, flops, model, layout, scheduler, pipe)))
    if pipe is not None and hasattr(pipe, "encode_prompt") and layout.name == "diffusers-pixart":
        restore.append(_watch_pixart_prompt(pipe, driver))
    model.__dict__[HOOK_ATTR] = _Hooked(ctl, driver, wrapped, restore)
    return ctl


_MISSING = object()


def _check_csb_topk(config: DQARConfig, layout: BlockLayout, blocks) -> None:
    """A salient-channel count larger than the cached tensors' channels fails here, not mid-generation."""
    topk = config.csb_topk
    bits = config.resolved_kv_bits if config.mode == "kv" else (config.cache_bits,)
    if not blocks or all(b == 16 for b in bits) or not topk or topk < 1:
        return              # nothing is quantized, so no channels are kept aside
    attn = getattr(blocks[0], layout.target_attrs["attn"])
    channels = layout.ops.cache_channels(attn, config.mode)
    if topk > channels:
        what = "the head dim of K/V" if config.mode == "kv" else "the attention/MLP output width"
        raise ValueError(f"DQARConfig.csb_topk={topk!r} is not allowed for this model: {what} is {channels} "
                         f"channels, so a count must be in 1..{channels} (or a fraction < 1)")


def _replace_forward(module: nn.Module, hook) -> tuple[nn.Module, object]:
    """Install `hook` as the instance's forward; returns what to put back on removal."""
    previous = module.__dict__.get("forward", _MISSING)
    module.forward = hook
    return module, previous


def _restore_attr(obj, name: str, previous) -> None:
    if previous is _MISSING:
        obj.__dict__.pop(name, None)
    else:
        setattr(obj, name, previous)


def _watch_pixart_prompt(pipe, driver: StepDriver):
    """PixArt batches [uncond | cond] when guidance is on; its encode_prompt call tells the driver which, and
    how many tokens the prompt has."""
    original = pipe.encode_prompt
    previous = pipe.__dict__.get("encode_prompt", _MISSING)

    def encode_prompt(*args, **kwargs):
        cfg = kwargs.get("do_classifier_free_guidance", args[1] if len(args) > 1 else True)
        driver.announce(branches=("uncond", "cond") if cfg else ("cond",))
        result = original(*args, **kwargs)
        # The prompt's token count (padding excluded, EOS included) feeds tau(p_len) and the policy; the
        # batch shares one threshold, so the longest prompt of the batch decides.
        mask = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.numel():
            driver.announce(prompt_length=max(1, int(mask.sum(dim=1).max())))
        return result

    pipe.encode_prompt = encode_prompt
    return lambda: _restore_attr(pipe, "encode_prompt", previous)


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
    for module, previous in found.wrapped:
        _restore_attr(module, "forward", previous)
    for undo in found.restore:
        undo()
    found.controller.reset()
