"""What error control needs to know about a block in the current forward: its input's size and its gates.

A module's forecast error matters by its effect on the block it sits in: the error of the attention or
MLP output times the adaLN gate that scales it, relative to the block input it is added to. A
`BlockProbe` records both with ordinary forward hooks (installed only for the adaptive schedule and policy v2,
and removed with DQAR): the per-sample norm of the block input, and the gates where the layout says where to
read them (gate 1 where it does not). Measuring every image, the norms of the whole input are taken once, when a
module first asks; measuring `images` of each branch (the config's `error_images`), the norm waits: `effect`
hands out the rows (`InputRows`) and the error control reduces them with the step's others
(dqar.method.error_control).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from .layouts import BlockLayout
from .stats import per_sample_norm, spread_rows

_ALL = slice(None)


class InputRows:
    """Rows of a block input whose per-sample norms are wanted once the step is over (a plain class: one is
    made per measured module and branch, where a dataclass's init shows)."""

    __slots__ = ("rows", "version", "probe", "sampled")

    def __init__(self, rows: torch.Tensor, version: int, probe: "BlockProbe", sampled: bool = False):
        self.rows = rows            # a view of the block input
        self.version = version      # the input's version counter when the view was taken
        self.probe = probe
        self.sampled = sampled      # already the measured images (and the gate handed out with it too)

    def cut(self, rows: slice) -> "InputRows":
        return InputRows(self.rows[rows], self.version, self.probe)

    def changed(self) -> bool:
        """Whether the input was written in place since: its norm is then of the changed tensor (this once;
        the probe takes later norms on entry)."""
        if self.rows._version == self.version:
            return False
        self.probe._eager = True
        return True


@functools.lru_cache(maxsize=256)
def measured_rows(start: int, stop: int, images: int) -> slice:
    """Batch rows start:stop's measured images (dqar.method.stats.spread_rows), as rows of the whole batch."""
    rows = spread_rows(stop - start, images)
    return slice(start, stop) if rows == _ALL else slice(start + rows.start, start + rows.stop, rows.step)


class BlockProbe:
    def __init__(self, block: nn.Module, layout: BlockLayout, images: int = 0):
        self.images = images
        self._input: torch.Tensor | None = None           # the block input, until its norm is asked for
        self._input_version = 0
        self._input_norm: torch.Tensor | None = None
        self._eager = False                                # a block that changed its input in place: norm on entry
        self.gates: dict[str, torch.Tensor] = {}          # target -> (N, D) adaLN gate
        self._sampled: dict[tuple, tuple] = {}            # (start, stop) -> (InputRows, rows) of this forward
        self._handles = [block.register_forward_pre_hook(self._record_input, with_kwargs=True),
                         block.register_forward_hook(self._release_input)]
        source = layout.gate_source(block) if layout.gate_source is not None else None
        if source is not None:
            module, read = source
            self._handles.append(module.register_forward_hook(
                lambda _module, _args, out: self.gates.update(read(out))))

    def _record_input(self, _module, args, kwargs):
        # The norm is formed only when a module of the block computes and measures (a block whose modules all
        # forecast never needs it), and then with the step's other norms.
        x = args[0] if args else kwargs["hidden_states"]
        self.gates = {}
        self._sampled = {}
        if self._eager or x.is_inference():
            # An inference-mode tensor keeps no version counter, so an in-place write could not be noticed.
            self._input, self._input_norm = None, per_sample_norm(x)
            return
        self._input, self._input_version, self._input_norm = x, x._version, None

    def _release_input(self, _module, _args, _out):
        # The modules measured inside the block's forward; what they measure on, the error control holds (within
        # its byte budget) and the probe lets go.
        self._input = None

    @property
    def input_norm(self) -> torch.Tensor | None:
        """(N,) per-sample ||x|| of the block input of the current forward."""
        if self._input_norm is None and self._input is not None:
            if self._input._version != self._input_version:
                # Written in place since the block began: this once the norm is of the changed tensor, and from
                # the next forward on it is taken on entry.
                self._eager = True
            self._input_norm = per_sample_norm(self._input)
            self._input = None
        return self._input_norm

    def effect(self, target: str, start: int, stop: int):
        """(gate or None, block input size) of batch rows start:stop for `target` ("block" has no gate): the
        size is their (n,) norms, or None; with `images`, only the measured images' gate rows and input rows
        (`InputRows`, a view marked `sampled`: each tensor is cut once, and the modules of the block that
        measure the same rows share one)."""
        gate = self.gates.get(target)
        if self.images and self._input is not None and self._input_norm is None:
            held = self._sampled.get((start, stop))
            if held is None:
                rows = measured_rows(start, stop, self.images)
                held = self._sampled[start, stop] = (InputRows(self._input[rows], self._input_version, self, True),
                                                     rows)
            return (gate[held[1]] if gate is not None else None), held[0]
        gate = gate[start:stop] if gate is not None else None
        norm = self.input_norm
        return gate, norm[start:stop] if norm is not None else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
