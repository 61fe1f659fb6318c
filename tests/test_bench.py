"""The timing helper's call order (fake callables, no timing values) and `dqar bench` end to end."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from scipy import linalg

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.harness.bench import SCHEMA, bench, format_table, speedup_spread
from dqar.harness.timing import Contender, interleaved_timing
from dqar.method.hooks import get_controller
from dqar.models.dit import build_dit
from dqar.sampling import sample


# ------------------------------------------------------------------------------------------------
# timing helper: order of calls, not timing values
# ------------------------------------------------------------------------------------------------

def test_interleaved_timing_call_order():
    calls: list[str] = []

    def make(name):
        def fn():
            calls.append(name)
            return name.upper()
        return fn

    result = interleaved_timing({"baseline": make("b"), "candidate": make("c")}, rounds=3, warmup_runs=2,
                                measure_memory=False)
    # Warm-up alternates in the given order; each timed round starts one contender later.
    assert calls == ["b", "c"] * 2 + ["b", "c", "c", "b", "b", "c"]
    assert list(result) == ["baseline", "candidate"]
    assert len(result["baseline"].samples) == 3 and len(result["candidate"].samples) == 3
    assert result["candidate"].last_output == "C"
    assert result["baseline"].median == sorted(result["baseline"].samples)[1]
    assert result["baseline"].peak_mem_bytes is None


def test_interleaved_timing_rotates_the_start_of_each_round():
    calls: list[str] = []
    interleaved_timing({n: (lambda n=n: calls.append(n)) for n in "abc"}, rounds=4, warmup_runs=0,
                       measure_memory=False)
    assert calls == list("abc" "bca" "cab" "abc")


def test_interleaved_timing_setup_and_teardown_wrap_every_call():
    calls: list[str] = []
    contender = Contender(fn=lambda: calls.append("run") or 7,
                          setup=lambda: calls.append("setup"),
                          teardown=lambda out: calls.append(f"teardown:{out}"))
    interleaved_timing({"a": lambda: calls.append("a"), "x": contender}, rounds=1, warmup_runs=1,
                       measure_memory=False)
    assert calls == ["a", "setup", "run", "teardown:7"] * 2


def test_interleaved_timing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rounds=0"):
        interleaved_timing({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="warmup_runs=-1"):
        interleaved_timing({"a": lambda: None}, rounds=1, warmup_runs=-1)
    with pytest.raises(ValueError, match="at least one"):
        interleaved_timing({}, rounds=1)
    with pytest.raises(TypeError, match="'a'"):
        interleaved_timing({"a": 3}, rounds=1)


# ------------------------------------------------------------------------------------------------
# bench on the tiny random DiT
# ------------------------------------------------------------------------------------------------

LABELS, SEEDS, STEPS = [0, 1, 2, 3], [10, 11, 12, 13], 4


class FakeEvaluator:
    """Three summary statistics as 'features' and sign-of-mean as the 'class'."""

    def features(self, images):
        return torch.stack([images.mean((1, 2, 3)), images.std((1, 2, 3)), images.amax((1, 2, 3))], dim=1)

    def predict(self, images):
        return (images.mean((1, 2, 3)) > 0).long()


@pytest.fixture(scope="module")
def tiny():
    return build_dit("DiT-Tiny").randomize_(0).eval()


def _run(model, config, **kw):
    return bench(model, config, labels=LABELS, seeds=SEEDS, steps=STEPS, cfg_scale=1.5, repeats=1, warmup_runs=0,
                 **kw)


def _schema_keys(record):
    return {k: (sorted(v) if isinstance(v, dict) and k != "config" else None) for k, v in record.items()}


def _frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets, written out independently."""
    a, b = a.detach().double().numpy(), b.detach().double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * root))


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB for images in [-1, 1] (peak-to-peak 2), from the mean squared error over the batch."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return 10.0 * np.log10(4.0 / mse)


