"""A run directory holds one run at a time; SIGTERM stops a run like Ctrl-C (checkpoint, summary
``terminated``, exit 143) and it resumes bitwise; a save stopped half-way is tidied at the next
start; the last two checkpoints are kept and --resume falls back to the older; the phase lines
come before the first step; the summary's counters survive a resume.

The subprocess tests start real ``zotune train`` processes on a tiny model (one of them slowed
down in its steps, so that it is still running when the test acts); every process has a timeout
and is ended by its pid in a ``finally``."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zotune
from zotune import checkpoint, cli, stopping
from zotune.objectives import CandidateScorer
from zotune.run_lock import LOCK_NAME, RunLock, RunLocked, read_owner

from test_train_cli import final_params, train_args

SRC = Path(zotune.__file__).resolve().parents[1]  # the zotune this test imported, for the subprocesses

# `zotune train` whose steps from the second on wait for the file argv[1] (at most 60 s), so that
# the test can act while the run is between its first and second step.
SLOW_TRAIN = r"""
import os, sys, time
import zotune.optim as optim
from zotune import cli
real, go, calls = optim.ZOOptimizer.step, sys.argv[1], [0]
def step(self, closure=None):
    calls[0] += 1
    deadline = time.monotonic() + 60
    while calls[0] >= 2 and not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.02)
    return real(self, closure)
