"""The reuse cache: one entry per (layer, branch, target), stored exact or quantized, with byte accounting."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class Exact:
    """An unquantized cache payload: the tensor itself, returned as is (bit-identical reuse)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def dequantize(self) -> torch.Tensor:
        return self.tensor

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def encode(x: torch.Tensor, bits: int, granularity: str, salient: torch.Tensor | None = None):
    """Store `x` at `bits` (16 = as computed); anything stored has .dequantize() and .nbytes."""
    if bits == 16:
        # A strided view (K out of a fused qkv projection) would pin the whole projection buffer,
        # 3x what nbytes reports; a contiguous copy is still bit-identical and keeps the bytes honest.
        return Exact(x if x.is_contiguous() else x.contiguous())
    from .quant import store

    return store(x, bits, granularity, salient)


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
