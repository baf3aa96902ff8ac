"""The offload engine's throughput model: per-block transfer and compute times, and what bounds a step.

Per step, with W the bytes of the offloaded blocks, R and Wr the tier's read and write speeds and
C the compute (both forwards and the parameter sweeps): reads and writes run on their own threads
beside the compute, so ``step ~ max(C, W / R, W / Wr)`` plus one block's load and the last
block's write-back. Compute grows with the tokens per step T and transfers do not: transfers hide
once ``T >= T_now * (W / min(R, Wr)) / C``. On a GPU fed from host memory this is research note
9.3's ``T >= b F / (4 BW)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Timing:
    """Seconds spent per block on loading, computing and storing, summed over steps."""

    load: list[float] = field(default_factory=list)
    compute: list[float] = field(default_factory=list)
    store: list[float] = field(default_factory=list)
    wait: float = 0.0
    steps: int = 0
    tokens: int = 0
    bytes_read: int = 0

    def reset(self, blocks: int) -> None:
        self.load, self.compute, self.store = [0.0] * blocks, [0.0] * blocks, [0.0] * blocks
        self.wait, self.steps, self.tokens, self.bytes_read = 0.0, 0, 0, 0


def throughput(timing: Timing, *, link_bytes_per_s: float | None = None) -> dict:
    """Which term bounds a step, from measured per-block times (research note 9.3).

    Per step: transfer = sum of block loads and stores (they overlap the compute of other blocks
    when ``overlap`` is on), compute = sum of block compute. The step is transfer-bound when
    transfer > compute; compute grows with the tokens per step T and transfer does not, so the
    tokens that hide the transfers are ``T * transfer / compute``."""
    steps = max(timing.steps, 1)
    load, store, compute = sum(timing.load) / steps, sum(timing.store) / steps, sum(timing.compute) / steps
    transfer = max(load, store)  # one reader and one writer, side by side
    tokens = timing.tokens / steps
    out = {"load_s": load, "store_s": store, "compute_s": compute, "wait_s": timing.wait / steps,
           "bound": "transfer" if transfer > compute else "compute", "tokens_per_step": tokens,
           "tokens_to_hide_transfer": tokens * transfer / compute if compute > 0 else float("inf"),
           "bytes_read_per_step": timing.bytes_read / steps,
           "per_block_s": {"load": [t / steps for t in timing.load],
                           "compute": [t / steps for t in timing.compute],
                           "store": [t / steps for t in timing.store]}}
    if link_bytes_per_s:
        out["link_bytes_per_s"] = link_bytes_per_s
    return out
