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
    output: object | None = None   # stored output (output mode)
    keys: object | None = None     # stored K (kv mode)
    values: object | None = None   # stored V (kv mode)
    entropy: float | None = None

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in (self.output, self.keys, self.values) if p is not None)


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
