"""Exact and tightly-bounded expectations for dqar.method.quant (INT8/INT4, granularities, CSB, storage)."""
from __future__ import annotations

import math

import pytest
import torch

from dqar.method.quant import (
    GRANULARITIES,
    QTensor,
    SalienceCalibrator,
    pack_int4,
    quantize,
    select_salient_channels,
    store,
    unpack_int4,
    Unquantized,
)

QUANT_MODES = [(b, g) for b in (8, 4) for g in GRANULARITIES]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gaussian(shape=(2, 256, 384), seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)).to(dtype)


def rel_err(x, y):
    return float((x.float() - y.float()).norm() / x.float().norm())


def with_outliers(x, channels=(3, 50, 200, 377), factor=100.0):
    x = x.clone()
    x[..., list(channels)] *= factor
    return x


def step_of(x, bits, granularity, salient=()):
    """The quantization step s = max|x| / Q of every element, computed here from x alone (not from the
    quantizer's output): over the tensor, the element's channel (last dim) or its token (row); CSB channels
    (`salient`) are kept exactly (step 0) and left out of the maxima."""
    q = {8: 127, 4: 7}[bits]
    a = x.float().abs().reshape(-1, x.shape[-1]).clone()
    keep = torch.ones(a.shape[-1], dtype=torch.bool)
    keep[list(salient)] = False
    a[:, ~keep] = 0.0
    if granularity == "tensor":
        m = a.max().expand_as(a)
    elif granularity == "channel":
        m = a.amax(0, keepdim=True).expand_as(a)
    else:
        m = a.amax(1, keepdim=True).expand_as(a)
    return (m / q * keep).reshape(x.shape)


# --------------------------------------------------------------------------------------------------
# Exact small cases
# --------------------------------------------------------------------------------------------------

def test_int8_tensor_exact_codes_and_values():
    # s = 31.75 / 127 = 0.25 exactly, so every multiple of 0.25 round-trips bit-exactly
    x = torch.tensor([-31.75, 0.25, 1.0, 31.75, 0.0, -2.5])
    q = quantize(x, 8)
    assert q.payload.dtype == torch.int8
    assert q.payload.tolist() == [-127, 1, 4, 127, 0, -10]
    assert q.scales.dtype == torch.float32 and q.scales.tolist() == [0.25]
    assert torch.equal(q.dequantize(), x)


def test_int4_tensor_exact_codes_and_rounding():
    # s = 3.5 / 7 = 0.5; 0.3 / 0.5 = 0.6 rounds to 1, -0.7 / 0.5 = -1.4 rounds to -1
    x = torch.tensor([3.5, -3.5, 0.5, 0.3, -0.7])
    q = quantize(x, 4)
    assert q.payload.dtype == torch.uint8 and q.payload.numel() == 3
    assert unpack_int4(q.payload, 5).tolist() == [7, -7, 1, 1, -1]
    assert q.dequantize().tolist() == [3.5, -3.5, 0.5, 0.5, -0.5]


def test_channel_and_token_scales_exact():
    x = torch.tensor([[1.0, -20.0, 0.0],
                      [-4.0, 10.0, 0.0]])
    qc = quantize(x, 8, "channel")
    assert torch.equal(qc.scales, torch.tensor([4.0, 20.0, 0.0]) / 127)
    qt = quantize(x, 8, "token")
    assert torch.equal(qt.scales, torch.tensor([20.0, 10.0]) / 127)
    assert qt.payload.view(2, 3)[:, 1].tolist() == [-127, 127]


