"""Competing speed-ups that DQAR is compared with, each returned as a new model `sample()` can run.

"ptq-int8" is the post-training-quantization-only baseline: the per-token nn.Linear weights (blocks and
final layer) in int8 with activations quantized on the fly (dynamic quantization), no reuse at all. It
answers "is caching better than just quantizing the weights?" for the same seeds.

"pab" is diffusers' own pyramid attention broadcast (Zhao et al. 2024) on a diffusers `DiTTransformer2DModel`
carrying the same weights (`dqar.models.diffusers_port`): every attention module recomputes on every
`block_skip_range`-th call and reuses its last output in between, while the timestep lies inside
`timestep_range`. It answers "is DQAR better than the cache diffusers already ships?". Both settings are
our choices: diffusers' `PyramidAttentionBroadcastConfig` defaults `spatial_attention_block_skip_range` to
None, which skips no spatial attention at all, so there is no "default PAB" to compare with. We use skip
range 2 (every other call reuses) and keep the timestep range at (100, 800) (the value diffusers' config
carries for when a skip range is set). The sweep records both in each pab row (`variant_settings`) and the
report names them.

"taylorseer", "seacache", "fastercache", "fbc" and "magcache" are diffusers' other caches on the same port,
configured to work on a DiT (`dqar.harness.peers` says how); every baseline but "none" and "ptq-int8" takes
an `options` mapping over its settings.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .peers import PEERS, default_settings, make_peer, validate_options

BASELINES = ("none", "ptq-int8", "pab", *PEERS)
PAB_BLOCK_SKIP_RANGE = 2
PAB_TIMESTEP_RANGE = (100, 800)
# What each variant ran with, written into its sweep rows so a report can name the settings.
BASELINE_SETTINGS = {"pab": {"block_skip_range": PAB_BLOCK_SKIP_RANGE, "timestep_range": list(PAB_TIMESTEP_RANGE)},
                     **{name: default_settings(name) for name in PEERS}}


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


class PyramidAttentionBroadcastDiT(nn.Module):
    """The ported model under diffusers' pyramid attention broadcast, counting what it reuses.

    diffusers resets PAB's state only when a pipeline asks; here a call whose timestep is not below the
    previous call's starts a new generation (sampling timesteps strictly fall), which resets the hooks'
    caches and the counts, so no state survives into the next generation. After a generation,
    `reuse_stats()` gives its attention reuse events and fraction.
    """

    def __init__(self, model: nn.Module, block_skip_range: int = PAB_BLOCK_SKIP_RANGE,
                 timestep_range: tuple[int, int] = PAB_TIMESTEP_RANGE):
        super().__init__()
        from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
        from diffusers.hooks import HookRegistry

        from dqar.models.diffusers_port import DiffusersDiT

        if isinstance(block_skip_range, bool) or not isinstance(block_skip_range, int) or block_skip_range < 1:
            raise ValueError(f"block_skip_range={block_skip_range!r} is not allowed: must be an integer >= 1")
        self.port = DiffusersDiT(model)
        self.config = self.port.config
        transformer = self.port.transformer
        apply_pyramid_attention_broadcast(transformer, PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=block_skip_range,
            spatial_attention_timestep_skip_range=tuple(timestep_range),
            current_timestep_callback=lambda: self.port.timestep))
        self._registry = HookRegistry.check_if_exists_or_initialize(transformer)
        self._attention_calls = 0
        self._computed = 0
        self._last_t: int | None = None
        for block in transformer.transformer_blocks:
            # to_q runs only when PAB lets the attention module compute.
            block.attn1.to_q.register_forward_hook(self._count_compute)

    def _count_compute(self, *_):
        self._computed += 1

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t_now = int(t.flatten()[0])
        if self._last_t is None or t_now >= self._last_t:
            self._registry.reset_stateful_hooks()
            self._attention_calls = self._computed = 0
        self._last_t = t_now
        self._attention_calls += len(self.port.transformer.transformer_blocks)
        return self.port(x, t, y)

    def reuse_stats(self) -> dict:
        """Attention calls that reused during the last generation (a count and a fraction; one call covers
        both CFG halves) and the bytes PAB's caches hold at its end."""
        events = self._attention_calls - self._computed
        cache_bytes = 0
        for block in self.port.transformer.transformer_blocks:
            cached = block.attn1._diffusers_hook.get_hook("pyramid_attention_broadcast").state.cache
            if isinstance(cached, torch.Tensor):
                cache_bytes += cached.numel() * cached.element_size()
        return {"reuse_events": events, "cache_bytes": cache_bytes,
                "reuse_fraction": events / self._attention_calls if self._attention_calls else 0.0}


def make_baseline(kind: str, model: nn.Module, device: torch.device | str = "cpu", options=None) -> nn.Module | None:
    """The baseline model for `kind`: None for 'none' (the uncached model itself), a new model otherwise.

    `options` overrides settings by name (values may be strings, as `key=value` gives them); an unknown name
    or a bad value raises ValueError. A peer (`dqar.harness.peers.PEERS`) must be sampled with
    `observers=dqar.harness.peers.sampling_observers(model)`.
    """
    if kind not in BASELINES:
        raise ValueError(f"baseline={kind!r} is not known; allowed: {', '.join(BASELINES)}")
    opts = validate_options(kind, options)
    if kind == "none":
        return None
    if kind == "ptq-int8":
        return quantize_int8(model, device)
    if kind == "pab":
        return PyramidAttentionBroadcastDiT(model, **{k: tuple(v) if k == "timestep_range" else v
                                                     for k, v in opts.items()}).to(device)
    return make_peer(kind, model, device, opts)
