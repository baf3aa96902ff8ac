"""``zotune rank rl``: the observation normaliser, the three methods on a tiny stand-in
environment (no MuJoCo needed), and the real CLI on Swimmer-v5 when gymnasium and mujoco are
installed (the ``rl`` extra; the ``test`` extra pins them, so CI runs it)."""
import json

import numpy as np
import pytest

from zotune.cli import main
from zotune.ranking import rl


class Box:
    def __init__(self, n):
        self.shape, self.low, self.high = (n,), -np.ones(n), np.ones(n)


class Reach:
    """A point in 2-D pushed by the action towards a target that depends on the reset seed;
    reward -|position - target|: a linear policy on (position, target) can solve it."""

    def __init__(self):
        self.observation_space, self.action_space = Box(4), Box(2)

    def reset(self, seed=None):
        r = np.random.default_rng(seed)
        self.pos, self.target, self.t = r.normal(size=2), r.normal(size=2), 0
        return np.concatenate([self.pos, self.target]), {}

    def step(self, action):
        self.pos = self.pos + 0.1 * action
        self.t += 1
        obs = np.concatenate([self.pos, self.target])
        return obs, -float(np.abs(self.pos - self.target).sum()), False, self.t >= 30, {}


def test_observation_normaliser_merges_batches_exactly():
    data = np.random.default_rng(0).normal(3.0, 2.0, size=(500, 3))
    norm = rl.ObsNorm(3)
    for part in np.array_split(data, 7):
        norm.update(part)
    np.testing.assert_allclose(norm.mean, data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(norm.std, data.std(axis=0, ddof=1), rtol=1e-12)
    assert norm.count == 500


@pytest.mark.parametrize("method", rl.METHODS)
def test_methods_learn_a_reaching_task_and_write_the_run(method, tmp_path, monkeypatch):
    pytest.importorskip("cma") if method == "cma" else None
    monkeypatch.setattr(rl, "make_env", lambda name: Reach())
    seeds = []
    original = rl.Runner.train_episode

    def spy(self, weights):
        seeds.append((self.rounds, self.round_seed()))
        return original(self, weights)

    monkeypatch.setattr(rl.Runner, "train_episode", spy)
    cfg = rl.RLConfig(env="Reach", method=method, m=8, k=4, episodes=480, lr=0.3, mu=0.1, sigma0=0.5,
                      eval_every=100, eval_episodes=2, output_dir=str(tmp_path / method))
    summary = rl.train(cfg)
    rounds = {}
    for r, s in seeds:  # every rollout of a round starts from the round's seed
        rounds.setdefault(r, set()).add(s)
    assert all(len(s) == 1 for s in rounds.values()) and len({next(iter(s)) for s in rounds.values()}) > 1
    curve = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert curve[0]["episodes"] == 0 and summary["episodes"] >= 480
    assert summary["final_return"] > 0.8 * curve[0]["return"]  # returns are negative: closer to 0
    assert {p.name for p in (tmp_path / method).iterdir()} == {"metrics.jsonl", "summary.json", "policy.npz",
                                                              "curves.png"}


def test_bad_settings_are_one_line_errors(capsys):
    assert main(["rank", "rl", "--m", "4", "--k", "5", "--quiet"]) == 2
    assert "need m >= 2 and 1 <= k <= m" in capsys.readouterr().err


def test_swimmer_cli_runs(tmp_path, capsys):
    pytest.importorskip("gymnasium")
    pytest.importorskip("mujoco")
    out = tmp_path / "swimmer"
    assert main(["rank", "rl", "--env", "Swimmer-v5", "--m", "4", "--k", "2", "--episodes", "8",
                 "--horizon", "50", "--eval-every", "4", "--eval-episodes", "1", "--output-dir", str(out),
                 "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["episodes"] == 8 and summary["rounds"] == 2
    assert (out / "curves.png").exists()
