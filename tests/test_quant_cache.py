"""The quantized reuse cache inside a real sampling loop (DiT-Tiny, random weights, 10 DDIM steps, CFG 2).

16 bits is the unquantized path and must replay the computed tensor bit for bit; 8 / 4 bits must fire
on the same decisions, move the images a little, and account their bytes exactly as the shapes say.
"""
import json
import math

import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.method.quant import Unquantized
from dqar.cli import main
from dqar.models import build_dit
from dqar.method.quant import QTensor
from dqar.sampling import sample

LABELS, SEEDS, STEPS, CFG = [1, 7], [3, 4], 10, 2.0
# DiT-Tiny: 8x8 input, patch 2 -> 16 tokens, hidden 32, 2 heads, 4 layers; one cache entry per
# (layer, branch) holds the branch's 2 rows.
ROWS, TOKENS, HIDDEN, HEADS, LAYERS = 2, 16, 32, 2, 4
HEAD_DIM = HIDDEN // HEADS
ENTRIES = LAYERS * 2
AGGRESSIVE = {"warmup": 0.2, "layer_fraction": 1.0}
# Static schedule, w=0.2, l=1.0, 4 layers, 10 steps: floor((p - 0.2) / 0.8 * 4) shallow layers at p = i/9.
REUSED_LAYERS = [max(0, int((i / 9 - 0.2) / 0.8 * 4 + 1e-9)) if i / 9 >= 0.2 else 0 for i in range(STEPS)]
REUSE_EVENTS = 2 * sum(REUSED_LAYERS)   # 26


def quantized_bytes(shape, bits, granularity, salient=0):
    """Bytes of one QTensor computed from its shape: payload + float32 scales + CSB values and indices."""
    numel = math.prod(shape)
    channels = shape[-1]
    rows = numel // channels
    payload = numel if bits == 8 else math.ceil(numel / 2)
    scales = 4 * {"tensor": 1, "channel": channels, "token": rows}[granularity]
    # CSB: the k salient channels kept in float32 for every row, plus their int64 indices
    return payload + scales + salient * (rows * 4 + 8)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tensors here are a few KB: a second intra-op thread only adds synchronisation, and on a shared
    # 2-core machine it made this file 4x slower (26 s vs 6 s CPU). Restored for the other test files.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return build_dit("DiT-Tiny").randomize_(0, std=0.2).eval()


_RUNS = {}


def run(model, labels=LABELS, seeds=SEEDS, **overrides):
    """Images, summary and the cache entries left after the last step (remove_dqar clears them).

    Memoized per configuration (the model fixture is module-scoped and never changes) so tests that
    compare modes do not pay for the same generation twice."""
    key = (tuple(labels), tuple(seeds), tuple(sorted(overrides.items())))
    if key not in _RUNS:
        ctl = apply_dqar(model, DQARConfig(**{**AGGRESSIVE, **overrides}))
        try:
            images = sample(model, labels, seeds, steps=STEPS, cfg_scale=CFG)
            _RUNS[key] = images, ctl.summary(), dict(ctl.cache.entries)
        finally:
            remove_dqar(model)
    return _RUNS[key]


@pytest.fixture(scope="module")
def uncached(model):
    return sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=CFG)


@pytest.fixture(scope="module")
def exact_run(model):
    return run(model, cache_bits=16)


def reference_reuse(model):
    """Unquantized reuse written out by hand: keep each layer's last attention output in a dict and
    return it on the layers the static schedule reuses. Independent of dqar.method.cache and the controller."""
    state = {"step": 0, "cache": {}}

    class StepTracker:
        def on_step_begin(self, info):
            state["step"] = info.step_index

        def on_step_end(self, info):
            pass

    def wrap(layer, attn):
        original = attn.forward

        def forward(x):
            if layer < REUSED_LAYERS[state["step"]] and layer in state["cache"]:
                return state["cache"][layer]
            out = original(x)
            state["cache"][layer] = out
            return out

        attn.forward = forward

    for layer, block in enumerate(model.blocks):
        wrap(layer, block.attn)
    try:
        return sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=CFG, observers=[StepTracker()])
    finally:
        for block in model.blocks:
            block.attn.__dict__.pop("forward", None)


