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


# ----------------------------------------------------------------------------- issue 15: hardening

BAD_HARDENING = [
    # seeds outside torch's range: a one-line error naming the value, before any sampling
    (["--seed", str(2**64)], f"--seed={2**64} is not allowed"),
    (["--seed", "-1"], "--seed=-1 is not allowed: seeds are integers in [0, 2**63 - 1]"),
    # the last image's seed (seed + 1) is out of range
    (["--seed", str(2**63 - 1), "--classes", "1,2"], "the run uses seeds 9223372036854775807..9223372036854775808"),
    (["--order-seed", str(2**64), "--order", "random"], f"--order-seed='{2**64}' could not be parsed: expected an "
                                                         "integer seed"),
    # a parse error names the accepted values, not an internal parser
    (["--cfg-sharing", "maybe"], "--cfg-sharing='maybe' could not be parsed: expected true or false"),
    (["--record-entropy", "2"], "--record-entropy='2' could not be parsed: expected true or false"),
    (["--interval", "2.5", "--schedule", "interval"], "--interval='2.5' could not be parsed: expected an integer"),
    (["--kv-bits", "8.5,8", "--mode", "kv"], "--kv-bits='8.5,8' could not be parsed: expected two comma-separated"),
    (["--depth-phases", "0.3,1.0", "--schedule", "depth"], "--depth-phases='0.3,1.0' could not be parsed: expected "
                                                            "phases as p_end:fraction"),
    (["--batch-size", "0"], "--batch-size=0 is not allowed: must be >= 1"),
    # options that do not apply to the chosen schedule are refused, naming the option and what reads it
    (["--gate-with", "static"], "--gate-with='static' does not apply to --schedule static: it is read only by "
                                "--schedule gate"),
    (["--schedule", "depth", "--gate-with", "depth"], "--gate-with='depth' does not apply to --schedule depth"),
    (["--interval", "3"], "--interval='3' does not apply to --schedule static: it is read only by --schedule "
                          "interval"),
    (["--tau0", "20"], "--tau0='20' does not apply to --schedule static: it is read only by --schedule gate"),
    (["--snr-range", "1,10", "--schedule", "depth"], "--snr-range='1,10' does not apply to --schedule depth"),
    (["--policy-threshold", "0.3"], "--policy-threshold='0.3' does not apply to --schedule static: it is read only "
                                    "by --schedule policy"),
    (["--policy-budget", "0.5", "--schedule", "gate"], "--policy-budget='0.5' does not apply to --schedule gate"),
    (["--layers", "0.5", "--schedule", "gate"], "--layers='0.5' does not apply to --schedule gate: it is read only "
                                                "by --schedule static (or --schedule gate --gate-with static)"),
    (["--depth-phases", "0.5:0.5,1.0:1.0"], "--depth-phases='0.5:0.5,1.0:1.0' does not apply to --schedule static"),
    (["--schedule", "none", "--warmup", "0.2"], "--warmup='0.2' does not apply to --schedule none"),
    (["--schedule", "none", "--cache-bits", "8"], "--cache-bits='8' does not apply to --schedule none"),
    (["--order-seed", "3"], "--order-seed='3' does not apply to --order shallow: it is read only with --order random"),
    (["--kv-bits", "16,8"], "--kv-bits='16,8' does not apply to --mode output: it is read only with --mode kv"),
    (["--csb-topk", "4"], "--csb-topk='4' does not apply to an unquantized cache"),
    (["--quant-granularity", "token"], "--quant-granularity='token' does not apply to an unquantized cache"),
    (["--cfg-sharing-eps", "0.1"], "--cfg-sharing-eps='0.1' does not apply without --cfg-sharing true"),
    (["--entropy-rows", "4"], "--entropy-rows='4' does not apply to --schedule static: entropy is measured only"),
]


@pytest.mark.parametrize("argv, message", BAD_HARDENING)
def test_bad_or_inapplicable_options_exit_2_naming_the_value(capsys, tmp_path, argv, message):
    args = ["--model", "DiT-Tiny", "--steps", "2", "--out", str(tmp_path / "o")] + argv
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if not line.startswith("warning:")]   # one line
    assert message in line and "_bool" not in line and "_int_pair" not in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [
    ["--schedule", "gate", "--gate-with", "static", "--layers", "1.0", "--tau0", "40"],    # the base's fields
    ["--schedule", "gate", "--gate-with", "depth", "--depth-phases", "0.5:0.5,1.0:1.0"],
    ["--record-entropy", "true", "--entropy-rows", "4", "--entropy-seed", "2"],            # entropy is measured
    ["--cfg-sharing", "true", "--cfg-sharing-eps", "0.1"],
    ["--order", "random", "--order-seed", str(2**63 - 1)],                                 # the largest seed
    ["--cache-bits", "8", "--quant-granularity", "token", "--csb-topk", "1"],
    ["--mode", "kv", "--kv-bits", "16,8"],
    ["--schedule", "none", "--trace", "true"],
])
def test_options_that_apply_are_accepted(capsys, tmp_path, argv):
    code, out, err = run_cli(capsys, *FAST, "--classes", "1", "--out", str(tmp_path), "--json", *argv)
    assert code == 0, err
    assert json.loads(out)["images"]


