"""A hooked module's inputs and outputs as the cache sees them: batch slices, streams and one packed tensor.

Most modules DQAR wraps take `hidden_states` first and return one tensor. Joint (MM-DiT) attention and
the blocks of SD3, Flux and CogVideoX return a tuple of an image and a text stream (and SD3's last block
a `None` in place of the text stream). The cache keeps one tensor per (layer, branch, target), so a
tuple is *packed*: every stream is viewed as (batch, tokens, channels) and the streams are joined along
the token axis, which keeps the channel axis (the one per-channel quantization and CSB work on) intact.
`OutputForm` remembers the tuple's layout to unpack it again on reuse. A single tensor is kept as it is,
bit for bit.

A block's residual (the block target) is taken per stream: each output stream minus the input stream it
continues (`hidden_states` or `encoder_hidden_states`), named per block class by the layout.
"""
from __future__ import annotations

import inspect

import torch

# Keyword arguments that are never batched (rotary position tables are per token, not per image): a table
# whose token count happens to equal the batch size must not be sliced as if it were.
UNBATCHED_KWARGS = frozenset({"image_rotary_emb", "rotary_emb", "freqs_cis", "rotary_pos_emb"})


def _cut(v, n, start, stop):
    if isinstance(v, torch.Tensor):
        return v[start:stop] if v.dim() > 0 and v.shape[0] == n else v
    if isinstance(v, dict):
        return {k: _cut(x, n, start, stop) for k, x in v.items()}
    return v


def slice_call(args, kwargs, n, start, stop):
    """Slice every tensor argument (and tensor in a dict argument) whose batch dimension is n."""
    return (tuple(_cut(a, n, start, stop) for a in args),
            {k: (v if k in UNBATCHED_KWARGS else _cut(v, n, start, stop)) for k, v in kwargs.items()})


def hidden_states(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def cat_outputs(outs: list):
    """Join per-branch outputs along the batch: tensors, or tuples of tensors (None stays None)."""
    if len(outs) == 1:
        return outs[0]
    if isinstance(outs[0], tuple):
        return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


class OutputForm:
    """The layout of one module output: a tensor (kept as is) or a tuple of tensors and Nones (packed)."""

    def __init__(self, out):
        self.is_tuple = isinstance(out, tuple)
        if not self.is_tuple:
            return
        if not out or not all(o is None or isinstance(o, torch.Tensor) for o in out):
            raise TypeError(f"DQAR: a hooked module returned {tuple(type(o).__name__ for o in out)}; the cache "
                            "keeps tensors or tuples of tensors only")
        self.size = len(out)
        self.present = [i for i, o in enumerate(out) if o is not None]
        self.shapes = [tuple(out[i].shape[1:]) for i in self.present]
        widths = {s[-1] if s else None for s in self.shapes}
        # Streams sharing their channel width pack as (b, tokens, width); otherwise flat as (b, 1, numel).
        self.channels = widths.pop() if len(widths) == 1 and None not in widths else None

    def _lengths(self) -> list[int]:
        numel = [int(torch.Size(s).numel()) for s in self.shapes]
        return [k // self.channels for k in numel] if self.channels else numel

    def pack(self, out) -> torch.Tensor:
        if not self.is_tuple:
            return out
        parts = [out[i] for i in self.present]
        b = parts[0].shape[0]
        if self.channels:
            return torch.cat([p.reshape(b, -1, self.channels) for p in parts], dim=1)
        return torch.cat([p.reshape(b, 1, -1) for p in parts], dim=2)

    def unpack(self, packed: torch.Tensor):
        if not self.is_tuple:
            return packed
        b = packed.shape[0]
        pieces = packed.split(self._lengths(), dim=1 if self.channels else 2)
        out = [None] * self.size
        for i, piece, shape in zip(self.present, pieces, self.shapes):
            out[i] = piece.reshape(b, *shape)
        return tuple(out)


class BlockStreams:
    """Which input stream each output of a block continues, for the block target's residual."""

    def __init__(self, block, names: tuple[str, ...] | None):
        self.block_name = type(block).__name__
        self.names = names                                 # per output position; None: a single tensor
        self.signature = inspect.signature(block.forward)

    def inputs(self, args, kwargs) -> dict:
        bound = self.signature.bind_partial(*args, **kwargs)
        return dict(bound.arguments)

    def residual(self, out, args, kwargs):
        """Output minus input, per stream (a tuple for tuple outputs)."""
        if not isinstance(out, tuple):
            return out - hidden_states(args, kwargs)
        inputs = self._stream_inputs(out, args, kwargs)
        return tuple(None if o is None else o - x for o, x in zip(out, inputs))

    def add(self, residual, args, kwargs):
        """Input plus a cached residual, per stream: the block's output without running it."""
        if not isinstance(residual, tuple):
            return hidden_states(args, kwargs) + residual
        inputs = self._stream_inputs(residual, args, kwargs)
        return tuple(None if r is None else x + r.to(x.dtype) for r, x in zip(residual, inputs))

    def _stream_inputs(self, out, args, kwargs) -> list:
        if self.names is None or len(self.names) != len(out):
            raise TypeError(f"DQAR: {self.block_name} returns a tuple of {len(out)}, but its layout names no input "
                            "stream for each output; the block target needs one (dqar.method.layouts.BLOCK_STREAMS)")
        given = self.inputs(args, kwargs)
        return [given.get(name) for name in self.names]
