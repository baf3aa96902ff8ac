"""Integer layers and the integer sequential model, converted from a float ``nn.Sequential``.

Each parametrised layer holds int8 mantissas and fixed per-tensor exponents (NITI keeps weight
exponents fixed; so do we). The forward takes and returns ``(int8 activation, exponent)``:

    Linear / Conv2d   int8 x int8 -> int32 (``int_ops``), bias aligned to the accumulator exponent
                      by a shift and added in int32, then ``requantize`` back to int8;
    ReLU              ``max(x, 0)`` on int8, exponent unchanged;
    MaxPool2d         on int8 (max commutes with a shared positive scale);
    Flatten           a view.

``perturb(name, q) -> q'`` is called on every parameter at use, so a ZO method can substitute a
perturbed temporary without ever writing it into the weights. ``tape`` (a list) makes layers
from ``tape_from`` on record what the integer backward (``backward``) needs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ZotuneError
from .fixed import QMAX, max_abs, quantize, requantize, round_shift
from .fixed import ceil_log2
from .int_ops import conv_out_size, conv_tiles, int_conv2d_cnhw, int_linear, int_matmul

Perturb = Callable[[str, torch.Tensor], torch.Tensor]


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _aligned_bias(bias: torch.Tensor, e_bias: int, e_acc: int) -> torch.Tensor:
    """The int8 bias as int32 at the accumulator's exponent (left shift, or round-to-nearest right shift)."""
    b = bias.to(torch.int32)
    shift = e_bias - e_acc
    if shift > 0:
        # 127 << 23 still fits int32 with room for the sum; a larger gap means a saturated layer anyway
        return b << min(shift, 23)
    return round_shift(b, -shift)


class IntParamLayer:
    """Shared parts of Linear and Conv2d: int8 ``weight``/``bias`` and their fixed exponents."""

    kind = "param"

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None, headroom_bits: int):
        self.name = name
        self.weight, self.e_weight = quantize(weight, headroom_bits)
        self.bias, self.e_bias = (None, 0) if bias is None else quantize(bias, headroom_bits)

    def params(self) -> dict[str, torch.Tensor]:
        out = {f"{self.name}.weight": self.weight}
        if self.bias is not None:
            out[f"{self.name}.bias"] = self.bias
        return out

    def exponents(self) -> dict[str, int]:
        out = {f"{self.name}.weight": self.e_weight}
        if self.bias is not None:
            out[f"{self.name}.bias"] = self.e_bias
        return out

    def _operands(self, perturb: Perturb | None):
        w, b = self.weight, self.bias
        if perturb is not None:
            w = perturb(f"{self.name}.weight", w)
            if b is not None:
                b = perturb(f"{self.name}.bias", b)
        return w, b

    def _finish(self, acc: torch.Tensor, e_acc: int, b: torch.Tensor | None, bias_shape) -> tuple[torch.Tensor, int]:
        if b is not None:
            acc += _aligned_bias(b, self.e_bias, e_acc).view(bias_shape)
        return requantize(acc, e_acc, inplace=True)


class IntLinear(IntParamLayer):
    def __init__(self, name: str, layer: nn.Linear, headroom_bits: int):
        super().__init__(name, layer.weight, layer.bias, headroom_bits)

    def forward(self, x, e, perturb=None, tape=None):
        w, b = self._operands(perturb)
        if tape is not None:
            tape.append((self, (x, e, w)))
        return self._finish(int_linear(x, w), e + self.e_weight, b, (1, -1))

    def backward(self, saved, err: torch.Tensor, e_err: int, grads: dict, need_input_error: bool,
                 rounding: str = "nearest"):
        """NITI-style: ``dW = err^T x`` and ``db = sum err`` (exact integers, accumulated into
        ``grads``), ``err_prev = err W`` requantised to int8 (``rounding``: nearest or pseudo)."""
        x, e_x, w = saved
        _accumulate(grads, f"{self.name}.weight", int_matmul(err.t(), x), e_err + e_x)
        if self.bias is not None:
            _accumulate(grads, f"{self.name}.bias", err.sum(dim=0), e_err)
        if not need_input_error:
            return None, 0
        return requantize(int_matmul(err, w), e_err + self.e_weight, rounding=rounding)


