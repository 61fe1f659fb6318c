"""dqar.method.stats against hand-computed values: attention entropy, both SNR forms, and the x0 form
changing the gate's decisions where it must."""
from __future__ import annotations

import math

import pytest
import torch

from dqar import DQARConfig
from dqar.method.controller import DQARController
from dqar.method.pending_entropy import PendingEntropies
from dqar.method.stats import (attention_entropy, attention_logits, first_images_index, logits_entropy, policy_features,
                               sample_query_rows, schedule_snr, x0_snr)

LN2, LN3 = math.log(2.0), math.log(3.0)


def entropy_of(weights):
    """-sum p log p of a normalised list, by hand."""
    total = sum(weights)
    return -sum(w / total * math.log(w / total) for w in weights)


def _keys(hd=2):
    # Three keys whose first coordinate is 0, ln 2, ln 3: a query (c, 0, ...) gives logits c * (0, ln 2, ln 3),
    # i.e. softmax weights proportional to (1, 2^c, 3^c).
    k = torch.zeros(3, hd, dtype=torch.float64)
    k[:, 0] = torch.tensor([0.0, LN2, LN3], dtype=torch.float64)
    return k


def test_attention_entropy_matches_hand_computed_softmax_entropies():
    # q, k: (N=2, H=2, T=3, hd=2), scale 1. Batch 0: head 0 has zero queries (uniform weights, entropy ln 3),
    # head 1 queries (1, 0) on every row (weights 1:2:3). Batch 1: head 0 rows c = 1, 0, 2 (weights 1:2:3,
    # uniform, 1:4:9), head 1 zero queries.
    q = torch.zeros(2, 2, 3, 2, dtype=torch.float64)
    k = torch.zeros(2, 2, 3, 2, dtype=torch.float64)
    k[:] = _keys()
    q[0, 1, :, 0] = 1.0
    q[1, 0, :, 0] = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    h123, h149, uniform = entropy_of([1, 2, 3]), entropy_of([1, 4, 9]), LN3
    # The mean over heads and query rows: seed 000's -1/(H T) sum_h sum_ij A log A.
    expected = [(uniform + h123) / 2, ((h123 + uniform + h149) / 3 + uniform) / 2]
    got = attention_entropy(q, k, torch.arange(3), scale=1.0)
    assert got.shape == (2,) and got.dtype == torch.float32
    # log(A + 1e-6) instead of log A moves each value by at most T * 1e-6.
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    # Only the sampled query rows count: rows 0 and 2 of batch 1, head 0 are 1:2:3 and 1:4:9.
    got_rows = attention_entropy(q, k, torch.tensor([0, 2]), scale=1.0)
    assert got_rows.tolist() == pytest.approx([(uniform + h123) / 2, ((h123 + h149) / 2 + uniform) / 2], abs=1e-5)
    assert h123 == pytest.approx(1.0114042647, abs=1e-9) and h149 == pytest.approx(0.8304717124, abs=1e-9)


def test_attention_entropy_default_scale_is_one_over_sqrt_head_dim():
    # hd = 4: the default scale 1/2 turns a query (2, 0, 0, 0) into logits (0, ln 2, ln 3).
    k = _keys(hd=4).expand(1, 1, 3, 4)
    q = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    q[..., 0] = 2.0
    assert attention_entropy(q, k, torch.arange(3)).item() == pytest.approx(entropy_of([1, 2, 3]), abs=1e-5)


def test_attention_entropy_limits():
    # One-hot attention has entropy 0; uniform attention over T keys has ln T (the most there is).
    k = torch.eye(4).expand(1, 1, 4, 4)
    sharp = attention_entropy(torch.eye(4).expand(1, 1, 4, 4) * 100.0, k, torch.arange(4), scale=1.0)
    assert sharp.item() == pytest.approx(0.0, abs=1e-4)
    flat = attention_entropy(torch.zeros(1, 1, 4, 4), k, torch.arange(4), scale=1.0)
    assert flat.item() == pytest.approx(math.log(4), abs=1e-5)


