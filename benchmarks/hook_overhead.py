"""Hook overhead with reuse off on a small Flux and a small SD3 (issue 18: <= 2%), interleaved against the plain model.

Each model is built from a config with seeded random weights (no download), a bit bigger than the test models so
one step takes milliseconds, and run through its pipeline's denoising loop on the bare transformer with the
flow-matching Euler scheduler (SD3 with CFG: one [uncond | cond] batch; Flux with its guidance embedding, one call
per step). Contenders, each its own copy of the same weights so DQAR is applied once, before warm-up (its FLOP
profile is measured in the warm-up run, never in a timed one):

- `plain`: the transformer without DQAR;
- `hooks`: DQAR applied with schedule `none` (every module hooked, nothing can ever be reused or stored);
- `hooks+history` (with --history): schedule `interval` 1, so every module computes at every step and stores its
  output in the cache, as a schedule that reuses later would (the hooks' full bookkeeping, still no reuse).

Every hooked run must return exactly the plain run's latents with zero reuse events, or the script stops: it
times overhead, not reuse. After `--warmup` untimed runs of each, `--rounds` rounds alternate the contenders
(round r starts at contender r mod n); the ratio hooked/plain is taken per round, and its median and spread
(min, quartiles, max over the rounds) are reported. Usage (an idle machine; pin the threads):

    python benchmarks/hook_overhead.py --rounds 21 --steps 20 --threads 4 --history --json hook_overhead.json
    python benchmarks/hook_overhead.py --size tiny --rounds 2 --steps 2     # smoke test only, not a measurement
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
from datetime import date

import torch

from dqar import DQARConfig, apply_dqar
from dqar.harness.timing import interleaved_timing
from dqar.method.hooks import get_controller, get_step_driver

# (layers, single-stream layers, heads, head dim, latent side): "default" makes a step take milliseconds on a CPU,
# "tiny" only checks that the script runs.
SIZES = {"default": (4, 8, 4, 32, 32), "tiny": (1, 1, 2, 8, 8)}


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    # Zero-initialised adaLN gates would make every block a no-op; the timing must include real work.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def build_flux(size: str):
    from diffusers import FluxTransformer2DModel

    layers, single, heads, dim, side = SIZES[size]
    rope = (dim // 4, dim // 4, dim // 2)       # the rotary axes must add up to the head dim
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=layers, num_single_layers=single,
                                   attention_head_dim=dim, num_attention_heads=heads, joint_attention_dim=64,
                                   pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=rope)
    tokens, text = (side // 2) ** 2, 32
    ids = torch.zeros(tokens, 3)
    ids[:, 1] = torch.arange(tokens) // (side // 2)
    ids[:, 2] = torch.arange(tokens) % (side // 2)
    g = torch.Generator().manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(1, text, 64, generator=g),
            "pooled_projections": torch.randn(1, 64, generator=g), "img_ids": ids, "txt_ids": torch.zeros(text, 3),
            "guidance": torch.full((1,), 3.5)}
    # Flux's pipeline feeds t / 1000 and one branch per call.
    return _randomize(model, 5), cond, (1, tokens, 16), 1e-3, None


def build_sd3(size: str):
    from diffusers import SD3Transformer2DModel

    layers, single, heads, dim, side = SIZES[size]
    model = SD3Transformer2DModel(sample_size=side, patch_size=2, in_channels=16, num_layers=layers + single // 2,
                                  attention_head_dim=dim, num_attention_heads=heads, joint_attention_dim=64,
                                  caption_projection_dim=heads * dim, pooled_projection_dim=64, out_channels=16,
                                  pos_embed_max_size=side)
    g = torch.Generator().manual_seed(2)
    text = torch.randn(1, 32, 64, generator=g)
    cond = {"encoder_hidden_states": torch.cat([torch.zeros_like(text), text]),
            "pooled_projections": torch.randn(2, 64, generator=g)}
    return _randomize(model, 5), cond, (1, 16, side, side), 1.0, ("uncond", "cond")


def denoise_loop(model, scheduler, cond, shape, t_scale, branches, steps: int):
    """The pipeline's loop on the bare transformer: noise, `steps` Euler steps, the final latents."""
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    driver = get_step_driver(model)
    with torch.no_grad():
        for t in scheduler.timesteps:
            if driver is not None and branches is not None:
                driver.announce(branches=branches)
            x_in = torch.cat([x] * len(branches)) if branches else x
            out = model(hidden_states=x_in, timestep=(t * t_scale).expand(x_in.shape[0]), return_dict=False,
                        **cond)[0]
            if branches:
                uncond, c = out.chunk(2)
                out = uncond + 4.0 * (c - uncond)
            x = scheduler.step(out, t, x, return_dict=False)[0]
    return x


