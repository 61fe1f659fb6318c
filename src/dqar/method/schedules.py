"""Reuse schedules behind one interface: given the step, which layers may reuse their cache.

Every schedule answers `plan(step, branch, entropies) -> frozenset of layer ids` once per step and
branch; the controller turns that into per-layer decisions. Warmup (no reuse while progress <
warmup) is applied by every schedule, because the seeds found it to be the dominant quality knob.
The static and depth schedules then run on the clock of the reuse window, a = (p - w) / (1 - w).
"""
from __future__ import annotations

import math
import warnings
from array import array
from dataclasses import dataclass

import torch

from .config import DQARConfig
from .policy import history_features, load_policy
from .stats import policy_features

# Guards floor() against float error: (0.7 - 0.4) / 0.6 * 0.5 * 28 must give 7, not 6.
_FLOOR_EPS = 1e-9


@dataclass
class StepState:
    """What a schedule may read about the current step."""

    step_index: int
    total_steps: int
    num_layers: int
    snr: float | None = None
    latent_norm: float | None = None
    prompt_length: int = 1

    @property
    def progress(self) -> float:
        return self.step_index / max(self.total_steps - 1, 1)


def window_progress(progress: float, warmup: float) -> float:
    """a = (p - w) / (1 - w): 0 at the end of warmup, 1 at the last step (seed 000's ramp)."""
    return (progress - warmup) / (1.0 - warmup)


def reusable_layer_count(progress: float, warmup: float, layer_fraction: float, num_layers: int,
                         rounding: str = "slides") -> int:
    """0 if p < w, else seed 000's floor(a * l * L) ("slides"), or floor(a * floor(l * L)) ("code").

    The slides' formula floors once; the public code of the seeds floors l * L first, then a times that,
    which reuses fewer layers before the last step (both reach floor(l * L) there). Both floors are guarded
    against float error (0.7 - 0.4 is 0.29999999999999993).
    """
    if progress < warmup or warmup >= 1.0:
        return 0
    a = window_progress(progress, warmup)
    if rounding == "code":
        n = math.floor(a * math.floor(layer_fraction * num_layers + _FLOOR_EPS) + _FLOOR_EPS)
    elif rounding == "slides":
        n = math.floor(a * layer_fraction * num_layers + _FLOOR_EPS)
    else:
        raise ValueError(f"rounding={rounding!r} is not allowed: must be 'slides' or 'code'")
    return max(0, min(n, num_layers))


def layer_order(order: str, num_layers: int, seed: int = 0) -> list[int]:
    """The order in which layers become reusable: shallow-first, deep-first or a seeded permutation."""
    if order == "shallow":
        return list(range(num_layers))
    if order == "deep":
        return list(range(num_layers - 1, -1, -1))
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randperm(num_layers, generator=g).tolist()


def depth_layer_count(progress: float, phases: tuple, num_layers: int) -> int:
    """Seed 002's depth phases scaled to L: the first phase whose end exceeds `progress` gives the fraction.

    DepthSchedule passes the reuse window's clock a = (p - w) / (1 - w) as `progress` (p itself at w = 0).
    """
    for end, fraction in phases:
        if progress < end or end >= 1.0:
            return min(num_layers, int(round(fraction * num_layers)))
    return num_layers


def deep_layers_start(num_layers: int) -> int:
    """The first of the "deep" layers, the last third as the seeds' public code counts it: 2 * L // 3."""
    return 2 * num_layers // 3


def entropy_threshold(tau0: float, prompt_length: int) -> float:
    """tau(p_len) = tau0 * sqrt(p_len / 64) (seed 002)."""
    return tau0 * math.sqrt(max(prompt_length, 1) / 64.0)