def test_sample_query_rows_is_seeded_sorted_and_complete_when_asked_for_all():
    assert sample_query_rows(5, 8, 0).tolist() == [0, 1, 2, 3, 4]
    rows = sample_query_rows(64, 16, 3)
    assert len(set(rows.tolist())) == 16 and rows.tolist() == sorted(rows.tolist())
    assert torch.equal(rows, sample_query_rows(64, 16, 3)) and not torch.equal(rows, sample_query_rows(64, 16, 4))


def test_schedule_snr_by_hand():
    assert schedule_snr(0.6, 0.8) == pytest.approx(0.36 / 0.64, rel=1e-12)
    # alpha = sqrt(acp), sigma = sqrt(1 - acp): SNR = acp / (1 - acp).
    for acp in (0.9, 0.5, 0.02):
        assert schedule_snr(math.sqrt(acp), math.sqrt(1 - acp)) == pytest.approx(acp / (1 - acp), rel=1e-12)
    assert schedule_snr(1.0, 0.0) == 1e12                      # sigma 0 is guarded, not a division by zero


def test_x0_snr_by_hand():
    x0 = torch.tensor([[3.0, 4.0]])                              # ||x0||^2 = 25
    xt = torch.tensor([[4.0, 2.0]])                              # ||xt - x0||^2 = 1 + 4 = 5
    assert x0_snr(x0, xt) == pytest.approx(25.0 / (5.0 + 1e-6), rel=1e-7)
    # Over the whole batch, not per sample: (9 + 16 + 1) / (1 + 4 + 4).
    x0b = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    xtb = torch.tensor([[4.0, 2.0], [3.0, 0.0]])
    assert x0_snr(x0b, xtb) == pytest.approx(26.0 / 9.0, rel=1e-6)
    assert x0_snr(x0, x0) == pytest.approx(25.0 / 1e-6, rel=1e-6)      # eps keeps xt == x0 finite
    assert x0_snr(x0.half(), xt.half()) == pytest.approx(5.0, rel=1e-6)


def test_policy_features_by_hand():
    assert policy_features(2.5, math.e ** 2, math.e, 0.25, 200) == pytest.approx(
        [2.5, 2.0, 1.0, 0.25, 1.0], abs=1e-7)
    assert policy_features(1.0, 0.0, 0.0, 0.0, 32)[1:3] == pytest.approx([math.log(1e-8)] * 2)
    assert policy_features(1.0, 1.0, 1.0, 1.0, 32)[4] == 0.25


# --------------------------------------------------------------------------------------------------
# snr_form: the gate reads the schedule's SNR, or the x0 form measured at the end of the previous step
# --------------------------------------------------------------------------------------------------

def _decisions(snr_form, schedule_snrs, x0_pairs):
    """Run a controller by hand over len(schedule_snrs) steps, one layer, one branch; return, per step, whether
    layer 0 reuses. Step i is told schedule_snrs[i]; its end records the x0 SNR of x0_pairs[i]."""
    cfg = DQARConfig(schedule="gate", warmup=0.0, tau0=64.0, snr_range=(0.5, 50.0), snr_form=snr_form)
    ctl = DQARController(cfg, num_layers=1)
    steps, out = len(schedule_snrs), []
    for i, snr in enumerate(schedule_snrs):
        ctl.begin_step(i, steps, snr=snr)
        decision = ctl.should_reuse(0, "cond")
        out.append(decision.use_cache)
        if not decision.use_cache:
            ctl.commit(0, "cond", output=torch.full((1, 4, 8), float(i)), entropy=0.5)   # tau = 64 / 8 = 8
        ctl.end_step(*x0_pairs[i])
    return out, ctl.summary()


