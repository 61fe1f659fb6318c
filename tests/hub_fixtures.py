"""Tiny diffusers pipelines built from config and saved to disk, so tests load them the way a hub id loads.

Everything is seeded and offline: the T5 tokenizer is built in memory from a word list (transformers'
T5Tokenizer takes a Unigram vocab directly), so no sentencepiece model or hub download is needed.
"""
from __future__ import annotations

from pathlib import Path

import torch

# Words the tiny tokenizer knows; anything else becomes <unk>, which still yields a valid token count.
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "house", "on", "the", "hill", "small", "big"]


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    # Two blocks => one downsample: 16x16 images <-> 8x8 latents (vae_scale_factor 2).
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)


def _randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Seeded non-zero weights everywhere: zero-initialised adaLN gates would make every block a no-op.

    std 0.2 makes attention matter enough that reusing it changes some uint8 pixels (at 0.05 it does not).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def build_tiny_dit_pipeline(folder: str | Path) -> Path:
    """A DiTPipeline (2 layers, 2 heads x 8 dims, 8x8x4 latents, 1000 classes) saved under `folder`."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                        out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                        num_embeds_ada_norm=1000)
    _randomize(transformer, seed=1)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=True)
    pipe = DiTPipeline(transformer=transformer, vae=_tiny_vae(), scheduler=scheduler,
                       id2label={0: "tench, Tinca tinca", 1: "goldfish"})
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


def build_tiny_t5_tokenizer():
    from transformers import T5Tokenizer

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    # Unigram scores: one per piece; "▁word" is how sentencepiece marks a word start.
    vocab = specials + [(f"\u2581{w}", -float(i + 1)) for i, w in enumerate(WORDS)] + [("\u2581", -50.0)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_pixart_pipeline(folder: str | Path, sigma: bool = False) -> Path:
    """A PixArtAlphaPipeline (PixArtSigmaPipeline with sigma=True) with a 2-layer T5 encoder and a 2-layer PixArt
    transformer, saved under `folder`."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tiny_t5_tokenizer()
    torch.manual_seed(2)
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                           num_heads=2, pad_token_id=0, eos_token_id=1,
                                           decoder_start_token_id=0)).eval()
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                           out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                           cross_attention_dim=16, caption_channels=16,
                                           use_additional_conditions=False)
    _randomize(transformer, seed=3)
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                            beta_schedule="linear")
    pipeline_class = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = pipeline_class(tokenizer=tokenizer, text_encoder=text_encoder, vae=_tiny_vae(),
                               transformer=transformer, scheduler=scheduler)
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder
