"""One DQAR configuration against a baseline on the same seeds: speed, memory and quality in one record.

`run_bench` returns the `dqar bench --json` record (schema below, every key always present, null where
not measurable). Baseline and candidate runs are interleaved after warm-up, which is what makes their
ratio trustworthy on a drifting machine. `dqar sweep` writes the same record per point (`empty_record`,
`quality_metrics`) but times each point against one shared reference run (see `dqar.harness.sweep`).

    {"config": DQARConfig.to_dict(),
     "baseline": {"ms_per_step", "seconds", "peak_mem_mb", "runs", "name", "settings", "calls"},
     "dqar": {"ms_per_step", "seconds", "peak_mem_mb", "cache_mb", "reuse_events", "reuse_fraction", "runs"},
     "speedup", "ideal_speedup", "calls",
     "quality": {"fid_vs_baseline", "fid_vs_data", "psnr", "ssim", "accuracy"}}

- seconds: median wall time of one generation (all N images in one batch); ms_per_step = seconds/steps;
  runs: the seconds of every timed generation, in order (round r of baseline and dqar ran back to back).
- peak_mem_mb: per-generation peak, MiB; CUDA max allocated, or on CPU the peak RSS growth over the
  call (see `dqar.harness.timing`). cache_mb: the controller's peak cache size, MiB.
- speedup: baseline seconds / dqar seconds (medians); `speedup_spread(record)` gives the range of the
  per-round ratios. ideal_speedup: the controller's FLOP-count bound.
- calls (DQAR's, top level; the timed baseline's under "baseline"): {"attn", "mlp", "block"}, the share of
  those calls an uncached run makes that actually ran, counted by `dqar.harness.peers.count_module_calls`
  (not taken from any config), so DQAR and every baseline sit on the same axes. Counted over each
  contender's first generation: a warm-up run when there is one, so no timed run carries counting hooks
  (every generation of the same seeds makes the same calls: each contender resets its state per generation).
- baseline name / settings: what DQAR was timed against ("none" = the uncached model) and the settings it
  ran with (a baseline's options included; null where it has none).
- quality: only with an evaluator (the embedded digits model); the reference for fid_vs_baseline, psnr
  and ssim is always the uncached full-precision model on the same seeds, whatever the timing baseline.
  psnr is null when the images are identical (infinite PSNR has no JSON spelling); fid needs N >= 2.
"""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.method.hooks import get_controller
from dqar.sampling import sample

from .baselines import BASELINE_SETTINGS
from .metrics import (EvaluatorFeatures, FeatureExtractor, FeatureStats, accuracy, feature_stats,
                      frechet_distance_from_stats, psnr, ssim)
from .peers import count_module_calls, sampling_observers
from .timing import Contender, TimingResult, interleaved_timing

MIB = 2 ** 20
SCHEMA = {
    "config": None,
    "baseline": ("ms_per_step", "seconds", "peak_mem_mb", "runs", "name", "settings", "calls"),
    "dqar": ("ms_per_step", "seconds", "peak_mem_mb", "cache_mb", "reuse_events", "reuse_fraction", "runs"),
    "speedup": None,
    "ideal_speedup": None,
    "calls": ("attn", "mlp", "block"),
    "quality": ("fid_vs_baseline", "fid_vs_data", "psnr", "ssim", "accuracy"),
}


@dataclass
class BenchResult:
    """The JSON record plus what a caller may want to keep (images, the controller summary, raw timings)."""

    record: dict
    summary: dict
    timings: dict[str, TimingResult]
    images: torch.Tensor                 # (N, C, H, W) candidate samples
    reference_images: torch.Tensor       # (N, C, H, W) uncached full-precision samples, same seeds
    extras: dict[str, Any] = field(default_factory=dict)


def empty_record(config: DQARConfig | None = None) -> dict:
    """The schema with every value null (config filled when given)."""
    out: dict = {}
    for key, sub in SCHEMA.items():
        out[key] = {k: None for k in sub} if isinstance(sub, tuple) else None
    out["config"] = config.to_dict() if config is not None else None
    return out


