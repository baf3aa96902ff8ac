"""``zotune eval`` on image runs: the latest checkpoint's test accuracy, equal to the run's own."""
from __future__ import annotations

import json

import pytest

from zotune import cli

from test_images import train_args, write_fashion_mnist


@pytest.fixture
def fm_dir(tmp_path):
    write_fashion_mnist(tmp_path / "data")
    return tmp_path / "data"


def last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("method,extra", [("elasticzo", ("--bp-layers", "2")),
                                          ("elasticzo-int8", ("--bp-layers", "2"))])
def test_eval_of_an_image_run_equals_its_final_test_accuracy(fm_dir, tmp_path, capsys, method, extra):
    """The trainer is restored from the checkpoint, so even the int8 weights (kept in the trainer
    state, not the model) give the run's own final accuracy."""
    run = tmp_path / method
    assert cli.main(train_args(fm_dir, run, "--method", method, *extra, "--steps", "6")) == 0
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(run), "--which", "latest"]) == 0
    line = last_json(capsys)
    assert line["value"] == summary["test"] and line["examples"] == summary["test_examples"]
    assert line["task"] == "fashion-mnist" and line["parameters"].endswith("step-0000006")
    assert cli.main(["eval", "--checkpoint", str(run), "--num-test", "8"]) == 0  # --which best
    captured = capsys.readouterr()
    assert "keep no best checkpoint" in captured.err and json.loads(captured.out)["examples"] == 8


def test_zero_shot_is_the_runs_initialisation(fm_dir, tmp_path, capsys):
    run = tmp_path / "mezo"
    assert cli.main(train_args(fm_dir, run, "--method", "mezo", "--steps", "3")) == 0
    initial = json.loads((run / "summary.json").read_text())["initial_test"]
    capsys.readouterr()
    assert cli.main(["eval", "--task", "fashion-mnist", "--model", "lenet5", "--data-dir", str(fm_dir)]) == 0
    line = last_json(capsys)
    assert line["value"] == initial and line["parameters"] == "initialisation"


def test_bad_eval_inputs_are_one_line_errors(fm_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(train_args(fm_dir, run, "--method", "mezo", "--steps", "3")) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(run), "--split", "dev"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no 'dev' split; use --split test" in err
    assert cli.main(["eval", "--task", "fashion-mnist", "--model", "gpt2", "--data-dir", str(fm_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown image model 'gpt2'" in err
    # Without --model, the image default (as zotune train): LeNet-5's initialisation.
    assert cli.main(["eval", "--task", "fashion-mnist", "--data-dir", str(fm_dir)]) == 0
    assert last_json(capsys)["parameters"] == "initialisation"
