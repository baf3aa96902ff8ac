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

COLUMN_TILE_BYTES = 1 << 20
"""Budget of one int8 im2col tile (1 MiB): the batch is cut into tiles below this size. Smaller
tiles save memory but pay ~20 tensor ops of Python overhead each (LeNet-5 at batch 64: 256 KiB
tiles cost 0.4 ms more per forward than 1 MiB, for 1.3 MB less peak memory)."""


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


def _row_runs(x: torch.Tensor, kernel: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """Stride-1 im2col by image rows: ``x [C, B, H, W]`` (already padded) as ``[C, B, H*W + KW-1]``.

    Output pixel (oh, ow) of kernel offset (kh, kw) reads flat index ``(oh + kh)*W + ow + kw``, so
    for one offset all outputs of an image are the contiguous run starting at ``kh*W + kw``, if the
    output is computed on the full width W (columns ``ow >= OW`` are wrap-around garbage, cropped
    later). The columns are then a strided view with runs of ``OH*W`` elements: one fast copy.
    """
    c, b, h, w = x.shape
    flat = F.pad(x.reshape(c, b, h * w), (0, kernel[1] - 1))
    return flat, h * w + kernel[1] - 1


def conv_tiles(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
               matmul=int_matmul):
    """Yield ``(start, stop, acc)``: the int32 convolution ``[O, stop-start, OH, OW]`` of batch
    tile ``x[:, start:stop]`` (``x [C, B, H, W]`` int8, ``weight [O, C, KH, KW]`` int8), exact.

    Tiles hold at most ``COLUMN_TILE_BYTES`` of int8 columns. ``acc`` may be a strided view (the
    stride-1 path computes full-width rows and crops); the caller owns it and may modify it.
    Cost: B*OH*OW*O*C*KH*KW int8 MACs (+ (W - OW)/OW wasted on the stride-1 path).
    """
    c, b, h, w = x.shape
    o, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = conv_out_size(h, kh, sh, ph), conv_out_size(w, kw, sw, pw)
    w_mat = weight.reshape(o, -1)
    rows = (sh, sw) == (1, 1)
    if rows:
        xp = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
        wp = w + 2 * pw
        flat, per_image = _row_runs(xp, (kh, kw))
        per_sample = c * kh * kw * oh * wp
    else:
        per_sample = c * kh * kw * oh * ow
    tile = max(1, COLUMN_TILE_BYTES // max(1, per_sample))
    for start in range(0, b, tile):
        stop = min(b, start + tile)
        t = stop - start
        if rows:
            view = flat.as_strided((c, kh, kw, t, oh * wp), (b * per_image, wp, 1, per_image, 1),
                                   flat.storage_offset() + start * per_image)
            acc = matmul(w_mat, view.reshape(c * kh * kw, t * oh * wp)).view(o, t, oh, wp)[..., :ow]
        else:
            acc = matmul(w_mat, im2col(x[:, start:stop], (kh, kw), stride, padding)).view(o, t, oh, ow)
        yield start, stop, acc


def int_conv2d_cnhw(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int] = (1, 1),
                    padding: tuple[int, int] = (0, 0), matmul=int_matmul) -> torch.Tensor:
    """2-D convolution (cross-correlation, as ``nn.Conv2d``) of int8 ``x [C, B, H, W]`` with int8
    ``weight [O, C, KH, KW]``: int32 ``[O, B, OH, OW]``, exact.

    The integer network keeps spatial activations channels-first ([C, B, H, W]) so that the
    product ``W [O, CKK] @ cols [CKK, B*OH*OW]`` lands in the next layer's layout with no
    transpose. The tiles of ``conv_tiles`` are written into one output.
    """
    c, b, h, w = x.shape
    o, _, kh, kw = weight.shape
    oh = conv_out_size(h, kh, stride[0], padding[0])
    ow = conv_out_size(w, kw, stride[1], padding[1])
    out = torch.empty((o, b, oh, ow), dtype=torch.int32, device=x.device)
    for start, stop, acc in conv_tiles(x, weight, stride, padding, matmul):
        out[:, start:stop].copy_(acc)
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
