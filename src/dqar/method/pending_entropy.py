"""Attention entropies measured during a step, turned into numbers in one batched pass when first read.

On a small model every tensor op costs its dispatch (15-25 us on the project's CPU) whatever its size, so
the entropy's dozen ops per attention call were most of what the gate and the policy cost (issue 17,
bullet 4). The part that needs q and k, the sampled rows' logits, runs in the hook; the softmax, the log
and the means run here once per step over every layer's logits. Nobody reads an entropy of the step it
is measured in (the gate and the policy plan the next step from it), so waiting changes no decision; and
softmax works per row, so the values are those of the per-call computation. Batches stay within about
a megabyte: the softmax, log and means are half a dozen passes over their input, and past the CPU's cache
each pass goes to memory (twelve layers of 40 images' logits in one batch took 4x their separate time).

With `entropy_images` on a small call even the logits wait: the hook queues views of q and k (`QKRows`) and
the step's calls of one shape become their logits with one stack each of q and k, one row gather and one
product, instead of four ops per call. The views keep each call's projection alive until then, so only calls
whose kept part is small are queued, and the queue is resolved early once it holds more than HELD_BYTES.
"""
from __future__ import annotations

import torch

from .stats import QKRows, logits_entropy, stacked_logits

BATCH_ELEMENTS = 1 << 18            # float32 logits per batched pass: 1 MiB
# A call's kept q (images x heads x tokens x head dim) up to this many elements waits as views: above it the
# tensors are large enough that their ops cost their size, not their dispatch (embedded model, 2 images per
# branch: 32,768; DiT-B/2 at 2 images: 786,432).
DEFER_ELEMENTS = 1 << 16
HELD_BYTES = 1 << 27                # projections the queued views keep alive, about


class PendingEntropies:
    def __init__(self):
        # (logits (n, H, r, T) or the QKRows to form them from, parts): the batch rows split into len(parts)
        # equal parts, one per CFG branch, each part's mean the entropy of (layer, branch); entry: the cache
        # entry that records it.
        self._items: list[tuple[torch.Tensor | QKRows, list[tuple[int, str, object]]]] = []
        self._held = 0

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def defers(q: torch.Tensor, images: int, groups: int) -> bool:
        """Whether a call's logits should wait as QKRows (small, and with a version counter to check)."""
        return (0 < images and not q.is_inference()
                and groups * images * q.shape[1] * q.shape[2] * q.shape[3] <= DEFER_ELEMENTS)

    def add(self, logits: torch.Tensor | QKRows, parts: list[tuple[int, str, object]]) -> None:
        rows = logits.batch if isinstance(logits, QKRows) else logits.shape[0]
        if rows % len(parts):
            raise ValueError(f"{rows} logit rows do not split into {len(parts)} branches")
        if isinstance(logits, QKRows):
            # What the views keep alive: the projection behind q and k (a fused qkv: three times q).
            self._held += 3 * logits.q.numel() * logits.q.element_size()
            if self._held > HELD_BYTES:
                # Rare (a large model's small calls): form what is queued now, one call at a time.
                self._items = [(stacked_logits([it])[0] if isinstance(it, QKRows) else it, p)
                               for it, p in self._items]
                self._held = 0
                logits = stacked_logits([logits])[0]
        self._items.append((logits, parts))

    def has_layer(self, layer: int) -> bool:
        return any(part[0] == layer for _, parts in self._items for part in parts)

    def clear(self) -> None:
        self._items, self._held = [], 0

    def resolve(self) -> list[tuple[int, str, object, float]]:
        """(layer, branch, entry, entropy) of every pending part, in the order they were added; clears."""
        items, self._items, self._held = self._items, [], 0
        rows: list[list[float] | None] = [None] * len(items)
        same_shape: dict[tuple, list[int]] = {}
        calls: dict[tuple, list[int]] = {}
        for i, (logits, _) in enumerate(items):
            if isinstance(logits, QKRows):
                calls.setdefault(logits.kind(), []).append(i)
            else:
                same_shape.setdefault((tuple(logits.shape[1:]), logits.device, logits.dtype), []).append(i)
        for members in calls.values():
            for batch in _within_budget(members, [items[i][0].logits_numel for i in members]):
                formed = stacked_logits([items[i][0] for i in batch])              # (M, n, H, r, T)
                values = logits_entropy(formed.flatten(0, 1)).tolist()
                n = formed.shape[1]
                for j, i in enumerate(batch):
                    rows[i] = values[j * n:(j + 1) * n]
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
