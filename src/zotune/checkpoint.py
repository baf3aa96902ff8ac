"""Checkpoints of a training run, written so that a crash never loses a finished one.

A checkpoint is a directory holding the trainable parameters (``trainable.safetensors``), the
optimizer state (``optimizer.pt``: rule buffers, master weights, step counters, RNG keys; only
tensors and plain containers, loaded with ``weights_only=True``) and the
loop's state (``state.json``). It is written under a temporary name and renamed into place; the
``latest`` pointer file is then replaced atomically, and only after that is the previous checkpoint
removed. At every instant, ``latest`` names a complete checkpoint.

The last ``keep`` checkpoints are kept (``run.keep_checkpoints``, default 2): when the newest is
unreadable, ``--resume`` falls back to the one before it with a warning (:func:`load_latest`).
Everything is saved in the parameters' own dtype: step checkpoints because exact resume needs
every bit, and ``best/`` because the summary's test number is computed from it and ``zotune eval``
reproduces that number and the logged best dev score. A step checkpoint written right after
``best/`` (the same parameters) hard-links ``best/``'s parameter file instead of a second copy.
Files are only ever written under a temporary name and renamed, never rewritten in place, so the
two names of a linked file cannot diverge.

A save stopped half-way (a second Ctrl-C or SIGTERM, a crash) leaves a ``*.tmp`` directory, or a
``*.old`` one when it was replacing a checkpoint of the same name; :func:`clean`, run at the next
start, removes the first and puts the second back when nothing replaced it.

Layout of a run directory::

    config.json  metrics.jsonl  summary.json  curves.png  run.lock (while a run is going on)
    checkpoints/latest           name of the newest complete checkpoint
    checkpoints/step-0000100/    {trainable.safetensors, optimizer.pt, state.json}
    checkpoints/step-0000200/    the newest; ``latest`` names it
    best/                        the best-dev trainable parameters and their state.json
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from . import checkpoint_stream
from .errors import ZotuneError


class CheckpointError(ZotuneError):
    """A checkpoint that is missing, corrupt or does not match the model."""


PARAMS = "trainable.safetensors"
_STEP = re.compile(r"^step-(\d+)$")


def _write_dir(final: Path, params: dict[str, torch.Tensor], state: dict,
               optimizer_state: dict | None, share: Path | None = None, groups=()) -> None:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    linked = False
    if share is not None:
        try:
            os.link(share, tmp / PARAMS)
            linked = True
        except OSError:  # no hard links on this filesystem (or across filesystems): a copy
            pass
    if not linked:  # one tensor (or one offloaded block: ``groups``) at a time
        checkpoint_stream.save(tmp / PARAMS, params, groups)
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _step_of(path: Path) -> int | None:
    found = _STEP.match(path.name)
    return int(found.group(1)) if found else None


def save(run_dir: Path, step: int, params: dict[str, torch.Tensor], state: dict,
         optimizer_state: dict, *, keep: int = 2, share: Path | None = None, groups=()) -> Path:
    """Write checkpoint ``step`` and point ``latest`` at it; then keep it and the ``keep - 1``
    checkpoints before it and drop the others (also any after it: the leftovers of a run resumed
    from an older checkpoint). ``share``: a parameter file holding exactly ``params`` (``best/``'s,
    just written), hard-linked instead of written again. ``groups``: parameters streamed from an
    offload tier block by block (``checkpoint_stream``)."""
    if not (isinstance(keep, int) and keep >= 1):
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    _write_dir(final, params, state, optimizer_state, share, groups)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    older = sorted((p for p in root.iterdir() if p.is_dir() and (s := _step_of(p)) is not None
                    and s < step), key=_step_of, reverse=True)
    kept = {final.name} | {p.name for p in older[: keep - 1]}
    for old in root.iterdir():
        if old.is_dir() and _step_of(old) is not None and old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(run_dir: Path, params: dict[str, torch.Tensor], state: dict, groups=()) -> Path:
    """Replace the best-dev parameters (no optimizer state: they are for evaluation; in the
    parameters' own dtype, so that evaluating them gives the logged numbers exactly)."""
    final = Path(run_dir) / "best"
    _write_dir(final, params, state, None, groups=groups)
    return final


def _warn(message: str) -> None:
    from . import progress

    progress.warn(message)


def _complete(path: Path) -> bool:
    """Whether a checkpoint directory holds a readable state.json (written last, before the
    rename that completes it)."""
    try:
        json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return (path / PARAMS).exists()


def checkpoints(run_dir: Path) -> list[Path]:
    """The complete step checkpoints of a run: the one ``latest`` names first, then the others,
    newest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None
                    and _complete(p)), key=_step_of, reverse=True)
    pointer = root / "latest"
    named = pointer.read_text().strip() if pointer.exists() else None
    return sorted(found, key=lambda p: p.name != named)  # stable: the rest stay newest first


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (the one ``latest`` names; if that one is
    incomplete, the newest complete one, with a warning), or None when the run has none."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if _complete(path):
        return path
    found = checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"checkpoint pointer {pointer} names {path.name}, which is incomplete,"
                              " and there is no other checkpoint")
    _warn(f"checkpoint pointer {pointer} names {path.name}, which is incomplete; using "
          f"{found[0].name}")
    return found[0]


def load_latest(run_dir: Path, model_params: dict[str, torch.nn.Parameter],
                groups=()) -> tuple[dict, dict | None]:
    """:func:`load` the newest checkpoint of a run that reads; when the newest does not, fall
    back to the one before it (``run.keep_checkpoints``) with a warning. When none reads, the
    newest's error."""
    found = checkpoints(run_dir)
    if not found:
        latest(run_dir)  # raises on a pointer to an incomplete checkpoint
        raise CheckpointError(f"no checkpoint in {Path(run_dir) / 'checkpoints'}")
    first_error = None
    for i, path in enumerate(found):
        try:
            loaded = load(path, model_params, groups)
        except CheckpointError as exc:
            first_error = first_error or exc
            if i + 1 < len(found):
                _warn(f"{exc}; resuming from the checkpoint before it, {found[i + 1].name}")
            continue
        return loaded
    raise first_error


def clean(run_dir: Path) -> list[str]:
    """Tidy what a save stopped half-way left (see the module docstring): remove ``*.tmp``
    checkpoint directories and files, put back a ``*.old`` directory whose replacement never
    arrived, remove the other ``*.old`` ones. Run it only while holding the run's lock. Returns
    what it did, one line each (also printed as warnings for directories)."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    done = []
    dirs = ([p for p in root.iterdir() if p.name.startswith("step-")] if root.is_dir() else [])
    dirs += [run_dir / "best.tmp", run_dir / "best.old"]
    for path in dirs:
        if not path.is_dir() or path.suffix not in (".tmp", ".old"):
            continue
        final = path.with_suffix("")
        if path.suffix == ".old" and not final.exists():
            os.replace(path, final)
            done.append(f"restored {final} from {path.name}, left by a save that was stopped")
        else:
            shutil.rmtree(path, ignore_errors=True)
            if path.suffix == ".tmp":
                done.append(f"removed {path}, an incomplete checkpoint left by a save that was "
                            "stopped")
    for line in done:
        _warn(line)
    for name in ("checkpoints/latest.tmp", "config.json.tmp", "summary.json.tmp", "curves.png.tmp.png"):
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
    return done


def load(path: Path, model_params: dict[str, torch.nn.Parameter], groups=()) -> tuple[dict, dict | None]:
    """Copy a checkpoint's parameters into ``model_params``, one tensor (or one offloaded block:
    ``groups``) at a time; return (state, optimizer state)."""
    path = Path(path)
    try:
        with safe_open(str(path / PARAMS), "pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        state = json.loads((path / "state.json").read_text())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type on corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    missing = sorted(set(model_params) - set(shapes))
    extra = sorted(set(shapes) - set(model_params))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match the model's trainable parameters: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
    for name, p in model_params.items():
        if shapes[name] != tuple(p.shape):
            raise CheckpointError(f"checkpoint {path}: {name} has shape {shapes[name]},"
                                  f" the model has {tuple(p.shape)}")
    try:
        checkpoint_stream.load(path / PARAMS, model_params, groups)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a file truncated after its header
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    opt_path = path / "optimizer.pt"
    optimizer_state = None
    if opt_path.exists():
        optimizer_state = _load_optimizer_state(opt_path)
    return state, optimizer_state


def _load_optimizer_state(path: Path) -> dict:
    """``optimizer.pt`` unpickled with ``weights_only=True``: tensors and plain containers (dict,
    list, tuple, int, float, str, bool, None) load, anything else (a class instance, a function)
    is refused instead of being executed."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is a corrupt, foreign or truncated file
        found = re.search(r"Unsupported global: (?:GLOBAL )?(\S+?)\.? was not an allowed global", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and found:
            raise CheckpointError(f"refusing to load optimizer state {path}: it holds a "
                                  f"{found.group(1)} object, not only tensors and plain containers "
                                  "(zotune never writes one; the file is not from zotune or was "
                                  "altered)") from None
        reason = " ".join(str(exc).split())  # torch's own advice (weights_only=False) left out
        reason = re.split(r" Please use| Check the documentation",
                          reason.split("WeightsUnpickler error: ")[-1])[0]
        raise CheckpointError(f"cannot read optimizer state {path}: {reason}") from None
