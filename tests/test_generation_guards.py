"""A hooked model's guarantees at the edges: warmup 1.0, exceptions, batch changes, threads, bad labels."""
import threading

import pytest
import torch

from dqar import DQARConfig, apply_dqar, remove_dqar
from dqar.method.hooks import get_step_driver
from dqar.method.step import GenerationInProgress, StepInfo
from dqar.models import build_dit
from dqar.sampling import sample

LABELS, SEEDS, STEPS = [1, 7], [3, 4], 8


@pytest.fixture()
def model():
    return build_dit("DiT-Tiny").randomize_(0, std=0.2).eval()


def test_warmup_one_never_shares_across_cfg_branches(model):
    plain = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
    # The gate never passes (tiny tau0), so a huge epsilon would share at every step once allowed; warmup 1.0
    # must forbid it, the last step included.
    ctl = apply_dqar(model, DQARConfig(schedule="gate", warmup=1.0, tau0=1e-6, cfg_sharing=True, cfg_sharing_eps=1e9))
    try:
        images = sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        shares = ctl.summary()["share_events"]
    finally:
        remove_dqar(model)              # removal resets the controller, so its summary is read before
    assert shares == 0 and torch.equal(images, plain)
    # The same config at warmup 0.5 does share, so the test above can fail.
    ctl = apply_dqar(model, DQARConfig(schedule="gate", warmup=0.5, tau0=1e-6, cfg_sharing=True, cfg_sharing_eps=1e9))
    try:
        sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        shares = ctl.summary()["share_events"]
    finally:
        remove_dqar(model)
    assert shares > 0


def test_an_exception_mid_generation_leaves_nothing_to_reuse(model):
    ctl = apply_dqar(model, DQARConfig(warmup=0.0, layer_fraction=1.0, targets=("attn", "mlp")))
    try:
        calls = {"n": 0}

        def failing(x, t, y):
            calls["n"] += 1
            if calls["n"] == 5:
                raise KeyboardInterrupt("stopped by the user")
            return model(x, t, y)

        with pytest.raises(KeyboardInterrupt):
            sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0, denoiser=failing)
        assert not ctl.active and ctl.cache.bytes == 0
        # A direct call afterwards is the plain model's, bit for bit.
        x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        t, y = torch.tensor([500, 500]), torch.tensor([1, 7])
        hooked_out = model(x, t, y)
    finally:
        remove_dqar(model)
    assert torch.equal(hooked_out, model(x, t, y))


def _info(step, total, n, branches=("cond",)):
    return StepInfo(step, total, 999 - step, 0.9, 0.43, torch.zeros(n, 1, 8, 8), branches)


def test_a_batch_that_changes_size_mid_generation_raises(model):
    ctl = apply_dqar(model, DQARConfig(warmup=0.0, layer_fraction=1.0))
    driver = get_step_driver(model)
    t, y = torch.tensor([500] * 4), torch.tensor([1, 2, 3, 4])
    try:
        driver.begin(_info(0, 4, 4))
        model(torch.randn(4, 1, 8, 8), t, y)
        driver.begin(_info(1, 4, 2))
        with pytest.raises(RuntimeError, match="cached a batch of 4 per branch but this step runs 2"):
            model(torch.randn(2, 1, 8, 8), t[:2], y[:2])
        assert ctl.summary()["reuse_events"] == 0
    finally:
        remove_dqar(model)


def test_a_batch_that_does_not_split_into_branches_raises(model):
    apply_dqar(model, DQARConfig(warmup=0.0, layer_fraction=1.0))
    driver = get_step_driver(model)
    try:
        driver.begin(_info(0, 4, 3, ("cond", "uncond")))
        with pytest.raises(ValueError, match=r"a batch of 3 does not split into the step's branches"):
            model(torch.randn(3, 1, 8, 8), torch.tensor([500] * 3), torch.tensor([1, 2, 10]))
    finally:
        remove_dqar(model)


def test_a_second_thread_gets_a_clear_error(model):
    apply_dqar(model, DQARConfig(warmup=0.0, layer_fraction=1.0))
    driver = get_step_driver(model)
    errors = []
    try:
        driver.begin(_info(0, 4, 2))            # this thread's generation is running

        def other():
            try:
                sample(model, LABELS, SEEDS, steps=4, cfg_scale=2.0)
            except Exception as exc:            # noqa: BLE001 - the test inspects it
                errors.append(exc)

        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
    finally:
        remove_dqar(model)
    assert len(errors) == 1 and isinstance(errors[0], GenerationInProgress)
    assert "serves one generation at a time" in str(errors[0])


@pytest.mark.parametrize("labels, seeds, match", [
    ([10], [0], r"class label 10 is not allowed: labels are integers in \[0, 10\)"),
    ([11], [0], r"class label 11 is not allowed"),
    ([-1], [0], r"class label -1 is not allowed"),
    ([1.5], [0], r"class label 1.5 is not allowed"),
    ([], [], "class_labels is empty"),
    ([1], [2**64], r"seed 18446744073709551616 is not allowed: seeds are integers in \[0, 2\*\*63 - 1\]"),
    ([1], [-3], r"seed -3 is not allowed"),
    ([1, 2], [0], "got 2 class labels but 1 seeds"),
])
def test_sample_validates_labels_and_seeds_at_the_boundary(model, labels, seeds, match):
    with pytest.raises(ValueError, match=match):
        sample(model, labels, seeds, steps=2)


def test_layers_the_schedule_can_never_reuse_take_the_fast_path(model):
    # Static w=0.4, l=0.5 on 4 layers: only layers 0 and 1 can ever be reused, so layers 2 and 3 never ask
    # for a decision, yet every call still counts as computed.
    ctl = apply_dqar(model, DQARConfig(warmup=0.4, layer_fraction=0.5))
    asked = []
    decide = ctl.should_reuse
    ctl.should_reuse = lambda layer, branch, target="attn": (asked.append((ctl.step.step_index, layer)),
                                                             decide(layer, branch, target))[1]
    try:
        sample(model, LABELS, SEEDS, steps=STEPS, cfg_scale=2.0)
        s = ctl.summary()
    finally:
        remove_dqar(model)
    # Step 0's first forward measures the FLOP profile through every module; after it, only 0 and 1 ask.
    assert ctl.cached_layers == frozenset({0, 1})
    assert {layer for step, layer in asked if step > 0} == {0, 1}
    assert s["reuse_events"] + s["compute_events"] == STEPS * 4 * 2 and s["reuse_events"] > 0


def test_a_live_controllers_config_cannot_be_swapped():
    from dqar import DQARConfig
    from dqar.method.controller import DQARController

    ctl = DQARController(DQARConfig(schedule="static", csb_topk=4, cache_bits=8), num_layers=4)
    with pytest.raises(AttributeError, match="cannot change on a live controller"):
        ctl.config = DQARConfig(schedule="none")
    assert ctl.config.schedule == "static"
