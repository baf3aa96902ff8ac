"""Batched coordinate queries (models/query_batch.py): against one-at-a-time feature reuse."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from zotune import ZOOptimizer
from zotune.errors import ZotuneError
from zotune.models.query_batch import QueryBatch, QueryBatchLoss, no_running_stats
from zotune.models.reuse import ChainLoss
from zotune.models.vision import OnePassStatistics, resnet20, small_cnn



def _cnn(seed=0, dtype=torch.float32):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return small_cnn(num_classes=4, in_channels=1, widths=(3, 3)).to(dtype).train()


def _batch(dtype=torch.float32, n=8, size=8, channels=1, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, channels, size, size, generator=g, dtype=dtype),
            torch.randint(0, 4, (n,), generator=g))


def _moves(model, eps=5e-3, every=1):
    out = []
    for p in model.parameters():
        flat = p.detach().view(-1)
        out += [(p, i, float((flat[i].double() + eps).to(p.dtype))) for i in range(0, p.numel(), every)]
    return out


def _one_at_a_time(model, x, y, moves):
    """The reference: write each move into the parameter, a full forward, restore."""
    losses = []
    with torch.no_grad(), no_running_stats(model):
        for p, i, v in moves:
            old = p.data.view(-1)[i].clone()
            p.data.view(-1)[i] = v
            losses.append(float(F.cross_entropy(model(x), y)))
            p.data.view(-1)[i] = old
    return losses


def _run(model, x, y, moves, query_batch):
    """(objective, its batched losses after the base query, the one-at-a-time losses)."""
    want = _one_at_a_time(model, x, y, moves)
    objective = QueryBatchLoss(model, x, y, query_batch=query_batch)
    with torch.no_grad():
        objective()
        got = objective.coordinate_losses(moves)
    return objective, got, want


def _assert_within_ulps(got, want, dtype, ulps=0):
    """Batched losses are the one-at-a-time ones bitwise (``ulps=0``): every fast form is
    checked against the reference call once per shape (``Stacking``)."""
    ulp = torch.finfo(dtype).eps
    for a, b in zip(got, want):
        assert abs(a - b) <= ulps * ulp * abs(b), (a, b, (a - b) / (ulp * abs(b)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [3, 8])
def test_batched_queries_equal_one_at_a_time(dtype, size):
    model = _cnn(0, dtype)
    x, y = _batch(dtype)
    moves = _moves(model)
    want = _one_at_a_time(model, x, y, moves)
    objective = QueryBatchLoss(model, x, y, query_batch=size)
    with torch.no_grad():
        base = float(objective())
        got = objective.coordinate_losses(moves)
    with torch.no_grad():
        assert base == float(F.cross_entropy(model(x), y))
    _assert_within_ulps(got, want, dtype)
    assert max(p for _, p in objective.groups) == size  # really batched, never across blocks
    k = 0
    for block, p in objective.groups:
        assert {objective.where[id(m[0])][0] for m in moves[k:k + p]} == {block}
        k += p
    assert k == len(moves)


def test_batch_norm_without_running_statistics_is_the_train_mode_forward_bitwise():
    """The batched path (and P = 1) runs train-mode BN with its buffers detached: the same
    outputs as with them, and the buffers untouched."""
    model = _cnn(1)
    x, y = _batch()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad(), no_running_stats(model):
        loose = F.cross_entropy(model(x), y)
    assert all(torch.equal(a, b) for a, b in zip(before.values(), model.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(loose, F.cross_entropy(model(x), y))


def test_residual_blocks_batch_too():
    """ResNet-20's basic blocks (option-A shortcut, stride 2) under vmap, a few coordinates of
    the stem, a basic block, a downsampling block and the head."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = resnet20(num_classes=4, in_channels=1).train()
    x, y = _batch(n=4, size=8)
    picks = [model[0][0].weight, model[1].bn1.weight, model[4].conv1.weight, model[11].weight]
    moves = [(p, i, float(p.view(-1)[i]) + 5e-3) for p in picks for i in range(3)]
    want = _one_at_a_time(model, x, y, moves)
    objective = QueryBatchLoss(model, x, y, query_batch=3)
    with torch.no_grad():
        objective()
        got = objective.coordinate_losses(moves)
    _assert_within_ulps(got, want, torch.float32)
    assert [p for _, p in objective.groups] == [3, 3, 3, 3]


