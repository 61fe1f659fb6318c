"""DQARController: the per-generation state of reuse: decisions, the cache, counters and the run summary.

Seed 002's API: begin_step / should_reuse / reuse / commit / reset / summary. It is a plain state
object: a `StepDriver` (dqar.method.step) starts and ends its steps, the hooks ask it for decisions and
hand it what they computed, and the FLOP profile behind ideal_speedup is measured by the hooks and
handed in read-only. `reset()` clears everything and runs at step 0 of every generation, so nothing
leaks from one image batch into the next.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import CacheEntry, ReuseCache
from .config import DQARConfig
from .error_control import ErrorControl
from .forecast import advance, differences, extrapolate, points
from .pending_entropy import PendingEntropies
from .quant import SalienceTracker, store
from .schedules import StepState, build_schedule
from .stats import x0_snr
from .trace import trace_row


@dataclass(frozen=True)
class Decision:
    """Whether a (layer, branch) reuses this step, and the entry it would reuse."""

    use_cache: bool
    entry: CacheEntry | None = None


_COMPUTE = Decision(False, None)


class ModuleHistory:
    """Per (layer, branch): the step it last computed and the forecast error measured there, with the cache
    age it was measured at (policy v2 reads both). A layer's targets (attention and MLP) add their effects."""

    def __init__(self):
        self.last_compute: dict[tuple, int] = {}
        self.error: dict[tuple, tuple[float, int]] = {}

    def clear(self) -> None:
        self.last_compute.clear()
        self.error.clear()

    def age(self, layer: int, branch: str, step: int) -> int | None:
        last = self.last_compute.get((layer, branch))
        return None if last is None else step - last

    def measured(self, layer: int, branch: str) -> tuple[float, int] | None:
        """(error, age) measured at the last compute, or None (nothing to compare with yet)."""
        return self.error.get((layer, branch))

    def computed(self, layer: int, branch: str, step: int, measured: tuple[float, int] | None) -> None:
        key = (layer, branch)
        if self.last_compute.get(key) != step:           # the layer's first target this step
            self.last_compute[key] = step
            if measured is None:
                self.error.pop(key, None)
            else:
                self.error[key] = measured
        elif measured is None:
            self.error.pop(key, None)                    # one target could not be measured: no layer total
        elif key in self.error:
            self.error[key] = (self.error[key][0] + measured[0], measured[1])


