"""One measured sweep point as a typed record, and the results file that holds them (JSON lines).

`dqar sweep` appends one `SweepRow` per finished point; `dqar report` reads them back. On disk a row is
the `dqar bench` record (`dqar.harness.bench`) plus the point's identity, settings and per-step profile:

    {"key", "name", "kind": "grid" | "baseline", "variant": null | a dqar.harness.baselines name,
     "grid": {field: value},
     "settings": {model, n, classes, steps, sampler, cfg_scale, seed, weights_sha256},
     "config": DQARConfig.to_dict(),
     "baseline": {ms_per_step, seconds, peak_mem_mb, runs}, "speedup", "ideal_speedup",
     "dqar": {ms_per_step, seconds, peak_mem_mb, cache_mb, reuse_events, reuse_fraction, runs},
     "quality": {fid_vs_baseline, fid_vs_data, psnr, ssim, accuracy},
     "profile": {entropy_per_step, snr_per_step, x0_snr_per_step, events_per_step, events_per_layer,
                 num_layers, compute_events, share_events, profile_n} | null,
     "samples": "<file name under the sidecar folder>" | null, "wall_s",
     "variant_settings" (variants only: the settings it ran with), "calls"}

`runs` (the seconds of every timed generation), `calls` (the share of attention, MLP and block calls the
point actually executed, counted by `dqar.harness.peers.count_module_calls`, so DQAR points and every
baseline sit on the same axes) and `variant_settings` (what a baseline variant ran with, its options
included) are absent from rows written before they existed: such rows load, their measured speedups simply
have no spread and their work share is unknown. `calls` is {attn, mlp, block}, each the executed calls over those an
uncached run of the same batch and steps makes, or null. The config stays a dict, not a
DQARConfig, so rows written by another version of the config still load. A row that misses a key,
holds one this version does not know, or holds a value of the wrong type is refused with its file, line
and key, never half-read.

The file that holds the rows (reading, appending, its lock, its samples folder) is `results_file`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

from dqar.method.schedules import live_fields


class RowError(ValueError):
    """A results-file row that does not fit the schema; the message names the key."""


def _name(where: str) -> str:
    """How a message names a place in the row: 'dqar.seconds', or the row itself."""
    return f"{where!r}" if where else "the row"


def _number(value, where: str, integer: bool = False):
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RowError(f"{_name(where)} must be {'an integer' if integer else 'a number'} or null, got {value!r}")
    return value


def _numbers(value, where: str):
    if value is None:
        return None
    if not isinstance(value, list):
        raise RowError(f"{_name(where)} must be a list of numbers or null, got {value!r}")
    return [_number(v, f"{where}[{i}]") for i, v in enumerate(value)]


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise RowError(f"{_name(where)} must be a JSON object, got {json.dumps(value)[:60]}")
    return value


def _text(value, where: str, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise RowError(f"{_name(where)} must be a string{' or null' if optional else ''}, got {value!r}")
    return value


def _check_keys(data: dict, where: str, known, required) -> None:
    for key in data:
        if key not in known:
            raise RowError(f"{_name(where)} has unknown key {key!r} (written by another version of dqar?); "
                           f"known: {', '.join(known)}")
    for key in required:
        if key not in data:
            raise RowError(f"{_name(where)} is missing key {key!r}")


@dataclass(frozen=True)
class _Block:
    """A flat block of numbers; subclasses list which keys are required and which are integers."""

    OPTIONAL = ("runs",)       # class constants, not fields (no annotation)
    INTEGERS = ()

    @classmethod
    def from_dict(cls, data, where: str):
        data = _object(data, where)
        names = [f.name for f in fields(cls)]
        _check_keys(data, where, names, [n for n in names if n not in cls.OPTIONAL])
        values = {}
        for name in names:
            v = data.get(name)
            if name == "runs":
                values[name] = tuple(_numbers(v, f"{where}.runs") or ())
            else:
                values[name] = _number(v, f"{where}.{name}", integer=name in cls.INTEGERS)
        return cls(**values)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if "runs" in out:
            if out["runs"]:
                out["runs"] = list(out["runs"])
            else:
                del out["runs"]       # rows from before runs were recorded round-trip unchanged
        return out


@dataclass(frozen=True)
class Timing(_Block):
    """The uncached reference's timing ("baseline"): medians, and every timed run when recorded."""

    ms_per_step: float | None = None
    seconds: float | None = None
    peak_mem_mb: float | None = None
    runs: tuple[float, ...] = ()


@dataclass(frozen=True)
class PointTiming(_Block):
    """The point's own timing and reuse ("dqar")."""

    INTEGERS = ("reuse_events",)

    ms_per_step: float | None = None
    seconds: float | None = None
    peak_mem_mb: float | None = None
    cache_mb: float | None = None
    reuse_events: int | None = None
    reuse_fraction: float | None = None
    runs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Quality(_Block):
    """Against the uncached samples of the same seeds, and (FID) against held-out data; null = not measured."""

    OPTIONAL = ()

    fid_vs_baseline: float | None = None
    fid_vs_data: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    accuracy: float | None = None


_LISTS = ("entropy_per_step", "snr_per_step", "x0_snr_per_step", "events_per_step", "events_per_layer")


