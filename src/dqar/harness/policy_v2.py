"""Training data for policy v2: rows from runs that forecast, labelled by the measured harm of forecasting.

The v1 policy learns from uncached traces, so it never sees an ageing cache; v2 reads the cache age and the
last measured forecast error, which exist only in runs that reuse. So the rows come from such runs:

1. `trace_refresh_run`: one generation (a batch, as the benchmark samples it) under `RefreshSchedule`, which
   after warmup lets each (layer, branch) forecast at random (probability `p_forecast`, seeded) and
   computes it at the latest when its cache is `max_age` steps old. Varying `p_forecast` over the runs gives
   every cache age from 1 to max_age + 1 and uneven history gaps, as a learned policy's own decisions do.
2. At every compute of a (layer, branch) whose history could have forecast at the configured order, the
   controller measures the error the forecast would have made there, given the actual history:
   `ErrorControl.observe`'s max over images of ||g * (forecast - fresh)|| / ||x|| (adaLN gate g, block input x),
   summed over the layer's targets. One row = the features the policy would have seen when it planned that
   step (the seed's five, then cache age, log of the error measured at the previous compute, and that
   compute's age) + `harm`, the error measured now.
3. `label_rows_v2`: label 1 (forecasting there is safe) when harm <= `tolerance`, optionally with the harm
   divided by its step's typical one-step harm (`step_scales`, label scale "step").
4. `fit_policy_v2`: the seed's MLP on the v2 features (policy_training's split and AUC helpers).
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

from dqar.harness.policy_training import FitResult, binary_auc, train_split_by_group
from dqar.method.config import DQARConfig
from dqar.method.hooks import apply_dqar, remove_dqar
from dqar.method.policy import ReusePolicy, history_features
from dqar.method.schedules import Schedule
from dqar.method.stats import POLICY_FEATURE_NAMES_V2, POLICY_FEATURE_SETS, policy_features
from dqar.sampling import sample


class RefreshSchedule(Schedule):
    """Each (layer, branch) with a measured error forecasts with probability p_forecast, never past max_age.

    It records, at each plan, what a v2 policy would have seen per (layer, branch); `collect` turns the
    snapshots of modules that then computed into rows (their harm is the error measured at that compute).
    """

    uses_history = True

    def __init__(self, config: DQARConfig, p_forecast: float, max_age: int, seed: int):
        super().__init__(config)
        if not 0.0 <= p_forecast <= 1.0:
            raise ValueError(f"p_forecast={p_forecast!r} is not allowed: must be in [0, 1]")
        if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 1:
            raise ValueError(f"max_age={max_age!r} is not allowed: must be an integer >= 1")
        self.p_forecast, self.max_age, self.seed = p_forecast, max_age, seed
        self.history = None
        self.measures_entropy = "attn" in config.targets
        self.rows: list[dict] = []
        self._rng = random.Random(seed)
        self._pending: dict[tuple, dict] = {}     # (layer, branch) -> snapshot taken at its last plan
        self._seen: dict[tuple, int] = {}         # (layer, branch) -> the last compute step already counted
        self._computes: dict[tuple, int] = {}     # (layer, branch) -> computes seen so far this generation

    def plan(self, step, branch, entropies):
        t = step.step_index
        if t == 0:
            for d in (self._pending, self._seen, self._computes):
                d.clear()
        out = []
        for layer in range(step.num_layers):
            key = (layer, branch)
            self._settle(key)
            age = self.history.age(layer, branch, t)
            measured = self.history.measured(layer, branch)
            if (self._computes.get(key, 0) <= self.config.forecast_order or measured is None
                    or (self.measures_entropy and layer not in entropies) or step.snr is None):
                continue                       # the controller could not forecast here / the policy not decide
            # Without the attention target no entropy is measured: the rows then train v2-noentropy only.
            entropy = entropies[layer] if self.measures_entropy else 0.0
            feats = policy_features(entropy, step.snr, step.latent_norm or 0.0, step.progress,
                                    step.prompt_length) + history_features(age, *measured)
            self._pending[key] = {"step": t, "total_steps": step.total_steps, "layer": layer, "branch": branch,
                                  **dict(zip(POLICY_FEATURE_NAMES_V2, feats))}
            if not self.in_warmup(step) and age < self.max_age and self._rng.random() < self.p_forecast:
                out.append(layer)
        return frozenset(out)

    def _settle(self, key: tuple) -> None:
        """Count a compute since the last plan; a snapshot taken at that compute's step becomes a row."""
        last = self.history.last_compute.get(key)
        snap = self._pending.pop(key, None)
        if last is None or last == self._seen.get(key):
            return                             # no compute since the last plan (the snapshot's step forecast)
        self._seen[key] = last
        self._computes[key] = self._computes.get(key, 0) + 1
        measured = self.history.measured(*key)
        if snap is not None and snap["step"] == last and measured is not None:
            self.rows.append({**snap, "harm": measured[0], "harm_age": measured[1]})

    def finish(self) -> None:
        """Rows of the last step (no plan runs after a generation ends)."""
        for key in list(self._pending):
            self._settle(key)