def test_bench_record_has_exact_schema_and_null_quality_without_evaluator(tiny):

    cfg = DQARConfig(schedule="static", warmup=0.2, layer_fraction=1.0)
    rec = _run(tiny, cfg).record
    assert _schema_keys(rec) == {k: (sorted(v) if isinstance(v, tuple) else None) for k, v in SCHEMA.items()}
    assert rec["config"] == cfg.to_dict()
    assert all(v is None for v in rec["quality"].values())
    assert rec["dqar"]["reuse_events"] > 0 and 0 < rec["dqar"]["reuse_fraction"] < 1
    assert rec["baseline"]["ms_per_step"] == pytest.approx(rec["baseline"]["seconds"] * 1000 / STEPS, rel=1e-12)
    assert rec["speedup"] == pytest.approx(rec["baseline"]["seconds"] / rec["dqar"]["seconds"], rel=1e-12)
    # Every timed run is kept (repeats=1 here: one each, equal to the median).
    assert rec["baseline"]["runs"] == [rec["baseline"]["seconds"]] and rec["dqar"]["runs"] == [rec["dqar"]["seconds"]]
    assert speedup_spread(rec) is None
    json.dumps(rec, allow_nan=False)


def test_bench_leaves_model_unhooked_and_reference_is_uncached(tiny):

    before = sample(tiny, LABELS, SEEDS, steps=STEPS, cfg_scale=1.5)
    res = _run(tiny, DQARConfig(schedule="static", warmup=0.2, layer_fraction=1.0))
    assert get_controller(tiny) is None
    assert torch.equal(res.reference_images, before)
    assert not torch.equal(res.images, before)          # the cache fired
    assert torch.equal(sample(tiny, LABELS, SEEDS, steps=STEPS, cfg_scale=1.5), before)


def test_bench_quality_with_fake_evaluator(tiny):

    ev = FakeEvaluator()
    real = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    # schedule "none": the candidate is the baseline, so paired metrics hit their ideal values.
    same = _run(tiny, DQARConfig(schedule="none"), evaluator=ev, real_features=real)
    q = same.record["quality"]
    assert q["psnr"] is None and q["ssim"] == pytest.approx(1.0, abs=1e-12)   # infinite PSNR is null in JSON
    assert abs(q["fid_vs_baseline"]) < 1e-6
    # Against the data: the Frechet distance of the evaluator's features, computed here independently.
    assert q["fid_vs_data"] == pytest.approx(_frechet(ev.features(same.images), real), rel=1e-6)
    expected_acc = float((ev.predict(same.images) == torch.tensor(LABELS)).double().mean())
    assert q["accuracy"] == expected_acc
    assert same.record["dqar"]["reuse_events"] == 0

    cached = _run(tiny, DQARConfig(schedule="static", warmup=0.2, layer_fraction=1.0), evaluator=ev)
    q = cached.record["quality"]
    assert q["psnr"] == pytest.approx(_psnr(cached.images, cached.reference_images), rel=1e-4)
    assert q["fid_vs_baseline"] == pytest.approx(
        _frechet(ev.features(cached.images), ev.features(cached.reference_images)), rel=1e-6, abs=1e-9)
    assert not torch.equal(cached.images, cached.reference_images) and 0.0 < q["ssim"] < 1.0   # the cache fired
    assert q["fid_vs_data"] is None                                       # no real features given
    assert q["accuracy"] == float((ev.predict(cached.images) == torch.tensor(LABELS)).double().mean())


def test_bench_uses_precomputed_baseline_images(tiny):

    fake_ref = torch.zeros(len(SEEDS), 1, 8, 8)
    res = _run(tiny, DQARConfig(schedule="none"), evaluator=FakeEvaluator(), baseline_images=fake_ref)
    assert res.reference_images is fake_ref
    assert res.record["quality"]["psnr"] is not None     # compared with the given images, not the rerun
    with pytest.raises(ValueError, match="same seeds"):
        _run(tiny, DQARConfig(schedule="none"), baseline_images=torch.zeros(1, 1, 8, 8))


def test_bench_rejects_bad_arguments(tiny):
    with pytest.raises(ValueError, match="repeats=0"):
        bench(tiny, DQARConfig(), labels=[0], seeds=[0], steps=2, repeats=0)
    with pytest.raises(ValueError, match="2 labels but 1 seeds"):
        bench(tiny, DQARConfig(), labels=[0, 1], seeds=[0], steps=2)
    with pytest.raises(TypeError, match="DQARConfig"):
        bench(tiny, {"schedule": "static"}, labels=[0], seeds=[0], steps=2)


