"""Which signal predicts harm (issue 17): single-position forecasts at a chosen cache age, and how well each
candidate signal ranks the final-image error they cause.

The calibration of `policy_training` reuses one (step, layer, branch) from a cache one step old. Here a
position is (step s, layer l, target, CFG branch, forecast order k, age a): at step s that one module (the
attention or MLP output before its adaLN gate, or a whole block's residual) is replaced by the order-k
forecast formed from the outputs it computed at s-(k+1)a, ..., s-2a, s-a (the history an interval-a schedule
keeps), with the library's own forecast (`dqar.method.forecast`); everything else computes. Harm = the final
image's MSE against the uncached image of the same seed.

A reuse at step s changes only steps >= s, so the uncached trajectory is recorded once (latents, block
inputs, module outputs and adaLN gates at every step, by forward hooks) and every position resumes from the
saved latent of its step. Positions with the same step share one batch: copy 0 of the seeds is the unmodified
reference (same batch composition, so the reference is exact), copy c carries position c.

Signals per row, all measured on the uncached trajectory (each defined for s >= max((k+2)a, a+2)):
  entropy       the seed's gate entropy of layer l's attention at its last compute s-a (`trace_generation`)
  log_snr       the seed's gate SNR at step s (schedule form), log
  age           a
  last_rel      ||F^(s-a) - F(s-a)|| / ||F(s-a)||: the forecast error measured at the last compute (age a)
  last_gated    ||g * (F^(s-a) - F(s-a))|| / ||x(s-a)||: the same, as error control measures it
  rate_gated    the gated error of an age-1 forecast at the last compute (history s-a-(k+1) .. s-a-1)
  input_change  ||x_l(s) - x_l(s-a)|| / ||x_l(s)||: block input since the last compute
  probe         ||r_0(s) - r_0(s-a)|| / ||r_0(s)||: the first block's residual since the last compute
  now_rel, now_gated  the same errors of the forecast actually used at s (oracle: needs the fresh output)
  cfg_weight    |coefficient| of the branch in guidance: s for cond, s - 1 for uncond
and products of these (`COMBOS`). Model family: the project's DiT (forward(x, t, y), [cond | uncond] batches).
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from dqar.harness.policy_training import per_image_mse, psnr_from_mse, trace_generation
from dqar.method.cache import CacheEntry
from dqar.method.forecast import advance, extrapolate
from dqar.method.layouts import find_layout
from dqar.method.quant import Unquantized
from dqar.sampling import BRANCHES_CFG, BRANCHES_COND, guide, make_scheduler, sample

TARGETS = ("attn", "mlp", "block")
_TINY = 1e-12


# ------------------------------------------------------------------------------------------------
# the recorded uncached trajectory
# ------------------------------------------------------------------------------------------------

@dataclass
class Trajectory:
    labels: list
    seeds: list
    steps: int
    sampler: str
    cfg_scale: float
    branches: tuple
    latents: dict          # step -> (N, C, H, W) the sampler's x entering that step
    image: torch.Tensor    # (N, C, H, W) the uncached result
    inputs: dict           # (layer, step) -> (B, T, D) block input, B = N * branches, [cond | uncond]
    outputs: dict          # (target, layer, step) -> (B, T, D): attn / mlp output before its gate; block residual
    gates: dict            # (target, layer, step) -> (B, D) adaLN gate of attn / mlp

    @property
    def layers(self) -> int:
        return 1 + max(layer for layer, _ in self.inputs)

    def rows(self, branch: str) -> slice:
        n = len(self.seeds)
        i = self.branches.index(branch)
        return slice(i * n, (i + 1) * n)


class _Recorder:
    """Forward hooks that copy every block's input, residual, attn/mlp outputs and gates, per sampler step."""

    def __init__(self, model: torch.nn.Module):
        self.step = -1
        self.latents, self.inputs, self.outputs, self.gates = {}, {}, {}, {}
        layout = find_layout(model)
        self.handles = []
        for layer, block in enumerate(layout.blocks(model)):
            self.handles.append(block.register_forward_pre_hook(self._pre(layer)))
            self.handles.append(block.register_forward_hook(self._post(layer)))
            for target, module in layout.targets(block).items():
                if target != "block":
                    self.handles.append(module.register_forward_hook(self._out(target, layer)))
            source = layout.gate_source(block) if layout.gate_source is not None else None
            if source is not None:
                module, read = source
                self.handles.append(module.register_forward_hook(self._gate(layer, read)))

    def _pre(self, layer):
        def hook(_m, args):
            self.inputs[(layer, self.step)] = args[0].detach().float().clone()
        return hook

    def _post(self, layer):
        def hook(_m, _args, out):
            self.outputs[("block", layer, self.step)] = out.detach().float() - self.inputs[(layer, self.step)]
        return hook

    def _out(self, target, layer):
        def hook(_m, _args, out):
            self.outputs[(target, layer, self.step)] = out.detach().float().clone()
        return hook

    def _gate(self, layer, read):
        def hook(_m, _args, out):
            for target, g in read(out).items():
                self.gates[(target, layer, self.step)] = g.detach().float().clone()
        return hook

    def on_step_begin(self, info) -> None:
        self.step = info.step_index
        self.latents[info.step_index] = info.x.detach().clone()

    def on_step_end(self, info) -> None:
        pass

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def record_trajectory(model: torch.nn.Module, labels: Sequence[int], seeds: Sequence[int], *, steps: int,
                      sampler: str = "ddim", cfg_scale: float = 1.5) -> Trajectory:
    """One uncached batched generation with every quantity the study reads, recorded by forward hooks."""
    if sampler != "ddim":
        raise ValueError(f"sampler={sampler!r}: resuming from a saved latent needs a stateless scheduler (ddim)")
    rec = _Recorder(model)
    try:
        image = sample(model, list(labels), list(seeds), steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                       observers=[rec])
    finally:
        rec.remove()
    branches = BRANCHES_CFG if cfg_scale != 1.0 else BRANCHES_COND
    return Trajectory(list(labels), list(seeds), steps, sampler, cfg_scale, branches, rec.latents, image,
                      rec.inputs, rec.outputs, rec.gates)


