"""Attention entropies measured during a step, turned into numbers in one batched pass when first read.

On a small model every tensor op costs its dispatch (15-25 us on the project's CPU) whatever its size, so
the entropy's dozen ops per attention call were most of what the gate and the policy cost (issue 17,
bullet 4). The part that needs q and k, the sampled rows' logits, runs in the hook; the softmax, the log
and the means run here once per step over every layer's logits. Nobody reads an entropy of the step it
is measured in (the gate and the policy plan the next step from it), so waiting changes no decision; and
softmax works per row, so the values are those of the per-call computation.
"""
from __future__ import annotations

import torch

from .stats import logits_entropy


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
            batch = [items[i][0] for i in members]
            values = logits_entropy(batch[0] if len(batch) == 1 else torch.cat(batch)).tolist()
            start = 0
            for i in members:
                n = items[i][0].shape[0]
                rows[i], start = values[start:start + n], start + n
        out = []
        for (_, parts), values in zip(items, rows):
            per = len(values) // len(parts)
            for j, (layer, branch, entry) in enumerate(parts):
                chunk = values[j * per:(j + 1) * per]
                out.append((layer, branch, entry, sum(chunk) / len(chunk)))
        return out
