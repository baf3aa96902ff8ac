"""Integer matrix products and convolutions: int8 x int8 -> int32.

``int_matmul`` is the fast path (``torch._int_mm``, a VNNI/AVX-512 int8 GEMM on x86 CPUs);
``int_matmul_reference`` is the obviously correct int64 product it is tested against.
Convolutions are im2col on the int8 tensor (``Tensor.unfold`` views; ``F.unfold`` only takes
floats) followed by the same product. The batch is processed in tiles so that the int8 column
buffer stays small; the int32 output is the only full-size buffer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CUDA_MIN_ROWS = 17
"""``torch._int_mm`` on CUDA needs more than 16 rows and inner/outer sizes that are multiples of 8;
on CPU it takes any shape. Other devices get zero padding to those constraints."""
CUDA_ALIGN = 8

COLUMN_TILE_BYTES = 1 << 18
"""Budget of one int8 im2col tile (256 KiB): the batch is cut into tiles below this size."""


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if x.shape == (rows, cols):
        return x
    return F.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]))


def int_matmul(a: torch.Tensor, b: torch.Tensor, pad: bool | None = None) -> torch.Tensor:
    """``a @ b`` for int8 ``a [M, K]`` and ``b [K, N]``, exact, as int32 ``[M, N]``.

    Exact while ``K * 127**2 < 2**31`` (K < 133,000). Zero padding to the CUDA shape constraints is
    applied off CPU, or when ``pad`` is True (so the padded path is testable anywhere); zeros add
    nothing to the products, so padding is exact.
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int_matmul takes int8 operands, got {a.dtype} and {b.dtype}")
    if pad is None:
        pad = a.device.type != "cpu"
    if not pad:
        return torch._int_mm(a, b)
    m, k = a.shape
    n = b.shape[1]
    up = lambda v: -(-v // CUDA_ALIGN) * CUDA_ALIGN  # noqa: E731
    mp, kp, np_ = max(m, CUDA_MIN_ROWS), up(k), up(n)
    return torch._int_mm(_pad_to(a, mp, kp), _pad_to(b, kp, np_).contiguous())[:m, :n]


def int_matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The reference: the same product in int64, then narrowed to int32."""
    return (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)


def im2col(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
           padding: tuple[int, int]) -> torch.Tensor:
    """Columns of an integer ``x [C, B, H, W]`` (channels first, then batch): ``[C*KH*KW, B*OH*OW]``.

    Rows are ordered (c, kh, kw), matching ``conv.weight.reshape(out, -1)``. Built from ``unfold``
    views and one copy whose innermost loop runs along an image row (the [C, B, H, W] layout makes
    that copy ~7x faster than gathering [B*OH*OW, C*KH*KW] from NCHW).
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    c, b = x.shape[:2]
    patches = x.unfold(2, kh, sh).unfold(3, kw, sw)  # [C, B, OH, OW, KH, KW]
    oh, ow = patches.shape[2:4]
    return patches.permute(0, 4, 5, 1, 2, 3).reshape(c * kh * kw, b * oh * ow)


def conv_out_size(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def int_conv2d_cnhw(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int] = (1, 1),
                    padding: tuple[int, int] = (0, 0), matmul=int_matmul) -> torch.Tensor:
    """2-D convolution (cross-correlation, as ``nn.Conv2d``) of int8 ``x [C, B, H, W]`` with int8
    ``weight [O, C, KH, KW]``: int32 ``[O, B, OH, OW]``, exact.

    The integer network keeps spatial activations channels-first ([C, B, H, W]) so that the
    product ``W [O, CKK] @ cols [CKK, B*OH*OW]`` lands in the next layer's layout with no
    transpose. im2col per batch tile (at most ``COLUMN_TILE_BYTES`` of columns); each tile's
    int32 product is written straight into the output. Cost: B*OH*OW*O*C*KH*KW int8 MACs.
    """
    c, b, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh = conv_out_size(h, kh, stride[0], padding[0])
    ow = conv_out_size(w, kw, stride[1], padding[1])
    w_mat = weight.reshape(o, -1)
    out = torch.empty((o, b, oh, ow), dtype=torch.int32, device=x.device)
    tile = max(1, COLUMN_TILE_BYTES // max(1, oh * ow * c * kh * kw))
    if tile >= b:
        out.view(o, -1).copy_(matmul(w_mat, im2col(x, (kh, kw), stride, padding)))
        return out
    for start in range(0, b, tile):
        stop = min(b, start + tile)
        cols = im2col(x[:, start:stop], (kh, kw), stride, padding)
        out[:, start:stop].copy_(matmul(w_mat, cols).view(o, stop - start, oh, ow))
    return out


def int_conv2d(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int] = (1, 1),
               padding: tuple[int, int] = (0, 0), matmul=int_matmul) -> torch.Tensor:
    """``int_conv2d_cnhw`` for NCHW ``x [B, C, H, W]``: int32 ``[B, O, OH, OW]`` (a transposed view)."""
    return int_conv2d_cnhw(x.transpose(0, 1), weight, stride, padding, matmul).transpose(0, 1)


def int_conv2d_reference(x: torch.Tensor, weight: torch.Tensor, stride=(1, 1), padding=(0, 0)) -> torch.Tensor:
    """Reference: float64 convolution of the same integers. Exact, since every partial sum is an
    integer below 2**53 in magnitude; rounded back to int32."""
    y = F.conv2d(x.to(torch.float64), weight.to(torch.float64), stride=stride, padding=padding)
    return torch.round(y).to(torch.int32)


def int_linear(x: torch.Tensor, weight: torch.Tensor, matmul=int_matmul) -> torch.Tensor:
    """``x @ weight.T`` for int8 ``x [B, I]`` and ``weight [O, I]``: int32 ``[B, O]``."""
    return matmul(x, weight.t())
