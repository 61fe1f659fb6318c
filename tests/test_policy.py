"""The learned reuse policy: features, training, the file format and its errors, and the schedule in use."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from dqar.method.config import DQARConfig
from dqar.method.hooks import apply_dqar, remove_dqar
from dqar.models.dit import build_dit
from dqar.method.policy import (FORMAT, NUM_FEATURES, PolicyFileError, ReusePolicy, load_policy, save_policy,
                         shipped_policy_path)
from dqar.harness.policy_training import (Calibration, Delta, feature_matrix, fit_calibration, fit_policy,
                                  generate_with_single_reuse, label_rows, split_by_group, trace_generation)
from dqar.sampling import make_scheduler, sample
from dqar.method.stats import POLICY_FEATURE_NAMES, policy_features


@pytest.fixture(autouse=True)
def one_thread():
    # These models are tiny: intra-op threads only add contention, which on a shared 2-core machine made
    # the same test 10-50x slower. Restored afterwards so other test files keep their setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return build_dit("DiT-Tiny").randomize_(0).eval()


def _monotone_policy(threshold: float = 0.5) -> ReusePolicy:
    """p_reuse = sigmoid(tanh(tanh(x0))): increasing in the first feature only, so decisions are hand-checkable."""
    policy = ReusePolicy(threshold=threshold)
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()
        policy.net[0].weight[0, 0] = 1.0
        policy.net[2].weight[0, 0] = 1.0
        policy.net[4].weight[0, 0] = 1.0
    return policy


# ------------------------------------------------------------------------------------------------ features

def test_policy_features_match_hand_computed_values():
    assert policy_features(2.5, 3.0, 4.0, 0.25, 200) == [2.5, math.log(3.0 + 1e-8), math.log(4.0 + 1e-8), 0.25, 1.0]
    assert policy_features(1.0, 0.0, 0.0, 1.0, 1) == [1.0, math.log(1e-8), math.log(1e-8), 1.0, 1 / 128]
    assert POLICY_FEATURE_NAMES == ("entropy", "log_snr", "log_norm", "step_progress", "prompt_length")


def test_trace_rows_hold_the_features_the_policy_sees(tiny):
    steps, seen = 4, []

    class Recorder:
        def on_step_begin(self, info):
            seen.append((info.timestep, info.x.clone()))

        def on_step_end(self, info):
            pass

    ctl = apply_dqar(tiny, DQARConfig(schedule="none", trace=True))
    try:
        sample(tiny, [3], [11], steps=steps, cfg_scale=1.5, observers=[Recorder()])
        raw = list(ctl.trace_rows)
    finally:
        remove_dqar(tiny)
    from dqar.harness.policy_training import policy_rows

    rows = policy_rows(raw, seed=11, label=3)
    # Steps 0 (nothing cached) and 1 (no traced predecessor for the entropy) give no rows.
    assert sorted({r["step"] for r in rows}) == [2, 3]
    assert len(rows) == 2 * 4 * 2                                       # steps x layers x branches
    acp = make_scheduler("ddim").alphas_cumprod
    raw_at = {(r["step"], r["layer"], r["branch"]): r for r in raw}
    for r in rows:
        t, x = seen[r["step"]]
        a2 = float(acp[t])
        assert r["log_snr"] == pytest.approx(math.log(a2 / (1 - a2) + 1e-8), rel=1e-6)
        assert r["log_norm"] == pytest.approx(math.log(float(x.flatten().norm()) + 1e-8), rel=1e-6)
        assert r["step_progress"] == r["step"] / (steps - 1)
        assert r["prompt_length"] == 1 / 128
        assert r["entropy"] == raw_at[(r["step"] - 1, r["layer"], r["branch"])]["features"][0]
        assert (r["seed"], r["class_label"]) == (11, 3)
    assert feature_matrix(rows).shape == (len(rows), NUM_FEATURES)


# ------------------------------------------------------------------------------------------------ decision

def test_reuse_mask_threshold_and_budget_exact():
    policy = _monotone_policy()
    x = torch.zeros(4, NUM_FEATURES)
    x[:, 0] = torch.tensor([2.0, -1.0, 0.5, 3.0])
    assert policy.reuse_mask(x, num_layers=8).tolist() == [True, False, True, True]
    # Budget 0.25 of 8 layers = 2: the two most confident (x0 = 3 and 2).
    assert policy.reuse_mask(x, num_layers=8, budget=0.25).tolist() == [True, False, False, True]
    p_half = float(torch.sigmoid(torch.tanh(torch.tanh(torch.tensor(0.5)))))
    assert policy.reuse_mask(x, num_layers=8, threshold=p_half).tolist() == [True, False, True, True]
    assert policy.reuse_mask(x, num_layers=8, threshold=p_half + 1e-6).tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="budget=1.5"):
        policy.reuse_mask(x, num_layers=8, budget=1.5)
    with pytest.raises(ValueError, match=r"shape \(n, 5\)"):
        policy.reuse_mask(torch.zeros(3, 4), num_layers=8)


# ------------------------------------------------------------------------------------------------ training

def test_training_on_linearly_separable_data_reaches_95_percent():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, NUM_FEATURES, generator=g) * torch.tensor([1.0, 5.0, 0.3, 2.0, 1.0]) + 3.0
    w = torch.tensor([1.0, -0.4, 2.0, 0.5, 0.0])
    y = ((x - 3.0) @ w > 0).float()
    groups = [k // 10 for k in range(600)]                                    # 60 "seeds" of 10 rows
    fit = fit_policy(x, y, groups, val_fraction=0.25, epochs=150, seed=0)
    assert fit.train_accuracy >= 0.95
    assert fit.val_accuracy >= 0.95
    assert fit.val_auc >= 0.99
    assert len(fit.val_seeds) == 15 and not set(fit.val_seeds) & set(fit.train_seeds)
    assert fit.n_val == 150 and fit.n_train == 450


def test_split_is_by_group_and_seeded():
    train, val = split_by_group([5, 5, 6, 7, 8, 8], 0.5, seed=3)
    assert sorted(train + val) == [5, 6, 7, 8] and len(val) == 2
    assert split_by_group([5, 5, 6, 7, 8, 8], 0.5, seed=3) == (train, val)


def test_calibration_recovers_an_exact_power_law_and_labels_follow_delta():
    # MSE = 1e-6 * rel^2  ->  slope 2, intercept -6; PSNR strictly decreasing in rel.
    rels = [0.01, 0.02, 0.05, 0.1, 0.3]
    records = [{"rel_change": r, "mse": 1e-6 * r * r} for r in rels]
    cal = fit_calibration(records)
    assert cal.slope == pytest.approx(2.0, abs=1e-9) and cal.intercept == pytest.approx(-6.0, abs=1e-9)
    assert cal.spearman_rel_vs_psnr == pytest.approx(-1.0) and cal.r2_log == pytest.approx(1.0)
    # 30 dB over 100 positions -> each position must keep 50 dB: MSE <= 4e-5 -> rel <= sqrt(40) = 6.3246.
    delta = Delta.from_budget(cal, 30.0, 100)
    assert delta.position_psnr == pytest.approx(50.0)
    assert delta.rel_change_max == pytest.approx(math.sqrt(40.0), rel=1e-9)
    assert label_rows([{"rel_change": 6.3}, {"rel_change": 6.4}], delta.rel_change_max).tolist() == [1.0, 0.0]
    # A measured 10x compounding over 10 positions asks for the same 50 dB floor.
    assert Delta.from_budget(cal, 30.0, 10, compounding=10.0).position_psnr == pytest.approx(50.0)
    with pytest.raises(ValueError, match="slope"):
        Calibration(-1.0, 0.0, 0.0, 0.0, 0.0, 3).rel_change_for_psnr(40.0)


def test_single_position_reuse_fires_once_and_changes_only_later_steps(tiny):
    base = sample(tiny, [2], [5], steps=6, cfg_scale=1.5)
    img, events = generate_with_single_reuse(tiny, [2], [5], step=3, layer=1, branch="uncond", steps=6)
    assert events == 1
    assert not torch.equal(img, base)
    rows, traced = trace_generation(tiny, 2, 5, steps=6)
    assert torch.equal(traced, base)                                         # tracing does not change the image


# ------------------------------------------------------------------------------------------------ files

def test_save_load_gives_identical_probabilities(tmp_path):
    fit = fit_policy(torch.randn(64, NUM_FEATURES, generator=torch.Generator().manual_seed(1)),
                     (torch.arange(64) % 2).float(), epochs=5, seed=1, threshold=0.37, info={"note": "t"})
    st, js = save_policy(fit.policy, tmp_path / "p.safetensors", {"command": "x"})
    loaded = load_policy(st)
    x = torch.randn(50, NUM_FEATURES, generator=torch.Generator().manual_seed(2)) * 3
    assert torch.equal(loaded(x), fit.policy(x))
    assert loaded.threshold == 0.37 and loaded.info == {"note": "t", "command": "x"}
    card = json.loads(js.read_text())
    assert card["feature_names"] == list(POLICY_FEATURE_NAMES)
    assert card["normalization"]["mean"] == fit.policy.feature_mean.tolist()
    assert card["threshold"] == 0.37
    assert torch.equal(load_policy(js).feature_std, fit.policy.feature_std)   # the sidecar path finds the weights


def _rewrite(src, dst, names=None, tensors_fn=None):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    if names is not None:
        meta["feature_names"] = json.dumps(names)
    if tensors_fn is not None:
        tensors = tensors_fn(tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_wrong_feature_count_order_or_format_raise_naming_the_file(tmp_path):
    good, _ = save_policy(ReusePolicy(), tmp_path / "good.safetensors")
    names = list(POLICY_FEATURE_NAMES)

    swapped = _rewrite(good, tmp_path / "order.safetensors", names=[names[1], names[0], *names[2:]])
    with pytest.raises(PolicyFileError, match=r"order\.safetensors.*order \['log_snr', 'entropy'"):
        load_policy(swapped)

    def four_features(t):
        t = dict(t)
        t["net.0.weight"] = t["net.0.weight"][:, :4].contiguous()
        t["feature_mean"], t["feature_std"] = t["feature_mean"][:4].clone(), t["feature_std"][:4].clone()
        return t

    short = _rewrite(good, tmp_path / "count.safetensors", names=names[:4], tensors_fn=four_features)
    with pytest.raises(PolicyFileError, match=r"count\.safetensors.*4 features, but this DQAR computes 5"):
        load_policy(short)
    shape_only = _rewrite(good, tmp_path / "shape.safetensors", tensors_fn=four_features)
    with pytest.raises(PolicyFileError, match=r"shape\.safetensors.*'feature_mean' has shape \(4,\), expected \(5,\)"):
        load_policy(shape_only)

    garbage = tmp_path / "notst.safetensors"
    garbage.write_bytes(b"\x80\x04this is not a safetensors file")
    with pytest.raises(PolicyFileError, match=r"notst\.safetensors.*not a readable safetensors"):
        load_policy(garbage)
    with pytest.raises(PolicyFileError, match=r"missing\.safetensors.*does not exist"):
        load_policy(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(PolicyFileError, match=rf"foreign\.safetensors.*format None, expected '{FORMAT}'"):
        load_policy(foreign)
    assert issubclass(PolicyFileError, ValueError)


def _with_metadata(src, dst, **changes):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(changes)
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"info": "[1, 2]"}, "has 'info' metadata that is a JSON list, not an object"),
    ({"info": '"text"'}, "has 'info' metadata that is a JSON str, not an object"),
    ({"threshold": "nan"}, "has threshold 'nan' in its metadata; a policy's threshold must be a number in [0, 1]"),
    ({"threshold": "1.5"}, "has threshold '1.5' in its metadata"),
    ({"threshold": "-inf"}, "has threshold '-inf' in its metadata"),
])
def test_bad_metadata_raises_naming_the_file(tmp_path, changes, message):
    good, _ = save_policy(ReusePolicy(), tmp_path / "good.safetensors")
    bad = _with_metadata(good, tmp_path / "badmeta.safetensors", **changes)
    with pytest.raises(PolicyFileError) as exc:
        load_policy(bad)
    assert str(bad) in str(exc.value) and message in str(exc.value)


@pytest.mark.parametrize("tensor, value, message", [
    ("net.0.weight", float("nan"), "tensor 'net.0.weight' has 1 non-finite values of 320 (1 NaN, 0 inf)"),
    ("feature_mean", float("inf"), "tensor 'feature_mean' has 1 non-finite values of 5 (0 NaN, 1 inf)"),
    ("feature_std", -2.0, "tensor 'feature_std' has a negative entry -2"),
])
def test_nonfinite_or_negative_std_tensors_raise_naming_the_file(tmp_path, tensor, value, message):
    good, _ = save_policy(ReusePolicy(), tmp_path / "good.safetensors")

    def damage(t):
        t = dict(t)
        t[tensor] = t[tensor].clone()
        t[tensor].view(-1)[0] = value
        return t

    bad = _rewrite(good, tmp_path / "damaged.safetensors", tensors_fn=damage)
    with pytest.raises(PolicyFileError) as exc:
        load_policy(bad)
    assert str(bad) in str(exc.value) and message in str(exc.value)


# ------------------------------------------------------------------------------------------------ in use

def test_shipped_policy_fires_on_the_embedded_model_deterministically():
    from dqar.digits.embedded import load_embedded_model

    assert shipped_policy_path().is_file()
    model = load_embedded_model()          # shipped with the package: failing to load it is a failure
    runs = []
    for _ in range(2):
        ctl = apply_dqar(model, DQARConfig(schedule="policy"))
        try:
            images = sample(model, [3, 7], [0, 1], steps=20, cfg_scale=1.5)
            runs.append((images, ctl.summary()))
        finally:
            remove_dqar(model)
    (a, sa), (b, sb) = runs
    assert sa["reuse_events"] > 0
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(model, [3, 7], [0, 1], steps=20, cfg_scale=1.5))   # the reuse changed pixels
    assert sa["events_per_step"] == sb["events_per_step"] and sa["events_per_layer"] == sb["events_per_layer"]
    assert sum(sa["events_per_step"][:8]) == 0                                # warmup 0.4 of 20 steps: steps 0-7


# ------------------------------------------------------------------------------------------------ command line

@pytest.fixture(scope="module")
def trained_policy_dir(tmp_path_factory):
    """`dqar train-policy` end to end on DiT-Tiny: traces, calibration, training, the policy files."""
    from dqar.cli import main

    out = tmp_path_factory.mktemp("policy")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["train-policy", "--model", "DiT-Tiny", "--out", str(out), "--n-seeds", "4", "--steps", "6",
                   "--calib-positions", "4", "--calib-seeds", "2", "--epochs", "30", "--cfg-scale", "1.5"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return out


def test_train_policy_writes_traces_calibration_and_a_loadable_policy(trained_policy_dir):
    out = trained_policy_dir
    traces = [json.loads(line) for line in (out / "traces.jsonl").read_text().splitlines()]
    # 4 seeds x steps 2..5 x 4 layers x 2 branches: step 0 has no cached output to compare with, and
    # step 1's rows are dropped because their cached step (0) has no row to take the entropy from.
    assert len(traces) == 4 * 4 * 4 * 2
    assert {"rel_change", *POLICY_FEATURE_NAMES} <= set(traces[0])
    assert (out / "calibration.jsonl").read_text().strip()
    card = json.loads((out / "policy_digits.json").read_text())
    assert card["feature_names"] == list(POLICY_FEATURE_NAMES)
    assert set(card["validation"]) >= {"accuracy", "auc"}
    load_policy(out / "policy_digits.safetensors")


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_schedule_policy_from_the_command_line_uses_the_given_file(trained_policy_dir, tmp_path, capsys, command):
    from dqar.cli import main

    policy = str(trained_policy_dir / "policy_digits.safetensors")
    # Threshold 0: every layer with a measured entropy reuses after warmup, whatever the MLP says.
    common = ["--model", "DiT-Tiny", "--steps", "6", "--schedule", "policy", "--policy", policy,
              "--policy-threshold", "0", "--warmup", "0.2"]
    if command == "generate":
        rc = main(["generate", *common, "--classes", "1,2", "--out", str(tmp_path / "g"), "--json"])
        result = json.loads(capsys.readouterr().out)
        assert rc == 0 and result["config"]["policy_path"] == policy
        events = result["dqar"]["reuse_events"]
    else:
        out = tmp_path / "b.json"
        rc = main(["bench", *common, "--n", "2", "--repeats", "1", "--warmup-runs", "0", "--json", str(out)])
        result = json.loads(out.read_text())
        assert rc == 0 and result["config"]["policy_path"] == policy
        events = result["dqar"]["reuse_events"]
    # Steps 1..5 (progress i/5 >= 0.2) reuse all 4 layers in both branches.
    assert events == 5 * 4 * 2


@pytest.mark.parametrize("damage", ["missing", "not-safetensors", "info-list", "threshold-nan"])
def test_a_bad_policy_file_on_the_command_line_exits_2_naming_it(tmp_path, capsys, damage):
    from dqar.cli import main

    path = tmp_path / "p.safetensors"
    if damage == "not-safetensors":
        path.write_bytes(b"not a safetensors file")
    elif damage != "missing":
        good, _ = save_policy(ReusePolicy(), tmp_path / "good.safetensors")
        _with_metadata(good, path, **({"info": "[]"} if damage == "info-list" else {"threshold": "nan"}))
    rc = main(["generate", "--model", "DiT-Tiny", "--steps", "3", "--schedule", "policy", "--policy", str(path),
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and str(path) in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


TRAIN_ARGS = ["--model", "DiT-Tiny", "--n-seeds", "4", "--steps", "6", "--calib-positions", "4", "--calib-seeds", "2",
              "--epochs", "30", "--cfg-scale", "1.5"]


def _damaged_from_dir(src, dst, name, damage):
    import shutil

    shutil.copytree(src, dst)
    path = dst / name
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1] = damage(rows[1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name, damage, message", [
    ("traces.jsonl", lambda r: {k: v for k, v in r.items() if k != "seed"}, "record 2 lacks the field(s) seed"),
    ("traces.jsonl", lambda r: {k: v for k, v in r.items() if k not in ("step", "entropy")},
     "record 2 lacks the field(s) step, entropy"),
    ("traces.jsonl", lambda r: [1, 2], "record 2 is a JSON list, not an object"),
    ("traces.jsonl", lambda r: {**r, "rel_change": "big"}, "record 2: rel_change='big' is not a finite number >= 0"),
    ("traces.jsonl", lambda r: {**r, "log_snr": float("nan")}, "record 2: log_snr=nan is not a finite number"),
    ("calibration.jsonl", lambda r: {k: v for k, v in r.items() if k != "mse"}, "record 2 lacks the field(s) mse"),
    ("calibration.jsonl", lambda r: {**r, "seed": "10000"}, "record 2: seed='10000' is not an integer"),
])
def test_train_policy_from_rows_missing_fields_exits_2_naming_file_and_field(trained_policy_dir, tmp_path, capsys,
                                                                             name, damage, message):
    from dqar.cli import main

    path = _damaged_from_dir(trained_policy_dir, tmp_path / "src", name, damage)
    rc = main(["train-policy", *TRAIN_ARGS, "--out", str(tmp_path / "o"), "--from", str(tmp_path / "src")])
    err = capsys.readouterr().err
    assert rc == 2 and str(path) in err and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_train_policy_from_a_good_folder_trains_and_shows_progress(trained_policy_dir, tmp_path, capsys):
    from dqar.cli import main

    rc = main(["train-policy", *TRAIN_ARGS, "--out", str(tmp_path / "o"), "--from", str(trained_policy_dir)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "reference images" in err and "2/2" in err and "<" in err          # a bar with elapsed<remaining
    load_policy(tmp_path / "o" / "policy_digits.safetensors")


@pytest.mark.parametrize("bad, message", [
    (["--seed", str(2**64)], f"--seed={2**64} is not allowed"),
    (["--first-seed", str(2**63 - 2)], "the run uses seeds 9223372036854775806..9223372036854775809"),
    (["--lr", "nan"], "--lr=nan is not allowed: must be a finite number > 0"),
    (["--l2", "-1"], "--l2=-1.0 is not allowed"),
    (["--quality-psnr", "inf"], "--quality-psnr=inf is not allowed"),
    (["--from", "NOFILE"], "--from='NOFILE' does not exist"),
])
def test_train_policy_bad_values_exit_2_before_any_work(tmp_path, capsys, bad, message):
    from dqar.cli import main

    rc = main(["train-policy", *TRAIN_ARGS, "--out", str(tmp_path / "o"), *bad])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_train_policy_out_that_is_a_file_is_refused_before_tracing(tmp_path, capsys):
    from dqar.cli import main

    existing = tmp_path / "report"
    existing.write_text("keep")
    rc = main(["train-policy", *TRAIN_ARGS, "--out", str(existing)])
    err = capsys.readouterr().err
    assert rc == 2 and "is an existing file, not a folder" in err and "random weights" not in err
    assert existing.read_text() == "keep"


def test_train_policy_from_traces_of_other_seeds_is_refused_before_the_model_is_built(trained_policy_dir, tmp_path,
                                                                                        capsys):
    from dqar.cli import main

    rc = main(["train-policy", *TRAIN_ARGS, "--first-seed", "7", "--out", str(tmp_path / "o"),
               "--from", str(trained_policy_dir)])
    err = capsys.readouterr().err
    assert rc == 2 and "holds traces of seeds [10000]..[10003]" in err and "random weights" not in err
    assert not (tmp_path / "o").exists()


def test_train_policy_install_into_a_read_only_package_is_refused_before_tracing(tmp_path, capsys, monkeypatch):
    import os

    from dqar.cli import main

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p).endswith("assets") else real(p, mode))
    rc = main(["train-policy", *TRAIN_ARGS, "--out", str(tmp_path / "o"), "--install"])
    err = capsys.readouterr().err
    assert rc == 2 and "--install" in err and "is not writable" in err and "random weights" not in err
    assert not (tmp_path / "o").exists()


def test_train_policy_more_calibration_positions_than_a_trace_has_is_refused_before_tracing(tmp_path, capsys):
    from dqar.cli import main

    args = list(TRAIN_ARGS)
    args[args.index("--calib-positions") + 1] = "33"
    rc = main(["train-policy", *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    # DiT-Tiny: 4 layers; 6 steps trace steps 2..5; CFG gives 2 branches: 4 * 4 * 2 = 32 positions.
    assert rc == 2 and "--calib-positions=33 exceeds the 32 (step, layer, branch) positions" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_the_threshold_compares_as_float32_like_a_tensor_comparison():
    """chosen() reads the probabilities as a list; its threshold test must agree with `p >= threshold` on the
    float32 tensor, also where the threshold is not a float32 number (0.7 rounds down to 0.69999999)."""
    policy = ReusePolicy()
    p = torch.tensor([0.7, 0.69999993, 0.70000005, 0.5], dtype=torch.float32)
    for thr in (0.7, 0.69999993, 0.5, 1.0, 0.0):
        assert policy.chosen(p.tolist(), 8, thr) == (p >= thr).tolist()
    # With a budget the most confident win, ties in row order.
    assert policy.chosen([0.9, 0.95, 0.9, 0.2], 4, 0.5, budget=0.5) == [True, True, False, False]