@pytest.mark.parametrize("bits,granularity", QUANT_MODES)
def test_error_bounded_by_half_step_everywhere(bits, granularity):
    x = gaussian((3, 17, 24), seed=1)
    q = quantize(x, bits, granularity)
    qmax = {8: 127, 4: 7}[bits]
    x2 = x.reshape(-1, 24)
    if granularity == "tensor":
        step = x.abs().max() / qmax
    elif granularity == "channel":
        step = (x2.abs().amax(0) / qmax).expand_as(x2).reshape(x.shape)
    else:
        step = (x2.abs().amax(1, keepdim=True) / qmax).expand_as(x2).reshape(x.shape)
    err = (q.dequantize() - x).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-7).all())
    # each group's extreme value is represented exactly by +-Q * s
    assert torch.allclose(q.dequantize().abs().max(), x.abs().max(), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------------
# Error on seeded Gaussian data
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,granularity", QUANT_MODES)
def test_relative_error_is_the_uniform_rounding_noise_of_the_step(bits, granularity):
    # Round-to-nearest leaves an error of at most s/2 per element, and on Gaussian data (every value well
    # inside +-Q s) an error close to uniform on [-s/2, s/2], whose mean square is s^2 / 12. Both bounds are
    # derived from x alone: ||e|| <= sqrt(sum s^2 / 4), and ||e|| is sqrt(sum s^2 / 12) within 3%.
    x = gaussian()
    step = step_of(x, bits, granularity)
    err = float((quantize(x, bits, granularity).dequantize() - x).norm())
    assert err <= float((step.pow(2) / 4).sum().sqrt())
    assert err == pytest.approx(float((step.pow(2) / 12).sum().sqrt()), rel=0.03)


@pytest.mark.parametrize("granularity", ["channel", "token"])
def test_int8_relative_error_at_most_1_percent(granularity):
    x = gaussian()
    assert rel_err(x, quantize(x, 8, granularity).dequantize()) <= 0.01


@pytest.mark.parametrize("granularity", ["channel", "token"])
def test_int4_relative_error_at_most_15_percent(granularity):
    x = gaussian()
    assert rel_err(x, quantize(x, 4, granularity).dequantize()) <= 0.15


def test_int4_error_larger_than_int8_by_roughly_q_ratio():
    x = gaussian()
    e8 = rel_err(x, quantize(x, 8, "channel").dequantize())
    e4 = rel_err(x, quantize(x, 4, "channel").dequantize())
    # uniform rounding noise scales with 1/Q: 127/7 ~ 18
    assert 15 < e4 / e8 < 21


# --------------------------------------------------------------------------------------------------
# Channel-wise salience balancing
# --------------------------------------------------------------------------------------------------

def test_select_salient_channels_finds_outliers_sorted():
    x = with_outliers(gaussian())
    idx = select_salient_channels(x, 4)
    assert idx.dtype == torch.int64 and idx.tolist() == [3, 50, 200, 377]
    assert select_salient_channels(x, 0).numel() == 0


def test_select_salient_fraction_rounds_and_keeps_at_least_one():
    assert select_salient_channels(gaussian((4, 1152)), 0.01).numel() == 12
    assert select_salient_channels(gaussian((4, 100)), 0.07).numel() == 7  # not 8 from ceil(7.000000000000001)
    assert select_salient_channels(gaussian((4, 10)), 0.01).numel() == 1
    assert select_salient_channels(gaussian((4, 10)), 1.0).tolist() == list(range(10))


@pytest.mark.parametrize("bits", [8, 4])
def test_csb_lowers_error_with_outlier_channels(bits):
    x = with_outliers(gaussian())
    plain = rel_err(x, quantize(x, bits, "tensor").dequantize())
    csb = rel_err(x, quantize(x, bits, "tensor", salient=4).dequantize())
    assert csb < plain / 5
    # on the ordinary channels the outliers' scale crushes most values to 0 (all of them at INT4) ...
    normal = [c for c in range(384) if c not in (3, 50, 200, 377)]
    plain_n = rel_err(x[..., normal], quantize(x, bits, "tensor").dequantize()[..., normal])
    assert plain_n > 0.8
    # ... while CSB quantizes them exactly as if the outlier channels did not exist
    csb_deq = quantize(x, bits, "tensor", salient=4).dequantize()
    assert torch.equal(csb_deq[..., normal], quantize(x[..., normal], bits, "tensor").dequantize())
    assert rel_err(x[..., normal], csb_deq[..., normal]) <= {8: 0.011, 4: 0.2}[bits]


@pytest.mark.parametrize("bits,granularity", QUANT_MODES)
def test_csb_error_bounded_by_half_the_step_of_the_other_channels(bits, granularity):
    # CSB keeps the outlier channels exactly and quantizes the rest with steps computed on the rest alone.
    outliers = (3, 50, 200, 377)
    x = with_outliers(gaussian(), outliers)
    err = (quantize(x, bits, granularity, salient=4).dequantize() - x).abs()
    assert torch.equal(err[..., list(outliers)], torch.zeros_like(err[..., list(outliers)]))
    assert bool((err <= step_of(x, bits, granularity, outliers) / 2 * (1 + 1e-5) + 1e-7).all())


def test_csb_scale_computed_on_non_salient_channels_only():
    x = with_outliers(gaussian())
    normal = [c for c in range(384) if c not in (3, 50, 200, 377)]
    q = quantize(x, 8, "tensor", salient=4)
    assert torch.equal(q.scales, (x[..., normal].abs().max() / 127).reshape(1))
    qt = quantize(x, 8, "token", salient=4)
    assert torch.equal(qt.scales, x[..., normal].abs().amax(-1).reshape(-1) / 127)


def test_csb_salient_channels_kept_exactly_in_input_dtype():
    x = with_outliers(gaussian(dtype=torch.float16))
    q = quantize(x, 4, "channel", salient=4)
    assert q.salient_values.dtype == torch.float16
    deq = q.dequantize()
    assert torch.equal(deq[..., [3, 50, 200, 377]], x[..., [3, 50, 200, 377]])


def test_csb_with_given_indices_equals_topk_selection():
    x = with_outliers(gaussian())
    a = quantize(x, 8, "channel", salient=torch.tensor([377, 3, 200, 50])).dequantize()
    b = quantize(x, 8, "channel", salient=4).dequantize()
    assert torch.equal(a, b)


def test_csb_all_channels_salient_is_lossless():
    x = gaussian((2, 3, 8))
    q = quantize(x, 4, "channel", salient=1.0)
    assert not unpack_int4(q.payload, 48).any() and not q.scales.any()   # nothing left to quantize
    assert torch.equal(q.dequantize(), x)


@pytest.mark.parametrize("topk", [-1, 385, 0.0, 1.5, -0.1, True, "4"])
def test_csb_topk_out_of_range_raises_naming_csb_topk(topk):
    x = gaussian()
    with pytest.raises(ValueError, match="csb_topk"):
        select_salient_channels(x, topk)
    with pytest.raises(ValueError, match="csb_topk"):
        quantize(x, 8, salient=topk)


def test_salient_index_tensor_validated():
    x = gaussian((2, 4, 8))
    with pytest.raises(ValueError, match=r"salient has indices in \[0, 8\]; allowed 0\.\.7"):
        quantize(x, 8, salient=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="repeated"):
        quantize(x, 8, salient=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="1-D integer"):
        quantize(x, 8, salient=torch.tensor([1.0]))


def test_salience_calibrator_accumulates_then_freezes():
    cal = SalienceCalibrator(num_steps=2)
    with pytest.raises(ValueError, match="before any update"):
        cal.channels(2)
    a = torch.zeros(3, 6); a[:, 1] = 5.0
    b = torch.zeros(3, 6); b[:, 4] = -7.0
    c = torch.zeros(3, 6); c[:, 0] = 100.0   # after freezing: must be ignored
    assert cal.update(a) and cal.update(b) and cal.frozen
    assert cal.update(c) is False
    assert cal.steps == 2
    assert cal.absmax.tolist() == [0.0, 5.0, 0.0, 0.0, 7.0, 0.0]
    assert cal.channels(2).tolist() == [1, 4]
    assert cal.channels(1).tolist() == [4]
    cal2 = SalienceCalibrator()
    cal2.update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="same channel count"):
        cal2.update(torch.zeros(2, 6))
    with pytest.raises(ValueError, match="num_steps"):
        SalienceCalibrator(num_steps=0)
    cal.reset()
    assert cal.steps == 0 and cal.absmax is None and not cal.frozen


