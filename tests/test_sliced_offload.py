"""Sliced offload (engines/sliced.py, DistZO2's communication strategy) on gloo ranks started here.

Sliced equals unsliced and in-memory bitwise (every rank assembles the block it would hold
unsliced and makes the same chunk moves); each rank's storage holds only its slices (one copy of
the model per node); the bytes a rank sends per step are its slices' all-gathers, one barrier and
the losses, exactly as predicted from the slice cuts; a sliced run resumes bitwise, on another
world size too, and runs end to end under ``zotune train --parallel ddp|pertp|2d``."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_launch import launch  # noqa: E402
from test_distributed import final, ok, train_args  # noqa: E402

from zotune import ZOOptimizer, cli  # noqa: E402
from zotune.distributed.slices import SLICE_BARRIER, SLICE_GATHER, block_cuts  # noqa: E402
from zotune.models import tiny_model  # noqa: E402

WORKER = Path(__file__).resolve().parent / "sliced_worker.py"
CONFIGS = ("in-memory", "offload", "sliced-cpu", "sliced-disk", "in-memory-c48", "sliced-cpu-c48")


def test_block_cuts_fall_on_chunk_boundaries():
    # three tensors: 10 elements in chunks of 4 (4, 4, 2), 6 outside the layout, 4 in one chunk
    offsets, numels, chunks = [0, 10, 16], [10, 6, 4], [[(0, 4), (4, 8), (8, 10)], None, [(0, 4)]]
    assert block_cuts(offsets, numels, chunks, 1) == [(0, 20)]
    assert block_cuts(offsets, numels, chunks, 2) == [(0, 10), (10, 20)]
    assert block_cuts(offsets, numels, chunks, 3) == [(0, 8), (8, 16), (16, 20)]
    # a block of one chunk: every slice but one is empty
    assert block_cuts([0], [7], [[(0, 7)]], 3) == [(0, 0), (0, 7), (7, 7)]
    for parts in range(1, 6):
        cuts = block_cuts(offsets, numels, chunks, parts)
        assert cuts[0][0] == 0 and cuts[-1][1] == 20
        assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))
        assert {c for cut in cuts for c in cut} <= {0, 4, 8, 10, 16, 20}


def test_sliced_needs_parallel_and_the_offload_engine(tiny_dir, data_dir, tmp_path, capsys):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="sliced=True slices the blocks of engine='offload'"):
        ZOOptimizer(model, lr=1e-3, sliced=True, parallel="ddp")
    with pytest.raises(ValueError, match="among the ranks of a parallel run"):
        ZOOptimizer(model, lr=1e-3, engine="offload", sliced=True)
    assert cli.main(train_args(tiny_dir, data_dir, tmp_path / "run", 2, "--engine", "offload",
                               "--offload-sliced")[2:]) == 2
    assert ("--offload-sliced slices the blocks of --engine offload among the ranks of --parallel "
            "ddp|pertp|2d; got --engine offload --parallel none") in capsys.readouterr().err


def slices_of(path: Path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        return f.get_tensor("flat"), int(meta["slice_start"]), int(meta["slice_stop"]), int(meta["block_numel"])


def check_mode(out: Path, mode: str, world: int, names, losses: dict, node: int) -> None:
    """Every config of ``mode`` bitwise the in-memory engine on every rank; for sliced ones, the
    bytes sent, what each rank stores and reads, on slice groups of ``node`` consecutive ranks."""
    got = {name: [torch.load(out / f"{mode}-{name}-rank{r}.pt") for r in range(world)] for name in names}
    for name, ranks in got.items():
        ref = got["in-memory-c48" if name.endswith("c48") else "in-memory"][0]
        for r, rec in enumerate(ranks):
            assert rec["losses"] == ref["losses"], (mode, name, r)  # bitwise, every rank
            assert rec["params"].keys() == ref["params"].keys()
            for key, value in ref["params"].items():
                assert torch.equal(rec["params"][key], value), (mode, name, r, key)
            if "sliced" not in name:  # only the losses travel
                assert rec["sent"] == [losses] * 4, (mode, name, rec["sent"])
                continue
            k, peers = r % node, ranks[r - r % node:r - r % node + node]  # slice k of its node
            cuts, numel = rec["cuts"], rec["block_numel"]
            assert sorted(cuts) == [0, 1]  # both blocks of the tiny Llama are offloaded
            for j, cut in cuts.items():  # contiguous, ordered, covering the block
                assert len(cut) == node and cut[0][0] == 0 and cut[-1][1] == numel[j]
                assert all(a[1] == b[0] for a, b in zip(cut, cut[1:])) and 0 < cut[0][1] < numel[j]
            # per step: each block's all-gather of the longest slice (fp32), one barrier, the losses
            width = sum(max(e - s for s, e in cut) for cut in cuts.values())
            assert rec["gather_bytes"] == 4 * width
            assert rec["sent"] == [{**losses, SLICE_GATHER: 4 * width, SLICE_BARRIER: 8}] * 4, (
                mode, name, rec["sent"])
            # storage: this rank's slice of every block, read once per pass (4 steps + flush)
            assert rec["bytes_read"] == 5 * 4 * sum(cut[k][1] - cut[k][0] for cut in cuts.values())
            for j, cut in cuts.items():
                assert rec["own"][j].numel() == cut[k][1] - cut[k][0]
                # the node's slices, in order, are the block: one copy of the model per node
                assert torch.equal(torch.cat([p["own"][j] for p in peers]), rec["blocks"][j])
                # cut at a tensor boundary, or at a boundary of one of its chunks
                bounds, at = rec["bounds"][j], cut[0][1]
                tensor = max(b for b in bounds if b <= at)
                assert (at - tensor) % (48 if name.endswith("c48") else 1 << 20) == 0
                if name.endswith("c48"):  # chunks of 48: the cut falls inside a tensor
                    assert at not in bounds
            if name.startswith("sliced-cpu"):
                assert rec["shm_dir_left"] is False  # unlinked once mapped: nothing can leak
        if name == "sliced-disk":  # each rank's directory holds exactly its slices
            root = out / f"{mode}-sliced-disk-tier"
            assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
                f"rank-{r:05d}/block-{j:05d}.safetensors" for r in range(world) for j in (0, 1)]
            for r, rec in enumerate(ranks):
                for j, cut in rec["cuts"].items():
                    flat, start, stop, total = slices_of(root / f"rank-{r:05d}" / f"block-{j:05d}.safetensors")
                    assert (start, stop, total) == (*cut[r % node], rec["block_numel"][j])
                    assert torch.equal(flat, rec["blocks"][j][start:stop])


def test_sliced_equals_unsliced_stores_slices_and_sends_the_predicted_bytes(tmp_path):
    ok(launch(2, [WORKER, tmp_path, "ddp", "pertp"], timeout=300))
    check_mode(tmp_path, "ddp", 2, CONFIGS, {"dp loss gather": 16}, node=2)
    check_mode(tmp_path, "pertp", 2, CONFIGS, {"pertp loss gather": 8}, node=2)


@pytest.mark.slow
def test_sliced_2d_on_two_nodes_of_two_ranks(tmp_path):
    """4 ranks as 2 nodes (LOCAL_WORLD_SIZE=2): a 2 x 2 mesh, each node's two ranks slice the
    blocks between them (a process group per node) and hold one copy of the model per node."""
    names = ("in-memory", "sliced-cpu", "sliced-disk")
    ok(launch(4, [WORKER, tmp_path, "2d=" + ",".join(names)], timeout=600, env={"LOCAL_WORLD_SIZE": "2"}))
    check_mode(tmp_path, "2d", 4, names, {"pertp loss gather": 8, "dp loss gather": 16}, node=2)


@pytest.mark.slow  # 34 s; fast: sliced == unsliced here, resume on another world size in test_distributed
def test_a_sliced_run_resumes_bitwise_on_another_world_size_and_under_every_mode(tiny_dir, data_dir, tmp_path):
    """3 steps of pertp on 2 ranks (disk slices), a 4th under 2d on the same 2 ranks, steps 5-6 in
    one process (host-memory slices): bitwise the uninterrupted 6 steps of the in-memory engine
    in one process. Then 2 steps of ddp on 2 ranks with disk slices end to end."""
    straight, resumed, tier = tmp_path / "straight", tmp_path / "resumed", tmp_path / "tier"
    sliced = ("--engine", "offload", "--offload-sliced")
    ok(launch(2, train_args(tiny_dir, data_dir, resumed, 3, "--parallel", "pertp", *sliced,
                            "--offload-to", "disk", "--offload-dir", tier), timeout=240))
    assert sorted(p.name for p in tier.iterdir()) == ["rank-00000", "rank-00001"]
    ok(launch(2, train_args(tiny_dir, data_dir, resumed, 4, "--parallel", "2d", "--pertp", 2, *sliced,
                            "--offload-to", "disk", "--offload-dir", tier, "--resume"), timeout=240))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): the forward's round-off is the same
    try:
        assert cli.main(train_args(tiny_dir, data_dir, straight, 6, "--parallel", "pertp")[2:]) == 0
        assert cli.main(train_args(tiny_dir, data_dir, resumed, 6, "--parallel", "pertp", *sliced,
                                   "--resume")[2:]) == 0
    finally:
        torch.set_num_threads(threads)
    (a_losses, a), (b_losses, b) = final(straight), final(resumed)
    assert a_losses == b_losses and len(a_losses) == 6
    assert all(torch.equal(a[k], b[k]) for k in a)
    a_dev, b_dev = ({r["step"]: r["dev"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                     if "dev" in r} for out in (straight, resumed))
    assert sorted(a_dev) == [0, 3, 6] and all(b_dev[s] == a_dev[s] for s in a_dev)  # rank 0 evaluates from the slices

    ddp, ddp_tier = tmp_path / "ddp", tmp_path / "ddp-tier"
    ok(launch(2, train_args(tiny_dir, data_dir, ddp, 2, "--parallel", "ddp", *sliced, "--offload-to",
                            "disk", "--offload-dir", ddp_tier), timeout=240))
    losses, params = final(ddp)
    assert len(losses) == 2 and json.loads((ddp / "summary.json").read_text())["status"] == "completed"
    # the two ranks' slices of block 1 on disk are the checkpoint's block 1, each stored once
    model, _ = tiny_model("llama", seed=0)
    order = [f"model.layers.1.{n}" for n, _ in model.model.layers[1].named_parameters()]
    flats = [slices_of(ddp_tier / f"rank-{r:05d}" / "block-00001.safetensors") for r in range(2)]
    assert flats[0][1] == 0 and flats[0][2] == flats[1][1] and flats[1][2] == flats[1][3]
    assert torch.equal(torch.cat([f[0] for f in flats]), torch.cat([params[k].reshape(-1) for k in order]))
