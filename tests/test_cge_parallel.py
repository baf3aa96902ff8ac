"""Coordinate shards across processes (distributed/coordinates.py): equal to one process, scalars only."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zotune import ZOOptimizer
from zotune.distributed.coordinates import CoordinateShards
from zotune.engines.coordinates import CoordinatePlan

STEPS = 3
WORKER = Path(__file__).resolve().parent / "cge_parallel_worker.py"


def _model():
    from zotune.models.vision import small_cnn

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return small_cnn(num_classes=4, in_channels=1, widths=(3, 3)).train()


def run(kind: str, topology, steps: int) -> dict:
    """``steps`` deepzero steps of the small CNN with objective ``kind`` (closure: a full forward
    per query; reuse: ChainLoss; batched: QueryBatchLoss with P = 4), on ``topology`` (None: one
    process). Used by the test and by every rank of tests/cge_parallel_worker.py."""
    from zotune.models.query_batch import QueryBatch, QueryBatchLoss
    from zotune.models.reuse import ChainLoss
    from zotune.models.vision import OnePassStatistics

    model = _model()
    stats = OnePassStatistics(model)
    extra = {"parallel": topology} if topology is not None else {"master_weights": True}
    opt = ZOOptimizer(model, lr=0.05, method="deepzero", eps=5e-3, sparsity=0.5, weight_decay=5e-4,
                      seed=3, **extra)
    size, losses, sent, shards = QueryBatch(4), [], [], []
    for t in range(steps):
        g = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
        objective = {"closure": lambda: F.cross_entropy(model(x), y),
                     "reuse": ChainLoss(model, x, y),
                     "batched": QueryBatchLoss(model, x, y, query_batch=size)}[kind]
        if topology is not None:
            topology.comm.reset()
        opt.step(stats.wrap(objective))
        losses.append(list(opt.last_losses))
        if topology is not None:
            sent.append(dict(topology.comm.sent))
            plan = opt.core.program.plan(opt.core)
            shards.append([(r.start, r.stop) for r in opt.core.engine.coordinate_shards.last])
            assert shards[-1][-1][1] == len(plan.coords)
    opt.flush()
    return {"losses": losses, "sent": sent, "shards": shards,
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "coordinates": len(opt.core.program.plan(opt.core).coords), "tensors": len(opt.core.engine.layout)}


def test_sharded_cge_equals_one_process_bitwise_and_sends_only_losses(tmp_path):
    from distributed_launch import launch

    kinds = ["closure", "reuse", "batched"]
    results = launch(2, [WORKER, tmp_path, *kinds], timeout=240)
    for code, out, err in results:
        assert code == 0, err[-3000:]
    for kind in kinds:
        single = run(kind, None, STEPS)
        ranks = [torch.load(tmp_path / f"{kind}-rank{r}.pt", weights_only=True) for r in range(2)]
        for rank in ranks:
            assert rank["losses"] == single["losses"], kind
            assert all(torch.equal(rank["state"][k], v) for k, v in single["state"].items()), kind
        n, tensors = single["coordinates"], single["tensors"]
        for step, sent in enumerate(ranks[0]["sent"]):
            shard = ranks[0]["shards"][step]
            per = max(b - a for a, b in shard)
            expected = {"coordinate loss gather": 8 * (1 + per)}
            if step == 1:  # the per-tensor costs, measured once (the first step pays one-time costs)
                expected["coordinate cost gather"] = 16 * tensors
            assert sent == expected, (kind, step, sent)
            assert shard[0][0] == 0 and shard[0][1] == shard[1][0] and shard[1][1] == n
        assert ranks[0]["shards"] == ranks[1]["shards"]


def test_shards_are_contiguous_equal_cost_and_aligned():
    coords = tuple((0, i) for i in range(10)) + tuple((1, i) for i in range(30))
    plan = CoordinatePlan(coords, 5e-3)
    shards = CoordinateShards()
    assert shards.split(plan, 2) == [range(0, 20), range(20, 40)]  # nothing measured: by count
    shards.cost = {0: 5.0, 1: 1.0}  # a coordinate of tensor 0 reruns five times more
    cut = shards.split(plan, 2)
    assert cut == [range(0, 8), range(8, 40)]  # 40 = 8 * 5 and 2 * 5 + 30 = 40
    assert shards.split(plan, 2, align=4) == [range(0, 8), range(8, 40)]
    assert shards.split(plan, 2, align=3) == [range(0, 9), range(9, 40)]  # a multiple of 3 into tensor 0
    three = shards.split(plan, 3)
    costs = [sum(shards.cost[coords[k][0]] for k in r) for r in three]
    assert max(costs) - min(costs) <= 5.0 and [r.start for r in three][0] == 0
    shards.learn([torch.tensor([2.0, 4.0, 0.0, 0.0, 1.5, 3.0]), torch.tensor([2.0, 4.0, 0.0, 0.0, 0.0, 0.0])])
    assert shards.cost == {0: 5.0, 1: 1.0, 2: 0.5}  # measured costs are kept; new ones pooled


def test_a_one_rank_group_is_the_plain_step_bitwise():
    from zotune.distributed import init, shutdown

    single = run("batched", None, 2)
    topology = init("pertp")
    try:
        assert run("batched", topology, 2)["losses"] == single["losses"]
    finally:
        shutdown()
    assert math.isfinite(single["losses"][0][0])


def test_data_parallel_modes_are_refused_for_coordinate_methods():
    with pytest.raises(ValueError, match="parallel='pertp'"):
        ZOOptimizer(_model(), method="deepzero", sparsity=0.5, parallel="2d")


@pytest.mark.slow  # 23 s; fast: the sharded CGE step equals one process bitwise (above)
def test_torchrun_pertp_image_recipe_equals_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m zotune train --task fashion-mnist ... --method cge
    --parallel pertp``: rank 0 writes the run; its parameters, losses and accuracy are the
    one-process run's."""
    import json

    from distributed_launch import launch
    from safetensors.torch import load_file
    from test_images import write_fashion_mnist
    from zotune import checkpoint, cli

    write_fashion_mnist(tmp_path / "data")
    common = ["train", "--task", "fashion-mnist", "--model", "cnn-730", "--data-dir", str(tmp_path / "data"),
              "--batch-size", "16", "--quiet", "--method", "deepzero", "--sparsity", "0.8", "--steps", "2",
              "--eval-every", "100", "--query-batch", "4"]
    assert cli.main(common + ["--output-dir", str(tmp_path / "one")]) == 0
    results = launch(2, ["-m", "zotune", *common, "--output-dir", tmp_path / "two", "--parallel", "pertp"],
                     timeout=240)
    for code, out, err in results:
        assert code == 0, err[-3000:]
    runs = []
    for name in ("one", "two"):
        out = tmp_path / name
        summary = json.loads((out / "summary.json").read_text())
        losses = [json.loads(line).get("loss") for line in (out / "metrics.jsonl").read_text().splitlines()]
        files = sorted(checkpoint.latest(out).glob("*.safetensors"))
        runs.append((summary["test"], summary["steps"], losses, [load_file(f) for f in files]))
    (ta, sa, la, pa), (tb, sb, lb, pb) = runs
    assert (ta, sa, la) == (tb, sb, lb) and sa == 2 and pa
    for a, b in zip(pa, pb):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
