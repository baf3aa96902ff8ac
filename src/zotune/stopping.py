"""Stopping a run on a signal: Ctrl-C (SIGINT) and SIGTERM (``kill``, a container stop, a
scheduler's preemption) end a training run the same way.

While a ZO step runs (its parameter sweeps run on a thread pool and leave the parameters
perturbed), a first signal is only recorded: the step finishes, then the loop saves a checkpoint,
writes the summary (status ``interrupted`` or ``terminated``) and raises :class:`RunStopped`
(exit code 130 or 143). Anywhere else (loading, an evaluation, a checkpoint being written) the
signal raises :class:`RunStopped` at once; evaluations and checkpoint writes leave the parameters
as they are, so the loop can still save. A second signal stops at once, also during that save:
the checkpoint being written is left as a ``.tmp`` directory, which the next start removes
(``checkpoint.clean``); ``latest`` still names the last complete checkpoint.

Handlers are installed only in the main thread (Python delivers signals there), for the life of
:func:`handling`, and the previous handlers are restored afterwards.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading

NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}
STATUS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


class RunStopped(KeyboardInterrupt):
    """A run stopped by a signal. ``exit_code`` is 128 + the signal number (130 for Ctrl-C, 143
    for SIGTERM); ``status`` is the summary's (``interrupted``, ``terminated``); ``immediate``:
    a second signal, so no checkpoint was saved on the way out. ``train`` sets ``checkpoint`` (the
    last complete checkpoint, or None) and ``saved`` (whether it was saved on the way out)."""

    def __init__(self, signum: int = signal.SIGINT, *, immediate: bool = False) -> None:
        super().__init__(NAMES.get(signum, f"signal {signum}"))
        self.signum, self.immediate = int(signum), immediate
        self.exit_code = 128 + int(signum)
        self.status = STATUS.get(signum, "interrupted")
        self.checkpoint = None
        self.saved = False


class Signals:
    """SIGINT/SIGTERM handling of one run (see the module docstring)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._deferring = 0
        self._previous: dict = {}
        # Under --parallel a rank may stop only where every rank stops: a first signal is then
        # always held, and check() raises once the ranks have agreed on it (agree()).
        self.agreed_only = False
        self.stop_agreed = False

    def agree(self, signum: int | None) -> None:
        """The ranks agreed to stop after this step (``signum``: the first signal any of them saw)."""
        if signum:
            self.requested = self.requested or signum
            self.stop_agreed = True

    def _handle(self, signum, frame) -> None:
        if (self._deferring or self.agreed_only) and self.requested is None:
            self.requested = signum
            from . import progress  # a bar may hold the line: start a new one

            sys.stderr.write(f"{chr(10) if progress.current().enabled else ''}zotune: "
                             f"{NAMES.get(signum, signum)} received: stopping after this step with "
                             "a checkpoint (send it again to stop at once)\n")
            sys.stderr.flush()
            return
        immediate = self.requested is not None
        self.requested = signum if self.requested is None else self.requested
        raise RunStopped(signum, immediate=immediate)

    @contextlib.contextmanager
    def deferred(self):
        """A block a first signal does not break into (a ZO step); :meth:`check` after it."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    def check(self) -> None:
        """Raise :class:`RunStopped` if a signal arrived during a deferred block (under
        ``agreed_only``: once the ranks agreed on it)."""
        if self.requested is not None and (self.stop_agreed or not self.agreed_only):
            raise RunStopped(self.requested)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach only the main thread; Python's own Ctrl-C handling stays
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


_current: Signals | None = None


def current() -> Signals:
    """The handling of the running run (a do-nothing one outside :func:`handling`)."""
    return _current if _current is not None else Signals()


@contextlib.contextmanager
def handling():
    """Install the handlers for the block; the block's :class:`Signals` is :func:`current`."""
    global _current
    outer, signals = _current, Signals()
    signals.install()
    _current = signals
    try:
        yield signals
    finally:
        signals.restore()
        _current = outer
