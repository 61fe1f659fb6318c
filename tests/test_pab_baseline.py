"""The project's DiT ported to diffusers, and diffusers' pyramid attention broadcast as a sweep baseline."""
from __future__ import annotations

import pytest
import torch

from dqar.harness.baselines import PyramidAttentionBroadcastDiT, make_baseline
from dqar.models.diffusers_port import DiffusersDiT, PortError
from dqar.models.dit import DiT, DiTConfig, build_dit
from dqar.sampling import make_scheduler, sample

STEPS = 10


@pytest.fixture(scope="module")
def tiny():
    return build_dit("DiT-Tiny").randomize_(0).eval()


@pytest.mark.parametrize("preset", ["DiT-Tiny", "DiT-Tiny-Sigma"])
def test_port_computes_what_the_original_computes(preset):
    model = build_dit(preset).randomize_(1).eval()
    c = model.config
    port = DiffusersDiT(model)
    x = torch.randn(4, c.in_channels, c.input_size, c.input_size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 500, 21, 0])
    y = torch.tensor([0, 3, c.num_classes, 9])     # the null class included
    with torch.no_grad():
        ours, theirs = model(x, t, y), port(x, t, y)
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_port_needs_a_null_class():
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                          num_classes=10, learn_sigma=False, class_dropout_prob=0.0))
    with pytest.raises(PortError, match="class_dropout_prob=0.0"):
        DiffusersDiT(model)


def _expected_reuse_events(layers: int) -> int:
    # PAB with skip range 2 reuses on odd calls (the step index) whose timestep is strictly inside (100, 800).
    sched = make_scheduler("ddim")
    sched.set_timesteps(STEPS)
    return layers * sum(1 for i, t in enumerate(sched.timesteps) if i % 2 == 1 and 100 < int(t) < 800)


@pytest.fixture(scope="module")
def digits():
    # Trained weights: a random tiny DiT's attention barely moves its output, the embedded model's does.
    from dqar.digits.embedded import load_embedded_model

    return load_embedded_model().eval()


def test_pab_fires_counts_its_reuse_and_keeps_no_state_between_generations(digits):
    tiny = digits
    pab = make_baseline("pab", tiny)
    assert isinstance(pab, PyramidAttentionBroadcastDiT)
    ref = sample(tiny, [1, 2], [0, 1], steps=STEPS, cfg_scale=1.5)
    first = sample(pab, [1, 2], [0, 1], steps=STEPS, cfg_scale=1.5)
    stats = pab.reuse_stats()
    expected = _expected_reuse_events(tiny.config.depth)
    assert expected > 0 and stats["reuse_events"] == expected
    assert stats["reuse_fraction"] == pytest.approx(expected / (tiny.config.depth * STEPS))
    # Each layer holds one cached fp32 output for the whole [cond | uncond] batch of 4, 64 tokens x 128 channels.
    assert stats["cache_bytes"] == tiny.config.depth * 4 * 64 * 128 * 4
    assert (first - ref).abs().max() > 1e-2
    second = sample(pab, [1, 2], [0, 1], steps=STEPS, cfg_scale=1.5)
    assert torch.equal(second, first)
    assert pab.reuse_stats()["reuse_events"] == expected
    # The source model is untouched.
    assert torch.equal(sample(tiny, [1, 2], [0, 1], steps=STEPS, cfg_scale=1.5), ref)


def test_pab_that_never_skips_matches_the_uncached_model(tiny):
    never = PyramidAttentionBroadcastDiT(tiny, block_skip_range=1)
    ref = sample(tiny, [3], [5], steps=STEPS, cfg_scale=1.5)
    out = sample(never, [3], [5], steps=STEPS, cfg_scale=1.5)
    assert never.reuse_stats()["reuse_events"] == 0
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_pab_rejects_a_bad_skip_range(tiny):
    with pytest.raises(ValueError, match="block_skip_range=0 is not allowed"):
        PyramidAttentionBroadcastDiT(tiny, block_skip_range=0)


def test_sweep_measures_pab_as_a_named_baseline(tmp_path):
    from dqar.cli import main
    from dqar.harness.baselines import PAB_BLOCK_SKIP_RANGE, PAB_TIMESTEP_RANGE
    from dqar.harness.results_file import read_rows

    out = tmp_path / "rows.jsonl"
    args = ["sweep", "--model", "DiT-Tiny", "--n", "2", "--steps", str(STEPS), "--threads", "1", "--no-progress",
            "--baselines", "none,pab", "--out", str(out)]
    assert main(args) == 0
    rows = {r.name: r for r in read_rows(out)}
    pab = rows["pab"]
    assert pab.variant == "pab" and pab.config["schedule"] == "none"
    assert pab.dqar.reuse_events == _expected_reuse_events(4)
    assert pab.dqar.reuse_fraction == pytest.approx(_expected_reuse_events(4) / (4 * STEPS))
    assert pab.dqar.cache_mb > 0 and pab.speedup > 0
    # The settings PAB ran with travel in its row, and the report names them as our choices.
    assert (PAB_BLOCK_SKIP_RANGE, PAB_TIMESTEP_RANGE) == (2, (100, 800))
    assert pab.variant_settings == {"block_skip_range": 2, "timestep_range": [100, 800]}
    assert rows["none"].variant_settings is None
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert ("PAB settings: block_skip_range=2, timestep_range=[100, 800]. They are our choices, not diffusers' "
            "defaults: diffusers' PyramidAttentionBroadcastConfig leaves the spatial attention skip range at None") in md
    # No schedule setting applies to the pab row: dashes, not the unused defaults.
    assert "| pab (pab) | none | – | – | – | – | – | – |" in md


def test_pab_settings_are_named_for_rows_written_before_they_were_recorded(tmp_path):
    import json
    from pathlib import Path

    from dqar.harness.report import build_report

    rows = [json.loads(line) for line in (Path(__file__).parent / "fixtures" / "results_small.jsonl").read_text()
            .splitlines()]
    pab = json.loads(json.dumps(next(r for r in rows if r["name"] == "ptq-int8")))
    pab.update(name="pab", key="kpab", variant="pab")
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [pab]))
    md = build_report(path, tmp_path / "rep").read_text()
    assert ("PAB settings: block_skip_range=2, timestep_range=[100, 800] (not recorded in the row: the values dqar "
            "has always used).") in md
