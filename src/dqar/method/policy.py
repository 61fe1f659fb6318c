"""The learned reuse policy (seed 002): an MLP from the five step features to p_reuse, and its file format.

Architecture, exactly the seed's: Linear(5, 64) + Tanh -> Linear(64, 64) + Tanh -> Linear(64, 1) + Sigmoid.
The inputs are standardised with a mean/std stored beside the weights, because the raw features live on
very different scales (entropy ~4 nats, log SNR from -10 to +10, progress in [0, 1]).

On disk a policy is two files with the same stem:
- `NAME.safetensors`: the tensors (weights, `feature_mean`, `feature_std`) and string metadata
  (format, feature order, threshold) - everything needed to run it;
- `NAME.json`: the human-readable sidecar (feature order, normalisation, threshold, training data,
  validation accuracy/AUC, the command that produced it). Loading needs only the safetensors file.
Training lives in `dqar.harness.policy_training`; this module only runs and stores a policy.

Feature sets (`dqar.method.stats.POLICY_FEATURE_SETS`): "v1" is the seed's five (format `dqar-policy/1`, the
shipped file); "v2" adds what a reusing run knows per (layer, branch): cache age, the last measured forecast
error and the age it was measured at (format `dqar-policy/2`, which records its feature set and the largest
cache age it was trained on; an older DQAR refuses it by format instead of misreading it).
"""
from __future__ import annotations

import json
import math
from array import array
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .stats import POLICY_FEATURE_NAMES, POLICY_FEATURE_SETS

NUM_FEATURES = len(POLICY_FEATURE_NAMES)
HIDDEN = 64
FORMAT = "dqar-policy/1"
FORMAT_V2 = "dqar-policy/2"
_LOG_EPS = 1e-8
SHIPPED_NAME = "policy_digits"
DEFAULT_THRESHOLD = 0.5
# A constant feature (prompt length is always 1 for class-conditional models) has std 0: dividing by it
# would give NaN, so such features are only centred.
_MIN_STD = 1e-6

_keep_open = ExitStack()   # keeps extracted copies alive when the package is imported from a zip


class PolicyFileError(ValueError):
    """A policy file that is missing, not safetensors, or made for other features."""


