"""Post-update step programs: DiZO's projection search, run after the update of every
``interval``-th step.

The search itself (``updates/projection.py``: ``ZOSearch`` and ``FOSearch``) is an ask/tell
object: each iteration writes the rescaled projected tensors through the engine and asks for the
loss (ZO) or for the gradient of the projected tensors (FO) on its own search batch
(``Query.batch = ("search", j)``). This program only starts it at the right steps, with the
parameters flushed, and keeps its state in checkpoints, also in the middle of a search.
"""
from __future__ import annotations

from .. import rng

SEARCH_TAG = 0x44495A4F  # keys a step's search apart from its probes


class ProjectionStep:
    """Runs ``projection``'s search after the update of every step it is ``due`` at.

    Args:
        projection: a bound :class:`~zotune.updates.projection.DiZO`.
    """

    name = "projection"

    def __init__(self, projection) -> None:
        self.projection = projection
        self.search = None
        self.result = None

    def due(self, step: int) -> bool:
        return self.projection.due(step)

    def begin(self, core, step: int) -> None:
        core.engine.flush()  # the search reads and writes the unperturbed parameters
        self.search = self.projection.start_search(core.engine, rng.mix(core.seed, step, SEARCH_TAG))

    def ask(self, core):
        if self.search is None:
            return None
        query = self.search.ask()
        if query is None:
            self.search = None
        return query

    def tell(self, core, feedback) -> None:
        self.search.tell(feedback)

    def state_dict(self) -> dict:
        return {"projection": self.projection.state_dict(),
                "search": None if self.search is None else self.search.state_dict()}

    def load_state_dict(self, state: dict, engine=None) -> None:
        self.projection.load_state_dict(state["projection"])
        self.search = None
        if state.get("search") is not None:
            self.search = self.projection.resume_search(self.projection.engine, state["search"])
