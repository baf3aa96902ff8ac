"""Distributed ZO (docs/distributed.md): gloo ranks started here on 127.0.0.1, as torchrun would.

Point parallelism is bitwise a single process (with master copies, which make points
path-independent); data parallelism with D ranks is bitwise a single process averaging the same D
micro-batches (the gathered losses are summed in shard order in float64, as MicroBatches does);
2D is both. Only scalars travel: the bytes each rank sends per step are counted."""
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distributed_launch import launch  # noqa: E402
from helpers import lm_batch, tiny_llama  # noqa: E402

from zotune import ZOOptimizer, cli  # noqa: E402
from zotune.distributed import mesh_shape  # noqa: E402

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"


def single_process(master_weights, shards: int, probes: int = 1):
    """5 MeZO steps in this process, each point's loss the mean of ``shards`` micro-batches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = tiny_llama(seed=0)
        opt = ZOOptimizer(model.named_parameters(), lr=1e-3, eps=1e-3, seed=7, threads=1,
                          num_probes=probes, defer_update=True, master_weights=master_weights)
        losses = []
        for t in range(5):
            ids = lm_batch(100 + t, n=4)
            per = 4 // shards
            fns = [lambda x=ids[i * per:(i + 1) * per]: model(input_ids=x, labels=x).loss
                   for i in range(shards)]
            losses.append(opt.step(fns if shards > 1 else fns[0]))
        opt.flush()
        return losses, {n: p.detach().clone() for n, p in model.named_parameters()}
    finally:
        torch.set_num_threads(threads)


def run_modes(tmp_path, world, specs):
    results = launch(world, [WORKER, tmp_path, *specs], timeout=240)
    for code, out, err in results:
        assert code == 0, err[-3000:]
    found = {}
    for spec in [s for s in specs if s != "badlayout"]:
        mode, pertp, probes = (spec.split(":") + ["2", "1"])[:3]
        found[spec] = [torch.load(tmp_path / f"{mode}-{pertp}-{probes}-rank{r}.pt") for r in range(world)]
    return found


def test_modes_equal_a_single_process_and_send_only_losses(tmp_path):
    # one launch of 4 ranks: data parallel over 4 shards; point parallel on MeZO's 2 points (two
    # ranks idle) and on 2-probe SPSA's 4 points; a 2 x 2 mesh
    world, specs = 4, ["ddp", "pertp", "pertp:1:2", "2d:2"]
    found = run_modes(tmp_path, world, specs + ["badlayout"])
    for r in range(world):  # a rank with another set of trainable tensors: an error on every rank
        message = torch.load(tmp_path / f"badlayout-rank{r}.pt")["message"]
        assert message == ("ranks disagree on the parameter layout (rank(s) 1 differ from rank 0); "
                           "start every rank with the same settings (the same command line and "
                           "config file)"), message
    for spec, ranks in found.items():
        mode, pertp, probes = (spec.split(":") + ["2", "1"])[:3]
        dp, pp = mesh_shape(mode, world, int(pertp))
        losses, params = single_process(True if pp > 1 or mode != "ddp" else "auto", dp, int(probes))
        for r, got in enumerate(ranks):
            assert got["losses"] == losses, (spec, r)  # bitwise, every rank
            for name, value in params.items():
                assert torch.equal(got["params"][name], value), (spec, r, name)
            # per step: the pertp group's losses (ceil(n / pertp) float64) and the dp group's
            # (n float64), nothing else, whatever the model's size
            n = 2 * int(probes)
            expected = {}
            if pp > 1:
                expected["pertp loss gather"] = 8 * math.ceil(n / pp)
            if dp > 1:
                expected["dp loss gather"] = 8 * n
            assert got["sent"] == [expected] * 5, (spec, got["sent"])
            assert sum(expected.values()) < 100 < got["numel"]


def train_args(tiny_dir, data_dir, out, steps, *extra):
    return ["-m", "zotune", "train", "--model", tiny_dir, "--task", "sst2", "--data-dir", data_dir,
            "--steps", steps, "--eval-every", 3, "--log-every", 1, "--num-train", 32, "--num-dev", 8,
            "--num-test", 8, "--batch-size", 4, "--lr", 1e-3, "--output-dir", out, "--quiet", *extra]


def final(out: Path):
    latest = (out / "checkpoints" / "latest").read_text().strip()
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return losses, load_file(str(out / "checkpoints" / latest / "trainable.safetensors"))


def ok(results):
    for code, out, err in results:
        assert code == 0, err[-3000:]
    return results


def test_resume_with_another_world_size_equals_the_uninterrupted_run(tiny_dir, data_dir, tmp_path):
    """3 steps on 2 ranks, resumed in one process (a one-rank group in this one), equal bitwise
    to 6 steps in one process."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ok(launch(2, train_args(tiny_dir, data_dir, resumed, 3, "--parallel", "pertp")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): the forward's round-off is the same
    try:
        assert cli.main(train_args(tiny_dir, data_dir, straight, 6, "--parallel", "pertp")[2:]) == 0
        assert cli.main(train_args(tiny_dir, data_dir, resumed, 6, "--parallel", "pertp", "--resume")[2:]) == 0
    finally:
        torch.set_num_threads(threads)
    (a_losses, a), (b_losses, b) = final(straight), final(resumed)
    assert a_losses == b_losses and len(a_losses) == 6
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((straight / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize("flag,value,message", [
    ("--seed", lambda r: r, "ranks disagree on the run seed (rank 0 has 0, rank 1 has 1)"),
    ("--lr", lambda r: 1e-3 * (r + 1), "ranks disagree on the configuration (rank(s) 1 differ from rank 0)"),
])
def test_a_mismatched_setting_is_a_clear_error_at_start(tiny_dir, data_dir, tmp_path, flag, value, message):
    results = launch(2, train_args(tiny_dir, data_dir, tmp_path / "run", 6, "--parallel", "ddp"),
                     rank_args=lambda r: [flag, value(r)], timeout=120)
    for code, _, err in results:
        assert code == 2, err[-2000:]
        assert f"zotune: error: {message}; start every rank with the same settings" in err, err[-2000:]
        assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_killed_rank_ends_the_others_with_a_clear_error(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    latest = out / "checkpoints" / "latest"
    seen = {}

    def after_a_checkpoint():
        if latest.exists():
            seen.setdefault("at", time.monotonic())
            return time.monotonic() - seen["at"] > 0.3  # mid-way through later steps
        return False

    results = launch(2, train_args(tiny_dir, data_dir, out, 100000, "--parallel", "ddp",
                                   "--dist-timeout", 60), timeout=180, kill_rank=1,
                     kill_when=after_a_checkpoint)
    code, _, err = results[0]
    assert code == 2 and "rank 0: another rank closed its connection" in err, err[-2000:]
    assert "zotune: error:" in err and "Traceback" not in err
    assert time.monotonic() - seen["at"] < 60
    # the last checkpoint is complete and loads
    name = latest.read_text().strip()
    state = json.loads((out / "checkpoints" / name / "state.json").read_text())
    assert state["step"] > 0 and (out / "checkpoints" / name / "trainable.safetensors").exists()
    assert torch.load(out / "checkpoints" / name / "optimizer.pt", weights_only=True)["zo"]
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_the_wrapper_changes_nothing_on_every_preset(monkeypatch):
    """On a one-rank group in this process, every preset (DiZO's projection, KerZOO's gram,
    zo-cons, FZOO, PeZO, ...) through the distributed engine is bitwise the inner engine, and its
    state dict resumes bitwise."""
    import zotune
    from test_conformance import PRESETS, make_preset
    from zotune.distributed import init, shutdown

    def optimizer(**extra):
        class Optimizer(ZOOptimizer):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, **extra})
        return Optimizer

    topology = init("pertp")
    try:
        for name in PRESETS:
            if name.startswith("elasticzo") or "tail" in name:  # refused under parallel (test below)
                continue
            runs = []
            for extra in ({"master_weights": True}, {"master_weights": True, "parallel": topology}):
                monkeypatch.setattr(zotune, "ZOOptimizer", optimizer(**extra))
                model, loss, opt = make_preset(name)
                losses = [opt.step(loss) for _ in range(6)]
                saved = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict())
                losses += [opt.step(loss) for _ in range(4)]
                opt.flush()
                runs.append((losses, model.weight.detach().clone()))
            (a, wa), (b, wb) = runs
            assert a == b and torch.equal(wa, wb), name
            model, loss, opt = make_preset(name)  # resumed at step 6 through the wrapper
            model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
            assert [opt.step(loss) for _ in range(4)] == b[6:], name
            opt.flush()
            assert torch.equal(model.weight, wb), name
    finally:
        shutdown()


