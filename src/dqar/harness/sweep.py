"""A resumable sweep: many DQAR configurations (and named baselines) against one shared reference run.

Each finished point is appended to a JSON-lines results file as one `dqar.harness.rows.SweepRow`: the
`dqar bench` record plus the point's identity, settings and the controller's per-step profile (the file
layout, its repair and its lock are in `dqar.harness.rows`).

Why the reference is shared instead of re-timed per point (as `dqar bench` does): on a CPU one
generation of 200 digits x 50 steps takes minutes, so interleaving a baseline run with every point
would double the sweep. The uncached model runs `repeats` times once; its images are the reference
for every point's fid_vs_baseline / PSNR / SSIM, its median time the denominator of every speedup.
Both are cached in the sidecar folder (`RESULTS.samples/` beside `RESULTS.jsonl`), so a resumed
sweep reuses them rather than re-measuring. The price: machine drift over a long sweep lands on the
speedups. Every timed run is therefore kept in the row (`runs`), and the report leads with the
FLOP-count `ideal_speedup` (no noise) and shows a measured speedup only with the spread of its runs,
never from a single run.

Resume: a row's `key` hashes its variant, its options (when given), config and settings (not its name or
timing repeats); rows already in the file are skipped. Two sweeps never write one file at once (`results_lock`).

Every point's row also carries `calls`, the share of attention, MLP and block calls it executed
(`dqar.harness.peers.count_module_calls`), counted over its first full-size generation (a warm-up run when
there is one; the "none" reference over its profile pass), so DQAR points and every baseline sit on the
same axes; and a baseline variant's row carries the settings it actually ran with (`variant_settings`).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.sampling import sample, to_uint8

from dqar.method.hooks import get_controller

from .baselines import make_baseline
from .bench import MIB, FirstRunCalls, baseline_run_options, empty_record, quality_metrics, variant_settings
from .metrics import EvaluatorFeatures, feature_stats
from .peers import PEERS, count_module_calls, sampling_observers, validate_options
from .results_file import append_row, check_results_path, json_safe, read_rows, results_lock, sidecar_dir
from .rows import SweepRow
from .timing import Contender, interleaved_timing

# Named comparison points. Each is (variant, config overrides); a variant swaps the model for the one
# dqar.harness.baselines builds ("ptq-int8": its int8-weight copy; "pab" and the peers: its diffusers port under
# one of diffusers' caches) and runs that without DQAR; a variant point may carry options over its settings.
BASELINES: dict[str, tuple[str | None, dict]] = {
    # The uncached model itself: free, it is the shared reference run.
    # (Every schedule-"none" baseline also turns cfg_sharing off: sharing is reuse, and a --cfg-sharing given
    # for the grid must not make the reference itself invalid.)
    "none": (None, {"schedule": "none", "record_entropy": True, "cfg_sharing": False}),
    # Seed 000's recommended quality configuration (40% warmup, 33% layers, shallow-first).
    "static": (None, {"schedule": "static", "warmup": 0.4, "layer_fraction": 0.33}),
    # Seed 002's "PTQ4DiT" row: quantization only, no reuse.
    "ptq-int8": ("ptq-int8", {"schedule": "none", "cfg_sharing": False}),
    # FORA (Selvaraju et al. 2024): recompute attention and MLP every N=3 steps from the start, reuse between.
    "interval-attn-mlp": (None, {"schedule": "interval", "interval": 3, "warmup": 0.0, "targets": ("attn", "mlp")}),
    # diffusers' pyramid attention broadcast on the same weights in diffusers' DiT (dqar.harness.baselines).
    "pab": ("pab", {"schedule": "none", "cfg_sharing": False}),
    # Seed 000's failed first attempt: cache K/V, recompute Q, on the same schedule as "static".
    "kv": (None, {"schedule": "static", "warmup": 0.4, "layer_fraction": 0.33, "mode": "kv"}),
    # diffusers' other caches on the same port (dqar.harness.peers): TaylorSeer, SeaCache, FasterCache,
    # FirstBlockCache, MagCache.
    **{name: (name, {"schedule": "none", "cfg_sharing": False}) for name in PEERS},
}
# Sample images kept per point for the report's image grid (uint8, small).
SAVED_SAMPLES = 32
# Images sampled under schedule "none" to record the uncached model's entropy per step for the "none" row.
PROFILE_IMAGES = 16


class SweepStopped(Exception):
    """Raised by an `on_row` callback to stop a sweep cleanly after a row was written."""


@dataclass(frozen=True)
class SweepPoint:
    """One configuration to measure: a grid cell or a named baseline."""

    name: str
    kind: str                      # "grid" | "baseline"
    config: DQARConfig
    variant: str | None = None     # None: the model as loaded; else a dqar.harness.baselines model
    grid: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)     # the variant's settings given (validated), over its defaults

    @property
    def is_reference(self) -> bool:
        return self.variant is None and self.config.schedule == "none"


@dataclass(frozen=True)
class SweepSettings:
    """Everything besides the config that changes a point's numbers (part of its resume key)."""

    model: str
    n: int
    classes: tuple[int, ...]
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    # Digest of the weights: "embedded" names whatever is shipped now, and a retrained model must not
    # resume from rows (or a cached reference run) measured on the old one.
    weights_sha256: str | None = None
    # FID feature space; part of the key so rows scored in different spaces never mix on resume.
    features: str = "evaluator"

    def to_dict(self) -> dict:
        out = {"model": self.model, "n": self.n, "classes": list(self.classes), "steps": self.steps,
               "sampler": self.sampler, "cfg_scale": self.cfg_scale, "seed": self.seed,
               "weights_sha256": self.weights_sha256}
        if self.features != "evaluator":
            # Only when not the default, so results files written before this field existed still resume.
            out["features"] = self.features
        return out

    @property
    def labels(self) -> list[int]:
        return [self.classes[i % len(self.classes)] for i in range(self.n)]

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.n)]


