"""The typed sweep row and its results file: exact round trips of shipped files, one-line errors naming the
file, line and key, the spread of measured speedups, and the lock that keeps two sweeps out of one file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dqar.harness.results_file import ResultsFileBusy, append_row, read_rows, results_lock
from dqar.harness.rows import RowError, SweepRow

ROOT = Path(__file__).parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "results_small.jsonl"
STANDARD = ROOT / "docs" / "standard-report" / "results.jsonl"


def _raw(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("path", [FIXTURE, STANDARD], ids=["fixture", "standard-report"])
def test_existing_results_files_load_and_round_trip_exactly(path):
    rows = read_rows(path)
    raw = _raw(path)
    assert len(rows) == len(raw) > 0
    for row, data in zip(rows, raw):
        assert row.to_dict() == data                    # nothing dropped, nothing added
    # Typed access instead of (row.get("quality") or {}).get(...):
    none = rows[0]
    assert none.name == "none" and none.is_reference and none.quality.ssim == 1.0
    # The fixture predates kept runs (none recorded); the standard report keeps its one timed run.
    assert none.dqar.reuse_events == 0
    assert none.baseline.runs == (() if path == FIXTURE else (none.baseline.seconds,))


def test_row_round_trips_runs_and_variant_settings(tmp_path):
    data = _raw(FIXTURE)[1]
    data["baseline"]["runs"] = [6.0, 6.2]
    data["dqar"]["runs"] = [5.8, 5.9]
    data["variant_settings"] = {"block_skip_range": 2}
    row = SweepRow.from_dict(data)
    assert row.baseline.runs == (6.0, 6.2) and row.variant_settings == {"block_skip_range": 2}
    out = tmp_path / "r.jsonl"
    append_row(out, row)
    assert read_rows(out)[0] == row and json.loads(out.read_text()) == data


def test_row_round_trips_its_call_shares_and_rows_without_them_have_no_work_share(tmp_path):
    old = SweepRow.from_dict(_raw(FIXTURE)[1])
    assert old.calls is None and old.work_share() is None and "calls" not in old.to_dict()
    data = _raw(FIXTURE)[1]
    data["calls"] = {"attn": 0.25, "mlp": 0.5, "block": None}
    row = SweepRow.from_dict(data)
    assert row.calls == {"attn": 0.25, "mlp": 0.5, "block": None}
    assert row.work_share() == 0.375                   # the mean of the attention and MLP shares
    out = tmp_path / "r.jsonl"
    append_row(out, row)
    assert read_rows(out)[0] == row and json.loads(out.read_text()) == data
    data["calls"] = {"attn": None, "mlp": 1.0, "block": 1.0}
    assert SweepRow.from_dict(data).work_share() is None


def test_measured_range_pairs_every_run_and_needs_two_on_each_side():
    data = _raw(FIXTURE)[1]
    assert SweepRow.from_dict(data).measured_range() is None           # no runs recorded
    data["baseline"]["runs"], data["dqar"]["runs"] = [6.0], [5.0]
    assert SweepRow.from_dict(data).measured_range() is None           # one run each: no spread
    data["baseline"]["runs"], data["dqar"]["runs"] = [6.0, 6.6], [5.0, 6.0]
    lo, hi = SweepRow.from_dict(data).measured_range()
    assert lo == pytest.approx(6.0 / 6.0, rel=1e-12) and hi == pytest.approx(6.6 / 5.0, rel=1e-12)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("baseline"), "the row is missing key 'baseline'"),
    (lambda d: d["dqar"].pop("seconds"), "'dqar' is missing key 'seconds'"),
    (lambda d: d.update(dqar=[1, 2]), "'dqar' must be a JSON object, got [1, 2]"),
    (lambda d: d.update(speedup="fast"), "'speedup' must be a number or null, got 'fast'"),
    (lambda d: d["dqar"].update(reuse_events=2.5), "'dqar.reuse_events' must be an integer or null, got 2.5"),
    (lambda d: d["quality"].update(fidd=1.0), "'quality' has unknown key 'fidd'"),
    (lambda d: d.update(extra=1), "the row has unknown key 'extra'"),
    (lambda d: d["config"].pop("schedule"), "'config.schedule' must be a string, got None"),
    (lambda d: d.update(calls=[1.0, 1.0]), "'calls' must be a JSON object, got [1.0, 1.0]"),
    (lambda d: d.update(calls={"attn": 0.5, "mlp": 1.0}), "'calls' is missing key 'block'"),
    (lambda d: d.update(calls={"attn": 0.5, "mlp": 1.0, "block": 1.0, "norm": 1.0}), "'calls' has unknown key 'norm'"),
    (lambda d: d.update(calls={"attn": "half", "mlp": 1.0, "block": 1.0}),
     "'calls.attn' must be a number or null, got 'half'"),
    (lambda d: d.update(calls={"attn": -0.1, "mlp": 1.0, "block": 1.0}),
     "'calls.attn' must be a share >= 0 or null, got -0.1"),
])
def test_bad_rows_are_refused_naming_file_line_and_key(tmp_path, edit, message):
    raw = _raw(FIXTURE)[:3]
    edit(raw[1])
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in raw))
    with pytest.raises(RowError) as info:
        read_rows(path)
    assert str(info.value).startswith(f"{path}: line 2: {message}")
    assert "\n" not in str(info.value)


def test_complete_last_line_without_newline_must_be_valid_too(tmp_path):
    raw = _raw(FIXTURE)[:2]
    raw[1].pop("quality")
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(raw[0]) + "\n" + json.dumps(raw[1]))        # whole JSON, only the newline lost
    with pytest.raises(RowError, match="line 2: the row is missing key 'quality'"):
        read_rows(path, repair=True)


def test_results_lock_refuses_a_second_holder_and_is_reentrant(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "r.jsonl"
    with results_lock(out):
        with results_lock(out):              # the same process again (the CLI, then run_sweep): fine
            pass
        # Another open of the file (as another process would do) cannot take the lock while it is held.
        with open(out, "a") as fh:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(out, "a") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)       # released on exit: free now
        with pytest.raises(ResultsFileBusy, match="is being written by another dqar sweep"):
            with results_lock(out):
                pass


def test_results_file_that_is_a_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        read_rows(tmp_path)


def test_shipped_fixture_is_untouched_by_reading(tmp_path):
    copy = tmp_path / "r.jsonl"
    shutil.copy(FIXTURE, copy)
    before = copy.read_bytes()
    read_rows(copy, repair=True)
    assert copy.read_bytes() == before
