"""Align a language model from rankings of its own samples (ZO-RankSGD on LoRA parameters).

Each round: RankSGD asks for m candidate points x + mu xi_i; every candidate completes the
round's prompts with the round's decoding seed; a reward (a callable on text, or a reward model,
:mod:`zotune.ranking.reward`) ranks them and the optimizer is told the best k. Only the order of
the rewards is used (research/ranksgd_deepzero.md A.1, A.6: the RL-from-rankings setting with
completions as episodes). Progress is measured on fixed evaluation prompts and seeds at the
current point, every ``eval_every`` rounds.

Cost per round: m generate calls of ``prompts_per_round`` prompts; per evaluation,
``len(eval_prompts) * eval_samples`` completions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from zotune.rng import mix

from .reward import RewardOracle, score_texts
from .text import Completer


@dataclass
class AlignResult:
    """What :func:`align` measured: one row per evaluation (``round``, ``reward``: the mean eval
    reward at the current point, ``candidates``: the mean reward of the last round's candidates,
    ``seconds`` since the start) and the last evaluation's texts."""

    rows: list[dict] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)

    @property
    def rewards(self) -> list[float]:
        return [row["reward"] for row in self.rows]


def evaluate(complete: Completer, reward, prompts: Sequence[str], seeds: Sequence[int]):
    """Mean reward over ``prompts`` x ``seeds`` completions at the current point, and the texts
    of the first seed."""
    total, count, first = 0.0, 0, []
    for n, seed in enumerate(seeds):
        texts = complete(list(prompts), seed)
        values = score_texts(reward, texts)
        total, count = total + sum(values), count + len(values)
        if n == 0:
            first = texts
    return total / count, first


def align(opt, complete: Completer, reward, prompts: Sequence[str], *, rounds: int, k: int,
          prompts_per_round: int = 4, eval_prompts: Sequence[str] | None = None,
          eval_samples: int = 2, eval_every: int = 5, seed: int = 0,
          log: Callable[[dict], None] | None = None) -> AlignResult:
    """Run ``rounds`` rounds of RankSGD (``opt``: a :class:`zotune.RankSGD` over the model's
    trainable parameters) with the reward oracle; see the module docstring."""
    prompts = list(prompts)
    eval_prompts = list(eval_prompts or prompts)
    eval_seeds = [mix(seed, 0xE7A1, j) % (1 << 31) for j in range(eval_samples)]

    def round_prompts(r: int) -> list[str]:
        start = (r * prompts_per_round) % len(prompts)
        return [prompts[(start + j) % len(prompts)] for j in range(min(prompts_per_round, len(prompts)))]

    oracle = RewardOracle(reward, complete, round_prompts, k=k,
                          seed=lambda r: mix(seed, r, 0xDEC0DE) % (1 << 31))
    result, start = AlignResult(), time.perf_counter()

    def record(r: int, candidates: float | None) -> None:
        value, texts = evaluate(complete, reward, eval_prompts, eval_seeds)
        row = {"round": r, "reward": value, "candidates": candidates,
               "seconds": round(time.perf_counter() - start, 2)}
        result.rows.append(row)
        result.samples = texts
        if log:
            log(row)

    record(0, None)
    done = 0
    while done < rounds:
        query = opt.ask()
        wanted = int(getattr(query, "k", None) or k)
        opt.tell(ranking=oracle(query, wanted))
        done += 1
        if done % eval_every == 0 or done == rounds:
            if hasattr(opt, "flush"):
                opt.flush()
            rewards = oracle.last_rewards
            record(done, sum(rewards) / len(rewards))
    return result
