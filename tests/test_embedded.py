"""The shipped digits DiT and evaluator: found through the installed package, usable, and guarded."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

import dqar
from dqar.digits import embedded
from dqar.digits.data import load_split
from dqar.digits.embedded import (ASSET_FILES, DIT_CARD, DIT_FILE, EVALUATOR_CARD, EVALUATOR_FILE, EmbeddedAssetError,
                           asset_path, load_embedded_model, load_evaluator, model_card)
from dqar.models.dit import DIT_PRESETS
from dqar.models.io import WeightsError
from dqar.sampling import sample


@pytest.fixture(scope="module")
def model():
    return load_embedded_model()


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


def test_assets_resolve_inside_the_installed_package():
    package_dir = Path(dqar.__file__).resolve().parent
    for name in ASSET_FILES:
        ref = resources.files("dqar.digits").joinpath("assets", name)
        assert ref.is_file(), f"{name} is not reachable through importlib.resources"
        path = asset_path(name).resolve()
        assert path.is_relative_to(package_dir), f"{path} is outside the imported package {package_dir}"


def test_assets_load_from_a_built_and_installed_wheel(tmp_path):
    """Build the wheel, install it into a folder of its own, and load every asset from there: package
    data, not the source tree (an editable install would hide a missing package-data entry)."""
    import subprocess
    import sys

    import shutil

    root = Path(__file__).resolve().parents[1]
    # Built from a copy, so the build's own folders (build/, *.egg-info) never land in the work tree.
    src = tmp_path / "src-copy"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(src)], check=True)
    wheel = next(wheels.glob("dqar-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    probe = (
        "import dqar, pathlib, sys; from dqar.digits.embedded import load_embedded_model, load_evaluator, model_card;"
        "from dqar.method.policy import load_policy;"
        "assert pathlib.Path(dqar.__file__).resolve().is_relative_to(pathlib.Path(sys.argv[1]).resolve()), dqar.__file__;"
        "m = load_embedded_model(); load_evaluator(); load_policy(); print(model_card()['preset'])"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe, str(target)], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "DiT-Digits"


def test_shipped_model_shape_mode_and_card(model):
    assert model.config == DIT_PRESETS["DiT-Digits"]
    assert not model.training
    card = model_card()
    assert card["preset"] == "DiT-Digits"
    assert card["weights_sha256"] == embedded.tensor_digest(model.state_dict())
    assert card["training"]["command"].startswith("dqar train-model")
    assert asset_path(DIT_FILE).stat().st_size <= 25 * 1024 * 1024


def test_seeded_samples_show_the_requested_class_at_the_harness_scale(model, evaluator):
    # The card's recommended scale is what generate, bench and sweep use by default; it must be DiT's 1.5,
    # and the model must draw the requested class there (1,000 samples at 50 steps: 96%+, docs/EMBEDDED_MODEL.md).
    assert model_card()["recommended_cfg_scale"] == 1.5
    labels = [k % 10 for k in range(40)]
    images = sample(model, labels, seeds=list(range(40)), steps=50, sampler="ddim", cfg_scale=1.5)
    assert images.shape == (40, 1, 16, 16)
    acc = (evaluator.predict(images) == torch.tensor(labels)).double().mean().item()
    assert acc >= 0.9, f"only {acc:.2f} of 40 samples were classified as their requested class"


def test_sampling_is_seeded(model):
    a = sample(model, [3, 7], seeds=[5, 6], steps=3, cfg_scale=1.5)
    b = sample(model, [7], seeds=[6], steps=3, cfg_scale=1.5)
    torch.testing.assert_close(a[1:], b, rtol=0, atol=1e-5)


def test_evaluator_held_out_accuracy(evaluator):
    test = load_split("test")
    acc = (evaluator.predict(test.images) == test.labels).double().mean().item()
    assert acc >= 0.95
    assert evaluator.features(test.images[:4]).shape == (4, 128)
    assert evaluator.logits(test.images[:4]).shape == (4, 10)


def test_split_is_fixed_disjoint_and_stratified():
    train, test = load_split("train"), load_split("test")
    assert (len(train), len(test)) == (1437, 360)
    assert train.images.shape[1:] == (1, 16, 16)
    assert float(train.images.min()) >= -1.0 and float(train.images.max()) <= 1.0
    assert torch.bincount(test.labels, minlength=10).min() >= 35
    # Disjoint: no test image appears in train (load_digits holds a few exact duplicates, so compare rows).
    rows = {tuple(r.tolist()) for r in load_split("all").images.flatten(1)}
    assert len(train) + len(test) == 1797 and len(rows) <= 1797
    torch.testing.assert_close(load_split("test").images, test.images, rtol=0, atol=0)


def _copy(tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copyfile(asset_path(name), dest)
    return dest


@pytest.mark.parametrize("name, loader", [(DIT_FILE, load_embedded_model), (EVALUATOR_FILE, load_evaluator)])
def test_missing_truncated_or_garbled_weights_name_the_file(tmp_path, name, loader):
    missing = tmp_path / "gone" / name
    with pytest.raises(EmbeddedAssetError, match=str(missing)):
        loader(missing)

    truncated = _copy(tmp_path, name)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(EmbeddedAssetError, match=str(truncated)):
        loader(truncated)

    # Damage tensor bytes but not the header: safetensors still parses it, the checksum must catch it.
    garbled = _copy(tmp_path, name)
    data = bytearray(garbled.read_bytes())
    for k in range(len(data) - 4096, len(data) - 4000):
        data[k] ^= 0xFF
    garbled.write_bytes(bytes(data))
    with pytest.raises(EmbeddedAssetError, match="corrupted") as info:
        loader(garbled)
    assert str(garbled) in str(info.value)
    assert issubclass(EmbeddedAssetError, WeightsError)


def test_broken_model_card_names_the_file(tmp_path):
    card = _copy(tmp_path, DIT_CARD)
    card.write_text(card.read_text()[:-20])
    with pytest.raises(EmbeddedAssetError, match=str(card)):
        model_card(card)
    assert json.loads(asset_path(EVALUATOR_CARD).read_text())["held_out_accuracy"] >= 0.95


def test_library_does_not_import_the_harness():
    code = ("import sys, dqar.digits.embedded; dqar.digits.embedded.load_embedded_model(); dqar.digits.embedded.load_evaluator(); "
            "print([m for m in sys.modules if m.split('.')[:2] in (['dqar', 'cli'], ['dqar', 'eval'])])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_wider_digits_candidate_loads_and_other_shapes_are_refused(tmp_path):
    """A `dqar train-model --preset DiT-Digits-W` file (issue 14's capacity test) loads like the shipped shape;
    a weights file of any other shape is refused, naming the file and the allowed presets."""
    from dqar.digits.embedded import save_embedded_dit
    from dqar.models import build_dit

    wide = build_dit("DiT-Digits-W").randomize_(0).eval()
    path = save_embedded_dit(wide, tmp_path / "wide.safetensors")
    loaded = load_embedded_model(path)
    assert loaded.config == DIT_PRESETS["DiT-Digits-W"] and loaded.config.hidden_size == 160
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), wide.state_dict().values()))
    tiny = save_embedded_dit(build_dit("DiT-Tiny").randomize_(0), tmp_path / "tiny.safetensors")
    with pytest.raises(EmbeddedAssetError, match=r"tiny\.safetensors.*not one of the digits presets DiT-Digits, DiT-Digits-W"):
        load_embedded_model(tiny)
