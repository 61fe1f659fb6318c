"""Fine-tuning from a weights file: `train_dit(init_from=...)` and `dqar train-model --init-from`."""
import pytest
import torch

from dqar.cli import main
from dqar.digits.data import load_split
from dqar.digits.training import DiTTrainConfig, train_dit
from dqar.models import build_dit, save_dit


def _small(split, n=8):
    return type(split)(images=split.images[:n], labels=split.labels[:n])


def test_training_starts_from_the_given_weights(tmp_path):
    start = build_dit("DiT-Digits").randomize_(3, std=0.05)
    path = save_dit(start, tmp_path / "start.safetensors")
    data = _small(load_split("train"))
    common = dict(steps=1, batch_size=4, lr=1e-12, warmup_steps=1, log_every=1)
    tuned = train_dit(data, DiTTrainConfig(init_from=str(path), **common), progress=False)
    fresh = train_dit(data, DiTTrainConfig(**common), progress=False)
    for name, p in start.state_dict().items():
        # lr 1e-12: one step leaves the weights where they started (the EMA starts there too)
        torch.testing.assert_close(tuned.model.state_dict()[name], p, rtol=0, atol=1e-9)
        torch.testing.assert_close(tuned.ema.state_dict()[name], p, rtol=0, atol=1e-9)
    assert not torch.equal(fresh.model.state_dict()["blocks.0.attn.qkv.weight"],
                           start.state_dict()["blocks.0.attn.qkv.weight"])


def test_a_missing_or_mismatched_init_file_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train-model", "--only", "dit", "--out", str(out), "--steps", "1",
                 "--init-from", str(tmp_path / "nope.safetensors")])
    assert code == 2 and "--init-from=" in capsys.readouterr().err and not out.exists()
    tiny = save_dit(build_dit("DiT-Tiny").randomize_(0), tmp_path / "tiny.safetensors")
    code = main(["train-model", "--only", "dit", "--out", str(out), "--steps", "1", "--init-from", str(tiny)])
    err = capsys.readouterr().err
    assert code == 2 and "--init-from:" in err and "tiny.safetensors" in err and not out.exists()


class _Recorder(torch.nn.Module):
    """Stands in for the DiT in diffusion_loss: keeps the noised input and returns zeros."""

    def forward(self, x, t, y, generator=None):
        self.x, self.t = x, t
        return torch.zeros_like(x)


def test_augmentation_from_a_timestep_keeps_the_clean_images_below_it():
    from dqar.digits.training import diffusion_loss, training_alphas_cumprod

    acp = training_alphas_cumprod()
    clean, augmented = torch.zeros(64, 1, 4, 4), torch.ones(64, 1, 4, 4)
    y = torch.zeros(64, dtype=torch.long)
    runs = {}
    for below in (0, 300):
        rec = _Recorder()
        diffusion_loss(rec, augmented, y, acp, torch.Generator().manual_seed(0), clean=clean, clean_below=below)
        runs[below] = rec
    assert torch.equal(runs[0].t, runs[300].t)                    # the same draws either way
    t = runs[0].t
    assert (t < 300).any() and (t >= 300).any()
    a = acp[t].sqrt().view(-1, 1, 1, 1)
    # x_t = a x0 + s eps: the difference between the runs is a * (augmented - clean) exactly where t < 300.
    diff = runs[0].x - runs[300].x
    torch.testing.assert_close(diff, torch.where((t < 300).view(-1, 1, 1, 1), a.expand_as(diff), torch.zeros_like(diff)))


@pytest.mark.parametrize("value", [-1, 1000, 2.5, True])
def test_a_bad_augment_from_t_is_refused(value, tmp_path, capsys):
    with pytest.raises(ValueError, match="augment_from_t="):
        DiTTrainConfig(augment_from_t=value)
    if isinstance(value, int) and not isinstance(value, bool):
        out = tmp_path / "run"
        code = main(["train-model", "--only", "dit", "--out", str(out), "--steps", "1", "--augment-from-t", str(value)])
        assert code == 2 and "--augment-from-t=" in capsys.readouterr().err and not out.exists()