def test_cost_model_terms_and_plan(capsys):
    from zotune.distributed.cost import Cluster, Workload, calibrate_forward, plan, predict

    fwd = calibrate_forward({4: 1.0 + 0.5 * 4, 8: 1.0 + 0.5 * 8, 16: 1.0 + 0.5 * 16})
    assert fwd.fixed == pytest.approx(1.0) and fwd.per_example == pytest.approx(0.5)
    work = Workload(params=1e8, batch=16, offload=False)
    cpu = Cluster(gpus=4, gpus_per_node=4, cores=2, latency_s=0.0)
    one = predict(work, cpu, fwd, 1, 1, sweep_s=1.0)
    assert one.step_s == pytest.approx(2 * (1 + 8) + 2)  # two forwards on 16 + two sweeps
    ddp2 = predict(work, cpu, fwd, 2, 1, sweep_s=1.0)
    assert ddp2.step_s == pytest.approx(2 * (1 + 4) + 2)
    pertp2 = predict(work, cpu, fwd, 1, 2, sweep_s=1.0)
    assert pertp2.step_s == pytest.approx(1 * (1 + 8) + 2)
    ddp4 = predict(work, cpu, fwd, 4, 1, sweep_s=1.0)  # 4 processes on 2 cores: twice as slow
    assert ddp4.step_s == pytest.approx(2 * (2 * (1 + 2) + 2))
    # offload: sliced loading over NVLink beats every rank pulling the whole model over PCIe
    big = Workload(params=175e9, batch=16, seq_len=256, blocks=96)
    found = plan(big, Cluster(gpus=8, nvlink=True))
    assert found[0].sliced and found[0].parts["offload"]
    assert not any(p.sliced for p in plan(big, Cluster(gpus=8, nvlink=False)))
    assert cli.main(["plan", "--model", "opt-175b", "--gpus", "8", "--nvlink"]) == 0
    out = capsys.readouterr().out
    assert "best: " in out and "sliced" in out and "offload" in out
    assert cli.main(["plan", "--model", "opt-9000"]) == 2


