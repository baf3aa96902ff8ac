r"""DeepZero's periodic gradient masks: a post-update program that redraws sparse CGE's active set
every ``interval`` steps (research note B.4: every 5 epochs, so that over training every weight
is estimated; the ratios per tensor stay those the estimator was given).

The mask of step t is drawn from ``(run seed, t // interval)``, a pure function of the step:
block b's mask is the same in a resumed run, whichever step the resume is at. After the update of
step t the program redraws when step t + 1 starts a new block; a step that is skipped (a
non-finite loss) runs no post-update program, so the next step still uses the old mask and the
redraw follows its update.
"""
from __future__ import annotations

from .. import rng

REDRAW_TAG = 0x4D41534B  # keys the masks of each block apart from everything else


def mask_seed(run_seed: int, block: int) -> int:
    """The seed of the masks of steps ``block * interval`` to ``(block + 1) * interval - 1``."""
    return rng.mix(run_seed, REDRAW_TAG, block)


class MaskRedraw:
    """Redraws ``core.estimator``'s masks (a :class:`~zotune.estimators.CGE`) every ``interval``
    steps. No queries; state: the block whose masks are drawn."""

    name = "mask-redraw"

    def __init__(self, interval: int) -> None:
        if not (isinstance(interval, int) and not isinstance(interval, bool) and interval >= 1):
            raise ValueError(f"mask_redraw_steps must be an integer >= 1, got {interval!r}")
        self.interval, self.block, self.result = interval, 0, None

    def start(self, estimator, layout, run_seed: int) -> None:
        """The masks of block 0 (called once by the builder)."""
        self.block = 0
        estimator.redraw(layout, mask_seed(run_seed, 0))

    def due(self, step: int) -> bool:
        return (step + 1) // self.interval != self.block

    def begin(self, core, step: int) -> None:
        self.block = (step + 1) // self.interval
        core.estimator.redraw(core.engine.layout, mask_seed(core.seed, self.block))

    def ask(self, core):
        return None

    def tell(self, core, feedback) -> None:  # never asked
        raise RuntimeError("mask-redraw asks no query")

    def state_dict(self) -> dict:
        return {"interval": self.interval, "block": self.block}

    def load_state_dict(self, state: dict) -> None:
        if state["interval"] != self.interval:
            raise ValueError(f"state dict redraws masks every {state['interval']} steps, this "
                             f"optimizer every {self.interval}")
        self.block = int(state["block"])
