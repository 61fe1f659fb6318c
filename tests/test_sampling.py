"""Sampler: determinism, per-sample seeds, guidance, both schedulers, bad input."""
import pytest
import torch

from dqar.models import build_dit
from dqar.sampling import guide, initial_noise, sample


@pytest.fixture(scope="module")
def model():
    return build_dit("DiT-Tiny").randomize_(0).eval()


def test_same_seeds_give_identical_images(model):
    a = sample(model, [1, 2], [5, 6], steps=6)
    b = sample(model, [1, 2], [5, 6], steps=6)
    assert torch.equal(a, b)


def test_image_k_does_not_depend_on_batch_size(model):
    batch = sample(model, [0, 1, 2, 3], [10, 11, 12, 13], steps=6)
    for k in range(4):
        alone = sample(model, [k], [10 + k], steps=6)
        # Batched matmuls may round differently by a few ulps; the sample itself is the same.
        torch.testing.assert_close(batch[k], alone[0], rtol=1e-5, atol=1e-4)
    assert torch.equal(initial_noise([11], (1, 8, 8))[0], initial_noise([10, 11], (1, 8, 8))[1])


def test_cfg_scale_one_equals_conditional_prediction():
    cond, uncond = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    assert torch.equal(guide(cond, uncond, 1.0, channels=4), cond)
    guided = guide(cond, uncond, 2.0, channels=4)
    assert torch.allclose(guided[:, :4], uncond[:, :4] + 2.0 * (cond[:, :4] - uncond[:, :4]))
    assert torch.equal(guided[:, 4:], cond[:, 4:])  # learned sigma stays conditional


def test_cfg_scale_one_sampling_runs_the_conditional_model_only(model):
    calls = []
    out = sample(model, [3], [1], steps=3, cfg_scale=1.0,
                 denoiser=lambda x, t, y: (calls.append(y.tolist()), model(x, t, y))[1])
    assert calls == [[3]] * 3 and out.shape == (1, 1, 8, 8)
    calls.clear()
    sample(model, [3], [1], steps=3, cfg_scale=2.0,
           denoiser=lambda x, t, y: (calls.append(y.tolist()), model(x, t, y))[1])
    assert calls == [[3, 10]] * 3  # [cond | uncond] with the null class 10


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_both_samplers_run_and_differ_from_noise(model, sampler):
    out = sample(model, [1], [0], steps=5, sampler=sampler)
    assert out.shape == (1, 1, 8, 8) and torch.isfinite(out).all()
    assert not torch.equal(out, initial_noise([0], (1, 8, 8)))


def test_observer_sees_every_step_with_x0(model):
    seen = []

    class Obs:
        def on_step_begin(self, info):
            seen.append(("begin", info.step_index, info.total_steps, info.branches))

        def on_step_end(self, info):
            assert info.x0 is not None and info.x0.shape == info.x.shape
            assert 0 < info.alpha <= 1 and 0 <= info.sigma < 1
            seen.append(("end", info.step_index))

    sample(model, [1], [0], steps=4, observers=[Obs()])
    assert seen[0] == ("begin", 0, 4, ("cond", "uncond")) and seen[-1] == ("end", 3) and len(seen) == 8


@pytest.mark.parametrize("kwargs, message", [
    ({"sampler": "euler"}, "sampler='euler' is not known; allowed: ddim, dpm"),
    ({"steps": 0}, "steps=0 is not allowed"),
    ({"cfg_scale": -0.5}, "cfg_scale=-0.5 is not allowed"),
])
def test_bad_sampling_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        sample(model, [1], [0], **{"steps": 2, **kwargs})
