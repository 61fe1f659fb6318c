"""`dqar report`: tables computed exactly from a small fixture, figures written, missing data noted, speed led
by the FLOP bound with measured speedups only where they have a spread."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dqar.cli import main
from dqar.harness.report import build_report
from dqar.harness.report_common import interpolate, pareto_front, same_except
from dqar.harness.rows import SweepRow

FIXTURE = Path(__file__).parent / "fixtures" / "results_small.jsonl"


def _fixture_rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines()]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _timed(rows: list[dict]) -> list[dict]:
    """The fixture as if swept with --repeats 3: runs spread -2..+2% (reference) and -1..+1% (points)
    around the recorded medians, so every median speedup stays what the fixture says."""
    rows = json.loads(json.dumps(rows))
    for r in rows:
        b, d = r["baseline"]["seconds"], r["dqar"]["seconds"]
        r["baseline"]["runs"] = [0.98 * b, b, 1.02 * b]
        r["dqar"]["runs"] = [0.99 * d, d, 1.01 * d]
    return rows


@pytest.fixture(scope="module")
def timed_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("timed")
    path = build_report(_write(tmp / "timed.jsonl", _timed(_fixture_rows())), tmp / "out")
    return tmp / "out", path.read_text()


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


def _names(text):
    return [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "config" not in line]


def test_pairs_pareto_and_gate_comparison(fixture_report):
    _, md = fixture_report
    assert "Largest |Δ FID| deep vs shallow: 0.250 over 1 pair(s)" in md
    assert "| static w=0.40 l=0.33 | 0.50 | 3.00 | 2.50 |" in md      # output vs K/V
    assert "Δ FID from quantizing the cache: +0.500." in md
    # Gate at ideal 1.12 on the static front (1.06, 1.0) - (1.15, 2.0): 1 + 0.06/0.09 = 1.67. Timed once:
    # no measured speedup, so no static FID at the same measured speed either.
    assert "| schedule=gate | 24.0 | [0.5, 50] | 0.40 | 31% | 1.120 | – | 1.20 | 1.67 | – |" in md
    pareto = md.split("## Pareto")[1].split("##")[0]
    ideal, rest = pareto.split("No front by measured speedup: 11 point(s) were timed once")
    assert _names(ideal) == ["static", "warmup=0.4 layers=0.5", "schedule=gate", "warmup=0.4 layers=1.0",
                             "warmup=0.2 layers=1.0", "interval-attn-mlp"]
    assert "| static | static | 0.40 | 0.33 | 1.030 | – | 0.500 | 5.20 |" in ideal


def test_single_runs_are_never_shown_as_speedups(fixture_report):
    out, md = fixture_report
    # The fixture's rows carry no timed runs: their single-shot ratios (static 1.034, gate 1.154, ptq 1.091,
    # interval 1.500) appear nowhere, while the FLOP bounds lead every table.
    for single_shot in ("1.034", "1.154", "1.091", "1.500", "1.304"):
        assert single_shot not in md, single_shot
    assert "11 point(s) were timed once (a single run is noise, not a speedup)" in md
    assert "*measured speedup (x), median of the timed runs: not shown: the cells were timed once" in md
    assert "| Speedup: FLOP bound | 1.00x | 1.030x |  |" in md
    assert "| Speedup: measured (run range) | 1.00x | – |  |" in md


def test_measured_speedups_come_with_their_spread_and_flags(timed_report):
    out, md = timed_report
    # static: median 6.0/5.8, range (0.98*6)/(1.01*5.8) .. (1.02*6)/(0.99*5.8); above its bound 1.03: flagged.
    assert "| static | static | output | 0.40 | 0.33 | shallow | 16 | attn | 4% | – | 1.030 | 1.034 (1.00–1.07) ! |" in md
    # interval: 1.5 below its bound 1.6: not flagged.
    assert "| 1.600 | 1.500 (1.46–1.55) | 666.7 |" in md
    flagged = ("static, kv, warmup=0.2 layers=0.5, warmup=0.2 layers=1.0, warmup=0.4 layers=0.5, warmup=0.4 "
               "layers=1.0, warmup=0.2 layers=1.0 order=deep, warmup=0.4 layers=0.5 cache-bits=8, schedule=gate")
    assert f"Timing caveat: 9 point(s) measured faster than their FLOP bound allows (marked ! here, red on " \
           f"pareto.png): {flagged}." in md
    # Gate against the measured static front as well: (1.111, 1.0) - (1.2, 2.0) at 1.154: 1.48.
    assert "| schedule=gate | 24.0 | [0.5, 50] | 0.40 | 31% | 1.120 | 1.154 (1.12–1.19) ! | 1.20 | 1.67 | 1.48 |" in md
    pareto = md.split("## Pareto")[1].split("##")[0]
    ideal, measured = pareto.split("The same by measured speedup")
    assert _names(measured) == ["static", "ptq-int8", "warmup=0.4 layers=0.5", "schedule=gate",
                                "warmup=0.4 layers=1.0", "warmup=0.2 layers=1.0", "interval-attn-mlp"]
    assert _names(ideal) == ["static", "warmup=0.4 layers=0.5", "schedule=gate", "warmup=0.4 layers=1.0",
                             "warmup=0.2 layers=1.0", "interval-attn-mlp"]
    assert (out / "pareto.png").stat().st_size > 1000


def test_settings_that_do_not_apply_show_a_dash(fixture_report):
    _, md = fixture_report
    # none / ptq-int8 are uncached: no schedule or cache setting applies (live_fields).
    assert "| none | none | – | – | – | – | – | – | 0% | – | 1.000 | ref. |" in md
    assert "| ptq-int8 (ptq-int8) | none | – | – | – | – | – | – | 0% | – | – | – |" in md
    # interval reads warmup but not the layer fraction or order; gate reads neither of those.
    assert "| interval-attn-mlp | interval | output | 0.00 | – | – | 16 | attn+mlp |" in md
    assert "| schedule=gate | gate | output | 0.40 | – | – | 16 | attn |" in md


def test_pairs_ignore_fields_that_cannot_change_the_images():
    rows = _fixture_rows()
    row = lambda data: SweepRow.from_dict(json.loads(json.dumps(data)))
    shallow = row(next(r for r in rows if r["name"] == "warmup=0.2 layers=1.0"))
    deep = json.loads(json.dumps(next(r for r in rows if r["name"].endswith("order=deep"))))
    deep["config"]["tau0"] = 28.0           # a changed gate default is inert for a static schedule
    assert same_except(shallow, row(deep), "order")
    deep["config"]["warmup"] = 0.3          # a live field is not
    assert not same_except(shallow, row(deep), "order")
    kv = next(r for r in rows if r["name"] == "kv")
    static = row(next(r for r in rows if r["name"] == "static"))
    assert same_except(static, row(kv), "mode")
    kv2 = json.loads(json.dumps(kv))
    kv2["config"]["kv_bits"] = [16, 8]      # live for the K/V point
    assert not same_except(static, row(kv2), "mode")


def test_entropy_monotonicity_and_memory(fixture_report):
    _, md = fixture_report
    assert "- entropy: 3 → 2.45; falls at 4 of 5 steps, moves the other way at 1 (largest such move 0.05)." in md
    assert "- SNR α²/σ²: 0.01 → 100; rises at 5 of 5 steps (monotone)." in md
    assert "| Cache memory (MiB) | – | 0.50 | +0.50 |" in md
    assert "| Generation time (s, median) | 6.00 | 5.80 | -0.20 |" in md
    # No saved samples in the fixture: that section is a note, not a crash.
    assert "Samples: baseline vs DQAR" in md and "*Section omitted: no saved samples" in md


def test_sections_without_data_are_omitted_with_a_note(tmp_path):
    rows = _fixture_rows()
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


def _edges_are_blank(png: Path) -> bool:
    """True when no drawn pixel touches the image border: nothing (a title, a label) was cut off."""
    a = np.asarray(Image.open(png).convert("L"))
    return min(a[0].min(), a[-1].min(), a[:, 0].min(), a[:, -1].min()) == 255


def test_report_from_a_real_tiny_sweep_has_the_image_grid(tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(["sweep", "--model", "DiT-Tiny", "--n", "6", "--classes", "3,7,1", "--steps", "3", "--threads", "1",
                 "--no-progress", "--baselines", "none,static", "--out", str(out)]) == 0
    # No --out: the report goes beside the results file, like the samples folder.
    assert main(["report", str(out)]) == 0
    rep = tmp_path / "r.report"
    md = (rep / "report.md").read_text()
    assert (rep / "samples.png").stat().st_size > 1000 and "(samples.png)" in md
    # Every class among the saved images, not only the first two; the long title is not cropped.
    assert "every class among the 6 saved images ([3, 7, 1]; up to 4 images each)" in md
    assert _edges_are_blank(rep / "samples.png")
    assert (rep / "entropy_snr.png").exists()
    # Random weights: no evaluator, so no FID; PSNR/SSIM still fill the table.
    assert "*FID vs uncached samples: not measured" not in md      # grid section itself is omitted (1 cell)
    assert "## Memory profile" in md and "| Peak memory (MiB) |" in md
    # The report reads the sidecar folder next to the results file; moving it away is a note, not a crash.
    shutil.rmtree(tmp_path / "r.samples")
    build_report(out, tmp_path / "rep2")
    assert "*Section omitted: no saved samples" in (tmp_path / "rep2" / "report.md").read_text()


# ------------------------------------------------------------------------------------------------
# bad rows, default output, figures
# ------------------------------------------------------------------------------------------------

def test_report_on_a_row_missing_a_key_names_file_line_and_key(tmp_path, capsys):
    rows = _fixture_rows()
    del rows[2]["baseline"]
    path = _write(tmp_path / "r.jsonl", rows)
    assert main(["report", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"dqar report: error: {path}: line 3: the row is missing key 'baseline'\n"
    rows = _fixture_rows()
    rows[0]["quality"] = None
    path = _write(tmp_path / "r2.jsonl", rows)
    assert main(["report", str(path), "--out", str(tmp_path / "o")]) == 2
    assert f"{path}: line 1: 'quality' must be a JSON object, got null" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_report_default_out_is_beside_the_results(tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    shutil.copy(FIXTURE, results)
    assert main(["report", str(results)]) == 0
    assert (tmp_path / "results.report" / "report.md").is_file()
    assert str(tmp_path / "results.report" / "report.md") in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2                      # a folder is not a results file
    assert "is a folder" in capsys.readouterr().err


def test_pareto_figure_labels_every_point_and_flags_speedups_above_the_bound():
    from dqar.harness.plots import pareto_figure

    points = [
        {"name": "a", "group": "static grid", "quality": 1.0, "ideal": 1.1, "measured": 1.05, "low": 1.0, "high": 1.1},
        {"name": "b", "group": "static grid", "quality": 2.0, "ideal": 1.2, "measured": 1.3, "low": 1.25, "high": 1.4},
        {"name": "ptq", "group": "baseline", "quality": 0.5, "ideal": None, "measured": 1.1, "low": 1.0, "high": 1.2},
        {"name": "once", "group": "gate / other", "quality": 3.0, "ideal": 1.15, "measured": None, "low": None,
         "high": None},
    ]
    fig = pareto_figure(points, ideal_front=["a", "b"], measured_front=["a", "b"])
    left, right = fig.axes[0], fig.axes[1]
    texts = lambda ax: {t.get_text(): t.get_color() for t in ax.texts}
    assert set(texts(left)) == {"a", "b", "once"}                   # every point with a FLOP bound, labelled
    right_texts = texts(right)
    assert set(right_texts) == {"a", "b  ! above its FLOP bound 1.200x", "ptq"}   # single run "once" not shown
    assert right_texts["b  ! above its FLOP bound 1.200x"] == "red" and right_texts["a"] == "black"
    assert "FLOP-bound" in left.get_xlabel() and "measured" in right.get_xlabel()
    # No measured speedups at all: one panel, which says why.
    single = pareto_figure([dict(p, measured=None) for p in points])
    assert len(single.axes) == 1 and "no point was timed twice" in single.axes[0].get_title()
    import matplotlib.pyplot as plt

    plt.close(fig)
    plt.close(single)


def test_samples_figure_title_is_never_cropped(tmp_path):
    from dqar.harness.plots import image_grid_plot

    imgs = np.zeros((1, 8, 8, 1), dtype=np.uint8)
    path = image_grid_plot([("class 3", imgs, imgs)], tmp_path / "s.png",
                           title="a long title that is much wider than two small images side by side " * 2)
    assert _edges_are_blank(path)


# ------------------------------------------------------------------------------------------------
# work share: every contender (DQAR and each baseline) on the same axes
# ------------------------------------------------------------------------------------------------

def _with_peers(rows: list[dict]) -> list[dict]:
    """The fixture plus counted calls, a SeaCache point with an option and a MagCache point."""
    rows = json.loads(json.dumps(rows))
    by_name = {r["name"]: r for r in rows}
    by_name["none"]["calls"] = {"attn": 1.0, "mlp": 1.0, "block": 1.0}
    by_name["static"]["calls"] = {"attn": 0.9, "mlp": 1.0, "block": 1.0}
    by_name["interval-attn-mlp"]["calls"] = {"attn": 0.34, "mlp": 0.34, "block": 1.0}
    by_name["ptq-int8"]["calls"] = {"attn": 1.0, "mlp": 1.0, "block": 1.0}
    sea = json.loads(json.dumps(by_name["ptq-int8"]))
    sea.update(key="ksea", name="seacache threshold=0.1", variant="seacache",
               calls={"attn": 0.38, "mlp": 0.38, "block": 0.38}, variant_settings={"threshold": 0.1, "power_exp": 3.0})
    sea["quality"].update(psnr=40.0, fid_vs_baseline=0.05)
    mag = json.loads(json.dumps(sea))
    mag.update(key="kmag", name="magcache", variant="magcache", calls={"attn": 0.3, "mlp": 0.3, "block": 0.3},
               variant_settings={"threshold": 0.06, "mag_ratios": [1.0] + [0.99] * 48 + [0.951]})
    mag["quality"].update(psnr=25.0, fid_vs_baseline=1.0)
    return rows + [sea, mag]


def test_work_share_section_places_every_contender_on_the_same_axes(tmp_path):
    md = build_report(_write(tmp_path / "r.jsonl", _with_peers(_fixture_rows())), tmp_path / "out").read_text()
    work = md.split("## Work share: every contender on the same axes")[1].split("\n## ")[0]
    # Least work first; the peers have no FLOP bound but sit on the same work axis as DQAR.
    assert _names(work) == ["point", "magcache", "interval-attn-mlp", "seacache threshold=0.1", "static", "ptq-int8"]
    assert "| interval-attn-mlp | DQAR interval | 0.34/0.34/1.00 | 0.340 | 1.600 | – | 30.00 | 6.000 |" in work
    assert "| seacache threshold=0.1 | seacache | 0.38/0.38/0.38 | 0.380 | – | – | 40.00 | 0.050 |" in work
    assert "| static | DQAR static | 0.90/1.00/1.00 | 0.950 | 1.030 | – | 30.00 | 0.500 |" in work
    # Fronts: less work and better quality. By PSNR interval (0.34, 30 dB) survives; by FID MagCache (0.30, 1.0)
    # dominates it, and SeaCache (0.38, 0.05) dominates static and ptq-int8 on both.
    assert ("Non-dominated by work share and PSNR vs uncached samples (dB, higher is better), least work first: "
            "magcache, interval-attn-mlp, seacache threshold=0.1.") in work
    assert ("Non-dominated by work share and FID vs uncached samples (lower is better), least work first: "
            "magcache, seacache threshold=0.1.") in work
    for png in ("pareto_work_psnr.png", "pareto_work_fid.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000 and f"({png})" in work
    # The overview and the baselines table carry the counted shares too; rows without them show a dash.
    assert "| seacache threshold=0.1 (seacache) | none | – | – | – | – | – | – | 0% | 0.38/0.38/0.38 | – |" \
        in md
    assert "| warmup=0.2 layers=0.5 | static | output | 0.20 | 0.50 | shallow | 16 | attn | 23% | – | 1.100 |" in md
    baselines = md.split("## Baselines")[1].split("\n## ")[0]
    assert _names(baselines)[:7] == ["method", "none", "static", "interval-attn-mlp", "kv", "ptq-int8",
                                     "seacache threshold=0.1"]
    assert "- `seacache threshold=0.1`: threshold=0.1, power_exp=3.0" in baselines
    assert "- `magcache`: threshold=0.06, mag_ratios=[50 values: 1 … 0.951]" in baselines


def test_work_share_section_needs_counted_calls(fixture_report):
    _, md = fixture_report
    assert "*Section omitted: needs rows with counted calls (sweeps from before call counting have none" in md


def test_pareto_figure_takes_work_share_as_its_x_axis():
    import matplotlib.pyplot as plt

    from dqar.harness.plots import pareto_figure

    points = [
        {"name": "dqar", "group": "DQAR", "quality": 45.0, "work": 0.34, "ideal": 2.5, "measured": None},
        {"name": "seacache", "group": "seacache", "quality": 48.0, "work": 0.38, "ideal": None, "measured": None},
        {"name": "ptq", "group": "ptq-int8", "quality": 30.0, "work": None, "ideal": None, "measured": None},
    ]
    fig = pareto_figure(points, x="work", work_front=["dqar", "seacache"], ylabel="PSNR (dB)")
    (ax,) = fig.axes
    assert {t.get_text() for t in ax.texts} == {"dqar", "seacache"}       # a point without a work share is left out
    assert "work share" in ax.get_xlabel() and ax.get_ylabel() == "PSNR (dB)"
    front = [line for line in ax.get_lines() if line.get_label() == "Pareto front"]
    assert len(front) == 1 and list(front[0].get_xdata()) == [0.34, 0.38]
    plt.close(fig)
    with pytest.raises(ValueError, match="x='flops' is not allowed: must be 'speed' or 'work'"):
        pareto_figure(points, x="flops")
