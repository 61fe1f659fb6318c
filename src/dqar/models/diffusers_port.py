"""The project's DiT as a diffusers `DiTTransformer2DModel` carrying the same weights.

Why: diffusers' own caching hooks (pyramid attention broadcast, ...) attach to diffusers models only, so
comparing DQAR with them on the embedded model needs that model in diffusers' layout. The port is exact up
to float rounding: diffusers' DiT shares the original architecture except that

- every block holds its own copy of the timestep/label embedder (the original shares one), so the shared
  weights are copied into each block;
- attention has separate to_q/to_k/to_v projections where the original has one fused qkv;
- diffusers' `CombinedTimestepLabelEmbeddings` uses `downscale_freq_shift=1` (frequencies
  exp(-ln(10000) i / (half - 1))) where the original DiT divides by `half`; the port sets the shift to 0
  so the timestep code, and hence every output, matches.
"""
from __future__ import annotations

import torch
from torch import nn

from .dit import DiT


class PortError(ValueError):
    """A model that has no diffusers counterpart."""


def _copy_linear(dst: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    dst.weight.copy_(weight)
    dst.bias.copy_(bias)


@torch.no_grad()
def to_diffusers_dit(model: DiT):
    """A new `DiTTransformer2DModel` (eval mode, same dtype and device) computing what `model` computes."""
    from diffusers import DiTTransformer2DModel

    c = model.config
    null_rows = model.y_embedder.embedding_table.num_embeddings - c.num_classes
    if null_rows != 1:
        raise PortError(f"class_dropout_prob={c.class_dropout_prob!r}: diffusers' DiT needs a null-class row "
                        "for guidance, so only models built with class_dropout_prob > 0 can be ported")
    ref = next(model.parameters())
    port = DiTTransformer2DModel(
        num_attention_heads=c.num_heads, attention_head_dim=c.hidden_size // c.num_heads,
        in_channels=c.in_channels, out_channels=model.out_channels, num_layers=c.depth,
        sample_size=c.input_size, patch_size=c.patch_size, activation_fn="gelu-approximate",
        num_embeds_ada_norm=c.num_classes, norm_type="ada_norm_zero", norm_elementwise_affine=False,
        norm_eps=1e-6, attention_bias=True,
    ).to(ref.device).eval()
    if ref.dtype != torch.float32:
        port = port.to(ref.dtype)
    if model.blocks[0].mlp.fc1.out_features != port.transformer_blocks[0].ff.net[0].proj.out_features:
        raise PortError(f"mlp_ratio={c.mlp_ratio!r}: diffusers' DiT has a fixed MLP ratio of 4")

    port.pos_embed.proj.weight.copy_(model.x_embedder.proj.weight)
    port.pos_embed.proj.bias.copy_(model.x_embedder.proj.bias)
    port.pos_embed.pos_embed.copy_(model.pos_embed.to(port.pos_embed.pos_embed.dtype))
    t_mlp, table = model.t_embedder.mlp, model.y_embedder.embedding_table.weight
    d = c.hidden_size
    for ours, theirs in zip(model.blocks, port.transformer_blocks):
        emb = theirs.norm1.emb
        emb.time_proj.downscale_freq_shift = 0
        _copy_linear(emb.timestep_embedder.linear_1, t_mlp[0].weight, t_mlp[0].bias)
        _copy_linear(emb.timestep_embedder.linear_2, t_mlp[2].weight, t_mlp[2].bias)
        emb.class_embedder.embedding_table.weight.copy_(table)
        _copy_linear(theirs.norm1.linear, ours.adaLN_modulation[1].weight, ours.adaLN_modulation[1].bias)
        w, b = ours.attn.qkv.weight, ours.attn.qkv.bias    # rows: q, k, v, d each (see Attention.split_qkv)
        for i, proj in enumerate((theirs.attn1.to_q, theirs.attn1.to_k, theirs.attn1.to_v)):
            _copy_linear(proj, w[i * d:(i + 1) * d], b[i * d:(i + 1) * d])
        _copy_linear(theirs.attn1.to_out[0], ours.attn.proj.weight, ours.attn.proj.bias)
        _copy_linear(theirs.ff.net[0].proj, ours.mlp.fc1.weight, ours.mlp.fc1.bias)
        _copy_linear(theirs.ff.net[2], ours.mlp.fc2.weight, ours.mlp.fc2.bias)
    final = model.final_layer
    _copy_linear(port.proj_out_1, final.adaLN_modulation[1].weight, final.adaLN_modulation[1].bias)
    _copy_linear(port.proj_out_2, final.linear.weight, final.linear.bias)
    return port


class DiffusersDiT(nn.Module):
    """A ported `DiTTransformer2DModel` behind the project DiT's call, `model(x, t, y) -> output`.

    `config` is the source DiT's, so `dqar.sampling.sample` runs it like the original. `timestep` holds the
    timestep of the call in progress, for hooks that ask for it (pyramid attention broadcast's callback).
    """

    def __init__(self, model: DiT):
        super().__init__()
        self.config = model.config
        self.transformer = to_diffusers_dit(model)
        self.timestep: int | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.timestep = int(t.flatten()[0])
        return self.transformer(x, timestep=t, class_labels=y, return_dict=False)[0]