def measure(name: str, size: str, steps: int, rounds: int, warmup: int, history: bool) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, cond, shape, t_scale, branches = (build_flux if name == "flux" else build_sd3)(size)
    configs = {"hooks": DQARConfig(schedule="none")}
    if history:
        configs["hooks+history"] = DQARConfig(schedule="interval", interval=1, warmup=0.0)
    schedulers = {k: FlowMatchEulerDiscreteScheduler(shift=3.0) for k in ["plain", *configs]}
    models = {"plain": model}
    for key, config in configs.items():
        models[key] = copy.deepcopy(model)
        apply_dqar(models[key], config, scheduler=schedulers[key])

    def runner(key):
        return lambda: denoise_loop(models[key], schedulers[key], cond, shape, t_scale, branches, steps)

    reference = runner("plain")()
    for key in configs:
        out = runner(key)()
        ctl = get_controller(models[key])
        if not torch.equal(out, reference) or ctl.summary()["reuse_events"]:
            raise RuntimeError(f"{name}: {key} changed the latents or reused something; it would not time overhead")
    results = interleaved_timing({k: runner(k) for k in models}, rounds=rounds, warmup_runs=warmup,
                                 measure_memory=False)
    plain = results["plain"].samples
    row = {"model": name, "steps": steps, "plain_ms_per_step": 1000 * statistics.median(plain) / steps}
    for key in configs:
        ratios = sorted(h / p for h, p in zip(results[key].samples, plain))
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        row[key] = {"median_ratio": statistics.median(ratios), "min": ratios[0], "q1": q[0], "q3": q[2],
                    "max": ratios[-1], "ms_per_step": 1000 * statistics.median(results[key].samples) / steps,
                    "ratios": ratios}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="flux,sd3", help="comma list of flux, sd3 (default both)")
    ap.add_argument("--size", default="default", choices=tuple(SIZES), help="model size (tiny: smoke test only)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per run (default 20)")
    ap.add_argument("--rounds", type=int, default=21, help="timed rounds, contenders alternating (default 21)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs of each contender first (default 2)")
    ap.add_argument("--history", action="store_true", help="also time schedule interval 1 (hooks + stored history)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in ("flux", "sd3"):
            ap.error(f"--models has {n!r}; allowed: flux, sd3")
    if min(args.steps, args.rounds) < 1 or args.warmup < 0:
        ap.error("--steps and --rounds must be >= 1, --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = [measure(n, args.size, args.steps, args.rounds, args.warmup, args.history) for n in names]
    where = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    print(f"size {args.size}, {args.steps} steps, {args.rounds} rounds interleaved after {args.warmup} warm-up; "
          f"{where}; {date.today()}")
    print("| model | contender | plain ms/step | hooked ms/step | median hooked/plain | min | q1 | q3 | max |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        for key in [k for k in row if k.startswith("hooks")]:
            r = row[key]
            print(f"| {row['model']} | {key} | {row['plain_ms_per_step']:.2f} | {r['ms_per_step']:.2f} | "
                  f"{r['median_ratio']:.4f} | {r['min']:.4f} | {r['q1']:.4f} | {r['q3']:.4f} | {r['max']:.4f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"size": args.size, "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                       "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
