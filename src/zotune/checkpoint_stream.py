"""Parameter files of checkpoints written and read one tensor, or one block, at a time.

``safetensors.torch.save_file`` builds the whole file in memory and ``load_file`` reads it whole:
for a model larger than RAM (the offload engine's disk tier, docs/offload.md) a checkpoint must
stream. The files are plain safetensors (an 8-byte little-endian header size, a JSON header with
every tensor's dtype, shape and data offsets, then the data), readable by the library.

*Groups* are how an offloaded model streams: ``(names, fetch, commit)`` where ``fetch()`` returns
``{name: tensor}`` for those names, views of one reusable block-sized buffer that it has just
filled from the storage tier, and ``commit()`` (loading only) writes that buffer back to the
tier. A save or load then holds at most one block beyond what is resident anyway.
(``OffloadEngine.checkpoint_groups``.)
"""
from __future__ import annotations

import json
import struct

import torch
from safetensors import safe_open

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _raw(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def save(path, tensors: dict[str, torch.Tensor], groups=()) -> None:
    """Write ``tensors`` (name -> tensor) as a safetensors file at ``path``; the tensors named by
    a group are taken from its ``fetch()`` when their turn comes (module docstring)."""
    grouped = [name for names, *_ in groups for name in names]
    order = [n for n in tensors if n not in set(grouped)] + grouped
    header, offset = {}, 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in order[:len(order) - len(grouped)]:
            f.write(_raw(tensors[name]))
        for names, fetch, *_ in groups:
            values = fetch()
            for name in names:
                if values[name].shape != tensors[name].shape or values[name].dtype != tensors[name].dtype:
                    raise ValueError(f"{name}: a group gave {values[name].dtype} {tuple(values[name].shape)}, "
                                     f"the header says {tensors[name].dtype} {tuple(tensors[name].shape)}")
                f.write(_raw(values[name]))


def names(path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def load(path, targets: dict[str, torch.Tensor], groups=(), check=None) -> None:
    """Copy every tensor of the file at ``path`` into ``targets[name]`` one at a time (a group's
    names into the views its ``fetch()`` returns, then ``commit()``). ``check(name, tensor)``
    may raise for a tensor that does not fit."""
    grouped = {name for names, *_ in groups for name in names}
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            if name not in grouped:
                value = f.get_tensor(name)
                if check is not None:
                    check(name, value)
                with torch.no_grad():
                    targets[name].copy_(value)
                del value  # before the next one is read
        for names, fetch, commit in groups:
            views = fetch()
            for name in names:
                value = f.get_tensor(name)
                if check is not None:
                    check(name, value)
                views[name].copy_(value)
                del value
            commit()
