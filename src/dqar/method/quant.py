"""Symmetric INT8/INT4 storage for cached activations, with channel-wise salience balancing (CSB).

`store(x, bits, ...)` is the one entry point the cache uses: bits 16 keep the tensor as computed
(`Unquantized`, in the model's own dtype), bits 8/4 quantize (`QTensor`). Both answer `.dequantize()`
and `.nbytes`.

Quantization (DESIGN.md): `q = clip(round(x / s), -Q, Q)`, `s = max|x| / Q`, Q = 127 (INT8, int8
storage) or 7 (INT4, two values per uint8 byte). Scales are float32, one per tensor, per last-dim
channel, or per token (row over the last dim). CSB keeps the top-k channels by max|x| in the input's
dtype and quantizes the rest with scales computed on the rest only, so one outlier channel no longer
inflates the step size of every other channel.

Everything is vectorized torch; the only host syncs are the finiteness check and index validation.
"""
from __future__ import annotations

import numbers
import sys
from dataclasses import dataclass

import torch
from torch import Tensor

QMAX = {8: 127, 4: 7}
GRANULARITIES = ("tensor", "channel", "token")


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

def _check_bits(bits, allowed=tuple(QMAX), name: str = "bits") -> None:
    # bool is an int subclass: True must not pass as bits=1, nor 8.0 as 8.
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or int(bits) not in allowed:
        raise ValueError(f"{name}={bits!r} is not supported; allowed values are {sorted(allowed)}")


def _check_granularity(granularity) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not supported; allowed values are {list(GRANULARITIES)}")