@dataclass(frozen=True)
class Profile:
    """The controller's per-step record of the point (entropy measured on `profile_n` images)."""

    entropy_per_step: list | None = None
    snr_per_step: list | None = None
    x0_snr_per_step: list | None = None
    events_per_step: list | None = None
    events_per_layer: list | None = None
    num_layers: int | None = None
    compute_events: int | None = None
    share_events: int | None = None
    profile_n: int | None = None

    @classmethod
    def from_dict(cls, data, where: str) -> "Profile | None":
        if data is None:
            return None
        data = _object(data, where)
        _check_keys(data, where, [f.name for f in fields(cls)], ())
        return cls(**{k: (_numbers(v, f"{where}.{k}") if k in _LISTS else _number(v, f"{where}.{k}", integer=True))
                      for k, v in data.items()})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


CALL_KINDS = ("attn", "mlp", "block")


def _calls(value, where: str) -> dict | None:
    """A row's call shares: {"attn", "mlp", "block"}, each a share >= 0 (1 = every call an uncached run makes)
    or null (nothing of that kind was expected); the whole is null where nothing was counted."""
    if value is None:
        return None
    value = _object(value, where)
    _check_keys(value, where, CALL_KINDS, CALL_KINDS)
    for kind in CALL_KINDS:
        share = _number(value[kind], f"{where}.{kind}")
        if share is not None and not share >= 0.0:
            raise RowError(f"{_name(f'{where}.{kind}')} must be a share >= 0 or null, got {share!r}")
    return dict(value)


_REQUIRED = ("key", "name", "kind", "variant", "settings", "config", "baseline", "dqar", "speedup",
             "ideal_speedup", "quality")


@dataclass(frozen=True)
class SweepRow:
    """One finished sweep point (see the module docstring for the file layout)."""

    key: str
    name: str
    kind: str
    variant: str | None
    settings: dict
    config: dict
    baseline: Timing
    dqar: PointTiming
    speedup: float | None
    ideal_speedup: float | None
    quality: Quality
    grid: dict = field(default_factory=dict)
    profile: Profile | None = None
    samples: str | None = None
    wall_s: float | None = None
    variant_settings: dict | None = None
    calls: dict | None = None

    @classmethod
    def from_dict(cls, data) -> "SweepRow":
        """The row in `data` (a parsed JSON line); RowError naming the first key that does not fit."""
        data = _object(data, "")
        _check_keys(data, "", [f.name for f in fields(cls)], _REQUIRED)
        config = _object(data["config"], "config")
        _text(config.get("schedule"), "config.schedule")
        variant_settings = data.get("variant_settings")
        return cls(
            key=_text(data["key"], "key"), name=_text(data["name"], "name"), kind=_text(data["kind"], "kind"),
            variant=_text(data["variant"], "variant", optional=True),
            settings=_object(data["settings"], "settings"), config=config,
            baseline=Timing.from_dict(data["baseline"], "baseline"),
            dqar=PointTiming.from_dict(data["dqar"], "dqar"),
            speedup=_number(data["speedup"], "speedup"),
            ideal_speedup=_number(data["ideal_speedup"], "ideal_speedup"),
            quality=Quality.from_dict(data["quality"], "quality"),
            grid=_object(data.get("grid", {}), "grid"),
            profile=Profile.from_dict(data.get("profile"), "profile"),
            samples=_text(data.get("samples"), "samples", optional=True),
            wall_s=_number(data.get("wall_s"), "wall_s"),
            variant_settings=None if variant_settings is None else _object(variant_settings, "variant_settings"),
            calls=_calls(data.get("calls"), "calls"))

    def to_dict(self) -> dict:
        out = {"key": self.key, "name": self.name, "kind": self.kind, "variant": self.variant, "grid": self.grid,
               "settings": self.settings, "config": self.config, "baseline": self.baseline.to_dict(),
               "dqar": self.dqar.to_dict(), "speedup": self.speedup, "ideal_speedup": self.ideal_speedup,
               "quality": self.quality.to_dict(),
               "profile": None if self.profile is None else self.profile.to_dict(),
               "samples": self.samples, "wall_s": self.wall_s}
        if self.variant_settings is not None:
            out["variant_settings"] = self.variant_settings
        if self.calls is not None:
            out["calls"] = self.calls
        return out

    # ------------------------------------------------------------ reading
    @property
    def schedule(self) -> str:
        return self.config["schedule"]

    @property
    def is_reference(self) -> bool:
        """The uncached model itself (every speedup's denominator)."""
        return self.variant is None and self.schedule == "none"

    def live(self, name: str) -> bool:
        """Whether config field `name` can change this point's images (`dqar.method.schedules.live_fields`)."""
        return name in live_fields(self.config)

    def work_share(self) -> float | None:
        """The mean executed share of attention and MLP calls (1.0 = the uncached model's work), or None
        when the row has no call counts."""
        c = self.calls or {}
        if c.get("attn") is None or c.get("mlp") is None:
            return None
        return (c["attn"] + c["mlp"]) / 2

    def measured_range(self) -> tuple[float, float] | None:
        """(lowest, highest) speedup the timed runs allow: reference runs over point runs, every pairing.

        None unless both sides were timed at least twice: one run has no spread to show, so it is never
        presented as a speedup.
        """
        ref, own = self.baseline.runs, self.dqar.runs
        if len(ref) < 2 or len(own) < 2 or min(own) <= 0:
            return None
        return min(ref) / max(own), max(ref) / min(own)
