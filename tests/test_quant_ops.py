"""ElasticZO-INT8 building blocks: number format, roundings, integer matmul/conv, integer CE."""
import math

import pytest
import torch
import torch.nn.functional as F

from zotune.quant import fixed
from zotune.quant.int_ops import (im2col, int_conv2d, int_conv2d_reference, int_linear, int_matmul,
                                  int_matmul_reference)
from zotune.quant.loss import IntCrossEntropy


def _int8(gen, *shape):
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int64).to(torch.int8)


def test_quantize_round_trip_within_half_lsb():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    q, e = fixed.quantize(x)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert float(x.abs().max()) <= 127 * 2.0 ** e < 2 * float(x.abs().max())  # smallest exponent that fits
    assert (fixed.dequantize(q, e) - x).abs().max() <= 2.0 ** e / 2 + 1e-7
    q1, e1 = fixed.quantize(x, headroom_bits=1)
    assert e1 == e + 1 and q1.abs().max() <= 64


@pytest.mark.parametrize("s", [0, 1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_round_shift_is_round_to_nearest(s, dtype):
    x = torch.arange(-300, 300, dtype=dtype)
    expect = torch.floor(x.double() / 2 ** s + 0.5).to(dtype)
    assert torch.equal(fixed.round_shift(x, s), expect)
    assert torch.equal(fixed.round_shift(x.clone(), s, inplace=True), expect)
    assert torch.equal(fixed.round_shift(x, -2), x * 4)
    assert torch.equal(fixed.shift_right(x, s), torch.floor(x.double() / 2 ** s).to(dtype))


def test_requantize_uses_ceil_log2_shift_and_saturates():
    acc = torch.tensor([1000, -513, 7], dtype=torch.int32)   # ceil(log2 1000) = 10 -> shift 3
    q, e = fixed.requantize(acc, -12)
    assert e == -9 and q.tolist() == [125, -64, 1]
    q, e = fixed.requantize(torch.tensor([128, -5], dtype=torch.int32), 0)  # 2**7: no shift, clip
    assert e == 0 and q.tolist() == [127, -5]
    assert fixed.ceil_log2(1) == 0 and fixed.ceil_log2(129) == 8


def test_pseudo_stochastic_shift_bias_within_its_bound():
    """Over uniformly spread low bits the mean error is -2^-(u+1) + 2^-(s+1), u = s - s//2 upper bits."""
    x = torch.arange(-4096, 4096, dtype=torch.int64) * 37 + 11
    for s in (2, 4, 6, 9):
        y = fixed.pseudo_stochastic_shift(x, s)
        floor = torch.floor(x.double() / 2 ** s)
        assert ((y - floor == 0) | (y - floor == 1)).all()
        assert torch.equal(fixed.pseudo_stochastic_shift(x << s, s), x)   # exact values stay exact
        u = s - s // 2
        bias = float((y.double() - x.double() / 2 ** s).mean())
        assert abs(bias - (-(2.0 ** -(u + 1)) + 2.0 ** -(s + 1))) < 0.02, (s, bias)


def test_multiplier_represents_scale():
    for scale in (1e-9, 3.3e-4, 0.75, 1.0, 12345.6):
        m, s = fixed.multiplier(scale)
        assert 2 ** 14 <= m < 2 ** 15
        assert abs(m * 2.0 ** -s / scale - 1) < 2 ** -14
    assert fixed.multiplier(0.0) == (0, 0)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (17, 25, 9), (64, 400, 120), (5, 150, 16)])
def test_int_matmul_matches_int64_reference(shape):
    m, k, n = shape
    g = torch.Generator().manual_seed(m * 1000 + k)
    a, b = _int8(g, m, k), _int8(g, k, n)
    ref = int_matmul_reference(a, b)
    assert torch.equal(int_matmul(a, b), ref)
    assert torch.equal(int_matmul(a, b, pad=True), ref)          # the padded (CUDA-shape) path
    assert torch.equal(int_matmul(a.t().contiguous().t(), b), ref)  # strided operands
    w = _int8(g, n, k)
    assert torch.equal(int_linear(a, w), int_matmul_reference(a, w.t()))


def test_int_matmul_rejects_non_int8():
    with pytest.raises(TypeError, match="int8"):
        int_matmul(torch.zeros(2, 2), torch.zeros(2, 2))


