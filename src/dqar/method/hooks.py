"""Attach DQAR to a model without forking it: one registry of block layouts, instance-level wrappers.

`apply_dqar(model_or_pipeline, config)` wraps, per block, the forward of the attention module (and of
the MLP when targeted) on the *instance*, plus the root model's forward; `remove_dqar` puts back
whatever each instance had before (its own attribute, e.g. an accelerate offload wrapper, or none, so
the class's forward shows through again): the original forward exactly. The wrappers hold no data:
all state lives in the DQARController. The reuse decision per (layer, branch) is one call,
`controller.should_reuse`; everything else here is plumbing: split the batch by CFG branch, compute
only the branches that must, stitch the outputs back together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DQARConfig
from .controller import CONTROLLER_ATTR, DQARController
from .stats import attention_entropy, latent_norm, sample_query_rows, schedule_snr



# ----------------------------------------------------------------------------- attention ops per layout
class DiTAttentionOps:
    """Our DiT's Attention: fused qkv Linear, SDPA, proj."""

    @staticmethod
    def qkv(m, x):
        return m.split_qkv(x)

    @staticmethod
    def q_only(m, x):
        d = m.proj.in_features
        n, t, _ = x.shape
        q = F.linear(x, m.qkv.weight[:d], m.qkv.bias[:d] if m.qkv.bias is not None else None)
        return q.reshape(n, t, m.num_heads, m.head_dim).transpose(1, 2)

    @staticmethod
    def attend(m, q, k, v):
        return m.attend(q, k, v)

    @staticmethod
    def kv_weight_numel(m):
        return m.qkv.weight.numel() * 2 // 3

    @staticmethod
    def cache_channels(m, mode):
        """Channels (last dim) of what the cache stores: the output width, or the head dim for K/V."""
        return m.head_dim if mode == "kv" else m.proj.out_features


