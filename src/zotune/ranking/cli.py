"""The ``zotune rank`` command group: optimisation from rankings.

``zotune rank rl`` trains a linear policy on a Gymnasium MuJoCo task from rankings of episodes
(``ranking/rl.py``); ``zotune rank serve`` serves the ranking page, where a person ranks a
model's completions in the browser (``ranking/server.py``); further subcommands register here
with :func:`add_parser`'s ``subparsers``.
"""
from __future__ import annotations

import argparse
import json
import sys

RANK_COMMANDS: list = []
"""Extra ``(register(subparsers))`` hooks for ``zotune rank`` subcommands defined elsewhere."""


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``zotune rank`` and its subcommands on the top-level ``subparsers``."""
    p = sub.add_parser("rank", help="optimise from rankings (ZO-RankSGD): RL from ranked episodes, "
                       "a person ranking in the browser",
                       description="Optimisation from a ranking oracle (ZO-RankSGD): a program, a "
                       "reward model or a person ranks candidates instead of scoring them.")
    rank = p.add_subparsers(dest="rank_command", required=True, metavar="{rl,serve}")
    add_rl(rank)
    add_serve(rank)
    for register in RANK_COMMANDS:
        register(rank)
    return p


def add_serve(rank) -> None:
    from .server import add_serve_arguments, cmd_serve

    p = rank.add_parser("serve", help="rank a model's completions in the browser",
                        description="Serve the ranking page: each round shows the model's "
                        "completions of the round's prompts at m candidate points, in a random "
                        "order; the person ranks the best k and submits. The session is saved "
                        "in --output-dir after every round and resumed from there "
                        "(docs/ranking.md).")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)


def add_rl(rank) -> None:
    from .rl import METHODS, RLConfig

    d = RLConfig()
    p = rank.add_parser("rl", help="train a linear policy from episodes ranked by return",
                        description="Train an ARS-style linear policy (observation normalisation) on "
                        "a Gymnasium MuJoCo task from rankings of episodes by return (ZO-RankSGD), or "
                        "with the anchors: value-based ZO on returns (FZOO) or CMA-ES; every round "
                        "rolls its m candidates out from the same environment seed. Writes "
                        "metrics.jsonl, summary.json, policy.npz and curves.png to --output-dir.")
    p.add_argument("--env", default=d.env, help=f"Gymnasium environment id (default: {d.env})")
    p.add_argument("--method", default=d.method, choices=METHODS,
                   help=f"ranksgd (rankings), value (FZOO on returns) or cma (CMA-ES) (default: {d.method})")
    p.add_argument("--m", type=int, default=d.m, help=f"episodes (candidates) per round (default: {d.m})")
    p.add_argument("--k", type=int, default=d.k, help=f"episodes ranked per round, best first (default: {d.k})")
    p.add_argument("--episodes", type=int, default=d.episodes,
                   help=f"training episodes in all (default: {d.episodes})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"step size (default: {d.lr})")
    p.add_argument("--mu", type=float, default=d.mu, help=f"perturbation radius (default: {d.mu})")
    p.add_argument("--mode", default=d.mode, choices=("plain", "line-search"),
                   help=f"ZO-RankSGD steps: plain or with the ranking line search (default: {d.mode})")
    p.add_argument("--sigma0", type=float, default=d.sigma0, help=f"CMA-ES initial step size (default: {d.sigma0})")
    p.add_argument("--horizon", type=int, default=None,
                   help="steps per episode (default: the environment's limit)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"run seed (default: {d.seed})")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"evaluate the current policy every this many training episodes (default: {d.eval_every})")
    p.add_argument("--eval-episodes", type=int, default=d.eval_episodes,
                   help=f"episodes per evaluation, fixed seeds (default: {d.eval_episodes})")
    p.add_argument("--output-dir", help="run directory (default: none, print only)")
    p.add_argument("--quiet", action="store_true", help="no line per evaluation")
    p.set_defaults(func=cmd_rl)


def cmd_rl(args) -> int:
    from .rl import RLConfig, train

    cfg = RLConfig(env=args.env, method=args.method, m=args.m, k=args.k, episodes=args.episodes, lr=args.lr,
                   mu=args.mu, mode=args.mode, sigma0=args.sigma0, horizon=args.horizon, seed=args.seed,
                   eval_every=args.eval_every, eval_episodes=args.eval_episodes, output_dir=args.output_dir)

    def log(row):
        print(f"episodes {row['episodes']:>6}  return {row['return']:9.2f}  ({row['seconds']:.0f} s)",
              file=sys.stderr, flush=True)

    summary = train(cfg, log=None if args.quiet else log)
    print(json.dumps(summary))
    return 0