def baseline_run_options(name: str, options=None, *, steps: int, sampler: str, cfg_scale: float) -> dict:
    """`options` for baseline `name` with what the run itself decides filled in: magcache calibrates on the
    run's step count, sampler and guidance scale unless the options say otherwise (a step count outside
    its calibration range 2..1000 keeps the default; another count is interpolated)."""
    out = dict(options or {})
    if name == "magcache":
        if 2 <= steps <= 1000:
            out.setdefault("calibration_steps", steps)
        out.setdefault("calibration_sampler", sampler)
        if math.isfinite(cfg_scale):
            out.setdefault("calibration_cfg_scale", cfg_scale)
    return out


def variant_settings(name: str, model, options=None) -> dict | None:
    """The settings baseline `name` (built as `model`) ran with: the model's own `settings` (a peer's, with its
    options and magcache's calibrated ratios), PAB's defaults under its options, None for the others."""
    if getattr(model, "settings", None) is not None:
        return copy.deepcopy(dict(model.settings))
    if name in BASELINE_SETTINGS:
        return {**copy.deepcopy(BASELINE_SETTINGS[name]), **copy.deepcopy(dict(options or {}))}
    return None


class FirstRunCalls:
    """Counts the attention, MLP and block calls `model` executes in the first generation run through it
    (`count_module_calls`); `shares` is then {"attn", "mlp", "block"} -> share, None before."""

    def __init__(self, model: torch.nn.Module):
        # A pipeline's calls are its transformer's.
        self.model, self.shares = getattr(model, "transformer", model), None
        self.unprobed = False

    def __call__(self, fn):
        if self.shares is not None or self.unprobed:
            return fn()
        counting = count_module_calls(self.model)
        try:
            calls = counting.__enter__()
        except ValueError:
            # Blocks the counter has no probes for (SD3, Flux, ...): the shares stay null rather than guessed.
            self.unprobed = True
            return fn()
        try:
            out = fn()
        finally:
            counting.__exit__(None, None, None)
        self.shares = dict(calls)
        return out


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _mib(n: int | None) -> float | None:
    return None if n is None else n / MIB


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed: must be an integer >= {minimum}")


def _fid(stats: FeatureStats, reference) -> float:
    # Sample statistics are computed once and compared with both references.
    ref = reference if isinstance(reference, FeatureStats) else feature_stats(reference, "reference")
    return frechet_distance_from_stats(stats, ref)


def quality_metrics(images: torch.Tensor, reference_images: torch.Tensor, labels: Sequence[int], *,
                    evaluator=None, extractor: FeatureExtractor | None = None,
                    real_features=None, baseline_features=None) -> dict:
    """The record's "quality" block; keys whose inputs are missing stay null.

    `real_features` / `baseline_features`: (M, D) features or FeatureStats of real data / the reference.
    """
    q = {k: None for k in SCHEMA["quality"]}
    q["psnr"] = _finite_or_none(psnr(images, reference_images))
    q["ssim"] = ssim(images, reference_images)
    if extractor is None and evaluator is not None:
        extractor = EvaluatorFeatures(evaluator)
    if extractor is not None and images.shape[0] >= 2:
        feats = feature_stats(extractor(images), "sample features")
        ref = baseline_features if baseline_features is not None else extractor(reference_images)
        q["fid_vs_baseline"] = _fid(feats, ref)
        if real_features is not None:
            q["fid_vs_data"] = _fid(feats, real_features)
    if evaluator is not None and hasattr(evaluator, "predict"):
        q["accuracy"] = accuracy(evaluator.predict(images), torch.as_tensor(list(labels)))
    return q