@pytest.mark.parametrize("method,extra", [("cge", {}), ("deepzero", {"sparsity": 0.5, "weight_decay": 5e-4})])
def test_cge_steps_with_batched_queries_and_bn_statistics_once_per_step(method, extra):
    x, y = _batch()
    runs = []
    for batched in (False, True):
        model = _cnn(0)
        stats = OnePassStatistics(model)
        opt = ZOOptimizer(model, lr=0.05, method=method, eps=5e-3, **extra)
        size, losses = QueryBatch(4), []
        for step in range(2):
            objective = QueryBatchLoss(model, x, y, query_batch=size) if batched else ChainLoss(model, x, y)
            fresh = copy.deepcopy(model)  # BN statistics after exactly one forward of this step
            with torch.no_grad():
                fresh(x)
            opt.step(stats.wrap(objective))
            losses += opt.last_losses
            for bn, once in zip(model.modules(), fresh.modules()):
                if isinstance(bn, torch.nn.BatchNorm2d):
                    assert int(bn.num_batches_tracked) == step + 1
                    assert torch.equal(bn.running_mean, once.running_mean)
                    assert torch.equal(bn.running_var, once.running_var)
        runs.append((losses, [t.clone() for t in model.state_dict().values()]))
    (la, sa), (lb, sb) = runs
    assert lb == la
    assert all(torch.equal(a, b) for a, b in zip(sa, sb))  # parameters and BN statistics


def test_auto_times_each_candidate_and_keeps_the_fastest_per_block():
    size = QueryBatch("auto", candidates=(1, 2, 4), repeats=2)
    trial = []
    for seconds in (3.0, 5.0, 4.0, 2.5, 6.0, 4.4):  # per group: P = 1, 2, 4, 1, 2, 4
        p = size.next_size(0)
        trial.append(p)
        size.record(0, p, seconds)
    assert trial == [1, 2, 4, 1, 2, 4]
    assert size.timings[0] == {1: 2.5, 2: 2.5, 4: 1.0} and size.chosen == {0: 4}
    assert size.next_size(0) == 4 and size.next_size(1) == 1  # block 1 starts its own trials
    with pytest.raises(ZotuneError, match="integer >= 1 or 'auto'"):
        QueryBatch(0)
    with pytest.raises(ZotuneError, match="integer >= 1 or 'auto'"):
        QueryBatch("fast")

    model = _cnn(2)
    x, y = _batch()
    moves = _moves(model)
    want = _one_at_a_time(model, x, y, moves)
    objective = QueryBatchLoss(model, x, y, query_batch=QueryBatch("auto", candidates=(1, 2, 4), repeats=1))
    with torch.no_grad():
        objective()
        got = objective.coordinate_losses(moves)
    _assert_within_ulps(got, want, torch.float32)
    chosen = objective.query_batch.chosen
    assert set(chosen) == {0, 1, 2} and set(chosen.values()) <= {1, 2, 4}
    assert [p for b, p in objective.groups if b == 0][:3] == [1, 2, 4]


def test_a_fast_form_that_rounds_differently_is_not_used(monkeypatch):
    """The exactness check: a stacked layer that is off by one ulp is caught on first use and the
    reference (one call per copy) is used for that shape instead."""
    import zotune.models.query_batch as qb

    real = qb._stacked_layer
    monkeypatch.setattr(qb, "_stacked_layer", lambda *a: torch.nextafter(real(*a), torch.tensor(float("inf"))))
    x, y = _batch()
    model = _cnn(4)
    objective, got, want = _run(model, x, y, _moves(model), 4)
    assert got == want
    layers = {k: v for k, v in objective.stack.checks.items() if k[0] == "params" and k[1] in ("Conv2d", "Linear")}
    assert layers and not any(layers.values())
    assert any(v for k, v in objective.stack.checks.items() if k[0] == "shared")


def test_the_optimizer_passes_moves_to_a_batched_objective_and_counts_its_queries():
    model = _cnn(3)
    x, y = _batch()
    opt = ZOOptimizer(model, lr=0.05, method="deepzero", eps=5e-3, sparsity=0.5)
    objective = QueryBatchLoss(model, x, y, query_batch=5)
    opt.step(OnePassStatistics(model).wrap(objective))
    size = opt.forward_passes - 1
    assert sum(p for _, p in objective.groups) == size and max(p for _, p in objective.groups) == 5