def _check_input(x, granularity: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point torch.Tensor, got {got}")
    if x.numel() == 0:
        raise ValueError(f"x must have at least one element, got shape {tuple(x.shape)}")
    if granularity != "tensor" and x.ndim == 0:
        raise ValueError(f"granularity={granularity!r} needs x with a last (channel) dim, got a 0-d tensor")


def _raise_non_finite(what: str) -> None:
    # A single NaN/Inf would become the shared scale and silently zero or poison every other value.
    raise ValueError(f"{what} contains NaN or Inf; refusing to quantize it (allowed: finite values only)")


# --------------------------------------------------------------------------------------------------
# INT4 packing
# --------------------------------------------------------------------------------------------------

def _pack_values(y: Tensor) -> Tensor:
    """Float values in [-8, 7] (flat) -> bytes: element 2i in the low nibble, 2i+1 in the high,
    each as the offset code value + 8. Works on floats so packing is one fused add on the
    quantizer's own buffer; small integers are exact in float32."""
    if y.numel() % 2:
        y = torch.cat([y, y.new_full((1,), -8.0)])  # pad code 0
    pairs = y.view(-1, 2)
    return torch.add(pairs[:, 0], pairs[:, 1], alpha=16).add_(8 + 16 * 8).to(torch.uint8)


def _unpack_codes(packed: Tensor, numel: int) -> Tensor:
    """Bytes -> the first `numel` offset codes 0..15 (flat uint8)."""
    if sys.byteorder != "little":
        return torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(-1)[:numel]
    # Interleave by widening: int16 (hi << 8 | lo) read back as two little-endian bytes is
    # [lo, hi]. This beats torch.stack along a size-2 dim, which was the slowest step of unpacking.
    p16 = packed.to(torch.int16)
    w = torch.bitwise_and(p16, 0xF0).bitwise_left_shift_(4).bitwise_or_(p16).bitwise_and_(0x0F0F)
    return w.view(torch.uint8)[:numel]


def pack_int4(q: Tensor) -> Tensor:
    """Pack integer values in [-8, 7] two per uint8 byte (element 2i low nibble, 2i+1 high) -> (ceil(n/2),)."""
    if not isinstance(q, Tensor) or q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise ValueError(f"q must be an integer torch.Tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"q has values in [{int(q.min())}, {int(q.max())}]; allowed range is [-8, 7]")
    return _pack_values(q.reshape(-1).to(torch.float32))


def unpack_int4(packed: Tensor, numel: int) -> Tensor:
    """Inverse of `pack_int4`: the first `numel` values as a flat int8 tensor."""
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 torch.Tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    if not 0 <= numel <= 2 * packed.numel():
        raise ValueError(f"numel={numel} is out of range; allowed 0..{2 * packed.numel()} for {packed.numel()} bytes")
    return _unpack_codes(packed.reshape(-1), numel).to(torch.int8) - 8


# --------------------------------------------------------------------------------------------------
# Channel-wise salience
# --------------------------------------------------------------------------------------------------

def _absmax(y: Tensor, dim: int | None = None) -> Tensor:
    # min/max instead of abs().amax(): no y-sized temporary; NaN propagates through both. The
    # fused aminmax is fastest for a full reduction but ~10x slower than amin + amax along a dim.
    if dim is None:
        mn, mx = torch.aminmax(y)
    else:
        mn, mx = torch.amin(y, dim=dim), torch.amax(y, dim=dim)
    return torch.maximum(-mn, mx)


def _channel_absmax(x: Tensor) -> Tensor:
    return _absmax(x.reshape(-1, x.shape[-1]), dim=0)  # (C,)


def _topk_count(topk, channels: int) -> int:
    if isinstance(topk, bool) or not isinstance(topk, (numbers.Integral, numbers.Real)):
        raise ValueError(f"csb_topk={topk!r} must be an int count in [0, {channels}] or a float fraction in (0, 1]")
    if isinstance(topk, numbers.Integral):
        if not 0 <= int(topk) <= channels:
            raise ValueError(f"csb_topk={topk} is out of range; allowed counts are 0..{channels} (channels)")
        return int(topk)
    if not 0.0 < float(topk) <= 1.0:
        raise ValueError(f"csb_topk={topk} is out of range; allowed fractions are in (0, 1]")
    # round, not ceil: 0.07 * 100 is 7.000000000000001 in floating point; at least one channel is kept.
    return max(1, min(channels, round(float(topk) * channels)))


def _top_channels(absmax: Tensor, topk) -> Tensor:
    k = _topk_count(topk, absmax.numel())
    idx = torch.topk(absmax.float(), k, sorted=False).indices
    return torch.sort(idx).values  # ascending, so the same salience gives the same layout every time


def select_salient_channels(x: Tensor, topk) -> Tensor:
    """Indices (int64, ascending) of the `topk` channels with the largest max|x| over all other dims.

    `topk` is an int count in [0, C] or a float fraction in (0, 1] (rounded, at least one channel).
    """
    if not isinstance(x, Tensor) or x.ndim == 0:
        raise ValueError("x must be a torch.Tensor with a last (channel) dim")
    return _top_channels(_channel_absmax(x), topk)


class SalienceCalibrator:
    """Running per-channel max|x| over the first `num_steps` updates, then frozen.

    Calibrate salience on the first computed steps, then pass `.channels(topk)` to `store` so the
    salient set (and the payload layout) stays fixed and no per-step top-k is needed.
    """

    def __init__(self, num_steps: int | None = None):
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1):
            raise ValueError(f"num_steps={num_steps!r} must be a positive int or None (never freeze)")
        self.num_steps = num_steps
        self.reset()

    def reset(self) -> None:
        self.absmax: Tensor | None = None
        self.steps = 0

    @property
    def frozen(self) -> bool:
        return self.num_steps is not None and self.steps >= self.num_steps

    def update(self, x: Tensor) -> bool:
        """Fold one step's activation in; returns False (and ignores x) once frozen."""
        if self.frozen:
            return False
        if not isinstance(x, Tensor) or x.ndim == 0 or not x.is_floating_point():
            raise ValueError("x must be a floating-point torch.Tensor with a last (channel) dim")
        m = _channel_absmax(x.detach()).float()
        if not bool(torch.isfinite(m).all()):
            _raise_non_finite("x")
        if self.absmax is None:
            self.absmax = m
        elif self.absmax.shape != m.shape:
            raise ValueError(f"x has {m.numel()} channels, calibrator has {self.absmax.numel()}; allowed: the same channel count every update")
        else:
            torch.maximum(self.absmax, m.to(self.absmax.device), out=self.absmax)
        self.steps += 1
        return True

    def channels(self, topk) -> Tensor:
        """The calibrated salient channel indices (int64, ascending)."""
        if self.absmax is None:
            raise ValueError("SalienceCalibrator.channels called before any update(x)")
        return _top_channels(self.absmax, topk)


def _resolve_salient(x: Tensor, salient) -> Tensor | None:
    if salient is None:
        return None
    if not isinstance(salient, Tensor):
        idx = select_salient_channels(x, salient)
    else:
        channels = x.shape[-1]
        if salient.ndim != 1 or salient.is_floating_point() or salient.dtype == torch.bool:
            raise ValueError(f"salient must be a 1-D integer index tensor, got dtype {salient.dtype} with shape {tuple(salient.shape)}")
        idx = salient.to(device=x.device, dtype=torch.int64)
        if idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= channels:
                raise ValueError(f"salient has indices in [{lo}, {hi}]; allowed 0..{channels - 1}")
            if torch.unique(idx).numel() != idx.numel():
                raise ValueError("salient has repeated channel indices; allowed: each channel at most once")
    return idx if idx.numel() else None


# --------------------------------------------------------------------------------------------------
# Storage holders
# --------------------------------------------------------------------------------------------------

def _tensor_bytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass(eq=False, repr=False)
class QTensor:
    """A quantized tensor: payload + float32 scales, plus CSB channels kept in the input's dtype.

    payload: int8 (bits=8) or uint8 with two values per byte (bits=4) over the full (rows, C) grid,
    rows = numel / C, flattened; salient channels' slots hold 0. scales: (1,), (C,) or (rows,).
    """

    payload: Tensor
    scales: Tensor
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    granularity: str
    salient_idx: Tensor | None = None     # (k,) int64, ascending
    salient_values: Tensor | None = None  # (*shape[:-1], k) in `dtype`

    @property
    def device(self) -> torch.device:
        return self.payload.device

    @property
    def nbytes(self) -> int:
        """Exact bytes held: payload + scales + salient values + salient indices."""
        return (_tensor_bytes(self.payload) + _tensor_bytes(self.scales)
                + _tensor_bytes(self.salient_values) + _tensor_bytes(self.salient_idx))

    def dequantize(self) -> Tensor:
        """Back to a tensor of the original shape, dtype and device."""
        channels = self.shape[-1] if len(self.shape) else 1
        if self.bits == 8:
            y = self.payload.to(torch.float32)
        else:
            y = _unpack_codes(self.payload, self.shape.numel()).to(torch.float32).sub_(8)
        y = y.view(-1, channels)                                           # (rows, C)
        y.mul_(self.scales[:, None] if self.granularity == "token" else self.scales)
        y = y.to(self.dtype)
        if self.salient_idx is not None:
            y.index_copy_(1, self.salient_idx, self.salient_values.reshape(-1, self.salient_idx.numel()))
        return y.view(self.shape)

    def __repr__(self) -> str:
        k = 0 if self.salient_idx is None else self.salient_idx.numel()
        return (f"QTensor(shape={tuple(self.shape)}, dtype={self.dtype}, bits={self.bits}, "
                f"granularity={self.granularity!r}, salient={k}, nbytes={self.nbytes})")


class Unquantized:
    """What `cache_bits=16` keeps: the tensor exactly as computed, in the model's own dtype (so "16-bit" is
    32-bit on an fp32 model and 16-bit on a bf16/fp16 one); reuse of it is bit-identical."""

    __slots__ = ("tensor",)

    def __init__(self, x: Tensor):
        # A strided view (K out of a fused qkv projection) would pin the whole projection buffer, 3x what
        # nbytes reports; a contiguous copy is still bit-identical and keeps the bytes honest.
        x = x.detach()          # a view: the cache never keeps an autograd graph alive
        self.tensor = x if x.is_contiguous() else x.contiguous()

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def nbytes(self) -> int:
        return _tensor_bytes(self.tensor)

    def dequantize(self) -> Tensor:
        return self.tensor


# --------------------------------------------------------------------------------------------------
# Quantize / dequantize
# --------------------------------------------------------------------------------------------------

def quantize(x: Tensor, bits: int, granularity: str = "tensor", salient=None) -> QTensor:
    """Symmetric quantization of `x` to `bits` (8 or 4) with one scale per tensor/channel/token.

    `salient`: None, an index tensor of channels to keep in x's dtype (e.g. from a calibrator), or a
    top-k (int count or float fraction, as `select_salient_channels`) chosen from x itself.
    """
    _check_bits(bits)
    _check_granularity(granularity)
    _check_input(x, granularity)
    bits, qmax = int(bits), QMAX[int(bits)]
    x = x.detach()
    idx = _resolve_salient(x, salient)
    channels = x.shape[-1] if x.ndim else 1
    # One float32 work buffer, then in-place ops only: on a VM every fresh multi-MB allocation
    # page-faults, and that cost more than the arithmetic itself (benchmarks/quant_micro.py).
    # Without CSB the scale is read straight off x and the buffer comes from the division.
    xr = x.reshape(-1, channels)                                             # (rows, C)
    y = None
    sal_values = None
    if idx is not None:
        y = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True).view(-1, channels)
        sal_values = xr.index_select(1, idx).view(*x.shape[:-1], idx.numel())
        if not bool(torch.isfinite(sal_values).all()):
            _raise_non_finite("x")
        # Zeroing the salient slots instead of gathering the other C - k channels into a tight
        # layout keeps both directions dense, with a k-column write as the only indexed op; the
        # price is k/C of the payload spent on zeros (1% at top-1%). Zeroing also keeps the
        # outliers out of every scale below, which is what CSB is for.
        y.index_fill_(1, idx, 0.0)
    src = xr if y is None else y
    if granularity == "tensor":
        amax = _absmax(src).reshape(1)
    else:
        amax = _absmax(src, dim=0 if granularity == "channel" else 1)       # (C,) or (rows,)
    if not bool(torch.isfinite(amax).all()):
        _raise_non_finite("x")
    scales = amax.to(torch.float32) / qmax
    # s = 0 for an all-zero group, or when a subnormal max|x| underflows: dividing by 1 there gives
    # q = 0 (dequantized 0 * s = 0, never NaN), and the clip catches x/s landing past Q from an
    # imprecise subnormal s.
    div = torch.where(scales == 0, torch.ones_like(scales), scales)
    div = div[:, None] if granularity == "token" else div
    if y is None:
        y = torch.div(xr, div)   # div is a float32 tensor with dims, so this promotes fp16/bf16 x to fp32
    else:
        y.div_(div)
    y.round_().clamp_(-qmax, qmax)
    # reshape, not view: under some dispatch modes (a FLOP counter) the division can hand back strides
    # that a view cannot flatten.
    if bits == 8:
        payload = y.to(torch.int8).reshape(-1)
    else:
        payload = _pack_values(y.reshape(-1))
    return QTensor(payload, scales, x.shape, x.dtype, bits, granularity, idx, sal_values)