def test_x0_form_changes_the_gates_decisions_where_the_two_snrs_disagree():
    x0 = torch.tensor([[3.0, 4.0]])
    inside = (x0, torch.tensor([[4.0, 2.0]]))            # x0 SNR 5: inside [0.5, 50]
    outside = (x0, x0 + 0.1)                             # x0 SNR 25 / 0.02 = 1250: above 50
    # Steps 1 and 2 have a cached entry and a low entropy. Step 1's schedule SNR (100) is outside the window,
    # step 0's x0 SNR (5) inside; step 2's schedule SNR (5) is inside, step 1's x0 SNR (1250) outside.
    schedule_snrs = [100.0, 100.0, 5.0]
    pairs = [inside, outside, inside]
    assert _decisions("schedule", schedule_snrs, pairs)[0] == [False, False, True]
    x0_reuse, summary = _decisions("x0", schedule_snrs, pairs)
    assert x0_reuse == [False, True, False]
    # The x0 form's step 0 has no measurement yet (None: no reuse); later steps read the previous step's.
    assert summary["snr_per_step"] == [None, pytest.approx(25 / (5 + 1e-6)),
                                       pytest.approx(25 / (0.02 + 1e-6), rel=1e-3)]
    assert summary["x0_snr_per_step"] == [pytest.approx(5.0), pytest.approx(1250.0, rel=1e-3), pytest.approx(5.0)]


def test_first_images_index_keeps_the_first_images_of_each_branch():
    # two branches of three images
    assert first_images_index(6, 2, 1).tolist() == [0, 3]
    assert first_images_index(6, 2, 2).tolist() == [0, 1, 3, 4]
    assert first_images_index(6, 1, 2).tolist() == [0, 1]
    for images in (0, 3, 5):                                         # every image: no index
        assert first_images_index(6, 2, images) is None


def test_attention_logits_of_some_images_are_those_images_rows():
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(6, 5, 3, 2, 4, generator=g).permute(2, 0, 3, 1, 4)     # strided q, k as the DiT makes them
    q, k, rows, keep = qkv[0], qkv[1], torch.tensor([0, 3]), torch.tensor([0, 3])
    got = attention_logits(q, k, rows, images=keep)
    assert torch.equal(got, attention_logits(q[keep].contiguous(), k[keep].contiguous(), rows))
    assert torch.equal(attention_logits(q, k, rows)[keep], got)


def test_pending_entropies_resolve_in_one_pass_to_the_per_call_values():
    """Logits of different shapes and branch splits, resolved together: each part's entropy is the mean of
    logits_entropy over its rows, in the order added, and resolving empties the queue."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 2, 3, 5, generator=g)      # two branches of two images
    b = torch.randn(2, 2, 3, 5, generator=g)      # one branch of two images, same row shape as a
    c = torch.randn(2, 2, 3, 7, generator=g)      # another token count: its own batch
    pending = PendingEntropies()
    pending.add(a, [(0, "cond", "ea0"), (0, "uncond", "ea1")])
    pending.add(c, [(2, "cond", "ec")])
    pending.add(b, [(1, "uncond", "eb")])
    assert len(pending) == 3 and pending.has_layer(2) and not pending.has_layer(3)
    got = pending.resolve()
    ha, hb, hc = logits_entropy(a), logits_entropy(b), logits_entropy(c)
    want = [(0, "cond", "ea0", ha[:2].mean()), (0, "uncond", "ea1", ha[2:].mean()),
            (2, "cond", "ec", hc.mean()), (1, "uncond", "eb", hb.mean())]
    assert [g[:3] for g in got] == [w[:3] for w in want]
    assert [g[3] for g in got] == pytest.approx([float(w[3]) for w in want], rel=1e-6)
    assert len(pending) == 0 and pending.resolve() == []
    with pytest.raises(ValueError, match="3 logit rows do not split into 2 branches"):
        pending.add(torch.zeros(3, 1, 1, 2), [(0, "cond", None), (0, "uncond", None)])


def test_attention_entropy_is_logits_then_entropy():
    g = torch.Generator().manual_seed(1)
    q, k, rows = torch.randn(3, 2, 6, 4, generator=g), torch.randn(3, 2, 6, 4, generator=g), torch.tensor([1, 4])
    assert torch.equal(attention_entropy(q, k, rows), logits_entropy(attention_logits(q, k, rows)))


def test_pending_entropies_batch_within_the_element_budget(monkeypatch):
    """Past the budget a step's logits go through in several batches, with the same values."""
    import dqar.method.pending_entropy as pending_module

    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(2, 2, 3, 5, generator=g) for _ in range(5)]
    seen = []
    real = pending_module.logits_entropy
    monkeypatch.setattr(pending_module, "logits_entropy", lambda t: (seen.append(t.shape[0]), real(t))[1])
    monkeypatch.setattr(pending_module, "BATCH_ELEMENTS", 2 * logits[0].numel())
    pending = PendingEntropies()
    for layer, t in enumerate(logits):
        pending.add(t, [(layer, "cond", None)])
    got = [e for *_, e in pending.resolve()]
    assert seen == [4, 4, 2]                        # two items per batch, the last alone
    assert got == pytest.approx([float(real(t).mean()) for t in logits], rel=1e-6)