# ------------------------------------------------------------------------------------------------
# positions, forecasts, resumed runs
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Position:
    step: int
    layer: int
    target: str
    branch: str
    order: int
    age: int

    def history(self, at: int | None = None, spacing: int | None = None) -> list[int]:
        """Computed steps an order-k forecast of step `at` uses, `spacing` apart, oldest first."""
        at = self.step if at is None else at
        spacing = self.age if spacing is None else spacing
        return [at - j * spacing for j in range(self.order + 1, 0, -1)]


def first_valid_step(order: int, age: int) -> int:
    """Every signal is defined from here on: the forecast at s-a needs computes down to s-(k+2)a, and the
    policy traces hold the entropy from step 2 on (`policy_rows` drops step 1, which has no predecessor row)."""
    return max((order + 2) * age, age + 2)


def draw_positions(*, steps: int, layers: int, branches: Sequence[str], targets: Sequence[str],
                   orders: Sequence[int], ages: Sequence[int], per_group: int, seed: int = 0) -> list[Position]:
    """`per_group` distinct positions per (target, order, age), uniformly over the valid (step, layer, branch)."""
    rng = random.Random(seed)
    out = []
    for target in targets:
        for order in orders:
            for age in ages:
                valid = [(s, layer, b) for s in range(first_valid_step(order, age), steps)
                         for layer in range(layers) for b in branches]
                if per_group > len(valid):
                    raise ValueError(f"per_group={per_group} exceeds the {len(valid)} valid positions of "
                                     f"target {target}, order {order}, age {age}")
                out += [Position(s, layer, target, b, order, age) for s, layer, b in sorted(rng.sample(valid, per_group))]
    return out


def forecast_from(history: Sequence[tuple[int, torch.Tensor]], step: int, order: int) -> torch.Tensor:
    """The library's order-`order` forecast of `step` from computed (position, output) pairs, oldest first."""
    entry = None
    for pos, tensor in history:
        out, d1, d2, steps = advance(entry, tensor, pos, order, lambda x, _slot: Unquantized(x))
        entry = CacheEntry(0, "", "", pos, output=out, d1=d1, d2=d2, steps=steps)
    return extrapolate(entry, step, order, torch.float32)


def position_forecast(traj: Trajectory, pos: Position, at: int | None = None,
                      spacing: int | None = None) -> torch.Tensor:
    """(N, T, D) forecast of pos's module at step `at` (default pos.step) for pos's branch rows."""
    rows = traj.rows(pos.branch)
    at = pos.step if at is None else at
    hist = [(h, traj.outputs[(pos.target, pos.layer, h)][rows]) for h in pos.history(at, spacing)]
    return forecast_from(hist, at, pos.order)