def test_a_1000_class_model_defaults_to_dits_sample_classes_in_bounded_batches(capsys, tmp_path):
    # DiT-Tiny-Sigma has ImageNet's 1000 classes: the old default sampled all of them in one batch.
    code, out, err = run_cli(capsys, "--model", "DiT-Tiny-Sigma", "--steps", "1", "--threads", "1",
                             "--out", str(tmp_path), "--json", "--schedule", "none")
    assert code == 0, err
    data = json.loads(out)
    assert data["classes"] == [207, 360, 387, 974, 88, 979, 417, 279]
    assert data["batch_size"] == 16 and data["batches"] == 1 and len(data["images"]) == 8


def test_a_model_with_many_classes_needs_classes_and_the_refusal_counts_the_images(capsys, tmp_path):
    from dqar.models.dit import DiT, DiTConfig

    path = save_dit(DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                                  num_classes=100, learn_sigma=False)).randomize_(0),
                    tmp_path / "hundred.safetensors")
    code, _, err = run_cli(capsys, "--model", str(path), "--n", "3", "--steps", "1", "--out", str(tmp_path / "o"))
    assert code == 2 and "has 100 classes" in err and "300 images" in err and "--classes" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    code, out, err = run_cli(capsys, "--model", str(path), "--classes", "5,99", "--steps", "1", "--out",
                             str(tmp_path / "o"), "--json", "--schedule", "none")
    assert code == 0 and json.loads(out)["classes"] == [5, 99]


def test_batches_match_direct_sampling_and_merge_the_reuse_summary(capsys, tmp_path):
    from dqar.sampling import sample, to_uint8

    dq = ["--warmup", "0.0", "--layers", "1.0"]
    code, out, err = run_cli(capsys, *FAST, "--classes", "1,2", "--n", "2", "--batch-size", "3", "--seed", "5",
                             "--out", str(tmp_path / "b3"), "--json", *dq)
    assert code == 0, err
    batched = json.loads(out)
    assert batched["batches"] == 2 and batched["seeds"] == [5, 6, 7, 8] and batched["classes"] == [1, 1, 2, 2]
    code, out, _ = run_cli(capsys, *FAST, "--classes", "1", "--n", "3", "--seed", "5", "--out",
                           str(tmp_path / "one"), "--json", *dq)
    single = json.loads(out)["dqar"]
    # Reuse events are counted per module call, so two batches make twice one batch's events.
    assert single["reuse_events"] > 0
    assert batched["dqar"]["reuse_events"] == 2 * single["reuse_events"]
    assert batched["dqar"]["images"] == 4
    import numpy as np
    from PIL import Image

    from dqar.method.config import DQARConfig
    from dqar.method.hooks import apply_dqar, remove_dqar

    model = build_dit("DiT-Tiny").randomize_(0).eval()
    apply_dqar(model, DQARConfig(warmup=0.0, layer_fraction=1.0))
    try:
        expected = torch.cat([to_uint8(sample(model, [1, 1, 2], [5, 6, 7], steps=3, cfg_scale=batched["cfg_scale"])),
                              to_uint8(sample(model, [2], [8], steps=3, cfg_scale=batched["cfg_scale"]))]).numpy()
    finally:
        remove_dqar(model)
    got = np.stack([np.asarray(Image.open(p))[..., None] for p in batched["images"]])
    np.testing.assert_array_equal(got, expected)


def test_batches_show_a_progress_bar_with_an_eta(capsys, tmp_path):
    code, _, err = run_cli(capsys, *FAST, "--classes", "1,2,3", "--batch-size", "1", "--out", str(tmp_path),
                           "--schedule", "none")
    assert code == 0
    assert "generate" in err and "3/3" in err and "batch" in err and "<" in err   # tqdm's elapsed<remaining
    code, _, err = run_cli(capsys, *FAST, "--classes", "1,2,3", "--batch-size", "1", "--out", str(tmp_path),
                           "--schedule", "none", "--no-progress")
    assert code == 0 and "3/3" not in err


def test_embedded_default_is_one_grid_of_the_ten_digits_at_the_cards_scale(capsys, tmp_path):
    from dqar.digits.embedded import model_card

    code, out, err = run_cli(capsys, "--steps", "2", "--threads", "1", "--out", str(tmp_path), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["classes"] == list(range(10)) and data["batches"] == 1 and len(data["images"]) == 10
    assert data["cfg_scale"] == model_card()["recommended_cfg_scale"]


@pytest.mark.parametrize("kind", ["file", "file-parent"])
def test_an_output_path_that_cannot_be_a_folder_is_refused_before_any_work(capsys, tmp_path, kind):
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"keep me")
    out = existing if kind == "file" else existing / "sub"
    code, _, err = run_cli(capsys, *FAST, "--out", str(out))
    assert code == 2 and str(existing) in err and "Traceback" not in err
    assert "random weights" not in err          # refused before the model was even built
    assert existing.read_bytes() == b"keep me"


