"""Where each model family keeps its blocks and the modules DQAR can reuse, and how to run their attention.

One registry (`LAYOUTS`); a new family is one `BlockLayout` entry, plus an ops class when its attention
module computes q/k/v differently. Discovery is generic over diffusers' standard parts: the blocks are the
ModuleLists named in `blocks_attr` (`transformer_blocks`, then `single_transformer_blocks`, or `blocks`),
concatenated in the order the model runs them; per block, each target is the first attribute of its
candidates that exists (attention `attn1` / `attn`, feed-forward `ff` / `ffn`), so a block without one (Flux's
single-stream blocks have no separate MLP) simply has no such target. A block that returns a tuple names the
input stream each output continues in `BLOCK_STREAMS` (the block target caches both streams' residuals).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn
import torch.nn.functional as F


class DiTAttentionOps:
    """Our DiT's Attention: fused qkv Linear, SDPA, proj."""

    @staticmethod
    def qkv(m, x):
        return m.split_qkv(x)

    @staticmethod
    def q_only(m, x):
        d = m.proj.in_features
        n, t, _ = x.shape
        q = F.linear(x, m.qkv.weight[:d], m.qkv.bias[:d] if m.qkv.bias is not None else None)
        return q.reshape(n, t, m.num_heads, m.head_dim).transpose(1, 2)

    @staticmethod
    def attend(m, q, k, v):
        return m.attend(q, k, v)

    @staticmethod
    def kv_weight_numel(m):
        return m.qkv.weight.numel() * 2 // 3

    @staticmethod
    def cache_channels(m, mode):
        """Channels (last dim) of what the cache stores: the output width, or the head dim for K/V."""
        return m.head_dim if mode == "kv" else m.proj.out_features


