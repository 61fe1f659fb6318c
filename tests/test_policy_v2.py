"""Policy v2 (issue 17): cache age and last forecast error as features, rows from runs that forecast."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dqar.harness.policy_v2 import (RefreshSchedule, feature_matrix_v2, fit_policy_v2, label_rows_v2,
                                    trace_refresh_run)
from dqar.method.config import DQARConfig
from dqar.method.hooks import apply_dqar, remove_dqar
from dqar.method.policy import FORMAT, FORMAT_V2, PolicyFileError, ReusePolicy, load_policy, save_policy
from dqar.method.stats import POLICY_FEATURE_NAMES, POLICY_FEATURE_NAMES_V2, POLICY_FEATURE_NAMES_V2_NOENTROPY
from dqar.sampling import sample

LABELS, SEEDS, STEPS = [1, 2], [0, 1], 12
# `dqar train-policy` on a tiny model: two short v2-noentropy runs, the rows measured as the options say.
TINY_NOENTROPY_RUNS = ["train-policy", "--features", "v2-noentropy", "--model", "DiT-Tiny", "--n-runs", "2",
                       "--per-class", "2", "--steps", "8", "--epochs", "5", "--cfg-scale", "1.5", "--max-age", "3",
                       "--no-progress", "--val-fraction", "0.5"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _constant_policy(bias: float, max_cache_age: int = 3, feature_set: str = "v2") -> ReusePolicy:
    """p_reuse = sigmoid(bias) for every row: a v2 policy whose decisions are hand-checkable."""
    policy = ReusePolicy(feature_set=feature_set, max_cache_age=max_cache_age)
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()
        policy.net[4].bias.fill_(bias)
    return policy


def _run(model, policy_file, **config):
    """Images, summary, controller and, per step and branch, {planned layer: (cache age, measured error)}."""
    ctl = apply_dqar(model, DQARConfig(schedule="policy", policy_path=str(policy_file), warmup=0.0,
                                       targets=("attn", "mlp"), forecast_order=2, **config))
    seen, plan = [], ctl.schedule.plan_branches

    def spy(step, entropies, branches):
        out = plan(step, entropies, branches)
        h = ctl.schedule.history
        seen.extend({i: (h.age(i, b, step.step_index), h.measured(i, b)) for i in out[b]} for b in branches)
        return out

    ctl.schedule.plan_branches = spy
    try:
        images = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        return images, ctl.summary(), ctl, seen
    finally:
        remove_dqar(model)


# ------------------------------------------------------------------------------------------------ files

def test_v2_file_round_trip_records_its_feature_set_and_needs(tmp_path):
    x = torch.randn(40, len(POLICY_FEATURE_NAMES_V2), generator=torch.Generator().manual_seed(0))
    fit = fit_policy_v2(x, (x[:, 5] > 0).float(), [k % 4 for k in range(40)], max_cache_age=5, epochs=5)
    st, js = save_policy(fit.policy, tmp_path / "v2.safetensors")
    loaded = load_policy(st)
    assert loaded.feature_set == "v2" and loaded.feature_names == POLICY_FEATURE_NAMES_V2
    assert loaded.max_cache_age == 5 and loaded.uses_history
    assert torch.equal(loaded(x), fit.policy(x))
    with safe_open(str(st), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT_V2 and meta["feature_set"] == "v2"
    assert json.loads(meta["feature_names"]) == list(POLICY_FEATURE_NAMES_V2)
    card = json.loads(js.read_text())
    assert card["format"] == FORMAT_V2 and card["feature_set"] == "v2" and card["max_cache_age"] == 5
    assert card["feature_names"] == list(POLICY_FEATURE_NAMES_V2) and "forecast error" in card["needs"]
    # The seed's 5-feature format is unchanged.
    v1, _ = save_policy(ReusePolicy(), tmp_path / "v1.safetensors")
    with safe_open(str(v1), framework="pt") as f:
        assert f.metadata()["format"] == FORMAT and "feature_set" not in f.metadata()
    assert load_policy(v1).feature_set == "v1" and not load_policy(v1).uses_history
    # The shipped file is v2 less the entropy, trained on the MLP's one-image errors of the conditional branch
    # (docs/POLICY.md, "The MLP's error alone"): forecasts at most 2 steps old, threshold 0.7, no attention
    # statistic, and its metadata says how to measure what it reads.
    shipped = load_policy()
    assert shipped.feature_set == "v2-noentropy" and shipped.feature_names == POLICY_FEATURE_NAMES_V2_NOENTROPY
    assert shipped.max_cache_age == 2 and shipped.threshold == 0.7 and not shipped.reads_entropy
    assert shipped.info["use_with"] == {"schedule": "policy", "targets": ["attn", "mlp"], "forecast_order": 2,
                                        "warmup": 0.0, "error_images": 1, "branch_decisions": "cond",
                                        "error_targets": ["mlp"]}


def test_the_seeds_five_feature_policy_stays_loadable_and_usable():
    """The previous shipped policy (format dqar-policy/1), kept in docs/policy, still runs as before."""
    from pathlib import Path

    from dqar.digits.embedded import load_embedded_model

    v1 = Path(__file__).resolve().parents[1] / "docs" / "policy" / "policy_digits_v1.safetensors"
    policy = load_policy(v1)
    assert policy.feature_set == "v1" and policy.feature_names == POLICY_FEATURE_NAMES
    model = load_embedded_model()
    ctl = apply_dqar(model, DQARConfig(schedule="policy", policy_path=str(v1)))
    try:
        images = sample(model, [3, 7], [0, 1], steps=20, cfg_scale=1.5)
        summary = ctl.summary()
    finally:
        remove_dqar(model)
    assert summary["reuse_events"] > 0 and sum(summary["events_per_step"][:8]) == 0     # warmup 0.4
    assert ctl.history is None and not ctl.needs_effect                                 # v1 reads no history
    assert torch.isfinite(images).all()


def _edit(src, dst, **meta_changes):
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"feature_names": json.dumps([*POLICY_FEATURE_NAMES, "cache_age", "log_forecast_error", "magic"])},
     "needs features ['magic'] that this DQAR cannot compute"),
    ({"feature_set": "v3"}, "records feature set 'v3'"),
    ({"max_cache_age": "0"}, "has max_cache_age '0' in its metadata"),
    ({"max_cache_age": "null"}, "has max_cache_age 'null' in its metadata"),
    ({"format": "dqar-policy/9"}, "has format 'dqar-policy/9', expected 'dqar-policy/1' or 'dqar-policy/2'"),
])
def test_a_v2_file_this_code_cannot_supply_raises_naming_file_and_feature(tmp_path, changes, message):
    good, _ = save_policy(_constant_policy(0.0), tmp_path / "good.safetensors")
    bad = _edit(good, tmp_path / "bad.safetensors", **changes)
    with pytest.raises(PolicyFileError) as exc:
        load_policy(bad)
    assert str(bad) in str(exc.value) and message in str(exc.value)


def test_a_v1_format_file_with_v2_features_is_refused(tmp_path):
    good, _ = save_policy(_constant_policy(0.0), tmp_path / "good.safetensors")
    bad = _edit(good, tmp_path / "v1v2.safetensors", format=FORMAT)
    with pytest.raises(PolicyFileError, match=r"v1v2\.safetensors.*8 features, but this DQAR computes 5"):
        load_policy(bad)


def test_saving_a_v2_policy_without_its_max_age_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_cache_age=None is not allowed for a v2 policy"):
        save_policy(ReusePolicy(feature_set="v2"), tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="feature_set='v9' is not allowed"):
        ReusePolicy(feature_set="v9")


# ------------------------------------------------------------------------------------------------ in use

def test_v2_forecasts_by_age_and_never_past_its_max_age(model, baseline, tmp_path):
    """An always-yes policy with max age 2: steps 0-2 fill the order-2 history, then every layer forecasts
    two steps and computes the third (ages 1, 2 forecast; age 3 > 2 computes)."""
    path, _ = save_policy(_constant_policy(10.0, max_cache_age=2), tmp_path / "yes.safetensors")
    images, summary, ctl, seen = _run(model, path)
    layers, branches = model.config.depth, 2
    forecast_steps = [s for s in range(STEPS) if s >= 3 and (s - 3) % 3 != 2]
    per_step = [layers * branches * 2 if s in forecast_steps else 0 for s in range(STEPS)]   # attn + mlp
    assert summary["events_per_step"] == per_step
    assert not torch.equal(images, baseline)
    # What the schedule read: planned layers are 1 or 2 steps old and have a measured error.
    ages = {a for plans in seen for a, _ in plans.values()}
    assert ages == {1, 2} and all(m is not None for plans in seen for _, m in plans.values())
    # A second generation starts from nothing: same images, same events.
    images2, summary2, _, _ = _run(model, path)
    assert torch.equal(images, images2) and summary2["events_per_step"] == per_step


def test_v2_never_forecasting_restores_the_baseline(model, baseline, tmp_path):
    path, _ = save_policy(_constant_policy(-10.0), tmp_path / "no.safetensors")
    images, summary, _, _ = _run(model, path)
    assert summary["reuse_events"] == 0
    assert torch.equal(images, baseline)


def test_the_history_error_is_error_control_measurement_summed_over_targets(model, tmp_path):
    path, _ = save_policy(_constant_policy(10.0, max_cache_age=2), tmp_path / "yes.safetensors")
    ctl = apply_dqar(model, DQARConfig(schedule="policy", policy_path=str(path), warmup=0.0,
                                       targets=("attn", "mlp"), forecast_order=2))
    try:
        ctl.begin_step(0, STEPS)
        assert ctl.needs_effect and ctl.history is ctl.schedule.history
        # The meter plans nothing and keeps no list: its errors go to the history; listen in on them.
        assert not ctl.effect_meter.plans
        errors, to_history = [], ctl.effect_meter.on_measured
        ctl.effect_meter.on_measured = lambda key, step, m: (
            m is not None and errors.append((step, *key, m[1], m[0])), to_history(key, step, m))
        sample(model, LABELS, SEEDS, steps=STEPS - 1, cfg_scale=2.0)       # ends at step 10, state still there
        ctl.resolve_measurements()
        history = dict(ctl.history.error), dict(ctl.history.last_compute)
        ctl.begin_step(0, STEPS)                              # a new generation forgets it all
        assert not ctl.history.last_compute and not ctl.history.error and not ctl.effect_meter._pending
        assert not ctl.effect_meter.errors and not ctl.effect_meter._refresh_at
    finally:
        remove_dqar(model)
    assert errors and {e[3] for e in errors} == {"attn", "mlp"}
    # 11 steps: computes at 0, 1, 2, 5, 8; the last error was measured at step 8, age 3.
    assert set(history[1].values()) == {8}
    for (layer, branch), (error, age) in history[0].items():
        mine = [e for e in errors if e[0] == 8 and e[1] == layer and e[2] == branch]
        assert len(mine) == 2 and age == 3 == mine[0][4]
        assert error == pytest.approx(mine[0][5] + mine[1][5], rel=1e-12)
    assert len(history[0]) == model.config.depth * 2


@pytest.mark.parametrize("config, message", [
    ({"targets": ("block",)}, "reads attention entropy, measured only on the attention target"),
    ({"mode": "kv", "targets": ("attn",), "forecast_order": 0}, "mode='kv' keeps none"),
])
def test_v2_where_its_features_cannot_be_measured_is_refused(model, tmp_path, config, message):
    path, _ = save_policy(_constant_policy(0.0), tmp_path / "p.safetensors")
    base = dict(schedule="policy", policy_path=str(path), warmup=0.0, targets=("attn", "mlp"), forecast_order=2)
    with pytest.raises(ValueError, match=message):
        apply_dqar(model, DQARConfig(**{**base, **config}))


# ------------------------------------------------------------------------------------------------ training rows

def test_refresh_runs_give_rows_whose_harm_is_the_measured_error(model):
    rows = trace_refresh_run(model, LABELS, SEEDS, p_forecast=0.6, max_age=3, run_seed=4, steps=STEPS,
                             cfg_scale=2.0)
    assert rows and {r["branch"] for r in rows} == {"cond", "uncond"}
    assert {int(r["cache_age"]) for r in rows} <= {1, 2, 3} and max(r["cache_age"] for r in rows) > 1
    assert all(r["harm_age"] == r["cache_age"] and r["harm"] >= 0 for r in rows)
    assert all(r["step"] >= 3 for r in rows)          # order 2: three computes before a forecast is possible
    again = trace_refresh_run(model, LABELS, SEEDS, p_forecast=0.6, max_age=3, run_seed=4, steps=STEPS,
                              cfg_scale=2.0)
    assert again == rows                                 # seeded, and nothing carried over
    never = trace_refresh_run(model, LABELS, SEEDS, p_forecast=0.0, max_age=3, run_seed=4, steps=STEPS,
                              cfg_scale=2.0)
    assert {r["cache_age"] for r in never} == {1.0} and never[0]["reuse_fraction"] == 0.0
    x, y = feature_matrix_v2(rows), label_rows_v2(rows, 0.05)
    assert x.shape == (len(rows), 8) and set(y.tolist()) <= {0.0, 1.0}


def test_refresh_schedule_rejects_bad_settings():
    config = DQARConfig()
    with pytest.raises(ValueError, match="p_forecast=1.5 is not allowed"):
        RefreshSchedule(config, 1.5, 3, 0)
    with pytest.raises(ValueError, match="max_age=0 is not allowed"):
        RefreshSchedule(config, 0.5, 0, 0)


# ------------------------------------------------------------------------------------------------ command line

def test_train_policy_v2_end_to_end_writes_a_loadable_v2_policy(tmp_path):
    from dqar.cli import main

    out = tmp_path / "v2"
    rc = main(["train-policy", "--features", "v2", "--model", "DiT-Tiny", "--out", str(out), "--n-runs", "2",
               "--per-class", "1", "--steps", "8", "--epochs", "20", "--cfg-scale", "1.5", "--max-age", "3",
               "--no-progress", "--val-fraction", "0.5"])
    assert rc == 0
    policy = load_policy(out / "policy_digits.safetensors")
    assert policy.feature_set == "v2" and 1 <= policy.max_cache_age <= 3
    card = json.loads((out / "policy_digits.json").read_text())
    assert card["feature_names"] == list(POLICY_FEATURE_NAMES_V2) and "--features v2" in card["command"]
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert rows and {r["run"] for r in rows} == {0, 1} and {"harm", "label"} <= set(rows[0])
    again = tmp_path / "again"
    assert main(["train-policy", "--features", "v2", "--model", "DiT-Tiny", "--out", str(again), "--n-runs", "2",
                 "--per-class", "1", "--steps", "8", "--epochs", "20", "--cfg-scale", "1.5", "--max-age", "3",
                 "--no-progress", "--val-fraction", "0.5", "--from", str(out)]) == 0
    assert torch.equal(load_policy(again / "policy_digits.safetensors").net[0].weight, policy.net[0].weight)
    # The same rows train the entropy-free set, whose card names its own command and features.
    ne = tmp_path / "ne"
    assert main(["train-policy", "--features", "v2-noentropy", "--model", "DiT-Tiny", "--out", str(ne), "--n-runs",
                 "2", "--per-class", "1", "--steps", "8", "--epochs", "20", "--cfg-scale", "1.5", "--max-age", "3",
                 "--no-progress", "--val-fraction", "0.5", "--from", str(out)]) == 0
    lite = load_policy(ne / "policy_digits.safetensors")
    card = json.loads((ne / "policy_digits.json").read_text())
    assert lite.feature_set == "v2-noentropy" and not lite.reads_entropy
    assert card["feature_names"] == list(POLICY_FEATURE_NAMES_V2_NOENTROPY)
    assert "--features v2-noentropy" in card["command"] and card["feature_set"] == "v2-noentropy"


@pytest.mark.parametrize("argv, message", [
    (["--max-age", "3"], "--max-age applies only to --features v2"),
    (["--features", "v2", "--p-forecast", "0.5,2"], "--p-forecast='0.5,2' is not allowed"),
    (["--features", "v2", "--n-runs", "1"], "--n-runs=1 is not allowed: must be >= 2"),
    (["--features", "v2", "--label-tolerance", "-1"], "--label-tolerance=-1.0 is not allowed"),
    (["--features", "v2", "--forecast-order", "3"], "--forecast-order=3 is not allowed"),
    (["--features", "v2", "--error-images", "-1"], "--error-images=-1 is not allowed: must be >= 0"),
    (["--error-images", "1"], "--error-images applies only to --features v2"),
    (["--features", "v2-noentropy", "--targets", "mlp"], "--targets='mlp' is not allowed: must be one of attn,mlp, block"),
    (["--features", "v2", "--targets", "block"], "--targets block measures no attention entropy"),
    (["--features", "v2", "--branch-decisions", "both"], "--branch-decisions='both' is not allowed: must be each or cond"),
    (["--branch-decisions", "cond"], "--branch-decisions applies only to --features v2"),
])
def test_train_policy_v2_bad_values_exit_2_before_any_work(tmp_path, capsys, argv, message):
    from dqar.cli import main

    assert main(["train-policy", "--model", "DiT-Tiny", "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_train_policy_v2_with_error_images_measures_the_same_runs_on_fewer_images(tmp_path, capsys):
    """The refresh plan is random, not error-driven, so both settings run the same trajectories: each row's
    harm over one image per branch is at most the every-image maximum, and the card says what it was trained on."""
    from dqar.cli import main

    common = TINY_NOENTROPY_RUNS
    assert main([*common, "--out", str(tmp_path / "all")]) == 0
    assert main([*common, "--out", str(tmp_path / "one"), "--error-images", "1"]) == 0
    every, one = ([json.loads(line) for line in (tmp_path / d / "rows.jsonl").read_text().splitlines()]
                  for d in ("all", "one"))
    keys = [(r["run"], r["step"], r["layer"], r["branch"]) for r in every]
    assert keys == [(r["run"], r["step"], r["layer"], r["branch"]) for r in one]
    assert {r["error_images"] for r in one} == {1} and {r["error_images"] for r in every} == {0}
    assert all(a["harm"] <= b["harm"] * (1 + 1e-6) for a, b in zip(one, every))
    assert any(a["harm"] < 0.99 * b["harm"] for a, b in zip(one, every))
    card = json.loads((tmp_path / "one" / "policy_digits.json").read_text())
    assert card["use_with"]["error_images"] == 1 and "--error-images 1" in card["command"]
    assert "1 image(s) per branch" in card["labels"]["rule"]
    # rows measured one way do not train a policy meant for the other
    assert main([*common, "--out", str(tmp_path / "mixed"), "--from", str(tmp_path / "all"), "--error-images",
                 "1"]) == 2
    assert "measured with error_images [0], not --error-images 1" in capsys.readouterr().err


def test_step_scaled_labels_divide_by_the_steps_median_one_step_harm():
    from dqar.harness.policy_v2 import default_tolerance, step_scales

    rows = [{"step": 3, "cache_age": 1, "harm": 0.01}, {"step": 3, "cache_age": 1, "harm": 0.03},
            {"step": 3, "cache_age": 2, "harm": 0.05}, {"step": 9, "cache_age": 1, "harm": 0.5},
            {"step": 9, "cache_age": 2, "harm": 0.6}, {"step": 8, "cache_age": 2, "harm": 0.4}]
    scales = step_scales(rows)
    assert scales == {3: 0.03, 9: 0.5, 8: 0.5}              # step 8 has no age-1 row: the nearest step's
    assert label_rows_v2(rows, 1.5, scales).tolist() == [1, 1, 0, 1, 1, 1]
    assert label_rows_v2(rows, 0.1).tolist() == [1, 1, 1, 0, 0, 0]
    assert default_tolerance(rows, scales=scales) == pytest.approx(1.2)   # scaled age-2 harms 5/3, 1.2, 0.8
    with pytest.raises(ValueError, match="no rows at cache age 1"):
        step_scales([{"step": 3, "cache_age": 2, "harm": 0.1}])


def test_train_policy_v2_max_cache_age_caps_the_policy_and_keeps_every_row(tmp_path):
    from dqar.cli import main

    common = ["train-policy", "--features", "v2", "--model", "DiT-Tiny", "--n-runs", "2", "--per-class", "1",
              "--steps", "10", "--epochs", "5", "--cfg-scale", "1.5", "--max-age", "4", "--no-progress",
              "--val-fraction", "0.5", "--p-forecast", "0.9"]
    assert main([*common, "--out", str(tmp_path / "all")]) == 0
    assert main([*common, "--out", str(tmp_path / "cap"), "--max-cache-age", "2", "--from", str(tmp_path / "all")]) == 0
    every = [json.loads(line) for line in (tmp_path / "all" / "rows.jsonl").read_text().splitlines()]
    kept = [json.loads(line) for line in (tmp_path / "cap" / "rows.jsonl").read_text().splitlines()]
    assert max(r["cache_age"] for r in every) > 2
    assert kept == every
    capped, full = (load_policy(tmp_path / d / "policy_digits.safetensors") for d in ("cap", "all"))
    assert capped.max_cache_age == 2 and full.max_cache_age == max(r["cache_age"] for r in every)
    assert torch.equal(capped.net[0].weight, full.net[0].weight)


# ------------------------------------------------------------------------------------------------ no entropy

def test_a_policy_without_entropy_measures_no_attention_statistic(model, baseline, tmp_path, monkeypatch):
    """v2-noentropy: the same decisions as v2 where the features agree (an always-yes policy plans by age
    alone), but no attention logits are taken and no entropy recorded; it may run without the attention
    target; its file says what it needs."""
    import dqar.method.target as target_module

    calls = []
    real = target_module.attention_logits
    monkeypatch.setattr(target_module, "attention_logits", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    with_entropy, _ = save_policy(_constant_policy(10.0, max_cache_age=2), tmp_path / "v2.safetensors")
    images_v2, summary_v2, _, seen_v2 = _run(model, with_entropy)
    assert calls
    calls.clear()
    path, card = save_policy(_constant_policy(10.0, max_cache_age=2, feature_set="v2-noentropy"),
                             tmp_path / "ne.safetensors")
    loaded = load_policy(path)
    assert loaded.feature_names == POLICY_FEATURE_NAMES_V2_NOENTROPY and not loaded.reads_entropy
    assert "entropy" not in json.loads(card.read_text())["needs"]
    images, summary, ctl, seen = _run(model, path)
    assert not calls and not ctl.needs_entropy
    assert all(e is None for e in summary["entropy_per_step"])
    assert summary["reuse_events"] > 0 and summary["events_per_step"] == summary_v2["events_per_step"]
    assert seen == seen_v2 and torch.equal(images, images_v2) and not torch.equal(images, baseline)
    # Its features are v2's less the entropy: the MLP sees the rows the v2 policy would, first column dropped.
    rows = []
    forward = ReusePolicy.forward
    monkeypatch.setattr(ReusePolicy, "forward", lambda self, x: (rows.append((self.feature_set, x)), forward(self, x))[1])
    _run(model, with_entropy)
    _run(model, path)
    v2_rows = [x for fs, x in rows if fs == "v2"]
    ne_rows = [x for fs, x in rows if fs == "v2-noentropy"]
    assert len(v2_rows) == len(ne_rows) > 0
    assert all(torch.equal(a[:, 1:], b) for a, b in zip(v2_rows, ne_rows))
    # Without attention among the targets it still runs (an MLP-only policy), where v2 is refused.
    mlp_only = apply_dqar(model, DQARConfig(schedule="policy", policy_path=str(path), warmup=0.0,
                                            targets=("mlp",), forecast_order=2))
    try:
        sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        assert mlp_only.summary()["reuse_events"] > 0
    finally:
        remove_dqar(model)
    with pytest.raises(ValueError, match="reads attention entropy"):
        apply_dqar(model, DQARConfig(schedule="policy", policy_path=str(with_entropy), targets=("mlp",)))


def test_train_policy_noentropy_from_v2_rows(tmp_path):
    """`--features v2-noentropy --from DIR` trains on the v2 rows' columns less the entropy."""
    x = torch.randn(40, len(POLICY_FEATURE_NAMES_V2), generator=torch.Generator().manual_seed(0))
    rows = [dict(zip(POLICY_FEATURE_NAMES_V2, r)) for r in x.tolist()]
    assert torch.equal(feature_matrix_v2(rows, "v2-noentropy"), x[:, 1:])
    fit = fit_policy_v2(x[:, 1:], (x[:, 6] > 0).float(), [k % 4 for k in range(40)], max_cache_age=2, epochs=5,
                        feature_set="v2-noentropy")
    st, _ = save_policy(fit.policy, tmp_path / "ne.safetensors")
    assert torch.equal(load_policy(st)(x[:, 1:]), fit.policy(x[:, 1:]))