@pytest.mark.slow  # 12 s; fast: test_cli_no_query_exact runs the CLI with query batching
def test_cli_query_batch(tmp_path, capsys):
    import json

    from test_images import write_fashion_mnist
    from zotune import cli

    write_fashion_mnist(tmp_path / "data")
    common = ["train", "--task", "fashion-mnist", "--model", "cnn-730", "--data-dir", str(tmp_path / "data"),
              "--batch-size", "16", "--quiet", "--method", "deepzero", "--sparsity", "0.8", "--steps", "1",
              "--eval-every", "100"]
    assert cli.main(common + ["--output-dir", str(tmp_path / "auto"), "--query-batch", "auto"]) == 0
    assert json.loads((tmp_path / "auto" / "summary.json").read_text())["status"] == "completed"
    capsys.readouterr()
    assert cli.main(common + ["--output-dir", str(tmp_path / "bad"), "--query-batch", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "query_batch must be an integer >= 1 or 'auto'" in err, err


def _three_stage_cnn(dtype=torch.float32):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return small_cnn(num_classes=4, in_channels=1, widths=(3, 4, 5)).to(dtype).train()


def test_batch_norm_parameters_take_the_channel_path_bitwise():
    """A move of BN's weight or bias changes one channel: the stage is recomputed on that channel
    only, and the losses stay the one-at-a-time ones bitwise."""
    model = _three_stage_cnn()
    x, y = _batch(size=16)
    moves = [m for m in _moves(model) if m[0].dim() == 1]  # biases and BN parameters
    objective, got, want = _run(model, x, y, moves, 4)
    assert got == want
    bn = {k[1]: v for k, v in objective.stack.checks.items() if k[0] == "channel-bn"}
    assert set(bn) == {0, 1, 2} and all(bn.values())


@pytest.mark.parametrize("dtype,bound", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_incremental_next_convolution_within_round_off(dtype, bound):
    """exact=False: a stage's moves update the next stage's convolution incrementally; the losses
    equal one at a time within round-off (stated bound, relative), the incremental form is used
    for every stage followed by a stage, and its checked gap is recorded."""
    model = _three_stage_cnn(dtype)
    x, y = _batch(dtype, size=16)
    moves = _moves(model)
    want = _one_at_a_time(model, x, y, moves)
    batch = QueryBatch(4, exact=False)
    for _ in range(2):  # the second step runs the kept fast forms only
        objective = QueryBatchLoss(model, x, y, query_batch=batch)
        with torch.no_grad():
            objective()
            got = objective.coordinate_losses(moves)
        assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) <= bound
    delta = {k[1] for k, v in batch.stacking.checks.items() if k[0] == "delta" and v}
    assert delta == {0, 1}  # stage 2 is followed by the head, not a stage
    assert 0 < max(batch.stacking.deviations.values()) <= 1e-5
    assert got != want or dtype == torch.float64  # really another summation order in fp32


def test_an_incremental_form_outside_the_tolerance_is_not_used(monkeypatch):
    import zotune.models.channel_moves as cm

    real = cm.next_stage
    monkeypatch.setattr(cm, "next_stage", lambda *a: real(*a) * (1 + 1e-3))
    model = _three_stage_cnn()
    x, y = _batch(size=16)
    objective, got, want = _run(model, x, y, _moves(model), QueryBatch(4, exact=False))
    assert got == want  # the exact path, bitwise
    delta = [v for k, v in objective.stack.checks.items() if k[0] == "delta"]
    assert delta and not any(delta)


def test_cli_no_query_exact(tmp_path):
    import json

    from test_images import write_fashion_mnist
    from zotune import cli

    write_fashion_mnist(tmp_path / "data")
    assert cli.main(["train", "--task", "fashion-mnist", "--model", "cnn", "--cnn-width", "4",
                     "--data-dir", str(tmp_path / "data"), "--batch-size", "16", "--quiet", "--method", "cge",
                     "--steps", "1", "--eval-every", "100", "--query-batch", "4", "--no-query-exact",
                     "--output-dir", str(tmp_path / "run")]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert json.loads((run / "config.json").read_text())["query_exact"] is False


@pytest.mark.parametrize("exact", [True, False])
def test_a_stale_cache_after_a_restored_move_is_refreshed_not_trusted(exact):
    """A one-at-a-time query (an ``auto`` trial at P = 1) moves a coordinate, runs the chain and
    restores it: the cached block outputs after it are then those of the moved point. A later
    batched group must not build on them, even with its fast forms already checked and trusted."""
    model = _three_stage_cnn()
    x, y = _batch(size=16)
    batch = QueryBatch(2, exact=exact)
    probe = QueryBatchLoss(model, x, y, query_batch=batch)
    later = [m for m in _moves(model) if probe.where[id(m[0])][0] == 1]
    want = _one_at_a_time(model, x, y, later)
    with torch.no_grad():
        probe()
        first = probe.coordinate_losses(later)  # clean cache: the fast forms are checked here
        assert any(v for k, v in batch.stacking.checks.items() if k[0] in ("channel", "delta"))
        objective = QueryBatchLoss(model, x, y, query_batch=batch)
        objective()
        weight = model[0][0].weight  # a coordinate of block 0, moved, run, restored
        old = weight.data.view(-1)[0].clone()
        weight.data.view(-1)[0] += 0.5
        ChainLoss.__call__(objective)
        weight.data.view(-1)[0] = old
        got = objective.coordinate_losses(later)
    if exact:
        assert got == first == want
    else:  # (the first call returned the checked reference, later ones the incremental form)
        assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) <= 2e-6
