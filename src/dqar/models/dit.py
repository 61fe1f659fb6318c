"""Compact Diffusion Transformer (DiT, Peebles & Xie 2023) in one file.

Follows the original architecture: patch embedding with a fixed 2-D sin-cos position
embedding, sinusoidal timestep embedder, label embedder with a null class for classifier-free
guidance, adaLN-Zero blocks and a final adaLN layer. Attention runs on fused SDPA. Each block's
attention and MLP are separate submodules (`block.attn`, `block.mlp`) whose outputs are taken
*before* the adaLN gate, which is what DQAR caches and reuses.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                        Embedding layers for timesteps and labels              #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vectors with a sinusoidal code and a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]                                  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb                                                               # (N, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))                      # (N, D)


class LabelEmbedder(nn.Module):
    """Embeds class labels; index `num_classes` is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        drop = torch.rand(labels.shape[0], device=labels.device, generator=generator) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            labels = self.token_drop(labels, generator)
        return self.embedding_table(labels)                                      # (N, D)


class PatchEmbed(nn.Module):
    """(N, C, H, W) image to (N, T, D) patch tokens with a strided convolution."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.num_patches = (input_size // patch_size) ** 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()                         # (N, T, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention on fused SDPA; `qkv` and `proj` are the only weights."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def split_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, t, _ = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]                                            # each (N, H, T, hd)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, k, v)                            # (N, H, T, hd)
        n, h, t, hd = out.shape
        return self.proj(out.transpose(1, 2).reshape(n, t, h * hd))              # (N, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.split_qkv(x))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU, as in DiT."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # The gates multiply the module outputs here, so a cached output is still modulated by this step.
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x                                                                 # (N, T, D)


class FinalLayer(nn.Module):
    """adaLN final layer: tokens back to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))           # (N, T, p*p*C)


@dataclass(frozen=True)
class DiTConfig:
    """Every shape hyper-parameter of a DiT; saved beside weights so a file names its own shape."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True

    def __post_init__(self):
        positive = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DiTConfig.{name}={value!r} is not allowed: must be a positive integer")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"DiTConfig.input_size={self.input_size} is not divisible by patch_size={self.patch_size}: "
                "the image must split into whole patches"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"DiTConfig.class_dropout_prob={self.class_dropout_prob!r} must be in [0, 1)")

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone; forward(x, t, y) predicts noise (and sigma)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        c = config
        self.in_channels = c.in_channels
        self.out_channels = c.in_channels * 2 if c.learn_sigma else c.in_channels
        self.patch_size = c.patch_size
        self.num_heads = c.num_heads
        self.num_classes = c.num_classes

        self.x_embedder = PatchEmbed(c.input_size, c.patch_size, c.in_channels, c.hidden_size)
        self.t_embedder = TimestepEmbedder(c.hidden_size)
        self.y_embedder = LabelEmbedder(c.num_classes, c.hidden_size, c.class_dropout_prob)
        # Fixed sin-cos position embedding, kept as a buffer so it is never trained or saved as a weight.
        pos = get_2d_sincos_pos_embed(c.hidden_size, int(self.x_embedder.num_patches ** 0.5))
        self.register_buffer("pos_embed", torch.from_numpy(pos).float().unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth)])
        self.final_layer = FinalLayer(c.hidden_size, c.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def randomize_(self, seed: int = 0, std: float = 0.02) -> "DiT":
        """Fill every weight with seeded noise (no zero gates), so speed work and tests exercise every path."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                if p.device.type == "meta":
                    continue
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
        return self

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)                            # (N, C_out, H, W)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)                      # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, generator)    # (N, D)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)                                               # (N, T, p*p*C_out)
        return self.unpatchify(x)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)                                # (T, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)                    # (M, D/2)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

def _imagenet(depth: int, hidden: int, heads: int, patch: int) -> DiTConfig:
    return DiTConfig(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)


DIT_PRESETS: dict[str, DiTConfig] = {
    # The paper's shapes: 256x256 images as 32x32x4 latents, 1000 ImageNet classes, learned sigma.
    "DiT-XL/2": _imagenet(28, 1152, 16, 2),
    "DiT-L/2": _imagenet(24, 1024, 16, 2),
    "DiT-B/2": _imagenet(12, 768, 12, 2),
    "DiT-S/2": _imagenet(12, 384, 6, 2),
    # The embedded model's shape: 16x16 grey digits in pixel space, 64 tokens, 12 layers (DiT-S's depth, so
    # layer-fraction schedules round finely), 10 classes.
    "DiT-Digits": DiTConfig(input_size=16, patch_size=2, in_channels=1, hidden_size=128, depth=12,
                            num_heads=4, num_classes=10, learn_sigma=False),
    # The same at width 160 (5 heads of 32; 22.7 MB of fp32 weights, under issue 14's 25 MB bound).
    "DiT-Digits-W": DiTConfig(input_size=16, patch_size=2, in_channels=1, hidden_size=160, depth=12,
                              num_heads=5, num_classes=10, learn_sigma=False),
    # Tiny shapes for tests.
    "DiT-Tiny": DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4,
                          num_heads=2, num_classes=10, learn_sigma=False),
    "DiT-Tiny-Sigma": DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3,
                                num_heads=4, num_classes=1000, learn_sigma=True),
}


def build_dit(preset: str, device: str | torch.device | None = None) -> DiT:
    """Construct a preset by name; `device="meta"` builds the shape without allocating weights."""
    if preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; allowed: {', '.join(DIT_PRESETS)}")
    with torch.device(device or "cpu"):
        return DiT(DIT_PRESETS[preset])
