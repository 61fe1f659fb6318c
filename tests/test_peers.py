"""diffusers' caches as named baselines on the diffusers port of the same weights, and the module-call count."""
from __future__ import annotations

import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.harness.baselines import BASELINE_SETTINGS, BASELINES, make_baseline
from dqar.harness.peers import PEERS, PeerDiT, count_module_calls, sampling_observers, validate_options
from dqar.method.step import StepInfo
from dqar.models.diffusers_port import DiffusersDiT
from dqar.models.dit import build_dit
from dqar.sampling import make_scheduler, sample

STEPS = 10
LABELS, SEEDS = [1, 2], [0, 1]
# Settings under which each peer skips on the random tiny model (its features move far more from step to
# step than a trained model's, so the gated peers need looser thresholds than their defaults).
FIRING = {"taylorseer": {}, "fastercache": {}, "seacache": {"threshold": 5.0}, "fbc": {"threshold": 1.0},
          "magcache": {"threshold": 1.0, "retention_ratio": 0.0, "calibration_steps": STEPS}}
# Settings under which each peer computes every call.
NEVER = {"taylorseer": {"cache_interval": 1}, "seacache": {"threshold": 0},
         "fastercache": {"unconditional_batch_skip_range": 1, "spatial_attention_block_skip_range": 1},
         "fbc": {"threshold": 0}, "magcache": {"max_skip_steps": 0, "calibration_steps": STEPS}}


@pytest.fixture(scope="module")
def tiny():
    return build_dit("DiT-Tiny").randomize_(0, std=0.2).eval()


@pytest.fixture(scope="module")
def ref(tiny):
    return sample(tiny, LABELS, SEEDS, steps=STEPS, cfg_scale=1.5)


def run(model, labels=LABELS, seeds=SEEDS, steps=STEPS, cfg_scale=1.5):
    return sample(model, labels, seeds, steps=steps, cfg_scale=cfg_scale, observers=sampling_observers(model))


@pytest.mark.parametrize("name", PEERS)
def test_each_peer_fires_and_counts_what_it_skipped(tiny, ref, name):
    peer = make_baseline(name, tiny, options=FIRING[name])
    assert isinstance(peer, PeerDiT)
    ran_with = {k: v for k, v in peer.settings.items() if k != "mag_ratios"}     # magcache adds its calibration
    assert ran_with == {**BASELINE_SETTINGS[name], **FIRING[name]}
    with count_module_calls(peer) as calls:
        out = run(peer)
    assert set(calls) == {"attn", "mlp", "block"}
    assert calls.expected["attn"] == 2 * len(LABELS) * STEPS * tiny.config.depth   # [cond | uncond] rows
    assert calls["attn"] < 1.0 and calls.executed["attn"] < calls.expected["attn"]
    stats = peer.reuse_stats()
    assert stats["reuse_events"] > 0 and 0 < stats["reuse_fraction"] < 1
    assert stats["calls"] == dict(calls) and stats["cache_bytes"] > 0
    assert (out - ref).abs().max() > 1e-3
    if name in ("seacache", "fbc", "magcache"):     # whole-stack caches skip blocks, attention and MLP together
        assert calls["block"] == calls["attn"] == calls["mlp"] < 1.0
    if name == "taylorseer":                        # module caches: every block still runs its norms
        assert calls["block"] == 1.0 and calls["attn"] == calls["mlp"] < 1.0
    if name == "fastercache":                       # the skipped unconditional branch halves MLP rows
        assert 0.5 <= calls["mlp"] < 1.0 and calls["attn"] < calls["mlp"]


@pytest.mark.parametrize("name", PEERS)
def test_a_peer_that_never_skips_matches_the_uncached_model(tiny, ref, name):
    peer = make_baseline(name, tiny, options=NEVER[name])
    with count_module_calls(peer) as calls:
        out = run(peer)
    assert dict(calls) == {"attn": 1.0, "mlp": 1.0, "block": 1.0}
    assert peer.reuse_stats()["reuse_events"] == 0
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", PEERS + ("pab",))
def test_no_state_survives_into_the_next_generation_whatever_its_batch(tiny, name):
    # PAB with skip 3 crashed on a new batch size when its hooks kept the last generation's cache.
    options = {"block_skip_range": 3} if name == "pab" else FIRING[name]
    peer = make_baseline(name, tiny, options=options)
    first = run(peer)
    events = peer.reuse_stats()["reuse_events"]
    single = run(peer, labels=[7], seeds=[5])
    again = run(peer)
    assert torch.equal(again, first) and peer.reuse_stats()["reuse_events"] == events
    fresh = make_baseline(name, tiny, options=options)
    assert torch.equal(run(fresh, labels=[7], seeds=[5]), single)


