"""`dqar sweep`: grid parsing, clear errors before anything runs, resume without loss or duplicates, one
sweep per results file, every timed run kept, and a progress bar with an ETA."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from dqar.cli import UsageError, main
from dqar.cli.sweep import parse_grid_token, parse_grids
from dqar.harness.results_file import read_rows
from dqar.models.dit import build_dit

FIXTURE = Path(__file__).parent / "fixtures" / "results_small.jsonl"

TINY = ["--model", "DiT-Tiny", "--n", "4", "--steps", "3", "--threads", "1", "--no-progress", "--save-samples", "4"]
GRID = ["--baselines", "none,static", "--grid", "warmup=0.2,0.4", "layers=1.0"]


def _keys(path):
    return [json.loads(line)["key"] for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# grid specs
# ------------------------------------------------------------------------------------------------

def test_grid_accepts_option_and_field_names_parsed_like_the_options():
    assert parse_grid_token("layers=0.33,1.0") == ("layer_fraction", [0.33, 1.0])
    assert parse_grid_token("layer_fraction=0.5") == ("layer_fraction", [0.5])
    assert parse_grid_token("cache-bits=16,8") == ("cache_bits", [16, 8])
    assert parse_grid_token("cache_bits=4") == ("cache_bits", [4])
    assert parse_grid_token("order=shallow,deep") == ("order", ["shallow", "deep"])
    # Fields whose single value is a comma list separate values with ';'.
    assert parse_grid_token("targets=attn;attn,mlp") == ("targets", [("attn",), ("attn", "mlp")])
    assert parse_grid_token("snr-range=0.5,50") == ("snr_range", [(0.5, 50.0)])
    assert parse_grid_token("gate-with=none;static") == ("gate_with", [None, "static"])


def test_grids_are_cartesian_products_in_order():
    cells = parse_grids([["warmup=0.2,0.4", "layers=0.5,1.0"], ["order=deep"]])
    assert cells == [{"warmup": 0.2, "layer_fraction": 0.5}, {"warmup": 0.2, "layer_fraction": 1.0},
                     {"warmup": 0.4, "layer_fraction": 0.5}, {"warmup": 0.4, "layer_fraction": 1.0},
                     {"order": "deep"}]


@pytest.mark.parametrize("token, message", [
    ("bogus=1,2", "--grid name 'bogus' is not a DQAR option or config field; allowed: adaptive-scope, branch-decisions, cache-bits"),
    ("warmup=", "empty value in the list for 'warmup'"),
    ("warmup=0.2,,0.4", "empty value in the list for 'warmup'"),
    ("warmup", "must look like NAME=V1,V2"),
    ("warmup=abc", "value 'abc' for 'warmup' could not be parsed"),
    ("record-entropy=maybe", "value 'maybe' for 'record-entropy' could not be parsed"),
])
def test_bad_grid_tokens_name_the_problem(token, message):
    with pytest.raises(UsageError) as info:
        parse_grid_token(token)
    assert message in str(info.value)


def test_grid_takes_the_forecast_block_and_adaptive_options():
    from dqar.cli import build_parser
    from dqar.cli.sweep import build_points

    assert parse_grid_token("tolerance=0.01,0.05") == ("tolerance", [0.01, 0.05])
    assert parse_grid_token("max-age=2,4") == ("max_age", [2, 4])
    assert parse_grid_token("forecast_order=0,1,2") == ("forecast_order", [0, 1, 2])
    assert parse_grid_token("targets=block;attn,mlp") == ("targets", [("block",), ("attn", "mlp")])
    args = build_parser().parse_args(["sweep", "--out", "r.jsonl", "--grid", "schedule=adaptive", "tolerance=0.01,0.05",
                                      "max-age=3", "forecast-order=2", "targets=block"])
    args.cfg_scale = 1.5
    points = build_points(args)
    assert [(p.config.schedule, p.config.tolerance, p.config.max_age, p.config.forecast_order, p.config.targets)
            for p in points] == [("adaptive", 0.01, 3, 2, ("block",)), ("adaptive", 0.05, 3, 2, ("block",))]


def test_baseline_options_give_one_named_point_per_value():
    from dqar.cli import build_parser
    from dqar.cli.sweep import build_points
    from dqar.harness.sweep import SweepSettings, point_key

    args = build_parser().parse_args(["sweep", "--out", "r.jsonl", "--baselines", "none,seacache,fbc",
                                      "--baseline-option", "seacache:threshold=0.1;0.5",
                                      "--baseline-option", "seacache:max_consecutive_cached=3"])
    args.cfg_scale = 1.5
    points = build_points(args)
    assert [p.name for p in points] == ["none", "seacache threshold=0.1 max_consecutive_cached=3",
                                        "seacache threshold=0.5 max_consecutive_cached=3", "fbc"]
    assert points[1].options == {"threshold": 0.1, "max_consecutive_cached": 3} and points[3].options == {}
    settings = SweepSettings(model="DiT-Tiny", n=2, classes=(0,), steps=2, sampler="ddim", cfg_scale=1.5, seed=0)
    keys = [point_key(p, settings) for p in points]
    assert len(set(keys)) == 4                     # the options are part of a point's identity


def test_baseline_names_mirror_the_harness():
    from dqar.cli.sweep import BASELINE_NAMES, DQAR_BASELINES
    from dqar.harness.sweep import BASELINES

    assert sorted(BASELINE_NAMES) == sorted(BASELINES) and len(set(BASELINE_NAMES)) == len(BASELINE_NAMES)
    assert set(DQAR_BASELINES) == {name for name, (variant, _) in BASELINES.items() if variant is None}


def test_same_field_twice_in_one_product_is_an_error():
    with pytest.raises(UsageError, match="names 'layer_fraction' twice"):
        parse_grids([["layers=0.5", "layer_fraction=1.0"]])


@pytest.mark.parametrize("args, message", [
    (["--grid", "bogus=1"], "--grid name 'bogus' is not a DQAR option"),
    (["--grid", "layers="], "empty value in the list for 'layers'"),
    (["--grid", "warmup=1.5"], "--grid point 'warmup=1.5': DQARConfig.warmup=1.5 is not allowed: must be a number in [0, 1]"),
    (["--grid", "order=sideways"], "DQARConfig.order='sideways' is not allowed: must be one of shallow, deep, random"),
    (["--baselines", "none,fastest"], "--baselines name 'fastest' is not known; allowed: none, static, ptq-int8"),
    (["--baselines", "seacache", "--baseline-option", "seacache:treshold=0.1"],
     "--baseline-option: baseline 'seacache' has no option 'treshold'; allowed: threshold, residual_order"),
    (["--baselines", "seacache", "--baseline-option", "seacache:threshold=0.1;-1"],
     "--baseline-option: baseline 'seacache' option threshold='-1' is not allowed: must be a finite number >= 0.0"),
    (["--baselines", "none", "--baseline-option", "seacache:threshold=0.1"],
     "--baseline-option 'seacache:threshold=0.1': baseline 'seacache' is not in --baselines; add it there"),
    (["--baselines", "none", "--baseline-option", "teacache:threshold=0.1"],
     "baseline 'teacache' is not known; allowed: none, static, ptq-int8, interval-attn-mlp, kv, pab, taylorseer"),
    (["--baselines", "static", "--baseline-option", "static:warmup=0.2"],
     "'static' runs the model under a DQAR configuration and takes no options"),
    (["--baselines", "ptq-int8", "--baseline-option", "ptq-int8:bits=8"],
     "--baseline-option: baseline 'ptq-int8' takes no options; got bits"),
    (["--baselines", "fbc", "--baseline-option", "fbc=0.1"],
     "--baseline-option 'fbc=0.1' must look like NAME:KEY=VALUE"),
    (["--baselines", "fbc", "--baseline-option", "fbc:threshold=0.1;"], "empty value for 'threshold'"),
    (["--baselines", "fbc", "--baseline-option", "fbc:threshold=0.1", "--baseline-option", "fbc:threshold=0.2"],
     "--baseline-option names fbc:threshold twice"),
    (["--baselines", "none,fastercache", "--cfg-scale", "1"],
     "--baselines fastercache needs classifier-free guidance"),
    (["--grid", "schedule=adaptive", "tolerance=0"],
     "DQARConfig.tolerance=0.0 is not allowed: must be a finite number > 0"),
    (["--grid", "schedule=adaptive", "max-age=0"], "DQARConfig.max_age=0 is not allowed: must be an integer >= 1"),
    (["--grid", "forecast-order=3"], "DQARConfig.forecast_order=3 is not allowed"),
    ([], "nothing to run"),
    (["--grid", "warmup=0.2", "--evaluator", "/no/such/evaluator.safetensors"],
     "--evaluator='/no/such/evaluator.safetensors' is not a file"),
])
def test_cli_rejects_bad_specs_before_running(tmp_path, capsys, args, message):
    out = tmp_path / "r.jsonl"
    # A model that does not exist: the error must come from the grid, before any model is resolved.
    rc = main(["sweep", "--model", "no-such-model", "--out", str(out), *args])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------------

def test_sweep_resumes_without_duplicates_or_loss(tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(["sweep", *TINY, *GRID, "--out", str(out), "--max-points", "2"]) == 0
    first = out.read_bytes()
    assert len(first.splitlines()) == 2
    ref_files = list((tmp_path / "r.samples").glob("reference-*.safetensors"))
    assert len(ref_files) == 1
    ref_mtime = ref_files[0].stat().st_mtime_ns

    assert main(["sweep", *TINY, *GRID, "--out", str(out)]) == 0
    full = out.read_bytes()
    assert full.startswith(first)                       # earlier rows byte-identical
    keys = _keys(out)
    assert len(keys) == 4 and len(set(keys)) == 4       # 2 baselines + 2 grid cells, each once
    names = [json.loads(line)["name"] for line in full.decode().splitlines()]
    assert names == ["none", "static", "warmup=0.2 layers=1.0", "warmup=0.4 layers=1.0"]
    # The shared reference run was reused from the sidecar, not re-measured.
    assert ref_files[0].stat().st_mtime_ns == ref_mtime

    # A third run has nothing to do and leaves the file untouched.
    assert main(["sweep", *TINY, *GRID, "--out", str(out)]) == 0
    assert out.read_bytes() == full


def test_partial_last_line_is_cut_and_recomputed(tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(["sweep", *TINY, "--baselines", "none,static", "--out", str(out)]) == 0
    good = out.read_bytes()
    lines = good.splitlines(keepends=True)
    # Simulate a kill in the middle of writing the second row.
    out.write_bytes(lines[0] + lines[1][:40])
    assert main(["sweep", *TINY, "--baselines", "none,static", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert [r.name for r in rows] == ["none", "static"]
    assert out.read_bytes().startswith(lines[0])
    assert out.read_bytes().endswith(b"\n")


def test_other_weights_are_not_resumed_from(tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(["sweep", *TINY, "--baselines", "static", "--out", str(out)]) == 0
    # Same preset name, different random weights (--seed also moves the image seeds, so compare keys).
    from dqar.harness.sweep import weights_digest
    from dqar.models.dit import build_dit

    a = weights_digest(build_dit("DiT-Tiny").randomize_(0))
    assert a == weights_digest(build_dit("DiT-Tiny").randomize_(0))
    assert a != weights_digest(build_dit("DiT-Tiny").randomize_(1))
    assert read_rows(out)[0].settings["weights_sha256"] == a


def test_damaged_middle_line_is_an_error_not_silently_dropped(tmp_path):
    good = FIXTURE.read_text().splitlines(keepends=True)[0]
    out = tmp_path / "r.jsonl"
    out.write_text(good + "not json\n" + good)
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_rows(out)
    out.write_text(good + "[1, 2]\n")
    with pytest.raises(ValueError, match="line 2 is not a sweep row"):
        read_rows(out)


def test_rows_carry_the_bench_schema_and_per_step_profile(tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(["sweep", *TINY, "--baselines", "none,static,kv", "--out", str(out)]) == 0
    rows = {r.name: r for r in read_rows(out)}
    for row in rows.values():
        assert set(row.to_dict()) >= {"config", "baseline", "dqar", "speedup", "ideal_speedup", "quality", "profile",
                                      "settings", "key", "samples"}
        # Entropy is measured on the reference row's profile pass only, never on timed points.
        assert row.config["record_entropy"] is (row.name == "none")
        settings = dict(row.settings)
        assert len(settings.pop("weights_sha256")) == 16
        assert settings == {"model": "DiT-Tiny", "n": 4, "classes": list(range(10)), "steps": 3,
                            "sampler": "ddim", "cfg_scale": 1.5, "seed": 0}
        prof = row.profile
        assert len(prof.entropy_per_step) == len(prof.snr_per_step) == len(prof.events_per_step) == 3
        assert (tmp_path / "r.samples" / row.samples).exists()
        # Every timed run is kept (--repeats 1 here), the reference's in every row.
        assert len(row.baseline.runs) == 1 and row.baseline.runs[0] == row.baseline.seconds
        assert len(row.dqar.runs) == 1 and row.dqar.runs[0] == row.dqar.seconds
        assert row.measured_range() is None              # one run: no spread, never shown as a speedup
    # The reference row compares the reference with itself.
    ref = rows["none"]
    assert ref.speedup == 1.0 and ref.dqar.reuse_events == 0 and ref.quality.ssim == 1.0
    assert ref.profile.profile_n == 4
    # static: warmup 0.4 of 3 steps -> only the last step (progress 1.0) reuses floor(0.33*4)=1 layer, 2 branches.
    assert rows["static"].dqar.reuse_events == 2
    assert rows["static"].profile.events_per_step == [0, 0, 2]
    assert rows["kv"].config["mode"] == "kv" and rows["kv"].dqar.reuse_events == 2


def test_reuse_options_for_the_grid_leave_the_no_reuse_baselines_valid(tmp_path):
    # --cfg-sharing applies to the grid's points; the uncached reference must stay a plain run.
    out = tmp_path / "r.jsonl"
    assert main(["sweep", *TINY, "--cfg-sharing", "true", "--baselines", "none,ptq-int8",
                 "--grid", "warmup=0.2", "--out", str(out)]) == 0
    rows = {r.name: r for r in read_rows(out)}
    assert rows["none"].config["cfg_sharing"] is False and rows["ptq-int8"].config["cfg_sharing"] is False
    assert rows["warmup=0.2"].config["cfg_sharing"] is True
    # Int8 weights skip nothing: every call runs, counted like any contender's.
    assert rows["ptq-int8"].calls == rows["none"].calls == {"attn": 1.0, "mlp": 1.0, "block": 1.0}


def test_sweep_with_peer_baselines_and_options_records_their_settings_and_call_shares(tmp_path):
    from dqar.harness.baselines import BASELINE_SETTINGS

    out = tmp_path / "r.jsonl"
    steps = 6
    args = ["--model", "DiT-Tiny", "--n", "4", "--steps", str(steps), "--threads", "1", "--no-progress",
            "--save-samples", "0", "--baselines", "none,static,seacache,magcache",
            "--baseline-option", "seacache:threshold=5;0", "--baseline-option", "magcache:calibration_images=2",
            "--grid", "schedule=interval", "interval=2", "warmup=0", "targets=block", "forecast-order=1",
            "--out", str(out)]
    assert main(["sweep", *args]) == 0
    rows = {r.name: r for r in read_rows(out)}
    assert list(rows) == ["none", "static", "seacache threshold=5", "seacache threshold=0",
                          "magcache calibration_images=2",
                          "schedule=interval interval=2 warmup=0.0 targets=block forecast-order=1"]
    every = {"attn": 1.0, "mlp": 1.0, "block": 1.0}
    assert rows["none"].calls == every
    # DQAR, attention only: each reuse event skips one layer's attention for one CFG branch of every image.
    static = rows["static"]
    assert static.calls == {"attn": pytest.approx(1 - static.dqar.reuse_events / (2 * 4 * steps)), "mlp": 1.0,
                            "block": 1.0} and static.calls["attn"] < 1.0
    # DQAR's block target skips whole blocks: all three shares equal.
    block = rows["schedule=interval interval=2 warmup=0.0 targets=block forecast-order=1"]
    share = 1 - block.dqar.reuse_events / (2 * 4 * steps)
    assert block.calls == {k: pytest.approx(share) for k in every} and share < 1.0
    assert block.config["forecast_order"] == 1 and block.config["targets"] == ["block"]
    # The peers: the settings each ran with (defaults under the options), and their counted calls.
    fires, never = rows["seacache threshold=5"], rows["seacache threshold=0"]
    assert fires.variant == never.variant == "seacache" and fires.key != never.key
    assert fires.variant_settings == {**BASELINE_SETTINGS["seacache"], "threshold": 5.0}
    assert never.variant_settings == {**BASELINE_SETTINGS["seacache"], "threshold": 0.0}
    assert never.calls == every and never.dqar.reuse_events == 0
    assert fires.calls["attn"] == fires.calls["mlp"] == fires.calls["block"] < 1.0 and fires.dqar.reuse_events > 0
    mag = rows["magcache calibration_images=2"]
    settings = {k: v for k, v in mag.variant_settings.items() if k != "mag_ratios"}
    assert settings == {**BASELINE_SETTINGS["magcache"], "calibration_images": 2, "calibration_steps": steps,
                        "calibration_sampler": "ddim", "calibration_cfg_scale": 1.5}
    assert len(mag.variant_settings["mag_ratios"]) == steps and set(mag.calls) == set(every)
    for row in rows.values():
        assert row.settings["cfg_scale"] == 1.5
    # Re-running resumes: every point (each option value its own key) is already there.
    before = out.read_bytes()
    assert main(["sweep", *args]) == 0
    assert out.read_bytes() == before


def test_sweep_takes_its_guidance_scale_from_the_model_card_and_stores_it(tmp_path, monkeypatch):
    import dqar.digits.embedded
    from dqar.digits.evaluator import DigitsEvaluator

    monkeypatch.setattr(dqar.digits.embedded, "load_embedded_model",
                        lambda path=None: build_dit("DiT-Digits").randomize_(0).eval())
    def evaluator(path=None):
        # Seeded: an unseeded random evaluator depended on what earlier tests drew from the global generator,
        # and a 20-image FID in its random features can come out numerically unstable.
        torch.manual_seed(0)
        return DigitsEvaluator().eval()

    monkeypatch.setattr(dqar.digits.embedded, "load_evaluator", evaluator)
    # A card whose scale differs from the 1.5 fallback, so the test can tell where the scale came from.
    card = 3.0
    shipped = dqar.digits.embedded.model_card()
    monkeypatch.setattr(dqar.digits.embedded, "model_card",
                        lambda path=None: {**shipped, "recommended_cfg_scale": card})
    out = tmp_path / "r.jsonl"
    assert main(["sweep", "--n", "2", "--steps", "2", "--threads", "1", "--no-progress", "--save-samples", "0",
                 "--baselines", "none", "--out", str(out)]) == 0
    assert read_rows(out)[0].settings["cfg_scale"] == float(card)


# ------------------------------------------------------------------------------------------------
# output paths, the lock, timing runs, progress
# ------------------------------------------------------------------------------------------------

def test_out_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys):
    # A model that does not exist: the --out error must come first, before any model is resolved.
    rc = main(["sweep", "--model", "no-such-model", "--grid", "warmup=0.2", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"dqar sweep: error: --out={str(tmp_path)!r} is a folder; give a results file such as "
                   f"{str(tmp_path / 'results.jsonl')!r}")
    assert list(tmp_path.iterdir()) == []


def test_samples_folder_name_taken_by_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "r.samples").write_text("not a folder")
    rc = main(["sweep", "--model", "no-such-model", "--grid", "warmup=0.2", "--out", str(tmp_path / "r.jsonl")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "r.samples'" in err and "is not a folder" in err and "Traceback" not in err


def test_library_refuses_a_folder_as_results_file(tmp_path):
    from dqar.harness.sweep import check_results_path

    with pytest.raises(ValueError, match="is a folder; give a file"):
        check_results_path(tmp_path)


def test_second_sweep_into_a_held_results_file_is_refused(tmp_path, capsys):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "r.jsonl"
    out.write_bytes(FIXTURE.read_bytes())
    before = out.read_bytes()
    with open(out, "a") as running:          # what a running sweep holds
        fcntl.flock(running.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        rc = main(["sweep", *TINY, "--baselines", "none", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{str(out)!r} is being written by another dqar sweep" in err and "Traceback" not in err
    assert out.read_bytes() == before
    assert not (tmp_path / "r.samples").exists()          # refused before the reference run


def test_library_sweep_holds_the_lock_while_it_runs(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    from dqar.harness.sweep import SweepSettings, baseline_point, run_sweep
    from dqar.models.dit import build_dit

    out = tmp_path / "r.jsonl"
    held = []

    def probe(_row):
        with open(out, "a") as other:
            try:
                fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)

    settings = SweepSettings(model="DiT-Tiny", n=2, classes=(0, 1), steps=2, sampler="ddim", cfg_scale=1.0, seed=0)
    run_sweep(build_dit("DiT-Tiny").randomize_(0), [baseline_point("static")], settings, out, on_row=probe)
    assert held == [True]


def test_repeats_keep_every_run_and_give_a_spread(tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(["sweep", *TINY, "--repeats", "2", "--baselines", "none,static", "--out", str(out)]) == 0
    rows = {r.name: r for r in read_rows(out)}
    ref, static = rows["none"], rows["static"]
    assert len(ref.baseline.runs) == 2 and static.baseline.runs == ref.baseline.runs
    assert len(static.dqar.runs) == 2
    assert static.dqar.seconds == pytest.approx(sum(static.dqar.runs) / 2, rel=1e-12)     # median of two
    lo, hi = static.measured_range()
    assert lo == pytest.approx(min(ref.baseline.runs) / max(static.dqar.runs), rel=1e-12)
    assert hi == pytest.approx(max(ref.baseline.runs) / min(static.dqar.runs), rel=1e-12)
    assert lo <= static.speedup <= hi


def test_progress_bar_counts_generations_with_an_eta(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    args = [a for a in TINY if a != "--no-progress"]
    # reference: 1 warm-up + 2 timed; "none" is the reference itself (0); static: 1 + 2.
    assert main(["sweep", *args, "--repeats", "2", "--warmup-runs", "1", "--baselines", "none,static",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert re.search(r"dqar sweep: .*6/6 \[\d\d:\d\d<\d\d:\d\d", err), err
    assert "generation" in err
