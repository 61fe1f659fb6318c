"""Where each model family keeps its blocks and the modules DQAR can reuse, and how to run their attention.

One registry (`LAYOUTS`); a new family is one `BlockLayout` entry, plus an ops class when its attention
module computes q/k/v differently.
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
    blocks_attr: str
    target_attrs: dict                     # target name -> attribute of a block
    ops: type
    drives_itself: bool                    # True: step found from the timestep input (diffusers)
    detect_branches: Callable | None = None
    # (block) -> (submodule, fn(its output) -> {"attn": gate (N, D), "mlp": gate (N, D)}): where the block's
    # adaLN gates can be read, for error control that weighs a module's error by its effect on the block.
    gate_source: Callable | None = None


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


LAYOUTS: list[BlockLayout] = [
    BlockLayout("dqar-dit", _is_class("DiT"), "blocks", {"attn": "attn", "mlp": "mlp"}, DiTAttentionOps, False,
                gate_source=_dit_gates),
    BlockLayout("diffusers-dit", _is_class("DiTTransformer2DModel"), "transformer_blocks",
                {"attn": "attn1", "mlp": "ff"}, DiffusersAttentionOps, True, _dit_pipeline_branches,
                gate_source=_ada_norm_zero_gates),
    # PixArt's branch order ([uncond | cond]) is learnt from the pipeline's encode_prompt call.
    BlockLayout("diffusers-pixart", _is_class("PixArtTransformer2DModel"), "transformer_blocks",
                {"attn": "attn1", "mlp": "ff"}, DiffusersAttentionOps, True, None),
]


def find_layout(model: nn.Module) -> BlockLayout:
    for layout in LAYOUTS:
        if layout.matches(model):
            return layout
    raise TypeError(
        f"DQAR has no block layout for {type(model).__name__}; supported: "
        "dqar DiT, diffusers DiTTransformer2DModel, PixArtTransformer2DModel"
    )
