"""Where a diffusers pipeline is in its denoising: the step index from its scheduler's timesteps, and the noise
levels alpha, sigma of x_t = alpha x0 + sigma eps, for DDPM-type and flow-matching schedulers.

- DDPM-type (DDIM, DPM-Solver, DDPM, CogVideoX's): alpha = sqrt(alphas_cumprod[t]), sigma = sqrt(1 - alphas_cumprod[t]).
- Flow matching (FlowMatchEulerDiscreteScheduler; DPM-Solver / UniPC with use_flow_sigmas; Sana, SD3, Flux,
  Wan, LTX-Video): x_t = (1 - s) x0 + s eps with s = scheduler.sigmas[step], so alpha = 1 - s, sigma = s.

In both the schedule SNR the gate reads is alpha^2 / sigma^2 (dqar.method.stats.schedule_snr); for flow
matching that is ((1 - s) / s)^2: 0 at pure noise (s = 1), growing without bound as s -> 0 (capped by the
1e-12 floor on sigma^2). The model's x0 prediction, for the x0-form SNR, follows the prediction type: epsilon
x0 = (x - sigma eps) / alpha; v-prediction x0 = alpha x - sigma v; flow (velocity v = eps - x0) x0 = x - s v.
"""
from __future__ import annotations

import torch

# Relative tolerance for a timestep that went through half precision or a 1/1000 rescale (Flux passes t/1000
# in the model's dtype; bf16 keeps 8 significant bits, a relative error up to 2^-9).
TIMESTEP_RTOL = 4e-3


def match_step(t_val: float, timesteps: list[float]) -> int | None:
    """Index of `t_val` in the scheduler's timesteps: exact, else the unique nearest one within the tolerance of
    a half-precision round trip, at scale 1 or 1000 (pipelines that feed the model t / 1000)."""
    if t_val in timesteps:
        return timesteps.index(t_val)
    if not timesteps:
        return None
    for scale in (1.0, 1000.0):
        v = t_val * scale
        dist = [abs(s - v) for s in timesteps]
        i = min(range(len(dist)), key=dist.__getitem__)
        neighbours = [abs(timesteps[j] - timesteps[i]) for j in (i - 1, i + 1) if 0 <= j < len(timesteps)]
        gap = min([d for d in neighbours if d > 0], default=float("inf"))
        if dist[i] <= max(TIMESTEP_RTOL * abs(timesteps[i]), 1e-6) and dist[i] < gap / 2:
            return i
    return None


def is_flow_matching(scheduler) -> bool:
    cfg = getattr(scheduler, "config", None)
    if getattr(cfg, "use_flow_sigmas", False) or getattr(cfg, "prediction_type", None) == "flow_prediction":
        return True
    return getattr(scheduler, "alphas_cumprod", None) is None and getattr(scheduler, "sigmas", None) is not None


def prediction_kind(scheduler) -> str:
    """'flow', 'epsilon', 'v_prediction' or 'sample': what the model's output is."""
    if is_flow_matching(scheduler):
        return "flow"
    return getattr(getattr(scheduler, "config", None), "prediction_type", None) or "epsilon"


def noise_levels(scheduler, step_index: int, t_val: float) -> tuple[float, float]:
    """(alpha, sigma) of the step; see the module docstring."""
    if is_flow_matching(scheduler):
        s = float(scheduler.sigmas[step_index])
        return 1.0 - s, s
    acp = getattr(scheduler, "alphas_cumprod", None)
    if acp is None:
        raise TypeError(f"DQAR cannot read the noise level of {type(scheduler).__name__}: it has neither "
                        "alphas_cumprod (DDPM-type) nor flow-matching sigmas")
    a = acp[int(round(t_val))]
    return float(a.sqrt()), float((1 - a).sqrt())


def x0_prediction(kind: str, x: torch.Tensor, out: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """The model's x0 estimate from its output `out` at x_t = x (see the module docstring)."""
    if kind == "flow":
        return x - sigma * out
    if kind == "v_prediction":
        return alpha * x - sigma * out
    if kind == "sample":
        return out
    return (x - sigma * out) / alpha