class ReusePolicy(nn.Module):
    """p_reuse = sigmoid(MLP((features - mean) / std)); reuse when p_reuse >= threshold."""

    def __init__(self, feature_mean: torch.Tensor | None = None, feature_std: torch.Tensor | None = None,
                 threshold: float = DEFAULT_THRESHOLD, info: dict | None = None, feature_set: str = "v1",
                 max_cache_age: int | None = None):
        super().__init__()
        if feature_set not in POLICY_FEATURE_SETS:
            raise ValueError(f"feature_set={feature_set!r} is not allowed: must be one of {sorted(POLICY_FEATURE_SETS)}")
        self.feature_set = feature_set
        self.feature_names = POLICY_FEATURE_SETS[feature_set]
        n = len(self.feature_names)
        self.net = nn.Sequential(nn.Linear(n, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(),
                                 nn.Linear(HIDDEN, 1), nn.Sigmoid())
        mean = torch.zeros(n) if feature_mean is None else torch.as_tensor(feature_mean, dtype=torch.float32)
        std = torch.ones(n) if feature_std is None else torch.as_tensor(feature_std, dtype=torch.float32)
        self.register_buffer("feature_mean", mean.clone())
        self.register_buffer("feature_std", std.clamp_min(_MIN_STD).clone())
        self.threshold = _check_threshold(threshold, "threshold")
        self.info = dict(info or {})
        # v2: the largest cache age seen in training; the schedule never forecasts beyond it (the MLP has not
        # seen older caches, and a layer that never computes would never refresh its measured error).
        self.max_cache_age = max_cache_age

    @property
    def reads_entropy(self) -> bool:
        return "entropy" in self.feature_names

    @property
    def uses_history(self) -> bool:
        """Whether the policy reads the per-(layer, branch) cache age and forecast error (v2)."""
        return "cache_age" in self.feature_names

    def set_normalization(self, features: torch.Tensor) -> None:
        """Mean/std from training features (N, n_features); std of a constant feature becomes 1 (centring only)."""
        features = _check_features(features, self.feature_names)
        std = features.std(dim=0, unbiased=False)
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(torch.where(std < _MIN_STD, torch.ones_like(std), std))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid scores (N,), for a numerically stable BCE during training."""
        z = (_check_features(features, self.feature_names) - self.feature_mean) / self.feature_std
        # The layers called as functions: the same ops as self.net[:-1](z), without building a Sequential and
        # dispatching six modules per call (the policy plans every step).
        first, _, second, _, last, _ = self.net
        h = torch.tanh(F.linear(z, first.weight, first.bias))
        h = torch.tanh(F.linear(h, second.weight, second.bias))
        return F.linear(h, last.weight, last.bias).squeeze(-1)                 # (N,)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """p_reuse (N,) in [0, 1]."""
        return torch.sigmoid(self.logits(features))

    @torch.no_grad()
    def reuse_mask(self, features: torch.Tensor, num_layers: int, threshold: float | None = None,
                   budget: float | None = None) -> torch.Tensor:
        """Which rows reuse: p_reuse >= threshold, and at most floor(budget * num_layers) of them.

        features: (n, n_features), one row per layer that has a measured entropy. `threshold=None` uses the file's.
        The budget is a fraction of the model's layers (not of the rows given), so it caps the per-step
        reuse the same way whatever subset of layers has statistics yet; the most confident rows win,
        ties going to the lower row index so the decision is deterministic.
        """
        return self.mask_from(self.forward(features), num_layers, threshold, budget)

    def mask_from(self, p: torch.Tensor, num_layers: int, threshold: float | None = None,
                  budget: float | None = None) -> torch.Tensor:
        """reuse_mask's rule applied to probabilities already formed (several plans' rows in one forward)."""
        return torch.tensor(self.chosen(p.tolist(), num_layers, threshold, budget), dtype=torch.bool)

    def chosen(self, p: list[float], num_layers: int, threshold: float | None = None,
               budget: float | None = None) -> list[bool]:
        """reuse_mask's rule on the probabilities as a list (a plan reads them once: a few rows' threshold and
        budget cost less in Python than as tensor ops). The threshold is compared as float32, as a tensor
        comparison with it would be."""
        thr = self.threshold if threshold is None else _check_threshold(threshold, "threshold")
        thr = array("f", (thr,))[0]
        mask = [x >= thr for x in p]
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
                raise ValueError(f"budget={budget!r} is not allowed: must be None or a number in (0, 1]")
            if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
                raise ValueError(f"num_layers={num_layers!r} is not allowed: must be an integer >= 1")
            cap = math.floor(budget * num_layers + 1e-9)
            picked = [i for i, m in enumerate(mask) if m]
            if len(picked) > cap:
                # The most confident first; sorted() is stable, so equal probabilities keep row order.
                keep = set(sorted(picked, key=lambda i: -p[i])[:cap])
                mask = [i in keep for i in range(len(p))]
        return mask


def _check_threshold(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value!r} is not allowed: must be a number in [0, 1]")
    return float(value)


def _check_features(features: torch.Tensor, names: tuple = POLICY_FEATURE_NAMES) -> torch.Tensor:
    features = torch.as_tensor(features, dtype=torch.float32)
    if features.ndim != 2 or features.shape[1] != len(names):
        raise ValueError(f"policy features must have shape (n, {len(names)}) in the order "
                         f"{list(names)}, got {tuple(features.shape)}")
    return features


def history_features(age: int, error: float, error_age: int) -> list[float]:
    """v2's three additions: cache age (steps since the last compute), log of the forecast error measured at
    that compute (the adaLN-gated effect of dqar.method.error_control) and the age it was measured at."""
    return [float(age), math.log(max(float(error), 0.0) + _LOG_EPS), float(error_age)]


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------

def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    if path.suffix == ".json":
        path = path.with_suffix(".safetensors")
    return path, path.with_suffix(".json")


def save_policy(policy: ReusePolicy, path: str | Path, info: dict | None = None) -> tuple[Path, Path]:
    """Write `path` (.safetensors: tensors + metadata) and its .json sidecar; returns both paths."""
    from safetensors.torch import save_file

    st_path, json_path = _paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    info = {**policy.info, **(info or {})}
    tensors = {k: v.detach().contiguous().cpu().float() for k, v in policy.state_dict().items()}
    v1 = policy.feature_set == "v1"
    fmt = FORMAT if v1 else FORMAT_V2
    age = policy.max_cache_age
    if not v1 and (isinstance(age, bool) or not isinstance(age, int) or age < 1):
        raise ValueError(f"max_cache_age={age!r} is not allowed for a {policy.feature_set} policy: it must record "
                         "the largest cache age it was trained on, an integer >= 1")
    metadata = {"format": fmt, "feature_names": json.dumps(list(policy.feature_names)),
                "threshold": repr(policy.threshold), "info": json.dumps(info, sort_keys=True)}
    extra = {}
    if not v1:
        extra = {"feature_set": policy.feature_set, "max_cache_age": policy.max_cache_age,
                 "needs": ("the attention target (entropy) and, " if policy.reads_entropy else "")
                          + "per layer and branch, the cache age and the forecast error measured at the last "
                            "compute (block probes, installed by apply_dqar)"}
        metadata.update(feature_set=policy.feature_set, max_cache_age=json.dumps(policy.max_cache_age))
    save_file(tensors, str(st_path), metadata=metadata)
    n = len(policy.feature_names)
    sidecar = {
        "format": fmt,
        **extra,
        "weights": st_path.name,
        "architecture": f"Linear({n},{HIDDEN})+Tanh -> Linear({HIDDEN},{HIDDEN})+Tanh -> "
                        f"Linear({HIDDEN},1)+Sigmoid",
        "feature_names": list(policy.feature_names),
        "normalization": {"mean": policy.feature_mean.tolist(), "std": policy.feature_std.tolist()},
        "threshold": policy.threshold,
        "decision": "reuse a layer when p_reuse >= threshold; with a budget b, at most floor(b * num_layers) "
                    "layers per step and branch, the most confident first",
        **info,
    }
    json_path.write_text(json.dumps(sidecar, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return st_path, json_path


def shipped_policy_path() -> Path:
    """The package's policy trained on the embedded digits DiT (resolved through importlib.resources)."""
    ref = resources.files("dqar.digits").joinpath("assets", f"{SHIPPED_NAME}.safetensors")
    path = Path(_keep_open.enter_context(resources.as_file(ref)))
    if not path.is_file():
        raise PolicyFileError(f"the shipped policy {str(path)!r} is missing from the installed package; pass "
                              "--policy FILE or rebuild it with `dqar train-policy --install`")
    return path