class Schedule:
    """Base: nothing is planned; any layer may be (a subclass plans its own).

    `reads` names the config fields a schedule's plan depends on; `live_fields` builds on it, so a new
    schedule or field is declared once, here, and the report's pairing rules follow.
    """

    reads: tuple[str, ...] = ("warmup",)

    def __init__(self, config: DQARConfig):
        self.config = config

    def plan(self, step: StepState, branch: str, entropies: dict[int, float]) -> frozenset[int]:
        return frozenset()

    def plan_branches(self, step: StepState, entropies: dict[str, dict[int, float]],
                      branches: tuple[str, ...]) -> dict[str, frozenset[int]]:
        """Every branch's plan for this step; with branch_decisions="cond" the conditional branch's plan serves
        every branch."""
        deciding = decided_by(self.config, branches)
        plans = self.plan_deciding(step, entropies, deciding)
        return plans if deciding == branches else {b: plans["cond"] for b in branches}

    def plan_deciding(self, step: StepState, entropies: dict[str, dict[int, float]],
                      branches: tuple[str, ...]) -> dict[str, frozenset[int]]:
        """The plans of the branches that decide (a schedule may form them together)."""
        return {b: self.plan(step, b, entropies.get(b, {})) for b in branches}

    def in_warmup(self, step: StepState) -> bool:
        # warmup = 1.0 means never reuse, the last step (progress 1.0) included, as in ReusableLayers(p).
        return step.progress < self.config.warmup or self.config.warmup >= 1.0

    def reusable_ever(self, num_layers: int) -> frozenset[int]:
        """Every layer this schedule can ever plan for reuse; the controller caches only these."""
        return frozenset(range(num_layers))


class NoReuse(Schedule):
    """schedule="none": the uncached baseline."""

    reads = ()

    def reusable_ever(self, num_layers):
        return frozenset()


class StaticSchedule(Schedule):
    """Seed 000: after warmup the first floor(a * l * L) layers of `order` may reuse, a = (p - w) / (1 - w).

    The count ramps from 0 at the end of warmup to floor(l * L) at the last step, so a run reuses about
    l * (1 - w) / 2 of its module calls, not l (w=0.4, l=0.33, 50 steps, 8 layers: 27 of 400 = 6.75%).
    `layer_rounding="code"` floors l * L first, as the seeds' public code does.
    """

    reads = ("warmup", "layer_fraction", "layer_rounding", "order", "order_seed")

    def plan(self, step, branch, entropies):
        c = self.config
        n = reusable_layer_count(step.progress, c.warmup, c.layer_fraction, step.num_layers, c.layer_rounding)
        return frozenset(layer_order(c.order, step.num_layers, c.order_seed)[:n])

    def reusable_ever(self, num_layers):
        c = self.config
        n = reusable_layer_count(1.0, c.warmup, c.layer_fraction, num_layers, c.layer_rounding)
        return frozenset(layer_order(c.order, num_layers, c.order_seed)[:n])


class DepthSchedule(Schedule):
    """Seed 002's depth-aware phases (shallow layers first, then the middle, then all), after warmup.

    Seed 002 switches phases on the progress p (< 0.3: layers {0, 1, 2}; < 0.7: {0..12}; else all, for 28
    layers) and has no warmup. Every schedule here keeps seed 000's warmup, and on p the first phase would
    never run at the default warmup 0.4 (it lies inside the warmup: 0, 0, 0, 13, 28 layers at p = 0, 0.2,
    0.35, 0.5, 0.8). So the phases run on the reuse window's clock a = (p - w) / (1 - w), as the static
    schedule's ramp does: with w = 0.4 the shallow phase covers p in [0.4, 0.58), the middle one [0.58,
    0.82), all layers from 0.82 (50 steps: steps 20-28, 29-40, 41-49). With warmup=0, a = p: the seed's rule.
    """

    reads = ("warmup", "depth_phases")

    def plan(self, step, branch, entropies):
        if self.in_warmup(step):
            return frozenset()
        # The guard keeps a phase edge exact: at p = 29/50, w = 0.4, a is 0.3 but computes to 0.29999999999999993.
        a = window_progress(step.progress, self.config.warmup) + _FLOOR_EPS
        return frozenset(range(depth_layer_count(a, self.config.depth_phases, step.num_layers)))

    def reusable_ever(self, num_layers):
        if self.config.warmup >= 1.0:
            return frozenset()
        most = max(min(num_layers, int(round(f * num_layers))) for _, f in self.config.depth_phases)
        return frozenset(range(most))