optim.ZOOptimizer.step = step
sys.exit(cli.main(sys.argv[2:]))
"""


def env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def wait_for(condition, proc, timeout, what, strict=True) -> bool:
    """Poll ``condition`` until it holds; if the process ends first or time runs out: fail, or
    with ``strict=False`` return False (the tests then say what went wrong)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            if strict:
                pytest.fail(f"the run ended (exit {proc.returncode}) or timed out before {what}")
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def straight(tiny_dir, data_dir, tmp_path_factory):
    """An uninterrupted 6-step run (the reference of every resume here)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert cli.main([str(a) for a in train_args(tiny_dir, data_dir, out, 6)]) == 0
    return out


@pytest.fixture(scope="module")
def sigterm_run(tiny_dir, data_dir, tmp_path_factory):
    """A `zotune train` process (phase lines on), a second one started on its directory while it
    runs, then SIGTERM to the first between its steps 1 and 2. Records what each did."""
    tmp = tmp_path_factory.mktemp("sigterm")
    out, go = tmp / "run", tmp / "go"
    args = [str(a) for a in train_args(tiny_dir, data_dir, out, 6) if a != "--quiet"]
    stdout, stderr, second_err = tmp / "stdout", tmp / "stderr", tmp / "second_stderr"
    with open(stdout, "w") as o, open(stderr, "w") as e:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, str(go), *args], stdout=o, stderr=e,
                                env=env(), stdin=subprocess.DEVNULL)
    second = None
    try:
        # the second run starts once the first holds the directory (its import time overlaps the
        # first's loading and zero-shot evaluation); the first waits before its step 2 meanwhile
        wait_for(lambda: (read_owner(out / LOCK_NAME) or {}).get("pid") == proc.pid, proc, 240,
                 "the first run's lock")
        with open(second_err, "w") as e:
            second = subprocess.Popen([sys.executable, "-m", "zotune.cli", *args], stdout=subprocess.DEVNULL,
                                      stderr=e, env=env(), stdin=subprocess.DEVNULL)
        wait_for(lambda: any("loss" in r for r in records(out)), proc, 240, "the first step")
        before_first_step = stderr.read_text()
        second_code = second.wait(timeout=240)
        still_running = proc.poll() is None
        os.kill(proc.pid, signal.SIGTERM)
        wait_for(lambda: "SIGTERM received" in stderr.read_text(), proc, 60, "the SIGTERM message",
                 strict=False)
        go.touch()
        code = proc.wait(timeout=120)
    finally:
        for p in (proc, second):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    return {"out": out, "pid": proc.pid, "code": code, "before_first_step": before_first_step,
            "stderr": stderr.read_text(), "stdout": stdout.read_text(), "still_running": still_running,
            "second": subprocess.CompletedProcess(second.args, second_code, "", second_err.read_text())}


def test_a_second_run_on_a_directory_in_use_is_refused(sigterm_run):
    second = sigterm_run["second"]
    assert sigterm_run["still_running"]  # the first run held the directory all along
    assert second.returncode == 2, second.stderr
    err = second.stderr.strip()
    assert err.startswith("zotune: error: ") and "\n" not in err and "in use" in err
    assert f"pid {sigterm_run['pid']}" in err and socket.gethostname() in err
    # the second run wrote nothing: one zero-shot line, no second run's steps
    assert sum(1 for r in records(sigterm_run["out"]) if r.get("zero_shot")) == 1


def test_phase_lines_come_before_the_first_step(sigterm_run):
    err = sigterm_run["before_first_step"]
    phases = ["zotune: loading data: sst2", "zotune: loading the model:",
              "zotune: zero-shot evaluation on 16 dev + 16 test examples", "zotune: training: steps 1-6"]
    at = [err.find(p) for p in phases]
    assert -1 not in at and at == sorted(at), err
    assert "zero-shot dev:" in err and "/16 [" in err  # the evaluation's bar
    assert "eta " in sigterm_run["stderr"] and "evals + test" in sigterm_run["stderr"]  # the ETA
    assert sigterm_run["stdout"].strip() == ""  # stdout is kept for the final JSON


def test_sigterm_saves_a_checkpoint_and_resumes_bitwise(sigterm_run, straight, tiny_dir, data_dir):
    out = sigterm_run["out"]
    assert sigterm_run["code"] == 143, sigterm_run["stderr"]
    s = summary(out)
    assert s["status"] == "terminated" and s["steps"] == 2 and s["forward_passes"] == 4
    assert checkpoint.latest(out).name == "step-0000002"
    last = sigterm_run["stderr"].strip().splitlines()[-1]
    assert last.startswith("zotune: terminated") and "step 2 is saved" in last and "--resume" in last
    assert not (out / LOCK_NAME).exists()  # released
    assert cli.main([str(a) for a in train_args(tiny_dir, data_dir, out, 6, "--resume")]) == 0
    a, b = final_params(straight), final_params(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert summary(out)["forward_passes"] == summary(straight)["forward_passes"] == 12


def test_the_lock_names_its_holder_and_a_stale_one_is_taken_over(tiny_dir, data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir):
        owner = json.loads((run_dir / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunLocked, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            RunLock(run_dir).acquire()
    assert not (run_dir / LOCK_NAME).exists()
    # the lock file of a process that died without removing it (kill -9)
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=30)
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    assert cli.main([str(a) for a in train_args(tiny_dir, data_dir, run_dir, 2)]) == 0
    err = capsys.readouterr().err
    assert f"zotune: warning: taking over the stale lock {run_dir / LOCK_NAME} of pid {dead.pid}" in err
    assert "not running" in err and not (run_dir / LOCK_NAME).exists()


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(tiny_dir, data_dir, tmp_path,
                                                                   monkeypatch, capsys):
    def interrupted(self, examples, batch_size=16):
        raise KeyboardInterrupt

    monkeypatch.setattr(CandidateScorer, "predict", interrupted)  # during the zero-shot evaluation
    out = tmp_path / "run"
    assert cli.main([str(a) for a in train_args(tiny_dir, data_dir, out, 6)]) == 130
    err = capsys.readouterr().err.strip()
    assert "nothing was saved" in err and "is saved" not in err and "\n" not in err
    assert checkpoint.latest(out) is None and not (out / LOCK_NAME).exists()


def test_a_second_signal_during_the_save_leaves_nothing_behind(tiny_dir, data_dir, tmp_path, straight,
                                                               monkeypatch, capsys):
    out = tmp_path / "run"
    real_save, saves = torch.save, []

    def stopped_save(obj, f, *args, **kwargs):  # the optimizer state of a checkpoint
        saves.append(f)
        if len(saves) == 2:  # the checkpoint of step 6: a second SIGTERM arrives while it is written
            raise stopping.RunStopped(signal.SIGTERM, immediate=True)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", stopped_save)
    assert cli.main([str(a) for a in train_args(tiny_dir, data_dir, out, 6)]) == 143
    err = capsys.readouterr().err.strip()
    assert "without saving" in err and "(step 3)" in err
    assert (out / "checkpoints" / "step-0000006.tmp").is_dir()
    assert checkpoint.latest(out).name == "step-0000003"
    monkeypatch.setattr(torch, "save", real_save)
    assert cli.main([str(a) for a in train_args(tiny_dir, data_dir, out, 6, "--resume")]) == 0
    assert "removed " in capsys.readouterr().err
    assert not list(out.glob("**/*.tmp")) and not list(out.glob("**/*.old"))
    a, b = final_params(straight), final_params(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_clean_puts_back_a_checkpoint_whose_replacement_was_stopped(tmp_path):
    params = {"w": torch.arange(4.0)}
    saved = checkpoint.save(tmp_path, 3, params, {"step": 3}, {"zo": {}})
    # stopped while replacing step 3 by itself: the old one renamed away, the new one half-written
    os.replace(saved, saved.with_name(saved.name + ".old"))
    (tmp_path / "checkpoints" / (saved.name + ".tmp")).mkdir()
    (tmp_path / "best.tmp").mkdir()
    done = checkpoint.clean(tmp_path)
    assert len(done) == 3 and checkpoint.latest(tmp_path) == saved
    state, _ = checkpoint.load(saved, {"w": torch.zeros(4)})
    assert state == {"step": 3}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", saved.name]
    assert not (tmp_path / "best.tmp").exists()


def test_two_checkpoints_are_kept_and_resume_falls_back_to_the_older(tiny_dir, data_dir, tmp_path,
                                                                     straight, capsys):
    out = tmp_path / "run"
    assert cli.main([str(a) for a in train_args(tiny_dir, data_dir, out, 6, "--eval-every", 2)]) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000004", "step-0000006"]
    # the newest is unreadable: --resume continues from the one before it
    (out / "checkpoints" / "step-0000006" / "optimizer.pt").write_bytes(b"not a torch file")
    capsys.readouterr()
    assert cli.main([str(a) for a in train_args(tiny_dir, data_dir, out, 6, "--eval-every", 2,
                                                "--resume")]) == 0
    err = capsys.readouterr().err
    assert "zotune: warning: cannot read optimizer state" in err and "step-0000004" in err
    a, b = final_params(straight), final_params(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary(out)["steps"] == 6 and summary(out)["forward_passes"] == 12
    # one checkpoint when asked for one
    one = tmp_path / "one"
    assert cli.main([str(a) for a in train_args(tiny_dir, data_dir, one, 6, "--eval-every", 2,
                                                "--keep-checkpoints", 1)]) == 0
    assert [p.name for p in (one / "checkpoints").glob("step-*")] == ["step-0000006"]
    assert "keep_checkpoints must be an integer >= 1" in _error(capsys, train_args(
        tiny_dir, data_dir, tmp_path / "bad", 2, "--keep-checkpoints", 0))


def _error(capsys, args) -> str:
    capsys.readouterr()
    assert cli.main([str(a) for a in args]) == 2
    return capsys.readouterr().err


def test_best_shares_the_file_of_its_checkpoint_in_full_precision(straight):
    s = summary(straight)
    best = straight / "best" / checkpoint.PARAMS
    same_step = straight / "checkpoints" / f"step-{s['best_step']:07d}" / checkpoint.PARAMS
    assert same_step.exists() and os.path.samefile(best, same_step)  # one copy on disk
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(str(best)).values()} == {torch.float32}  # the run's dtype


def test_summary_counters_survive_a_resume(tiny_dir, data_dir, tmp_path, straight):
    out = tmp_path / "run"
    assert cli.main([str(a) for a in train_args(tiny_dir, data_dir, out, 3, "--eval-dev", 4)]) == 0
    assert cli.main([str(a) for a in train_args(tiny_dir, data_dir, out, 6, "--eval-dev", 4,
                                                "--resume")]) == 0
    s, ref = summary(out), summary(straight)
    assert s["random_numbers"] == ref["random_numbers"] > 0
    assert s["forward_passes"] == 12 and s["dev_examples"] == 4 and ref["dev_examples"] == 16
    tests = [r for r in records(out) if "test" in r and not r.get("zero_shot")]
    assert len(tests) == 1 and tests[0]["test"] == s["test"]  # the first completion's line is gone


@pytest.mark.parametrize("forward", [9, 10], ids=["first-forward", "second-forward"])
def test_an_interrupted_step_is_not_counted(tiny_dir, data_dir, tmp_path, monkeypatch, straight, forward):
    real_loss, calls = CandidateScorer.classification_loss, []

    def interrupted(self, examples):
        calls.append(1)
        if len(calls) == forward:  # the first or the second forward of step 5
            raise KeyboardInterrupt
        return real_loss(self, examples)

    monkeypatch.setattr(CandidateScorer, "classification_loss", interrupted)
    out = tmp_path / "run"
    assert cli.main([str(a) for a in train_args(tiny_dir, data_dir, out, 6)]) == 130
    assert summary(out)["steps"] == 4 and summary(out)["forward_passes"] == 8
    monkeypatch.setattr(CandidateScorer, "classification_loss", real_loss)
    assert cli.main([str(a) for a in train_args(tiny_dir, data_dir, out, 6, "--resume")]) == 0
    assert summary(out)["forward_passes"] == 12
    # the checkpoint kept the step half-done (parameters at its + point, the query pending), so
    # the resumed run makes the same roundings as the uninterrupted one
    a, b = final_params(straight), final_params(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
