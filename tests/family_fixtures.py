"""Tiny, seeded diffusers transformers of each family DQAR supports, with their real schedulers and conditioning,
and the short denoising loop their pipelines run (timestep in, prediction out, scheduler step).

Nothing is downloaded: every model is built from a small config and given seeded non-zero weights (zero
adaLN gates would make every block a no-op).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from hub_fixtures import _randomize


@dataclass
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    scheduler: Callable[[], object]
    latent_shape: tuple                        # per image
    conditioning: Callable[[int], dict]        # batch size -> the transformer's other inputs
    timestep_scale: float = 1.0                # Flux's pipeline feeds t / 1000
    std: float = 0.2
    extra: dict = field(default_factory=dict)


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _sd3():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=8, out_channels=4, pos_embed_max_size=16)


def _flux(guidance: bool):
    def build():
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                      pooled_projection_dim=8, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))
    return build


def _flux_conditioning(guidance: bool):
    def make(n):
        ids = torch.zeros(16, 3)
        ids[:, 1] = torch.arange(16) // 4
        ids[:, 2] = torch.arange(16) % 4
        kw = {"encoder_hidden_states": _randn(n, 5, 16, seed=11), "pooled_projections": _randn(n, 8, seed=12),
              "img_ids": ids, "txt_ids": torch.zeros(5, 3)}
        if guidance:
            kw["guidance"] = torch.full((n,), 3.5)
        return kw
    return make


def _flow_euler(shift=3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def _pixart_sigma():
    from diffusers import PixArtTransformer2DModel

    # PixArt-Sigma: the alpha architecture with its own conditioning (no additional size conditions).
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                    num_layers=3, sample_size=8, patch_size=2, cross_attention_dim=16,
                                    caption_channels=16, use_additional_conditions=False,
                                    norm_type="ada_norm_single", interpolation_scale=None)


def _dpm(**kw):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                       beta_schedule="linear", **kw)


def _sana():
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                  num_layers=3, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                  cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1)


def _hunyuan():
    from diffusers import HunyuanDiT2DModel

    return HunyuanDiT2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                             num_attention_heads=2, cross_attention_dim=8, cross_attention_dim_t5=8,
                             pooled_projection_dim=4, hidden_size=16, text_len=4, text_len_t5=4,
                             activation_fn="gelu-approximate")


def _hunyuan_conditioning(n):
    return {"encoder_hidden_states": _randn(n, 4, 8, seed=21), "text_embedding_mask": torch.ones(n, 4),
            "encoder_hidden_states_t5": _randn(n, 4, 8, seed=22), "text_embedding_mask_t5": torch.ones(n, 4),
            "image_meta_size": torch.tensor([[1024.0, 1024, 16, 16, 0, 0]] * n), "style": torch.zeros(n, dtype=int),
            "image_rotary_emb": [torch.ones(16, 8), torch.zeros(16, 8)]}


def _cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       time_embed_dim=2, text_embed_dim=8, num_layers=3, sample_width=8,
                                       sample_height=8, sample_frames=8, patch_size=2, temporal_compression_ratio=4,
                                       max_text_seq_length=8)


def _cogvideox_scheduler():
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                  rescale_betas_zero_snr=True)


def _wan():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3,
                                 rope_max_seq_len=32)


def _unipc_flow():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                      cross_attention_dim=16, num_layers=3, caption_channels=16)


FAMILIES = {
    "pixart-sigma": Family("pixart-sigma", _pixart_sigma, lambda: _dpm(), (4, 8, 8),
                           lambda n: {"encoder_hidden_states": _randn(n, 6, 16, seed=31),
                                      "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}),
    "sd3": Family("sd3", _sd3, _flow_euler, (4, 8, 8),
                  lambda n: {"encoder_hidden_states": _randn(n, 5, 16, seed=41),
                             "pooled_projections": _randn(n, 8, seed=42)}),
    "flux": Family("flux", _flux(False), _flow_euler, (16, 16), _flux_conditioning(False), timestep_scale=1e-3),
    "flux-guidance": Family("flux-guidance", _flux(True), _flow_euler, (16, 16), _flux_conditioning(True),
                            timestep_scale=1e-3),
    "sana": Family("sana", _sana, lambda: _dpm(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                flow_shift=3.0), (4, 8, 8),
                   lambda n: {"encoder_hidden_states": _randn(n, 6, 16, seed=51)}),
    "hunyuandit": Family("hunyuandit", _hunyuan, lambda: _dpm(prediction_type="v_prediction"), (4, 8, 8),
                         _hunyuan_conditioning),
    "cogvideox": Family("cogvideox", _cogvideox, _cogvideox_scheduler, (1, 4, 8, 8),
                        lambda n: {"encoder_hidden_states": _randn(n, 8, 8, seed=61)}),
    "wan": Family("wan", _wan, _unipc_flow, (4, 2, 8, 8),
                  lambda n: {"encoder_hidden_states": _randn(n, 6, 16, seed=71)}),
    "ltx": Family("ltx", _ltx, _flow_euler, (16, 8),
                  lambda n: {"encoder_hidden_states": _randn(n, 6, 16, seed=81),
                             "encoder_attention_mask": torch.ones(n, 6), "num_frames": 1, "height": 4, "width": 4}),
}


def build(name: str):
    family = FAMILIES[name]
    torch.manual_seed(0)
    model = family.build().eval()
    _randomize(model, seed=5, std=family.std)
    return family, model, family.scheduler()


@torch.no_grad()
def denoise(family: Family, model, scheduler, *, steps: int = 6, batch: int = 2, seed: int = 0,
            dtype: torch.dtype = torch.float32, cfg: bool = False, guidance_scale: float = 4.0) -> torch.Tensor:
    """The pipeline's loop on the bare transformer: noise, `steps` scheduler steps, the final latents (a learned
    variance, PixArt's second half of the output channels, is dropped as the pipelines do).
    With cfg=True the model sees [uncond | cond] (uncond: zeroed text) and the halves are guided."""
    scheduler.set_timesteps(steps)
    x = torch.randn((batch, *family.latent_shape), generator=torch.Generator().manual_seed(seed))
    x = (x * getattr(scheduler, "init_noise_sigma", 1.0)).to(dtype)
    cond = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in family.conditioning(batch).items()}
    if cfg:
        cond = {k: (torch.cat([torch.zeros_like(v), v]) if k.startswith("encoder_hidden_states") else
                    torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch else v)
                for k, v in cond.items()}
    for t in scheduler.timesteps:
        x_in = torch.cat([x, x]) if cfg else x
        if hasattr(scheduler, "scale_model_input"):
            x_in = scheduler.scale_model_input(x_in, t)
        t_in = (t * family.timestep_scale).expand(x_in.shape[0]).to(dtype)
        out = model(hidden_states=x_in, timestep=t_in, return_dict=False, **cond)[0][:, :x.shape[1]]
        if cfg:
            uncond, c = out.chunk(2)
            out = uncond + guidance_scale * (c - uncond)
        x = scheduler.step(out, t, x, return_dict=False)[0].to(dtype)
    return x