def load_policy(path: str | Path | None = None) -> ReusePolicy:
    """A ReusePolicy from a file written by `save_policy`; None loads the shipped digits policy."""
    from ..models.io import WeightsError, read_safetensors

    st_path = shipped_policy_path() if path is None else _paths(path)[0]
    where = f"policy file {str(st_path)!r}"
    try:
        tensors, metadata = read_safetensors(st_path, "policy")       # refuses NaN / inf tensors too
    except WeightsError as exc:
        raise PolicyFileError(f"{exc}; policies are written by `dqar train-policy`") from None
    if metadata.get("format") not in (FORMAT, FORMAT_V2):
        raise PolicyFileError(f"{where} has format {metadata.get('format')!r}, expected {FORMAT!r} or "
                              f"{FORMAT_V2!r}; it was not written by dqar.method.policy.save_policy")
    names = _json_or_none(metadata, "feature_names")
    feature_set, max_age = "v1", None
    if metadata["format"] == FORMAT_V2:
        feature_set, max_age = _v2_metadata(where, metadata, names)
    elif not isinstance(names, list) or len(names) != NUM_FEATURES:
        raise PolicyFileError(f"{where} records features {names!r}: {len(names) if isinstance(names, list) else 0} "
                              f"features, but this DQAR computes {NUM_FEATURES}: {list(POLICY_FEATURE_NAMES)}")
    elif tuple(names) != POLICY_FEATURE_NAMES:
        raise PolicyFileError(f"{where} expects features in the order {names}, but this DQAR computes "
                              f"{list(POLICY_FEATURE_NAMES)}; retrain the policy with `dqar train-policy`")
    try:
        threshold = float(metadata.get("threshold", DEFAULT_THRESHOLD))
        info = json.loads(metadata.get("info", "{}"))
    except ValueError as exc:
        raise PolicyFileError(f"{where} has unreadable metadata ({exc})") from None
    if not 0.0 <= threshold <= 1.0:          # NaN fails this too
        raise PolicyFileError(f"{where} has threshold {metadata.get('threshold')!r} in its metadata; a policy's "
                              "threshold must be a number in [0, 1]")
    if not isinstance(info, dict):
        raise PolicyFileError(f"{where} has 'info' metadata that is a JSON {type(info).__name__}, not an object; "
                              "it was not written by `dqar train-policy`")
    policy = ReusePolicy(threshold=threshold, info=info, feature_set=feature_set, max_cache_age=max_age)
    expected = policy.state_dict()
    for name, ref in expected.items():
        if name not in tensors:
            raise PolicyFileError(f"{where} lacks tensor {name!r} (expected shape {tuple(ref.shape)})")
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise PolicyFileError(f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected "
                                  f"{tuple(ref.shape)} ({len(policy.feature_names)} features -> {HIDDEN} -> "
                                  f"{HIDDEN} -> 1)")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise PolicyFileError(f"{where} has unexpected tensor {extra[0]!r}; it is not a DQAR reuse policy")
    if bool((tensors["feature_std"] < 0).any()):
        raise PolicyFileError(f"{where}: tensor 'feature_std' has a negative entry "
                              f"{tensors['feature_std'].min().item():g}; a standard deviation is >= 0")
    policy.load_state_dict({k: v.float() for k, v in tensors.items()})
    # Keep the std floor even for a hand-edited file, so inference never divides by zero.
    policy.feature_std.clamp_(min=_MIN_STD)
    return policy.eval()