class DiffusersAttentionOps:
    """diffusers' Attention (to_q / to_k / to_v / to_out) for self-attention without a mask."""

    @staticmethod
    def _heads(m, t):
        n, s, inner = t.shape
        return t.view(n, s, m.heads, inner // m.heads).transpose(1, 2)

    @classmethod
    def qkv(cls, m, x):
        q, k, v = cls._heads(m, m.to_q(x)), cls._heads(m, m.to_k(x)), cls._heads(m, m.to_v(x))
        if getattr(m, "norm_q", None) is not None:
            q = m.norm_q(q)
        if getattr(m, "norm_k", None) is not None:
            k = m.norm_k(k)
        return q, k, v

    @classmethod
    def q_only(cls, m, x):
        q = cls._heads(m, m.to_q(x))
        return m.norm_q(q) if getattr(m, "norm_q", None) is not None else q

    @staticmethod
    def attend(m, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, scale=getattr(m, "scale", None))
        n, h, t, hd = out.shape
        out = m.to_out[1](m.to_out[0](out.transpose(1, 2).reshape(n, t, h * hd)))
        return out / getattr(m, "rescale_output_factor", 1.0)

    @staticmethod
    def kv_weight_numel(m):
        return m.to_k.weight.numel() + m.to_v.weight.numel()

    @staticmethod
    def cache_channels(m, mode):
        return m.to_k.out_features // m.heads if mode == "kv" else m.to_out[0].out_features


# ----------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class BlockLayout:
    """Where a model family keeps its blocks and the modules DQAR can reuse."""

    name: str
    matches: Callable[[nn.Module], bool]
    blocks_attr: str
    target_attrs: dict                     # target name -> attribute of a block
    ops: type
    drives_itself: bool                    # True: step found from the timestep input (diffusers)
    detect_branches: Callable | None = None


def _is_class(name: str) -> Callable[[nn.Module], bool]:
    return lambda m: any(c.__name__ == name for c in type(m).__mro__)


def _dit_pipeline_branches(model, kwargs, n):
    """DiTPipeline batches [cond | uncond]; the uncond half carries the null class."""
    labels = kwargs.get("class_labels")
    null = getattr(model.config, "num_embeds_ada_norm", None)
    if labels is not None and n % 2 == 0 and null is not None and bool((labels[n // 2:] == null).all()):
        return ("cond", "uncond")
    return ("cond",)


LAYOUTS: list[BlockLayout] = [
    BlockLayout("dqar-dit", _is_class("DiT"), "blocks", {"attn": "attn", "mlp": "mlp"}, DiTAttentionOps, False),
    BlockLayout("diffusers-dit", _is_class("DiTTransformer2DModel"), "transformer_blocks",
                {"attn": "attn1", "mlp": "ff"}, DiffusersAttentionOps, True, _dit_pipeline_branches),
    # PixArt's branch order ([uncond | cond]) is learnt from the pipeline's encode_prompt call.
    BlockLayout("diffusers-pixart", _is_class("PixArtTransformer2DModel"), "transformer_blocks",
                {"attn": "attn1", "mlp": "ff"}, DiffusersAttentionOps, True, None),
]


def find_layout(model: nn.Module) -> BlockLayout:
    for layout in LAYOUTS:
        if layout.matches(model):
            return layout
    raise TypeError(
        f"DQAR has no block layout for {type(model).__name__}; supported: "
        "dqar DiT, diffusers DiTTransformer2DModel, PixArtTransformer2DModel"
    )


# ----------------------------------------------------------------------------- batch plumbing
def _slice_call(args, kwargs, n, start, stop):
    """Slice every tensor argument whose batch dimension is n."""
    cut = lambda v: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v  # noqa: E731
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


class _TargetHook:
    """The wrapper around one attention/MLP module; decides per branch, computes only what it must."""

    def __init__(self, ctl: DQARController, layer: int, target: str, module: nn.Module, layout: BlockLayout):
        self.ctl, self.layer, self.target, self.module, self.layout = ctl, layer, target, module, layout
        self.original = module.forward
        self.is_attn = target == "attn"
        self.rows: torch.Tensor | None = None

    def __call__(self, *args, **kwargs):
        ctl = self.ctl
        if not ctl.active:
            return self.original(*args, **kwargs)
        if ctl.profiler is not None:
            return self._profiled(*args, **kwargs)
        return self._decide_and_run(*args, **kwargs)

    def _profiled(self, *args, **kwargs):
        """FLOPs of this module in the uncached first pass, per branch, for ideal_speedup."""
        counter, ctl = self.ctl.profiler, self.ctl
        before = counter.get_total_flops()
        out = self._decide_and_run(*args, **kwargs)
        x = args[0] if args else kwargs["hidden_states"]
        per_branch = 1.0 / len(ctl.branches)
        ctl.profile_acc[(self.target, self.layer)] = (counter.get_total_flops() - before) * per_branch
        if self.is_attn:
            n, t = x.shape[0], x.shape[1]
            ctl.profile_acc[("kv", self.layer)] = 2.0 * t * self.layout.ops.kv_weight_numel(self.module) * n * per_branch
        return out

    def _decide_and_run(self, *args, **kwargs):
        ctl = self.ctl
        x = args[0] if args else kwargs["hidden_states"]
        n = x.shape[0]
        branches = ctl.branches if n % len(ctl.branches) == 0 else ("cond",)
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
                self._commit_chunks(("cond",), out, ents)
                ctl.count_share(self.layer, self.target)
                return torch.cat([out, out])
            out, ents = self._compute(*args, **kwargs)
            self._commit_chunks(branches, out, ents)
            return out
        b = n // len(branches)
        parts = []
        for i, (branch, d) in enumerate(zip(branches, decisions)):
            if d.use_cache:
                parts.append(ctl.reuse(d.entry).to(x.dtype))
            else:
                sub_args, sub_kwargs = _slice_call(args, kwargs, n, i * b, (i + 1) * b)
                out, ents = self._compute(*sub_args, **sub_kwargs)
                self._commit_chunks((branch,), out, ents)
                parts.append(out)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _compute(self, *args, **kwargs):
        """Run the module; for attention with statistics on, go through q/k so entropy comes for free."""
        if not (self.is_attn and self.ctl.config.needs_entropy) or len(args) != 1 or any(
                v is not None for v in kwargs.values()):
            return self.original(*args, **kwargs), None
        ops, m, x = self.layout.ops, self.module, args[0]
        q, k, v = ops.qkv(m, x)
        if self.rows is None or self.rows.numel() > q.shape[2]:
            cfg = self.ctl.config
            self.rows = sample_query_rows(q.shape[2], cfg.entropy_rows, cfg.entropy_seed + self.layer)
        ents = attention_entropy(q, k, self.rows)
        return ops.attend(m, q, k, v), ents

    def _commit_chunks(self, branches, out, ents):
        chunks = out.chunk(len(branches)) if len(branches) > 1 else (out,)
        if ents is None:
            ent_chunks = (None,) * len(branches)
        else:
            ent_chunks = ents.chunk(len(branches)) if len(branches) > 1 else (ents,)
        for branch, o, e in zip(branches, chunks, ent_chunks):
            self.ctl.commit(self.layer, branch, output=o, target=self.target,
                            entropy=float(e.mean()) if e is not None else None)

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
                k, v = d.entry.keys.dequantize().to(q.dtype), d.entry.values.dequantize().to(q.dtype)
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
    """Wraps the model's forward: FLOP profile once per input shape; step detection for diffusers."""

    def __init__(self, ctl: DQARController, model: nn.Module, layout: BlockLayout, scheduler=None, pipe=None):
        self.ctl, self.model, self.layout = ctl, model, layout
        self._scheduler, self._pipe = scheduler, pipe     # an explicit scheduler wins over the pipeline's
        self.original = model.forward
        self.profiles: dict = {}
        self.pipeline_branches: tuple | None = None

    def __call__(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
        if self.layout.drives_itself:
            self._begin_step_from_timestep(x, args, kwargs)
        key = tuple(x.shape)
        if key not in self.profiles:
            out = self._profiled_forward(key, args, kwargs)
        else:
            self.ctl.flops_profile = self.profiles[key]
            if self.ctl.active:
                self.ctl.count_step_flops()
            out = self.original(*args, **kwargs)
        if self.layout.drives_itself and self.ctl.active:
            self._end_step_from_output(x, out)
        return out

    def _profiled_forward(self, key, args, kwargs):
        from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

        def cpu_sdpa(query, key_, value, *a, out_shape=None, **kw):
            return sdpa_flop_count(query, key_, value)

        mapping = {}
        if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
            mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = cpu_sdpa
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        self.ctl.profiler, self.ctl.profile_acc = counter, {}
        try:
            with counter:
                out = self.original(*args, **kwargs)
        finally:
            self.ctl.profiler = None
        # The controller counts events per branch; a branch is 1 / len(branches) of the batch.
        profile = dict(self.ctl.profile_acc)
        profile["total"] = counter.get_total_flops() / max(len(self.ctl.branches), 1)
        self.profiles[key] = profile
        self.ctl.flops_profile = profile
        if self.ctl.active:
            self.ctl.count_step_flops()
        return out

    @property
    def scheduler(self):
        # The pipeline's is read at call time: swapping pipe.scheduler after apply_dqar must be seen.
        return self._scheduler if self._scheduler is not None else getattr(self._pipe, "scheduler", None)

    # diffusers: the pipeline calls the transformer once per step with the timestep as input.
    def _begin_step_from_timestep(self, x, args, kwargs):
        t = kwargs.get("timestep")
        sched = self.scheduler
        if t is None or sched is None or getattr(sched, "timesteps", None) is None:
            return
        t_val = float(torch.as_tensor(t).flatten()[0])
        steps = [float(s) for s in sched.timesteps]
        if t_val not in steps:
            return
        idx = steps.index(t_val)
        n = x.shape[0]
        if self.pipeline_branches is not None and n % len(self.pipeline_branches) == 0:
            branches = self.pipeline_branches
        elif self.layout.detect_branches is not None:
            branches = self.layout.detect_branches(self.model, kwargs, n)
        else:
            branches = ("cond",)
        acp = sched.alphas_cumprod[int(round(t_val))]
        alpha, sigma = float(acp.sqrt()), float((1 - acp).sqrt())
        cond = x[branches.index("cond") * (n // len(branches)):][: n // len(branches)]
        self.ctl.begin_step(idx, len(steps), snr=schedule_snr(alpha, sigma), latent_norm=latent_norm(cond),
                            branches=branches)
        self._alpha_sigma = (alpha, sigma)

    def _end_step_from_output(self, x, out):
        sample = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        n, c = x.shape[0], x.shape[1]
        branches = self.ctl.branches
        b = n // len(branches)
        i = branches.index("cond") if "cond" in branches else 0
        xt, eps = x[i * b:(i + 1) * b], sample[i * b:(i + 1) * b, :c]
        alpha, sigma = self._alpha_sigma
        self.ctl.end_step((xt - sigma * eps) / alpha, xt)
        if self.ctl.step is not None and self.ctl.step.step_index == self.ctl.step.total_steps - 1:
            self.ctl.end_generation()


# ----------------------------------------------------------------------------- public API
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
    if hasattr(model, CONTROLLER_ATTR):
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
    wrapped = []
    for layer, block in enumerate(blocks):
        for target in config.targets:
            module = getattr(block, layout.target_attrs[target])
            hook = _TargetHook(ctl, layer, target, module, layout)
            wrapped.append(_replace_forward(module, hook))
    root = _RootHook(ctl, model, layout, scheduler, pipe)
    wrapped.append(_replace_forward(model, root))
    restore = []
    if pipe is not None and hasattr(pipe, "encode_prompt") and layout.name == "diffusers-pixart":
        restore.append(_watch_pixart_cfg(pipe, root))
    setattr(model, CONTROLLER_ATTR, (ctl, wrapped, restore))
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


def _watch_pixart_cfg(pipe, root: _RootHook):
    """PixArt batches [uncond | cond] when guidance is on; its encode_prompt call tells us which, and how
    many tokens the prompt has."""
    original = pipe.encode_prompt
    previous = pipe.__dict__.get("encode_prompt", _MISSING)

    def encode_prompt(*args, **kwargs):
        cfg = kwargs.get("do_classifier_free_guidance", args[1] if len(args) > 1 else True)
        root.pipeline_branches = ("uncond", "cond") if cfg else ("cond",)
        result = original(*args, **kwargs)
        # The prompt's token count (padding excluded, EOS included) feeds tau(p_len) and the policy; the
        # batch shares one threshold, so the longest prompt of the batch decides.
        mask = result[1] if isinstance(result, tuple) and len(result) > 1 else None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.numel():
            root.ctl.set_prompt_length(max(1, int(mask.sum(dim=1).max())))
        return result

    pipe.encode_prompt = encode_prompt
    return lambda: _restore_attr(pipe, "encode_prompt", previous)


def get_controller(model_or_pipeline) -> DQARController | None:
    model, _, _ = _split_pipeline(model_or_pipeline)
    found = getattr(model, CONTROLLER_ATTR, None)
    return found[0] if found else None


def remove_dqar(model_or_pipeline) -> None:
    """Restore every wrapped forward; the model is then exactly the unhooked one."""
    model, _, _ = _split_pipeline(model_or_pipeline)
    found = model.__dict__.pop(CONTROLLER_ATTR, None)
    if found is None:
        raise RuntimeError(f"DQAR is not applied to this {type(model).__name__}")
    ctl, wrapped, restore = found
    for module, previous in wrapped:
        _restore_attr(module, "forward", previous)
    for undo in restore:
        undo()
    ctl.reset()