class DQARController:
    def __init__(self, config: DQARConfig, num_layers: int, branches: tuple[str, ...] = ("cond",)):
        if not isinstance(config, DQARConfig):
            raise TypeError(f"config must be a DQARConfig, got {type(config).__name__}")
        self._config = config
        self.num_layers = num_layers
        self.default_branches = branches
        self.schedule = build_schedule(config)
        # Per-branch FLOPs of this forward's input shape, measured by the hooks (dqar.method.flops).
        self.flops_profile = None
        self.cache = ReuseCache()
        self.salience = SalienceTracker(config.csb_topk, config.csb_calibration_steps)
        self.error_control = ErrorControl(config) if config.schedule == "adaptive" else None
        self._bind_history()
        self.trace_rows: list[dict] = []
        self.pending_entropy = PendingEntropies()
        self.reset()

    def _bind_history(self) -> None:
        """A schedule that reads cache ages and forecast errors (policy v2) gets them from a ModuleHistory;
        the errors are measured by an ErrorControl at every compute (it plans nothing here) and reach the
        history once measured, at the next step's start."""
        # Whether attention entropy is measured: the config asks for it, or the schedule reads it (a policy
        # without the entropy feature does not, so its attention runs its own forward).
        self.needs_entropy = self.config.needs_entropy or bool(getattr(self.schedule, "reads_entropy", False))
        uses = bool(getattr(self.schedule, "uses_history", False))
        self.history = ModuleHistory() if uses else None
        self.effect_meter = (ErrorControl(self.config, on_measured=self._history_measured, plans=False)
                             if uses else None)
        if uses:
            self.schedule.history = self.history

    @property
    def needs_effect(self) -> bool:
        """Whether commits need the block probes' gates and input norms (apply_dqar installs them)."""
        return self.error_control is not None or self.effect_meter is not None

    def measures(self, branch: str, target: str) -> bool:
        """Whether a compute of (`branch`, `target`) has its forecast error measured (branch_decisions="cond":
        the conditional branch's only; error_targets: those targets only)."""
        cfg = self.config
        return ((cfg.branch_decisions == "each" or branch == "cond")
                and (cfg.error_targets is None or target in cfg.error_targets))

    def use_schedule(self, schedule) -> None:
        """Swap in a schedule built outside the config (harness measurements on a private controller); it
        decides alone (no error control), and gets the module history if it reads one."""
        self.schedule = schedule
        self.error_control = None
        self._bind_history()
        self.reset()

    @property
    def config(self) -> DQARConfig:
        return self._config

    @config.setter
    def config(self, value) -> None:
        # The schedule, the CSB tracker and the error control are built from the config: a new one would
        # reach some parts and not others.
        raise AttributeError("DQARController.config cannot change on a live controller (its schedule, CSB tracker "
                             "and error control were built from it): remove_dqar and apply_dqar with the new config")

    # ------------------------------------------------------------------ lifecycle
    def reset(self) -> None:
        """Forget everything about the previous generation."""
        self.cache.clear()
        # Layers whose output is ever worth keeping: one the schedule can never reuse is not cached
        # (tracing keeps everything, since it compares each fresh output with the one before).
        self.cached_layers = (frozenset(range(self.num_layers)) if self.config.trace
                              else self.schedule.reusable_ever(self.num_layers))
        self.active = False
        self.branches = self.default_branches
        self.step: StepState | None = None
        self._plans: dict[str, frozenset] = {}
        self._entropy: dict[str, dict[int, float]] = {}
        self.pending_entropy.clear()
        self._last_x0_snr: float | None = None
        self.salience.reset()
        if self.error_control is not None:
            self.error_control.reset()
        if self.history is not None:
            self.history.clear()
            self.effect_meter.reset()
        self.reuse_events = 0
        self.compute_events = 0
        self.share_events = 0
        self.events_per_layer = [0] * self.num_layers
        self.events_per_step: list[int] = []
        self.entropy_per_step: list[float | None] = []
        self.snr_per_step: list[float | None] = []
        self.x0_snr_per_step: list[float | None] = []
        self._step_entropies: list[float] = []
        self._flops_total = 0.0
        self._flops_skipped = 0.0
        self.short_history = 0             # reuse decisions turned into computes: too little history to forecast
        self.entropy_unavailable = 0       # attention calls whose entropy could not be measured
        self.unmatched_timesteps = 0       # diffusers calls whose timestep is not one of the scheduler's
        self.trace_rows = []

    def begin_step(self, step_index: int, total_steps: int, snr: float | None = None,
                   prompt_length: int = 1, latent_norm: float | None = None,
                   branches: tuple[str, ...] | None = None) -> None:
        """Start a step (step 0 starts a generation and resets); prompt_length is the prompt's token count
        (class-conditional models use 1) and feeds tau(p_len) and the policy."""
        if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 1:
            raise ValueError(f"prompt_length={prompt_length!r} is not allowed: must be an integer >= 1")
        if step_index == 0:
            self.reset()
        self.resolve_entropy()
        self.resolve_measurements()
        self._finish_step_stats()
        if branches is not None:
            self.branches = tuple(branches)
        if self.config.snr_form == "x0":
            snr = self._last_x0_snr
        self.step = StepState(step_index, total_steps, self.num_layers, snr, latent_norm, prompt_length)
        self.active = True
        self.events_per_step.append(0)
        self.snr_per_step.append(snr)
        self._plans = self.schedule.plan_branches(self.step, self._entropy, self.branches)

    def end_step(self, x0: torch.Tensor | None = None, xt: torch.Tensor | None = None) -> None:
        """Record the x0-form SNR of this step; the next step's gate reads it."""
        snr = x0_snr(x0, xt) if x0 is not None and xt is not None else None
        self._last_x0_snr = snr
        self.x0_snr_per_step.append(snr)

    def end_generation(self) -> dict:
        self.resolve_entropy()
        self.resolve_measurements()
        self._finish_step_stats()
        self.active = False
        return self.summary()

    # ------------------------------------------------------------------ decisions
    def should_reuse(self, layer_id: int, branch: str, target: str = "attn") -> Decision:
        if not self.active or layer_id not in self._plans.get(branch, ()):
            return _COMPUTE
        entry = self.cache.get(layer_id, branch, target)
        if entry is None:
            return _COMPUTE
        if self.config.forecast_order and points(entry) <= self.config.forecast_order:
            self.short_history += 1         # too few computed outputs yet for a forecast of this order
            return _COMPUTE
        if self.error_control is not None and not self.error_control.may_forecast(
                (layer_id, branch, target), self.step.step_index):
            return _COMPUTE
        return Decision(True, entry)

    def should_share(self, layer_id: int) -> bool:
        """Uncond may take cond's fresh output when their last entropies are within epsilon."""
        if not (self.config.cfg_sharing and self.active) or self.schedule.in_warmup(self.step):
            return False
        if self.pending_entropy.has_layer(layer_id):
            self.resolve_entropy()          # a branch of this layer ran in an earlier forward of this step
        hc = self._entropy.get("cond", {}).get(layer_id)
        hu = self._entropy.get("uncond", {}).get(layer_id)
        return hc is not None and hu is not None and abs(hc - hu) < self.config.cfg_sharing_eps

    def reuse(self, entry: CacheEntry, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """Count a reuse event for `entry` and return its output for this step (None in kv mode): the stored
        one (forecast order 0) or its forecast from the stored differences, written into `out` if given."""
        self._count(entry.layer, entry.target, reused=True, kv=entry.output is None)
        if entry.output is None:
            return None
        return extrapolate(entry, self.step.step_index, self.config.forecast_order, entry.output.dtype, out)

    def count_share(self, layer_id: int, target: str) -> None:
        self._count(layer_id, target, reused=True, kv=False)
        self.share_events += 1
        # Uncond's entropy was not measured this step; forgetting it makes uncond compute (and measure)
        # at the next step before it may share again, so the |H_cond - H_uncond| test is never staler
        # than one step.
        self._entropy.get("uncond", {}).pop(layer_id, None)

    def commit(self, layer_id: int, branch: str, output: torch.Tensor | None = None,
               entropy: float | None = None, keys: torch.Tensor | None = None,
               values: torch.Tensor | None = None, target: str = "attn", effect=None) -> CacheEntry:
        """Store what (layer, branch, target) just computed, quantized as configured.

        `effect` = (gate (n, D) or None, block input norm (n,)) lets the adaptive schedule weigh the
        forecast error by what it does to the block (dqar.method.probes)."""
        cfg = self.config
        step_index = self.step.step_index if self.step else 0
        if entropy is not None:
            self._record_entropy(layer_id, branch, entropy)
        if cfg.trace and output is not None and target == "attn" and self.step is not None:
            row = trace_row(self.step, layer_id, branch, output, self.cache.get(layer_id, branch, "attn"), entropy)
            if row is not None:
                self.trace_rows.append(row)
        entry = CacheEntry(layer_id, branch, target, step_index, entropy=entropy)
        self._count(layer_id, target, reused=False)
        if layer_id not in self.cached_layers:
            return entry
        salient = self.salience.channels
        if output is not None:
            def keep(t: torch.Tensor, slot: str):
                name, bits = (target, cfg.cache_bits) if slot == "output" else (f"{target}.{slot}", cfg.resolved_diff_bits)
                return store(t, bits, cfg.quant_granularity, salient(layer_id, name, t, bits, step_index))

            previous = self.cache.get(layer_id, branch, target)
            # The new differences serve both the cache and the error measurement (the forecast's miss).
            diffs = differences(previous, output, step_index, cfg.forecast_order)
            if self.measures(branch, target):
                if self.error_control is not None:
                    self.error_control.observe((layer_id, branch, target), previous, output, step_index, effect, diffs)
                if self.effect_meter is not None:
                    self.effect_meter.observe((layer_id, branch, target), previous, output, step_index, effect, diffs)
            entry.output, entry.d1, entry.d2, entry.steps = advance(previous, output, step_index,
                                                                    cfg.forecast_order, keep, diffs)
        if keys is not None:
            # CSB applies to K and V too: their channels are the head dimension.
            kb, vb = cfg.resolved_kv_bits
            entry.keys = store(keys, kb, cfg.quant_granularity, salient(layer_id, "keys", keys, kb, step_index))
            entry.values = store(values, vb, cfg.quant_granularity,
                                 salient(layer_id, "values", values, vb, step_index))
        self.cache.put(entry)
        return entry

    def defer_entropy(self, logits: torch.Tensor, parts: list[tuple[int, str, CacheEntry]]) -> None:
        """Attention logits of one call whose batch holds len(parts) equal branch parts (layer, branch, the
        entry commit returned): their entropies are computed with the step's others when first read."""
        self.pending_entropy.add(logits, parts)

    def resolve_entropy(self) -> None:
        for layer_id, branch, entry, entropy in self.pending_entropy.resolve():
            entry.entropy = entropy
            self._record_entropy(layer_id, branch, entropy)

    def _record_entropy(self, layer_id: int, branch: str, entropy: float) -> None:
        self._entropy.setdefault(branch, {})[layer_id] = entropy
        self._step_entropies.append(entropy)

    def resolve_measurements(self) -> None:
        """Turn the queued forecast errors (dqar.method.error_control) into errors, plans and history."""
        for meter in (self.error_control, self.effect_meter):
            if meter is not None:
                meter.resolve()

    def _history_measured(self, key: tuple, step: int, measured: tuple[float, int] | None) -> None:
        layer_id, branch, _target = key
        self.history.computed(layer_id, branch, step, measured)

    # ------------------------------------------------------------------ accounting
    def count_computed(self, calls: int) -> None:
        """Module calls that ran without a decision: layers the schedule can never reuse (hooks' fast path)."""
        self.compute_events += calls

    def _count(self, layer_id: int, target: str, reused: bool, kv: bool = False) -> None:
        if not reused:
            self.compute_events += 1
            return
        self.reuse_events += 1
        self.events_per_layer[layer_id] += 1
        if self.events_per_step:
            self.events_per_step[-1] += 1
        if self.flops_profile:
            key = ("kv", layer_id) if kv else (target, layer_id)
            self._flops_skipped += self.flops_profile.get(key, 0.0)

    def count_forward(self, flops_profile) -> None:
        """The hooks hand in, once per model forward, the FLOP profile of its input shape (read-only; see
        dqar.method.flops); an uncached forward of all branches is added to the FLOP total."""
        self.flops_profile = flops_profile
        if self.active and flops_profile:
            self._flops_total += flops_profile["total"] * len(self.branches)

    def _finish_step_stats(self) -> None:
        if self.step is not None and len(self.entropy_per_step) < len(self.events_per_step):
            ents = self._step_entropies
            self.entropy_per_step.append(sum(ents) / len(ents) if ents else None)
        self._step_entropies = []

    @property
    def ideal_speedup(self) -> float | None:
        if not self._flops_total:
            return None
        return self._flops_total / max(self._flops_total - self._flops_skipped, 1e-9)

    def summary(self) -> dict:
        decided = self.reuse_events + self.compute_events
        return {
            "reuse_events": self.reuse_events,
            "compute_events": self.compute_events,
            "share_events": self.share_events,
            "reuse_fraction": self.reuse_events / decided if decided else 0.0,
            "events_per_layer": list(self.events_per_layer),
            "events_per_step": list(self.events_per_step),
            "ideal_speedup": self.ideal_speedup,
            "cache_bytes": self.cache.bytes,
            "peak_cache_bytes": self.cache.peak_bytes,
            "entropy_per_step": list(self.entropy_per_step),
            "snr_per_step": list(self.snr_per_step),
            "x0_snr_per_step": list(self.x0_snr_per_step),
            "short_history": self.short_history,
            "forecast_error": self.error_control.summary() if self.error_control is not None else None,
            "entropy_unavailable": self.entropy_unavailable,
            "unmatched_timesteps": self.unmatched_timesteps,
            "num_layers": self.num_layers,
            "config": self.config.to_dict(),
        }
