"""The INT8 number format and the integer roundings (ElasticZO-INT8, Sugiura & Matsutani 2025).

A quantised tensor is ``(q, e)``: integer mantissas ``q`` and one shared power-of-two exponent
``e`` (a Python int), meaning ``x ~= q * 2**e``. Weights and activations are int8 in [-127, 127]
(symmetric: -128 never occurs, so negation cannot overflow); accumulators are int32, gradients and
updates int64. Exponents are Python ints, so exponent arithmetic never touches a tensor.

Roundings of a right shift by ``s`` bits (research note 3.5.6):
    round_shift              round to nearest (ties up): forward requantisation, deterministic, so
                             the two perturbed passes differ only by the perturbation;
    stochastic_shift         floor((x + u) / 2**s), u uniform on [0, 2**s) from a keyed generator:
                             E[result] = x / 2**s exactly, used for every weight update;
    pseudo_stochastic_shift  NITI's RNG-free variant: the upper half of the discarded bits is
                             compared with the lower half; biased low, so only an option for
                             back-propagated errors (``error_rounding="pseudo"``; default nearest).
Only ``quantize``/``dequantize`` use floating point; they run at the float boundary (input batch,
float initialisation, evaluation logits), never inside a training step.
"""
from __future__ import annotations

import math

import torch

QMAX = 127
"""Largest int8 mantissa; the format is symmetric, so -QMAX is the smallest."""


def ceil_log2(m: int) -> int:
    """``ceil(log2 m)`` for an integer ``m >= 1`` (0 for ``m <= 1``), exactly, without floats."""
    return (m - 1).bit_length() if m > 1 else 0


def exponent_for(max_abs: float, qmax: int = QMAX, headroom_bits: int = 0) -> int:
    """The smallest exponent ``e`` with ``max_abs <= qmax * 2**e``, plus ``headroom_bits``.

    Headroom lets a tensor whose exponent stays fixed (weights, as in NITI) grow ``2**headroom``
    times beyond its initial range, at the cost of that many bits of resolution.
    """
    if max_abs <= 0:
        return 0
    return math.ceil(math.log2(max_abs / qmax)) + headroom_bits


def quantize(x: torch.Tensor, headroom_bits: int = 0, exponent: int | None = None) -> tuple[torch.Tensor, int]:
    """Float tensor -> ``(int8 q, e)`` with round-to-nearest and saturation to [-127, 127].

    The exponent is per tensor, from ``max|x|`` unless given. This is the float boundary: used on
    the input batch and on float initial weights, never inside an integer training step.
    """
    x = x.detach()
    if exponent is None:
        if x.numel():
            lo, hi = torch.aminmax(x)
            top = max(float(hi), -float(lo))
        else:
            top = 0.0
        exponent = exponent_for(top, headroom_bits=headroom_bits)
    q = (x * 2.0 ** (-exponent)).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q, exponent


def dequantize(q: torch.Tensor, e: int) -> torch.Tensor:
    """``q * 2**e`` as float32 (evaluation only)."""
    return q.to(torch.float32) * (2.0 ** e)


def saturate8(x: torch.Tensor) -> torch.Tensor:
    """Clamp an integer tensor to [-127, 127] and narrow it to int8."""
    return x.clamp(-QMAX, QMAX).to(torch.int8)


_SHIFT_AMOUNTS: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _amount(s: int, like: torch.Tensor) -> torch.Tensor:
    """``s`` as a cached 0-d tensor of ``like``'s dtype: shifting by a tensor takes the vectorised
    kernel, shifting by a Python int a scalar loop 10x slower (torch 2.13, CPU)."""
    key = (s, like.dtype, like.device)
    t = _SHIFT_AMOUNTS.get(key)
    if t is None:
        t = _SHIFT_AMOUNTS[key] = torch.tensor(s, dtype=like.dtype, device=like.device)
    return t


def shift_right(x: torch.Tensor, s: int, inplace: bool = False) -> torch.Tensor:
    """Arithmetic ``x >> s`` (floor division by ``2**s``) for ``s >= 0``; ``inplace`` reuses ``x``."""
    if s == 0:
        return x
    return torch.bitwise_right_shift(x, _amount(s, x), out=x if inplace else None)