def test_every_option_of_generate_sample_and_train_policy_shows_its_default():
    import argparse

    from dqar.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("generate", "sample", "train-policy"):
        for action in subs[command]._actions:
            if action.nargs == 0:          # --help and on/off flags
                continue
            assert action.help and "default" in action.help, f"dqar {command} {action.option_strings}"


def test_cfg_scale_help_shows_the_cards_value():
    import argparse

    from dqar.cli import build_parser
    from dqar.digits.embedded import model_card

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    card = model_card()["recommended_cfg_scale"]
    for command in ("generate", "sample", "train-policy"):
        (action,) = [a for a in subs[command]._actions if "--cfg-scale" in a.option_strings]
        assert f"{float(card)} for the embedded model" in action.help and "1.5" in action.help


@pytest.fixture(scope="module")
def nonfinite_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("nonfinite")
    model = build_dit("DiT-Tiny").randomize_(1)
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight[0, :3] = float("nan")
    save_dit(model, d / "nan.safetensors")
    model = build_dit("DiT-Tiny").randomize_(1)
    with torch.no_grad():
        model.final_layer.linear.weight.fill_(float("inf"))
    save_dit(model, d / "inf.safetensors")
    # Finite weights so large that the forward pass overflows: the model itself yields NaN.
    model = build_dit("DiT-Tiny").randomize_(1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1e30)
    save_dit(model, d / "huge.safetensors")
    return d


@pytest.mark.parametrize("name, message", [
    ("nan.safetensors", "tensor 'blocks.0.attn.qkv.weight' has 3 non-finite values"),
    ("inf.safetensors", "tensor 'final_layer.linear.weight' has"),
    ("huge.safetensors", "sampling produced NaN or inf values"),
])
def test_weights_that_give_nonfinite_values_exit_2_and_write_no_flat_images(capsys, tmp_path, nonfinite_files,
                                                                            name, message):
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "--model", str(nonfinite_files / name), "--steps", "2", "--classes", "1",
                           "--out", str(out), "--schedule", "none")
    assert code == 2 and message in err and name in err and "Traceback" not in err, err
    assert not out.exists() or not list(out.glob("*.png"))


@pytest.mark.parametrize("taken", ["grid.png", "00001_class2_seed1.png", "traces.jsonl"])
def test_an_output_file_name_taken_by_a_folder_is_refused_before_any_work(capsys, tmp_path, taken):
    (tmp_path / taken).mkdir()
    code, _, err = run_cli(capsys, *FAST, "--classes", "1,2", "--out", str(tmp_path), "--trace", "true")
    assert code == 2 and f"{taken}' is a folder" in err and "Traceback" not in err
    assert [p for p in tmp_path.iterdir() if p.is_file()] == []          # no image written before the refusal


def test_a_write_the_machine_refuses_is_one_line_with_exit_1(capsys, tmp_path, monkeypatch):
    import errno

    from PIL import Image

    def full_disk(self, fp, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", full_disk)
    code, _, err = run_cli(capsys, *FAST, "--classes", "1", "--out", str(tmp_path), "--schedule", "none")
    assert code == 1 and "No space left on device" in err and str(tmp_path) in err and "Traceback" not in err


@pytest.mark.parametrize("device, message", [("meta", "holds no data"), ("xpu", "is not usable on this machine")])
def test_a_device_torch_names_but_cannot_use_is_refused(capsys, tmp_path, device, message):
    import torch as _torch

    if device == "xpu" and getattr(_torch, "xpu", None) is not None and _torch.xpu.is_available():
        pytest.skip("this machine has an XPU")
    code, _, err = run_cli(capsys, *FAST, "--device", device, "--out", str(tmp_path / "o"))
    assert code == 2 and f"--device='{device}' {message}" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_the_cli_seed_range_is_the_samplers():
    import dqar.sampling
    from dqar.cli.common import SEED_MAX, SEED_MIN
    from dqar.harness import sharded_sampling

    assert (SEED_MIN, SEED_MAX) == (0, dqar.sampling.MAX_SEED) == (sharded_sampling.SEED_MIN, sharded_sampling.SEED_MAX)


def test_the_grid_is_readable_and_the_pngs_keep_their_native_size():
    import numpy as np

    from dqar.cli.generate import make_grid

    one_each = np.full((3, 16, 16, 1), 200, dtype=np.uint8)
    grid = make_grid(one_each, [4, 5, 6])
    # 16 px upscaled 6x to 96 px, 8 px padding, an 18 px caption band above: one row of three cells.
    assert grid.shape == (8 + 18 + 96 + 8, 8 + 3 * (96 + 8))
    assert (grid[26:26 + 96, 8:8 + 96] == 200).all()                  # the first digit, nearest-upscaled
    assert (grid[8:8 + 18] < 255).any()                               # a caption was drawn above it
    several = make_grid(np.zeros((4, 16, 16, 1), dtype=np.uint8), [1, 1, 2, 2])
    assert several.shape == (8 + 2 * (96 + 8), 8 + 4 * 18 + 2 * (96 + 8))   # a row per class, captions left