class GateSchedule(Schedule):
    """Reuse where the layer's last measured entropy < tau(p_len) and the SNR is inside the window.

    With `gate_deep_snr_floor` set, the last third of the layers (index >= 2 * L // 3) may not reuse while
    the SNR is below it: the rule of the seeds' public code (with 1.0), not of the slides.
    """

    reads = ("warmup", "tau0", "snr_range", "snr_form", "gate_with", "gate_deep_snr_floor", "entropy_rows",
             "entropy_seed", "entropy_images")

    def __init__(self, config: DQARConfig, base: Schedule | None = None):
        super().__init__(config)
        self.base = base

    def plan(self, step, branch, entropies):
        if self.in_warmup(step) or step.snr is None:
            return frozenset()
        a, b = self.config.snr_range
        if not a <= step.snr <= b:
            return frozenset()
        candidates = self.base.plan(step, branch, entropies) if self.base else range(step.num_layers)
        floor = self.config.gate_deep_snr_floor
        if floor is not None and step.snr < floor:
            deep = deep_layers_start(step.num_layers)
            candidates = [i for i in candidates if i < deep]
        tau = entropy_threshold(self.config.tau0, step.prompt_length)
        return frozenset(i for i in candidates if i in entropies and entropies[i] < tau)

    def reusable_ever(self, num_layers):
        return self.base.reusable_ever(num_layers) if self.base else frozenset(range(num_layers))


class IntervalSchedule(Schedule):
    """FORA-style: after warmup, every `interval`-th step computes and the steps between reuse."""

    reads = ("warmup", "interval")

    def plan(self, step, branch, entropies):
        if self.in_warmup(step):
            return frozenset()
        first = math.ceil(self.config.warmup * max(step.total_steps - 1, 1) - _FLOOR_EPS)
        if (step.step_index - first) % self.config.interval == 0:
            return frozenset()
        return frozenset(range(step.num_layers))

    def reusable_ever(self, num_layers):
        return frozenset(range(num_layers)) if self.config.warmup < 1.0 else frozenset()