def test_ptq_int8_baseline_is_a_quantized_copy(tiny):
    from dqar.harness.baselines import make_baseline

    assert make_baseline("none", tiny) is None
    q = make_baseline("ptq-int8", tiny)
    assert q is not tiny and type(tiny.blocks[0].attn.qkv) is torch.nn.Linear
    assert q.blocks[0].attn.qkv._get_name() == "DynamicQuantizedLinear"
    assert q.blocks[0].attn.qkv.weight().dtype == torch.qint8
    ref = sample(tiny, [0, 1], [0, 1], steps=2, cfg_scale=1.0)
    out = sample(q, [0, 1], [0, 1], steps=2, cfg_scale=1.0)
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)
    with pytest.raises(ValueError, match="'int4' is not known; allowed: none, ptq-int8"):
        make_baseline("int4", tiny)


def test_cli_bench_json_on_tiny_preset(tmp_path, capsys):
    from dqar.cli import main

    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", "DiT-Tiny", "--n", "2", "--steps", "4", "--repeats", "1", "--warmup-runs", "0",
               "--schedule", "static", "--warmup", "0.2", "--json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert _schema_keys(rec) == {k: (sorted(v) if isinstance(v, tuple) else None) for k, v in SCHEMA.items()}
    assert rec["config"]["schedule"] == "static" and rec["config"]["warmup"] == 0.2
    assert all(v is None for v in rec["quality"].values())
    for block in ("baseline", "dqar"):
        assert rec[block]["seconds"] > 0 and rec[block]["ms_per_step"] > 0
    assert isinstance(rec["dqar"]["reuse_events"], int)
    out = capsys.readouterr().out
    assert "speedup: FLOP bound" in out and "from a single round (no spread: use --repeats 3)" in out


