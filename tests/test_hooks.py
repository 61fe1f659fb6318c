"""DQAR on the project's DiT: fires, restores the baseline exactly, leaks no state, splits CFG branches."""
import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.models import build_dit
from dqar.sampling import sample
from dqar.method.schedules import Schedule
from test_flop_bound import ATTN, FORWARD, MLP_FLOPS

LABELS, SEEDS, STEPS = [1, 7], [3, 4], 10


def run(model, config, labels=LABELS, seeds=SEEDS):
    ctl = apply_dqar(model, config)
    try:
        images = sample(model, labels, seeds, steps=STEPS, cfg_scale=2.0)
        return images, ctl.summary(), ctl
    finally:
        remove_dqar(model)


@pytest.mark.parametrize("config", [DQARConfig(schedule="none"), DQARConfig(warmup=1.0, layer_fraction=1.0)])
def test_no_reuse_is_bit_identical_to_unhooked(model, baseline, config):
    images, summary, _ = run(model, config)
    assert torch.equal(images, baseline)
    assert summary["reuse_events"] == 0 and summary["ideal_speedup"] == 1.0


def test_static_schedule_fires_and_changes_output(model, baseline):
    images, s, _ = run(model, DQARConfig(warmup=0.4, layer_fraction=0.33))
    # L=4: floor((p - 0.4) / 0.6 * 1.32) is 1 at steps 8 (p=0.89) and 9, 0 before; two branches each.
    assert s["events_per_step"] == [0] * 8 + [2, 2] and s["events_per_layer"] == [4, 0, 0, 0]
    assert s["reuse_events"] == 4 and s["compute_events"] == 80 - 4 and not torch.equal(images, baseline)
    # 4 attention reuses of one branch (2 images) out of 10 steps x 2 branches x 2 images x FORWARD (FLOPs counted
    # by hand in test_flop_bound); the cache holds layer 0's output of both branches: 2 x (2, 16, 32) fp32.
    total = STEPS * 2 * 2 * FORWARD
    assert s["ideal_speedup"] == pytest.approx(total / (total - 4 * 2 * ATTN), rel=1e-12)
    assert s["cache_bytes"] == 2 * 2 * 16 * 32 * 4


def test_full_layer_fraction_counts_match_formula(model):
    _, s, _ = run(model, DQARConfig(warmup=0.2, layer_fraction=1.0))
    # per step i (p = i/9): floor((p - 0.2)/0.8 * 4) layers, times 2 branches
    expected = [2 * max(0, int((i / 9 - 0.2) / 0.8 * 4 + 1e-9)) if i / 9 >= 0.2 else 0 for i in range(10)]
    assert s["events_per_step"] == expected


def test_remove_restores_never_hooked_output(model, baseline):
    fresh = build_dit("DiT-Tiny").randomize_(0, std=0.2).eval()
    run(model, DQARConfig(warmup=0.0, layer_fraction=1.0, targets=("attn", "mlp")))
    assert "forward" not in model.__dict__ and all("forward" not in b.attn.__dict__ for b in model.blocks)
    assert torch.equal(sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0),
                       sample(fresh, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0))


def test_two_generations_in_a_row_are_identical_and_do_not_leak(model):
    cfg = DQARConfig(warmup=0.2, layer_fraction=1.0)
    ctl = apply_dqar(model, cfg)
    try:
        a = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        other = sample(model, [2], [99], steps=STEPS, cfg_scale=2.0)
        b = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        summary = ctl.summary()
    finally:
        remove_dqar(model)
    assert torch.equal(a, b)
    _, fresh_other, _ = run(model, cfg, [2], [99])
    assert summary["reuse_events"] == run(model, cfg)[1]["reuse_events"]
    assert fresh_other["reuse_events"] > 0 and other.shape == (1, 1, 8, 8)


def test_cond_and_uncond_caches_hold_different_tensors(model):
    ctl = apply_dqar(model, DQARConfig(warmup=0.0, layer_fraction=1.0))
    try:
        ctl.active = True
        ctl.end_generation = lambda: None  # keep the cache for inspection
        sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        cond = ctl.cache.get(0, "cond", "attn").output.dequantize()
        uncond = ctl.cache.get(0, "uncond", "attn").output.dequantize()
    finally:
        remove_dqar(model)
    assert cond.shape == uncond.shape == (2, 16, 32) and not torch.equal(cond, uncond)


def test_a_branch_that_must_compute_runs_on_its_half_only(model):
    class UncondOnly(Schedule):
        def plan(self, step, branch, entropies):
            return frozenset(range(step.num_layers)) if branch == "uncond" and step.step_index > 0 else frozenset()

    ctl = apply_dqar(model, DQARConfig())
    ctl.schedule = UncondOnly(ctl.config)
    original = model.blocks[0].attn.forward.original
    batches = []
    model.blocks[0].attn.forward.original = lambda x: (batches.append(x.shape[0]), original(x))[1]
    try:
        sample(model, LABELS, SEEDS, steps=4, cfg_scale=2.0)
        s = ctl.summary()
    finally:
        remove_dqar(model)
    assert batches == [4, 2, 2, 2]  # step 0 both branches; then cond alone
    assert s["events_per_step"] == [0, 4, 4, 4]