def trace_refresh_run(model: torch.nn.Module, labels: Sequence[int], seeds: Sequence[int], *, p_forecast: float,
                      max_age: int, run_seed: int, steps: int = 50, cfg_scale: float = 1.5, sampler: str = "ddim",
                      targets: tuple = ("attn", "mlp"), forecast_order: int = 2, warmup: float = 0.0,
                      error_images: int = 0, branch_decisions: str = "each",
                      error_targets: str | None = None) -> list[dict]:
    """Rows of one generation of `labels`/`seeds` (one batch) under RefreshSchedule, tagged with `run_seed`.

    `error_images` (DQARConfig's) measures errors, the feature and the harm alike, over that many images per
    branch, so a policy meant to run with it is trained on what it will see; `branch_decisions="cond"` measures
    and plans the conditional branch only (its plan serves both), so the rows are that branch's; `error_targets`
    (a comma list) measures those targets only."""
    # schedule="adaptive" makes apply_dqar install the block probes; the swapped-in schedule then decides alone.
    config = DQARConfig(schedule="adaptive", warmup=warmup, targets=targets, forecast_order=forecast_order,
                        record_entropy=True, error_images=error_images, branch_decisions=branch_decisions,
                        error_targets=error_targets)
    ctl = apply_dqar(model, config)
    schedule = RefreshSchedule(config, p_forecast, max_age, run_seed)
    ctl.use_schedule(schedule)
    try:
        sample(model, labels, seeds, steps=steps, sampler=sampler, cfg_scale=cfg_scale)
        schedule.finish()
        summary = ctl.summary()
    finally:
        remove_dqar(model)
    for r in schedule.rows:
        r.update(run=int(run_seed), p_forecast=float(p_forecast), reuse_fraction=summary["reuse_fraction"],
                 error_images=int(error_images), targets=",".join(targets), branch_decisions=branch_decisions,
                 error_targets=error_targets)
    return schedule.rows


def feature_matrix_v2(rows: Sequence[dict], feature_set: str = "v2") -> torch.Tensor:
    """(N, n_features) float32 in the order of POLICY_FEATURE_SETS[feature_set] (v2's rows hold every v2 feature,
    so a subset such as "v2-noentropy" trains from the same rows)."""
    names = POLICY_FEATURE_SETS[feature_set]
    return torch.tensor([[r[name] for name in names] for r in rows], dtype=torch.float32)


