"""Small image classifiers for training from scratch: LeNet-5, DeepZero's small CNN family, ResNet-20.

Every model is an ``nn.Sequential`` whose children are its layer units, so its block table
(``models.blocks``: one block per child) and ElasticZO's split (``models.split``: the last k
children holding parameters) need no entry of their own. ``MODELS`` maps ``--model`` names to
builders ``(num_classes, in_channels) -> nn.Sequential``.

BatchNorm trains on batch statistics. A ZO step runs several forwards of one batch at perturbed
points; :class:`OnePassStatistics` lets only the first of them update the running statistics, so
the model's evaluation statistics move once per step, as under backprop.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ..errors import ZotuneError


def lenet5(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """LeNet-5 for 28x28 inputs (LeCun et al., 1998; the ElasticZO paper's model), with ReLU and
    max-pooling: 61,706 parameters for 10 classes. Its parametrised layers are conv1, conv2, fc1,
    fc2, fc3 (children 0, 3, 7, 9, 11)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def small_cnn(num_classes: int = 10, in_channels: int = 3, widths: Sequence[int] = (18,), *,
              kernel_size: int = 3, batch_norm: bool = True, pool: bool = True) -> nn.Sequential:
    """A conv/BN/ReLU/max-pool stack with a global-average-pooled linear head.

    One child per conv stage (``Conv2d(k, padding=k//2) -> BatchNorm2d -> ReLU -> MaxPool2d(2)``),
    then ``head`` (pool to 1x1, flatten, ``Linear(widths[-1], num_classes)``). With width 18 and a
    3x3 kernel on RGB the parameter counts are DeepZero's family (``deepzero_cnn``): depth 1: 730,
    each further stage +2,970 (18*18*9 weights + 18 biases + 36 BN), depth 5: 12,610. Max pooling
    stops once the feature map is 1x1 (``pool``)."""
    if not widths or any(int(w) < 1 for w in widths):
        raise ZotuneError(f"small_cnn widths must be positive integers, got {list(widths)}")
    layers, c = [], in_channels
    for w in widths:
        stage = [nn.Conv2d(c, int(w), kernel_size, padding=kernel_size // 2)]
        stage += [nn.BatchNorm2d(int(w))] if batch_norm else []
        stage += [nn.ReLU()] + ([_HalvePool()] if pool else [])
        layers.append(nn.Sequential(*stage))
        c = int(w)
    layers.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)))
    return nn.Sequential(*layers)


class _HalvePool(nn.Module):
    """``MaxPool2d(2)`` while the map is at least 2x2, identity after (deep stacks on small maps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x


DEEPZERO_CNN = {730: 1, 3700: 2, 6670: 3, 9640: 4, 12610: 5}
"""DeepZero's CIFAR-10 CNN sizes (research/ranksgd_deepzero.md, B.8) -> depth at width 18."""


def deepzero_cnn(params: int = 730, num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """The small CNN of DeepZero's family with ``params`` parameters (730 ... 12,610)."""
    if params not in DEEPZERO_CNN:
        raise ZotuneError(f"no DeepZero CNN with {params} parameters; valid: {', '.join(map(str, DEEPZERO_CNN))}")
    return small_cnn(num_classes, in_channels, (18,) * DEEPZERO_CNN[params])


CNN_WIDTH, CNN_DEPTH = 18, 2


def cnn(num_classes: int = 10, in_channels: int = 3, width: int | None = None,
        depth: int | None = None) -> nn.Sequential:
    """``--model cnn``: :func:`small_cnn` with ``depth`` stages of ``width`` channels (defaults 18
    and 2). Parameters: ``9 w^2 (D - 1) + w (9 c + 3 D + k) + k`` for c input channels and k
    classes; on Fashion-MNIST (c = 1, k = 10) at depth 2, width 8, 19 and 36 give 786, 3,734 and
    12,574 (DeepZero's 730, 3,700 and 12,610 are depth 1, 2 and 5 at width 18 on RGB:
    ``cnn-730`` ...)."""
    width = CNN_WIDTH if width is None else width
    depth = CNN_DEPTH if depth is None else depth
    for name, v in (("cnn_width", width), ("cnn_depth", depth)):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ZotuneError(f"{name} must be an integer >= 1, got {v!r}")
    return small_cnn(num_classes, in_channels, (width,) * depth)


class BasicBlock(nn.Module):
    """ResNet's basic block with the parameter-free option-A shortcut (He et al., 2016, CIFAR):
    stride-2 subsampling and zero-padded channels when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x[:, :, ::self.stride, ::self.stride] if self.stride != 1 else x
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """ResNet-20 for 32x32 inputs (He et al., 2016): a 16-channel stem, three stages of three
    basic blocks (16, 32, 64 channels), global average pooling and a linear head; 269,722
    parameters for 10 classes (DeepZero's count). Children: stem, the nine blocks, pool, head."""
    layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
                                             nn.BatchNorm2d(16), nn.ReLU())]
    c = 16
    for width, stride in ((16, 1), (32, 2), (64, 2)):
        for b in range(3):
            layers.append(BasicBlock(c, width, stride if b == 0 else 1))
            c = width
    layers += [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[..., nn.Sequential]] = {
    "lenet5": lenet5,
    "small-cnn": small_cnn,
    "resnet20": resnet20,
    "cnn": cnn,
    **{f"cnn-{p}": (lambda p: lambda num_classes=10, in_channels=3: deepzero_cnn(p, num_classes, in_channels))(p)
       for p in DEEPZERO_CNN},
}
"""``--model`` name -> builder ``(num_classes, in_channels) -> nn.Sequential``."""


def build_model(name: str, num_classes: int, in_channels: int, **options) -> nn.Sequential:
    """The model called ``name``; a ZotuneError naming the valid models otherwise. ``options``
    (``width``, ``depth``) are the ``cnn`` model's; set for another model, they are an error."""
    builder = MODELS.get(name)
    if builder is None:
        raise ZotuneError(f"unknown image model {name!r}; valid: {', '.join(MODELS)}")
    options = {k: v for k, v in options.items() if v is not None}
    if options and name != "cnn":
        raise ZotuneError(f"--cnn-{'/--cnn-'.join(options)} applies to --model cnn only, not {name!r}")
    return builder(num_classes=num_classes, in_channels=in_channels, **options)


class OnePassStatistics:
    """Let only the first forward of a step update BatchNorm's running statistics.

    ``wrap(closure)`` returns a closure that runs as given on its first call and, on every later
    call, restores the running mean, variance and batch count it found (so the - pass, and a
    ``clean`` pass, use batch statistics but leave the running ones as the + pass left them).
    Call :meth:`wrap` once per step. Cost: one copy of the BN buffers per extra pass."""

    def __init__(self, model: nn.Module) -> None:
        self.bns = [m for m in model.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]

    def wrap(self, closure: Callable):
        if not self.bns:
            return closure
        calls = [0]

        def run():
            calls[0] += 1
            if calls[0] == 1:
                return closure()
            saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                     for m in self.bns]
            try:
                return closure()
            finally:
                for m, (mean, var, count) in zip(self.bns, saved):
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(count)
        if hasattr(closure, "coordinate_losses"):  # batched queries leave running stats alone
            run.coordinate_losses = closure.coordinate_losses
        return run