def test_the_offload_engine_runs_distributed_unchanged(tiny_dir, data_dir, tmp_path):
    """The wrapper over block streaming (engine 'offload', issue 13, once merged) gives the
    in-memory engine's losses and parameters bitwise, on a one-rank group in this process."""
    from zotune.engines import ENGINES

    if "offload" not in ENGINES:
        pytest.skip("the offload engine (branch i13-offload) is not merged yet")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for extra in ((), ("--engine", "offload")):
            out = tmp_path / f"run{len(runs)}"
            assert cli.main(train_args(tiny_dir, data_dir, out, 4, "--parallel", "pertp", *extra)[2:]) == 0
            runs.append(final(out))
    finally:
        torch.set_num_threads(threads)
    (a_losses, a), (b_losses, b) = runs
    assert a_losses == b_losses and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # 13 s; fast: a killed rank ends the others; SIGTERM in one process in test_run_safety
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(tiny_dir, data_dir, tmp_path):
    """The stop flag is gathered each step: rank 0 saves the step every rank stopped at."""
    import signal

    out = tmp_path / "run"
    latest = out / "checkpoints" / "latest"
    results = launch(2, train_args(tiny_dir, data_dir, out, 100000, "--parallel", "ddp",
                                   "--dist-timeout", 60), timeout=180, kill_rank=1,
                     kill_when=latest.exists, kill_signal=signal.SIGTERM)
    for code, _, err in results:
        assert code == 143, err[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "terminated"
    name = latest.read_text().strip()
    assert json.loads((out / "checkpoints" / name / "state.json").read_text())["step"] == summary["steps"]
    assert "the checkpoint at step" in results[0][2] and "continue with --resume" in results[0][2]


def test_elasticzo_under_parallel_is_refused():
    from zotune.distributed import init, shutdown

    topology = init("pertp")
    try:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        with pytest.raises(ValueError, match="does not run under parallel"):
            ZOOptimizer(model, lr=1e-3, method="elasticzo", parallel=topology)
    finally:
        shutdown()
