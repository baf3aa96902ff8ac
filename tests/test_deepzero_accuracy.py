"""The accuracy benchmark's own pieces (benchmarks/deepzero_accuracy.py): the first-order run with
DeepZero's gradient masks must move exactly the coordinates the sparse CGE step moves, by about
the same amounts, and the training subsets must be class-balanced and fixed."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from zotune.image_methods import ZOTrainer
from zotune.layout import canonical_name

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "deepzero_accuracy.py"
_spec = importlib.util.spec_from_file_location("deepzero_accuracy", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_masked_first_order_moves_what_sparse_cge_moves_by_about_as_much():
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g)
    zo_model, fo_model = bench.new_model("cnn-730", 0).double(), bench.new_model("cnn-730", 0).double()
    before = {n: p.detach().clone() for n, p in zo_model.named_parameters()}
    zo = ZOTrainer(zo_model, {"lr": 0.1, "eps": 1e-6, "seed": 0, "sparsity": 0.5, "weight_decay": 0.0},
                   "deepzero")
    fo = bench.MaskedBackprop(fo_model, lr=0.1, momentum=0.9, weight_decay=0.0, sparsity=0.5)
    zo.step(x, y)
    fo.step(x, y)
    zo.opt.flush()
    moved_any = 0
    for (name, p_zo), (_, p_fo) in zip(zo_model.named_parameters(), fo_model.named_parameters()):
        mask = fo.masks[canonical_name(name)].bool()
        d_zo, d_fo = p_zo.detach() - before[name], p_fo.detach() - before[name]
        assert torch.equal(d_fo[~mask], torch.zeros_like(d_fo[~mask])), name
        assert torch.equal(d_zo[~mask], torch.zeros_like(d_zo[~mask])), name
        torch.testing.assert_close(d_zo[mask], d_fo[mask], atol=1e-6, rtol=1e-4)
        moved_any += int((d_fo[mask] != 0).sum())
    total = sum(p.numel() for p in fo_model.parameters())
    assert 0.5 * total < fo.active_count() < total  # half the conv/linear weights, the rest in full
    assert moved_any > 0.9 * fo.active_count()
    # a re-draw changes the masks of the maskable tensors, reproducibly
    old = {k: v.clone() for k, v in fo.masks.items()}
    fo.redraw(1)
    assert any(not torch.equal(old[k], fo.masks[k]) for k in old)
    again = bench.MaskedBackprop(bench.new_model("cnn-730", 0), 0.1, 0.9, 0.0, 0.5)
    again.redraw(1)
    assert all(torch.equal(again.masks[k], fo.masks[k]) for k in old)


def test_training_subsets_are_class_balanced_fixed_and_nested():
    labels = torch.arange(10).repeat(50)[torch.randperm(500, generator=torch.Generator().manual_seed(0))]
    small, large = bench.balanced_subset(labels, 100), bench.balanced_subset(labels, 200)
    assert torch.equal(torch.bincount(labels[small], minlength=10), torch.full((10,), 10))
    assert torch.equal(small, bench.balanced_subset(labels, 100))
    assert set(small.tolist()) <= set(large.tolist())
    assert len(bench.balanced_subset(labels, 0)) == 500
    shrunk = bench.shrink(torch.full((2, 1, 28, 28), 200, dtype=torch.uint8), 14)
    assert shrunk.shape == (2, 1, 14, 14) and shrunk.dtype == torch.uint8 and int(shrunk.max()) == 200
