"""Every DQARConfig field as a command-line option, shared by generate, bench, sweep and sample."""
from __future__ import annotations

import argparse

from . import UsageError
from .common import SEED_RANGE_TEXT, check_seed


class _Parser:
    """text -> value, with what it expects in words: the error message names that, never a function name.

    `__name__` is the same text, so callers that print a parser's name (the sweep's grid errors) read well too.
    """

    def __init__(self, fn, expects: str):
        self.fn = fn
        self.expects = expects
        self.__name__ = expects

    def __call__(self, text: str):
        return self.fn(text)

    def __repr__(self) -> str:
        return f"<parser: {self.expects}>"


def _float_fn(text: str) -> float:
    return float(text)


def _int_fn(text: str) -> int:
    return int(text)


def _seed_fn(text: str) -> int:
    value = int(text)
    try:
        return check_seed(value, "seed")
    except UsageError as exc:
        raise ValueError(str(exc)) from None


def _pair_fn(text: str) -> tuple[float, float]:
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) != 2:
        raise ValueError(f"{text!r} must be two comma-separated numbers, e.g. 0.5,50")
    return float(parts[0]), float(parts[1])


def _int_pair_fn(text: str) -> tuple[int, int]:
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) != 2:
        raise ValueError(f"{text!r} must be two comma-separated integers, e.g. 16,8")
    return int(parts[0]), int(parts[1])


def _phases_fn(text: str) -> tuple:
    """'0.3:0.107,0.7:0.464,1.0:1.0' -> ((0.3, 0.107), ...)."""
    out = []
    for item in text.split(","):
        end, sep, frac = item.partition(":")
        if not sep:
            raise ValueError(f"phase {item!r} has no ':'")
        out.append((float(end), float(frac)))
    return tuple(out)