def bench(model: torch.nn.Module, config: DQARConfig, *, labels: Sequence[int], seeds: Sequence[int],
          steps: int, sampler: str = "ddim", cfg_scale: float = 1.5, repeats: int = 3, warmup_runs: int = 1,
          device: torch.device | str = "cpu", evaluator=None, extractor: FeatureExtractor | None = None,
          real_features=None, baseline_images: torch.Tensor | None = None, baseline_features=None,
          baseline_model: torch.nn.Module | None = None, baseline_name: str | None = None,
          baseline_settings: dict | None = None, measure_memory: bool = True,
          progress: bool = False, runner=None) -> BenchResult:
    """Time `model` under `config` against `baseline_model` (default: `model` uncached), then score quality.

    DQAR is applied to `model` only around each candidate run and removed after it, so `model` is the
    exact uncached model for the baseline runs and is returned to the caller unhooked. A peer baseline
    (`dqar.harness.peers`) gets its sampling observers. `baseline_name` / `baseline_settings` are recorded
    as given ("none" when no baseline model is given). With `progress`, a bar on stderr counts the
    generations (warm-up and timed, both contenders) with an ETA. `runner(m)` -> images (N, C, H, W) in [-1, 1]
    replaces `dqar.sampling.sample` for a diffusers pipeline `model` (its labels then only count the images);
    PSNR and SSIM against the uncached run are then scored without an evaluator.
    """
    if not isinstance(config, DQARConfig):
        raise TypeError(f"config must be a DQARConfig, got {type(config).__name__}")
    _check_int("repeats", repeats, 1)
    _check_int("warmup_runs", warmup_runs, 0)
    if len(labels) != len(seeds):
        raise ValueError(f"got {len(labels)} labels but {len(seeds)} seeds: one seed per image")
    if get_controller(model) is not None:
        raise ValueError("bench needs the model without DQAR applied: call dqar.remove_dqar(model) first")
    if baseline_images is not None and baseline_images.shape[0] != len(seeds):
        # Checked before timing so a sweep's mismatched reference fails in seconds, not after every run.
        raise ValueError(f"baseline_images has {baseline_images.shape[0]} images for {len(seeds)} seeds: "
                         "they must be the same seeds and labels")
    labels, seeds = list(labels), list(seeds)
    extra_reference = baseline_images is None and baseline_model is not None
    bar = tqdm(total=2 * (warmup_runs + repeats) + int(extra_reference), desc="dqar bench", unit="generation",
               disable=not progress, file=sys.stderr)

    def generate(m: torch.nn.Module) -> torch.Tensor:
        if runner is not None:
            images = runner(m)
        else:
            images = sample(m, labels, seeds, steps=steps, sampler=sampler, cfg_scale=cfg_scale, device=device,
                            observers=sampling_observers(m))
        bar.update(1)
        return images

    state: dict[str, Any] = {}

    def attach() -> None:
        state["controller"] = apply_dqar(model, config)

    def detach(_out) -> None:
        # remove_dqar resets the controller, so the summary is read first.
        state["summary"] = state["controller"].summary()
        remove_dqar(model)

    baseline_target = model if baseline_model is None else baseline_model
    counted = {"baseline": FirstRunCalls(baseline_target), "dqar": FirstRunCalls(model)}
    contenders = {"baseline": lambda: counted["baseline"](lambda: generate(baseline_target)),
                  "dqar": Contender(fn=lambda: counted["dqar"](lambda: generate(model)), setup=attach,
                                    teardown=detach)}
    try:
        timings = interleaved_timing(contenders, rounds=repeats, warmup_runs=warmup_runs, device=device,
                                     measure_memory=measure_memory)
        images = timings["dqar"].last_output
        summary = state["summary"]
        if baseline_images is not None:
            reference = baseline_images
        elif baseline_model is None:
            reference = timings["baseline"].last_output      # the uncached model, same seeds: the reference
        else:
            reference = generate(model)                      # timed baseline is not the full-precision model
    finally:
        bar.close()
        if get_controller(model) is not None:   # an exception inside a candidate run
            remove_dqar(model)
    if reference.shape != images.shape:
        raise ValueError(f"baseline_images has shape {tuple(reference.shape)}, the samples "
                         f"{tuple(images.shape)}: they must be the same seeds and labels")

    record = empty_record(config)
    b, d = timings["baseline"], timings["dqar"]
    record["baseline"] = {"ms_per_step": b.median * 1000.0 / steps, "seconds": b.median,
                          "peak_mem_mb": _mib(b.peak_mem_bytes), "runs": list(b.samples),
                          "name": baseline_name if baseline_name is not None else
                          ("none" if baseline_model is None else None),
                          "settings": baseline_settings, "calls": counted["baseline"].shares}
    record["dqar"] = {"ms_per_step": d.median * 1000.0 / steps, "seconds": d.median,
                      "peak_mem_mb": _mib(d.peak_mem_bytes), "cache_mb": _mib(summary.get("peak_cache_bytes")),
                      "reuse_events": int(summary["reuse_events"]),
                      "reuse_fraction": float(summary["reuse_fraction"]), "runs": list(d.samples)}
    record["speedup"] = b.median / d.median if d.median > 0 else None
    ideal = summary.get("ideal_speedup")
    record["ideal_speedup"] = float(ideal) if ideal is not None else None
    record["calls"] = counted["dqar"].shares
    if evaluator is not None or extractor is not None or runner is not None:
        record["quality"] = quality_metrics(images, reference, labels, evaluator=evaluator, extractor=extractor,
                                            real_features=real_features, baseline_features=baseline_features)
    return BenchResult(record, summary, timings, images, reference,
                       extras={"memory_method": b.memory_method})