def step_scales(rows: Sequence[dict]) -> dict[int, float]:
    """Per step, the median harm of its one-step forecasts (cache age 1); a step without one takes the nearest
    step's. Dividing by it asks "is forecasting here cheap *for this step*": the raw harm grows about 30-fold
    from the first to the last steps, while an early error travels through every later step."""
    by_step: dict[int, list] = {}
    for r in rows:
        if r["cache_age"] == 1:
            by_step.setdefault(int(r["step"]), []).append(r["harm"])
    if not by_step:
        raise ValueError("no rows at cache age 1 to scale the harm by; use label scale 'none'")
    med = {k: sorted(v)[len(v) // 2] for k, v in by_step.items()}
    steps = sorted(med)
    out = {}
    for step in {int(r["step"]) for r in rows}:
        near = min(steps, key=lambda k: (abs(k - step), k))
        out[step] = max(med[near], 1e-12)
    return out


def scaled_harm(rows: Sequence[dict], scales: dict[int, float] | None) -> list[float]:
    """Each row's harm, divided by its step's scale (scales=None: the raw harm)."""
    return [r["harm"] / scales[int(r["step"])] if scales else r["harm"] for r in rows]


def label_rows_v2(rows: Sequence[dict], tolerance: float, scales: dict[int, float] | None = None) -> torch.Tensor:
    """(N,) labels: 1 where the measured harm of forecasting there (scaled per step with `scales`) is within
    `tolerance`."""
    return torch.tensor([1.0 if h <= tolerance else 0.0 for h in scaled_harm(rows, scales)])


def default_tolerance(rows: Sequence[dict], age: int = 2, scales: dict[int, float] | None = None) -> float:
    """The median (scaled) harm of the rows at cache age `age`: as harmful as a typical forecast at that age (2
    is the oldest forecast of a fixed interval 3)."""
    harms = sorted(h for r, h in zip(rows, scaled_harm(rows, scales)) if r["cache_age"] == age)
    if not harms:
        raise ValueError(f"no rows at cache age {age} to set the label tolerance from; pass one explicitly")
    return float(harms[len(harms) // 2])


def fit_policy_v2(features: torch.Tensor, labels: torch.Tensor, groups: Sequence[int], *, max_cache_age: int,
                  val_fraction: float = 0.25, epochs: int = 800, lr: float = 1e-2, l2: float = 1e-4,
                  threshold: float = 0.5, seed: int = 0, info: dict | None = None,
                  feature_set: str = "v2") -> FitResult:
    """policy_training.fit_policy's recipe (full-batch Adam, BCE + l2 * sum of squared weights, split by
    group) for a v2 policy; `groups` are the runs, whose rows are strongly correlated."""
    features = torch.as_tensor(features, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.float32)
    if features.ndim != 2 or features.shape[0] != labels.shape[0] or len(groups) != labels.shape[0]:
        raise ValueError(f"features {tuple(features.shape)}, labels {tuple(labels.shape)} and {len(groups)} groups "
                         "must have one row each")
    return train_split_by_group(
        lambda: ReusePolicy(threshold=threshold, info=info, feature_set=feature_set, max_cache_age=max_cache_age),
        features, labels, groups, val_fraction=val_fraction, epochs=epochs, lr=lr, l2=l2, threshold=threshold,
        seed=seed)


def signal_auc(rows: Sequence[dict], labels: torch.Tensor) -> dict:
    """ROC AUC of each single v2 feature for the label (higher feature = less safe gets AUC of -feature)."""
    out = {}
    for name in POLICY_FEATURE_NAMES_V2:
        x = torch.tensor([r[name] for r in rows], dtype=torch.float64)
        auc = binary_auc(x, labels)
        out[name] = None if auc is None else round(max(auc, 1.0 - auc), 4)
    return out


def run_plan(n_runs: int, per_class: int, num_classes: int, first_seed: int, p_forecasts: Sequence[float]) -> list:
    """(run id, labels, seeds, p_forecast) of each training run: run k samples `per_class` images of every class
    with seeds first_seed + k * batch + i (never the benchmark's 0..), at p_forecasts[k % len(p_forecasts)]."""
    batch = per_class * num_classes
    return [(k, [i // per_class for i in range(batch)], [first_seed + k * batch + i for i in range(batch)],
             float(p_forecasts[k % len(p_forecasts)])) for k in range(n_runs)]


def collect_rows_v2(model: torch.nn.Module, plan: Sequence[tuple], *, max_age: int, steps: int = 50,
                    cfg_scale: float = 1.5, sampler: str = "ddim", targets: tuple = ("attn", "mlp"),
                    forecast_order: int = 2, warmup: float = 0.0, error_images: int = 0,
                    branch_decisions: str = "each", error_targets: str | None = None,
                    progress=None) -> list[dict]:
    """Rows of every run of `plan` (see run_plan), in order."""
    rows = []
    for n, (k, labels, seeds, p) in enumerate(plan):
        rows += trace_refresh_run(model, labels, seeds, p_forecast=p, max_age=max_age, run_seed=k, steps=steps,
                                  cfg_scale=cfg_scale, sampler=sampler, targets=targets,
                                  forecast_order=forecast_order, warmup=warmup, error_images=error_images,
                                  branch_decisions=branch_decisions, error_targets=error_targets)
        if progress:
            progress(n + 1, len(plan))
    return rows
