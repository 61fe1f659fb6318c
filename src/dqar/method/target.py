"""The wrapper around one attention / MLP / block module: decides per CFG branch, computes only what it must.

The reuse decision per (layer, branch) is one call, `controller.should_reuse`; everything else here is
plumbing: split the batch by CFG branch, compute only the branches that must, stitch the outputs back
together. Outputs that are tuples (joint attention, two-stream blocks) go through the cache packed into one
tensor (dqar.method.streams); the block target caches each stream's residual.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .controller import DQARController
from .flops import FlopProfiler
from .layouts import BlockLayout, block_streams
from .probes import BlockProbe
from .pending_entropy import PendingEntropies
from .stats import QKRows, attention_logits, first_images_index, logits_entropy, sample_query_rows
from .streams import BlockStreams, OutputForm, cat_outputs, hidden_states, slice_call


class TargetHook:
    """Installed as the instance's forward of one module; holds no data of its own beyond its output form."""

    def __init__(self, ctl: DQARController, flops: FlopProfiler, layer: int, target: str, module: nn.Module,
                 layout: BlockLayout, probe: BlockProbe | None = None):
        self.ctl, self.flops, self.layer, self.target, self.module, self.layout = ctl, flops, layer, target, module, layout
        self.probe = probe                         # block input norm and gates, for the adaptive schedule
        self.original = module.forward
        self.is_attn = target == "attn"
        self.is_block = target == "block"          # caches the block's residual (output - input), per stream
        self.ops = layout.attention_ops(module) if self.is_attn else None
        self.streams = BlockStreams(module, block_streams(module)) if self.is_block else None
        self.form: OutputForm | None = None        # layout of the last computed output (tuple outputs only)
        self.rows: torch.Tensor | None = None
        self._images: dict[tuple, torch.Tensor | None] = {}    # (batch, groups) -> entropy_images' rows
        self._warned_entropy = False

    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        # Kept out of torch.compile's graph: the per-step decisions are Python state that would otherwise be
        # guarded on (a recompile per step); the module's own computation stays an ordinary eager call.
        if not self.ctl.active:
            return self.original(*args, **kwargs)
        if self.flops.measuring:
            x = hidden_states(args, kwargs)
            kv = (2.0 * x.shape[1] * self.ops.kv_weight_numel(self.module) * x.shape[0]
                  if self.is_attn and self.ops is not None else None)
            return self.flops.module_call(self.target, self.layer, lambda: self._decide_and_run(*args, **kwargs), kv)
        if self.layer not in self.ctl.cached_layers and not (self.is_attn and self.ctl.needs_entropy):
            # Fast path: the schedule can never reuse this layer and nothing is measured on it.
            self.ctl.count_computed(len(self.ctl.branches))
            return self.original(*args, **kwargs)
        return self._decide_and_run(*args, **kwargs)

    def _decide_and_run(self, *args, **kwargs):
        ctl = self.ctl
        x = hidden_states(args, kwargs)
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
                args, kwargs = slice_call(args, kwargs, n, c * (n // 2), (c + 1) * (n // 2))
                out, logits = self._compute(1, *args, **kwargs)
                self._commit_chunks(("cond",), self._cached_form(out, args, kwargs), logits, c * (n // 2))
                ctl.count_share(self.layer, self.target)
                return cat_outputs([out, out])
            out, logits = self._compute(len(branches), *args, **kwargs)
            self._commit_chunks(branches, self._cached_form(out, args, kwargs), logits, 0)
            return out
        b = n // len(branches)
        if self.is_block and self.form is None and x.dtype == torch.float32 and all(d.use_cache for d in decisions):
            return self._forecast_block(x, b, decisions)
        parts = []
        for i, (branch, d) in enumerate(zip(branches, decisions)):
            sub_args, sub_kwargs = slice_call(args, kwargs, n, i * b, (i + 1) * b)
            if d.use_cache:
                cached = self._checked(ctl.reuse(d.entry), b).to(x.dtype)
                parts.append(self._from_cache(cached, sub_args, sub_kwargs))
            else:
                out, logits = self._compute(1, *sub_args, **sub_kwargs)
                self._commit_chunks((branch,), self._cached_form(out, sub_args, sub_kwargs), logits, i * b)
                parts.append(out)
        return cat_outputs(parts)

    def _forecast_block(self, x: torch.Tensor, b: int, decisions) -> torch.Tensor:
        """Every branch skips the block: forecast each branch's residual straight into its rows of one
        output tensor and add the input in place (the same operations as the general path, without the
        per-branch temporaries and the concatenation, which show on a skipped step where nothing else runs)."""
        out = torch.empty_like(x)
        for i, d in enumerate(decisions):
            self._checked(d.entry.output, b)
            self.ctl.reuse(d.entry, out[i * b:(i + 1) * b])
        return out.add_(x)

    def _cached_form(self, out, args, kwargs) -> torch.Tensor:
        """What the cache keeps of a fresh output: the output itself, or a block's residual; a tuple packed."""
        if not isinstance(out, tuple):
            self.form = None
            return self.streams.residual(out, args, kwargs) if self.is_block else out
        self.form = OutputForm(out)
        return self.form.pack(self.streams.residual(out, args, kwargs) if self.is_block else out)

    def _from_cache(self, cached: torch.Tensor, args, kwargs):
        """The module's output rebuilt from what the cache returned (unpacked; input added for a block)."""
        value = self.form.unpack(cached) if self.form is not None else cached
        return self.streams.add(value, args, kwargs) if self.is_block else value

    def _checked(self, cached: torch.Tensor, batch: int) -> torch.Tensor:
        """A cached output is per image: a batch that changed size mid-generation must never broadcast it."""
        if cached.shape[0] != batch:
            raise RuntimeError(
                f"DQAR: layer {self.layer} {self.target} cached a batch of {cached.shape[0]} per branch but this "
                f"step runs {batch}; the batch size must stay the same for a whole generation (start a new "
                "one at step 0)")
        return cached

    def _compute(self, groups: int, *args, **kwargs):
        """Run the module; for attention with statistics on, go through q/k so entropy comes for free.
        `groups`: how many branches the batch holds, for `entropy_images` (each branch keeps its first images)."""
        if not (self.is_attn and self.ctl.needs_entropy):
            return self.original(*args, **kwargs), None
        if self.ops is None:
            self._entropy_unavailable([f"a {type(getattr(self.module, 'processor', self.module)).__name__} "
                                       "that does not compute plain softmax attention of its input"])
            return self.original(*args, **kwargs), None
        x = hidden_states(args, kwargs)
        extra = [k for k, v in kwargs.items() if v is not None and k != "hidden_states"]
        if len(args) > 1 or extra:
            # Masked or cross attention: q/k here would not be what the module attends with.
            self._entropy_unavailable(extra or ["a second positional argument"])
            return self.original(*args, **kwargs), None
        ops, m = self.ops, self.module
        q, k, v = ops.qkv(m, x)
        # Logits that wait for the step's end (QKRows) unless a trace reads the entropy now or FLOPs are counted.
        defer = not (self.ctl.config.trace or self.flops.measuring)
        return ops.attend(m, q, k, v), self._logits(q, k, groups, defer)

    def _logits(self, q: torch.Tensor, k: torch.Tensor, groups: int, defer: bool = False) -> torch.Tensor | QKRows:
        """Attention logits of the config's sampled query rows and images (`groups` branches), from which the
        entropy comes (dqar.method.stats.logits_entropy; the controller batches that part over a step); with
        `defer`, a small call's q and k to form them from at the step's end (QKRows)."""
        cfg = self.ctl.config
        if self.rows is None or self.rows.numel() > q.shape[2]:
            self.rows = sample_query_rows(q.shape[2], cfg.entropy_rows, cfg.entropy_seed + self.layer)
        shape = (q.shape[0], groups)
        if shape not in self._images:
            self._images[shape] = first_images_index(q.shape[0], groups, cfg.entropy_images)
        images = self._images[shape]
        if defer and images is not None and PendingEntropies.defers(q, cfg.entropy_images, groups):
            return QKRows(q, k, self.rows, groups, cfg.entropy_images)
        return self.flops.uncounted(lambda: attention_logits(q, k, self.rows, images=images))

    def _entropy_unavailable(self, why: list) -> None:
        self.ctl.entropy_unavailable += 1
        if not self._warned_entropy:
            self._warned_entropy = True
            warnings.warn(f"DQAR: layer {self.layer} attention is called with {', '.join(map(str, why))}, so its "
                          "entropy cannot be measured; schedules that read entropy never reuse it "
                          "(counted in summary()['entropy_unavailable'])", RuntimeWarning, stacklevel=3)

    def _commit_chunks(self, branches, out, logits, first_row):
        """Commit each branch's share of `out`, which starts at batch row `first_row` of the block's input;
        `logits` (attention only): the entropies' logits, resolved by the controller when read, or at once
        when tracing (a trace row records the entropy with the output)."""
        chunks = out.chunk(len(branches)) if len(branches) > 1 else (out,)
        now = logits is not None and self.ctl.config.trace
        ents = [float(e.mean()) for e in logits_entropy(logits).chunk(len(branches))] if now else None
        start, entries = first_row, []
        for i, (branch, o) in enumerate(zip(branches, chunks)):
            measured = self.probe is not None and self.ctl.measures(branch, self.target)
            effect = self.probe.effect(self.target, start, start + o.shape[0]) if measured else None
            entries.append(self.ctl.commit(self.layer, branch, output=o, target=self.target,
                                           entropy=ents[i] if now else None, effect=effect))
            start += o.shape[0]
        if logits is not None and not now:
            self.ctl.defer_entropy(logits, [(self.layer, b, e) for b, e in zip(branches, entries)])

    def _kv(self, x, n, branches, args, kwargs):
        """K/V mode: Q is always fresh; K and V come from the cache on reuse (mixes noise levels)."""
        ctl, ops, m = self.ctl, self.ops, self.module
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
                ent = float(logits_entropy(self._logits(q, k, 1)).mean()) if ctl.needs_entropy else None
                ctl.commit(self.layer, branch, keys=k, values=v, entropy=ent)
                outs.append(ops.attend(m, q, k, v))
        return outs[0] if len(outs) == 1 else torch.cat(outs)
