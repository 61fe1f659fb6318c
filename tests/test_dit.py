"""The compact DiT: shapes of the small presets, construction of the large ones, weight files."""
import re

import pytest
import torch

from dqar.models import DIT_PRESETS, WeightsError, build_dit, load_dit, save_dit

PAPER = {"DiT-S/2": (12, 384, 6), "DiT-B/2": (12, 768, 12), "DiT-L/2": (24, 1024, 16), "DiT-XL/2": (28, 1152, 16)}


@pytest.mark.parametrize("name", ["DiT-Tiny", "DiT-Tiny-Sigma", "DiT-Digits", "DiT-Digits-W"])
def test_forward_shapes_small_presets(name):
    cfg = DIT_PRESETS[name]
    model = build_dit(name).randomize_(0).eval()
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size)
    out = model(x, torch.tensor([1, 500, 999]), torch.tensor([0, 1, cfg.num_classes]))
    out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
    assert out.shape == (3, out_channels, cfg.input_size, cfg.input_size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(PAPER))
def test_large_presets_build_on_meta_with_paper_shapes(name):
    model = build_dit(name, device="meta")
    depth, hidden, heads = PAPER[name]
    assert len(model.blocks) == depth and model.config.hidden_size == hidden and model.num_heads == heads
    assert model.config.input_size == 32 and model.config.in_channels == 4 and model.num_classes == 1000
    assert model.x_embedder.num_patches == 256


def test_xl_parameter_count_matches_paper():
    # DiT-XL/2 has 675M parameters (Peebles & Xie, Table 1).
    n = sum(p.numel() for p in build_dit("DiT-XL/2", device="meta").parameters())
    assert 674e6 < n < 676e6


def test_attention_and_mlp_outputs_are_separately_reachable():
    model = build_dit("DiT-Tiny").randomize_(0)
    block = model.blocks[0]
    x = torch.randn(2, 16, 32)
    assert block.attn(x).shape == (2, 16, 32) and block.mlp(x).shape == (2, 16, 32)


def test_unknown_preset_and_bad_shapes_raise():
    with pytest.raises(ValueError, match="unknown DiT preset 'DiT-Q/3'"):
        build_dit("DiT-Q/3")
    from dqar.models import DiTConfig

    with pytest.raises(ValueError, match="input_size=9 is not divisible by patch_size=2"):
        DiTConfig(input_size=9)


def test_weights_round_trip_and_errors(tmp_path):
    model = build_dit("DiT-Tiny").randomize_(3)
    path = save_dit(model, tmp_path / "w.safetensors")
    loaded = load_dit(path)
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(WeightsError, match="does not exist"):
        load_dit(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_dit(bad)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(WeightsError, match="trunc.safetensors"):
        load_dit(truncated)
    with pytest.raises(WeightsError, match=r"tensor 'x_embedder.proj.weight' has shape \(32, 1, 2, 2\) but the "
                                           r"model expects \(32, 4, 2, 2\)"):
        load_dit(path, preset="DiT-Tiny-Sigma")


@pytest.mark.parametrize("value, counts", [(float("nan"), "2 non-finite values of 96 (2 NaN, 0 inf)"),
                                           (float("-inf"), "2 non-finite values of 96 (0 NaN, 2 inf)")])
def test_weights_with_nan_or_inf_are_refused_naming_file_and_tensor(tmp_path, value, counts):
    model = build_dit("DiT-Tiny").randomize_(3)
    with torch.no_grad():
        model.blocks[1].attn.qkv.bias[:2] = value
    path = save_dit(model, tmp_path / "diverged.safetensors")
    pattern = rf"diverged\.safetensors.*'blocks\.1\.attn\.qkv\.bias' has {re.escape(counts)}"
    with pytest.raises(WeightsError, match=pattern):
        load_dit(path)
