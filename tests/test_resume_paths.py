"""Resume semantics (--steps is the total; a refused resume leaves config.json alone) and absolute
paths in config.json (a run evaluates and resumes from any working directory)."""
import json
import os

from zotune import cli
from zotune.config import TrainConfig


def train_args(tiny_dir, data_dir, out, steps, *extra):
    return ["train", "--model", tiny_dir, "--task", "sst2", "--data-dir", data_dir, "--steps", steps,
            "--eval-every", 3, "--num-train", 16, "--num-dev", 4, "--num-test", 4, "--batch-size", 2,
            "--lr", 1e-3, "--output-dir", out, "--quiet", *extra]


def run(args) -> int:
    return cli.main([str(a) for a in args])


def test_steps_below_the_checkpoint_and_refused_resumes_leave_config_json(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(tiny_dir, data_dir, out, 3)) == 0
    saved = (out / "config.json").read_bytes()
    capsys.readouterr()
    # --eval-every may change on resume: a resume that went ahead would rewrite config.json with it
    assert run(train_args(tiny_dir, data_dir, out, 2, "--resume", "--eval-every", 1)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"zotune: error: cannot resume {out} with --steps 2: the run is at step 3; --steps is "
                   "the total number of steps, not the number to add: pass --steps 4 or more to continue it")
    assert (out / "config.json").read_bytes() == saved
    assert run(train_args(tiny_dir, data_dir, out, 6, "--resume", "--eval-every", 1, "--seed", 5)) == 2
    assert "seed=0 (now 5)" in capsys.readouterr().err
    assert (out / "config.json").read_bytes() == saved
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    (latest / "optimizer.pt").write_bytes(b"garbage")
    assert run(train_args(tiny_dir, data_dir, out, 6, "--resume", "--eval-every", 1)) == 2
    assert "cannot read optimizer state" in capsys.readouterr().err
    assert (out / "config.json").read_bytes() == saved


def test_config_json_paths_are_absolute_so_the_run_works_from_anywhere(tiny_dir, data_dir, tmp_path,
                                                                      monkeypatch, capsys):
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    (start / "data").symlink_to(data_dir, target_is_directory=True)
    (start / "model").symlink_to(tiny_dir, target_is_directory=True)
    monkeypatch.chdir(start)
    assert run(train_args("model", "data", "run", 1, "--eval-every", 1)) == 0
    saved = json.loads((start / "run" / "config.json").read_text())
    for key in ("model", "data_dir", "output_dir"):
        assert os.path.isabs(saved[key]) and os.path.isdir(saved[key]), (key, saved[key])
    assert saved["output_dir"] == str(start / "run")
    test = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["test"]

    monkeypatch.chdir(elsewhere)
    assert run(["eval", "--checkpoint", start / "run"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["value"] == test
    assert run(["train", "--output-dir", start / "run", "--steps", 2, "--resume", "--quiet"]) == 0
    assert json.loads((start / "run" / "summary.json").read_text())["steps"] == 2
    assert not (elsewhere / "run").exists()


def test_resolved_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-model").mkdir()
    cfg = TrainConfig.from_flat(model="local-model", data_dir="d", task_file="~/spec.yaml",
                                output_dir="runs/x").resolved()
    assert cfg.model.name == str(tmp_path / "local-model") and cfg.data.data_dir == str(tmp_path / "d")
    assert cfg.data.task_file == os.path.expanduser("~/spec.yaml")
    assert cfg.run.output_dir == str(tmp_path / "runs" / "x")
    for name in ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M"):  # embedded or Hub ids stay names
        assert TrainConfig.from_flat(model=name).resolved().model.name == name
    assert TrainConfig().resolved().data.data_dir is None  # $ZOTUNE_DATA, read when the data is
