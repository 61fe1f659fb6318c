"""The signal study (issue 17): resumed runs reproduce the sampler, labels equal an independent computation,
signals equal their definitions, Spearman / AUC / fits are right on known inputs."""
import math

import pytest
import torch

from dqar.harness import signal_analysis as sa
from dqar.harness import signal_study as ss
from dqar.harness.policy_training import per_image_mse
from dqar.sampling import sample

LABELS, SEEDS, STEPS, CFG = [1, 2], [0, 1], 12, 1.5


@pytest.fixture(scope="module")
def traj(model):
    return ss.record_trajectory(model, LABELS, SEEDS, steps=STEPS, cfg_scale=CFG)


def test_resume_without_positions_is_the_uncached_run(model, traj):
    plain = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=CFG)
    assert torch.equal(traj.image, plain)
    for start in (0, 5, STEPS - 1):
        assert torch.equal(ss.resume(model, traj, start, [])[0], plain)


def _independent_label(model, pos, replace):
    """MSE per image of a full run from noise whose module `pos` is replaced at pos.step by replace(history)."""
    block = model.blocks[pos.layer]
    module = block if pos.target == "block" else getattr(block, pos.target)
    n = len(SEEDS)
    rows = slice(0, n) if pos.branch == "cond" else slice(n, 2 * n)
    seen, calls = {}, [0]

    def hook(_m, args, out):
        step = calls[0]
        calls[0] += 1
        own = out - args[0] if pos.target == "block" else out
        seen[step] = own[rows].detach().clone()
        if step == pos.step:
            out = out.clone()
            new = replace(seen)
            out[rows] = args[0][rows] + new if pos.target == "block" else new
            return out
        return None

    handle = module.register_forward_hook(hook)
    try:
        img = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=CFG)
    finally:
        handle.remove()
    return per_image_mse(img, sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=CFG))


@pytest.mark.parametrize("pos, replace", [
    # order 2, age 2: the quadratic through steps 3, 5, 7 at step 9 is 3 F(7) - 3 F(5) + F(3) (Lagrange)
    (ss.Position(9, 1, "attn", "cond", 2, 2), lambda f: 3 * f[7] - 3 * f[5] + f[3]),
    # order 0, age 3: a block's residual copied from step 5 to step 8
    (ss.Position(8, 2, "block", "uncond", 0, 3), lambda f: f[5]),
    # order 2, age 1 on the MLP
    (ss.Position(6, 0, "mlp", "uncond", 2, 1), lambda f: 3 * f[5] - 3 * f[4] + f[3]),
])
def test_label_equals_an_independent_computation(model, traj, pos, replace):
    images = ss.resume(model, traj, pos.step, [ss.Position(pos.step, 3, "mlp", "cond", 0, 1), pos])
    study = per_image_mse(images[2], images[0])
    expected = _independent_label(model, pos, replace)
    assert (expected > 1e-6).all()           # the forecast changed the image
    torch.testing.assert_close(study, expected, rtol=1e-4, atol=0)


def test_signals_match_their_definitions(traj):
    pos = ss.Position(9, 1, "attn", "uncond", 2, 2)
    n = len(SEEDS)
    rows = slice(n, 2 * n)
    out = lambda s: traj.outputs[("attn", 1, s)][rows]                                     # noqa: E731
    pred = 3 * out(7) - 3 * out(5) + out(3)                                                 # forecast of step 9
    gate, x = traj.gates[("attn", 1, 9)][rows], traj.inputs[(1, 9)][rows]
    rel, gated = ss.forecast_errors(traj, pos, 9, 2)
    for i in range(n):
        d = pred[i] - out(9)[i]
        assert math.isclose(rel[i], float(d.norm() / out(9)[i].norm()), rel_tol=1e-4)
        assert math.isclose(gated[i], float((d * gate[i]).norm() / x[i].norm()), rel_tol=1e-4)
    sig = ss.position_signals(traj, {(s, st, 1, "uncond"): (0.5, -1.0) for s in SEEDS for st in range(STEPS)}, pos)
    x_then = traj.inputs[(1, 7)][rows]
    assert math.isclose(sig["input_change"][0], float((x[0] - x_then[0]).norm() / x[0].norm()), rel_tol=1e-5)
    r = lambda s: traj.outputs[("block", 0, s)][rows][0]                                    # noqa: E731
    assert math.isclose(sig["probe"][0], float((r(9) - r(7)).norm() / r(9).norm()), rel_tol=1e-5)
    assert sig["cfg_weight"] == [0.5, 0.5] and sig["age"] == [2.0, 2.0]


