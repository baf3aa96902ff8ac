"""Image classification data for training small networks from scratch: Fashion-MNIST and CIFAR-10.

No torchvision: Fashion-MNIST is read from its four IDX files (gzip or raw), CIFAR-10 from the
python-pickle batches of its official archive (``data_batch_1`` ... ``data_batch_5``,
``test_batch``). Where the files are looked for: ``--data-dir``, else ``$ZOTUNE_DATA``, each with
the task's folder (``fashion-mnist/``, ``cifar-10-batches-py/``) or the files directly in it;
for Fashion-MNIST without ``--data-dir``, Debian's ``dataset-fashion-mnist`` location
``/usr/share/datasets/fashion-mnist/`` comes first when it holds the files. A missing, truncated or malformed file is a one-line
:class:`~zotune.tasks.DataNotFoundError` / :class:`~zotune.tasks.TaskDataError` naming the file
and what was expected.

Batches are a pure function of ``(seed, step)``: epoch e's order is a permutation drawn from a
generator keyed by ``(seed, e)`` (the last partial batch is dropped), and CIFAR-10's optional
augmentation (random 32x32 crop of the 4-pixel zero-padded image, horizontal flip) is keyed by
``(seed, step)``; so a resumed run sees exactly the batches the uninterrupted one would.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import rng
from .base import DataNotFoundError, TaskDataError
from .data import ENV_VAR, resolve_data_dir

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                       "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"

# Per-channel mean and std of the training images (scaled to [0, 1]).
NORMALISATION = {"fashion-mnist": ((0.2860,), (0.3530,)),
                 "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))}


# ------------------------------------------------------------------------------------ readers

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format; gzip-compressed when its name ends in ``.gz``) as an
    array: magic ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32 sizes, then the data."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise TaskDataError(f"{path}: cannot read it as {'gzip' if path.suffix == '.gz' else 'IDX'} "
                            f"({err}); expected an IDX file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise TaskDataError(f"{path}: not an IDX file: magic {raw[:4].hex(' ') or 'missing'}, expected "
                            "00 00 <type 08..0e> <ndim>")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise TaskDataError(f"{path}: truncated IDX header: {len(raw)} bytes, expected at least {header}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(raw) != expected:
        raise TaskDataError(f"{path}: {'truncated' if len(raw) < expected else 'oversized'} IDX file: "
                            f"{len(raw)} bytes, expected {expected} for shape {tuple(shape)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _candidates(data_dir, folder: str) -> list[Path]:
    base = resolve_data_dir(data_dir)
    return [base / folder, base] if base is not None else []


def _find(stem: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for name in (stem, stem + ".gz"):
            if (d / name).is_file():
                return d / name
    return None


def fashion_mnist_dir(data_dir=None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order: an explicit ``data_dir`` only; without one,
    Debian's location (when it holds the files), then ``$ZOTUNE_DATA``."""
    if data_dir is not None and str(data_dir) != "":
        return _candidates(data_dir, "fashion-mnist")
    return [DEBIAN_FASHION_MNIST] + _candidates(None, "fashion-mnist")