class DiffusersAttentionOps:
    """diffusers' Attention (to_q / to_k / to_v / to_out) for self-attention without a mask."""

    @staticmethod
    def _heads(m, t):
        n, s, inner = t.shape
        return t.view(n, s, m.heads, inner // m.heads).transpose(1, 2)

    @classmethod
    def qkv(cls, m, x):
        q, k, v = cls._heads(m, m.to_q(x)), cls._heads(m, m.to_k(x)), cls._heads(m, m.to_v(x))
        if getattr(m, "norm_q", None) is not None:
            q = m.norm_q(q)
        if getattr(m, "norm_k", None) is not None:
            k = m.norm_k(k)
        return q, k, v

    @classmethod
    def q_only(cls, m, x):
        q = cls._heads(m, m.to_q(x))
        return m.norm_q(q) if getattr(m, "norm_q", None) is not None else q

    @staticmethod
    def attend(m, q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, scale=getattr(m, "scale", None))
        n, h, t, hd = out.shape
        out = m.to_out[1](m.to_out[0](out.transpose(1, 2).reshape(n, t, h * hd)))
        return out / getattr(m, "rescale_output_factor", 1.0)

    @staticmethod
    def kv_weight_numel(m):
        return m.to_k.weight.numel() + m.to_v.weight.numel()

    @staticmethod
    def cache_channels(m, mode):
        return m.to_k.out_features // m.heads if mode == "kv" else m.to_out[0].out_features


@dataclass(frozen=True)
class BlockLayout:
    """Where a model family keeps its blocks and the modules DQAR can reuse."""

    name: str
    matches: Callable[[nn.Module], bool]
    blocks_attr: tuple                     # ModuleList attributes holding the blocks, in the order they run
    target_attrs: dict                     # target name -> candidate attributes of a block, first found wins
    ops: type | None                       # q/k/v ops (K/V mode, entropy); None: only for plain SDPA attention
    drives_itself: bool                    # True: step found from the timestep input (diffusers)
    detect_branches: Callable | None = None
    # (block) -> (submodule, fn(its output) -> {"attn": gate (N, D), "mlp": gate (N, D)}): where the block's
    # adaLN gates can be read, for error control that weighs a module's error by its effect on the block.
    gate_source: Callable | None = None
    # Batch order of a pipeline that batches both CFG halves in one call, told by its prompt encoding's
    # do_classifier_free_guidance; None where the pipeline runs the halves as separate calls (Flux, Wan).
    cfg_order: tuple | None = None

    def blocks(self, model: nn.Module) -> list:
        found = []
        for attr in self.blocks_attr:
            stack = getattr(model, attr, None)
            if isinstance(stack, nn.ModuleList):
                found.extend(stack)
        return found

    def targets(self, block: nn.Module) -> dict:
        """target -> the block's module for it (the block itself for "block"); a missing target is left out."""
        found = {"block": block}
        for target, candidates in self.target_attrs.items():
            for attr in candidates:
                module = getattr(block, attr, None)
                if isinstance(module, nn.Module):
                    found[target] = module
                    break
        return found

    def attention_ops(self, module: nn.Module):
        """The q/k/v ops for this attention module, or None when it does not compute plain softmax attention
        of its own input (joint/cross, linear attention, rotary embeddings): K/V mode and entropy need them."""
        if self.ops is not DiffusersAttentionOps or self.name in _EXACT_OPS:
            return self.ops
        processor = type(getattr(module, "processor", None)).__name__
        plain = processor in ("AttnProcessor2_0", "AttnProcessor") and getattr(module, "add_k_proj", None) is None
        return self.ops if plain and getattr(module, "to_out", None) is not None else None


# Layouts whose attention ops were written for their own attention modules and are used as they are.
_EXACT_OPS = ("dqar-dit", "diffusers-dit", "diffusers-pixart")

# Blocks that return a tuple: the input stream each output position continues (the block target's residual).
BLOCK_STREAMS = {
    "FluxTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "FluxSingleTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "JointTransformerBlock": ("encoder_hidden_states", "hidden_states"),
    "CogVideoXBlock": ("hidden_states", "encoder_hidden_states"),
}


def block_streams(block: nn.Module) -> tuple | None:
    return BLOCK_STREAMS.get(type(block).__name__)


def _is_class(name: str) -> Callable[[nn.Module], bool]:
    return lambda m: any(c.__name__ == name for c in type(m).__mro__)


def _dit_pipeline_branches(model, kwargs, n):
    """DiTPipeline batches [cond | uncond]; the uncond half carries the null class."""
    labels = kwargs.get("class_labels")
    null = getattr(model.config, "num_embeds_ada_norm", None)
    if labels is not None and n % 2 == 0 and null is not None and bool((labels[n // 2:] == null).all()):
        return ("cond", "uncond")
    return ("cond",)


def _dit_gates(block):
    """Our DiTBlock: adaLN_modulation(c) chunks into shift/scale/gate for attention, then for the MLP."""
    def read(out):
        chunks = out.chunk(6, dim=1)
        return {"attn": chunks[2], "mlp": chunks[5]}
    return block.adaLN_modulation, read


def _ada_norm_zero_gates(block):
    """diffusers BasicTransformerBlock with ada_norm_zero: norm1 returns (x, gate_msa, shift, scale, gate_mlp)."""
    if getattr(block, "norm_type", None) != "ada_norm_zero":
        return None
    return block.norm1, lambda out: {"attn": out[1], "mlp": out[4]}


def _norm1_zero_gates(block):
    """SD3 / Flux double blocks: norm1 (AdaLayerNormZero) returns (x, gate_msa, shift, scale, gate_mlp)."""
    norm = getattr(block, "norm1", None)
    if type(norm).__name__ != "AdaLayerNormZero":
        return None
    return norm, lambda out: {"attn": out[1], "mlp": out[4]}


_UNCOND_FIRST = ("uncond", "cond")
_STANDARD = {"attn": ("attn1", "attn"), "mlp": ("ff", "ffn")}


def _diffusers(name: str, cls: str, blocks: tuple, cfg_order, gate_source=None) -> BlockLayout:
    return BlockLayout(name, _is_class(cls), blocks, _STANDARD, DiffusersAttentionOps, True, None,
                       gate_source=gate_source, cfg_order=cfg_order)


LAYOUTS: list[BlockLayout] = [
    BlockLayout("dqar-dit", _is_class("DiT"), ("blocks",), {"attn": ("attn",), "mlp": ("mlp",)}, DiTAttentionOps,
                False, gate_source=_dit_gates),
    BlockLayout("diffusers-dit", _is_class("DiTTransformer2DModel"), ("transformer_blocks",),
                {"attn": ("attn1",), "mlp": ("ff",)}, DiffusersAttentionOps, True, _dit_pipeline_branches,
                gate_source=_ada_norm_zero_gates),
    # PixArt-alpha and -Sigma: [uncond | cond], learnt from the pipeline's encode_prompt call.
    BlockLayout("diffusers-pixart", _is_class("PixArtTransformer2DModel"), ("transformer_blocks",),
                {"attn": ("attn1",), "mlp": ("ff",)}, DiffusersAttentionOps, True, None, cfg_order=_UNCOND_FIRST),
    _diffusers("diffusers-sd3", "SD3Transformer2DModel", ("transformer_blocks",), _UNCOND_FIRST, _norm1_zero_gates),
    # Flux: 'transformer_blocks' (double-stream) run before 'single_transformer_blocks'; true CFG is two calls.
    _diffusers("diffusers-flux", "FluxTransformer2DModel", ("transformer_blocks", "single_transformer_blocks"),
               None, _norm1_zero_gates),
    _diffusers("diffusers-sana", "SanaTransformer2DModel", ("transformer_blocks",), _UNCOND_FIRST),
    _diffusers("diffusers-hunyuandit", "HunyuanDiT2DModel", ("blocks",), _UNCOND_FIRST),
    _diffusers("diffusers-cogvideox", "CogVideoXTransformer3DModel", ("transformer_blocks",), _UNCOND_FIRST),
    _diffusers("diffusers-wan", "WanTransformer3DModel", ("blocks",), None),
    _diffusers("diffusers-ltx", "LTXVideoTransformer3DModel", ("transformer_blocks",), _UNCOND_FIRST),
]

SUPPORTED_CLASSES = ("dqar DiT", "DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                     "FluxTransformer2DModel", "SanaTransformer2DModel", "HunyuanDiT2DModel",
                     "CogVideoXTransformer3DModel", "WanTransformer3DModel", "LTXVideoTransformer3DModel")


def find_layout(model: nn.Module) -> BlockLayout:
    for layout in LAYOUTS:
        if layout.matches(model):
            if not layout.blocks(model):
                raise TypeError(f"DQAR found no transformer blocks in {type(model).__name__} (looked for "
                                f"{', '.join(layout.blocks_attr)})")
            return layout
    raise TypeError(f"DQAR has no block layout for {type(model).__name__}; supported: "
                    f"{', '.join(SUPPORTED_CLASSES)}")
