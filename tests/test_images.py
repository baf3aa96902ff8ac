"""Small networks from scratch (issue 11): IDX and CIFAR-10 readers, batches, models, the recipe.

The data are tiny files written here in the real formats (IDX, gzip-IDX, CIFAR-10's python
pickles), so the tests are fast and check the readers against what they must parse."""
from __future__ import annotations

import gzip
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from zotune import cli
from zotune.errors import ZotuneError
from zotune.image_trainers import TRAINERS, ImageTrainer, build_trainer
from zotune.models.blocks import block_table
from zotune.models.vision import DEEPZERO_CNN, build_model, deepzero_cnn, lenet5, resnet20, small_cnn
from zotune.tasks.base import DataNotFoundError, TaskDataError
from zotune.tasks.images import Batches, augment, load_cifar10, load_fashion_mnist, read_idx


def idx_bytes(array: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C}[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_fashion_mnist(root, n_train=96, n_test=32, gz=True, seed=0):
    """A tiny Fashion-MNIST in the official file names; labels carry a learnable signal."""
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = g.integers(0, 10, n).astype(np.uint8)
        images = g.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):  # class c lights up row block c
            images[i, 2 * c:2 * c + 3] = 250
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = folder / f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array)
            if gz:
                (name.with_name(name.name + ".gz")).write_bytes(gzip.compress(data))
            else:
                name.write_bytes(data)
    return folder


def test_idx_reader_raw_and_gzip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(a))
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(a)))
    b = np.array([[1, -2], [300000, 4]], dtype=np.int32)
    (tmp_path / "b").write_bytes(idx_bytes(b))
    assert np.array_equal(read_idx(tmp_path / "a"), a) and np.array_equal(read_idx(tmp_path / "a.gz"), a)
    assert np.array_equal(read_idx(tmp_path / "b"), b)


