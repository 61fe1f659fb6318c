"""DQARConfig validation: every bad value names the field, the value and what is allowed."""
import dataclasses

import pytest

from dqar import DQARConfig

BAD = [
    ("mode", "qk", "must be one of output, kv"),
    ("schedule", "sometimes", "must be one of none, static"),
    ("warmup", 1.5, "must be a number in [0, 1]"),
    ("warmup", -0.1, "must be a number in [0, 1]"),
    ("layer_fraction", 0.0, "must be a number in (0, 1]"),
    ("layer_fraction", 1.2, "must be a number in (0, 1]"),
    ("order", "middle", "must be one of shallow, deep, random"),
    ("order_seed", 1.5, "must be an integer"),
    ("depth_phases", ((0.7, 0.5), (0.3, 1.0)), "increasing p_end"),
    ("depth_phases", ((0.3, 0.5),), "the last p_end = 1.0"),
    ("tau0", 0, "must be a finite number > 0"),
    ("tau0", float("nan"), "must be a finite number > 0"),
    ("tau0", float("inf"), "must be a finite number > 0"),
    ("snr_range", (float("nan"), float("nan")), "not NaN"),
    ("snr_range", (0.5, float("nan")), "not NaN"),
    ("csb_topk", float("nan"), "csb_topk"),
    ("policy_threshold", float("nan"), "in [0, 1]"),
    ("warmup", float("nan"), "must be a number in [0, 1]"),
    ("snr_range", (50.0, 0.5), "0 <= a <= b"),
    ("snr_range", (1.0,), "must be a pair"),
    ("snr_form", "psnr", "must be one of schedule, x0"),
    ("entropy_rows", 0, "must be an integer >= 1"),
    ("entropy_images", -1, "must be an integer >= 0"),
    ("entropy_images", 1.5, "must be an integer >= 0"),
    ("gate_with", "gate", "must be None, 'static' or 'depth'"),
    ("cfg_sharing_eps", -1.0, "must be a finite number >= 0"),
    ("cfg_sharing_eps", float("nan"), "must be a finite number >= 0"),
    ("gate_with", "static", "applies to schedule='gate' only"),
    ("targets", ("attn", "ffn"), "distinct names from attn, mlp"),
    ("targets", (), "non-empty"),
    ("interval", 0, "must be an integer >= 1"),
    ("policy_threshold", 1.5, "in [0, 1]"),
    ("policy_budget", 0.0, "in (0, 1]"),
    ("cache_bits", 3, "must be 16 (unquantized), 8 or 4"),
    ("kv_bits", (16, 2), "each 16, 8 or 4"),
    ("quant_granularity", "row", "must be one of tensor, channel, token"),
    ("csb_topk", -1, "csb_topk"),
    ("csb_calibration_steps", -2, "must be an integer >= 0"),
    ("record_entropy", "yes", "must be True or False"),
    ("layer_rounding", "ceil", "must be one of slides, code"),
    ("layer_rounding", None, "must be one of slides, code"),
    ("gate_deep_snr_floor", -1.0, "must be None or a finite number >= 0"),
    ("gate_deep_snr_floor", float("nan"), "must be None or a finite number >= 0"),
    ("gate_deep_snr_floor", float("inf"), "must be None or a finite number >= 0"),
    ("gate_deep_snr_floor", True, "must be None or a finite number >= 0"),
    ("gate_deep_snr_floor", "1", "must be None or a finite number >= 0"),
]


@pytest.mark.parametrize("field, value, allowed", BAD)
def test_bad_values_raise_naming_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as info:
        DQARConfig(**{field: value})
    msg = str(info.value)
    assert f"DQARConfig.{field}={value!r}" in msg and allowed in msg


def test_kv_mode_rejects_mlp_target():
    with pytest.raises(ValueError, match="mode='kv' caches attention keys/values only"):
        DQARConfig(mode="kv", targets=("attn", "mlp"))


def test_replace_revalidates_and_dict_round_trip():
    cfg = DQARConfig(schedule="gate", gate_with="depth", targets=["attn", "mlp"], snr_range=[1, 10])
    assert cfg.targets == ("attn", "mlp") and cfg.snr_range == (1, 10)
    assert DQARConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="warmup"):
        dataclasses.replace(cfg, warmup=2.0)
    with pytest.raises(ValueError, match="unknown DQARConfig field 'layers'"):
        DQARConfig.from_dict({"layers": 0.5})


def test_caller_data_is_not_mutated():
    targets = ["attn"]
    DQARConfig(targets=targets)
    assert targets == ["attn"]


def test_deep_snr_floor_applies_to_the_gate_only():
    assert DQARConfig(schedule="gate", gate_deep_snr_floor=1).gate_deep_snr_floor == 1
    assert DQARConfig(schedule="gate", gate_deep_snr_floor=0.0).gate_deep_snr_floor == 0.0
    with pytest.raises(ValueError, match=r"DQARConfig.gate_deep_snr_floor=1.0 .*applies to schedule='gate' only"):
        DQARConfig(schedule="static", gate_deep_snr_floor=1.0)


def test_new_fields_round_trip_and_default_to_the_slides():
    cfg = DQARConfig(schedule="gate", gate_with="static", layer_rounding="code", gate_deep_snr_floor=1.0)
    assert DQARConfig.from_dict(cfg.to_dict()) == cfg
    assert DQARConfig().layer_rounding == "slides" and DQARConfig().gate_deep_snr_floor is None