def test_peers_leave_the_source_model_unhooked(tiny, ref):
    for name in PEERS:
        run(make_baseline(name, tiny, options=FIRING[name]))
    assert torch.equal(sample(tiny, LABELS, SEEDS, steps=STEPS, cfg_scale=1.5), ref)
    for module in tiny.modules():
        assert "_diffusers_hook" not in module.__dict__ and "forward" not in module.__dict__
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_a_peer_sampled_without_its_observer_refuses(tiny):
    peer = make_baseline("fbc", tiny)
    with pytest.raises(RuntimeError, match="observers=dqar.harness.peers.sampling_observers"):
        sample(peer, LABELS, SEEDS, steps=STEPS, cfg_scale=1.5)


def test_fastercache_needs_guidance(tiny):
    with pytest.raises(ValueError, match="needs classifier-free guidance"):
        run(make_baseline("fastercache", tiny), cfg_scale=1.0)


def test_fastercache_computes_the_conditional_branch_and_approximates_the_unconditional(tiny):
    # FasterCache assumes [uncond | cond]; sample() batches [cond | uncond]. On a step that skips a branch the
    # conditional half must be the exact one and the unconditional half the approximation.
    peer = make_baseline("fastercache", tiny, options={
        "unconditional_batch_skip_range": 2, "unconditional_batch_timestep_skip_range": "-1,1000",
        "spatial_attention_timestep_skip_range": "-3,-2"})        # attention always computes
    port = DiffusersDiT(tiny)
    sched = make_scheduler("ddim")
    sched.set_timesteps(STEPS)
    acp = sched.alphas_cumprod
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, 4, 10, 10])                  # [cond | uncond]; 10 is the null class
    for i, t in enumerate(sched.timesteps[:2]):
        t = int(t)
        peer.on_step_begin(StepInfo(i, STEPS, t, float(acp[t].sqrt()), float((1 - acp[t]).sqrt()), x,
                                    ("cond", "uncond")))
        x_in, t_in = torch.cat([x, x]), torch.full((4,), t)
        with torch.no_grad(), count_module_calls(peer) as calls:
            out = peer(x_in, t_in, y)
            exact = port(x_in, t_in, y)
        torch.testing.assert_close(out[:2], exact[:2], rtol=0, atol=1e-5)
        if i == 1:      # the unconditional branch was skipped and approximated
            assert calls["mlp"] == 0.5 and (out[2:] - exact[2:]).abs().max() > 1e-4
        else:
            torch.testing.assert_close(out[2:], exact[2:], rtol=0, atol=1e-5)


def test_magcache_calibrates_once_when_made_and_follows_other_step_counts(tiny, capsys):
    peer = make_baseline("magcache", tiny, options={"calibration_steps": STEPS, "calibration_images": 2,
                                                    "threshold": 1.0, "retention_ratio": 0.0})
    assert capsys.readouterr().out == ""            # diffusers' calibration print is kept off stdout
    ratios = peer.settings["mag_ratios"]
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    run(peer, steps=6)
    assert peer.reuse_stats()["reuse_events"] > 0
    assert peer.settings["mag_ratios"] == ratios    # the calibration is not redone
    # A different calibration set gives different ratios.
    other = make_baseline("magcache", tiny, options={"calibration_steps": STEPS, "calibration_seed": 7})
    assert other.settings["mag_ratios"] != ratios


def test_count_module_calls_on_the_project_dit_and_under_dqar(tiny):
    with count_module_calls(tiny) as calls:
        sample(tiny, LABELS, SEEDS, steps=STEPS, cfg_scale=1.5)
    assert dict(calls) == {"attn": 1.0, "mlp": 1.0, "block": 1.0}
    apply_dqar(tiny, DQARConfig(schedule="static", warmup=0.5, layer_fraction=0.5, targets=("attn",)))
    try:
        with count_module_calls(tiny) as calls:
            sample(tiny, LABELS, SEEDS, steps=STEPS, cfg_scale=1.5)
    finally:
        remove_dqar(tiny)
    assert calls["attn"] < 1.0 and calls["mlp"] == 1.0 and calls["block"] == 1.0
    apply_dqar(tiny, DQARConfig(schedule="static", warmup=0.5, layer_fraction=0.5, targets=("block",)))
    try:
        with count_module_calls(tiny) as blocks:
            sample(tiny, LABELS, SEEDS, steps=STEPS, cfg_scale=1.5)
    finally:
        remove_dqar(tiny)
    assert blocks["block"] == blocks["attn"] == blocks["mlp"] < 1.0      # a reused block runs nothing
    assert all(not m._forward_pre_hooks for m in tiny.modules())
    with count_module_calls(tiny) as idle:
        pass
    assert dict(idle) == {"attn": None, "mlp": None, "block": None}