def _json_or_none(metadata: dict, key: str):
    """A metadata entry decoded from JSON; None when it is absent or not JSON (the caller says what is wrong)."""
    try:
        return json.loads(metadata.get(key, "null"))
    except json.JSONDecodeError:
        return None


def _v2_metadata(where: str, metadata: dict, names) -> tuple[str, int]:
    """(feature set, max cache age) of a dqar-policy/2 file, or a PolicyFileError naming what is wrong."""
    feature_set = metadata.get("feature_set")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise PolicyFileError(f"{where} records features {names!r}, not a list of feature names")
    unknown = [n for n in names if n not in POLICY_FEATURE_SETS["v2"]]
    if unknown:
        raise PolicyFileError(f"{where} needs features {unknown} that this DQAR cannot compute; it computes "
                              f"{list(POLICY_FEATURE_SETS['v2'])}")
    if feature_set not in POLICY_FEATURE_SETS or tuple(names) != POLICY_FEATURE_SETS[feature_set]:
        raise PolicyFileError(f"{where} records feature set {feature_set!r} with features {names}; this DQAR "
                              f"knows the sets {({k: list(v) for k, v in POLICY_FEATURE_SETS.items()})}")
    max_age = _json_or_none(metadata, "max_cache_age")
    if isinstance(max_age, bool) or not isinstance(max_age, int) or max_age < 1:
        raise PolicyFileError(f"{where} has max_cache_age {metadata.get('max_cache_age')!r} in its metadata; a v2 "
                              "policy records the largest cache age it was trained on, an integer >= 1")
    return feature_set, max_age
