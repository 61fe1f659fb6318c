"""Every DQARConfig field as a command-line option, shared by generate, bench, sweep and sample."""
from __future__ import annotations

import argparse

from . import UsageError

# option -> (config field, parser of the text, help)
def _pair(text: str) -> tuple[float, float]:
    parts = [p for p in text.split(",") if p.strip()]
    if len(parts) != 2:
        raise UsageError(f"{text!r} must be two comma-separated numbers, e.g. 0.5,50")
    return float(parts[0]), float(parts[1])


def _int_pair(text: str) -> tuple[int, int]:
    a, b = _pair(text)
    return int(a), int(b)


def _phases(text: str) -> tuple:
    """'0.3:0.107,0.7:0.464,1.0:1.0' -> ((0.3, 0.107), ...)."""
    out = []
    for item in text.split(","):
        end, _, frac = item.partition(":")
        out.append((float(end), float(frac)))
    return tuple(out)


def _targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{text!r} is not a boolean (true/false)")


def _optional_str(text: str) -> str | None:
    return None if text.lower() in ("none", "") else text


def _number(text: str) -> float:
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


OPTIONS: dict[str, tuple[str, object, str]] = {
    "schedule": ("schedule", str, "none | static | depth | gate | policy | interval (default static)"),
    "mode": ("mode", str, "output (cache the attention output) | kv (cache K/V, recompute Q)"),
    "warmup": ("warmup", float, "progress in [0,1] before which nothing is reused (default 0.4)"),
    "layers": ("layer_fraction", float, "layer fraction l in (0,1] for the static schedule (default 0.33)"),
    "order": ("order", str, "shallow | deep | random: which layers become reusable first"),
    "order-seed": ("order_seed", int, "seed of the random layer order"),
    "depth-phases": ("depth_phases", _phases, "depth schedule phases as p_end:fraction,... (default seed 002)"),
    "tau0": ("tau0", float, "entropy threshold base; tau = tau0*sqrt(p_len/64), p_len=1 for class labels"),
    "snr-range": ("snr_range", _pair, "SNR window a,b for the gate (default 0.5,50)"),
    "snr-form": ("snr_form", str, "schedule (alpha^2/sigma^2) | x0 (||x0||^2/||x_t-x0||^2)"),
    "entropy-rows": ("entropy_rows", int, "query rows sampled for the attention entropy"),
    "entropy-seed": ("entropy_seed", int, "seed of the sampled query rows"),
    "record-entropy": ("record_entropy", _bool, "measure entropy even when the schedule does not need it"),
    "gate-with": ("gate_with", _optional_str, "AND the gate with: none | static | depth"),
    "cfg-sharing": ("cfg_sharing", _bool, "uncond reuses cond's fresh output when entropies are close"),
    "cfg-sharing-eps": ("cfg_sharing_eps", float, "entropy difference below which branches share"),
    "targets": ("targets", _targets, "modules to reuse: attn or attn,mlp"),
    "interval": ("interval", int, "interval schedule: compute every N-th step after warmup"),
    "policy": ("policy_path", _optional_str, "policy file (.safetensors) for --schedule policy (default: shipped)"),
    "policy-threshold": ("policy_threshold", float, "reuse when p_reuse >= this (default: the file's)"),
    "policy-budget": ("policy_budget", float, "max fraction of layers reused per step"),
    "cache-bits": ("cache_bits", int, "16 (unquantized) | 8 | 4"),
    "kv-bits": ("kv_bits", _int_pair, "K,V bits for --mode kv, e.g. 16,8"),
    "quant-granularity": ("quant_granularity", str, "tensor | channel | token"),
    "csb-topk": ("csb_topk", _number, "salient channels kept unquantized: a count >= 1 or a fraction < 1"),
    "csb-calibration-steps": ("csb_calibration_steps", int, "computed steps over which salience is calibrated"),
    "trace": ("trace", _bool, "record policy-training trace rows (features + relative change) in the summary"),
}


def add_dqar_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DQAR (reuse configuration)")
    for option, (field, _, help_text) in OPTIONS.items():
        group.add_argument(f"--{option}", dest=f"dqar_{field}", default=None, metavar="V", help=help_text)


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
            raise UsageError(f"--{option}={text!r} could not be parsed ({getattr(parse, '__name__', parse)})") from None
    return out


def config_from_args(args: argparse.Namespace, **defaults):
    """DQARConfig from the options (unset ones take `defaults`, then the dataclass defaults)."""
    from dqar.method.config import DQARConfig

    values = dict(defaults)
    values.update(config_overrides(args))
    config = DQARConfig(**values)
    if config.policy_path is not None and config.schedule != "policy":
        # Only the policy schedule reads the file; ignoring it silently would hide a typo'd --schedule.
        raise UsageError(f"--policy={config.policy_path!r} is only read by --schedule policy "
                         f"(got --schedule {config.schedule})")
    return config