def test_positions_are_valid_and_seeded():
    kw = dict(steps=20, layers=4, branches=("cond", "uncond"), targets=("attn", "block"), orders=(0, 2),
              ages=(1, 3), per_group=5, seed=3)
    a, b = ss.draw_positions(**kw), ss.draw_positions(**kw)
    assert a == b and len(a) == 2 * 2 * 2 * 5 and len(set(a)) == len(a)
    assert all(p.step >= ss.first_valid_step(p.order, p.age) and min(p.history(p.step - p.age)) >= 0 for p in a)
    assert ss.first_valid_step(2, 3) == 12 and ss.first_valid_step(0, 1) == 3
    with pytest.raises(ValueError, match="per_group"):
        ss.draw_positions(**{**kw, "per_group": 10_000})


def test_spearman_and_auc_on_known_inputs():
    assert sa.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert sa.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert sa.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)    # 1 - 6 * 4 / (5 * 24)
    assert sa.spearman([1, 1, 1], [1, 2, 3]) is None
    assert sa.auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert sa.auc([0.1, 0.2], [True, True]) is None


def test_fit_recovers_an_exact_log_linear_law():
    rows = [{"step": s, "layer": 0, "target": "attn", "branch": "cond", "order": 0, "age": 1,
             "last_gated": 10 ** (-s / 7), "log_snr": s * 0.3 % 1.7, "mse": 10 ** (1 - 2 * s / 7 + 0.5 * (s * 0.3 % 1.7))}
            for s in range(30)]
    pred = sa.cross_validated_fit(rows, ("last_gated", "log_snr"))
    assert pred == pytest.approx([math.log10(r["mse"]) for r in rows], abs=1e-9)
    coef = sa.fit_coefficients(rows, ("last_gated", "log_snr"))
    assert coef["last_gated"] == pytest.approx(2.0) and coef["log_snr"] == pytest.approx(0.5)


def test_study_end_to_end(model):
    rows, meta = ss.run_study(model, LABELS, SEEDS, steps=10, targets=("attn", "block"), ages=(1, 2), per_group=2,
                              max_batch=3)
    assert meta["rows"] == len(rows) == 2 * 2 * 2 * 2 * len(SEEDS)
    assert meta["reference_max_mse_vs_uncached"] < 1e-8
    assert all(r["mse"] > 0 and r["step"] >= ss.first_valid_step(r["order"], int(r["age"])) for r in rows)
    results = sa.evaluate(rows, psnr_threshold=20.0)
    assert set(results) >= {"all", "attn", "block", "attn o0", "block o2"} and results["all"]["n"] == len(rows)
    table = sa.markdown_tables(results, ["all", "attn o0"])
    assert "| last_gated |" in table and "now_gated (oracle)" in table
    growth = sa.age_growth(rows)
    assert set(growth) == {"attn o0", "attn o2", "block o0", "block o2"} and set(growth["attn o2"]) == {1, 2}
    assert "| block o2 | " in sa.growth_table(growth)


def test_age_growth_is_the_median_ratio():
    rows = [{"target": "mlp", "order": 2, "age": 3, "now_gated": v, "rate_gated": 1.0, "psnr": p}
            for v, p in ((2.0, 80.0), (4.0, 90.0), (9.0, 70.0))]
    assert sa.age_growth(rows) == {"mlp o2": {3: {"now_over_rate": 4.0, "median_psnr": 80.0, "n": 3}}}


def test_age_one_copy_matches_the_policy_calibration(model, traj):
    """Order 0, age 1, attention: the same measurement as policy_training's single-position reuse through DQAR."""
    from dqar.harness.policy_training import generate_with_single_reuse

    pos = ss.Position(7, 2, "attn", "uncond", 0, 1)
    images = ss.resume(model, traj, pos.step, [pos])
    dqar_img, events = generate_with_single_reuse(model, LABELS, SEEDS, step=7, layer=2, branch="uncond",
                                                  steps=STEPS, cfg_scale=CFG)
    assert events == 1
    torch.testing.assert_close(per_image_mse(images[1], images[0]), per_image_mse(dqar_img, traj.image),
                               rtol=1e-4, atol=0)
