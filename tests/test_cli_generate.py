"""`dqar generate`: outputs, JSON, DQAR summary, and every bad input as exit code 2 with a clear message."""
import json
from pathlib import Path

import pytest
import torch

from dqar.cli import main
from dqar.models import build_dit, save_dit

FAST = ["--model", "DiT-Tiny", "--steps", "3", "--threads", "1"]


def run_cli(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_writes_pngs_grid_and_json(capsys, tmp_path):
    code, out, err = run_cli(capsys, *FAST, "--classes", "1,2", "--n", "2", "--out", str(tmp_path), "--json",
                             "--warmup", "0.0", "--layers", "1.0")
    assert code == 0 and "random weights" in err
    data = json.loads(out)
    for key in ("images", "grid", "seconds", "ms_per_step", "steps", "dqar"):
        assert key in data
    assert len(data["images"]) == 4 and data["classes"] == [1, 1, 2, 2] and data["seeds"] == [0, 1, 2, 3]
    assert all((tmp_path / p.split("/")[-1]).exists() for p in data["images"]) and (tmp_path / "grid.png").exists()
    assert data["dqar"]["reuse_events"] > 0 and data["dqar"]["cache_mb"] == data["dqar"]["cache_bytes"] / 2**20


def test_schedule_none_runs_unhooked(capsys, tmp_path):
    code, out, _ = run_cli(capsys, *FAST, "--classes", "3", "--out", str(tmp_path), "--json", "--schedule", "none")
    assert code == 0 and json.loads(out)["dqar"] is None


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    good = save_dit(build_dit("DiT-Tiny").randomize_(1), d / "tiny.safetensors")
    other = save_dit(build_dit("DiT-Tiny-Sigma").randomize_(1), d / "sigma.safetensors")
    # A file whose metadata claims DiT-Tiny but whose tensors are another preset's.
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    mismatched = d / "mismatch.safetensors"
    save_file(load_file(str(other)), str(mismatched), metadata=meta)
    (d / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (d / "weights.pt").write_bytes(b"PK\x03\x04 not a safetensors file")
    truncated = d / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    return d


BAD = [
    (["--model", "DiT-Huge/2"], "--model='DiT-Huge/2' is neither 'embedded', a preset"),
    (["--sampler", "euler"], "sampler='euler' is not known; allowed: ddim, dpm"),
    (["--steps", "0"], "steps=0 is not allowed: must be an integer in [1, 1000]"),
    (["--steps", "1001"], "steps=1001 is not allowed: must be an integer in [1, 1000]"),
    (["--cfg-scale", "-1"], "cfg_scale=-1.0 is not allowed: must be a finite number >= 0"),
    (["--cfg-scale", "inf"], "cfg_scale=inf is not allowed: must be a finite number >= 0"),
    (["--policy", "p.safetensors"], "--policy='p.safetensors' is only read by --schedule policy"),
    (["--trace", "maybe"], "--trace='maybe' could not be parsed"),
    (["--classes", "10"], "class label 10 is outside [0, 10)"),
    (["--classes", "-1"], "class label -1 is outside [0, 10)"),
    (["--classes", "a,b"], "--classes='a,b' must be a comma-separated list of integers"),
    (["--n", "0"], "--n=0 is not allowed: must be >= 1"),
    (["--warmup", "1.5"], "DQARConfig.warmup=1.5 is not allowed"),
    (["--schedule", "later"], "DQARConfig.schedule='later' is not allowed"),
    (["--targets", "attn,ffn"], "DQARConfig.targets=('attn', 'ffn') is not allowed"),
    (["--layers", "abc"], "--layers='abc' could not be parsed"),
    (["--device", "cuda:7"], "--device='cuda:7'"),
]


@pytest.mark.parametrize("argv, message", BAD)
def test_bad_input_exits_2_with_message(capsys, tmp_path, argv, message):
    args = ["--model", "DiT-Tiny", "--steps", "2", "--out", str(tmp_path / "o")] + argv
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing half-written


@pytest.mark.parametrize("name, message", [
    ("missing.safetensors", "does not exist"),
    ("garbage.safetensors", "is not a readable safetensors file"),
    ("weights.pt", "is not a readable safetensors file"),
    ("truncated.safetensors", "is not a readable safetensors file"),
    ("mismatch.safetensors", "tensor 'x_embedder.proj.weight' has shape (32, 4, 2, 2) but the model expects "
                             "(32, 1, 2, 2)"),
])
def test_bad_weight_files_exit_2_naming_the_problem(capsys, tmp_path, weight_files, name, message):
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "--model", str(weight_files / name), "--steps", "2", "--out", str(out))
    assert code == 2 and message in err and name in err and "Traceback" not in err
    assert not out.exists()


def test_a_hub_id_points_to_dqar_sample(capsys, tmp_path):
    code, _, err = run_cli(capsys, "--model", "facebook/DiT-XL-2-256", "--out", str(tmp_path / "o"))
    assert code == 2 and "dqar sample --model" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_missing_or_corrupt_model_card_is_an_error_naming_it(capsys, tmp_path, monkeypatch, damage):
    import dqar.digits.embedded as embedded

    card = tmp_path / "dit_digits.json"
    if damage == "corrupt":
        card.write_text("{not json")
    real = embedded.asset_path
    monkeypatch.setattr(embedded, "asset_path", lambda name: card if name == "dit_digits.json" else real(name))
    code, _, err = run_cli(capsys, "--steps", "2", "--out", str(tmp_path / "o"))
    assert code == 2 and str(card) in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_trace_writes_named_feature_rows(capsys, tmp_path):
    out = tmp_path / "o"
    code, stdout, _ = run_cli(capsys, "--model", "DiT-Tiny", "--steps", "3", "--classes", "1", "--out", str(out),
                              "--json", "--trace", "true", "--schedule", "none")
    result = json.loads(stdout)
    rows = [json.loads(line) for line in Path(result["traces"]).read_text().splitlines()]
    # Steps 1 and 2 have a cached output to compare with: 2 steps x 4 layers x 2 branches.
    assert len(rows) == 2 * 4 * 2
    assert set(rows[0]["features"]) == {"entropy", "log_snr", "log_norm", "step_progress", "prompt_length"}
    assert all(r["rel_change"] > 0 for r in rows)


def test_weights_file_generates(capsys, tmp_path, weight_files):
    code, out, _ = run_cli(capsys, "--model", str(weight_files / "tiny.safetensors"), "--steps", "2",
                           "--classes", "0", "--out", str(tmp_path), "--json", "--schedule", "none")
    assert code == 0 and len(json.loads(out)["images"]) == 1
    assert torch.get_num_threads() >= 1
