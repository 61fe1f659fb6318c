"""Tiny text-to-image diffusers pipelines (SD3, Flux, Sana, HunyuanDiT) assembled from local parts and saved to a
folder, so tests load them through `DiffusionPipeline.from_pretrained` as a hub id would load.

Every part is built from a small config with seeded weights: CLIP, T5, Gemma2 and BERT text encoders, their
tokenizers made in memory from a character or word vocabulary (no sentencepiece model, no download), a tiny VAE
with one downsample (16x16 images <-> 8x8 latents) and the transformers of tests/family_fixtures.py's shapes.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch

from hub_fixtures import _randomize, _tiny_vae, build_tiny_t5_tokenizer

# CLIP's tokenizer reads 77 positions; the text encoders must embed as many.
CLIP_LENGTH = 77


def build_tiny_clip_tokenizer():
    """Byte-level BPE without merges over lowercase letters: every letter is one token, '</w>' marks a word end."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_LENGTH)


def _clip(tokenizer, hidden: int, projection: int | None, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=CLIP_LENGTH,
                            projection_dim=projection or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def _t5(tokenizer, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model,
                                   num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)).eval()


def _vae(shift: float | None = None):
    vae = _tiny_vae()
    if shift is not None:
        # SD3 and Flux decode (latents / scaling) + shift: their VAE config carries a shift factor.
        vae.register_to_config(shift_factor=shift)
    return vae


def _save(pipe, folder) -> Path:
    folder = Path(folder)
    pipe.save_pretrained(folder)
    return folder


def build_tiny_sd3_pipeline(folder) -> Path:
    """StableDiffusion3Pipeline: two CLIP encoders (hidden 8, projection 4) and a T5 (d_model 16) feeding a 3-layer
    SD3 transformer; CLIP states (8 + 8) pad to the T5 width, pooled projections (4 + 4) make its 8."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip = build_tiny_clip_tokenizer()
    t5 = build_tiny_t5_tokenizer()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                        pos_embed_max_size=16)
    _randomize(transformer, seed=5)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(shift=0.0),
        text_encoder=_clip(clip, 8, 4, seed=1), tokenizer=clip, text_encoder_2=_clip(clip, 8, 4, seed=2),
        tokenizer_2=clip, text_encoder_3=_t5(t5, 16, seed=3), tokenizer_3=t5)
    return _save(pipe, folder)


def build_tiny_flux_pipeline(folder, guidance: bool = True) -> Path:
    """FluxPipeline: CLIP (hidden 8 = the pooled projection) and T5 (d_model 16 = the joint attention width)
    feeding a Flux transformer with 2 double- and 2 single-stream blocks; `guidance` gives it the distilled
    guidance embedding (FLUX.1-dev) or not (FLUX.1-schnell). Latents pack 2x2: 4 VAE channels -> 16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip = build_tiny_clip_tokenizer()
    t5 = build_tiny_t5_tokenizer()
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=8, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))
    _randomize(transformer, seed=5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_vae(shift=0.0),
                        text_encoder=_clip(clip, 8, None, seed=1), tokenizer=clip,
                        text_encoder_2=_t5(t5, 16, seed=3), tokenizer_2=t5)
    return _save(pipe, folder)


def build_tiny_gemma_tokenizer():
    """Sana's Gemma tokenizer over single characters ('▁' marks a space), without merges."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "\u2581": 5}
    for c in string.ascii_lowercase:
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[])


def build_tiny_sana_pipeline(folder) -> Path:
    """SanaPipeline: a 1-layer Gemma2 encoder (hidden 16), a DC autoencoder with two downsamples (Sana wants sizes
    in multiples of 32: 32x32 images <-> 8x8 latents) and a 3-layer Sana transformer, with its flow-matching
    DPM-Solver."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    tokenizer = build_tiny_gemma_tokenizer()
    torch.manual_seed(1)
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=8, pad_token_id=0, bos_token_id=2, eos_token_id=1)).eval()
    torch.manual_seed(0)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=4, encoder_block_types="ResBlock",
                        decoder_block_types="ResBlock", encoder_block_out_channels=(8, 8, 8),
                        decoder_block_out_channels=(8, 8, 8), encoder_layers_per_block=(1, 1, 1),
                        decoder_layers_per_block=(1, 1, 1), encoder_qkv_multiscales=((), (), ()),
                        decoder_qkv_multiscales=((), (), ()), decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.4)
    transformer = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=3, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                         cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1)
    _randomize(transformer, seed=5)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
                        scheduler=scheduler)
    return _save(pipe, folder)


