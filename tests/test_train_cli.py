"""End to end: `zotune train` on a tiny random Llama writes every artifact, resumes exactly, and
answers user mistakes with one clear line and exit code 2."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zotune import cli, optim


def run(args, capsys=None) -> int:
    return cli.main([str(a) for a in args])


def train_args(tiny_dir, data_dir, out, steps=6, *extra):
    return ["train", "--model", tiny_dir, "--task", "sst2", "--data-dir", data_dir, "--steps", steps,
            "--eval-every", 3, "--log-every", 1, "--num-train", 32, "--num-dev", 16, "--num-test", 16,
            "--batch-size", 4, "--lr", 1e-3, "--output-dir", out, "--quiet", *extra]


def final_params(run_dir: Path) -> dict:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "trainable.safetensors"))


def losses(run_dir: Path) -> list:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_train_writes_every_artifact(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(tiny_dir, data_dir, out)) == 0
    for name in ("config.json", "metrics.jsonl", "summary.json", "curves.png", "best/trainable.safetensors",
                 "checkpoints/latest"):
        assert (out / name).exists(), name
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert summary["forward_passes"] == 12 and summary["skipped_steps"] == 0
    assert set(summary["zero_shot"]) == {"dev", "test"} and summary["test"] is not None
    assert summary["best_step"] in (3, 6) and summary["peak_rss_gib"] > 0
    assert len(losses(out)) == 6
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["test"] == summary["test"]

    # zotune eval on the run reproduces the test number of the best-dev checkpoint
    assert run(["eval", "--checkpoint", out, "--data-dir", data_dir]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["value"] == pytest.approx(summary["test"]) and evaluated["examples"] == 16


def test_resume_is_exact(tiny_dir, data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(train_args(tiny_dir, data_dir, straight, 6)) == 0
    assert run(train_args(tiny_dir, data_dir, resumed, 3)) == 0
    assert run(train_args(tiny_dir, data_dir, resumed, 6, "--resume")) == 0
    a, b = final_params(straight), final_params(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(resumed)


def test_interrupt_saves_a_checkpoint_and_resumes(tiny_dir, data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_step = optim.ZOOptimizer.step
    calls = {"n": 0}

    def flaky(self, closure=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(self, closure)

    monkeypatch.setattr(optim.ZOOptimizer, "step", flaky)
    assert run(train_args(tiny_dir, data_dir, out)) == 130
    assert "checkpoint" in capsys.readouterr().err
    state = json.loads((out / "checkpoints" / (out / "checkpoints" / "latest").read_text() / "state.json").read_text())
    assert state["step"] == 4
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(optim.ZOOptimizer, "step", real_step)
    assert run(train_args(tiny_dir, data_dir, out, 6, "--resume")) == 0
    straight = tmp_path / "straight"
    assert run(train_args(tiny_dir, data_dir, straight)) == 0
    a, b = final_params(straight), final_params(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_time_stops_with_a_checkpoint(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    assert run(train_args(tiny_dir, data_dir, out, 1000, "--max-time", 0.01)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "max_time" and summary["steps"] < 1000
    assert (out / "checkpoints" / "latest").exists()


def test_yaml_config_and_flag_override(tiny_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_dir}\ntask: sst2\nsteps: 2\neval-every: 2\nnum_train: 16\n"
                      f"num_dev: 8\nnum_test: 8\nbatch_size: 2\nlr: 1.0e-3\nmethod: zo-adam\n")
    assert run(["train", "--config", config, "--data-dir", data_dir, "--output-dir", out, "--quiet",
                "--method", "zo-sign"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["method"] == "zo-sign" and saved["steps"] == 2 and saved["batch_size"] == 2


def error_of(capsys, args) -> str:
    assert run(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zotune: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_user_errors(tiny_dir, data_dir, tmp_path, capsys):
    base = train_args(tiny_dir, data_dir, tmp_path / "x", 2)
    swap = lambda flag, value: [value if i > 0 and base[i - 1] == flag else a for i, a in enumerate(base)]  # noqa: E731
    assert "sst2" in error_of(capsys, swap("--task", "sst3"))
    assert "valid: mezo" in error_of(capsys, base + ["--method", "adam"])
    assert "full, lora, prefix, pattern" in error_of(capsys, base + ["--trainable", "all"])
    assert "steps must be an integer >= 1" in error_of(capsys, swap("--steps", "0"))
    assert "lr must be >= 0" in error_of(capsys, swap("--lr", "-1"))
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in error_of(capsys, base + ["--device", "cuda"])
    assert "unknown device" in error_of(capsys, base + ["--device", "tpu9"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in error_of(capsys, swap("--data-dir", str(empty)))
    assert "not a local directory" in error_of(capsys, swap("--model", str(tmp_path / "no-such-model")))
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("stepz: 3\n")
    assert "stepz" in error_of(capsys, ["train", "--config", bad_yaml])


def test_custom_task_template_error(tiny_dir, tmp_path, capsys):
    data = tmp_path / "reviews.jsonl"
    data.write_text('{"text": "good film", "label": 1}\n{"text": "bad film", "label": 0}\n' * 10)
    spec = tmp_path / "task.yaml"
    spec.write_text(f"name: reviews\ntrain: {data}\ntemplate: '{{review}} It was'\n"
                    "verbalizer: {0: ' bad', 1: ' good'}\n")
    err = error_of(capsys, ["train", "--model", tiny_dir, "--task-file", spec, "--steps", 1,
                            "--output-dir", tmp_path / "run", "--quiet"])
    assert "review" in err and "text" in err


def test_existing_run_is_not_overwritten_and_checkpoint_errors(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(train_args(tiny_dir, data_dir, out, 3)) == 0
    capsys.readouterr()
    before = final_params(out)
    assert "--resume" in error_of(capsys, train_args(tiny_dir, data_dir, out, 3))
    assert all(torch.equal(before[k], v) for k, v in final_params(out).items())  # nothing lost
    assert "lr=0.001" in error_of(capsys, train_args(tiny_dir, data_dir, out, 6, "--resume", "--lr", "1e-2"))
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    (latest / "trainable.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot read checkpoint" in error_of(capsys, train_args(tiny_dir, data_dir, out, 6, "--resume"))
    assert "nothing to resume" in error_of(capsys, train_args(tiny_dir, data_dir, tmp_path / "new", 6, "--resume"))


COMPOSITIONS = {
    "kerzoo-code": ["--method", "kerzoo-code"],
    "pezo": ["--method", "pezo"],
    "pezo-decorrelated": ["--method", "pezo", "--pool-size", 4099, "--pezo-decorrelate-copies"],
    "pezo-bank": ["--direction", "pezo-bank", "--pezo-lanes", 4, "--pezo-reuse", 2, "--pezo-bits", 16],
    "dizo": ["--method", "dizo", "--dizo-interval", 2, "--dizo-iterations", 2],
    "dizo-fo": ["--method", "dizo-fo", "--dizo-interval", 2, "--dizo-iterations", 2],
    "kerzoo+pezo+dizo": ["--method", "dizo", "--estimator", "kernel", "--direction", "pezo-pool",
                         "--dizo-interval", 2, "--dizo-iterations", 2],
}


@pytest.mark.parametrize("name", COMPOSITIONS)
def test_presets_and_compositions_train_and_resume_exactly(tiny_dir, data_dir, tmp_path, name):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = COMPOSITIONS[name]
    assert run(train_args(tiny_dir, data_dir, straight, 4, *extra)) == 0
    assert run(train_args(tiny_dir, data_dir, resumed, 2, *extra)) == 0
    assert run(train_args(tiny_dir, data_dir, resumed, 4, "--resume", *extra)) == 0
    a, b = final_params(straight), final_params(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((straight / "summary.json").read_text())
    per_step = 6 if name == "kerzoo-code" else 2
    # 2 searches x 2 iterations x 2 forwards (ZO) or 1 forward and 1 backward (FO)
    searches = (4 if name == "dizo-fo" else 8) if "dizo" in name else 0
    assert summary["forward_passes"] == 4 * per_step + searches
    pezo = {"pezo": "pezo-pool", "pezo-decorrelated": "pezo-pool", "pezo-bank": "pezo-bank",
            "kerzoo+pezo+dizo": "pezo-pool"}
    assert summary["direction"] == pezo.get(name, "gaussian")  # a preset's own direction is kept
    assert (summary["random_numbers"] == 0) == (summary["direction"] == "pezo-pool")


def test_composition_errors(tiny_dir, data_dir, tmp_path, capsys):
    base = train_args(tiny_dir, data_dir, tmp_path / "x", 2)
    assert "valid: spsa, kernel" in error_of(capsys, base + ["--estimator", "newton"])
    assert "valid: none, dizo, dizo-fo" in error_of(capsys, base + ["--projection", "maybe"])
    assert "agd" in error_of(capsys, base + ["--update", "lion"])
    assert "kernel order" in error_of(capsys, base + ["--kernel-order", 4])
    assert "r_sharing" in error_of(capsys, base + ["--kernel-r-sharing", "layer"])
    assert "pool" in error_of(capsys, base + ["--pool-size", 100])
    assert "--pezo-lanes not for the 'pezo-pool' direction" in error_of(
        capsys, base + ["--method", "pezo", "--pezo-lanes", 4])
    assert "bits must be an integer from 1 to 16" in error_of(capsys, base + ["--method", "pezo", "--pezo-bits", 40])
    assert "valid: static, none" in error_of(capsys, base + ["--direction", "pezo-bank", "--pezo-scaling", "norm_global"])
    assert "pattern" in error_of(capsys, base + ["--method", "dizo", "--dizo-pattern", "no_such_tensor"])