def test_im2col_order_matches_float_unfold():
    g = torch.Generator().manual_seed(1)
    x = _int8(g, 2, 3, 7, 6)
    cols = im2col(x.transpose(0, 1), (3, 2), (2, 1), (1, 1))            # [C*KH*KW, B*L]
    ref = F.unfold(x.double(), (3, 2), stride=(2, 1), padding=(1, 1))   # [B, C*KH*KW, L]
    assert torch.equal(cols.double(), ref.transpose(0, 1).reshape(ref.shape[1], -1))


@pytest.mark.parametrize("stride,padding,batch", [((1, 1), (2, 2), 3), ((1, 1), (0, 0), 2), ((2, 1), (1, 0), 5)])
def test_int_conv2d_matches_reference(stride, padding, batch, monkeypatch):
    g = torch.Generator().manual_seed(2)
    x, w = _int8(g, batch, 3, 12, 10), _int8(g, 4, 3, 5, 3)
    ref = int_conv2d_reference(x, w, stride, padding)
    assert torch.equal(int_conv2d(x, w, stride, padding), ref)
    monkeypatch.setattr("zotune.quant.int_ops.COLUMN_TILE_BYTES", 400)   # tiles of a few samples
    assert torch.equal(int_conv2d(x, w, stride, padding, matmul=int_matmul_reference), ref)
    monkeypatch.setattr("zotune.quant.int_ops.COLUMN_TILE_BYTES", 1)     # one sample per tile
    assert torch.equal(int_conv2d(x, w, stride, padding), ref)


@pytest.mark.parametrize("frac_bits", [6, 8, 10])
def test_integer_cross_entropy_matches_float_within_few_units(frac_bits):
    """|l_q 2^-F ln2 - CE(dequantised logits)| <= 2.5 * 2^-F nats per sample (LUT exp2/log2)."""
    g = torch.Generator().manual_seed(frac_bits)
    ce = IntCrossEntropy(frac_bits)
    for e in (-7, -4, -2, 0):
        a = _int8(g, 256, 10)
        y = torch.randint(0, 10, (256,), generator=g)
        lq = ce(a, e, y)
        assert lq.dtype == torch.int64 and (lq >= 0).all()
        ref = F.cross_entropy(fixed.dequantize(a, e).double(), y, reduction="none")
        err = (lq.double() * 2.0 ** -frac_bits * math.log(2) - ref).abs().max()
        assert err <= 2.5 * 2.0 ** -frac_bits, (e, float(err) * 2 ** frac_bits)


def test_mitchell_cross_entropy_within_its_bound():
    """Mitchell's linear exp2/log2 err by up to ~0.086 bits each: 0.12 nats covers both."""
    g = torch.Generator().manual_seed(3)
    a, y = _int8(g, 256, 10), torch.randint(0, 10, (256,), generator=g)
    ref = F.cross_entropy(fixed.dequantize(a, -4).double(), y, reduction="none")
    got = IntCrossEntropy(8, "mitchell")(a, -4, y).double() * 2.0 ** -8 * math.log(2)
    assert (got - ref).abs().max() < 0.12
    with pytest.raises(ValueError, match="lut"):
        IntCrossEntropy(8, "taylor")


def test_integer_output_error_is_softmax_minus_onehot():
    g = torch.Generator().manual_seed(4)
    a, y = _int8(g, 128, 10), torch.randint(0, 10, (128,), generator=g)
    _, (err, e_err) = IntCrossEntropy(8).loss_and_error(a, -5, y)
    ref = torch.softmax(fixed.dequantize(a, -5).double(), 1)
    ref[torch.arange(128), y] -= 1
    assert err.dtype == torch.int8 and e_err == -7
    assert (err.double() * 2.0 ** e_err - ref).abs().max() <= 2 * 2.0 ** e_err


@pytest.mark.parametrize("kernel,stride,padding", [(2, 2, 0), (3, 2, 1), (3, 1, 0), ((2, 3), (2, 1), (1, 1))])
def test_integer_max_pool_matches_torch(kernel, stride, padding):
    from torch import nn
    from zotune.quant.layers import max_pool2d_int, _pair
    x = _int8(torch.Generator().manual_seed(5), 3, 4, 9, 8)
    ref = F.max_pool2d(x.double(), kernel, stride, padding)
    got = max_pool2d_int(x, _pair(kernel), _pair(stride), _pair(padding))
    assert got.dtype == torch.int8 and torch.equal(got.double(), ref)
    assert nn.MaxPool2d(kernel, stride, padding)  # the converter accepts the same arguments
