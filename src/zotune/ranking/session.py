"""A ranking session: the rounds a person (or any ranker) goes through, and their saved state.

One round = one ``opt.ask()``: the m candidate points are rendered (for a text task, the model's
completions of the round's prompts at each point, with one decoding seed per round), shown in a
random **display order**, and the ranker returns the display positions of the best k, best first.
Positions are always mapped back to candidate ids through the round's permutation before
``opt.tell(ranking=ids)`` (the authors' human loop skipped this mapping in its gradient rounds:
research/ranksgd_deepzero.md A.5; here it is the only path from a submission to the optimizer).

States::

    open(directory) ──► round r shown ──submit(r, positions)──► validate ──► tell ──► round r+1
                        ▲                     │ bad: error, nothing changes           │ saved
                        └── restart resumes ──┴───────────────────────────────────────┘

Persistence: after every accepted round the whole session (settings, round, history, the round
now shown with its texts and permutation, the optimizer's ``state_dict`` with its pending query,
the trainable parameters) is written to ``state.pt`` through a temporary file, ``fsync`` and an
atomic rename, so a kill at any instant leaves either the previous round or the new one, never a
mix. A submission is acknowledged only after its save, so a restart loses no acknowledged round.
A readable copy of the history goes to ``history.json`` (written the same way; ``state.pt`` is the
one the session resumes from).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from zotune.errors import ZotuneError

from .oracles import Display, to_candidates

STATE = "state.pt"
HISTORY = "history.json"
FORMAT = "zotune-rank-session/1"


class SubmissionError(ZotuneError):
    """A submission the session refuses; nothing changed. ``status`` is its HTTP status."""

    status = 400


class StaleRound(SubmissionError):
    """A submission for a round that is not the one shown now."""

    status = 409


def label(position: int, m: int) -> str:
    """The name a ranker sees for display position ``position``: A, B, ... (1, 2, ... past 26)."""
    return chr(ord("A") + position) if m <= 26 else str(position + 1)


def display_order(seed: int, round_number: int, m: int) -> list[int]:
    """The round's permutation: ``order[position] = candidate id``, a pure function of
    ``(seed, round)`` (:class:`zotune.ranking.Display`)."""
    return list(Display(m, seed=seed, round=round_number).order)


def atomic_save(obj, path: Path, *, text: bool = False) -> None:
    """Write ``obj`` (``torch.save``, or JSON when ``text``) to ``path`` atomically: a temporary
    file in the same directory, flushed and fsynced, renamed over ``path``, the directory fsynced."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w" if text else "wb") as fh:
            if text:
                json.dump(obj, fh, indent=1)
            else:
                torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RankingSession:
    """The round state machine of one ranking run (see the module docstring).

    ``opt`` is a :class:`zotune.RankSGD` (any object with ``ask()``, ``tell(ranking=...)``,
    ``state_dict``/``load_state_dict``); ``params`` the named trainable tensors it moves (saved with
    the session); ``render(query, i, round_number)`` returns what candidate ``i`` of the round shows
    (a list of texts: one per prompt) and ``render_current(round_number)`` the same at the current
    point; ``prompts(round_number)`` the round's prompts. ``settings`` (plain JSON values) are saved
    and must match on resume. Cost per round: m + 1 renders and one save of the trainable
    parameters and optimizer state.
    """

    def __init__(self, opt, params: dict[str, torch.Tensor], *, k: int, settings: dict,
                 render: Callable, render_current: Callable, prompts: Callable,
                 directory: str | Path | None = None, seed: int = 0):
        self.opt, self.params, self.k, self.settings = opt, dict(params), int(k), dict(settings)
        self.render, self.render_current, self.prompts = render, render_current, prompts
        self.directory = Path(directory) if directory is not None else None
        self.seed = int(seed)
        self.round = 0
        self.history: list[dict] = []
        self.shown: dict | None = None  # the round on screen: prompts, texts by id, order, ...

    # ------------------------------------------------------------------ rounds

    def start(self) -> "RankingSession":
        """Resume from ``directory`` when it holds a session, else show round 0 (and save it)."""
        if self.directory is not None and (self.directory / STATE).is_file():
            self.load()
        elif self.shown is None:
            self._show_next()
            self.save()
        return self

    def _show_next(self) -> None:
        query = self.opt.ask()
        m = len(query)
        texts = [self.render(query, i, self.round) for i in range(m)]
        self.shown = {"round": self.round, "prompts": list(self.prompts(self.round)),
                      "texts": texts, "order": display_order(self.seed, self.round, m),
                      "current": self.render_current(self.round),
                      "k": int(getattr(query, "k", None) or self.k),
                      "purpose": str(getattr(query, "purpose", "gradient")),
                      "opt_round": getattr(query, "round", None)}

    def view(self) -> dict:
        """What the page shows: the round, the candidates in display order (position, label,
        texts; never the candidate ids), the prompts, a sample at the current point, the history."""
        shown = self.shown
        m = len(shown["order"])
        candidates = [{"position": p, "label": label(p, m), "texts": shown["texts"][cid]}
                      for p, cid in enumerate(shown["order"])]
        return {"round": shown["round"], "m": m, "k": shown["k"], "purpose": shown["purpose"],
                "prompts": shown["prompts"],
                "candidates": candidates, "current": shown["current"],
                "history": self.history[::-1]}

    def check(self, payload) -> list[int]:
        """The candidate ids of a submission ``{"round": r, "order": [position, ...]}`` (display
        positions, best first), or :class:`SubmissionError` saying what is wrong."""
        shown = self.shown
        m, k = len(shown["order"]), shown["k"]
        if not isinstance(payload, dict) or "round" not in payload or "order" not in payload:
            raise SubmissionError('a submission is a JSON object {"round": <int>, "order": '
                                  '[<display position>, ...]}')
        r, order = payload["round"], payload["order"]
        if not _is_int(r):
            raise SubmissionError(f"round must be an integer, got {r!r}")
        if r != shown["round"]:
            raise StaleRound(f"round {r} is not the current round {shown['round']}: the page is out "
                             "of date; it now shows the current round")
        if not isinstance(order, list) or not all(_is_int(p) for p in order):
            raise SubmissionError(f"order must be a list of display positions (integers), got "
                                  f"{order!r}")
        valid = f"0..{m - 1} ({label(0, m)}..{label(m - 1, m)})"
        unknown = [p for p in order if not 0 <= p < m]
        if unknown:
            raise SubmissionError(f"unknown candidate position {unknown[0]}; valid: {valid}")
        seen = set()
        for p in order:
            if p in seen:
                raise SubmissionError(f"candidate {label(p, m)} is ranked twice; rank {k} "
                                      "different candidates")
            seen.add(p)
        if len(order) != k:
            what = "fewer" if len(order) < k else "more"
            raise SubmissionError(f"ranked {len(order)} candidate(s), {what} than the {k} this round "
                                  f"asks for: pick the best {k}, best first")
        return list(to_candidates(shown["order"], order))

    def submit(self, payload) -> dict:
        """Apply a valid submission: tell the optimizer, show the next round, save; return the new
        view. A refused submission raises :class:`SubmissionError` and changes nothing; a failure
        after the optimizer was told puts the whole session back to its last saved state."""
        ids = self.check(payload)
        shown = self.shown
        before = {n: p.detach().clone() for n, p in self.params.items()}
        moves = getattr(self.opt, "moves", None)
        try:
            if shown.get("opt_round") is None:
                self.opt.tell(ranking=ids)
            else:  # the optimizer refuses an answer for any round but its pending one
                self.opt.tell(ranking=ids, round=shown["opt_round"])
            if hasattr(self.opt, "flush"):
                self.opt.flush()
            moved = math.sqrt(sum(float((p.detach() - before[n]).double().pow(2).sum())
                                  for n, p in self.params.items()))
            m = len(shown["order"])
            self.history.append({
                "round": shown["round"], "purpose": shown["purpose"], "ranking": ids,
                "labels": [label(shown["order"].index(i), m) for i in ids], "moved": moved,
                "accepted": moved > 0 if moves is None else self.opt.moves > moves,
                "time": _now()})
            self.round += 1
            self._show_next()
            self.save()
        except BaseException:
            if self.directory is not None and (self.directory / STATE).is_file():
                self.load()
            raise
        return self.view()

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict:
        return {"format": FORMAT, "settings": self.settings, "round": self.round,
                "history": self.history, "shown": self.shown, "seed": self.seed,
                "optimizer": self.opt.state_dict(),
                "params": {n: p.detach().clone() for n, p in self.params.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != FORMAT:
            raise ZotuneError(f"not a ranking session state (format {state.get('format')!r})")
        changed = {key: (state["settings"].get(key), value) for key, value in self.settings.items()
                   if state["settings"].get(key) != value}
        if changed:
            what = "; ".join(f"{key}: saved {old!r}, now {new!r}" for key, (old, new) in changed.items())
            raise ZotuneError(f"{self.directory} holds a ranking session with other settings ({what}); "
                              "resume it with the saved settings or use a new --output-dir")
        if set(state["params"]) != set(self.params):
            raise ZotuneError(f"{self.directory}: the saved parameters are not this model's trainable "
                              "parameters")
        with torch.no_grad():
            for name, value in state["params"].items():
                self.params[name].copy_(value)
        self.opt.load_state_dict(state["optimizer"])
        self.round, self.history = state["round"], list(state["history"])
        self.shown, self.seed = state["shown"], state["seed"]

    def save(self) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_save(self.state_dict(), self.directory / STATE)
        atomic_save({"settings": self.settings, "round": self.round, "history": self.history},
                    self.directory / HISTORY, text=True)

    def load(self) -> None:
        path = self.directory / STATE
        try:
            state = torch.load(path, weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which one
            raise ZotuneError(f"cannot read ranking session {path}: {exc}") from None
        self.load_state_dict(state)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