@torch.no_grad()
def resume(model: torch.nn.Module, traj: Trajectory, start: int, positions: Sequence[Position]) -> torch.Tensor:
    """(1 + P, N, C, H, W): the trajectory resumed from the saved latent of step `start`, copy 0 unmodified,
    copy c with position c-1 (all at step `start`) forecast instead of computed; the sampler loop of
    `dqar.sampling` (which it reproduces bit for bit when nothing is replaced)."""
    if any(p.step != start for p in positions):
        raise ValueError(f"every position of a resumed batch must be at its start step {start}")
    n, copies = len(traj.seeds), 1 + len(positions)
    scheduler = make_scheduler(traj.sampler)
    scheduler.set_timesteps(traj.steps)
    null_class = model.config.num_classes
    channels = traj.image.shape[1]
    use_cfg = traj.cfg_scale != 1.0
    x = traj.latents[start].repeat(copies, 1, 1, 1)
    y = torch.tensor(traj.labels * copies, dtype=torch.long)
    y_in = torch.cat([y, torch.full_like(y, null_class)]) if use_cfg else y
    armed = [True]
    handles = _install_forecasts(model, traj, positions, copies, armed)
    try:
        for i in range(start, traj.steps):
            t = scheduler.timesteps[i]
            x_in = torch.cat([x, x]) if use_cfg else x
            t_in = torch.full((x_in.shape[0],), int(t), dtype=torch.long)
            out = model(scheduler.scale_model_input(x_in, t), t_in, y_in).float()
            armed[0] = False
            if use_cfg:
                out = guide(*out.chunk(2), traj.cfg_scale, channels)
            x = scheduler.step(out[:, :channels], t, x).prev_sample
    finally:
        for h in handles:
            h.remove()
    return x.reshape(copies, n, *x.shape[1:])


def _install_forecasts(model, traj: Trajectory, positions: Sequence[Position], copies: int, armed: list) -> list:
    layout = find_layout(model)
    blocks = layout.blocks(model)
    n = len(traj.seeds)
    per_module = defaultdict(list)
    for c, pos in enumerate(positions, 1):
        start = traj.branches.index(pos.branch) * copies * n + c * n
        per_module[(pos.target, pos.layer)].append((slice(start, start + n), position_forecast(traj, pos)))

    def hook_for(target, items):
        def hook(_m, args, out):
            if not armed[0]:
                return None
            out = out.clone()
            for rows, pred in items:
                out[rows] = (args[0][rows] + pred if target == "block" else pred).to(out.dtype)
            return out
        return hook

    handles = []
    for (target, layer), items in per_module.items():
        module = layout.targets(blocks[layer])[target]
        handles.append(module.register_forward_hook(hook_for(target, items)))
    return handles


# ------------------------------------------------------------------------------------------------
# signals and labels
# ------------------------------------------------------------------------------------------------

