"""controller.summary()["ideal_speedup"] against an independent FLOP count of DiT-Tiny, counted by hand from its
shapes (and checked against torch's FLOP counter on the bare, never-hooked model) for known reuse patterns."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.models import build_dit
from dqar.sampling import sample

# DiT-Tiny: 8x8x1 input, patch 2 -> T = 16 tokens, D = 32, 4 blocks, 2 heads (hd 16), MLP 4D = 128, 1 output
# channel, a 256-wide sinusoidal timestep code. A matmul (m x k) @ (k x n) is 2 m k n FLOPs; biases, norms,
# activations and the label lookup count 0 (as torch's counter counts them). Per image:
T, D, L, HEADS, MLP, FREQ, PATCH_OUT = 16, 32, 4, 2, 128, 256, 4
ATTN = 2 * T * D * 3 * D + 2 * (2 * HEADS * T * T * (D // HEADS)) + 2 * T * D * D      # qkv, QK^T and AV, proj
MLP_FLOPS = 2 * T * D * MLP + 2 * T * MLP * D                                         # fc1, fc2
ADALN = 2 * D * 6 * D                                                                 # the block's modulation
BLOCK = ATTN + MLP_FLOPS + ADALN
KV = 2 * T * D * 2 * D                                                                # the K and V projections
PATCH = 2 * (D * T) * (1 * 2 * 2)                                                     # conv: out elems x C k k
T_EMBED = 2 * FREQ * D + 2 * D * D
FINAL = 2 * D * 2 * D + 2 * T * D * PATCH_OUT
FORWARD = PATCH + T_EMBED + L * BLOCK + FINAL                                         # one image, one forward

LABELS, SEEDS, STEPS = [1, 7], [3, 4], 10


@pytest.fixture(scope="module")
def model():
    return build_dit("DiT-Tiny").randomize_(0, std=0.2).eval()


def test_hand_count_agrees_with_torchs_counter_on_the_bare_model(model):
    assert (ATTN, MLP_FLOPS, BLOCK, FORWARD) == (163840, 262144, 438272, 1783808)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor([10, 500, 999])
    y = torch.tensor([1, 2, 10])
    # The math backend runs attention as plain matmuls, which the counter sees (it has no formula for the CPU
    # flash kernel; dqar.method.flops supplies one).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as whole:
        model(x, t, y)
    assert whole.get_total_flops() == 3 * FORWARD
    tokens = torch.randn(3, T, D)
    for module, per_image in ((model.blocks[0].attn, ATTN), (model.blocks[2].mlp, MLP_FLOPS)):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            module(tokens)
        assert counter.get_total_flops() == 3 * per_image


def _summary(model, config):
    ctl = apply_dqar(model, config)
    try:
        sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        return ctl.summary()
    finally:
        remove_dqar(model)


# Interval schedule, warmup 0.5, interval 3, 10 steps: computes at steps 0..5 and 8, reuses at 6, 7 and 9 (every
# layer, both CFG branches): 3 steps x 4 layers x 2 branches = 24 reuse events per target. Each event skips its
# module for one branch (2 images); a step costs 2 branches x 2 images x FORWARD.
TOTAL = STEPS * 2 * 2 * FORWARD
PATTERN = dict(schedule="interval", warmup=0.5, interval=3)
CASES = [
    (dict(targets=("attn",)), 24, 24 * 2 * ATTN),
    (dict(targets=("attn", "mlp")), 48, 24 * 2 * (ATTN + MLP_FLOPS)),
    (dict(targets=("block",)), 24, 24 * 2 * BLOCK),
    (dict(mode="kv"), 24, 24 * 2 * KV),
]


@pytest.mark.parametrize("extra, events, skipped", CASES, ids=["attn", "attn+mlp", "block", "kv"])
def test_ideal_speedup_equals_the_hand_counted_flop_ratio(model, extra, events, skipped):
    s = _summary(model, DQARConfig(**PATTERN, **extra))
    assert s["reuse_events"] == events
    assert s["events_per_step"] == [0] * 6 + [events // 3] * 2 + [0] + [events // 3]
    assert s["ideal_speedup"] == pytest.approx(TOTAL / (TOTAL - skipped), rel=1e-12)


def test_ideal_speedup_of_the_static_schedule_by_hand(model):
    # Static w = 0.2, l = 1.0 on 4 layers, 10 steps (p = i/9): floor((p - 0.2) / 0.8 * 4) = floor(5 p - 1) layers
    # = 0, 0, 0, 0, 1, 1, 2, 2, 3, 4 (by hand) -> 13 layer-steps, x 2 branches = 26 attention reuses.
    s = _summary(model, DQARConfig(warmup=0.2, layer_fraction=1.0))
    assert s["events_per_step"] == [2 * n for n in (0, 0, 0, 0, 1, 1, 2, 2, 3, 4)]
    assert s["ideal_speedup"] == pytest.approx(TOTAL / (TOTAL - 26 * 2 * ATTN), rel=1e-12)


def test_measuring_entropy_does_not_change_the_flop_bound(model):
    # The same reuse pattern with the entropy recorded: the model does the same work, so the bound is the same
    # hand-counted ratio; entropy is DQAR's own overhead, not model FLOPs a reuse skips.
    s = _summary(model, DQARConfig(**PATTERN, record_entropy=True))
    assert s["reuse_events"] == 24
    assert s["ideal_speedup"] == pytest.approx(TOTAL / (TOTAL - 24 * 2 * ATTN), rel=1e-12)


def test_a_second_apply_reuses_the_profile_and_cfg_does_not_share_it(model, monkeypatch):
    import dqar.method.flops as flops_module

    fresh = build_dit("DiT-Tiny").randomize_(1, std=0.2).eval()       # no profile measured for it yet
    made = []
    real = flops_module.FlopCounterMode
    monkeypatch.setattr(flops_module, "FlopCounterMode", lambda *a, **k: made.append(1) or real(*a, **k))
    first = _summary(fresh, DQARConfig(**PATTERN))
    assert len(made) == 1
    second = _summary(fresh, DQARConfig(**PATTERN))
    assert len(made) == 1                                                  # measured once for both generations
    assert second["ideal_speedup"] == first["ideal_speedup"] == pytest.approx(TOTAL / (TOTAL - 24 * 2 * ATTN))
    # Four images without guidance: the same batch shape (4, 1, 8, 8) as two with CFG, but one branch of 4
    # images, so it gets its own profile (FLOPs per branch double).
    ctl = apply_dqar(fresh, DQARConfig(**PATTERN))
    try:
        sample(fresh, [1, 7, 2, 3], [3, 4, 5, 6], steps=STEPS, cfg_scale=1.0)
        s = ctl.summary()
    finally:
        remove_dqar(fresh)
    assert len(made) == 2
    assert s["reuse_events"] == 12 and s["ideal_speedup"] == pytest.approx(TOTAL / (TOTAL - 12 * 4 * ATTN))
