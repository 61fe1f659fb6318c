"""Attention entropies measured during a step, turned into numbers in one batched pass when first read.

On a small model every tensor op costs its dispatch (15-25 us on the project's CPU) whatever its size, so
the entropy's dozen ops per attention call were most of what the gate and the policy cost (issue 17,
bullet 4). The part that needs q and k, the sampled rows' logits, runs in the hook; the softmax, the log
and the means run here once per step over every layer's logits. Nobody reads an entropy of the step it
is measured in (the gate and the policy plan the next step from it), so waiting changes no decision; and
softmax works per row, so the values are those of the per-call computation. Batches stay within about
a megabyte: the softmax, log and means are half a dozen passes over their input, and past the CPU's cache
each pass goes to memory (twelve layers of 40 images' logits in one batch took 4x their separate time).
"""
from __future__ import annotations

import torch

from .stats import logits_entropy

BATCH_ELEMENTS = 1 << 18            # float32 logits per batched pass: 1 MiB


class PendingEntropies:
    def __init__(self):
        # (logits (n, H, r, T), parts): the batch rows split into len(parts) equal parts, one per CFG
        # branch, each part's mean the entropy of (layer, branch); entry: the cache entry that records it.
        self._items: list[tuple[torch.Tensor, list[tuple[int, str, object]]]] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, logits: torch.Tensor, parts: list[tuple[int, str, object]]) -> None:
        if logits.shape[0] % len(parts):
            raise ValueError(f"{logits.shape[0]} logit rows do not split into {len(parts)} branches")
        self._items.append((logits, parts))

    def has_layer(self, layer: int) -> bool:
        return any(part[0] == layer for _, parts in self._items for part in parts)

    def clear(self) -> None:
        self._items = []

    def resolve(self) -> list[tuple[int, str, object, float]]:
        """(layer, branch, entry, entropy) of every pending part, in the order they were added; clears."""
        items, self._items = self._items, []
        rows: list[list[float] | None] = [None] * len(items)
        same_shape: dict[tuple, list[int]] = {}
        for i, (logits, _) in enumerate(items):
            same_shape.setdefault((tuple(logits.shape[1:]), logits.device, logits.dtype), []).append(i)
        for members in same_shape.values():
            for batch in _within_budget(members, [items[i][0].numel() for i in members]):
                logits = [items[i][0] for i in batch]
                values = logits_entropy(logits[0] if len(logits) == 1 else torch.cat(logits)).tolist()
                start = 0
                for i in batch:
                    n = items[i][0].shape[0]
                    rows[i], start = values[start:start + n], start + n
        out = []
        for (_, parts), values in zip(items, rows):
            per = len(values) // len(parts)
            for j, (layer, branch, entry) in enumerate(parts):
                chunk = values[j * per:(j + 1) * per]
                out.append((layer, branch, entry, sum(chunk) / len(chunk)))
        return out


def _within_budget(members: list[int], sizes: list[int]) -> list[list[int]]:
    """`members` in order, cut into runs whose sizes sum to at most BATCH_ELEMENTS (one member at least)."""
    batches, current, total = [], [], 0
    for member, size in zip(members, sizes):
        if current and total + size > BATCH_ELEMENTS:
            batches.append(current)
            current, total = [], 0
        current.append(member)
        total += size
    if current:
        batches.append(current)
    return batches