class PolicySchedule(Schedule):
    """The learned policy: p_reuse per layer from its features, threshold and budget.

    A v1 policy (the seed's five features) plans the layers with a measured entropy. A v2 policy also reads
    each (layer, branch)'s cache age and the forecast error measured at its last compute (`history`, bound by
    the controller), and plans only layers with such a measurement whose cache is at most as old as the
    oldest it was trained on; a planned layer forecasts at the config's `forecast_order` (0 = copy).
    """

    reads = ("warmup", "policy_path", "policy_threshold", "policy_budget", "snr_form", "entropy_rows",
             "entropy_seed", "entropy_images", "error_images", "branch_decisions", "error_targets")

    def __init__(self, config: DQARConfig, policy):
        super().__init__(config)
        self.policy = policy
        self.history = None          # ModuleHistory, set by the controller when uses_history
        where = f"the policy {config.policy_path or '(shipped)'!r}"
        if policy.reads_entropy and "attn" not in config.targets:
            raise ValueError(f"{where} reads attention entropy, measured only on the attention target, but "
                             f"targets={config.targets!r}; use targets that include 'attn'")
        if policy.uses_history and config.mode == "kv":
            raise ValueError(f"{where} has feature set {policy.feature_set!r}, which reads forecast errors of "
                             "module outputs; mode='kv' keeps none: use mode='output'")
        if policy.uses_history:
            _warn_if_measured_otherwise(where, policy.info.get("use_with") or {}, config)

    @property
    def uses_history(self) -> bool:
        return self.policy.uses_history

    @property
    def reads_entropy(self) -> bool:
        return self.policy.reads_entropy

    def plan(self, step, branch, entropies):
        return self.plan_deciding(step, {branch: entropies}, (branch,))[branch]

    def plan_deciding(self, step, entropies, branches):
        """One policy forward for every deciding branch's rows (a forward costs its op dispatch, not its size);
        the threshold and the budget then apply per branch."""
        plans = {b: frozenset() for b in branches}
        if self.in_warmup(step) or step.snr is None:
            return plans
        parts = [(b, *self._rows(step, b, entropies.get(b, {}))) for b in branches]
        flat = array("f")
        for _, _, branch_rows in parts:
            for row in branch_rows:
                flat.extend(row)
        if not flat:
            return plans
        # From a float32 buffer: a list of lists through torch.tensor costs more than the policy's forward.
        features = torch.frombuffer(flat, dtype=torch.float32).view(-1, len(self.policy.feature_names))
        p = self.policy.forward(features).tolist()
        start = 0
        for branch, layers, branch_rows in parts:
            if branch_rows:
                mask = self.policy.chosen(p[start:start + len(branch_rows)], step.num_layers,
                                          self.config.policy_threshold, self.config.policy_budget)
                plans[branch] = frozenset(i for i, m in zip(layers, mask) if m)
                start += len(branch_rows)
        return plans

    def _rows(self, step, branch, entropies) -> tuple[list[int], list[list[float]]]:
        """The layers this branch may plan and their feature rows."""
        reads_entropy = self.policy.reads_entropy
        if reads_entropy and not entropies:
            return [], []
        base = (step.snr, step.latent_norm or 0.0, step.progress, step.prompt_length)
        layers, rows = [], []
        # Without entropy the seed's features lose their first one and are the same for every layer.
        shared = None if reads_entropy else policy_features(0.0, *base)[1:]
        for i in (sorted(entropies) if reads_entropy else range(step.num_layers)):
            row = policy_features(entropies[i], *base) if reads_entropy else list(shared)
            if self.policy.uses_history:
                age = self.history.age(i, branch, step.step_index)
                measured = self.history.measured(i, branch)
                if age is None or measured is None or age > self.policy.max_cache_age:
                    continue
                row += history_features(age, *measured)
            layers.append(i)
            rows.append(row)
        return layers, rows

    def reusable_ever(self, num_layers):
        return frozenset(range(num_layers)) if self.config.warmup < 1.0 else frozenset()


# What a v2 policy's error feature was measured over in training, and its value in files that predate it.
_MEASURED_BY = (("targets", None), ("error_images", 0), ("branch_decisions", "each"), ("error_targets", None))


def _warn_if_measured_otherwise(where: str, use_with: dict, config: DQARConfig) -> None:
    """A v2 policy reads its error feature as training measured it; measured otherwise (other targets, fewer
    images, one branch for both) the values shift and the policy decides worse (docs/POLICY.md, stop 18)."""
    if not use_with:
        return                          # a file that records nothing about it
    differ = []
    for field, before in _MEASURED_BY:
        trained = use_with.get(field, before)
        trained = tuple(trained) if isinstance(trained, list) else trained
        if (trained is not None or field == "error_targets") and trained != getattr(config, field):
            differ.append(f"{field}={trained!r} (this run: {getattr(config, field)!r})")
    if differ:
        warnings.warn(f"{where} was trained with {', '.join(differ)}; its forecast-error feature is measured "
                      "differently here, so its decisions may be worse than measured (the card's use_with)",
                      RuntimeWarning, stacklevel=4)


def decided_by(config: DQARConfig, branches: tuple[str, ...]) -> tuple[str, ...]:
    """The branches whose own measurements decide (`branch_decisions`): all, or the conditional one for all."""
    return ("cond",) if config.branch_decisions == "cond" and "cond" in branches else branches


