"""Competing speed-ups that DQAR is compared with, each returned as a new model `sample()` can run.

"ptq-int8" is the post-training-quantization-only baseline: the per-token nn.Linear weights (blocks and
final layer) in int8 with activations quantized on the fly (dynamic quantization), no reuse at all. It
answers "is caching better than just quantizing the weights?" for the same seeds.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

BASELINES = ("none", "ptq-int8")


class BaselineUnavailable(RuntimeError):
    """The requested baseline cannot run on this device / install."""


def _quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the nn.Linear layers to quantize: all but those inside embedders.

    Embedders run once per sample and step, not per token, so they carry a negligible share of the
    FLOPs; and DiT's timestep embedder reads `mlp[0].weight.dtype`, which a quantized Linear turns
    into a method, so quantizing it would break the forward pass.
    """
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any("embedder" in part for part in name.split("."))]


def quantize_int8(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """A deep copy of `model` with int8 weights in its per-token nn.Linear layers; the original is untouched.

    CPU: torch.ao dynamic quantization (fbgemm/x86 kernels). CUDA: torchao's int8 weight-only
    quantization when torchao is installed, otherwise `BaselineUnavailable` (torch.ao's dynamic
    quantized Linear has no CUDA kernels).
    """
    device = torch.device(device)
    if any(isinstance(m, nn.Module) and "forward" in m.__dict__ for m in model.modules()):
        # A hooked forward (DQAR applied) would be copied too and the baseline would reuse.
        raise ValueError("quantize_int8 needs a model without hooks: call dqar.remove_dqar(model) first")
    qmodel = copy.deepcopy(model).eval()
    if device.type == "cpu":
        with warnings.catch_warnings():
            # torch.ao.quantization announces its move to torchao; the eager API still works in this range.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

            spec = {name: default_dynamic_qconfig for name in _quantizable_linears(qmodel)}
            return quantize_dynamic(qmodel.to("cpu"), spec, dtype=torch.qint8)
    if device.type == "cuda":
        try:
            import torchao.quantization as tq
        except ImportError:
            raise BaselineUnavailable(
                "--baseline ptq-int8 on CUDA needs torchao (pip install torchao); torch.ao dynamic "
                "quantization runs on CPU only. Use --device cpu or --baseline none") from None
        qmodel = qmodel.to(device)
        names = set(_quantizable_linears(qmodel))
        config = tq.Int8WeightOnlyConfig() if hasattr(tq, "Int8WeightOnlyConfig") else tq.int8_weight_only()
        tq.quantize_(qmodel, config, filter_fn=lambda m, fqn: fqn in names)
        return qmodel
    raise BaselineUnavailable(f"--baseline ptq-int8 is not available on device {str(device)!r}; "
                              "allowed devices: cpu, cuda (with torchao)")


def make_baseline(kind: str, model: nn.Module, device: torch.device | str = "cpu") -> nn.Module | None:
    """The baseline model for `kind`: None for 'none' (the uncached model itself), a new model otherwise."""
    if kind == "none":
        return None
    if kind == "ptq-int8":
        return quantize_int8(model, device)
    raise ValueError(f"baseline={kind!r} is not known; allowed: {', '.join(BASELINES)}")