@dataclass
class ImageData:
    """Train and test images (uint8 ``[N, C, H, W]``) and labels (int64), with the class count."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int = 10

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]


def load_fashion_mnist(data_dir=None) -> ImageData:
    """Fashion-MNIST (60,000 train and 10,000 test 28x28 grey images, 10 classes)."""
    dirs = fashion_mnist_dir(data_dir)
    arrays = {}
    for key, stem in FASHION_MNIST_FILES.items():
        path = _find(stem, dirs)
        if path is None:
            looked = ", ".join(str(d / (stem + "[.gz]")) for d in dirs) or "nowhere"
            raise DataNotFoundError(f"fashion-mnist: {stem} not found (looked at {looked}); give the folder "
                                    f"with the four IDX files by --data-dir DIR or ${ENV_VAR} (DIR/fashion-mnist/)")
        arrays[key] = (path, read_idx(path))
    for split in ("train", "test"):
        (ip, images), (lp, labels) = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise TaskDataError(f"{ip}: images of shape {images.shape} do not match {lp}'s labels of shape "
                                f"{labels.shape}; expected [N, 28, 28] images and [N] labels")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise TaskDataError(f"{lp}: labels must be 0..9, found {labels.min()}..{labels.max()}")
    t = lambda key: torch.from_numpy(np.ascontiguousarray(arrays[key][1]))  # noqa: E731
    return ImageData("fashion-mnist", t("train_images")[:, None], t("train_labels").long(),
                     t("test_images")[:, None], t("test_labels").long())


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as err:  # noqa: BLE001 (any unpickling failure is a bad file)
        raise TaskDataError(f"{path}: cannot unpickle it ({type(err).__name__}: {err}); expected a "
                            "CIFAR-10 python batch") from None
    if not isinstance(batch, dict):
        raise TaskDataError(f"{path}: holds a {type(batch).__name__}, expected a dict with b'data' and b'labels'")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    data = None if data is None else np.asarray(data)
    if data is None or labels is None or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise TaskDataError(f"{path}: not in the CIFAR-10 python layout: expected b'data' uint8 [N, 3072] and "
                            f"b'labels' of N ints, found keys {sorted(map(str, batch))}"
                            + (f", data shape {data.shape}" if data is not None else ""))
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise TaskDataError(f"{path}: labels must be 0..9, found {labels.min()}..{labels.max()}")
    return data.astype(np.uint8).reshape(-1, 3, 32, 32), labels


def load_cifar10(data_dir=None) -> ImageData:
    """CIFAR-10 from the python batches (50,000 train, 10,000 test 32x32 RGB images)."""
    dirs = _candidates(data_dir, "cifar-10-batches-py")
    if not dirs:
        raise DataNotFoundError(f"cifar10: no data folder; give the folder of the python batches "
                                f"(cifar-10-batches-py/) by --data-dir DIR or ${ENV_VAR}")
    where = next((d for d in dirs if (d / CIFAR10_TEST).is_file()), None)
    if where is None:
        raise DataNotFoundError(f"cifar10: {CIFAR10_TEST} not found in {' or '.join(map(str, dirs))}; expected "
                                f"the python layout: {', '.join(CIFAR10_TRAIN)}, {CIFAR10_TEST}")
    missing = [n for n in CIFAR10_TRAIN if not (where / n).is_file()]
    if missing:
        raise DataNotFoundError(f"cifar10: {where} lacks {', '.join(missing)}; expected the python layout: "
                                f"{', '.join(CIFAR10_TRAIN)}, {CIFAR10_TEST}")
    parts = [_read_cifar_batch(where / n) for n in CIFAR10_TRAIN]
    test = _read_cifar_batch(where / CIFAR10_TEST)
    return ImageData("cifar10", torch.from_numpy(np.concatenate([p[0] for p in parts])),
                     torch.from_numpy(np.concatenate([p[1] for p in parts])),
                     torch.from_numpy(test[0]), torch.from_numpy(test[1]))


IMAGE_TASKS = {"fashion-mnist": load_fashion_mnist, "cifar10": load_cifar10}
"""Image task name -> loader ``(data_dir) -> ImageData``."""


# --------------------------------------------------------------------------- batches

def normalise(images: torch.Tensor, task: str) -> torch.Tensor:
    """uint8 images as float32 ``(x / 255 - mean) / std`` per channel."""
    mean, std = NORMALISATION[task]
    shape = (1, -1, 1, 1)
    return (images.float() / 255.0 - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def augment(images: torch.Tensor, key: int) -> torch.Tensor:
    """The standard CIFAR augmentation, from one key: per image, a random 32x32 crop of the
    4-pixel zero-padded image and a horizontal flip with probability 1/2."""
    n, _, h, w = images.shape
    g = rng.generator(key)
    dx, dy = torch.randint(0, 9, (n,), generator=g), torch.randint(0, 9, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(-1)
    return out


class Batches:
    """Deterministic training batches: ``batch(step)`` is a pure function of ``(seed, step)``.

    Args:
        images, labels: the training split (uint8 images). task: for the normalisation.
        batch_size: images per batch; ``steps_per_epoch = len(images) // batch_size``.
        seed: the run seed. augment: apply :func:`augment` (CIFAR-10).
    """

    def __init__(self, images, labels, task: str, batch_size: int, seed: int, augment: bool = False) -> None:
        if not 1 <= batch_size <= len(images):
            raise TaskDataError(f"batch_size={batch_size} must be in 1..{len(images)} (the training images)")
        self.images, self.labels, self.task = images, labels, task
        self.batch_size, self.seed, self.augment = batch_size, int(seed), augment
        self.steps_per_epoch = len(images) // batch_size
        self._epoch, self._order = -1, None

    def order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = rng.generator(rng.mix(self.seed, 0x494D47, epoch))
            self._epoch, self._order = epoch, torch.randperm(len(self.images), generator=g)
        return self._order

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float images and labels of 0-based training ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        idx = self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        images = self.images[idx]
        if self.augment:
            images = augment(images, rng.mix(self.seed, 0x415547, step))
        return normalise(images, self.task), self.labels[idx]