def round_shift(x: torch.Tensor, s: int, inplace: bool = False) -> torch.Tensor:
    """``round(x / 2**s)`` (ties towards +inf) for ``s > 0``; ``x * 2**-s`` (left shift) for ``s <= 0``.

    ``inplace`` overwrites ``x`` (a temporary the caller owns) instead of allocating.
    """
    if s <= 0:
        if s == 0:
            return x
        return x.bitwise_left_shift_(-s) if inplace else x << (-s)
    y = x.add_(1 << (s - 1)) if inplace else x + (1 << (s - 1))
    return shift_right(y, s, inplace=True)


def stochastic_shift(x: torch.Tensor, s: int, generator: torch.Generator) -> torch.Tensor:
    """Unbiased stochastic rounding of ``x / 2**s``: ``floor((x + u) / 2**s)``, u ~ U{0..2**s - 1}.

    ``E[result] = x / 2**s`` exactly (the floor of ``x/2**s + U`` with U uniform on the 2**s grid
    points of [0, 1)), so updates far below one LSB still move the weights on average.
    Cost: one random integer per element. ``x`` should be int64 when ``s`` is large.
    """
    if s <= 0:
        return x << (-s) if s < 0 else x
    u = torch.empty_like(x).random_(0, 1 << s, generator=generator)
    return shift_right(u.add_(x), s, inplace=True)


def pseudo_stochastic_shift(x: torch.Tensor, s: int) -> torch.Tensor:
    """NITI's pseudo-stochastic rounding of ``x / 2**s``: no random numbers.

    Of the ``s`` discarded bits, the upper ``s - s//2`` decide the rounding probability and the
    lower ``s//2`` (noise-like for data-dependent values) serve as the threshold: round up when the
    upper part exceeds the lower part aligned to the same width. For ``s == 1`` it is round to
    nearest; ``s <= 0`` is an exact left shift. It is biased low by about ``2**-(u+1)`` LSB
    (u = s - s//2, the upper bits), the price of using no random numbers; never used for
    weight updates (those use ``stochastic_shift``); measured to cost accuracy through a 2-layer
    integer tail (docs/benchmarks.md), so errors default to round to nearest.
    """
    if s <= 0:
        return x << (-s) if s < 0 else x
    low_bits = s // 2
    if low_bits == 0:
        return round_shift(x, s)
    rem = x & ((1 << s) - 1)
    upper = shift_right(rem, low_bits)
    lower = (rem & ((1 << low_bits) - 1)) << (s - 2 * low_bits)
    return shift_right(x, s).add_((upper > lower).to(x.dtype))


def max_abs(x: torch.Tensor) -> int:
    """``max |x|`` of an integer tensor as a Python int, without materialising ``|x|``."""
    if x.numel() == 0:
        return 0
    lo, hi = torch.aminmax(x)
    return max(int(hi), -int(lo))


def requantize(acc: torch.Tensor, e_acc: int, rounding: str = "nearest",
               inplace: bool = False) -> tuple[torch.Tensor, int]:
    """int32 accumulator -> int8 by the smallest right shift that fits (research note 3.5.2).

    With ``b = ceil(log2 max|acc|)`` the shift is ``s = max(0, b - 7)`` and the new exponent
    ``e_acc + s``; ``max|acc| == 2**b`` rounds to 128 and saturates to 127 (one LSB of clipping).
    ``inplace`` (round to nearest only) overwrites ``acc``: no int32 temporary beside it.
    """
    s = max(0, ceil_log2(max_abs(acc)) - 7)
    if rounding == "nearest":
        shifted = round_shift(acc, s, inplace=inplace)
    else:
        shifted = pseudo_stochastic_shift(acc, s)
    return shifted.clamp_(-QMAX, QMAX).to(torch.int8) if inplace else saturate8(shifted), e_acc + s


def multiplier(scale: float, bits: int = 15) -> tuple[int, int]:
    """A positive real ``scale`` as an integer multiplier and right shift: ``scale ~= m * 2**-s``.

    ``m`` has ``bits`` bits (2**(bits-1) <= m < 2**bits), so the relative error is below 2**-bits.
    This is how a real learning rate enters integer arithmetic: ``SR(v * m, s)``.
    Returns ``(0, 0)`` for ``scale == 0``.
    """
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    if scale == 0:
        return 0, 0
    s = bits - 1 - math.floor(math.log2(scale))
    m = round(scale * 2.0 ** s)
    if m >= 1 << bits:  # rounding up across a power of two
        m, s = m >> 1, s - 1
    return m, s
