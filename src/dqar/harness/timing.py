"""Interleaved wall-clock timing and peak memory for a baseline and its candidates.

Contenders run in alternation after warm-up runs, so slow drift of the machine (thermal throttling,
other processes, CPU frequency) lands on all of them alike instead of on whichever ran last; the
median over rounds ignores the odd outlier. Each round starts one contender later (A, B, C | B, C, A |
C, A, B ...), so a position effect (running first after the previous round's largest allocation, or
always after the same neighbour) does not land on one contender only. On CUDA the device is
synchronized before and after each timed region, since kernel launches return before the work ends.

Peak memory, per call, outside the timed region:
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`: bytes held by tensors on the
  device at the peak, model weights included (method "cuda_max_allocated").
- CPU on Linux: peak resident set growth over the call. The kernel's high-water mark (VmHWM) is reset
  through /proc/self/clear_refs and freed heap is handed back with glibc's malloc_trim first, so each
  call's peak reflects its own allocations (activations, caches), not an earlier run's; weights loaded
  before the call are not counted (method "rss_peak_delta").
- Elsewhere: growth of `resource.getrusage` ru_maxrss, which never goes down, so runs after the first
  largest one read 0 (method "ru_maxrss_delta"; a lower bound).
"""
from __future__ import annotations

import ctypes
import gc
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch


@dataclass
class Contender:
    """A timed callable with untimed per-call setup (before) and teardown (gets the call's output)."""

    fn: Callable[[], Any]
    setup: Callable[[], Any] | None = None
    teardown: Callable[[Any], Any] | None = None


@dataclass
class TimingResult:
    """All timed samples (seconds) of one contender, their median and the largest per-call peak memory."""

    name: str
    samples: list[float] = field(default_factory=list)
    peak_mem_bytes: int | None = None
    memory_method: str | None = None
    last_output: Any = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


# ------------------------------------------------------------------------------------------------
# memory probes
# ------------------------------------------------------------------------------------------------

def _read_status_kib(keys: tuple[str, ...]) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in keys:
                out[name] = int(rest.split()[0])
    return out


_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def _can_reset_hwm() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return "VmHWM" in _read_status_kib(("VmHWM",))
    except OSError:
        return False


class MemoryProbe:
    """Measures one call's peak memory; `start()` before the call, `stop()` after (bytes)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.method = "cuda_max_allocated"
        elif _can_reset_hwm():
            self.method = "rss_peak_delta"
        else:
            self.method = "ru_maxrss_delta"
        self._base = 0

    def start(self) -> None:
        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        gc.collect()
        if self.method == "rss_peak_delta":
            _malloc_trim()
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")                       # VmHWM := current VmRSS
            self._base = _read_status_kib(("VmRSS",))["VmRSS"] * 1024
        else:
            self._base = self._maxrss_bytes()

    def stop(self) -> int:
        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.method == "rss_peak_delta":
            return max(0, _read_status_kib(("VmHWM",))["VmHWM"] * 1024 - self._base)
        return max(0, self._maxrss_bytes() - self._base)

    @staticmethod
    def _maxrss_bytes() -> int:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)   # macOS reports bytes, Linux KiB


# ------------------------------------------------------------------------------------------------
# interleaved timing
# ------------------------------------------------------------------------------------------------

def _as_contender(name: str, value) -> Contender:
    if isinstance(value, Contender):
        return value
    if callable(value):
        return Contender(fn=value)
    raise TypeError(f"contender {name!r} is a {type(value).__name__}: expected a callable or a Contender")


def dqar_contender(model, config, run: Callable[[], Any], summaries: dict, name: str,
                   check: Callable[[Any], None] | None = None) -> Contender:
    """`run` with DQAR applied to `model` under `config`: applied before each call and removed after it
    (untimed), the controller's summary kept in `summaries[name]`; `check(output)` runs last."""
    from dqar.method.hooks import apply_dqar, remove_dqar

    holder = {}

    def setup():
        holder["ctl"] = apply_dqar(model, config)

    def teardown(output):
        summaries[name] = holder["ctl"].summary()
        remove_dqar(model)
        if check is not None:
            check(output)

    return Contender(fn=run, setup=setup, teardown=teardown)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_timing(contenders: Mapping[str, Callable[[], Any] | Contender], *, rounds: int,
                       warmup_runs: int = 1, device: torch.device | str | None = None,
                       measure_memory: bool = True) -> dict[str, TimingResult]:
    """Run every contender `warmup_runs` times, then `rounds` timed times, alternating.

    Warm-up follows the given order; timed round r starts at contender r mod n and wraps around.
    Returns {name: TimingResult} in the same order. Setup and teardown are excluded from the times;
    the memory probe brackets only the call itself.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} is not allowed: must be an integer >= 1")
    if isinstance(warmup_runs, bool) or not isinstance(warmup_runs, int) or warmup_runs < 0:
        raise ValueError(f"warmup_runs={warmup_runs!r} is not allowed: must be an integer >= 0")
    if not contenders:
        raise ValueError("interleaved_timing needs at least one contender")
    items = [(name, _as_contender(name, value)) for name, value in contenders.items()]
    dev = torch.device(device) if device is not None else None
    probe = MemoryProbe(dev or torch.device("cpu")) if measure_memory else None
    results = {name: TimingResult(name, memory_method=probe.method if probe else None) for name, _ in items}

    def call(name: str, c: Contender, timed: bool) -> None:
        if c.setup is not None:
            c.setup()
        if probe is not None and timed:
            probe.start()
        _sync(dev)
        t0 = time.perf_counter()
        out = c.fn()
        _sync(dev)
        elapsed = time.perf_counter() - t0
        res = results[name]
        if timed:
            res.samples.append(elapsed)
            if probe is not None:
                peak = probe.stop()
                res.peak_mem_bytes = peak if res.peak_mem_bytes is None else max(res.peak_mem_bytes, peak)
        res.last_output = out
        if c.teardown is not None:
            c.teardown(out)

    for _ in range(warmup_runs):
        for name, c in items:
            call(name, c, timed=False)
    for r in range(rounds):
        start = r % len(items)
        for name, c in items[start:] + items[:start]:
            call(name, c, timed=True)
    return results
