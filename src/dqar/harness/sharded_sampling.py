"""Sharded sample generation to a folder: PNGs by global index, an ADM-format .npz and merged reuse stats.

Run it as `dqar sample ...` (one process) or `torchrun --nproc_per_node N -m dqar.harness.sharded_sampling ...` (N processes,
same options). Sample k uses seed `seed + k` and is computed in global batch k // batch_size whichever
rank gets that batch, so the set is identical for any N. A re-run computes only batches that are not done (a
PNG missing or, under DQAR, the stats record missing) and writes only the missing PNGs (resume). As in
`dqar generate`, the label list is class-major:
`per_item` samples of the first class, then of the second, and so on (`--per-class 50` over ImageNet's 1000
classes is the balanced FID-50K set).

Folder layout:
    run.json               the settings; a re-run with different settings into the same folder is refused
    images/000000.png ...  one PNG per sample, named by global index
    stats/batch_000000.json  the controller summary of each global batch (under DQAR), written atomically after
                           the batch's PNGs: it is the batch's completion record, so a batch killed between its
                           PNGs and its stats is computed again on resume
    samples.npz            `arr_0`: uint8 (N, H, W, C) in index order, the ADM evaluator's input
    reuse_stats.json       the per-batch summaries merged (event counts summed)

The library part (`SampleJob`, `run_job`, `folder_name`) takes a built model; only running this module as a
script goes through the `dqar` CLI, which parses options and loads the model.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .distributed import (DistInfo, barrier, global_batches, merge_summaries, png_path, read_json_files,
                          sample_seeds, save_png, shard, sum_int, write_json, write_npz)

KINDS = ("dit", "hub-dit", "pixart", "text")
TEXT_KINDS = ("pixart", "text")    # "text": SD3, Flux, Sana, HunyuanDiT (dqar.models.pipelines)
# dqar.sampling.sample's seed range (within torch.Generator.manual_seed's); sample k's seed is seed + k, so
# every one of them must fit, or the run would stop at the first batch past the limit.
SEED_MIN, SEED_MAX = 0, 2**63 - 1
NPZ_NAME = "samples.npz"
STATS_NAME = "reuse_stats.json"
RUN_NAME = "run.json"


@dataclass(frozen=True)
class SampleJob:
    """Everything that decides the images: sample k has seed `seed + k` and label/prompt `k // per_item`."""

    model: str
    kind: str
    num_samples: int
    steps: int = 50
    sampler: str = "ddim"
    cfg_scale: float = 1.5
    seed: int = 0
    batch_size: int = 16
    per_item: int = 1
    labels: tuple[int, ...] = ()
    prompts: tuple[str, ...] = ()
    negative_prompt: str = ""
    dtype: str = "float32"
    dqar: dict | None = field(default=None)
    # Text pipelines' other call options that decide the images (height, width, guidance_scale,
    # max_sequence_length), as sorted (name, value) pairs; empty for the kinds that have none.
    options: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"SampleJob.kind={self.kind!r} is not known; allowed: {', '.join(KINDS)}")
        for name in ("num_samples", "steps", "batch_size", "per_item"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: must be an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} is not allowed: must be an integer")
        if self.seed < SEED_MIN or self.seed + self.num_samples - 1 > SEED_MAX:
            raise ValueError(f"seed={self.seed} is not allowed: samples use seeds {self.seed}.."
                             f"{self.seed + self.num_samples - 1}, and seeds are integers in [0, 2**63 - 1]")
        text = self.kind in TEXT_KINDS
        if text and not self.prompts:
            raise ValueError(f"a text-to-image model ({self.model}) needs at least one prompt (--prompt or --prompts-file)")
        if not text and not self.labels:
            raise ValueError(f"a class-conditional model ({self.model}) needs at least one class label")
        if not text and self.prompts:
            raise ValueError(f"{self.model} is class-conditional: prompts are not allowed")
        if text and self.labels:
            raise ValueError(f"{self.model} is text-conditional: class labels are not allowed")
        if self.options and not text:
            raise ValueError(f"{self.model} is class-conditional: options {dict(self.options)} are for text pipelines")

    def identity(self) -> dict:
        """The settings that decide image k (num_samples only decides how many there are)."""
        return {"model": self.model, "kind": self.kind, "steps": self.steps, "sampler": self.sampler,
                "cfg_scale": float(self.cfg_scale), "seed": self.seed, "batch_size": self.batch_size,
                "per_item": self.per_item, "labels": list(self.labels), "prompts": list(self.prompts),
                "negative_prompt": self.negative_prompt, "dtype": self.dtype, "dqar": self.dqar,
                # Only where set, so the identity (and folder) of a run without options stays what it was.
                **({"options": dict(self.options)} if self.options else {})}

    def label(self, index: int) -> int:
        return self.labels[(index // self.per_item) % len(self.labels)]

    def prompt(self, index: int) -> str:
        return self.prompts[(index // self.per_item) % len(self.prompts)]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "model"


def folder_name(job: SampleJob) -> str:
    """`{model}-{sampler}{steps}-cfg{cfg}-seed{seed}-{dqar}-{hash}`: readable parts plus a hash of every setting."""
    model = job.model
    path = Path(model)
    if path.exists():
        model = path.stem if path.is_file() else path.name
    model = _slug(model.replace("/", "--"))
    dqar = "nodqar" if job.dqar is None else f"dqar-{job.dqar.get('schedule', 'custom')}"
    digest = hashlib.sha1(json.dumps(job.identity(), sort_keys=True).encode()).hexdigest()[:10]
    return f"{model}-{job.sampler}{job.steps}-cfg{job.cfg_scale:g}-seed{job.seed}-{dqar}-{digest}"


@dataclass
class RunResult:
    out_dir: Path
    written: int          # PNGs written by this run, all ranks together
    skipped: int          # samples already on disk when the run started
    npz_shape: tuple | None
    stats: dict | None
    seconds: float


def _check_layout(out_dir: Path, with_stats: bool) -> None:
    """Refuse, before any work, a folder whose fixed names are taken by the wrong kind of entry."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {str(out_dir)!r} is an existing file, not a folder")
    ancestor = out_dir
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"output folder {str(out_dir)!r} cannot be created: {str(ancestor)!r} is a file")
    folders = ["images"] + (["stats"] if with_stats else [])
    for name in folders:
        path = out_dir / name
        if path.exists() and not path.is_dir():
            raise ValueError(f"{str(path)!r} is a file, but this run keeps its {name} there as a folder; move it")
    for name in (RUN_NAME, NPZ_NAME, STATS_NAME):
        path = out_dir / name
        if path.is_dir():
            raise ValueError(f"{str(path)!r} is a folder, but this run writes its {name} file there; move it")


