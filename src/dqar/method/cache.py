"""The reuse cache: one entry per (layer, branch, target), stored as computed or quantized, with byte accounting."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CacheEntry:
    """What one (layer, branch, target) computed last, and when."""

    layer: int
    branch: str
    target: str
    step: int
    output: object | None = None   # stored output F(s2) (output mode; a block's residual for the block target)
    keys: object | None = None     # stored K (kv mode)
    values: object | None = None   # stored V (kv mode)
    entropy: float | None = None
    d1: object | None = None       # stored first divided difference (forecast order >= 1; dqar.method.forecast)
    d2: object | None = None       # stored second divided difference (forecast order 2)
    steps: tuple = ()              # step positions of the computed outputs the differences cover, oldest first

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in (self.output, self.keys, self.values, self.d1, self.d2) if p is not None)


@dataclass
class ReuseCache:
    """Entries keyed by (layer, branch, target); tracks current and peak bytes."""

    entries: dict = field(default_factory=dict)
    bytes: int = 0
    peak_bytes: int = 0

    def get(self, layer: int, branch: str, target: str) -> CacheEntry | None:
        return self.entries.get((layer, branch, target))

    def put(self, entry: CacheEntry) -> None:
        key = (entry.layer, entry.branch, entry.target)
        old = self.entries.get(key)
        if old is not None:
            self.bytes -= old.nbytes
        self.entries[key] = entry
        self.bytes += entry.nbytes
        self.peak_bytes = max(self.peak_bytes, self.bytes)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
        self.peak_bytes = 0
