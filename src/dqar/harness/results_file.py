"""The results file of a sweep: JSON lines of `SweepRow`s, its repair, its lock and its samples folder.

Every row is written as one "json\\n", flushed and synced, so a kill can only lose the tail. A last line
without its newline is therefore the only place a partial row can be: `read_rows(repair=True)` cuts it
off (that point is recomputed); any other unreadable line, or a row that does not fit the schema, is an
error naming the file, the line and the key, since silently dropping it would lose a measurement. One
sweep at a time writes a file (`results_lock`).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from .rows import RowError, SweepRow

try:
    import fcntl
except ImportError:         # not POSIX: an O_EXCL lock file instead (see results_lock)
    fcntl = None


class ResultsFileBusy(RuntimeError):
    """Another sweep holds the results file."""


def read_rows(path: str | Path, repair: bool = False) -> list[SweepRow]:
    """Rows of a results file; a partial last line is dropped (and cut from the file when `repair`)."""
    path = Path(path)
    if not path.exists():
        return []
    if path.is_dir():
        raise ValueError(f"results file {str(path)!r} is a folder; give a file such as {str(path / 'results.jsonl')!r}")
    data = path.read_bytes()
    *complete, tail = data.split(b"\n")
    rows = []
    for i, line in enumerate(complete):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: line {i + 1} is not valid JSON; fix or remove it (only a partial "
                             "last line is repaired automatically)") from None
        rows.append(_row(row, path, i + 1))
    if tail.strip():
        try:
            row = json.loads(tail)
        except json.JSONDecodeError:
            row = None
        if row is not None:
            # Parsed whole: only its newline was lost, so it is a complete row (and must be a valid one).
            rows.append(_row(row, path, len(complete) + 1))
            if repair:
                with open(path, "ab") as fh:
                    fh.write(b"\n")
        elif repair:
            with open(path, "r+b") as fh:
                fh.truncate(len(data) - len(tail))
    return rows


def _row(data, path: Path, line: int) -> SweepRow:
    if not isinstance(data, dict) or "key" not in data:
        raise RowError(f"{path}: line {line} is not a sweep row (a JSON object with a 'key')")
    try:
        return SweepRow.from_dict(data)
    except RowError as exc:
        raise RowError(f"{path}: line {line}: {exc}") from None


def append_row(path: str | Path, row: SweepRow) -> None:
    """One line, flushed and synced, so a kill leaves at most a partial last line."""
    line = json.dumps(json_safe(row.to_dict()), allow_nan=False, sort_keys=False) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def json_safe(value):
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    return value


_HELD: dict[str, int] = {}


@contextmanager
def results_lock(path: str | Path) -> Iterator[None]:
    """Exclusive use of a results file by one sweep; re-entrant within a process.

    An advisory `flock` on the results file itself, taken without waiting: a second sweep into the same
    file (which would measure every point again beside the first and write each row twice) is refused
    at once with `ResultsFileBusy`. The kernel drops the lock when the process ends, however it ends,
    so a killed sweep leaves no stale lock. Where there is no `fcntl`, an O_EXCL `<file>.lock` is used;
    a kill leaves that file behind, and the message says to delete it.
    """
    path = Path(path)
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    busy = (f"{str(path)!r} is being written by another dqar sweep; wait for it to finish or give "
            "another --out")
    if fcntl is not None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ResultsFileBusy(busy) from None
        release = lambda: os.close(fd)                       # closing the file drops the lock
    else:
        lock = Path(f"{path}.lock")
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise ResultsFileBusy(f"{busy} (or a killed one left {str(lock)!r}: delete it if none runs)") from None
        release = lambda: lock.unlink(missing_ok=True)
    _HELD[key] = 1
    try:
        yield
    finally:
        del _HELD[key]
        release()


def sidecar_dir(out: str | Path) -> Path:
    """The folder beside a results file that keeps its reference run and each point's samples."""
    out = Path(out)
    return out.with_name(out.stem + ".samples")


def check_results_path(out: str | Path) -> Path:
    """`out` as a results file with a usable sidecar folder; a one-line error naming the path otherwise."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"results file {str(out)!r} is a folder; give a file, e.g. {str(out / 'results.jsonl')!r}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"folder {str(out.parent)!r} of the results file does not exist")
    side = sidecar_dir(out)
    if side.exists() and not side.is_dir():
        raise ValueError(f"{str(side)!r} (where the results file keeps its samples) is not a folder; move it "
                         "away or give another results file")
    return out


def load_samples(results_path: str | Path, row: SweepRow) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 (K, H, W, C) images, (K,) labels) saved for a row, or None when there are none."""
    if not row.samples:
        return None
    path = sidecar_dir(results_path) / row.samples
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        return z["images"], z["labels"]