def rel_change(now: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
    """(N,) ||now - then|| / ||now|| per sample."""
    return (now - then).flatten(1).norm(dim=1) / (now.flatten(1).norm(dim=1) + _TINY)


def forecast_errors(traj: Trajectory, pos: Position, at: int, spacing: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(relative, gated) per-sample error of pos's forecast of step `at` from computes `spacing` apart:
    ||F^ - F|| / ||F|| and ||g (F^ - F)|| / ||x|| (g = 1 for the block target), as error control measures it."""
    rows = traj.rows(pos.branch)
    fresh = traj.outputs[(pos.target, pos.layer, at)][rows]
    delta = position_forecast(traj, pos, at, spacing) - fresh
    rel = delta.flatten(1).norm(dim=1) / (fresh.flatten(1).norm(dim=1) + _TINY)
    gate = traj.gates.get((pos.target, pos.layer, at))
    if gate is not None:
        delta = delta * gate[rows].unsqueeze(1)
    gated = delta.flatten(1).norm(dim=1) / (traj.inputs[(pos.layer, at)][rows].flatten(1).norm(dim=1) + _TINY)
    return rel, gated


def cfg_weight(branch: str, cfg_scale: float) -> float:
    """|coefficient| of a branch's prediction in cond + (s - 1)(cond - uncond)."""
    if cfg_scale == 1.0:
        return 1.0
    return abs(cfg_scale) if branch == "cond" else abs(cfg_scale - 1.0)


def trace_signals(model, traj: Trajectory) -> dict:
    """(seed, step, layer, branch) -> (entropy, log_snr) from the seed's traced runs (batch 1 per seed)."""
    out = {}
    for label, seed in zip(traj.labels, traj.seeds):
        rows, _ = trace_generation(model, label, seed, steps=traj.steps, sampler=traj.sampler,
                                   cfg_scale=traj.cfg_scale)
        for r in rows:
            out[(seed, r["step"], r["layer"], r["branch"])] = (r["entropy_now"], r["log_snr"])
    return out


def position_signals(traj: Trajectory, trace: dict, pos: Position) -> dict[str, list]:
    """Every signal of `pos`, one value per seed."""
    s, a, rows = pos.step, pos.age, traj.rows(pos.branch)
    last_rel, last_gated = forecast_errors(traj, pos, s - a, a)
    _, rate_gated = forecast_errors(traj, pos, s - a, 1)
    now_rel, now_gated = forecast_errors(traj, pos, s, a)
    x_now, x_then = traj.inputs[(pos.layer, s)][rows], traj.inputs[(pos.layer, s - a)][rows]
    r_now, r_then = traj.outputs[("block", 0, s)][rows], traj.outputs[("block", 0, s - a)][rows]
    n = len(traj.seeds)
    sig = {
        "entropy": [trace[(seed, s - a, pos.layer, pos.branch)][0] for seed in traj.seeds],
        "log_snr": [trace[(seed, s, pos.layer, pos.branch)][1] for seed in traj.seeds],
        "age": [float(a)] * n,
        "last_rel": last_rel.tolist(), "last_gated": last_gated.tolist(), "rate_gated": rate_gated.tolist(),
        "input_change": rel_change(x_now, x_then).tolist(), "probe": rel_change(r_now, r_then).tolist(),
        "now_rel": now_rel.tolist(), "now_gated": now_gated.tolist(),
        "cfg_weight": [cfg_weight(pos.branch, traj.cfg_scale)] * n,
    }
    return sig


# Products of signals: name -> (signal, exponent of age as a function of order, multiply by cfg_weight)
COMBOS = {
    "last_gated*w": ("last_gated", None, True),
    "rate_gated*age^(k+1)": ("rate_gated", 1, False),
    "rate_gated*age^(k+1)*w": ("rate_gated", 1, True),
    "input_change*w": ("input_change", None, True),
    "now_gated*w": ("now_gated", None, True),
}


def add_combos(row: dict) -> dict:
    for name, (base, age_power, weighted) in COMBOS.items():
        v = row[base]
        if age_power is not None:
            v *= row["age"] ** (age_power * (row["order"] + 1))
        if weighted:
            v *= row["cfg_weight"]
        row[name] = v
    return row


def run_study(model: torch.nn.Module, labels: Sequence[int], seeds: Sequence[int], *, steps: int = 50,
              cfg_scale: float = 1.5, targets: Sequence[str] = TARGETS, orders: Sequence[int] = (0, 2),
              ages: Sequence[int] = (1, 2, 3, 4), per_group: int = 40, max_batch: int = 24, seed: int = 0,
              progress=None) -> tuple[list[dict], dict]:
    """Rows (one per position and seed: the position, every signal, the harm) and the run's metadata."""
    traj = record_trajectory(model, labels, seeds, steps=steps, cfg_scale=cfg_scale)
    trace = trace_signals(model, traj)
    positions = draw_positions(steps=steps, layers=traj.layers, branches=traj.branches, targets=targets,
                               orders=orders, ages=ages, per_group=per_group, seed=seed)
    by_step = defaultdict(list)
    for p in positions:
        by_step[p.step].append(p)
    rows, ref_dev, done = [], 0.0, 0
    for s in sorted(by_step):
        for k in range(0, len(by_step[s]), max_batch):
            chunk = by_step[s][k:k + max_batch]
            images = resume(model, traj, s, chunk)
            ref_dev = max(ref_dev, float(per_image_mse(images[0], traj.image).max()))
            for c, pos in enumerate(chunk, 1):
                mse = per_image_mse(images[c], images[0]).tolist()
                sig = position_signals(traj, trace, pos)
                for i, (label, sd) in enumerate(zip(traj.labels, traj.seeds)):
                    row = {**asdict(pos), "seed": sd, "class_label": label, "mse": mse[i],
                           "psnr": psnr_from_mse(mse[i])}
                    row.update({name: float(v[i]) for name, v in sig.items()})
                    rows.append(add_combos(row))
            done += len(chunk)
            if progress:
                progress(done, len(positions))
    meta = {"positions": len(positions), "rows": len(rows), "steps": steps, "cfg_scale": cfg_scale,
            "sampler": traj.sampler, "labels": list(labels), "seeds": list(seeds), "targets": list(targets),
            "orders": list(orders), "ages": list(ages), "per_group": per_group, "position_seed": seed,
            "reference_max_mse_vs_uncached": ref_dev}
    return rows, meta