def test_kv_mode_runs_and_differs_from_output_mode(model, baseline):
    out_images, out_s, _ = run(model, DQARConfig(warmup=0.2, layer_fraction=1.0))
    kv_images, kv_s, _ = run(model, DQARConfig(warmup=0.2, layer_fraction=1.0, mode="kv"))
    assert kv_s["reuse_events"] == out_s["reuse_events"] > 0
    assert not torch.equal(kv_images, out_images) and not torch.equal(kv_images, baseline)
    assert 1.0 < kv_s["ideal_speedup"] < out_s["ideal_speedup"]  # kv skips only the K/V projections


def test_mlp_target_reuses_more(model):
    _, attn, _ = run(model, DQARConfig(warmup=0.2, layer_fraction=1.0))
    _, both, _ = run(model, DQARConfig(warmup=0.2, layer_fraction=1.0, targets=("attn", "mlp")))
    assert both["reuse_events"] == 2 * attn["reuse_events"]
    total, events = STEPS * 2 * 2 * FORWARD, attn["reuse_events"]
    assert attn["ideal_speedup"] == pytest.approx(total / (total - events * 2 * ATTN), rel=1e-12)
    assert both["ideal_speedup"] == pytest.approx(total / (total - events * 2 * (ATTN + MLP_FLOPS)), rel=1e-12)


def test_gate_records_entropy_and_fires_with_a_loose_threshold(model, baseline):
    images, s, _ = run(model, DQARConfig(schedule="gate", warmup=0.0, tau0=100.0, snr_range=(0.0, 1e9)))
    # Entropy is measured only where a layer computes; once every layer reuses, a step has none.
    measured = [e for e in s["entropy_per_step"] if e is not None]
    assert s["entropy_per_step"][0] is not None and all(0 < e <= 2.7726 for e in measured)  # <= log(16 keys)
    assert s["reuse_events"] > 0 and not torch.equal(images, baseline)
    _, strict, _ = run(model, DQARConfig(schedule="gate", warmup=0.0, tau0=1e-3))
    assert strict["reuse_events"] == 0


def test_entropy_over_the_first_images_of_each_branch(model, baseline):
    """entropy_images=1 measures each branch's first image only: the same per-step entropy as a run of that
    image alone, and the same images as the exact path; covering every image changes nothing."""
    exact_images, exact, _ = run(model, DQARConfig(schedule="none", record_entropy=True))
    one_images, one, _ = run(model, DQARConfig(schedule="none", record_entropy=True, entropy_images=1))
    _, alone, _ = run(model, DQARConfig(schedule="none", record_entropy=True), labels=LABELS[:1], seeds=SEEDS[:1])
    _, every, _ = run(model, DQARConfig(schedule="none", record_entropy=True, entropy_images=len(LABELS)))
    assert torch.equal(one_images, exact_images)
    assert one["entropy_per_step"] == pytest.approx(alone["entropy_per_step"], rel=1e-5)
    assert one["entropy_per_step"] != pytest.approx(exact["entropy_per_step"], rel=1e-3)
    assert every["entropy_per_step"] == exact["entropy_per_step"]


def test_entropy_path_keeps_the_baseline_output(model, baseline):
    images, s, _ = run(model, DQARConfig(schedule="none", record_entropy=True))
    torch.testing.assert_close(images, baseline, rtol=0, atol=1e-5)
    assert s["entropy_per_step"][0] is not None


def test_cfg_sharing_fires_and_uncond_takes_conds_fresh_output(model, baseline):
    # A static schedule that never reuses (floor(0.01 * 4) = 0 layers), so every event is a share.
    cfg = DQARConfig(schedule="static", warmup=0.2, layer_fraction=0.01, cfg_sharing=True,
                     cfg_sharing_eps=10.0, record_entropy=True)
    seen = []
    ctl = apply_dqar(model, cfg)
    hook = model.blocks[0].attn.forward
    inner = hook._compute
    hook._compute = lambda *a, **k: (seen.append(a[1].shape[0]), inner(*a, **k))[1]   # a[0]: branch count
    outputs = []
    handle = model.blocks[0].attn.register_forward_hook(lambda m, i, o: outputs.append(o))
    try:
        images = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        s = ctl.summary()
    finally:
        handle.remove()
        remove_dqar(model)
    assert s["share_events"] > 0 and s["reuse_events"] == s["share_events"]
    assert not torch.equal(images, baseline)
    # A shared step computes cond alone (half the batch) and hands uncond the same tensor.
    shared = [i for i, n in enumerate(seen) if n == len(LABELS)]
    assert shared
    for i in shared:
        cond, uncond = outputs[i].chunk(2)
        assert torch.equal(cond, uncond)
    # After a share uncond must measure again before the next share: never two shares in a row per layer.
    assert all(seen[i + 1] == 2 * len(LABELS) for i in shared if i + 1 < len(seen))


