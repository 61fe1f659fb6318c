"""The stack target: one cached residual for the whole chain of blocks, skipped in one piece.

When every block forecasts at the same steps (an interval schedule, the adaptive schedule's step scope),
forecasting each block's residual and adding them up is the same as forecasting their sum, the stack's
residual (last block's output minus first block's input), because extrapolation is linear. Keeping only
the sum needs 1/L of the block target's history memory, and a skipped step costs one forecast instead of
L of them and nothing per block but a call that hands its input on: on a small model the per-block
forecasts and bookkeeping are what keeps the block target's wall-clock speedup below its FLOP bound.

The decision is taken at the first block: if every CFG branch may forecast, the first block returns its
input plus the forecast residual and the other blocks pass their input through unchanged; otherwise the
blocks run as usual and the last one commits the new residual. Branches that disagree (one forecasts,
the other must compute) all compute: the stack cannot run for half the batch without splitting every
block's call. Only for layouts whose blocks form one chain of single-tensor blocks (the caller checks).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .controller import DQARController
from .flops import FlopProfiler
from .layouts import block_streams
from .stats import per_sample_norm
from .streams import hidden_states

STACK_LAYER = 0          # the stack's cache entries and counters live under layer 0, target "stack"


class StackState:
    """What the stack's block hooks share within one forward."""

    def __init__(self, num_blocks: int):
        self.last = num_blocks - 1
        self.stack_input: torch.Tensor | None = None   # first block's input, while a computing forward runs
        self.skipping = False                          # this forward's first block returned the forecast


class StackHook:
    """Installed as one block's forward; `index` is its position in the chain."""

    def __init__(self, ctl: DQARController, flops: FlopProfiler, index: int, block: nn.Module, state: StackState):
        self.ctl, self.flops, self.index, self.state = ctl, flops, index, state
        self.original = block.forward

    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        if not self.ctl.active:
            return self.original(*args, **kwargs)
        if self.flops.measuring:
            # Every block adds its FLOPs to the one ("stack", 0) entry a skipped step saves.
            return self.flops.module_call("stack", STACK_LAYER, lambda: self._run(args, kwargs), accumulate=True)
        return self._run(args, kwargs)

    def _run(self, args, kwargs):
        state = self.state
        if self.index == 0:
            x = hidden_states(args, kwargs)
            forecast = self._forecast(x)
            state.skipping = forecast is not None
            if state.skipping:
                return forecast
            state.stack_input = x
        elif state.skipping:
            return hidden_states(args, kwargs)
        out = self.original(*args, **kwargs)
        if self.index == state.last:
            self._commit(out, state.stack_input)
            state.stack_input = None
        return out

    def _forecast(self, x: torch.Tensor) -> torch.Tensor | None:
        """The stack's output for this step from the cache, or None when the stack must run."""
        ctl = self.ctl
        branches = ctl.branches
        n = x.shape[0]
        if n % len(branches):
            raise ValueError(f"DQAR: a batch of {n} does not split into the step's branches {branches}; "
                             "under CFG the model must see [cond | uncond] halves of equal size")
        decisions = [ctl.should_reuse(STACK_LAYER, b, "stack") for b in branches]
        if not all(d.use_cache for d in decisions):
            return None
        b = n // len(branches)
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for i, d in enumerate(decisions):
            if d.entry.output.shape[0] != b:
                raise RuntimeError(
                    f"DQAR: the stack cached a batch of {d.entry.output.shape[0]} per branch but this step runs "
                    f"{b}; the batch size must stay the same for a whole generation (start a new one at step 0)")
            ctl.reuse(d.entry, out[i * b:(i + 1) * b])
        return out.add_(x).to(x.dtype)

    def _commit(self, out: torch.Tensor, stack_input: torch.Tensor) -> None:
        ctl = self.ctl
        residual = out - stack_input
        branches = ctl.branches
        chunks = residual.chunk(len(branches)) if len(branches) > 1 else (residual,)
        # The error control weighs a forecast's error against the stack's own contribution, its residual: against
        # the stack input (noise-dominated early, large late) it under-weighs the last steps, where an error
        # lands in the image with little left to correct it (on the embedded model 43.8 dB at work 0.34
        # against 50.0 dB at 0.32 for the residual, 20 images).
        norms = per_sample_norm(residual) if ctl.error_control is not None else None
        start = 0
        for branch, chunk in zip(branches, chunks):
            stop = start + chunk.shape[0]
            effect = (None, norms[start:stop]) if norms is not None else None
            ctl.commit(STACK_LAYER, branch, output=chunk, target="stack", effect=effect)
            start = stop


def stack_problem(layout, blocks: list, model: nn.Module) -> str | None:
    """Why the stack target cannot run on this model, or None: it needs one chain of blocks whose outputs
    are single tensors (two-stream blocks and two block lists, as in Flux and SD3, keep the block target)."""
    lists = [attr for attr in layout.blocks_attr if isinstance(getattr(model, attr, None), nn.ModuleList)]
    if len(lists) > 1:
        return f"{type(model).__name__} runs two block lists ({', '.join(lists)})"
    two_stream = sorted({type(b).__name__ for b in blocks if block_streams(b) is not None})
    if two_stream:
        return f"its {', '.join(two_stream)} blocks return two streams"
    return None