class AdaptiveSchedule(Schedule):
    """Error control: after warmup every layer is a candidate; the controller refreshes each (layer, target,
    branch) when its measured forecast error, grown with the cache age, would pass `tolerance`."""

    reads = ("warmup", "tolerance", "max_age", "adaptive_scope", "error_images", "branch_decisions", "error_targets")

    def plan(self, step, branch, entropies):
        return frozenset() if self.in_warmup(step) else frozenset(range(step.num_layers))

    def reusable_ever(self, num_layers):
        return frozenset(range(num_layers)) if self.config.warmup < 1.0 else frozenset()


SCHEDULE_CLASSES: dict[str, type[Schedule]] = {
    "none": NoReuse, "static": StaticSchedule, "depth": DepthSchedule, "gate": GateSchedule,
    "interval": IntervalSchedule, "policy": PolicySchedule, "adaptive": AdaptiveSchedule,
}
_SCHEDULE_FIELDS = frozenset(f for cls in SCHEDULE_CLASSES.values() for f in cls.reads)
# What reuse does with what it keeps: dead for the uncached baseline.
_CACHE_FIELDS = ("mode", "targets", "cache_bits", "kv_bits", "quant_granularity", "csb_topk",
                 "csb_calibration_steps", "cfg_sharing", "cfg_sharing_eps", "forecast_order", "diff_bits")
# Fields that describe the run, not the images it makes.
_NEVER_LIVE = ("record_entropy", "trace")


def live_fields(config: dict) -> frozenset[str]:
    """The fields of `config` (a dict, as sweep rows keep it) that can change the images of its run.

    Every field is live unless a rule says otherwise, so a new field counts until it is declared: fields
    that some schedule `reads` are live only for the schedules that read them (and the base a gate
    filters); the cache fields only when anything can be reused, K/V bits, quantizer settings and the
    sharing epsilon only where they apply.
    """
    schedule = config.get("schedule")
    reads = set(SCHEDULE_CLASSES[schedule].reads) if schedule in SCHEDULE_CLASSES else set(_SCHEDULE_FIELDS)
    if schedule == "gate" and config.get("gate_with") in SCHEDULE_CLASSES:
        reads |= set(SCHEDULE_CLASSES[config["gate_with"]].reads)
    sharing = schedule != "none" and bool(config.get("cfg_sharing"))
    if sharing:
        reads |= {"entropy_rows", "entropy_seed", "entropy_images"}   # sharing measures entropy, any schedule
    dead = set(_SCHEDULE_FIELDS - reads) | set(_NEVER_LIVE)
    if config.get("order") != "random":
        dead.add("order_seed")
    kv = config.get("mode") == "kv"
    if schedule == "none":
        dead |= set(_CACHE_FIELDS)
    if not kv:
        dead.add("kv_bits")
    if not kv and config.get("cache_bits") == 16:
        dead |= {"quant_granularity", "csb_topk", "csb_calibration_steps"}
    if not sharing:
        dead.add("cfg_sharing_eps")
    if not config.get("forecast_order"):
        dead.add("diff_bits")          # no differences are kept without forecasting
    return frozenset(set(config) - dead)


def build_schedule(config: DQARConfig) -> Schedule:
    if config.schedule == "static":
        return StaticSchedule(config)
    if config.schedule == "depth":
        return DepthSchedule(config)
    if config.schedule == "interval":
        return IntervalSchedule(config)
    if config.schedule == "adaptive":
        return AdaptiveSchedule(config)
    if config.schedule == "gate":
        base = {"static": StaticSchedule, "depth": DepthSchedule}.get(config.gate_with)
        return GateSchedule(config, base(config) if base else None)
    if config.schedule == "policy":
        return PolicySchedule(config, load_policy(config.policy_path))
    return NoReuse(config)