def store(x: Tensor, bits: int, granularity: str = "tensor", salient=None) -> QTensor | Unquantized:
    """The cache's one storage call: bits 16 keep the tensor as computed, 8/4 quantize.

    granularity and salient only shape quantized storage; an unquantized tensor has nothing to scale.
    """
    _check_bits(bits, allowed=(16, *QMAX))
    _check_granularity(granularity)
    if int(bits) == 16:
        return Unquantized(x)
    return quantize(x, int(bits), granularity, salient)


class SalienceTracker:
    """CSB per cached (layer, target) over one generation: which channels stay exact when storing at `bits`.

    With `calibration_steps = 0` the salient set is chosen from each tensor itself. Otherwise a
    `SalienceCalibrator` per (layer, target) folds in the tensors of the first `calibration_steps`
    *computed steps* and the set is frozen after that.
    """

    def __init__(self, topk, calibration_steps: int):
        # A whole-number count arrives as a float from JSON or the CLI; a fraction stays a float.
        self.topk = int(topk) if topk >= 1 else float(topk)
        self.enabled = bool(topk)
        self.calibration_steps = calibration_steps
        self.reset()

    def reset(self) -> None:
        self._calibrators: dict = {}
        self._frozen: dict = {}

    def channels(self, layer: int, target: str, x: Tensor, bits: int, step_index: int) -> Tensor | None:
        if bits == 16 or not self.enabled:
            return None
        if self.calibration_steps <= 0:
            return select_salient_channels(x, self.topk)
        key = (layer, target)
        if key in self._frozen:
            return self._frozen[key]
        # Count computed steps, not commits: under CFG each step commits once per branch, and counting
        # those would freeze after half the requested steps with one branch's view only.
        cal, seen = self._calibrators.setdefault(key, (SalienceCalibrator(), set()))
        if step_index not in seen and len(seen) >= self.calibration_steps:
            self._frozen[key] = cal.channels(self.topk)
            return self._frozen[key]
        seen.add(step_index)
        cal.update(x)
        return cal.channels(self.topk)
