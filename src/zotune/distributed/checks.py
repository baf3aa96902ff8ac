"""Checks that every rank starts the same run: a clear error at start instead of a silent
divergence (different seeds give different directions on each rank, and the ranks would apply
different updates) or a hang (different plans, different numbers of collectives).

Each check is one all-gather of a few int64 values per rank: a 63-bit hash of the thing compared,
and for integers (the seed) the value itself, so the message can show it.
"""
from __future__ import annotations

import hashlib
import json

import torch

from .topology import RankFailure, Topology

_MASK63 = (1 << 63) - 1


def fingerprint(value) -> int:
    """A stable 63-bit hash of a JSON-able value (dict keys sorted)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & _MASK63


def agree(topology: Topology, what: str, value, *, show: bool = False) -> None:
    """Raise :class:`RankFailure` on every rank unless all ranks hold the same ``value``.

    Args:
        what: what is compared, for the message (``"run seed"``, ``"parameter layout"``).
        value: JSON-able; compared by :func:`fingerprint`.
        show: put each rank's value (an integer) in the message.
    """
    if topology.comm is None or topology.world == 1:
        return
    shown = int(value) & _MASK63 if show else 0
    mine = torch.tensor([fingerprint(value), shown], dtype=torch.int64)
    everyone = topology.comm.all_gather(mine, None, f"start check ({what})")
    hashes = [int(t[0]) for t in everyone]
    if len(set(hashes)) == 1:
        return
    odd = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if show:
        values = ", ".join(f"rank {r} has {int(t[1])}" for r, t in enumerate(everyone))
        detail = f"{values}"
    else:
        detail = f"rank(s) {', '.join(map(str, odd))} differ from rank 0"
    raise RankFailure(f"ranks disagree on the {what} ({detail}); start every rank with the same "
                      "settings (the same command line and config file)")


def layout_summary(layout) -> dict:
    """What must match across ranks about the parameters: every tensor's name, shape, dtype and
    role, and the chunk grid and direction (the numbers each rank regenerates)."""
    return layout.state_dict()