def weights_digest(model: torch.nn.Module) -> str:
    """Short SHA-256 over every state-dict tensor's name and bytes (any dtype)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _option_text(v) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(_option_text(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return "none" if v is None else str(v)


def baseline_point(name: str, base: DQARConfig | None = None, options=None) -> SweepPoint:
    """The named baseline on top of `base` (the sweep's base config, e.g. record_entropy=True), with `options`
    over a variant's settings (`dqar.harness.peers.validate_options`; values may be text). A point with
    options is named after them: 'seacache threshold=0.1'."""
    if name not in BASELINES:
        raise ValueError(f"baseline {name!r} is not known; allowed: {', '.join(BASELINES)}")
    variant, overrides = BASELINES[name]
    opts = validate_options(variant or name, options)    # a DQAR point ('static', 'kv', ...) takes none
    values = (base or DQARConfig()).to_dict()
    values.update(overrides)
    shown = " ".join([name] + [f"{k}={_option_text(v)}" for k, v in opts.items()])
    return SweepPoint(name=shown, kind="baseline", config=DQARConfig.from_dict(values), variant=variant,
                      options=opts)


def point_key(point: SweepPoint, settings: SweepSettings) -> str:
    """Stable identity of a measurement: variant (+ its options, when given) + config + settings (name and
    repeats excluded; a point without options keys as before options existed)."""
    ident = {"variant": point.variant, "config": point.config.to_dict(), "settings": settings.to_dict()}
    if point.options:
        ident["options"] = point.options
    blob = json.dumps(ident, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------

@dataclass
class Reference:
    """The uncached run every point is compared with."""

    images: torch.Tensor
    seconds: float
    peak_mem_mb: float | None
    samples: list[float]
    features: Any = None


def _profile(summary: dict | None, profile_n: int | None) -> dict | None:
    if summary is None:
        return None
    keys = ("entropy_per_step", "snr_per_step", "x0_snr_per_step", "events_per_step", "events_per_layer",
            "num_layers", "compute_events", "share_events")
    out = {k: summary.get(k) for k in keys}
    out["profile_n"] = profile_n
    return out


def _save_samples(folder: Path, name: str, images: torch.Tensor, labels: Sequence[int], count: int) -> str | None:
    if count <= 0:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    keep = min(count, images.shape[0])
    np.savez_compressed(folder / name, images=to_uint8(images[:keep]).numpy(),
                        labels=np.asarray(list(labels)[:keep], dtype=np.int64))
    return name


def _mib(n) -> float | None:
    return None if n is None else n / MIB


def run_sweep(model: torch.nn.Module, points: Sequence[SweepPoint], settings: SweepSettings, out: str | Path, *,
              repeats: int = 1, warmup_runs: int = 0, device: torch.device | str = "cpu", evaluator=None,
              extractor=None, real_features=None, save_samples: int = SAVED_SAMPLES,
              max_points: int | None = None,
              progress: bool = False, on_row: Callable[[SweepRow], None] | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """Measure every point not already in `out`; returns {"computed": n, "skipped": n, "rows": [SweepRow]}.

    Holds `out`'s lock throughout (`ResultsFileBusy` when another sweep has it). With `progress`, a bar
    counts the full-size generations still to run (the reference's and every point's timed and warm-up
    runs), with an ETA.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats={repeats!r} is not allowed: must be an integer >= 1")
    if max_points is not None and max_points < 0:
        raise ValueError(f"max_points={max_points!r} is not allowed: must be >= 0")
    out = check_results_path(out)
    with results_lock(out):
        return _run_locked(model, points, settings, out, repeats=repeats, warmup_runs=warmup_runs, device=device,
                           evaluator=evaluator, extractor=extractor, real_features=real_features,
                           save_samples=save_samples, max_points=max_points, progress=progress, on_row=on_row,
                           log=log or (lambda _msg: None))


def _run_locked(model, points, settings: SweepSettings, out: Path, *, repeats, warmup_runs, device, evaluator,
                extractor, real_features, save_samples, max_points, progress, on_row, log) -> dict:
    existing = {row.key for row in read_rows(out, repair=True)}
    todo, seen = [], set(existing)
    for p in points:
        key = point_key(p, settings)
        if key not in seen:
            todo.append((key, p))
            seen.add(key)
    skipped = len(points) - len(todo)
    if max_points is not None:
        todo = todo[:max_points]
    result = {"computed": 0, "skipped": skipped, "rows": []}
    if not todo:
        return result

    model = model.to(device).eval()
    labels, seeds = settings.labels, settings.seeds
    folder = sidecar_dir(out)
    per_point = warmup_runs + repeats
    total = (0 if all(p.exists() for p in _reference_files(settings, folder)) else per_point)
    total += sum(0 if p.is_reference else per_point for _, p in todo)
    bar = tqdm(total=total, desc="dqar sweep", unit="generation", disable=not progress, file=sys.stderr)
    caller_log = log

    def log(msg: str) -> None:
        with tqdm.external_write_mode(file=sys.stderr):     # a line above the bar, not through it
            caller_log(msg)

    def generate(m: torch.nn.Module, lab=labels, sds=seeds) -> torch.Tensor:
        images = sample(m, lab, sds, steps=settings.steps, sampler=settings.sampler, cfg_scale=settings.cfg_scale,
                        device=device, observers=sampling_observers(m))
        if lab is labels:         # only full-size generations count; short profile/warm-up passes do not
            bar.update(1)
        return images

    variants: dict[str, torch.nn.Module] = {}
    try:
        bar.set_postfix_str("reference")
        ref = _reference(model, settings, folder, generate, repeats, warmup_runs, device, log)
        if extractor is None and evaluator is not None:
            extractor = EvaluatorFeatures(evaluator)
        if extractor is not None and settings.n >= 2:
            ref.features = feature_stats(extractor(ref.images), "reference features")
        for key, point in todo:
            t0 = time.perf_counter()
            bar.set_postfix_str(point.name[:40])
            log(f"point {point.name}")
            record, summary, images, profile_n, extra = _measure(model, point, ref, generate, variants, repeats,
                                                                 warmup_runs, device, settings)
            record["quality"] = quality_metrics(images, ref.images, labels, evaluator=evaluator,
                                                extractor=extractor, real_features=real_features,
                                                baseline_features=ref.features)
            row = SweepRow.from_dict(json_safe({
                "key": key, "name": point.name, "kind": point.kind, "variant": point.variant,
                "grid": dict(point.grid), "settings": settings.to_dict(), **record,
                "profile": _profile(summary, profile_n),
                "samples": _save_samples(folder, f"{key}.npz", images, labels, save_samples),
                "wall_s": time.perf_counter() - t0, **extra}))
            append_row(out, row)
            result["computed"] += 1
            result["rows"].append(row)
            if on_row is not None:
                on_row(row)
    except SweepStopped:
        pass
    finally:
        bar.close()
    return result


def _reference_files(settings: SweepSettings, folder: Path) -> tuple[Path, Path]:
    """(images, metadata) of the cached reference run for these settings."""
    blob = json.dumps(settings.to_dict(), sort_keys=True).encode()
    stem = f"reference-{hashlib.sha256(blob).hexdigest()[:16]}"
    return folder / f"{stem}.safetensors", folder / f"{stem}.json"


def _reference(model, settings: SweepSettings, folder: Path, generate, repeats, warmup_runs, device, log) -> Reference:
    """The uncached run: loaded from the sidecar when an earlier (interrupted) sweep measured it."""
    path, meta_path = _reference_files(settings, folder)
    if path.exists() and meta_path.exists():
        from safetensors.torch import load_file

        images = load_file(str(path))["images"]
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        log(f"reference run loaded from {path}")
        return Reference(images, float(meta["seconds"]),
                         None if meta["peak_mem_mb"] is None else float(meta["peak_mem_mb"]),
                         [float(s) for s in meta["samples"]])
    log(f"reference run: {settings.n} images x {settings.steps} steps, {repeats} timed")
    # The reference is the process's first generation: a two-image, two-step run first takes the
    # one-time costs (lazy imports, thread pools, allocator growth) out of its timing.
    sample(model, settings.labels[:2], settings.seeds[:2], steps=2, sampler=settings.sampler,
           cfg_scale=settings.cfg_scale, device=device)
    t = interleaved_timing({"baseline": lambda: generate(model)}, rounds=repeats, warmup_runs=warmup_runs,
                           device=device)["baseline"]
    ref = Reference(t.last_output, t.median, _mib(t.peak_mem_bytes), list(t.samples))
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    # Images first, then the JSON that marks the pair complete; each replace is atomic, so a kill never
    # leaves a half-written reference that a resumed sweep would trust.
    tmp = path.with_suffix(".tmp")
    save_file({"images": ref.images.detach().cpu().contiguous()}, str(tmp))
    tmp.replace(path)
    tmp_meta = meta_path.with_suffix(".tmp")
    tmp_meta.write_text(json.dumps({"seconds": ref.seconds, "peak_mem_mb": ref.peak_mem_mb,
                                    "samples": ref.samples}), encoding="utf-8")
    tmp_meta.replace(meta_path)
    return ref


def _measure(model, point: SweepPoint, ref: Reference, generate, variants: dict, repeats: int, warmup_runs: int,
             device, settings: SweepSettings):
    """(record, controller summary or None, images, profile_n, extra row fields) for one point."""
    record = empty_record(point.config)
    record["calls"] = None          # set where counted
    steps = settings.steps
    record["baseline"] = {"ms_per_step": ref.seconds * 1000.0 / steps, "seconds": ref.seconds,
                          "peak_mem_mb": ref.peak_mem_mb, "runs": list(ref.samples)}
    summary, profile_n, extra = None, None, {}
    if point.is_reference:
        # The reference run itself; its per-step entropy comes from a short hooked run on a few images
        # (hooks would slow the timed reference).
        images, seconds, peak, runs = ref.images, ref.seconds, ref.peak_mem_mb, list(ref.samples)
        if point.config.needs_entropy:
            profile_n = min(PROFILE_IMAGES, settings.n)
            ctl = apply_dqar(model, point.config)
            try:
                with count_module_calls(model) as calls:
                    generate(model, settings.labels[:profile_n], settings.seeds[:profile_n])
                summary = ctl.summary()
                record["calls"] = dict(calls)
            finally:
                remove_dqar(model)
        cache_mb, events, fraction = 0.0, 0, 0.0
    elif point.variant is not None:
        options = baseline_run_options(point.variant, point.options, steps=steps, sampler=settings.sampler,
                                       cfg_scale=settings.cfg_scale)
        vkey = json.dumps([point.variant, options], sort_keys=True)
        if vkey not in variants:
            variants[vkey] = make_baseline(point.variant, model, device, options=options)
            # Its first call initialises the quantized kernels: keep that out of its timing.
            generate(variants[vkey], settings.labels[:2], settings.seeds[:2])
        vmodel = variants[vkey]
        counted = FirstRunCalls(vmodel)
        t = interleaved_timing({"variant": lambda: counted(lambda: generate(vmodel))}, rounds=repeats,
                               warmup_runs=warmup_runs, device=device)["variant"]
        record["calls"] = counted.shares
        ran_with = variant_settings(point.variant, vmodel, options)
        if ran_with is not None:
            extra["variant_settings"] = ran_with
        images, seconds, peak, runs = t.last_output, t.median, _mib(t.peak_mem_bytes), list(t.samples)
        cache_mb, events, fraction = 0.0, 0, 0.0
        if hasattr(vmodel, "reuse_stats"):    # a variant that caches by itself (pab, the peers)
            stats = vmodel.reuse_stats()
            cache_mb = _mib(stats["cache_bytes"])
            events, fraction = int(stats["reuse_events"]), float(stats["reuse_fraction"])
    else:
        state: dict[str, Any] = {}

        def attach() -> None:
            state["ctl"] = apply_dqar(model, point.config)

        def detach(_out) -> None:
            state["summary"] = state["ctl"].summary()   # remove_dqar resets the controller
            remove_dqar(model)

        counted = FirstRunCalls(model)
        c = Contender(fn=lambda: counted(lambda: generate(model)), setup=attach, teardown=detach)
        try:
            t = interleaved_timing({"dqar": c}, rounds=repeats, warmup_runs=warmup_runs, device=device)["dqar"]
        finally:
            if get_controller(model) is not None:
                remove_dqar(model)
        record["calls"] = counted.shares
        summary = state["summary"]
        images, seconds, peak, runs = t.last_output, t.median, _mib(t.peak_mem_bytes), list(t.samples)
        cache_mb = _mib(summary.get("peak_cache_bytes"))
        events, fraction = int(summary["reuse_events"]), float(summary["reuse_fraction"])
        profile_n = settings.n
    record["dqar"] = {"ms_per_step": seconds * 1000.0 / steps, "seconds": seconds, "peak_mem_mb": peak,
                      "cache_mb": cache_mb, "reuse_events": events, "reuse_fraction": fraction, "runs": runs}
    record["speedup"] = ref.seconds / seconds if seconds > 0 else None
    ideal = summary.get("ideal_speedup") if summary is not None and not point.is_reference else None
    record["ideal_speedup"] = float(ideal) if ideal is not None else (1.0 if point.variant is None else None)
    return record, summary, images, profile_n, extra