def test_min_snr_weighting_scales_each_example_by_min_snr_gamma_over_snr():
    from dqar.digits.training import diffusion_loss, training_alphas_cumprod

    acp = training_alphas_cumprod()
    x0 = torch.linspace(-1, 1, 64 * 16).view(64, 1, 4, 4)
    y = torch.zeros(64, dtype=torch.long)
    losses = {}
    for gamma in (0.0, 5.0):
        rec = _Recorder()                                       # predicts zeros: the error is the noise itself
        losses[gamma] = diffusion_loss(rec, x0, y, acp, torch.Generator().manual_seed(0), min_snr_gamma=gamma)
    t = rec.t
    g = torch.Generator().manual_seed(0)
    torch.randint(0, acp.shape[0], (64,), generator=g)
    noise = torch.randn(x0.shape, generator=g)                  # the same draws diffusion_loss made
    snr = acp[t] / (1 - acp[t])
    per_example = noise.pow(2).mean(dim=(1, 2, 3))
    assert (snr > 5).any() and (snr < 5).any()                  # both sides of the cap are exercised
    torch.testing.assert_close(losses[0.0], per_example.mean())
    torch.testing.assert_close(losses[5.0], (per_example * torch.minimum(snr, torch.tensor(5.0)) / snr).mean())
    assert losses[5.0] < losses[0.0]


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_a_bad_min_snr_gamma_is_refused(value, tmp_path, capsys):
    with pytest.raises(ValueError, match="min_snr_gamma="):
        DiTTrainConfig(min_snr_gamma=value)
    out = tmp_path / "run"
    code = main(["train-model", "--only", "dit", "--out", str(out), "--steps", "1", "--min-snr-gamma", str(value)])
    assert code == 2 and "--min-snr-gamma=" in capsys.readouterr().err and not out.exists()


def test_extra_emas_track_the_same_run_without_changing_it():
    data = _small(load_split("train"))
    common = dict(steps=3, batch_size=4, warmup_steps=1, log_every=1, ema_decay=0.9)
    plain = train_dit(data, DiTTrainConfig(**common), progress=False)
    both = train_dit(data, DiTTrainConfig(extra_ema_decays=(0.0, 0.15), **common), progress=False)
    assert sorted(both.extra_emas) == [0.0, 0.15]
    for name, p in plain.ema.state_dict().items():
        assert torch.equal(both.ema.state_dict()[name], p)        # the shipped EMA is the run without extras
        assert torch.equal(both.extra_emas[0.0].state_dict()[name], both.model.state_dict()[name])   # decay 0: raw
    # the warm-up ramp (1+n)/(10+n) is 0.1, 0.18, 0.25: decay 0.15 caps steps 2 and 3, 0.9 caps none
    name = "blocks.0.attn.qkv.weight"
    half, ema = both.extra_emas[0.15].state_dict()[name], both.ema.state_dict()[name]
    assert not torch.equal(half, ema) and not torch.equal(half, both.model.state_dict()[name])


def test_extra_emas_are_written_as_complete_model_folders(tmp_path, capsys):
    import json

    from dqar.digits.embedded import load_embedded_model

    out = tmp_path / "run"
    code = main(["train-model", "--only", "dit", "--out", str(out), "--steps", "2", "--batch-size", "4",
                 "--extra-ema", "0,0.9", "--no-progress", "--threads", "1"])
    assert code == 0
    never = " (never reached in 2 steps: the (1+n)/(10+n) warm-up ramp decides the average)"
    for sub, label in (("ema-0", "the raw trained weights (no EMA)"),
                       ("ema-0.9", "EMA of the trained weights, decay 0.9" + never)):
        card = json.loads((out / sub / "dit_digits.json").read_text())
        assert card["weights"] == label and "--extra-ema 0,0.9" in card["training"]["command"]
        load_embedded_model(out / sub / "dit_digits_ema.safetensors")      # digest checks out
    # 0.999 and 0.9 never bind in 2 steps (the ramp is 0.1, 0.18): said once, before training
    assert "note: EMA decay 0.999, 0.9 never binds in 2 steps" in capsys.readouterr().err


def test_a_decay_binds_only_once_the_warmup_ramp_passes_it():
    from dqar.digits.training import decay_binds, ema_warmup

    assert ema_warmup(0) == pytest.approx(0.1) and ema_warmup(3999) == pytest.approx(4000 / 4009)
    # The shipped recipe's 0.9995 over 4,000 steps is the ramp throughout; 0.995 binds from step 1,791 on.
    assert not decay_binds(0.9995, 4000) and not decay_binds(0.998, 4000) and decay_binds(0.995, 4000)
    assert decay_binds(0.9995, 20000)


@pytest.mark.parametrize("spec, words", [("0.5,abc", "'abc' is not a number"), ("1.5", "must be a number in [0, 1)"),
                                         ("0.999", "must differ"), ("0.5,0.5", "must differ")])
def test_a_bad_extra_ema_is_refused_before_anything_is_written(spec, words, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train-model", "--only", "dit", "--out", str(out), "--steps", "1", "--extra-ema", spec])
    err = capsys.readouterr().err
    assert code == 2 and "--extra-ema" in err and words in err and not out.exists()
