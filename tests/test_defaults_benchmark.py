"""The defaults benchmark's split runs (benchmarks/defaults.py): a run stopped after a segment and
continued by the same command replays the saved losses and ends bitwise where the uninterrupted
run ends, with the same forward passes and the same row."""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "defaults.py"
_spec = importlib.util.spec_from_file_location("defaults_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _args(tiny_dir, data_dir, tmp_path, **over):
    args = {"data_dir": str(data_dir), "model": str(tiny_dir), "steps": 4, "seed": 0, "lr": None,
            "num_test": 2, "held_out": "test", "segment_s": None, "segment_steps": None, "backprop": None, "micro_batch": None,
            "progress_dir": str(tmp_path / "progress")}
    args.update(over)
    return argparse.Namespace(**args)


@pytest.mark.parametrize("method", ["mezo", pytest.param("fzoo", marks=pytest.mark.slow)])
def test_a_split_run_replays_bitwise_to_the_uninterrupted_row(tiny_dir, data_dir, tmp_path, monkeypatch, method):
    # fzoo: several probes and an unperturbed point per step, so a step has more than two losses
    real = bench.TrainConfig.from_flat
    monkeypatch.setattr(bench.TrainConfig, "from_flat", lambda **kw: real(method=method, batch_size=4, **kw))
    whole = bench.run_task(_args(tiny_dir, data_dir, tmp_path), "sst2")
    split = _args(tiny_dir, data_dir, tmp_path, segment_steps=2)
    assert bench.run_task(split, "sst2") is None
    saved = json.loads(bench.progress_path(split, "sst2").read_text())
    assert len(saved["losses"]) == 2 and len(saved["checksum"]) == 2
    row = bench.run_task(split, "sst2")  # replays steps 1-2, runs 3-4
    for key in ("loss_before", "loss_after", "loss_change", "metric_after", "forward_passes",
                "train_loss_first", "train_loss_last"):
        assert row[key] == whole[key], key
    assert whole["forward_passes"] == 4 * len(saved["losses"][0][0])


def test_a_replay_that_does_not_reproduce_the_parameters_is_refused(tiny_dir, data_dir, tmp_path):
    split = _args(tiny_dir, data_dir, tmp_path, steps=3, segment_steps=2)
    assert bench.run_task(split, "sst2") is None
    path = bench.progress_path(split, "sst2")
    saved = json.loads(path.read_text())
    saved["losses"][1][0][0] += 1.0  # a different recorded loss moves the parameters elsewhere
    path.write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="did not reproduce its parameters"):
        bench.run_task(split, "sst2")
    saved["losses"][1][0][0] -= 1.0
    saved["settings"]["eps"] *= 10  # progress recorded under other settings is not replayed
    path.write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="was recorded with"):
        bench.run_task(split, "sst2")


def test_the_backprop_reference_trains_the_same_parameters_on_the_same_batches(tiny_dir, data_dir, tmp_path):
    # Adam on the gradient of the same objective: the training loss falls within a few steps on
    # the tiny model, and the parameters are left as the ZO path expects them (no grad)
    args = _args(tiny_dir, data_dir, tmp_path, steps=10, backprop=1e-2)
    row = bench.run_task(args, "sst2")
    assert row["method"] == "backprop-adam" and row["lr"] == 1e-2 and row["forward_passes"] == 10
    assert row["train_loss_last"] < row["train_loss_first"]
    assert row["loss_after"] != row["loss_before"]
    with pytest.raises(SystemExit, match="not split into segments"):
        bench.run_task(_args(tiny_dir, data_dir, tmp_path, backprop=1e-2, segment_steps=2), "sst2")


def test_micro_batches_give_the_backprop_reference_the_whole_batch_gradient(tiny_dir, data_dir, tmp_path, monkeypatch):
    # a batch of 4 accumulated as micro-batches of 3 and 1 (unequal, so a wrong weight would turn
    # the gradient, which Adam's scale invariance would hide) is the batch-mean gradient up to fp32
    # summation order, so the run follows the same path (3 Adam steps; tolerance 1e-5 absolute)
    real = bench.TrainConfig.from_flat
    monkeypatch.setattr(bench.TrainConfig, "from_flat", lambda **kw: real(batch_size=4, **kw))
    whole = bench.run_task(_args(tiny_dir, data_dir, tmp_path, steps=3, backprop=1e-3), "sst2")
    micro = bench.run_task(_args(tiny_dir, data_dir, tmp_path, steps=3, backprop=1e-3, micro_batch=3), "sst2")
    assert micro["micro_batch"] == 3 and whole["micro_batch"] == 4
    for key in ("train_loss_first", "train_loss_last", "loss_after"):
        assert micro[key] == pytest.approx(whole[key], abs=1e-5), key
    with pytest.raises(SystemExit, match="mean over examples"):
        bench.run_task(_args(tiny_dir, data_dir, tmp_path, backprop=1e-3, micro_batch=1), "squad")