def _strided_qk(seed: int, n: int = 6, tokens: int = 5, heads: int = 2, hd: int = 4):
    """q, k as the DiT makes them: strided views of one fused projection."""
    qkv = torch.randn(n, tokens, 3, heads, hd, generator=torch.Generator().manual_seed(seed)).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1]


def test_queued_q_and_k_give_the_per_call_logits_exactly():
    from dqar.method.stats import QKRows, stacked_logits

    rows = [torch.tensor([1, 3]), torch.tensor([0, 4]), torch.tensor([2, 3])]    # each layer samples its own
    calls = [_strided_qk(s) for s in range(3)]
    queued = [QKRows(q, k, r, groups=2, images=2) for (q, k), r in zip(calls, rows)]
    assert len({c.kind() for c in queued}) == 1 and queued[0].batch == 4
    formed = stacked_logits(queued)
    keep = first_images_index(6, 2, 2)
    assert formed.shape == (3, 4, 2, 2, 5)
    for got, (q, k), r in zip(formed, calls, rows):
        assert torch.equal(got, attention_logits(q, k, r, images=keep))
    calls[1][0].mul_(2.0)                       # q written in place after the call: refused, not mis-measured
    with pytest.raises(RuntimeError, match="written in place"):
        stacked_logits(queued)


def test_pending_entropies_of_queued_calls_equal_those_of_formed_logits(monkeypatch):
    """QKRows and ready logits in one queue, resolved together, and a queue past its byte budget formed early:
    the same values as logits formed in the hook, in the order added."""
    import dqar.method.pending_entropy as pending_module
    from dqar.method.stats import QKRows

    rows, keep = torch.tensor([0, 2, 4]), first_images_index(6, 2, 1)
    calls = [_strided_qk(10 + s) for s in range(4)]
    want = [float(logits_entropy(attention_logits(q, k, rows, images=keep))[j]) for q, k in calls for j in (0, 1)]
    for budget in (pending_module.HELD_BYTES, 1):
        monkeypatch.setattr(pending_module, "HELD_BYTES", budget)
        pending = PendingEntropies()
        for layer, (q, k) in enumerate(calls):
            item = QKRows(q, k, rows, 2, 1) if layer != 2 else attention_logits(q, k, rows, images=keep)
            pending.add(item, [(layer, "cond", None), (layer, "uncond", None)])
        held = sum(isinstance(it, QKRows) for it, _ in pending._items)
        assert held == (3 if budget > 1 else 0)
        got = pending.resolve()
        assert [g[:2] for g in got] == [(layer, b) for layer in range(4) for b in ("cond", "uncond")]
        assert [g[3] for g in got] == pytest.approx(want, rel=1e-6)
    assert PendingEntropies.defers(calls[0][0], 1, 2)
    assert not PendingEntropies.defers(calls[0][0], 0, 2)          # every image: formed in the hook
    monkeypatch.setattr(pending_module, "DEFER_ELEMENTS", 8)
    assert not PendingEntropies.defers(calls[0][0], 1, 2)          # large: formed in the hook