def _targets_fn(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _bool_fn(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean")


def _optional_str_fn(text: str) -> str | None:
    return None if text.lower() in ("none", "") else text


def _number_fn(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def _str_fn(text: str) -> str:
    return text


_float = _Parser(_float_fn, "a number")
_int = _Parser(_int_fn, "an integer")
_seed = _Parser(_seed_fn, f"an integer seed in {SEED_RANGE_TEXT}")
_pair = _Parser(_pair_fn, "two comma-separated numbers, e.g. 0.5,50")
_int_pair = _Parser(_int_pair_fn, "two comma-separated bit widths (16, 8 or 4), e.g. 16,8")
_phases = _Parser(_phases_fn, "phases as p_end:fraction,..., e.g. 0.3:0.107,0.7:0.464,1.0:1.0")
_targets = _Parser(_targets_fn, "attn, attn,mlp, mlp or block")
_bool = _Parser(_bool_fn, "true or false (also 1/0, yes/no, on/off)")
_optional_str = _Parser(_optional_str_fn, "a name, or none")
_number = _Parser(_number_fn, "a channel count >= 1 or a fraction < 1")
_str = _Parser(_str_fn, "a name")

# option -> (config field, parser of the text, help; the default is appended from DQARConfig)
OPTIONS: dict[str, tuple[str, object, str]] = {
    "schedule": ("schedule", _str, "none | static | depth | gate | policy | interval | adaptive"),
    "mode": ("mode", _str, "output (cache the attention output) | kv (cache K/V, recompute Q)"),
    "warmup": ("warmup", _float, "progress in [0,1] before which nothing is reused"),
    "layers": ("layer_fraction", _float, "layer fraction l in (0,1] for the static schedule"),
    "order": ("order", _str, "shallow | deep | random: which layers become reusable first"),
    "order-seed": ("order_seed", _seed, "seed of the random layer order (--order random only)"),
    "depth-phases": ("depth_phases", _phases, "depth schedule phases as p_end:fraction,..."),
    "tau0": ("tau0", _float, "entropy threshold base; tau = tau0*sqrt(p_len/64), p_len=1 for class labels"),
    "snr-range": ("snr_range", _pair, "SNR window a,b for the gate"),
    "snr-form": ("snr_form", _str, "schedule (alpha^2/sigma^2) | x0 (||x0||^2/||x_t-x0||^2)"),
    "entropy-rows": ("entropy_rows", _int, "query rows sampled for the attention entropy"),
    "entropy-seed": ("entropy_seed", _seed, "seed of the sampled query rows"),
    "entropy-images": ("entropy_images", _int, "entropy over at most this many images per CFG branch (0: all)"),
    "record-entropy": ("record_entropy", _bool, "measure entropy even when the schedule does not need it"),
    "gate-with": ("gate_with", _optional_str, "AND the gate with: none | static | depth (--schedule gate only)"),
    "cfg-sharing": ("cfg_sharing", _bool, "uncond reuses cond's fresh output when entropies are close"),
    "cfg-sharing-eps": ("cfg_sharing_eps", _float, "entropy difference below which branches share"),
    "targets": ("targets", _targets, "what to reuse: attn | attn,mlp | mlp | block (each block's residual) | stack (one residual for all blocks)"),
    "forecast-order": ("forecast_order", _int,
                       "0 reuses the last output; 1 | 2 extrapolate from the last 2 | 3 computed"),
    "interval": ("interval", _int, "interval schedule: compute every N-th step after warmup"),
    "diff-bits": ("diff_bits", _Parser(lambda t: None if t.lower() in ("none", "") else int(t), "16, 8, 4 or none"),
                  "bits of the forecast's difference slots (none: --cache-bits); 4 with --cache-bits 8 is near lossless"),
    "layer-rounding": ("layer_rounding", _str,
                       "static schedule: slides (floor(a*l*L), seed 000) | code (floor(a*floor(l*L)), the public code)"),
    "gate-deep-snr-floor": ("gate_deep_snr_floor", _Parser(lambda t: None if t.lower() in ("none", "") else float(t),
                                                           "a number or none"),
                            "gate: no reuse in layers >= 2L//3 while the SNR is below this (the public code: 1.0)"),
    "tolerance": ("tolerance", _Parser(_float_fn, "a number > 0"),
                  "adaptive schedule: refresh when the forecast's predicted effect on the block would exceed this"),
    "max-age": ("max_age", _Parser(_int_fn, "an integer >= 1"),
                "adaptive schedule: the most steps a cached output may serve before a refresh"),
    "adaptive-scope": ("adaptive_scope", _str,
                       "adaptive schedule: step (one decision per step for every module, default) | module (each its own)"),
    "error-images": ("error_images", _int,
                     "adaptive schedule and policy v2: forecast error over this many images per CFG branch, "
                     "spread over it (0: all)"),
    "error-targets": ("error_targets", _Parser(lambda t: None if t.lower() in ("none", "") else _targets_fn(t),
                                               "a comma list of targets or none"),
                      "adaptive schedule and policy v2: the targets whose forecast error is measured (none: all)"),
    "branch-decisions": ("branch_decisions", _str,
                         "adaptive schedule and policy v2 under CFG: each (every branch its own, default) | cond (the "
                         "conditional branch is measured and decides for both)"),
    "policy": ("policy_path", _optional_str, "policy file (.safetensors) for --schedule policy"),
    "policy-threshold": ("policy_threshold", _float, "reuse when p_reuse >= this"),
    "policy-budget": ("policy_budget", _float, "max fraction of layers reused per step"),
    "cache-bits": ("cache_bits", _int, "16 (unquantized, the model's own dtype) | 8 | 4"),
    "kv-bits": ("kv_bits", _int_pair, "K,V bits for --mode kv, e.g. 16,8"),
    "quant-granularity": ("quant_granularity", _str, "tensor | channel | token"),
    "csb-topk": ("csb_topk", _number, "salient channels kept unquantized: a count >= 1 or a fraction < 1 (0: off)"),
    "csb-calibration-steps": ("csb_calibration_steps", _int, "computed steps over which salience is calibrated"),
    "trace": ("trace", _bool, "record policy-training trace rows (features + relative change) in the summary"),
}

# Defaults that are None in DQARConfig, in words.
_DEFAULT_WORDS = {
    "gate_with": "none",
    "diff_bits": "--cache-bits",
    "gate_deep_snr_floor": "none, off",
    "policy_path": "the shipped digits policy",
    "policy_threshold": "the policy file's threshold",
    "policy_budget": "none, no cap",
    "kv_bits": "--cache-bits for both",
}


def _as_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        if value and all(isinstance(v, tuple) for v in value):          # depth phases
            return ",".join(f"{end:g}:{frac:.3g}" for end, frac in value)
        return ",".join(_as_text(v) for v in value)
    return str(value)


def default_text(field: str) -> str:
    """DQARConfig's default of `field` as the command line spells it."""
    from dataclasses import fields

    from dqar.method.config import DQARConfig

    if field in _DEFAULT_WORDS:
        return _DEFAULT_WORDS[field]
    default = {f.name: f.default for f in fields(DQARConfig)}[field]
    text = _as_text(default)
    return f"seed 002's {text}" if field == "depth_phases" else text


def add_dqar_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "DQAR (reuse configuration)",
        "An option that does not apply to the chosen schedule (e.g. --interval without --schedule interval) "
        "is refused.")
    for option, (field, _, help_text) in OPTIONS.items():
        group.add_argument(f"--{option}", dest=f"dqar_{field}", default=None, metavar="V",
                           help=f"{help_text} (default {default_text(field)})")


def config_overrides(args: argparse.Namespace) -> dict:
    """The config fields the user set on the command line, parsed."""
    out = {}
    for option, (field, parse, _) in OPTIONS.items():
        text = getattr(args, f"dqar_{field}", None)
        if text is None:
            continue
        try:
            out[field] = parse(text)
        except (ValueError, TypeError):
            expects = getattr(parse, "expects", None) or getattr(parse, "__name__", str(parse))
            raise UsageError(f"--{option}={text!r} could not be parsed: expected {expects}") from None
    return out


# What an option reads, for the message when it has no effect.
_QUANT_FIELDS = ("quant_granularity", "csb_topk", "csb_calibration_steps")
_ENTROPY_FIELDS = ("entropy_rows", "entropy_seed", "entropy_images")
_RUN_FIELDS = ("record_entropy", "trace")      # describe the run, not its images: always accepted


def _why_inert(field: str, values: dict) -> str:
    """Why `field` has no effect under `values` (a full config dict), in the command line's words."""
    from dqar.method.schedules import SCHEDULE_CLASSES

    schedule = values["schedule"]
    if schedule == "none":
        return "does not apply to --schedule none: the uncached baseline reuses nothing"
    if field == "order_seed":
        return f"does not apply to --order {values['order']}: it is read only with --order random"
    if field == "kv_bits":
        return f"does not apply to --mode {values['mode']}: it is read only with --mode kv"
    if field in _QUANT_FIELDS:
        return ("does not apply to an unquantized cache (--cache-bits 16): it is read only with --cache-bits 8 "
                "or 4, or --mode kv")
    if field == "cfg_sharing_eps":
        return "does not apply without --cfg-sharing true"
    if field in _ENTROPY_FIELDS:
        return (f"does not apply to --schedule {schedule}: entropy is measured only by --schedule gate or policy, "
                "or with --cfg-sharing, --record-entropy or --trace true")
    readers = [name for name, cls in SCHEDULE_CLASSES.items() if field in cls.reads]
    text = f"does not apply to --schedule {schedule}"
    if readers:
        text += f": it is read only by --schedule {' or '.join(readers)}"
        bases = [b for b in ("static", "depth") if b in readers]
        if bases:
            text += f" (or --schedule gate --gate-with {' or '.join(bases)})"
    return text


def check_applicable(values: dict, given, texts: dict[str, str] | None = None) -> None:
    """Refuse options the user set (`given`, field names) that cannot change anything under `values`.

    `values` are the config fields set so far (the rest take DQARConfig's defaults). Uses the method's own
    rule of which fields are live (`dqar.method.schedules.live_fields`), so a schedule that starts reading a
    field makes the option acceptable there with no change here. Run fields (--record-entropy, --trace) and
    the entropy sampling options where entropy is measured are always accepted.
    """
    from dataclasses import fields

    from dqar.method.config import DQARConfig
    from dqar.method.schedules import SCHEDULE_CLASSES, live_fields

    full = {f.name: f.default for f in fields(DQARConfig)}
    full.update(values)
    if full.get("schedule") not in SCHEDULE_CLASSES:
        return  # DQARConfig names the allowed schedules
    live = live_fields(full)
    measures_entropy = full["schedule"] != "none" and (
        full.get("record_entropy") is True or full.get("trace") is True or full.get("cfg_sharing") is True
        or full["schedule"] in ("gate", "policy"))
    option_of = {field: option for option, (field, _, _) in OPTIONS.items()}
    for field in given:
        if field in live or field in _RUN_FIELDS or field not in option_of:
            continue
        if field in _ENTROPY_FIELDS and measures_entropy:
            continue
        shown = (texts or {}).get(field, _as_text(full[field]))
        raise UsageError(f"--{option_of[field]}={shown!r} {_why_inert(field, full)}; drop the option")


def config_from_args(args: argparse.Namespace, **defaults):
    """DQARConfig from the options (unset ones take `defaults`, then the dataclass defaults).

    Options that have no effect with the chosen schedule and settings are refused (a typo'd --schedule
    would otherwise be silently ignored, and the run would not be what the command line says).
    """
    from dqar.method.config import DQARConfig

    overrides = config_overrides(args)
    values = dict(defaults)
    values.update(overrides)
    policy_path = values.get("policy_path")
    schedule = values.get("schedule", "static")
    if policy_path is not None and schedule != "policy":
        # Only the policy schedule reads the file; ignoring it silently would hide a typo'd --schedule.
        raise UsageError(f"--policy={policy_path!r} is only read by --schedule policy (got --schedule {schedule})")
    check_applicable(values, overrides, {field: getattr(args, f"dqar_{field}") for field in overrides})
    return DQARConfig(**values)