class IntConv2d(IntParamLayer):
    def __init__(self, name: str, layer: nn.Conv2d, headroom_bits: int):
        if layer.groups != 1 or _pair(layer.dilation) != (1, 1) or not isinstance(layer.padding, (int, tuple)):
            raise ZotuneError(f"integer Conv2d {name!r}: only groups=1, dilation=1 and numeric padding "
                              f"are supported, got groups={layer.groups}, dilation={layer.dilation}, "
                              f"padding={layer.padding!r}")
        if layer.padding_mode != "zeros":
            raise ZotuneError(f"integer Conv2d {name!r}: padding_mode must be 'zeros', got {layer.padding_mode!r}")
        super().__init__(name, layer.weight, layer.bias, headroom_bits)
        self.stride, self.padding = _pair(layer.stride), _pair(layer.padding)

        self.pool: tuple[tuple[int, int], tuple[int, int]] | None = None  # set by fuse_relu_pool

    def fuse_relu_pool(self, pool: "IntMaxPool2d") -> None:
        """Run the following ReLU and max-pool inside this layer, on the int32 accumulator.

        Bit-identical to conv -> requantise -> ReLU -> pool (tested): requantisation (a rounding
        shift, then clamping) and ReLU are monotone non-decreasing maps with q(0) = 0, so they
        commute with max and with each other; the shift still comes from max|acc| over the whole
        pre-pool accumulator (tracked per tile). The full-size int32 output is never held: only
        the pooled one, 1/(k_h k_w) of it.
        """
        self.pool = (pool.kernel, pool.stride)

    def forward(self, x, e, perturb=None, tape=None):
        if tape is not None:
            raise ZotuneError(f"the integer backprop tail supports Linear, ReLU and Flatten layers; "
                              f"Conv2d {self.name!r} is inside it (use fewer --bp-layers)")
        w, b = self._operands(perturb)
        e_acc = e + self.e_weight
        bias = None if b is None else _aligned_bias(b, self.e_bias, e_acc).view(-1, 1, 1, 1)
        if self.pool is None:
            acc = int_conv2d_cnhw(x, w, self.stride, self.padding)
            return self._finish(acc, e_acc, b, (-1, 1, 1, 1))
        (pk, ps), (c, batch, h, wd) = self.pool, x.shape
        oh = conv_out_size(h, w.shape[2], self.stride[0], self.padding[0])
        ow = conv_out_size(wd, w.shape[3], self.stride[1], self.padding[1])
        pooled = torch.empty((w.shape[0], batch, (oh - pk[0]) // ps[0] + 1, (ow - pk[1]) // ps[1] + 1),
                             dtype=torch.int32, device=x.device)
        peak = 0
        for start, stop, acc in conv_tiles(x, w, self.stride, self.padding):
            if bias is not None:
                acc += bias
            peak = max(peak, max_abs(acc))
            pooled[:, start:stop] = max_pool2d_int(acc, pk, ps, (0, 0))
        shift = max(0, ceil_log2(peak) - 7)
        y = round_shift(pooled, shift, inplace=True).clamp_(0, QMAX).to(torch.int8)  # clamp at 0: the ReLU
        return y, e_acc + shift


class IntFused:
    """Placeholder of a ReLU or max-pool that runs inside the preceding ``IntConv2d``."""

    kind = "fused"

    def __init__(self, layer):
        self.name = layer.name

    def forward(self, x, e, perturb=None, tape=None):
        return x, e


class IntReLU:
    kind = "relu"

    def __init__(self, name: str):
        self.name = name

    def forward(self, x, e, perturb=None, tape=None):
        y = x.clamp_min(0)
        if tape is not None:
            tape.append((self, y))
        return y, e

    def backward(self, y, err, e_err, grads, need_input_error, rounding="nearest"):
        return torch.where(y > 0, err, torch.zeros_like(err)), e_err


class IntMaxPool2d:
    kind = "pool"

    def __init__(self, name: str, layer: nn.MaxPool2d):
        if _pair(layer.dilation) != (1, 1) or layer.ceil_mode or layer.return_indices:
            raise ZotuneError(f"integer MaxPool2d {name!r}: dilation=1, ceil_mode=False only")
        self.name = name
        self.kernel, self.stride, self.padding = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size), _pair(layer.padding)

    def forward(self, x, e, perturb=None, tape=None):
        if tape is not None:
            raise ZotuneError(f"the integer backprop tail supports Linear, ReLU and Flatten layers; "
                              f"MaxPool2d {self.name!r} is inside it (use fewer --bp-layers)")
        return max_pool2d_int(x, self.kernel, self.stride, self.padding), e