def test_count_module_calls_agrees_with_pabs_own_count(tiny):
    pab = make_baseline("pab", tiny)
    with count_module_calls(pab) as calls:
        sample(pab, LABELS, SEEDS, steps=STEPS, cfg_scale=1.5)
    assert calls["attn"] == pytest.approx(1 - pab.reuse_stats()["reuse_fraction"]) and calls["attn"] < 1.0
    assert calls["mlp"] == calls["block"] == 1.0


def test_count_module_calls_needs_dit_blocks():
    with pytest.raises(ValueError, match="has no DiT blocks"):
        with count_module_calls(torch.nn.Linear(2, 2)):
            pass


def test_every_peer_is_a_named_baseline_with_its_settings():
    assert set(PEERS) <= set(BASELINES) and set(PEERS) <= set(BASELINE_SETTINGS)
    assert BASELINE_SETTINGS["seacache"]["threshold"] == 0.25 and BASELINE_SETTINGS["fbc"] == {"threshold": 0.05}
    assert BASELINE_SETTINGS["fastercache"]["spatial_attention_timestep_skip_range"] == [-1.0, 681.0]
    assert BASELINE_SETTINGS["taylorseer"]["targets"] == "attn,mlp"


def test_option_strings_parse_like_a_command_line():
    assert validate_options("fbc", {"threshold": "0.1"}) == {"threshold": 0.1}
    assert validate_options("pab", {"block_skip_range": "3", "timestep_range": "(100, 700)"}) == \
        {"block_skip_range": 3, "timestep_range": [100.0, 700.0]}
    assert validate_options("taylorseer", {"targets": "mlp, attn", "disable_cache_after_step": "none",
                                           "taylor_factors_dtype": "float32"}) == \
        {"targets": "attn,mlp", "disable_cache_after_step": None, "taylor_factors_dtype": "float32"}


@pytest.mark.parametrize("name, options, message", [
    ("fbc", {"treshold": 0.1}, "baseline 'fbc' has no option 'treshold'; allowed: threshold"),
    ("seacache", {"threshold": -1}, "option threshold=-1 is not allowed: must be a finite number >= 0.0"),
    ("seacache", {"residual_order": 2}, "residual_order=2 is not allowed: must be an integer >= 0 and <= 1"),
    ("seacache", {"power_exp": 0}, "power_exp=0 is not allowed: must be a finite number > 0.0"),
    ("magcache", {"threshold": "nan"}, "threshold='nan' is not allowed: must be a finite number >= 0.0"),
    ("magcache", {"calibration_sampler": "euler"}, "sampler='euler' is not allowed: must be one of ddim, dpm"),
    ("magcache", {"max_skip_steps": 1.5}, "max_skip_steps=1.5 is not allowed: must be an integer >= 0"),
    ("taylorseer", {"cache_interval": True}, "cache_interval=True is not allowed: must be an integer >= 1"),
    ("taylorseer", {"targets": "attn,norm"}, "targets='attn,norm' is not allowed: must be attn, mlp or attn,mlp"),
    ("taylorseer", {"max_order": "two"}, "max_order='two' is not allowed"),
    ("fastercache", {"unconditional_batch_timestep_skip_range": "641,-1"}, "must be two numbers low,high"),
    ("fastercache", {"spatial_attention_timestep_skip_range": [1, 2, 3]}, "must be two numbers low,high"),
    ("pab", {"block_skip_range": 0}, "block_skip_range=0 is not allowed: must be an integer >= 1"),
    ("none", {"threshold": 0.1}, "baseline 'none' takes no options; got threshold"),
    ("ptq-int8", {"bits": 8}, "baseline 'ptq-int8' takes no options; got bits"),
])
def test_bad_options_are_refused_naming_the_option_the_value_and_what_is_allowed(tiny, name, options, message):
    with pytest.raises(ValueError) as err:
        make_baseline(name, tiny, options=options)
    assert message in str(err.value)


def test_options_must_be_a_mapping(tiny):
    with pytest.raises(TypeError, match="must be a mapping of option name to value"):
        make_baseline("fbc", tiny, options=["threshold=0.1"])


def test_an_unknown_baseline_is_refused(tiny):
    with pytest.raises(ValueError, match="baseline='teacache' is not known; allowed: none, ptq-int8, pab, taylorseer"):
        make_baseline("teacache", tiny)
