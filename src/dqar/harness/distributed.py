"""Sharding, process-group and merging helpers for multi-process sampling (torchrun + torch.distributed).

The unit of work is a *global batch*: indices [b*B, (b+1)*B) of the sample set. Batches, not single
images, are dealt to ranks, so every image is computed in the same batch whatever the number of
processes. That keeps image k bit-identical for any world size even when batched kernels are not
row-independent, and even when a DQAR gate reads batch statistics.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job; `world_size == 1` and `initialized_here=False` without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer (set by torchrun)") from None


def backend_for(device_type: str) -> str:
    """nccl for CUDA tensors, gloo otherwise (CPU)."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(device_type: str = "cpu") -> DistInfo:
    """Join the torchrun job if there is one; a lone process (no WORLD_SIZE, or 1) gets no process group."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} / WORLD_SIZE={world} from the environment are inconsistent")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), False)
    if world == 1:
        return DistInfo(0, 1, local_rank, None, False)
    from datetime import timedelta

    backend = backend_for(device_type)
    # Ranks meet only at the start and after their last batch; loading a large model or an uneven last
    # round of batches can take longer than NCCL's 10-minute default.
    timeout = timedelta(minutes=60)
    if backend == "nccl":
        import torch

        # Each rank must own its GPU before NCCL starts, or all ranks pile onto cuda:0.
        torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=timeout, device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group(backend, timeout=timeout)
    return DistInfo(rank, world, local_rank, backend, True)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        import torch.distributed as dist

        if info.backend == "nccl":
            import torch

            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def sum_int(info: DistInfo, value: int) -> int:
    """Sum an integer over all ranks (a tensor all_reduce: no pickled objects cross processes)."""
    if info.world_size == 1:
        return int(value)
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else torch.device("cpu")
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def shutdown(info: DistInfo) -> None:
    if info.initialized_here:
        import torch.distributed as dist

        dist.destroy_process_group()


def global_batches(num_samples: int, batch_size: int) -> list[range]:
    """Index ranges of every global batch; the last one may be short."""
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples} is not allowed: must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not allowed: must be >= 1")
    return [range(s, min(s + batch_size, num_samples)) for s in range(0, num_samples, batch_size)]


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """Round-robin share of `items` for `rank` (items[rank::world_size])."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    return list(items[rank::world_size])


def sample_seeds(base_seed: int, indices: Iterable[int]) -> list[int]:
    """One seed per sample: base_seed + global index, so the set does not depend on the number of ranks."""
    return [int(base_seed) + int(i) for i in indices]


# ----------------------------------------------------------------------------- summaries

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sum(a, b, key: str):
    """Element-wise sum of two counters of the same kind (numbers, or per-layer / per-step lists)."""
    if _is_number(a) and _is_number(b):
        return a + b
    if isinstance(a, list) and isinstance(b, list):
        longest, shortest = (a, b) if len(a) >= len(b) else (b, a)
        return [_sum(x, shortest[i], key) if i < len(shortest) else x for i, x in enumerate(longest)]
    raise ValueError(f"cannot merge summary field {key!r}: values {a!r} and {b!r} differ in kind")


def _weighted_mean(values: Sequence, weights: Sequence[float]):
    """Mean of numbers, or element-wise mean of lists, skipping None (a step with nothing measured)."""
    if all(isinstance(v, list) for v in values):
        length = max(len(v) for v in values)
        return [_weighted_mean([v[i] if i < len(v) else None for v in values], weights) for i in range(length)]
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None]
    if not pairs:
        return None
    if not all(_is_number(v) for v, _ in pairs):
        raise ValueError(f"cannot average summary values {values!r}")
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total