class IntFlatten:
    kind = "flatten"

    def __init__(self, name: str, layer: nn.Flatten):
        if layer.start_dim != 1 or layer.end_dim != -1:
            raise ZotuneError(f"integer Flatten {name!r}: only start_dim=1, end_dim=-1 is supported")
        self.name = name

    def forward(self, x, e, perturb=None, tape=None):
        if tape is not None:
            tape.append((self, x.shape))
        if x.dim() == 4:  # [C, B, H, W] -> [B, C*H*W], the float model's order
            return x.transpose(0, 1).reshape(x.shape[1], -1), e
        return x.reshape(x.shape[0], -1), e

    def backward(self, shape, err, e_err, grads, need_input_error, rounding="nearest"):
        if len(shape) == 4:
            c, b, h, w = shape
            return err.reshape(b, c, h, w).transpose(0, 1), e_err
        return err.reshape(shape), e_err


def max_pool2d_int(x: torch.Tensor, kernel, stride, padding) -> torch.Tensor:
    """Max-pooling of an integer ``[N, C, H, W]`` as elementwise maxima of strided views: rows
    first, then columns (k_h + k_w - 2 maxima). ``F.max_pool2d`` on int8 is exact too but runs a
    scalar loop ~15x slower (torch 2.13, CPU); they are tested equal."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if ph or pw:  # padding never wins: pad with the smallest int8 mantissa
        x = F.pad(x, (pw, pw, ph, ph), value=-QMAX)
    oh, ow = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    rows = x[:, :, 0:sh * (oh - 1) + 1:sh]
    for i in range(1, kh):
        rows = torch.maximum(rows, x[:, :, i:i + sh * (oh - 1) + 1:sh])
    out = rows[..., 0:sw * (ow - 1) + 1:sw]
    for j in range(1, kw):
        out = torch.maximum(out, rows[..., j:j + sw * (ow - 1) + 1:sw])
    return out.contiguous()


def _accumulate(grads: dict, name: str, value: torch.Tensor, exponent: int) -> None:
    """``grads[name] += value * 2**exponent`` exactly, in int64, at the smaller of the two exponents.

    Passes of one step can requantise to different exponents; aligning by left shifts keeps the sum
    exact (int32 products shifted by a few bits stay far inside int64).
    """
    value = value.to(torch.int64)
    if name not in grads:
        grads[name] = (value, exponent)
        return
    acc, e_acc = grads[name]
    if exponent >= e_acc:
        grads[name] = (acc + (value << min(exponent - e_acc, 30)), e_acc)
    else:
        grads[name] = ((acc << min(e_acc - exponent, 30)) + value, exponent)


class IntSequential:
    """An integer network: a list of integer layers run in order on ``(int8, exponent)``."""

    def __init__(self, layers: list):
        self.layers = layers
        self.param_layers = [layer for layer in layers if layer.kind == "param"]

    @classmethod
    def from_float(cls, model: nn.Sequential, headroom_bits: int = 1, fuse: bool = True) -> "IntSequential":
        """Convert a float ``nn.Sequential`` of Conv2d / Linear / ReLU / MaxPool2d / Flatten.

        Weights and biases are quantised per tensor (round to nearest) with ``headroom_bits`` of
        headroom, since their exponents then stay fixed for the whole training. ``fuse`` runs each
        Conv2d -> ReLU -> MaxPool2d (unpadded) as one layer on the int32 accumulator, with
        identical results and a 4x smaller accumulator (``IntConv2d.fuse_relu_pool``).
        """
        if not isinstance(model, nn.Sequential):
            raise ZotuneError(f"the integer model is converted from an nn.Sequential, got {type(model).__name__}")
        builders = {nn.Linear: lambda n, m: IntLinear(n, m, headroom_bits),
                    nn.Conv2d: lambda n, m: IntConv2d(n, m, headroom_bits),
                    nn.ReLU: lambda n, m: IntReLU(n), nn.MaxPool2d: IntMaxPool2d, nn.Flatten: IntFlatten}
        layers = []
        for name, module in model.named_children():
            build = builders.get(type(module))
            if build is None:
                raise ZotuneError(f"cannot convert layer {name!r} ({type(module).__name__}) to integers; "
                                  f"supported: {', '.join(t.__name__ for t in builders)}")
            layers.append(build(name, module))
        if fuse:
            for i in range(len(layers) - 2):
                conv, relu, pool = layers[i:i + 3]
                if (isinstance(conv, IntConv2d) and isinstance(relu, IntReLU) and isinstance(pool, IntMaxPool2d)
                        and pool.padding == (0, 0)):
                    conv.fuse_relu_pool(pool)
                    layers[i + 1], layers[i + 2] = IntFused(relu), IntFused(pool)
        return cls(layers)

    def params(self) -> dict[str, torch.Tensor]:
        out = {}
        for layer in self.param_layers:
            out.update(layer.params())
        return out

    def exponents(self) -> dict[str, int]:
        out = {}
        for layer in self.param_layers:
            out.update(layer.exponents())
        return out

    def set_param(self, name: str, value: torch.Tensor) -> None:
        layer_name, attr = name.rsplit(".", 1)
        layer = next(lay for lay in self.param_layers if lay.name == layer_name)
        setattr(layer, attr, value)

    def tail_start(self, bp_layers: int) -> int:
        """Index in ``layers`` of the first of the last ``bp_layers`` parametrised layers."""
        n = len(self.param_layers)
        if not 0 <= bp_layers <= n:
            raise ZotuneError(f"bp_layers must be between 0 and {n} (the model's parametrised layers), got {bp_layers}")
        if bp_layers == 0:
            return len(self.layers)
        return self.layers.index(self.param_layers[n - bp_layers])

    def forward(self, x, e, perturb: Perturb | None = None, start: int = 0, stop: int | None = None,
                tape: list | None = None):
        """Run ``layers[start:stop]`` on int8 ``x`` with exponent ``e``; returns ``(int8, exponent)``.

        Images enter as [B, C, H, W] (at ``start == 0``); inside, spatial activations are kept
        channels-first [C, B, H, W] (see ``int_conv2d_cnhw``) until ``Flatten`` restores [B, features].
        """
        if start == 0 and x.dim() == 4:
            x = x.transpose(0, 1)
        for layer in self.layers[start:stop]:
            x, e = layer.forward(x, e, perturb, tape)
        return x, e

    def backward(self, tape: list, err: torch.Tensor, e_err: int, grads: dict, rounding: str = "nearest") -> None:
        """Integer backward through the recorded layers, accumulating integer gradients into ``grads``;
        ``rounding`` of the back-propagated errors: ``nearest`` or NITI's ``pseudo``."""
        for i in range(len(tape) - 1, -1, -1):
            layer, saved = tape[i]
            err, e_err = layer.backward(saved, err, e_err, grads, need_input_error=i > 0, rounding=rounding)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Float logits for evaluation: quantise the images, integer forward, dequantise."""
        x, e = quantize(images)
        y, e = self.forward(x, e)
        return y.to(torch.float32) * (2.0 ** e)

    def to_float_state(self) -> dict[str, torch.Tensor]:
        """Dequantised parameters, keyed like the float model's ``state_dict``."""
        exps = self.exponents()
        return {k: v.to(torch.float32) * (2.0 ** exps[k]) for k, v in self.params().items()}

