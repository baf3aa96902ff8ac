"""``zotune rank``: optimisation from rankings on the command line.

    zotune rank serve --task prompts.jsonl --model smollm2-135m --output-dir runs/rank
"""
from __future__ import annotations


def add_parser(sub) -> None:
    """Add the ``rank`` command group to the top-level subparsers ``sub``."""
    from .server import add_serve_arguments, cmd_serve

    rank = sub.add_parser("rank", help="optimise from rankings (a person in the browser, ...)",
                          description="ZO-RankSGD: optimisation from rankings of candidates.")
    group = rank.add_subparsers(dest="rank_command", required=True, metavar="{serve}")
    p = group.add_parser("serve", help="rank a model's completions in the browser",
                         description="Serve the ranking page: each round shows the model's "
                         "completions of the round's prompts at m candidate points, in a random "
                         "order; the person ranks the best k and submits. The session is saved "
                         "in --output-dir after every round and resumed from there.")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
