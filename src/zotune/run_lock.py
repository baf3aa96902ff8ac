"""One run per run directory: an exclusive lock on ``<run dir>/run.lock`` for the life of a run.

The lock is an ``fcntl.flock`` on the file ``run.lock``, whose content names the owner
(``{"pid": ..., "host": ..., "started": ...}``). The kernel holds the lock, so it is released when
the owner exits in any way, ``kill -9`` included; a second ``zotune train`` on the same directory
is refused with a one-line error naming the pid and host that hold it. The file is removed when
the run ends. A file left behind by a process that died without removing it (``kill -9``, a
crash, a power cut) is taken over with a warning naming the dead owner.

On a filesystem without working locks (``flock`` fails with anything but "held"), the owner
recorded in the file decides: a live process on this host holds the directory; one on another
host, or a dead one, is taken over with a warning.

    with hold(run_dir):
        ...  # train
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path

from .errors import ZotuneError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: only the recorded owner decides
    fcntl = None

LOCK_NAME = "run.lock"


class RunLocked(ZotuneError):
    """The run directory is in use by another zotune process."""


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


def read_owner(path: Path) -> dict | None:
    """The owner recorded in a lock file, or None (no file, empty or unreadable)."""
    try:
        owner = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def pid_alive(pid) -> bool:
    """Whether process ``pid`` exists on this host."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def _describe(owner: dict | None) -> str:
    if not owner:
        return "another process"
    return f"pid {owner.get('pid')} on host {owner.get('host')}"


def _why_stale(owner: dict, locked: bool | None) -> str:
    here = owner.get("host") == socket.gethostname()
    if locked is None and not here:
        return ("another host (this filesystem has no locks, so whether that run still goes on "
                "cannot be checked)")
    if here and not pid_alive(owner.get("pid")):
        return "which is not running (a run that ended without releasing it)"
    return "which no longer holds it (a run that ended without releasing it)"


def _refuse(run_dir: Path, owner: dict | None) -> RunLocked:
    return RunLocked(f"{run_dir} is in use by another zotune run ({_describe(owner)}, lock file "
                     f"{Path(run_dir) / LOCK_NAME}); wait for it to end, stop it, or choose another "
                     "--output-dir")


class RunLock:
    """The exclusive lock of one run directory (see the module docstring)."""

    def __init__(self, run_dir, warn=None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.warn = warn or (lambda message: None)
        self._fd: int | None = None
        self.taken_over: dict | None = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise :class:`RunLocked` naming its holder."""
        if self._fd is not None:
            raise RuntimeError("RunLock.acquire: already held")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._flock(fd)
                if locked is False:
                    raise _refuse(self.run_dir, read_owner(self.path))
                # The file may have been removed (and recreated) by its last holder between our
                # open and our lock: then the lock we hold is on a file nobody else will look at.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                previous = read_owner(self.path)
                if locked is None and previous and previous.get("pid") != os.getpid():
                    here = previous.get("host") == socket.gethostname()
                    if here and pid_alive(previous.get("pid")):
                        raise _refuse(self.run_dir, previous)
                if previous and previous.get("pid") != os.getpid():
                    self.taken_over = previous
                    self.warn(f"taking over the stale lock {self.path} of {_describe(previous)}, "
                              f"{_why_stale(previous, locked)}")
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(_owner()) + "\n").encode(), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self

    @staticmethod
    def _flock(fd: int) -> bool | None:
        """True: locked; False: held by another process; None: the filesystem has no locks."""
        if fcntl is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            return None
        return True

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # while still locked: a waiting process then retries
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def hold(run_dir, warn=None) -> RunLock:
    """``with hold(run_dir):`` the exclusive lock of ``run_dir`` for the block."""
    return RunLock(run_dir, warn)
