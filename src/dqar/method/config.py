"""DQARConfig: every knob of attention-output reuse, validated when constructed.

Validation happens in `__post_init__`, so `dataclasses.replace` re-validates too. The config is
never written back to: defaults are resolved where they are used.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

MODES = ("output", "kv")
SCHEDULES = ("none", "static", "depth", "gate", "policy", "interval", "adaptive")
ORDERS = ("shallow", "deep", "random")
SNR_FORMS = ("schedule", "x0")
GATE_WITH = (None, "static", "depth")
TARGETS = ("attn", "mlp", "block", "stack")
# Schedules that decide for a whole step at once, the only ones the stack target can follow.
STACK_SCHEDULES = ("none", "interval", "adaptive")
FORECAST_ORDERS = (0, 1, 2)
CACHE_BITS = (16, 8, 4)
GRANULARITIES = ("tensor", "channel", "token")
LAYER_ROUNDINGS = ("slides", "code")
ADAPTIVE_SCOPES = ("module", "step")
BRANCH_DECISIONS = ("each", "cond")
# The seed's depth-aware phases for 28 layers, {0,1,2} / {0..12} / all, as fractions of depth.
SEED_DEPTH_PHASES = ((0.3, 3 / 28), (0.7, 13 / 28), (1.0, 1.0))


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"DQARConfig.{name}={value!r} is not allowed: {allowed}")


def _is_number(v: Any) -> bool:
    """A real number that is not NaN (a NaN would pass no comparison and so slip through range checks)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _is_finite(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class DQARConfig:
    """When and how a DiT's attention (and optionally MLP) outputs are cached and reused.

    schedule   which rule decides reuse: "none" (never), "static" (seed 000's warmup + layer
               fraction), "depth" (seed 002's depth phases), "gate" (entropy below tau(p_len) and
               SNR inside `snr_range`), "policy" (learned MLP), "interval" (FORA: compute every
               `interval`-th step after warmup, reuse in between), "adaptive" (error control: a refresh
               when the predicted effect of the forecasts would exceed `tolerance`, and at the latest
               after `max_age` steps; `adaptive_scope` "step" (default) decides once per step for every
               module from their summed effects, "module" each layer, target and branch on its own).
    warmup     progress p = step / (steps - 1) before which nothing is reused, for every schedule. After it
               the static and depth schedules run on the clock of the reuse window, a = (p - w) / (1 - w),
               which goes from 0 at the end of warmup to 1 at the last step.
    layer_fraction  static schedule: at most floor(l * L) layers reuse, reached at the last step; the count
               ramps up with a (seed 000: floor(a * l * L)), so over a whole run far fewer module calls are
               reused than l suggests (w=0.4, l=0.33, 50 steps: 6.75% of calls at L=8, 7.5% at 12, 9% at 28).
    layer_rounding  how the static schedule floors its layer count: "slides" (default) floors once,
               floor(a * l * L), as seed 000's ReusableLayers(p) formula; "code" floors twice,
               floor(a * floor(l * L)), as the seeds' public code does, which reuses less (w=0.4, l=0.33,
               8 layers, 50 steps: 16 layer-steps per branch instead of 27). Both reach floor(l * L) layers.
    depth_phases  depth schedule (seed 002): ((a_end, fraction), ...); the first phase whose a_end exceeds
               a gives round(fraction * L) shallow-first layers. Seed 002 has no warmup and switches phases
               on p (p < 0.3: layers {0,1,2}, p < 0.7: {0..12}, else all, for 28 layers); here the phases run
               on a instead, so with the default warmup 0.4 all three are reached (50 steps: steps 20-28
               shallow, 29-40 middle, 41-49 all) rather than the first phase never running (its p < 0.3 lies
               inside the warmup). With warmup=0 a = p and the phases are the seed's exactly.
    mode       "output" caches the module output before the adaLN gate; "kv" caches K and V and
               recomputes Q and attention (the seeds' failure mode, kept to show it).
    targets    which outputs are cached: "attn" and/or "mlp" (the module output before its adaLN gate), or
               "block" alone (the whole block's residual, output - input: a reuse skips the block's
               attention, MLP, adaLN modulation and norms), or "stack" alone (one residual for the whole
               chain of blocks, last output - first input: a reuse skips every block at once; the same
               images as "block" under a schedule that decides per step, with 1/L of its history; needs
               schedule "none", "interval" or "adaptive", dqar.method.stack).
    forecast_order  0 reuses the last computed output; 1 / 2 extrapolate from the last 2 / 3 computed
               outputs of that module and branch (Newton divided differences over their step positions,
               dqar.method.forecast); too little history yet means compute (summary()["short_history"]).
    diff_bits  bits of the forecast's difference slots D1, D2 (None: cache_bits). Differences have a far
               smaller range than the output, so cache_bits=8, diff_bits=4 keeps a history at a sixth of
               fp32 with the 16-bit history's quality on the embedded model (docs/FORECAST.md).
    gate_deep_snr_floor  gate only: None (default, off) or a number; while the step's SNR (`snr_form`) is
               below it, the last third of the layers (index >= 2 * L // 3, as the public code of the seeds
               counts them: 18..27 of 28, 5..7 of 8) may not reuse. The seeds' code uses 1.0; the slides do
               not have the rule.
    entropy_images  attention entropy over at most this many images of each CFG branch (0, default: all),
               the first ones of the batch, as `entropy_rows` samples query rows: an estimate of the branch
               mean at a fraction of its cost where the batch is large and the model small.
    error_images  the adaptive schedule's and policy v2's forecast error over at most this many images of each
               CFG branch (0, default: all), spread evenly over the branch (every n // k-th from the first);
               the error is the largest over the images measured, so fewer images see a smaller or equal
               value and a tolerance spends less work. The errors of a step are reduced together at the next
               step's start; on a small model that reduction is memory traffic over the measured rows, which
               the sample cuts (docs: BENCHMARKS.md, stop 18).
    error_targets  the adaptive schedule and policy v2: which of `targets` have their forecast error measured
               (None, default: all). The others follow their layer: policy v2's error feature is then the sum over
               the measured targets only, and under the adaptive schedule an unmeasured target refreshes when the
               first measured target of its layer does. A policy for it is trained that way
               (`dqar train-policy --error-targets mlp`).
    branch_decisions  the adaptive schedule and policy v2 under CFG: "each" (default) decides every branch from its
               own measured forecast error; "cond" measures the conditional branch only and its decisions serve
               the unconditional branch too (one plan per layer instead of two: half the measurements, on a
               small model half the decision work). A policy for it is trained that way
               (`dqar train-policy --branch-decisions cond`).
    cache_bits 16 stores outputs unquantized, in the model's own dtype (32-bit on an fp32 model); 8 / 4
               quantize them (every forecast slot: output and differences).
    tau0       entropy threshold base: tau(p_len) = tau0 * sqrt(p_len / 64); class-conditional
               models have p_len = 1, so tau = tau0 / 8 (entropy in nats, mean over query rows).
               The default 28 (tau = 3.5 nats at p_len = 1) was calibrated on the embedded model,
               whose layer-mean entropy falls from 3.89 to 2.85 nats over 50 DDIM steps; the seed's
               "tau(8 tokens) = 2.0" (tau0 = 5.7) assumed another entropy scale. Recalibrate per model
               with `record_entropy=True` (summary()["entropy_per_step"]).
    """

    schedule: str = "static"
    mode: str = "output"
    warmup: float = 0.4
    layer_fraction: float = 0.33
    layer_rounding: str = "slides"
    order: str = "shallow"
    order_seed: int = 0
    depth_phases: tuple = SEED_DEPTH_PHASES
    tau0: float = 28.0
    snr_range: tuple = (0.5, 50.0)
    snr_form: str = "schedule"
    entropy_rows: int = 16
    entropy_seed: int = 0
    entropy_images: int = 0
    record_entropy: bool = False
    gate_with: str | None = None
    gate_deep_snr_floor: float | None = None
    cfg_sharing: bool = False
    cfg_sharing_eps: float = 0.05
    targets: tuple = ("attn",)
    interval: int = 2
    policy_path: str | None = None
    policy_threshold: float | None = None
    policy_budget: float | None = None
    cache_bits: int = 16
    kv_bits: tuple | None = None
    quant_granularity: str = "channel"
    csb_topk: float = 0
    csb_calibration_steps: int = 0
    forecast_order: int = 0
    diff_bits: int | None = None
    tolerance: float = 0.02
    max_age: int = 4
    adaptive_scope: str = "step"
    error_images: int = 0
    branch_decisions: str = "each"
    error_targets: tuple | None = None
    trace: bool = False

    def __post_init__(self):
        # Normalise sequence fields to tuples (JSON and CLI give lists) without mutating caller data.
        for name in ("depth_phases", "snr_range", "targets", "kv_bits", "error_targets"):
            value = getattr(self, name)
            if isinstance(value, str) and name in ("targets", "error_targets"):
                value = tuple(t.strip() for t in value.split(",") if t.strip())
            if isinstance(value, list):
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            object.__setattr__(self, name, value)
        if isinstance(self.policy_path, os.PathLike):
            object.__setattr__(self, "policy_path", os.fspath(self.policy_path))
        self._validate()

    def _validate(self) -> None:
        for name, allowed in (("schedule", SCHEDULES), ("mode", MODES), ("order", ORDERS),
                              ("snr_form", SNR_FORMS), ("quant_granularity", GRANULARITIES),
                              ("layer_rounding", LAYER_ROUNDINGS), ("adaptive_scope", ADAPTIVE_SCOPES),
                              ("branch_decisions", BRANCH_DECISIONS)):
            if getattr(self, name) not in allowed:
                _fail(name, getattr(self, name), f"must be one of {', '.join(allowed)}")
        if self.gate_with not in GATE_WITH:
            _fail("gate_with", self.gate_with, "must be None, 'static' or 'depth'")
        if self.gate_with is not None and self.schedule != "gate":
            _fail("gate_with", self.gate_with, f"applies to schedule='gate' only (schedule is {self.schedule!r}); "
                                               "leave it None")
        floor = self.gate_deep_snr_floor
        if floor is not None and (not _is_finite(floor) or floor < 0):
            _fail("gate_deep_snr_floor", floor, "must be None or a finite number >= 0 (the SNR below which the last "
                                                "third of the layers may not reuse)")
        if floor is not None and self.schedule != "gate":
            _fail("gate_deep_snr_floor", floor, f"applies to schedule='gate' only (schedule is {self.schedule!r}); "
                                                "leave it None")
        if not _is_number(self.warmup) or not 0.0 <= self.warmup <= 1.0:
            _fail("warmup", self.warmup, "must be a number in [0, 1]")
        if not _is_number(self.layer_fraction) or not 0.0 < self.layer_fraction <= 1.0:
            _fail("layer_fraction", self.layer_fraction, "must be a number in (0, 1]")
        if not _is_int(self.order_seed):
            _fail("order_seed", self.order_seed, "must be an integer")
        self._validate_phases()
        if not _is_finite(self.tau0) or self.tau0 <= 0:
            _fail("tau0", self.tau0, "must be a finite number > 0")
        sr = self.snr_range
        if (not isinstance(sr, tuple) or len(sr) != 2 or not all(_is_number(v) for v in sr)
                or sr[0] < 0 or sr[0] > sr[1]):
            _fail("snr_range", sr, "must be a pair (a, b) of numbers (not NaN) with 0 <= a <= b")
        if not _is_int(self.entropy_rows) or self.entropy_rows < 1:
            _fail("entropy_rows", self.entropy_rows, "must be an integer >= 1")
        if not _is_int(self.entropy_seed):
            _fail("entropy_seed", self.entropy_seed, "must be an integer")
        if not _is_int(self.entropy_images) or self.entropy_images < 0:
            _fail("entropy_images", self.entropy_images, "must be an integer >= 0 (0: every image)")
        if not _is_finite(self.cfg_sharing_eps) or self.cfg_sharing_eps < 0:
            _fail("cfg_sharing_eps", self.cfg_sharing_eps, "must be a finite number >= 0")
        t = self.targets
        if not isinstance(t, tuple) or not t or any(x not in TARGETS for x in t) or len(set(t)) != len(t):
            _fail("targets", t, f"must be a non-empty tuple of distinct names from {', '.join(TARGETS)}")
        if self.mode == "kv" and t != ("attn",):
            _fail("targets", t, "mode='kv' caches attention keys/values only; use targets=('attn',)")
        for whole in ("block", "stack"):
            if whole in t and len(t) > 1:
                _fail("targets", t, f"'{whole}' caches the whole {whole}'s residual, attention and MLP included; "
                                    f"use targets=('{whole}',) alone")
        if t == ("stack",) and self.schedule not in STACK_SCHEDULES:
            _fail("targets", t, f"the stack target skips every block at once, so it follows a schedule that decides "
                                f"per step: {', '.join(STACK_SCHEDULES)} (schedule={self.schedule!r} decides per layer)")
        if isinstance(self.forecast_order, bool) or self.forecast_order not in FORECAST_ORDERS:
            _fail("forecast_order", self.forecast_order, "must be 0 (reuse the last output), 1 or 2 (extrapolate "
                                                         "from the last 2 or 3 computed outputs)")
        if not _is_finite(self.tolerance) or self.tolerance <= 0:
            _fail("tolerance", self.tolerance, "must be a finite number > 0 (the largest predicted effect of a "
                                               "forecast on its block, relative to the block input)")
        if not _is_int(self.max_age) or self.max_age < 1:
            _fail("max_age", self.max_age, "must be an integer >= 1 (most steps a cached output may serve)")
        if not _is_int(self.error_images) or self.error_images < 0:
            _fail("error_images", self.error_images, "must be an integer >= 0 (0: every image)")
        e = self.error_targets
        if e is not None:
            if (not isinstance(e, tuple) or not e or len(set(e)) != len(e)
                    or any(x not in self.targets for x in e)):
                _fail("error_targets", e, f"must be None (every target) or a non-empty tuple of distinct names from "
                                          f"targets={self.targets!r}")
            if self.schedule not in ("adaptive", "policy"):
                _fail("error_targets", e, "applies to the schedules that measure forecast errors, adaptive and "
                                          f"policy (schedule is {self.schedule!r}); use None")
        if self.branch_decisions != "each" and self.schedule not in ("adaptive", "policy"):
            _fail("branch_decisions", self.branch_decisions, "applies to the schedules that measure forecast errors, "
                                                             f"adaptive and policy (schedule is {self.schedule!r}); "
                                                             "use 'each'")
        if self.schedule == "adaptive" and self.mode == "kv":
            _fail("schedule", self.schedule, "the adaptive schedule controls forecast errors of module outputs; "
                                             "mode='kv' caches keys/values, so use mode='output'")
        if self.diff_bits is not None and (isinstance(self.diff_bits, bool) or self.diff_bits not in CACHE_BITS):
            _fail("diff_bits", self.diff_bits, "must be None (the same as cache_bits), 16, 8 or 4")
        if self.forecast_order and self.mode == "kv":
            _fail("forecast_order", self.forecast_order, "forecasting extrapolates module outputs; mode='kv' caches "
                                                         "keys/values, so use forecast_order=0 with it")
        if not _is_int(self.interval) or self.interval < 1:
            _fail("interval", self.interval, "must be an integer >= 1")
        if self.policy_threshold is not None and (not _is_number(self.policy_threshold)
                                                  or not 0.0 <= self.policy_threshold <= 1.0):
            _fail("policy_threshold", self.policy_threshold, "must be None or a number in [0, 1]")
        if self.policy_budget is not None and (not _is_number(self.policy_budget)
                                               or not 0.0 < self.policy_budget <= 1.0):
            _fail("policy_budget", self.policy_budget, "must be None or a number in (0, 1]")
        if self.cache_bits not in CACHE_BITS or isinstance(self.cache_bits, bool):
            _fail("cache_bits", self.cache_bits, "must be 16 (unquantized), 8 or 4")
        if self.kv_bits is not None:
            kb = self.kv_bits
            if not isinstance(kb, tuple) or len(kb) != 2 or any(b not in CACHE_BITS for b in kb):
                _fail("kv_bits", kb, "must be None or a pair (k_bits, v_bits), each 16, 8 or 4")
        if not _is_finite(self.csb_topk) or self.csb_topk < 0:
            _fail("csb_topk", self.csb_topk, "must be 0 (off), a channel count >= 1 or a fraction in (0, 1)")
        if isinstance(self.csb_topk, float) and self.csb_topk >= 1 and not self.csb_topk.is_integer():
            _fail("csb_topk", self.csb_topk, "a count must be a whole number; a fraction must be < 1")
        if not _is_int(self.csb_calibration_steps) or self.csb_calibration_steps < 0:
            _fail("csb_calibration_steps", self.csb_calibration_steps, "must be an integer >= 0")
        if self.cfg_sharing and self.schedule == "none":
            _fail("cfg_sharing", self.cfg_sharing, "sharing is reuse; schedule='none' is the uncached baseline, "
                                                   "so pick a schedule or cfg_sharing=False")
        if self.policy_path is not None and (not isinstance(self.policy_path, str) or not self.policy_path):
            _fail("policy_path", self.policy_path, "must be None (the shipped policy) or a file path string")
        for name in ("record_entropy", "cfg_sharing", "trace"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be True or False")

    def _validate_phases(self) -> None:
        ph = self.depth_phases
        ok = isinstance(ph, tuple) and len(ph) >= 1
        prev = 0.0
        for item in ph if ok else ():
            if not (isinstance(item, tuple) and len(item) == 2 and all(_is_number(v) for v in item)):
                ok = False
                break
            end, frac = item
            if not (prev < end <= 1.0 and 0.0 <= frac <= 1.0):
                ok = False
                break
            prev = end
        if not ok or prev != 1.0:
            _fail("depth_phases", ph, "must be ((p_end, layer_fraction), ...) with increasing p_end in (0, 1], "
                                      "the last p_end = 1.0, fractions in [0, 1]")

    @property
    def needs_entropy(self) -> bool:
        """Whether attention entropy is measured whatever the schedule reads (a policy's own features are
        known once its file is loaded: DQARController.needs_entropy)."""
        return self.record_entropy or self.trace or self.cfg_sharing or self.schedule == "gate"

    @property
    def resolved_diff_bits(self) -> int:
        return self.diff_bits if self.diff_bits is not None else self.cache_bits

    @property
    def resolved_kv_bits(self) -> tuple[int, int]:
        return self.kv_bits if self.kv_bits is not None else (self.cache_bits, self.cache_bits)

    def to_dict(self) -> dict:
        """JSON-safe: tuples become lists."""
        def plain(v):
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

        return {k: plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "DQARConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DQARConfig field {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