# ------------------------------------------------------------------------------------------ 16 bits
def test_16_bit_reuse_is_bit_identical_to_unquantized_reuse(model, exact_run, uncached):
    images, s, entries = exact_run
    assert s["events_per_step"] == [2 * n for n in REUSED_LAYERS] and s["reuse_events"] == REUSE_EVENTS
    assert torch.equal(images, reference_reuse(model))
    assert not torch.equal(images, uncached)  # reuse did change the run, so the equality above means something
    assert len(entries) == ENTRIES
    for e in entries.values():
        assert type(e.output) is Unquantized and e.output.tensor.dtype == torch.float32
        assert e.output.tensor.shape == (ROWS, TOKENS, HIDDEN)
        assert e.output.dequantize() is e.output.tensor  # replayed as is, no copy, no rounding
    assert s["cache_bytes"] == ENTRIES * ROWS * TOKENS * HIDDEN * 4 == 32768
    assert s["peak_cache_bytes"] == s["cache_bytes"]


# ------------------------------------------------------------------------------------------ 8 / 4 bits
# Measured relative image change vs the 16-bit run (||q - e|| / ||e||): int8 1.1e-5..2.2e-5, int4
# 1.7e-4..5.1e-4; reuse itself moves the images by 1.6e-3. The bounds leave ~2-5x margin.
BOUND = {8: 1e-4, 4: 1e-3}