def run_bench(model: torch.nn.Module, config: DQARConfig, *, labels: Sequence[int], seeds: Sequence[int],
              steps: int, sampler: str = "ddim", cfg_scale: float = 1.5, repeats: int = 3, warmup_runs: int = 1,
              evaluator=None, real_features=None, baseline_images: torch.Tensor | None = None,
              **kwargs) -> dict:
    """`bench(...)` reduced to its JSON record (the `dqar bench --json` schema)."""
    return bench(model, config, labels=labels, seeds=seeds, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                 repeats=repeats, warmup_runs=warmup_runs, evaluator=evaluator, real_features=real_features,
                 baseline_images=baseline_images, **kwargs).record


def speedup_spread(record: dict) -> tuple[float, float] | None:
    """(lowest, highest) baseline/dqar ratio over the timed rounds, or None with fewer than two rounds."""
    b, d = record["baseline"].get("runs") or [], record["dqar"].get("runs") or []
    ratios = [x / y for x, y in zip(b, d) if y > 0]
    return (min(ratios), max(ratios)) if len(ratios) >= 2 else None


def format_table(record: dict, *, title: str = "") -> str:
    """A small fixed-width summary of a bench record for people: the FLOP bound first, then the measured
    speedup with its per-round spread (a single round is labelled as such, and a measurement above the
    bound is called noise), and each contender's counted work share."""

    def fmt(v, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    b, d, q = record["baseline"], record["dqar"], record["quality"]
    spread, ideal, measured = speedup_spread(record), record["ideal_speedup"], record["speedup"]
    if spread is not None:
        speed = f"measured {fmt(measured, '.3f')}x (rounds {spread[0]:.3f}-{spread[1]:.3f}x)"
    else:
        speed = f"measured {fmt(measured, '.3f')}x from a single round (no spread: use --repeats 3)"
    if measured is not None and ideal is not None and measured > ideal:
        speed += ", above the FLOP bound: timing noise"

    def work(calls) -> str:
        if not calls:
            return "-"
        return "/".join(fmt(calls.get(k), ".2f") for k in ("attn", "mlp", "block"))

    base_label = {"none": "uncached", None: "baseline"}.get(b.get("name"), b.get("name"))
    lines = [title] if title else []
    lines += [
        f"{'':12} {'ms/step':>10} {'seconds':>10} {'peak MiB':>10} {'cache MiB':>10} {'reuse':>8} {'work a/m/b':>15}",
        f"{base_label:12} {fmt(b['ms_per_step'], '.2f'):>10} {fmt(b['seconds'], '.3f'):>10} "
        f"{fmt(b['peak_mem_mb'], '.1f'):>10} {'-':>10} {'-':>8} {work(b.get('calls')):>15}",
        f"{'dqar':12} {fmt(d['ms_per_step'], '.2f'):>10} {fmt(d['seconds'], '.3f'):>10} "
        f"{fmt(d['peak_mem_mb'], '.1f'):>10} {fmt(d['cache_mb'], '.2f'):>10} {fmt(d['reuse_fraction'], '.1%'):>8} "
        f"{work(record.get('calls')):>15}",
        f"speedup: FLOP bound {fmt(ideal, '.3f')}x, {speed}; {d['reuse_events']} reuse events",
        "work: executed share of attention / MLP / block calls, counted (1.00 = the uncached model)",
        f"quality: fid_vs_baseline {fmt(q['fid_vs_baseline'], '.3f')}  fid_vs_data {fmt(q['fid_vs_data'], '.3f')}  "
        f"psnr {'inf' if q['psnr'] is None and q['ssim'] is not None else fmt(q['psnr'], '.2f')} dB  "
        f"ssim {fmt(q['ssim'], '.4f')}  accuracy {fmt(q['accuracy'], '.1%')}",
    ]
    return "\n".join(lines)
