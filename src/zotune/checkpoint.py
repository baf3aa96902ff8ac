"""Checkpoints of a training run, written so that a crash never loses a finished one.

A checkpoint is a directory holding the trainable parameters (``trainable.safetensors``), the
optimizer state (``optimizer.pt``: rule buffers, master weights, step counters, RNG keys; only
tensors and plain containers, loaded with ``weights_only=True``) and the
loop's state (``state.json``). It is written under a temporary name and renamed into place; the
``latest`` pointer file is then replaced atomically, and only after that is the previous checkpoint
removed. At every instant, ``latest`` names a complete checkpoint.

Layout of a run directory::

    config.json  metrics.jsonl  summary.json  curves.png
    checkpoints/latest           name of the newest complete checkpoint
    checkpoints/step-0000100/    {trainable.safetensors, optimizer.pt, state.json}
    best/                        the best-dev trainable parameters and their state.json
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ZotuneError


class CheckpointError(ZotuneError):
    """A checkpoint that is missing, corrupt or does not match the model."""


def _write_dir(final: Path, params: dict[str, torch.Tensor], state: dict,
               optimizer_state: dict | None) -> None:
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in params.items()},
              str(tmp / "trainable.safetensors"))
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


def save(run_dir: Path, step: int, params: dict[str, torch.Tensor], state: dict,
         optimizer_state: dict) -> Path:
    """Write checkpoint ``step`` and point ``latest`` at it; then drop older checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    _write_dir(final, params, state, optimizer_state)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    for old in root.glob("step-*"):
        if old.name != final.name and not old.name.endswith(".tmp"):
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_best(run_dir: Path, params: dict[str, torch.Tensor], state: dict) -> Path:
    """Replace the best-dev parameters (no optimizer state: they are for evaluation)."""
    final = Path(run_dir) / "best"
    _write_dir(final, params, state, None)
    return final


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "state.json").exists():
        raise CheckpointError(f"checkpoint pointer {pointer} names {path.name}, which is incomplete")
    return path


def load(path: Path, model_params: dict[str, torch.nn.Parameter]) -> tuple[dict, dict | None]:
    """Copy a checkpoint's parameters into ``model_params``; return (state, optimizer state)."""
    path = Path(path)
    try:
        tensors = load_file(str(path / "trainable.safetensors"))
        state = json.loads((path / "state.json").read_text())
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type on corrupt files
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    missing = sorted(set(model_params) - set(tensors))
    extra = sorted(set(tensors) - set(model_params))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {path} does not match the model's trainable parameters: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
    for name, p in model_params.items():
        if tensors[name].shape != p.shape:
            raise CheckpointError(f"checkpoint {path}: {name} has shape {tuple(tensors[name].shape)},"
                                  f" the model has {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(tensors[name])
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