def _check_run_file(out_dir: Path, job: SampleJob) -> None:
    run_file = out_dir / RUN_NAME
    if not run_file.exists():
        return
    try:
        record = json.loads(run_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{run_file} is not valid JSON; delete it (or the folder) to start again") from None
    previous = record.get("identity") if isinstance(record, dict) else None
    if not isinstance(previous, dict):
        found = type(record).__name__ if not isinstance(record, dict) else f"'identity' {type(previous).__name__}"
        raise ValueError(f"{run_file} holds a JSON {found}, not a run record written by `dqar sample` (an object "
                         "with an 'identity' object); delete it (or pass another --out) to start again")
    current = json.loads(json.dumps(job.identity()))
    diff = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
    if diff:
        key = diff[0]
        raise ValueError(f"{out_dir} holds a run with different settings ({key}: {previous.get(key)!r} there, "
                         f"{current.get(key)!r} now); pass another --out or the same settings to resume")


def _take_summary(controller) -> dict:
    """This batch's controller summary; the controller is reset so the next batch's counts start from zero."""
    summary = dict(controller.summary())
    reset = getattr(controller, "reset", None)
    if callable(reset):
        reset()
    return summary


# generate(global indices, seeds) -> uint8 (N, H, W, C) tensor or array
Generate = Callable[[Sequence[int], Sequence[int]], Any]


def _run_batches(job: SampleJob, generate: Generate, mine: Sequence[int], batches: Sequence[range], images_dir: Path,
                 stats_dir: Path, controller, bar) -> int:
    """Compute this rank's batches; returns the PNGs written. Each batch ends with its completion record."""
    written = 0
    for b in mine:
        indices = list(batches[b])
        images = generate(indices, sample_seeds(job.seed, indices))
        arr = images.numpy() if hasattr(images, "numpy") else images
        if arr.shape[0] != len(indices):
            raise RuntimeError(f"generate returned {arr.shape[0]} images for a batch of {len(indices)}")
        for row, i in enumerate(indices):
            path = png_path(images_dir, i)
            if not path.exists():
                save_png(arr[row], path)
                written += 1
        if controller is not None:
            summary = _take_summary(controller)
            summary["images"] = len(indices)
            # Last write of the batch, atomic (temp file + rename): until it lands the batch is not done.
            write_json(batch_record(stats_dir, b), summary)
        if bar is not None:
            bar.update(1)
    return written


def batch_record(stats_dir: Path, batch: int) -> Path:
    return stats_dir / f"batch_{batch:06d}.json"


def _batch_done(images_dir: Path, stats_dir: Path, batch: int, indices: range, with_stats: bool) -> bool:
    """A batch is done when all its PNGs exist and, under DQAR, its stats record (written last, atomically)."""
    if any(not png_path(images_dir, i).exists() for i in indices):
        return False
    return not with_stats or batch_record(stats_dir, batch).is_file()


def run_job(job: SampleJob, generate: Generate, out_dir: str | Path, info: DistInfo = DistInfo(), *,
            controller=None, log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
            progress: bool = False) -> RunResult:
    """Generate the job's samples into `out_dir` on this rank's share of the global batches.

    `generate(indices, seeds)` returns uint8 (N, H, W, C) for those global indices (the caller binds the model,
    labels or prompts). Every rank must call this with the same job; rank 0 writes the npz and merged stats.
    A batch counts as done only when its last write landed: its PNGs, then (under DQAR) its stats record, so a
    run killed anywhere inside a batch computes that batch again on resume. `progress` shows a bar over this
    rank's batches, with an ETA, on rank 0.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    images_dir, stats_dir = out_dir / "images", out_dir / "stats"
    with_stats = controller is not None
    _check_layout(out_dir, with_stats)
    _check_run_file(out_dir, job)
    if info.is_main:
        images_dir.mkdir(parents=True, exist_ok=True)
        if controller is not None:
            stats_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / RUN_NAME, {"identity": job.identity(), "num_samples": job.num_samples,
                                        "world_size": info.world_size})
    batches = global_batches(job.num_samples, job.batch_size)
    # Every rank scans before any rank writes, so all ranks agree on the to-do list.
    barrier(info)
    todo = [b for b, idx in enumerate(batches) if not _batch_done(images_dir, stats_dir, b, idx, with_stats)]
    missing_at_start = sum(1 for idx in batches for i in idx if not png_path(images_dir, i).exists())
    barrier(info)
    mine = shard(todo, info.rank, info.world_size)
    if info.is_main:
        log(f"{job.num_samples} samples in {len(batches)} batches of {job.batch_size}: "
            f"{len(todo)} batches to do on {info.world_size} process(es), "
            f"{job.num_samples - missing_at_start} samples already done -> {out_dir}")
    bar = None
    if progress and info.is_main and mine:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc="sample" if info.world_size == 1 else "sample (rank 0)", unit="batch",
                   file=sys.stderr)
    try:
        written = _run_batches(job, generate, mine, batches, images_dir, stats_dir, controller, bar)
    finally:
        if bar is not None:
            bar.close()
    total_written = sum_int(info, written)
    barrier(info)
    npz_shape = stats = None
    if info.is_main:
        npz_shape = write_npz(images_dir, job.num_samples, out_dir / NPZ_NAME)
        if controller is not None:
            files = [batch_record(stats_dir, b) for b in range(len(batches))]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                # Every rank computes a batch until its record lands, so only a rank that failed leaves a gap.
                log(f"warning: {len(missing)} batches have no reuse stats (first: {missing[0]}): a process "
                    "stopped before finishing them; run the same command again to compute them")
            stats = merge_summaries(read_json_files([f for f in files if f.exists()]))
            stats["batches"] = len(files) - len(missing)
            write_json(out_dir / STATS_NAME, stats)
        log(f"wrote {total_written} new images; {out_dir / NPZ_NAME}: uint8 {tuple(npz_shape)}")
    # No barrier here: stacking 50k PNGs can outlast a collective's timeout, and the other ranks are done.
    return RunResult(out_dir, total_written, job.num_samples - missing_at_start, npz_shape, stats,
                     time.perf_counter() - start)


if __name__ == "__main__":
    # Script entry for torchrun (`-m dqar.harness.sharded_sampling`): the CLI parses the options and loads the model. The import
    # stays here so importing dqar.harness.sharded_sampling as a library never pulls in the command-line harness.
    from dqar.cli import main as _cli_main

    sys.exit(_cli_main(["sample", *sys.argv[1:]]))