def test_cli_bench_usage_errors(capsys):
    from dqar.cli import main

    assert main(["bench", "--model", "DiT-Tiny", "--n", "0"]) == 2
    assert "--n=0 is not allowed" in capsys.readouterr().err
    assert main(["bench", "--model", "DiT-Tiny", "--json", "/nonexistent/dir/x.json"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_bench_json_folder_is_refused_before_any_work(tmp_path, capsys):
    from dqar.cli import main

    # A model that does not exist: the --json error must come first, before any model is resolved or run.
    assert main(["bench", "--model", "no-such-model", "--json", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"dqar bench: error: --json={str(tmp_path)!r} is a folder; give a file such as "
                   f"{str(tmp_path / 'bench.json')!r}, or '-' for stdout")


def test_cli_bench_shows_a_progress_bar_with_an_eta(capsys):
    from dqar.cli import main

    assert main(["bench", "--model", "DiT-Tiny", "--n", "2", "--steps", "2", "--repeats", "2", "--warmup-runs", "1",
                 "--threads", "1"]) == 0
    err = capsys.readouterr().err
    # 2 contenders x (1 warm-up + 2 timed) generations.
    assert re.search(r"dqar bench: .*6/6 \[\d\d:\d\d<\d\d:\d\d", err), err
    assert main(["bench", "--model", "DiT-Tiny", "--n", "2", "--steps", "2", "--repeats", "1", "--warmup-runs", "0",
                 "--threads", "1", "--no-progress"]) == 0
    assert "dqar bench:" not in capsys.readouterr().err


def test_format_table_leads_with_the_bound_and_shows_the_spread():
    from dqar.harness.bench import empty_record

    rec = empty_record()
    rec["baseline"].update(ms_per_step=10.0, seconds=1.0, runs=[1.0, 1.2, 0.9])
    rec["dqar"].update(ms_per_step=8.0, seconds=0.8, runs=[0.8, 0.8, 1.0], reuse_events=3, reuse_fraction=0.1)
    rec["speedup"], rec["ideal_speedup"] = 1.25, 1.2
    assert speedup_spread(rec) == pytest.approx((0.9, 1.5), rel=1e-12)       # per-round ratios 1.25, 1.5, 0.9
    text = format_table(rec)
    assert ("speedup: FLOP bound 1.200x, measured 1.250x (rounds 0.900-1.500x), above the FLOP bound: timing "
            "noise; 3 reuse events") in text
    rec["ideal_speedup"] = 1.3
    assert "measured 1.250x (rounds 0.900-1.500x); 3 reuse events" in format_table(rec)


def test_cli_bench_measures_quality_for_the_embedded_model(tmp_path, monkeypatch):
    # Stand-ins with the embedded model's shapes, so the wiring is tested without the trained assets.
    import dqar.digits.embedded
    from dqar.cli import main
    from dqar.digits.evaluator import DigitsEvaluator

    def fake_evaluator(path=None):
        torch.manual_seed(0)
        return DigitsEvaluator().eval()

    monkeypatch.setattr(dqar.digits.embedded, "load_embedded_model",
                        lambda path=None: build_dit("DiT-Digits").randomize_(0).eval())
    monkeypatch.setattr(dqar.digits.embedded, "load_evaluator", fake_evaluator)
    out = tmp_path / "bench.json"
    rc = main(["bench", "--n", "4", "--steps", "2", "--cfg-scale", "1", "--repeats", "1", "--warmup-runs", "0",
               "--schedule", "static", "--warmup", "0", "--layers", "1.0", "--json", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["dqar"]["reuse_events"] == 12         # the second of 2 steps reuses all 12 layers
    assert all(isinstance(v, float) for v in rec["quality"].values()), rec["quality"]
    # The same generations redone here, then every paired number recomputed independently.
    model, ev = build_dit("DiT-Digits").randomize_(0).eval(), fake_evaluator()
    labels, seeds = [0, 1, 2, 3], [0, 1, 2, 3]
    ref = sample(model, labels, seeds, steps=2, cfg_scale=1.0)
    apply_dqar(model, DQARConfig(schedule="static", warmup=0.0, layer_fraction=1.0))
    try:
        images = sample(model, labels, seeds, steps=2, cfg_scale=1.0)
    finally:
        remove_dqar(model)
    q = rec["quality"]
    assert q["accuracy"] == float((ev.predict(images) == torch.tensor(labels)).double().mean())
    assert q["psnr"] == pytest.approx(_psnr(images, ref), rel=1e-4)
    # (4 images in a wider feature space: the FIDs are degenerate here, exact ones are checked above.)
    assert q["fid_vs_data"] > q["fid_vs_baseline"] >= 0.0   # random weights: far from real digits, near their own run


# ------------------------------------------------------------------------------------------------
# named baselines (diffusers' caches), their options, and every contender's counted work share
# ------------------------------------------------------------------------------------------------

def test_bench_counts_the_work_of_both_contenders(tiny):
    res = _run(tiny, DQARConfig(schedule="static", warmup=0.2, layer_fraction=1.0))
    rec = res.record
    assert rec["baseline"]["calls"] == {"attn": 1.0, "mlp": 1.0, "block": 1.0}    # the uncached model
    assert rec["baseline"]["name"] == "none" and rec["baseline"]["settings"] is None
    # Attention only: each reuse event skips one layer's attention for one CFG branch of every image.
    share = 1 - rec["dqar"]["reuse_events"] / (2 * tiny.config.depth * STEPS)
    assert rec["calls"] == {"attn": pytest.approx(share, abs=1e-12), "mlp": 1.0, "block": 1.0}
    assert rec["calls"]["attn"] < 1.0
    assert "work a/m/b" in format_table(rec) and f"{share:.2f}/1.00/1.00" in format_table(rec)


def test_cli_bench_against_seacache_with_an_option(tmp_path, capsys):
    from dqar.cli import main
    from dqar.harness.baselines import BASELINE_SETTINGS

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "DiT-Tiny", "--n", "2", "--steps", "6", "--repeats", "1", "--warmup-runs", "1",
                 "--threads", "1", "--no-progress", "--schedule", "interval", "--interval", "2", "--warmup", "0",
                 "--targets", "block", "--baseline", "seacache", "--baseline-option", "threshold=5",
                 "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    base = rec["baseline"]
    assert base["name"] == "seacache"
    assert base["settings"] == {**BASELINE_SETTINGS["seacache"], "threshold": 5.0}
    # SeaCache skips whole blocks (attention and MLP with them) on the random tiny model at this threshold.
    assert base["calls"]["attn"] == base["calls"]["mlp"] == base["calls"]["block"] < 1.0
    # DQAR's block target: every other step after the first reuses all 4 blocks of both branches.
    share = 1 - rec["dqar"]["reuse_events"] / (2 * 4 * 6)
    assert rec["calls"] == {"attn": pytest.approx(share), "mlp": pytest.approx(share), "block": pytest.approx(share)}
    assert share < 1.0
    text = capsys.readouterr().out
    assert "baseline seacache threshold=5.0," in text and "\nseacache " in text


def test_cli_bench_calibrates_magcache_on_the_run_unless_told(tmp_path):
    from dqar.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "--model", "DiT-Tiny", "--n", "2", "--steps", "3", "--repeats", "1", "--warmup-runs", "0",
            "--threads", "1", "--no-progress", "--sampler", "dpm", "--cfg-scale", "2", "--baseline", "magcache",
            "--baseline-option", "calibration_images=2", "--json", str(out)]
    assert main(args) == 0
    s = json.loads(out.read_text())["baseline"]["settings"]
    assert (s["calibration_steps"], s["calibration_sampler"], s["calibration_cfg_scale"]) == (3, "dpm", 2.0)
    assert len(s["mag_ratios"]) == 3 and s["calibration_images"] == 2
    assert main(args + ["--baseline-option", "calibration_steps=4"]) == 0
    s = json.loads(out.read_text())["baseline"]["settings"]
    assert s["calibration_steps"] == 4 and len(s["mag_ratios"]) == 4


@pytest.mark.parametrize("args, message", [
    (["--baseline", "teacache"],
     "--baseline='teacache' is not known; allowed: none, ptq-int8, pab, taylorseer, seacache, fastercache, fbc, "
     "magcache"),
    (["--baseline", "seacache", "--baseline-option", "treshold=0.1"],
     "--baseline-option: baseline 'seacache' has no option 'treshold'; allowed: threshold, residual_order"),
    (["--baseline", "fbc", "--baseline-option", "threshold=-1"],
     "--baseline-option: baseline 'fbc' option threshold='-1' is not allowed: must be a finite number >= 0.0"),
    (["--baseline-option", "threshold=0.1"], "--baseline-option: baseline 'none' takes no options; got threshold"),
    (["--baseline", "ptq-int8", "--baseline-option", "bits=8"], "baseline 'ptq-int8' takes no options; got bits"),
    (["--baseline", "fbc", "--baseline-option", "threshold"], "--baseline-option 'threshold' must look like KEY=VALUE"),
    (["--baseline", "fbc", "--baseline-option", "threshold=0.1", "--baseline-option", "threshold=0.2"],
     "--baseline-option names 'threshold' twice ('0.1' and '0.2'); give it once"),
    (["--baseline", "fastercache", "--cfg-scale", "1"], "--baseline fastercache needs classifier-free guidance"),
])
def test_cli_bench_refuses_bad_baselines_and_options_in_one_line_before_any_work(capsys, args, message):
    from dqar.cli import main

    # A model that does not exist: the error must come from the baseline, before any model is resolved.
    assert main(["bench", "--model", "no-such-model", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dqar bench: error: ") and message in err and err.count("\n") == 1, err


def test_cli_baseline_names_mirror_the_harness():
    from dqar.cli.bench import BASELINE_CHOICES
    from dqar.harness.baselines import BASELINES

    assert BASELINE_CHOICES == BASELINES


def test_cli_bench_takes_its_guidance_scale_from_the_model_card(monkeypatch, capsys):
    import dqar.digits.embedded
    from dqar.cli import main
    from dqar.digits.evaluator import DigitsEvaluator

    monkeypatch.setattr(dqar.digits.embedded, "load_embedded_model",
                        lambda path=None: build_dit("DiT-Digits").randomize_(0).eval())
    monkeypatch.setattr(dqar.digits.embedded, "load_evaluator",
                        lambda path=None: (torch.manual_seed(0), DigitsEvaluator().eval())[1])
    # A card whose scale differs from the 1.5 fallback, so the test can tell where the scale came from.
    card = 3.0
    shipped = dqar.digits.embedded.model_card()
    monkeypatch.setattr(dqar.digits.embedded, "model_card",
                        lambda path=None: {**shipped, "recommended_cfg_scale": card})
    assert main(["bench", "--n", "2", "--steps", "2", "--repeats", "1", "--warmup-runs", "0", "--threads", "1",
                 "--no-progress", "--schedule", "none"]) == 0
    assert f"cfg {float(card)}, baseline none" in capsys.readouterr().out
    assert main(["bench", "--model", "DiT-Tiny", "--n", "2", "--steps", "2", "--repeats", "1", "--warmup-runs", "0",
                 "--threads", "1", "--no-progress", "--schedule", "none"]) == 0
    assert "cfg 1.5, baseline none" in capsys.readouterr().out        # no card: DiT's FID setting