def test_calibrated_channels_feed_store():
    x = with_outliers(gaussian())
    cal = SalienceCalibrator(num_steps=1)
    cal.update(x)
    q = store(x, 8, "tensor", salient=cal.channels(4))
    assert q.salient_idx.tolist() == [3, 50, 200, 377]


# --------------------------------------------------------------------------------------------------
# INT4 packing
# --------------------------------------------------------------------------------------------------

def test_pack_int4_every_level_round_trips_even_and_odd_lengths():
    levels = torch.arange(-8, 8, dtype=torch.int8)
    g = torch.Generator("cpu").manual_seed(0)
    for n in list(range(1, 40)) + [16, 255, 256, 257]:
        q = levels[torch.randint(0, 16, (n,), generator=g)]
        if n >= 16:
            q[:16] = levels  # every level present
        packed = pack_int4(q)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 2)
        assert torch.equal(unpack_int4(packed, n), q)


def test_pack_int4_layout_and_every_byte():
    # element 2i in the low nibble, 2i+1 in the high nibble, offset by 8
    assert pack_int4(torch.tensor([-8, 7])).tolist() == [0xF0]
    assert pack_int4(torch.tensor([0])).tolist() == [0x08]
    lo, hi = torch.meshgrid(torch.arange(-8, 8), torch.arange(-8, 8), indexing="ij")
    q = torch.stack([lo.reshape(-1), hi.reshape(-1)], dim=1).reshape(-1)   # all 256 pairs
    packed = pack_int4(q)
    assert sorted(packed.tolist()) == list(range(256))
    assert torch.equal(unpack_int4(packed, 512), q.to(torch.int8))


