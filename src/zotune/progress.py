"""What a training run tells the person who started it, on stderr (stdout keeps the final JSON):
a line per phase as it starts, progress bars for training and for every evaluation, and a
training ETA that counts the evaluations still to come.

    zotune: loading data: sst2 from ../shared/data
    zotune: loading the model: smollm2-135m
    zotune: zero-shot evaluation on 872 dev + 1000 test examples
    zotune: training: steps 1-1000 (dev evaluation every 100 steps)
    sst2 mezo:  12%|##        | 120/1000 [03:10, eta 41m05s incl. 9 evals + test, loss=0.5120, dev=85.2]

The ETA is ``steps left x seconds per step + (dev evaluations left x dev examples + test
examples) x seconds per evaluated example + evaluations left x seconds per checkpoint``
(:func:`eta_seconds`), each rate measured in this run: steps on the steps themselves (evaluations
and checkpoints not counted), evaluations from the zero-shot one on. ``--quiet`` turns the lines
and bars off; warnings always print.
"""
from __future__ import annotations

import contextlib
import sys
import time


def evals_left(step: int, steps: int, eval_every: int) -> int:
    """Dev evaluations a run at ``step`` (steps done) still runs: one at each multiple of
    ``eval_every`` up to ``steps``, and one at ``steps`` itself when that is not a multiple."""
    if step >= steps:
        return 0
    n = steps // eval_every - step // eval_every
    return n + (1 if steps % eval_every else 0)


def eta_seconds(*, step: int, steps: int, eval_every: int, step_s: float | None,
                eval_s_per_example: float | None, dev_examples: int, test_examples: int,
                checkpoint_s: float = 0.0, eval_due: bool = False) -> float | None:
    """Seconds until the run ends: the steps left, the dev evaluations left (plus one that is due
    now, ``eval_due``) each with its checkpoint, and the final test evaluation. None while a rate
    it needs is unknown (no step timed yet; evaluations count 0 until one is timed)."""
    if step_s is None:
        return None if step < steps else 0.0
    evals = evals_left(step, steps, eval_every) + (1 if eval_due else 0)
    per_example = eval_s_per_example or 0.0
    return ((steps - step) * step_s + (evals * dev_examples + test_examples) * per_example
            + evals * checkpoint_s)


def format_duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class _Rate:
    def __init__(self) -> None:
        self.seconds, self.count = 0.0, 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.seconds += seconds
        self.count += count

    @property
    def value(self) -> float | None:
        return self.seconds / self.count if self.count else None


class Progress:
    """The phase lines, bars and timings of one run; ``enabled=False`` (``--quiet``) prints only
    warnings."""

    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream
        self.step_time, self.eval_time, self.checkpoint_time = _Rate(), _Rate(), _Rate()

    def _file(self):
        return self.stream if self.stream is not None else sys.stderr

    def _write(self, line: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(line, file=self._file())  # above any bar, which is then redrawn
        self._file().flush()

    def phase(self, message: str) -> None:
        """``zotune: <message>`` as a phase starts."""
        if self.enabled:
            self._write(f"zotune: {message}")

    def warn(self, message: str) -> None:
        """``zotune: warning: <message>``, also with ``--quiet``."""
        self._write(f"zotune: warning: {message}")

    def bar(self, **kwargs):
        from tqdm.auto import tqdm

        return tqdm(disable=not self.enabled, file=self._file(), dynamic_ncols=True, **kwargs)

    def eval_bar(self, total: int, desc: str | None):
        return self.bar(total=total, desc=desc or "evaluating", leave=False, unit="ex")

    def train_bar(self, total: int, initial: int, desc: str):
        # tqdm's own remaining time leaves the evaluations out (and is thrown off by them): the
        # postfix carries ours instead
        return self.bar(total=total, initial=initial, desc=desc,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                   "[{elapsed}{postfix}]")

    def eta_text(self, *, step: int, steps: int, eval_every: int, dev_examples: int,
                 test_examples: int, eval_due: bool = False) -> str:
        """``eta 41m05s incl. 9 evals + test`` (or ``... + evals`` while they are not timed)."""
        seconds = eta_seconds(step=step, steps=steps, eval_every=eval_every,
                              step_s=self.step_time.value, eval_s_per_example=self.eval_time.value,
                              dev_examples=dev_examples, test_examples=test_examples,
                              checkpoint_s=self.checkpoint_time.value or 0.0, eval_due=eval_due)
        if seconds is None:
            return "eta ?"
        evals = evals_left(step, steps, eval_every) + (1 if eval_due else 0)
        if self.eval_time.value is None:
            return f"eta {format_duration(seconds)} + evals"
        return f"eta {format_duration(seconds)} incl. {evals} eval{'s' * (evals != 1)} + test"


_current: Progress | None = None


def current() -> Progress:
    """The running run's Progress (outside :func:`active`, one that prints only warnings)."""
    return _current if _current is not None else Progress(enabled=False)


@contextlib.contextmanager
def active(report: Progress):
    """Make ``report`` :func:`current` for the block."""
    global _current
    outer, _current = _current, report
    try:
        yield report
    finally:
        _current = outer


def phase(message: str) -> None:
    current().phase(message)


def warn(message: str) -> None:
    current().warn(message)


@contextlib.contextmanager
def timed(rate: _Rate, count: int = 1):
    """Add the block's wall time to ``rate`` (when it finishes without an exception)."""
    start = time.perf_counter()
    yield
    rate.add(time.perf_counter() - start, count)