def merge_summaries(summaries: Sequence[Mapping]) -> dict:
    """Merge controller summaries of several generations (global batches, ranks) into one.

    Counts (`*events*` fields: `reuse_events`, `events_per_layer`, `events_per_step`, ... and `images`) are
    summed; byte fields are the peak, since caches of different processes and batches never coexist;
    `reuse_fraction` is recomputed from the summed counts; `ideal_speedup` is combined as total work over
    total remaining work (exact when every image costs the same FLOPs); other per-step measurements
    (entropy, SNR) are averaged weighted by each summary's `images` (1 if absent). Fields that are not
    numbers (the config) must agree.
    """
    if not summaries:
        return {}
    weights = [float(s.get("images", 1) or 1) for s in summaries]
    merged: dict = {}
    for key in dict.fromkeys(k for s in summaries for k in s):
        present = [(s[key], w) for s, w in zip(summaries, weights) if key in s]
        values = [v for v, _ in present]
        ws = [w for _, w in present]
        if "events" in key or key == "images":
            acc = values[0]
            for v in values[1:]:
                acc = _sum(acc, v, key)
            merged[key] = acc
        elif key.endswith("bytes"):
            merged[key] = max(values)
        elif key == "ideal_speedup":
            pairs = [(v, w) for v, w in present if v]
            merged[key] = (sum(w for _, w in pairs) / sum(w / v for v, w in pairs)) if pairs else None
        elif all(v == values[0] for v in values[1:]):
            merged[key] = values[0]
        elif all(v is None or _is_number(v) or isinstance(v, list) for v in values):
            merged[key] = _weighted_mean(values, ws)
        else:
            raise ValueError(f"summary field {key!r} differs between generations: {values[0]!r} vs {values[1]!r}")
    if "reuse_events" in merged and "compute_events" in merged:
        decided = merged["reuse_events"] + merged["compute_events"]
        merged["reuse_fraction"] = merged["reuse_events"] / decided if decided else 0.0
    return merged


def write_json(path: str | Path, data) -> Path:
    """Write JSON atomically (temp file + rename) so a killed process never leaves half a file to resume from."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_json_files(paths: Iterable[str | Path]) -> list[dict]:
    """JSON objects from files; a file that is not JSON, or holds anything but an object, is a ValueError naming it."""
    out = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{p} is not valid JSON ({exc}); delete it to regenerate that batch") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p} holds a JSON {type(data).__name__}, not an object of batch stats; delete it to "
                             "regenerate that batch")
        out.append(data)
    return out


# ----------------------------------------------------------------------------- images

def png_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"{index:06d}.png"


def save_png(array: np.ndarray, path: str | Path) -> None:
    """(H, W, C) uint8 to PNG, via a temp file so a half-written PNG never counts as done on resume."""
    from PIL import Image

    if array.dtype != np.uint8 or array.ndim != 3:
        raise ValueError(f"expected an (H, W, C) uint8 image, got dtype {array.dtype} shape {array.shape}")
    path = Path(path)
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.png")
    img.save(tmp)
    os.replace(tmp, path)


def load_png(path: str | Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img)
    return arr[..., None] if arr.ndim == 2 else arr  # (H, W, C)


def write_npz(folder: str | Path, num_samples: int, path: str | Path) -> tuple[int, ...]:
    """Stack PNGs 0..num_samples-1 (in index order) into the ADM evaluator's format: `arr_0`, uint8 NHWC."""
    folder = Path(folder)
    missing = [i for i in range(num_samples) if not png_path(folder, i).exists()]
    if missing:
        raise ValueError(f"cannot write {path}: {len(missing)} of {num_samples} images are missing "
                         f"(first: {png_path(folder, missing[0])})")
    first = load_png(png_path(folder, 0))
    # Preallocate: at 50k x 256x256x3 the stack is ~9.8 GB, and a list-then-stack would need it twice.
    arr = np.empty((num_samples, *first.shape), dtype=np.uint8)
    arr[0] = first
    for i in range(1, num_samples):
        img = load_png(png_path(folder, i))
        if img.shape != first.shape:
            raise ValueError(f"{png_path(folder, i)} has shape {img.shape}, image 0 has {first.shape}")
        arr[i] = img
    path = Path(path)
    tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
    np.savez(tmp, arr_0=arr)
    os.replace(tmp, path)
    return arr.shape