def test_pack_int4_rejects_out_of_range_and_float():
    with pytest.raises(ValueError, match=r"\[-8, 8\]; allowed range is \[-8, 7\]"):
        pack_int4(torch.tensor([-8, 8]))
    with pytest.raises(ValueError, match="integer"):
        pack_int4(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="numel=5"):
        unpack_int4(torch.zeros(2, dtype=torch.uint8), 5)


# --------------------------------------------------------------------------------------------------
# Zeros and non-finite input
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,granularity", QUANT_MODES)
def test_zeros_give_zeros_not_nan(bits, granularity):
    x = torch.zeros(2, 5, 7)
    assert torch.equal(quantize(x, bits, granularity).dequantize(), x)
    assert torch.equal(quantize(x, bits, granularity, salient=2).dequantize(), x)


@pytest.mark.parametrize("bits", [8, 4])
def test_all_zero_channel_and_row(bits):
    x = gaussian((4, 6))
    x[:, 2] = 0.0
    x[1, :] = 0.0
    for granularity in GRANULARITIES:
        deq = quantize(x, bits, granularity).dequantize()
        assert not torch.isnan(deq).any()
        assert torch.equal(deq[:, 2], torch.zeros(4)) and torch.equal(deq[1], torch.zeros(6))


@pytest.mark.parametrize("bits,granularity", QUANT_MODES)
def test_subnormal_input_stays_finite_and_close(bits, granularity):
    # max|x| / Q underflows to 0 for the smallest subnormals; must not divide by zero
    x = torch.tensor([[1e-45, -1e-45, 0.0], [3e-39, 1e-40, -2e-39]])
    deq = quantize(x, bits, granularity).dequantize()
    assert bool(torch.isfinite(deq).all())
    assert float((deq - x).abs().max()) <= 3e-39 / {8: 127, 4: 7}[bits]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_non_finite_raises(bad, granularity):
    x = gaussian((2, 4, 8))
    x[1, 2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(x, 8, granularity)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(x, 4, granularity, salient=torch.tensor([0, 1]))   # bad value in the quantized part
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(x, 8, granularity, salient=torch.tensor([3]))     # bad value in a salient channel
    with pytest.raises(ValueError, match="NaN or Inf"):
        SalienceCalibrator().update(x)


# --------------------------------------------------------------------------------------------------
# Byte accounting
# --------------------------------------------------------------------------------------------------

def test_nbytes_exact_every_mode():
    x = gaussian((2, 5, 7))          # 70 values, 10 rows, 7 channels
    assert quantize(x, 8, "tensor").nbytes == 70 + 4
    assert quantize(x, 8, "channel").nbytes == 70 + 7 * 4
    assert quantize(x, 8, "token").nbytes == 70 + 10 * 4
    assert quantize(x, 4, "tensor").nbytes == 35 + 4
    assert quantize(x, 4, "channel").nbytes == 35 + 7 * 4
    assert quantize(x, 4, "token").nbytes == 35 + 10 * 4
    # CSB k=2: the payload keeps the full grid (salient slots hold 0); + 10 x 2 salient values in
    # x's dtype + 2 int64 indices
    assert quantize(x, 8, "tensor", salient=2).nbytes == 70 + 4 + 80 + 16
    assert quantize(x, 4, "channel", salient=2).nbytes == 35 + 7 * 4 + 80 + 16
    assert quantize(x.half(), 4, "token", salient=2).nbytes == 35 + 10 * 4 + 40 + 16
    # odd element count in INT4: 15 values -> 8 bytes
    assert quantize(gaussian((3, 5)), 4, "tensor").nbytes == 8 + 4
    assert quantize(gaussian((3, 5)), 4, "channel", salient=2).nbytes == 8 + 5 * 4 + 3 * 2 * 4 + 16
    assert store(x, 16).nbytes == 70 * 4            # unquantized: the tensor's own dtype (fp32 here)
    assert store(x.half(), 16).nbytes == 70 * 2


def test_nbytes_matches_held_tensors():
    q = quantize(with_outliers(gaussian()), 4, "channel", salient=4)
    held = [q.payload, q.scales, q.salient_values, q.salient_idx]
    assert q.nbytes == sum(t.numel() * t.element_size() for t in held)


# --------------------------------------------------------------------------------------------------
# Unquantized storage, store()
# --------------------------------------------------------------------------------------------------

def test_store_16_keeps_the_tensor_as_computed():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = gaussian(dtype=dtype) * 1000
        s = store(x, 16)
        assert isinstance(s, Unquantized) and s.dtype == dtype
        held = s.dequantize()
        assert torch.equal(held, x) and held.data_ptr() == x.data_ptr()     # no copy, bit-identical
        assert s.nbytes == x.numel() * x.element_size()
    # A strided view is made contiguous, so nbytes counts what is actually held, and the values are exact.
    fused = gaussian((2, 8, 24))
    view = fused[..., 8:16]
    kept = store(view, 16)
    assert kept.dequantize().is_contiguous() and torch.equal(kept.dequantize(), view)
    assert kept.nbytes == view.numel() * 4


def test_store_dispatches_and_validates_bits():
    x = gaussian((2, 8))
    assert isinstance(store(x, 8), QTensor) and isinstance(store(x, 4, "token"), QTensor)
    for bad in (3, 0, 2, 1, 32, True, 8.0, "8"):
        with pytest.raises(ValueError, match=r"bits=.*allowed values are \[4, 8, 16\]"):
            store(x, bad)


@pytest.mark.parametrize("bad", [3, 16, 32, 0, True])
def test_quantize_bits_other_than_8_or_4_raises_naming_bits(bad):
    with pytest.raises(ValueError, match=r"bits=.*allowed values are \[4, 8\]"):
        quantize(gaussian((2, 8)), bad)


def test_bad_granularity_and_input_raise():
    with pytest.raises(ValueError, match=r"granularity='row'.*\['tensor', 'channel', 'token'\]"):
        quantize(gaussian((2, 8)), 8, "row")
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.ones(3, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="at least one element"):
        quantize(torch.zeros(0, 4), 8)
    with pytest.raises(ValueError, match="0-d"):
        quantize(torch.tensor(1.0), 8, "channel")
    assert quantize(torch.tensor(2.0), 8).dequantize().item() == 2.0


# --------------------------------------------------------------------------------------------------
# dtype / device / shape, layouts
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,granularity", QUANT_MODES)
def test_dequantize_keeps_dtype_device_shape(device, dtype, bits, granularity):
    x = gaussian((2, 3, 5, 9), dtype=dtype).to(device)
    for salient in (None, 2):
        q = quantize(x, bits, granularity, salient=salient)
        out = q.dequantize()
        assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
        # Half the step, computed from x here, plus the rounding of the dequantized value to x's dtype.
        kept = () if salient is None else q.salient_idx.tolist()
        assert len(kept) == (salient or 0)
        step = step_of(x.cpu(), bits, granularity, kept)
        err = (out.cpu().float() - x.cpu().float()).abs()
        ulp = torch.finfo(dtype).eps * (x.cpu().float().abs() + step / 2)
        assert bool((err <= step / 2 * (1 + 1e-5) + ulp + 1e-7).all())
    for b in (16,):
        out = store(x, b).dequantize()
        assert out.dtype == dtype and out.device == x.device and out.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,granularity", QUANT_MODES)
def test_half_inputs_quantized_in_float32(dtype, bits, granularity):
    # rounding x/s in fp16 would misplace codes near Q; the result must match the fp32 path exactly
    x = gaussian(dtype=dtype)
    for salient in (None, 4):
        a, b = quantize(x, bits, granularity, salient), quantize(x.float(), bits, granularity, salient)
        assert torch.equal(a.payload, b.payload) and torch.equal(a.scales, b.scales)


def test_per_token_tracks_rows_of_different_magnitude():
    x = gaussian((64, 32)) * torch.logspace(-3, 3, 64)[:, None]   # row magnitudes over 6 decades
    tok = quantize(x, 8, "token").dequantize()
    ten = quantize(x, 8, "tensor").dequantize()
    row_err_tok = ((x - tok).norm(dim=1) / x.norm(dim=1))
    row_err_ten = ((x - ten).norm(dim=1) / x.norm(dim=1))
    assert float(row_err_tok.max()) <= 0.01           # every row, including the tiny ones
    assert float(row_err_ten[:8].min()) > 0.5         # per-tensor flattens the smallest rows to ~0
    assert quantize(x, 8, "token").scales.shape == (64,)


def test_non_contiguous_input():
    x = gaussian((2, 16, 12)).transpose(1, 2)          # (2, 12, 16), channels are the old token dim
    assert not x.is_contiguous()
    for bits, granularity in QUANT_MODES:
        ref = quantize(x.contiguous(), bits, granularity, salient=2).dequantize()
        assert torch.equal(quantize(x, bits, granularity, salient=2).dequantize(), ref)


def test_input_with_grad_is_detached():
    x = gaussian((2, 8)).requires_grad_()
    assert not quantize(x, 8).dequantize().requires_grad
    assert not store(x, 16).dequantize().requires_grad
