r"""Reinforcement learning from rankings: linear policies on Gymnasium MuJoCo tasks (``zotune rank rl``).

The policy is ARS's linear map with observation normalisation (Mania et al., 2018, "V2"):
:math:`a = \mathrm{clip}(W (o - \hat\mu) / \hat\sigma)`, with the running mean and std of every
state seen so far, frozen during a round so the m rollouts of a round are compared under one
normaliser. Each round rolls out the m candidate policies from the **same** environment seed
(common random numbers: the ranking then compares policies, not initial states) and ranks the
episodes by return (research ranksgd_deepzero.md, A.6; f = -return).

Methods, at equal episodes (``--episodes`` counts training rollouts only):

``ranksgd``
    ZO-RankSGD from the (m, k) ranking of the episodes (``--mode line-search`` adds a search round).
``value``
    the value-based anchor: zotune's FZOO on -return (one centre and m - 1 one-sided probes,
    normalised by the std of the returns, as ARS normalises by theirs), m episodes per round.
``cma``
    CMA-ES (the ``cma`` package) with population m, an external anchor.

The current policy (for CMA-ES its mean) is evaluated every ``--eval-every`` training episodes on
``--eval-episodes`` fixed seeds; ``metrics.jsonl`` has one line per evaluation, ``summary.json``
the settings, the final and best evaluation return and the time, ``curves.png`` return against
episodes.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import rng
from ..errors import ZotuneError
from .optim import RankSGD

METHODS = ("ranksgd", "value", "cma")
EVAL_SEED = 10**6


@dataclass
class RLConfig:
    env: str = "Swimmer-v5"
    method: str = "ranksgd"
    m: int = 16
    k: int = 8
    episodes: int = 2000
    lr: float = 0.05
    mu: float = 0.05
    mode: str = "plain"
    sigma0: float = 0.1            # CMA-ES's initial step size
    horizon: int | None = None     # None: the environment's own limit
    seed: int = 0
    eval_every: int = 100
    eval_episodes: int = 3
    output_dir: str | None = None


class ObsNorm:
    """Running mean and variance of observations (Chan et al.'s parallel merge of batches)."""

    def __init__(self, dim: int) -> None:
        self.count, self.mean, self.m2 = 0, np.zeros(dim), np.zeros(dim)

    @property
    def std(self) -> np.ndarray:
        if self.count < 2:
            return np.ones_like(self.mean)
        return np.sqrt(np.maximum(self.m2 / (self.count - 1), 1e-8))

    def update(self, states: np.ndarray) -> None:
        if len(states) == 0:
            return
        n, mean = len(states), states.mean(axis=0)
        m2 = ((states - mean) ** 2).sum(axis=0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta ** 2 * self.count * n / total
        self.count = total

    def frozen(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mean.copy(), self.std.copy()


def make_env(name: str):
    try:
        import gymnasium as gym
    except ImportError:
        raise ZotuneError("zotune rank rl needs gymnasium and mujoco: pip install 'zotune[rl]'") from None
    try:
        return gym.make(name)
    except Exception as exc:  # unknown id, missing mujoco, ...
        raise ZotuneError(f"cannot make environment {name!r}: {' '.join(str(exc).split())}") from None


def rollout(env, weights: np.ndarray, norm: tuple[np.ndarray, np.ndarray], seed: int,
            horizon: int | None = None) -> tuple[float, np.ndarray]:
    """One episode of the linear policy: (return, the states visited)."""
    mean, std = norm
    low, high = env.action_space.low, env.action_space.high
    obs, _ = env.reset(seed=int(seed))
    total, states, steps = 0.0, [], 0
    while True:
        states.append(obs)
        obs, reward, terminated, truncated, _ = env.step(np.clip(weights @ ((obs - mean) / std), low, high))
        total += float(reward)
        steps += 1
        if terminated or truncated or (horizon is not None and steps >= horizon):
            return total, np.asarray(states)


class Runner:
    """Rollouts with episode counting and the shared normaliser."""

    def __init__(self, cfg: RLConfig) -> None:
        self.cfg, self.env = cfg, make_env(cfg.env)
        self.obs_dim = self.env.observation_space.shape[0]
        self.act_dim = self.env.action_space.shape[0]
        self.norm = ObsNorm(self.obs_dim)
        self.episodes, self.rounds = 0, 0
        self.round_states: list[np.ndarray] = []
        self.frozen = self.norm.frozen()

    def round_seed(self) -> int:
        return rng.mix(self.cfg.seed, 0x524C, self.rounds) % 2**31

    def train_episode(self, weights: np.ndarray) -> float:
        ret, states = rollout(self.env, weights, self.frozen, self.round_seed(), self.cfg.horizon)
        self.round_states.append(states)
        self.episodes += 1
        return ret

    def end_round(self) -> None:
        self.norm.update(np.concatenate(self.round_states) if self.round_states else np.zeros((0, self.obs_dim)))
        self.round_states, self.rounds = [], self.rounds + 1
        self.frozen = self.norm.frozen()

    def evaluate(self, weights: np.ndarray) -> float:
        returns = [rollout(self.env, weights, self.frozen, EVAL_SEED + j, self.cfg.horizon)[0]
                   for j in range(self.cfg.eval_episodes)]
        return float(np.mean(returns))


def check_config(cfg: RLConfig) -> None:
    if cfg.method not in METHODS:
        raise ZotuneError(f"unknown RL method {cfg.method!r}; valid: {', '.join(METHODS)}")
    for name in ("m", "episodes", "eval_every", "eval_episodes"):
        if getattr(cfg, name) < 1:
            raise ZotuneError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.m < 2 or not 1 <= cfg.k <= cfg.m:
        raise ZotuneError(f"need m >= 2 and 1 <= k <= m, got m={cfg.m}, k={cfg.k}")


def train(cfg: RLConfig, log=None) -> dict:
    """Run one method; returns the summary (and writes the run directory when one is given)."""
    check_config(cfg)
    torch.set_num_threads(1)
    runner = Runner(cfg)
    shape = (runner.act_dim, runner.obs_dim)
    curve: list[dict] = []
    start = time.perf_counter()
    next_eval = [0]

    def maybe_eval(weights: np.ndarray, extra: dict) -> None:
        if runner.episodes >= next_eval[0]:
            row = {"episodes": runner.episodes, "rounds": runner.rounds, "return": runner.evaluate(weights),
                   "seconds": round(time.perf_counter() - start, 2), **extra}
            curve.append(row)
            next_eval[0] = runner.episodes + cfg.eval_every
            if log:
                log(row)

    if cfg.method == "ranksgd":
        w = torch.zeros(shape, dtype=torch.float64)
        opt = RankSGD([w], lr=cfg.lr, mu=cfg.mu, m=cfg.m, k=cfg.k, mode=cfg.mode, seed=cfg.seed)
        view = w.numpy()  # shares memory: the engine's moves show through
        while runner.episodes < cfg.episodes:
            maybe_eval(view.copy(), {})
            while True:  # a gradient round, then (line-search mode) a search round
                query = opt.ask()
                got = query.evaluate(lambda: runner.train_episode(view))
                order = sorted(range(len(got)), key=lambda i: (-got[i], i))[:query.k]
                opt.tell(ranking=order)
                if opt.core.idle:
                    break
            runner.end_round()
        weights = view.copy()
    elif cfg.method == "value":
        from ..optim import ZOOptimizer

        w = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
        opt = ZOOptimizer([w], lr=cfg.lr, eps=cfg.mu, method="fzoo-code", num_probes=cfg.m - 1, seed=cfg.seed)
        view = w.detach().numpy()
        while runner.episodes < cfg.episodes:
            maybe_eval(view.copy(), {})
            opt.step(lambda: -runner.train_episode(view))
            runner.end_round()
        weights = view.copy()
    else:
        try:
            import cma
        except ImportError:
            raise ZotuneError("--method cma needs the cma package: pip install 'zotune[rl]'") from None
        es = cma.CMAEvolutionStrategy(np.zeros(shape[0] * shape[1]), cfg.sigma0,
                                      {"popsize": cfg.m, "seed": cfg.seed + 1, "verbose": -9})
        while runner.episodes < cfg.episodes:
            maybe_eval(es.mean.reshape(shape), {})
            xs = es.ask()
            es.tell(xs, [-runner.train_episode(np.asarray(x).reshape(shape)) for x in xs])
            runner.end_round()
        weights = es.mean.reshape(shape)
    next_eval[0] = 0
    maybe_eval(weights, {})
    summary = {"config": asdict(cfg), "episodes": runner.episodes, "rounds": runner.rounds,
               "final_return": curve[-1]["return"], "best_return": max(r["return"] for r in curve),
               "seconds": round(time.perf_counter() - start, 1),
               "first_episodes_at_300": next((r["episodes"] for r in curve if r["return"] >= 300), None)}
    if cfg.output_dir:
        write_run(Path(cfg.output_dir), cfg, curve, summary, weights, runner.norm)
    return summary


def write_run(out: Path, cfg: RLConfig, curve: list[dict], summary: dict, weights, norm: ObsNorm) -> None:
    """metrics.jsonl, summary.json, policy.npz and curves.png (each written then renamed)."""
    out.mkdir(parents=True, exist_ok=True)

    def put(name: str, text: str) -> None:
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)

    put("metrics.jsonl", "".join(json.dumps(row) + "\n" for row in curve))
    put("summary.json", json.dumps(summary, indent=2) + "\n")
    tmp = out / "policy.tmp.npz"
    np.savez(tmp, weights=np.asarray(weights), obs_mean=norm.mean, obs_std=norm.std, obs_count=norm.count)
    tmp.replace(out / "policy.npz")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["episodes"] for r in curve], [r["return"] for r in curve], label=cfg.method)
    ax.set_xlabel("training episodes")
    ax.set_ylabel(f"return ({cfg.eval_episodes} evaluation episodes)")
    ax.set_title(f"{cfg.env}: {cfg.method}, m={cfg.m}" + (f", k={cfg.k}" if cfg.method == "ranksgd" else ""))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.tmp.png", format="png")
    plt.close(fig)
    (out / "curves.tmp.png").replace(out / "curves.png")