def test_idx_errors_name_the_file_and_what_was_expected(tmp_path):
    a = np.zeros((2, 28, 28), dtype=np.uint8)
    (tmp_path / "short").write_bytes(idx_bytes(a)[:-10])
    with pytest.raises(TaskDataError, match=r"short: truncated IDX file: 1574 bytes, expected 1584 for shape \(2, 28, 28\)"):
        read_idx(tmp_path / "short")
    (tmp_path / "magic").write_bytes(b"\x01\x02\x08\x03" + idx_bytes(a)[4:])
    with pytest.raises(TaskDataError, match=r"magic: not an IDX file: magic 01 02 08 03, expected 00 00"):
        read_idx(tmp_path / "magic")
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(TaskDataError, match="bad.gz: cannot read it as gzip"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(DataNotFoundError, match=r"fashion-mnist: train-images-idx3-ubyte not found \(looked at .*nothing"):
        load_fashion_mnist(tmp_path / "nothing")


def test_fashion_mnist_loader_reads_the_four_files(tmp_path):
    write_fashion_mnist(tmp_path, gz=False)
    data = load_fashion_mnist(tmp_path)
    assert data.train_images.shape == (96, 1, 28, 28) and data.test_images.shape == (32, 1, 28, 28)
    assert data.train_images.dtype == torch.uint8 and data.train_labels.dtype == torch.int64
    assert data.in_channels == 1 and int(data.train_labels.max()) <= 9


def write_cifar(root, n=20, seed=0, layout_ok=True):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = g.integers(0, 256, (n, 3072)).astype(np.uint8)
        batch = {b"data": data, b"labels": g.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        if not layout_ok and name == "data_batch_3":
            batch = {b"data": data.reshape(n, 3, 32, 32), b"labels": batch[b"labels"]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


def test_cifar10_reader_and_wrong_layouts(tmp_path):
    write_cifar(tmp_path)
    data = load_cifar10(tmp_path)
    assert data.train_images.shape == (100, 3, 32, 32) and data.test_images.shape == (20, 3, 32, 32)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")[b"data"][0]
    assert np.array_equal(data.train_images[0].numpy().reshape(-1), first)  # channel-major rows
    bad = tmp_path / "bad"
    write_cifar(bad, layout_ok=False)
    with pytest.raises(TaskDataError, match=r"data_batch_3: not in the CIFAR-10 python layout: expected b'data' uint8 \[N, 3072\]"):
        load_cifar10(bad)
    (bad / "cifar-10-batches-py" / "data_batch_5").unlink()
    with pytest.raises(DataNotFoundError, match="lacks data_batch_5; expected the python layout"):
        load_cifar10(bad)
    with pytest.raises(DataNotFoundError, match="test_batch not found"):
        load_cifar10(tmp_path / "empty")


def test_batches_are_a_function_of_seed_and_step():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(50)
    a = Batches(images, labels, "cifar10", 8, seed=1, augment=True)
    b = Batches(images, labels, "cifar10", 8, seed=1, augment=True)
    assert a.steps_per_epoch == 6
    for step in (0, 7, 3):  # any order: no hidden state
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    epoch0 = torch.cat([a.batch(s)[1] for s in range(6)])
    assert len(set(epoch0.tolist())) == 48  # a permutation, the partial batch dropped
    assert not torch.equal(a.batch(0)[1], a.batch(6)[1])  # a new order each epoch
    assert not torch.equal(Batches(images, labels, "cifar10", 8, seed=2).batch(0)[1], a.batch(0)[1])
    x = images[:4]
    out = augment(x, 5)
    assert out.shape == x.shape and torch.equal(out, augment(x, 5)) and not torch.equal(out, augment(x, 6))


def test_models_parameter_counts_and_block_tables():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    m = lenet5()
    kinds = [type(c).__name__ for c in m]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU",
                     "Linear", "ReLU", "Linear"]
    assert (m[0].in_channels, m[0].out_channels, m[0].kernel_size, m[0].padding) == (1, 6, (5, 5), (2, 2))
    assert (m[7].in_features, m[9].in_features, m[11].out_features) == (400, 120, 10)
    assert count(m) == 61706 and m(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    for params in DEEPZERO_CNN:  # DeepZero's CNN family, research/ranksgd_deepzero.md B.8
        net = deepzero_cnn(params)
        assert count(net) == params and net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert count(small_cnn(10, 1, (8, 16), batch_norm=False)) == 1 * 8 * 9 + 8 + 8 * 16 * 9 + 16 + 16 * 10 + 10
    r = resnet20()
    assert count(r) == 269722 and r(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    table = block_table(r)
    assert table.family == "sequential" and table.num_blocks == 12 and table.is_norm("1.bn1.weight")
    with pytest.raises(ZotuneError, match="unknown image model 'vgg'; valid: lenet5, small-cnn, resnet20"):
        build_model("vgg", 10, 3)


def test_every_trainer_follows_the_protocol_and_resumes_bitwise():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
    options = {"lr": 1e-3, "lr_bp": 0.05, "eps": 1e-3, "seed": 0, "bp_layers": 2, "tail_grad": "avg",
               "momentum": 0.9, "weight_decay": 1e-4}
    for method in ("backprop", "mezo", "elasticzo"):
        assert method in TRAINERS
        a = build_trainer(method, lenet5(), options)
        assert isinstance(a, ImageTrainer)
        for _ in range(2):
            a.step(x, y)
        state = a.state_dict()
        b = build_trainer(method, lenet5(), options)
        b.load_state_dict(state)
        for _ in range(2):
            la, lb = a.step(x, y), b.step(x, y)
            assert la == lb
        assert torch.equal(a.logits(x), b.logits(x)), method
    with pytest.raises(ZotuneError, match="unknown method 'sgd' for image tasks; valid: backprop"):
        build_trainer("sgd", lenet5(), options)


@pytest.fixture
def fm_dir(tmp_path):
    write_fashion_mnist(tmp_path / "data")
    return tmp_path / "data"


def train_args(fm_dir, out, *extra):
    return ["train", "--task", "fashion-mnist", "--model", "lenet5", "--data-dir", str(fm_dir),
            "--batch-size", "16", "--eval-every", "3", "--log-every", "1", "--output-dir", str(out),
            "--quiet", *extra]


def test_cli_runs_elasticzo_and_resumes_bitwise(fm_dir, tmp_path, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--method", "elasticzo", "--bp-layers", "2", "--lr", "1e-3", "--lr-bp", "0.05")
    assert cli.main(train_args(fm_dir, straight, *common, "--steps", "6")) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((straight / "summary.json").read_text())
    assert printed["test"] == summary["test"] and summary["status"] == "completed" and summary["steps"] == 6
    assert summary["peak_memory_bytes"] > summary["memory"]["model_bytes"] > 0
    assert summary["time_per_step_s"] > 0 and summary["bp_layers"] == 2
    assert (straight / "curves.png").exists() and (straight / "checkpoints" / "latest").exists()
    tests = [r for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines()) if "test" in r]
    assert [r["step"] for r in tests] == [0, 3, 6]
    assert cli.main(train_args(fm_dir, split, *common, "--steps", "3")) == 0
    assert cli.main(train_args(fm_dir, split, *common, "--steps", "6", "--resume")) == 0
    a = load_file(str(straight / "checkpoints" / "step-0000006" / "trainable.safetensors"))
    b = load_file(str(split / "checkpoints" / "step-0000006" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((split / "summary.json").read_text())["test"] == summary["test"]


def test_cli_epochs_and_the_two_baselines(fm_dir, tmp_path, capsys):
    for method in ("mezo", "backprop"):
        out = tmp_path / method
        assert cli.main(train_args(fm_dir, out, "--method", method, "--epochs", "1")) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 6 and summary["epochs"] == 1.0 and summary["method"] == method


def test_cli_image_task_alone_trains_lenet5_and_an_explicit_model_is_kept(fm_dir, tmp_path):
    """``zotune train --task fashion-mnist`` alone runs: the language default model becomes the
    image default (LeNet-5), with the method's image lr and eps."""
    out = tmp_path / "alone"
    assert cli.main(["train", "--task", "fashion-mnist", "--data-dir", str(fm_dir), "--steps", "2",
                     "--output-dir", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["model"], saved["method"], saved["lr"], saved["eps"]) == ("lenet5", "mezo", 1e-3, 1e-3)
    out = tmp_path / "cnn"
    assert cli.main(train_args(fm_dir, out, "--model", "cnn-730", "--steps", "2")) == 0
    assert json.loads((out / "config.json").read_text())["model"] == "cnn-730"


def error_of(capsys, args) -> str:
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_bad_inputs_are_one_line_errors(fm_dir, tmp_path, capsys):
    out = tmp_path / "run"
    err = error_of(capsys, train_args(fm_dir, out, "--method", "elasticzo", "--bp-layers", "9", "--steps", "2"))
    assert "bp_layers=9 is not in 0..5: the model has 5 parametrised layers" in err
    err = error_of(capsys, train_args(fm_dir, tmp_path / "r2", "--model", "lenet7", "--steps", "2"))
    assert "unknown image model 'lenet7'; valid: lenet5" in err
    images = fm_dir / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-100]))
    err = error_of(capsys, train_args(fm_dir, tmp_path / "r3", "--steps", "2"))
    assert "t10k-images-idx3-ubyte.gz: truncated IDX file" in err and "expected 25104" in err
    err = error_of(capsys, train_args(tmp_path / "none", tmp_path / "r4", "--steps", "2"))
    assert "train-images-idx3-ubyte not found" in err
    err = error_of(capsys, train_args(fm_dir, tmp_path / "r5", "--method", "elasticzo", "--tail-grad", "both"))
    assert "unknown tail_grad 'both'; valid: avg, plus, clean" in err


def test_cli_cifar10_with_augmentation_and_a_batchnorm_cnn(tmp_path):
    write_cifar(tmp_path / "data", n=16)
    out = tmp_path / "run"
    args = ["train", "--task", "cifar10", "--model", "cnn-3700", "--data-dir", str(tmp_path / "data"),
            "--method", "elasticzo", "--bp-layers", "1", "--augment", "--batch-size", "8", "--steps", "3",
            "--eval-every", "3", "--output-dir", str(out), "--quiet"]
    assert cli.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["test_examples"] == 16
    bn = load_file(str(out / "checkpoints" / "step-0000003" / "trainable.safetensors"))["0.1.num_batches_tracked"]
    assert int(bn) == 3  # BatchNorm's running statistics: one update per step, not per pass


def test_cli_runs_elasticzo_int8_and_resumes_bitwise(fm_dir, tmp_path, capsys):
    """The integer method through the recipe: same run directory, and exact resume of its int8 state."""
    straight, split = tmp_path / "straight8", tmp_path / "split8"
    common = ("--method", "elasticzo-int8", "--bp-layers", "2")
    assert cli.main(train_args(fm_dir, straight, *common, "--steps", "6")) == 0
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["method"] == "elasticzo-int8" and summary["steps"] == 6
    assert summary["memory"]["model_bytes"] == 61706  # int8: one byte per parameter
    assert cli.main(train_args(fm_dir, split, *common, "--steps", "3")) == 0
    assert cli.main(train_args(fm_dir, split, *common, "--steps", "6", "--resume")) == 0
    a, b = (torch.load(d / "checkpoints" / "step-0000006" / "optimizer.pt", weights_only=True) for d in (straight, split))
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    floats = load_file(str(straight / "checkpoints" / "step-0000006" / "trainable.safetensors"))
    assert torch.equal(floats["7.weight"], a["params"]["7.weight"].float() * 2.0 ** a["exponents"]["7.weight"])
    assert json.loads((split / "summary.json").read_text())["test"] == summary["test"]
    assert cli.main(train_args(fm_dir, tmp_path / "bad8", "--method", "elasticzo-int8", "--bp-layers", "4",
                               "--steps", "2")) == 2
    assert "at most 3 bp layers" in capsys.readouterr().err