def test_cfg_sharing_needs_a_schedule():
    with pytest.raises(ValueError, match="cfg_sharing"):
        DQARConfig(schedule="none", cfg_sharing=True)


def test_apply_twice_raises_and_remove_without_apply_raises(model):
    apply_dqar(model, DQARConfig())
    try:
        with pytest.raises(RuntimeError, match="already applied"):
            apply_dqar(model, DQARConfig())
    finally:
        remove_dqar(model)
    with pytest.raises(RuntimeError, match="not applied"):
        remove_dqar(model)


def test_unsupported_model_raises():
    with pytest.raises(TypeError, match="no block layout for Linear"):
        apply_dqar(torch.nn.Linear(2, 2), DQARConfig())


def test_ideal_speedup_does_not_depend_on_the_previous_batch_shape(model):
    cfg = DQARConfig(warmup=0.2, layer_fraction=1.0)
    ctl = apply_dqar(model, cfg)
    try:
        sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        sample(model, [2], [99], steps=STEPS, cfg_scale=2.0)
        after_other_shape = ctl.summary()["ideal_speedup"]
    finally:
        remove_dqar(model)
    assert after_other_shape == run(model, cfg, [2], [99])[1]["ideal_speedup"]


def test_sampled_entropies_form_their_logits_at_the_step_end_with_the_same_values(model, monkeypatch):
    """With entropy_images the hooks queue q and k views (QKRows) and the step's logits are formed together:
    the same entropies, bit for bit, and the same decisions as logits formed in each hook."""
    import dqar.method.pending_entropy as pending_module
    from dqar.method.stats import QKRows

    config = DQARConfig(schedule="gate", warmup=0.0, tau0=20.0, snr_range=(0.0, 1e9), entropy_images=1)
    queued_kinds = []
    real_add = pending_module.PendingEntropies.add
    monkeypatch.setattr(pending_module.PendingEntropies, "add",
                        lambda self, item, parts: (queued_kinds.append(type(item)), real_add(self, item, parts))[1])
    images, deferred, ctl = run(model, config)
    assert set(queued_kinds) == {QKRows} and len(ctl.pending_entropy) == 0
    queued_kinds.clear()
    monkeypatch.setattr(pending_module, "DEFER_ELEMENTS", -1)
    again, at_once, _ = run(model, config)
    assert set(queued_kinds) == {torch.Tensor}
    assert deferred["reuse_events"] > 0 and torch.equal(images, again)
    assert deferred["entropy_per_step"] == at_once["entropy_per_step"]
    assert deferred["events_per_step"] == at_once["events_per_step"]


def test_entropies_wait_for_the_step_end_and_equal_the_per_call_values(model):
    """The hooks queue each attention call's logits; the controller turns a step's queue into entropies at the
    next begin_step (one batched pass). Same per-step entropies and gate decisions as the per-call path
    (tracing computes at once), nothing pending after a generation, and a reset drops a half-done step."""
    gate = dict(schedule="gate", warmup=0.0, tau0=20.0, snr_range=(0.0, 1e9))     # some layers pass, some not
    _, deferred, ctl = run(model, DQARConfig(**gate))
    _, at_once, _ = run(model, DQARConfig(**gate, trace=True))
    assert deferred["reuse_events"] > 0 and deferred["events_per_step"] == at_once["events_per_step"]
    measured = [e for e in deferred["entropy_per_step"] if e is not None]
    assert [e is None for e in deferred["entropy_per_step"]] == [e is None for e in at_once["entropy_per_step"]]
    assert measured == pytest.approx([e for e in at_once["entropy_per_step"] if e is not None], rel=1e-6)
    assert len(ctl.pending_entropy) == 0
    ctl = apply_dqar(model, DQARConfig(schedule="gate", warmup=0.0, tau0=1e-3))     # computes everything
    queued = []
    hook = model.blocks[0].attn.forward
    inner = hook._commit_chunks
    hook._commit_chunks = lambda *a: (queued.append(len(ctl.pending_entropy)), inner(*a))[1]
    try:
        sample(model, LABELS, SEEDS, steps=2, cfg_scale=2.0)
        # Layer 0 commits first in each forward: nothing of that step is resolved yet, the previous step is.
        assert queued == [0, 0]
        ctl.begin_step(0, 2)
        model(torch.randn(4, 1, 8, 8), torch.tensor([999] * 4), torch.tensor([1, 7, 10, 10]))
        assert len(ctl.pending_entropy) == 4
        ctl.begin_step(0, 2)                 # a new generation: the abandoned step's queue is gone
        assert len(ctl.pending_entropy) == 0 and ctl.summary()["entropy_per_step"] == []
    finally:
        remove_dqar(model)