def build_tiny_bert_tokenizer():
    from hub_fixtures import WORDS
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(specials + WORDS)})


def build_tiny_hunyuandit_pipeline(folder) -> Path:
    """HunyuanDiTPipeline: a 1-layer BERT (hidden 8, its 77 tokens) and a T5 (d_model 8, 256 tokens) feeding a
    4-layer HunyuanDiT, with its DDPM scheduler config (v-prediction)."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel

    bert_tok, t5_tok = build_tiny_bert_tokenizer(), build_tiny_t5_tokenizer()
    torch.manual_seed(1)
    bert = BertModel(BertConfig(vocab_size=len(bert_tok), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16, max_position_embeddings=80)).eval()
    torch.manual_seed(0)
    transformer = HunyuanDiT2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                                    num_attention_heads=2, cross_attention_dim=8, cross_attention_dim_t5=8,
                                    pooled_projection_dim=4, hidden_size=16, text_len=77, text_len_t5=256,
                                    activation_fn="gelu-approximate")
    _randomize(transformer, seed=5)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.03,
                              prediction_type="v_prediction", clip_sample=False, steps_offset=1)
    pipe = HunyuanDiTPipeline(vae=_vae(), text_encoder=bert, tokenizer=bert_tok, transformer=transformer,
                              scheduler=scheduler, safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=_t5(t5_tok, 8, seed=3),
                              tokenizer_2=t5_tok)
    return _save(pipe, folder)


def build_tiny_wan_pipeline():
    """WanPipeline in memory (its from_pretrained needs accelerate for the fp32-kept modules): a 1-layer UMT5, a Wan
    VAE with 16 latent channels (its latent statistics have 16 entries) and a 3-layer Wan transformer. Wan runs
    classifier-free guidance as two transformer calls per step."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_t5_tokenizer()
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, pad_token_id=0, eos_token_id=1,
                                               decoder_start_token_id=0)).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=16, out_channels=16, text_dim=16, freq_dim=16, ffn_dim=32,
                                        num_layers=3, rope_max_seq_len=32)
    _randomize(transformer, seed=5)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_cogvideox_pipeline(folder) -> Path:
    """CogVideoXPipeline: a T5 (d_model 16), a CogVideoX VAE with 8x spatial and 4x temporal compression, and a
    3-layer CogVideoX transformer; 9 frames of 16x16 make 3 latent frames of 2x2."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)

    tokenizer = build_tiny_t5_tokenizer()
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=16, num_layers=3,
                                              sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=8)
    _randomize(transformer, seed=5)
    scheduler = CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                       rescale_betas_zero_snr=True)
    pipe = CogVideoXPipeline(tokenizer=tokenizer, text_encoder=_t5(tokenizer, 16, seed=3), vae=vae,
                             transformer=transformer, scheduler=scheduler)
    return _save(pipe, folder)


def build_tiny_ltx_pipeline(folder) -> Path:
    """LTXPipeline: a T5 (d_model 16), an LTX VAE with 4x spatial and temporal compression (32x32 x 9 frames make
    8x8 x 3 latents) and a 3-layer LTX transformer, with its flow-matching Euler scheduler."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel

    tokenizer = build_tiny_t5_tokenizer()
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
                                upsample_factor=(1,) * 4, timestep_conditioning=False, patch_size=1, patch_size_t=1,
                                encoder_causal=True, decoder_causal=False)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                             num_layers=3, caption_channels=16)
    _randomize(transformer, seed=5)
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_t5(tokenizer, 16, seed=3),
                       tokenizer=tokenizer, transformer=transformer)
    return _save(pipe, folder)
