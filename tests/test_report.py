"""`dqar report`: tables computed exactly from a small fixture, figures written, missing data noted."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dqar.cli import main
from dqar.harness.report import build_report, interpolate, pareto_front, same_except

FIXTURE = Path(__file__).parent / "fixtures" / "results_small.jsonl"


@pytest.fixture(scope="module")
def fixture_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(FIXTURE), "--out", str(out)]) == 0
    return out, (out / "report.md").read_text()


def test_report_writes_markdown_and_figures(fixture_report):
    out, md = fixture_report
    for png in ("fid_heatmap.png", "fid_data_heatmap.png", "pareto.png", "entropy_snr.png"):
        assert (out / png).stat().st_size > 1000, png
        assert f"({png})" in md
    for title in ("FID grid", "Pareto configurations", "Shallow-first vs deep-first", "Memory profile",
                  "Entropy and SNR per step", "K/V caching vs output caching", "INT8 cache",
                  "gate vs static schedule", "Baselines"):
        assert f"## {title}" in md or title in md


def test_fid_grid_and_main_effects_are_computed_from_the_rows(fixture_report):
    _, md = fixture_report
    assert "| 20% | – | 3.00 | 4.00 |" in md          # FID vs uncached, warmup 20%: no 33% cell measured
    assert "| 40% | 0.50 | 1.00 | 2.00 |" in md
    assert "| 20% | – | 1.100 | 1.250 |" in md        # ideal speedup row
    # Over the complete 2x2 rectangle: warmup row means 3.5 / 1.5, layer column means 2.0 / 3.0.
    assert "| FID vs uncached samples | 2.000 | 1.000 |" in md
    assert "| ideal (FLOP) speedup (x) | 0.070 | 0.120 |" in md


def test_pairs_pareto_and_gate_comparison(fixture_report):
    _, md = fixture_report
    assert "Largest |Δ FID| deep vs shallow: 0.250 over 1 pair(s)" in md
    assert "| static w=0.40 l=0.33 | 0.50 | 3.00 | 2.50 |" in md      # output vs K/V
    assert "Δ FID from quantizing the cache: +0.500." in md
    # Gate at ideal 1.12 on the static front (1.06, 1.0) - (1.15, 2.0): 1 + 0.06/0.09 = 1.67.
    assert "| schedule=gate | 24.0 | [0.5, 50] | 0.40 | 31% | 1.154 | 1.120 | 1.20 | 1.67 | 1.48 |" in md
    measured, ideal = md.split("## Pareto")[1].split("##")[0].split("The same by FLOP-bound")

    def names(text):
        return [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "config" not in line]

    assert names(measured) == ["static", "ptq-int8", "warmup=0.4 layers=0.5", "schedule=gate",
                               "warmup=0.4 layers=1.0", "warmup=0.2 layers=1.0", "interval-attn-mlp"]
    assert names(ideal) == ["static", "warmup=0.4 layers=0.5", "schedule=gate", "warmup=0.4 layers=1.0",
                            "warmup=0.2 layers=1.0", "interval-attn-mlp"]


def test_pairs_ignore_fields_that_cannot_change_the_images():
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    shallow = next(r for r in rows if r["name"] == "warmup=0.2 layers=1.0")
    deep = json.loads(json.dumps(next(r for r in rows if r["name"].endswith("order=deep"))))
    deep["config"]["tau0"] = 28.0           # a changed gate default is inert for a static schedule
    assert same_except(shallow, deep, "order")
    deep["config"]["warmup"] = 0.3          # a live field is not
    assert not same_except(shallow, deep, "order")
    kv = next(r for r in rows if r["name"] == "kv")
    static = next(r for r in rows if r["name"] == "static")
    assert same_except(static, kv, "mode")
    kv2 = json.loads(json.dumps(kv))
    kv2["config"]["kv_bits"] = [16, 8]      # live for the K/V point
    assert not same_except(static, kv2, "mode")


def test_entropy_monotonicity_and_memory(fixture_report):
    _, md = fixture_report
    assert "- entropy: 3 → 2.45; falls at 4 of 5 steps, moves the other way at 1 (largest such move 0.05)." in md
    assert "- SNR α²/σ²: 0.01 → 100; rises at 5 of 5 steps (monotone)." in md
    assert "| Cache memory (MiB) | – | 0.50 | +0.50 |" in md
    assert "| Generation time (s) | 6.00 | 5.80 | -0.20 |" in md
    # No saved samples in the fixture: that section is a note, not a crash.
    assert "Samples: baseline vs DQAR" in md and "*Section omitted: no saved samples" in md


def test_sections_without_data_are_omitted_with_a_note(tmp_path):
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    only = tmp_path / "one.jsonl"
    only.write_text(json.dumps(rows[1]) + "\n" + '{"key": "partial')    # a partial last line too
    path = build_report(only, tmp_path / "out")
    md = path.read_text()
    assert "## FID grid" in md and "*Section omitted: needs static-schedule points at >= 2 warmups" in md
    assert "*Section omitted: needs a gate-schedule point" in md
    assert "*Section omitted: needs two points that differ only in mode" in md
    assert "*Section omitted: needs the 'none' reference and a static point" in md
    assert not (tmp_path / "out" / "pareto.png").exists()


def test_report_cli_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["report", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "has no sweep rows" in capsys.readouterr().err


def test_pareto_front_and_interpolation_exact():
    pts = [{"speedup": 1.0, "quality": 0.0}, {"speedup": 1.1, "quality": 2.0}, {"speedup": 1.2, "quality": 1.0},
           {"speedup": 1.2, "quality": 3.0}, {"speedup": 1.5, "quality": 5.0}]
    assert [(p["speedup"], p["quality"]) for p in pareto_front(pts)] == [(1.0, 0.0), (1.2, 1.0), (1.5, 5.0)]
    assert interpolate([(1.0, 0.0), (1.2, 1.0)], 1.1) == pytest.approx(0.5, abs=1e-12)
    assert interpolate([(1.0, 0.0), (1.2, 1.0)], 1.3) is None


def test_report_from_a_real_tiny_sweep_has_the_image_grid(tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(["sweep", "--model", "DiT-Tiny", "--n", "6", "--classes", "3,7", "--steps", "3", "--threads", "1",
                 "--no-progress", "--baselines", "none,static", "--out", str(out)]) == 0
    rep = tmp_path / "rep"
    assert main(["report", str(out), "--out", str(rep)]) == 0
    md = (rep / "report.md").read_text()
    assert (rep / "samples.png").stat().st_size > 1000 and "(samples.png)" in md
    assert "classes [3, 7]" in md
    assert (rep / "entropy_snr.png").exists()
    # Random weights: no evaluator, so no FID; PSNR/SSIM still fill the table.
    assert "*FID vs uncached samples: not measured" not in md      # grid section itself is omitted (1 cell)
    assert "## Memory profile" in md and "| Peak memory (MiB) |" in md
    # The report reads the sidecar folder next to the results file; moving it away is a note, not a crash.
    shutil.rmtree(tmp_path / "r.samples")
    build_report(out, tmp_path / "rep2")
    assert "*Section omitted: no saved samples" in (tmp_path / "rep2" / "report.md").read_text()