@pytest.mark.parametrize("granularity", ["tensor", "channel", "token"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_reuse_fires_moves_images_slightly_and_counts_bytes_exactly(model, exact_run, uncached,
                                                                              bits, granularity):
    exact_images, exact_s, _ = exact_run
    images, s, entries = run(model, cache_bits=bits, quant_granularity=granularity)
    # same decisions as 16 bits: the only difference is what the cache holds
    assert s["events_per_step"] == exact_s["events_per_step"] and s["reuse_events"] == REUSE_EVENTS
    assert not torch.equal(images, exact_images)
    assert 0.0 < rel(images, exact_images) < BOUND[bits]
    assert rel(images, exact_images) < rel(exact_images, uncached)
    assert len(entries) == ENTRIES
    for e in entries.values():
        q = e.output
        assert type(q) is QTensor and q.bits == bits and q.granularity == granularity
        assert q.shape == (ROWS, TOKENS, HIDDEN) and q.salient_idx is None
        assert q.payload.dtype == (torch.int8 if bits == 8 else torch.uint8)
    per_entry = quantized_bytes((ROWS, TOKENS, HIDDEN), bits, granularity)
    assert s["cache_bytes"] == ENTRIES * per_entry == sum(e.nbytes for e in entries.values())
    # every (layer, branch) entry is overwritten by one of the same size, so the peak is the final total
    assert s["peak_cache_bytes"] == s["cache_bytes"]
    expected = {(8, "tensor"): 8224, (8, "channel"): 9216, (8, "token"): 9216,
                (4, "tensor"): 4128, (4, "channel"): 5120, (4, "token"): 5120}
    assert s["cache_bytes"] == expected[bits, granularity]


@pytest.mark.parametrize("granularity", ["tensor", "channel", "token"])
def test_int4_moves_images_more_than_int8(model, exact_run, granularity):
    exact_images = exact_run[0]
    err8 = rel(run(model, cache_bits=8, quant_granularity=granularity)[0], exact_images)
    err4 = rel(run(model, cache_bits=4, quant_granularity=granularity)[0], exact_images)
    assert err8 < err4


# ------------------------------------------------------------------------------------------ kv mode
def test_kv_mode_stores_k_exact_and_v_int8(model):
    kv16, s16, _ = run(model, mode="kv", kv_bits=(16, 16))
    images, s, entries = run(model, mode="kv", kv_bits=(16, 8))
    assert s["reuse_events"] == s16["reuse_events"] == REUSE_EVENTS
    assert not torch.equal(images, kv16) and 0.0 < rel(images, kv16) < BOUND[8]
    shape = (ROWS, HEADS, TOKENS, HEAD_DIM)
    for e in entries.values():
        assert e.output is None
        assert type(e.keys) is Unquantized and e.keys.tensor.shape == shape
        # K is a strided view of the fused qkv projection; the cache must hold K alone, not all of qkv
        assert e.keys.tensor.untyped_storage().nbytes() == e.keys.nbytes == math.prod(shape) * 4
        assert type(e.values) is QTensor and e.values.bits == 8 and e.values.shape == shape
        assert e.values.granularity == "channel" and e.values.payload.dtype == torch.int8
    per_entry = math.prod(shape) * 4 + quantized_bytes(shape, 8, "channel")
    assert s["cache_bytes"] == ENTRIES * per_entry == ENTRIES * (4096 + 1024 + 64)
    assert s16["cache_bytes"] == ENTRIES * 2 * math.prod(shape) * 4
    assert s["peak_cache_bytes"] == s["cache_bytes"]


# ------------------------------------------------------------------------------------------ CSB
def test_csb_calibrates_over_the_first_computed_steps_and_fires(model, exact_run):
    # Record every layer's attention output (both branches) at the first two steps, which compute all layers.
    seen = {}
    state = {"step": 0}

    class StepTracker:
        def on_step_begin(self, info):
            state["step"] = info.step_index

        def on_step_end(self, info):
            pass

    def record(layer):
        def hook(module, args, out):
            if state["step"] < 2:
                seen.setdefault(layer, []).append(out.detach().clone())
        return hook

    ctl = apply_dqar(model, DQARConfig(**AGGRESSIVE, cache_bits=8, csb_topk=2, csb_calibration_steps=2))
    handles = [b.attn.register_forward_hook(record(i)) for i, b in enumerate(model.blocks)]
    try:
        images = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=CFG, observers=[StepTracker()])
        s, entries = ctl.summary(), dict(ctl.cache.entries)
    finally:
        for h in handles:
            h.remove()
        remove_dqar(model)
    assert s["reuse_events"] == REUSE_EVENTS
    assert 0.0 < rel(images, exact_run[0]) < BOUND[8]
    for (layer, branch, target), e in entries.items():
        assert e.step >= 2  # committed after calibration froze
        outs = torch.stack(seen[layer])                      # (2 steps, 2 * ROWS, TOKENS, HIDDEN)
        assert outs.shape == (2, 2 * ROWS, TOKENS, HIDDEN)
        absmax = outs.abs().amax(dim=(0, 1, 2))
        expected = torch.sort(torch.topk(absmax, 2).indices).values
        assert torch.equal(e.output.salient_idx, expected)
        kept = e.output.salient_values
        assert kept.shape == (ROWS, TOKENS, 2) and kept.dtype == torch.float32
        # the salient channels come back exactly; the rest are quantized
        assert torch.equal(e.output.dequantize()[..., expected], kept)
    per_entry = quantized_bytes((ROWS, TOKENS, HIDDEN), 8, "channel", salient=2)
    assert s["cache_bytes"] == ENTRIES * per_entry == sum(e.nbytes for e in entries.values()) == ENTRIES * 1424
    assert s["peak_cache_bytes"] == s["cache_bytes"]


def test_csb_without_calibration_picks_channels_per_commit(model):
    images, s, entries = run(model, cache_bits=4, csb_topk=0.1)  # 10% of 32 channels -> 3
    assert s["reuse_events"] == REUSE_EVENTS
    for e in entries.values():
        assert e.output.salient_idx.numel() == 3
    assert s["cache_bytes"] == ENTRIES * quantized_bytes((ROWS, TOKENS, HIDDEN), 4, "channel", salient=3)


# ------------------------------------------------------------------------------------------ state
def test_no_state_survives_into_the_next_generation(model):
    cfg = DQARConfig(**AGGRESSIVE, cache_bits=4, csb_topk=2, csb_calibration_steps=2)
    ctl = apply_dqar(model, cfg)
    try:
        a = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=CFG)
        sa, idx_a = ctl.summary(), {k: e.output.salient_idx for k, e in ctl.cache.entries.items()}
        # a different batch in between: its calibration and entries must not carry over
        sample(model, [0, 2, 5], [11, 12, 13], steps=STEPS, cfg_scale=CFG)
        other_bytes = ctl.summary()["cache_bytes"]
        b = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=CFG)
        sb, idx_b = ctl.summary(), {k: e.output.salient_idx for k, e in ctl.cache.entries.items()}
    finally:
        remove_dqar(model)
    fresh, sf, _ = run(model, cache_bits=4, csb_topk=2, csb_calibration_steps=2)
    assert torch.equal(a, b) and torch.equal(a, fresh)
    assert sa["cache_bytes"] == sb["cache_bytes"] == sf["cache_bytes"]
    assert sa["peak_cache_bytes"] == sb["peak_cache_bytes"] == sf["peak_cache_bytes"]
    assert sa["reuse_events"] == sb["reuse_events"] == REUSE_EVENTS
    assert idx_a.keys() == idx_b.keys() and all(torch.equal(idx_a[k], idx_b[k]) for k in idx_a)
    # 3 rows per branch instead of 2: a larger cache, so had it leaked the peak above would have shown it
    assert other_bytes == ENTRIES * quantized_bytes((3, TOKENS, HIDDEN), 4, "channel", salient=2)
    assert other_bytes > sa["cache_bytes"]