def test_both_branches_planned_in_one_forward_equal_each_planned_alone(model, tmp_path):
    """plan_branches runs the policy once over every branch's rows; thresholds and the budget still apply per
    branch, so the plans equal those of one branch at a time (a random policy, a budget that binds)."""
    torch.manual_seed(0)
    policy = ReusePolicy(feature_set="v2-noentropy", max_cache_age=3)
    path, _ = save_policy(policy, tmp_path / "random.safetensors")
    ctl = apply_dqar(model, DQARConfig(schedule="policy", policy_path=str(path), policy_threshold=0.0,
                                       policy_budget=0.5, warmup=0.0, targets=("attn", "mlp"), forecast_order=1))
    try:
        sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        schedule, step = ctl.schedule, ctl.step
        together = schedule.plan_branches(step, {}, ("cond", "uncond"))
        alone = {b: schedule.plan(step, b, {}) for b in ("cond", "uncond")}
    finally:
        remove_dqar(model)
    assert together == alone
    assert all(len(plan) == model.config.depth // 2 for plan in together.values())     # the budget bound


# ------------------------------------------------------------------------------------------------ branch_decisions

def test_conditional_decisions_serve_both_branches_and_measure_only_cond(model, baseline, tmp_path, monkeypatch):
    """branch_decisions="cond": the policy plans the conditional branch alone (its rows only), the
    unconditional branch takes that plan, only cond computes are measured; each generation starts afresh and
    a policy that never forecasts gives the plain model's images."""
    path, _ = save_policy(_constant_policy(10.0, max_cache_age=2, feature_set="v2-noentropy"), tmp_path / "y.safetensors")
    forwards = []
    real = ReusePolicy.forward
    monkeypatch.setattr(ReusePolicy, "forward", lambda self, x: forwards.append(x.shape[0]) or real(self, x))
    from dqar.method.controller import ModuleHistory
    measured, computed = [], ModuleHistory.computed
    monkeypatch.setattr(ModuleHistory, "computed",
                        lambda self, layer, branch, step, m: measured.append(branch) or computed(self, layer, branch, step, m))
    images, summary, ctl, seen = _run(model, path, branch_decisions="cond")
    assert measured and set(measured) == {"cond"}
    assert all(rows <= model.config.depth for rows in forwards) and forwards      # one branch's layers per plan
    # The spy saw every branch's plan: the two branches of a step plan the same layers.
    assert all(seen[i].keys() == seen[i + 1].keys() for i in range(0, len(seen), 2))
    assert summary["reuse_events"] > 0 and not torch.equal(images, baseline)
    images2, summary2, _, _ = _run(model, path, branch_decisions="cond")
    assert torch.equal(images, images2) and summary2["events_per_step"] == summary["events_per_step"]
    never, _ = save_policy(_constant_policy(-10.0, feature_set="v2-noentropy"), tmp_path / "n.safetensors")
    plain, s, _, _ = _run(model, never, branch_decisions="cond")
    assert s["reuse_events"] == 0 and torch.equal(plain, baseline)


def test_train_policy_on_the_block_target_with_conditional_decisions(tmp_path, capsys):
    """--targets block --branch-decisions cond: rows of the conditional branch only, measured on the block
    target (no entropy: v2-noentropy), recorded in the rows and the card; rows measured otherwise are refused."""
    from dqar.cli import main

    common = [*TINY_NOENTROPY_RUNS, "--targets", "block"]
    assert main([*common, "--out", str(tmp_path / "each")]) == 0
    assert main([*common, "--out", str(tmp_path / "cond"), "--branch-decisions", "cond"]) == 0
    each, cond = ([json.loads(line) for line in (tmp_path / d / "rows.jsonl").read_text().splitlines()]
                  for d in ("each", "cond"))
    assert {r["branch"] for r in each} == {"cond", "uncond"} and {r["branch"] for r in cond} == {"cond"}
    assert {(r["targets"], r["branch_decisions"]) for r in cond} == {("block", "cond")}
    card = json.loads((tmp_path / "cond" / "policy_digits.json").read_text())
    assert card["use_with"]["targets"] == ["block"] and card["use_with"]["branch_decisions"] == "cond"
    assert "--targets block --branch-decisions cond" in card["command"]
    policy = load_policy(tmp_path / "cond" / "policy_digits.safetensors")
    assert policy.feature_set == "v2-noentropy"
    assert main([*common, "--out", str(tmp_path / "mixed"), "--from", str(tmp_path / "each"), "--branch-decisions",
                 "cond"]) == 2
    assert "measured with branch_decisions ['each'], not --branch-decisions cond" in capsys.readouterr().err


def test_a_policy_run_measured_otherwise_than_trained_warns(tmp_path):
    """The card's use_with (also in the file's metadata) says how the error feature was measured; a run that
    measures it otherwise gets a warning naming each difference, a matching run none."""
    import warnings

    from dqar.method.schedules import build_schedule

    path, _ = save_policy(_constant_policy(0.0, feature_set="v2-noentropy"), tmp_path / "p.safetensors",
                          info={"use_with": {"targets": ["attn", "mlp"], "error_images": 1, "branch_decisions": "cond"}})
    matching = dict(schedule="policy", policy_path=str(path), targets=("attn", "mlp"), error_images=1,
                    branch_decisions="cond")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_schedule(DQARConfig(**matching))
    with pytest.warns(RuntimeWarning, match=r"trained with targets=\('attn', 'mlp'\) \(this run: \('attn',\)\), "
                                            r"error_images=1 \(this run: 0\), branch_decisions='cond' \(this run: 'each'\)"):
        build_schedule(DQARConfig(schedule="policy", policy_path=str(path)))
    # A file without use_with (written before it existed) warns about nothing it does not record.
    bare, _ = save_policy(_constant_policy(0.0, feature_set="v2-noentropy"), tmp_path / "bare.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_schedule(DQARConfig(schedule="policy", policy_path=str(bare), targets=("block",)))


def test_error_targets_measure_only_those_targets(model, tmp_path, monkeypatch):
    """error_targets=("mlp",): only MLP computes are measured (the history's error is theirs alone), attention
    still forecasts with its layer's plan; a policy that never forecasts keeps the plain model's images."""
    from dqar.method.controller import ModuleHistory
    from dqar.method.error_control import ErrorControl

    keys, observe = [], ErrorControl.observe
    monkeypatch.setattr(ErrorControl, "observe", lambda self, key, *a, **k: keys.append(key) or observe(self, key, *a, **k))
    path, _ = save_policy(_constant_policy(10.0, max_cache_age=2, feature_set="v2-noentropy"), tmp_path / "y.safetensors")
    images, summary, ctl, seen = _run(model, path, error_targets=("mlp",))
    assert keys and {k[2] for k in keys} == {"mlp"}
    assert summary["reuse_events"] > 0 and all(m is not None for plans in seen for _, m in plans.values())
    # Attention and MLP of a planned layer both forecast: the events come in pairs per layer and branch.
    assert all(n % 2 == 0 for n in summary["events_per_step"])
    again, summary2, _, _ = _run(model, path, error_targets=("mlp",))
    assert torch.equal(images, again) and summary2["events_per_step"] == summary["events_per_step"]


def test_train_policy_with_error_targets_records_them(tmp_path, capsys):
    from dqar.cli import main

    common = TINY_NOENTROPY_RUNS
    assert main([*common, "--out", str(tmp_path / "all")]) == 0
    assert main([*common, "--out", str(tmp_path / "mlp"), "--error-targets", "mlp"]) == 0
    every, mlp = ([json.loads(line) for line in (tmp_path / d / "rows.jsonl").read_text().splitlines()]
                  for d in ("all", "mlp"))
    assert {r["error_targets"] for r in mlp} == {"mlp"} and {r["error_targets"] for r in every} == {None}
    # The random refresh plan is the same, so the same positions; the MLP's error alone is at most the sum.
    assert [(r["run"], r["step"], r["layer"], r["branch"]) for r in mlp] == \
        [(r["run"], r["step"], r["layer"], r["branch"]) for r in every]
    assert all(a["harm"] <= b["harm"] * (1 + 1e-6) for a, b in zip(mlp, every))
    card = json.loads((tmp_path / "mlp" / "policy_digits.json").read_text())
    assert card["use_with"]["error_targets"] == ["mlp"] and "--error-targets mlp" in card["command"]
    assert main([*common, "--out", str(tmp_path / "x"), "--error-targets", "block"]) == 2
    assert "--error-targets='block' is not allowed" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "y"), "--from", str(tmp_path / "all"), "--error-targets", "mlp"]) == 2
    assert "measured with error_targets [None], not --error-targets mlp" in capsys.readouterr().err