# ------------------------------------------------------------------------------------------ CLI
def generate_json(tmp_path, capsys, bits):
    out = tmp_path / f"bits{bits}"
    rc = main(["generate", "--model", "DiT-Tiny", "--steps", "6", "--warmup", "0.2", "--layers", "1",
               "--cache-bits", str(bits), "--json", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


def test_generate_json_reports_quantized_cache_mb(tmp_path, capsys):
    q = generate_json(tmp_path, capsys, 8)
    e = generate_json(tmp_path, capsys, 16)
    assert q["config"]["cache_bits"] == 8 and e["config"]["cache_bits"] == 16
    dq, de = q["dqar"], e["dqar"]
    assert dq["reuse_events"] == de["reuse_events"] > 0
    # every class once (10 rows per branch) at cfg 1.5 -> 2 branches x 4 layers
    shape = (10, TOKENS, HIDDEN)
    assert dq["cache_bytes"] == ENTRIES * quantized_bytes(shape, 8, "channel") == 41984
    assert de["cache_bytes"] == ENTRIES * math.prod(shape) * 4 == 163840
    assert dq["cache_mb"] == dq["cache_bytes"] / 2**20
    assert de["cache_mb"] == de["cache_bytes"] / 2**20
    assert dq["cache_mb"] < de["cache_mb"]


def test_generate_rejects_unsupported_cache_bits(tmp_path, capsys):
    rc = main(["generate", "--model", "DiT-Tiny", "--steps", "2", "--cache-bits", "3", "--json",
               "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cache_bits=3" in err and "16 (unquantized), 8 or 4" in err
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("field,value", [
    ("cache_bits", 3), ("cache_bits", 32), ("cache_bits", True), ("cache_bits", 8.5),
    ("csb_topk", -1), ("csb_topk", 2.5), ("csb_calibration_steps", -1),
    ("kv_bits", (16, 3)), ("kv_bits", (8,)), ("quant_granularity", "row"),
])
def test_bad_quantization_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"DQARConfig\.{field}="):
        DQARConfig(**{field: value})


def test_csb_topk_beyond_the_cached_channels_fails_at_apply_time(model):
    with pytest.raises(ValueError, match="csb_topk=33 .* 32 channels"):
        apply_dqar(model, DQARConfig(cache_bits=8, csb_topk=33))
    with pytest.raises(ValueError, match=f"csb_topk=17 .*head dim of K/V is {HEAD_DIM}"):
        apply_dqar(model, DQARConfig(mode="kv", cache_bits=8, csb_topk=HEAD_DIM + 1))
    assert not hasattr(model, "_dqar_controller")       # nothing was left half-attached


def test_csb_applies_to_the_kv_cache(model):
    _, _, plain = run(model, mode="kv", cache_bits=4, quant_granularity="tensor")
    _, _, csb = run(model, mode="kv", cache_bits=4, quant_granularity="tensor", csb_topk=2)
    entry_plain, entry_csb = plain[(0, "cond", "attn")], csb[(0, "cond", "attn")]
    shape = tuple(entry_csb.keys.shape)
    assert entry_csb.keys.nbytes == quantized_bytes(shape, 4, "tensor", salient=2)
    assert entry_csb.values.nbytes == quantized_bytes(shape, 4, "tensor", salient=2)
    assert entry_plain.keys.nbytes == quantized_bytes(shape, 4, "tensor")
