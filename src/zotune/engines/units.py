"""The offload engine's units: groups of layout tensors moved together along the engine's log.

A unit is the embeddings (``pre``), the post-block modules (``post``), the tensors used on both
sides of the blocks (``shared``: a head tied to the embeddings), or one block. Each unit replays
the engine's logged moves up to the point it needs when it is touched (``engines/offload.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ZotuneError
from ..plan import Terms
from .tiers import BlockParams


@dataclass
class Unit:
    """Tensors moved together. ``done``: log position replayed; ``current``: the point they are
    at; ``fresh``: loaded into a slot and not moved since."""

    name: str
    tensors: list[int]
    block: int | None = None
    offloaded: bool = False
    done: int = 0
    current: Terms = ()
    fresh: bool = False


def build_units(engine, base):
    """The engine's units and blocks from its block table; sets ``_pre_units``, ``_post_units``,
    ``_shared``, ``_lookups`` and ``_block_units`` on ``engine``."""
    table = engine.table
    side: dict[int, set] = {}
    for path in table.embeddings:
        for p in base.get_submodule(path).parameters():
            side.setdefault(id(p), set()).add("pre")
    for path in (table.final_norm, table.head):
        if path:
            for p in base.get_submodule(path).parameters():
                side.setdefault(id(p), set()).add("post")
    blocks, owner = [], {}
    for j in range(table.num_blocks):
        named, seen = [], set()
        for name, p in table.block_module(base, j).named_parameters():
            if id(p) in owner and owner[id(p)] != j:
                raise ZotuneError(f"parameter {name!r} is shared between blocks {owner[id(p)]} and "
                                  f"{j}; engine 'offload' streams blocks with their own parameters")
            if id(p) in side:
                raise ZotuneError(f"parameter {name!r} of block {j} is also used outside the blocks; "
                                  "engine 'offload' cannot stream it")
            if id(p) not in seen:
                seen.add(id(p))
                owner[id(p)] = j
                named.append((name, p))
        blocks.append(BlockParams(j, named))
    units = {name: Unit(name, []) for name in ("pre", "post", "shared")}
    block_units = [Unit(f"block {j}", [], block=j, offloaded=j >= engine.resident_blocks)
                   for j in range(table.num_blocks)]
    for t in engine.tensors:
        j = owner.get(id(t.param))
        if j is not None:
            block_units[j].tensors.append(t.spec.index)
            continue
        sides = side.get(id(t.param), set())
        units[sides.pop() if len(sides) == 1 else "shared"].tensors.append(t.spec.index)
    engine._pre_units = [units["pre"], units["shared"]]
    engine._post_units = [units["post"]]
    engine._shared = units["shared"]
    # Shared tensors that are plain embedding tables (a tied head): the pre pass needs only the
    # rows it looks up, computed from copies of their chunks, instead of a copy per point.
    lookups = {}
    for path in table.embeddings:
        module = base.get_submodule(path)
        if isinstance(module, torch.nn.Embedding) and module.max_norm is None:
            for ti in units["shared"].tensors:
                if engine.tensors[ti].param is module.weight and engine.tensors[ti].master is None:
                    lookups[ti] = path
    # Rows cost draws (the table once more per point), copies cost memory (one table per
    # point but the last): on the disk tier memory is what is short, in host memory time.
    engine._lookups = (lookups if len(lookups) == len(units["shared"].tensors)
                       and engine.offload_to == "disk" else {})
    engine._block_units = block_units
    return [*units.values(), *block_units], blocks


def place_resident(base, table, device, offload_to: str) -> torch.device:
    """The compute device (``device``, default: where the model is). For a CUDA device the
    modules outside the blocks (embeddings, norms, head, rotary tables) are moved there, their
    Parameter objects kept; the blocks stay in host memory for the tier to take."""
    here = next(base.parameters()).device
    device = here if device is None else torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ZotuneError(f"engine 'offload' computes on cpu or cuda, got device {str(device)!r}")
    if device.type == "cpu":
        if here.type != "cpu":
            raise ZotuneError(f"engine 'offload' on device cpu needs the model on the CPU, it is on {here}")
        return device
    if not torch.cuda.is_available():
        raise ZotuneError(f"device {str(device)!r} asked for, but no CUDA GPU is available")
    if offload_to != "cpu":
        raise ZotuneError("engine 'offload' with a CUDA device streams from host memory in this "
                          "version: use offload_to='cpu' (--offload-to cpu)")
    inside = {id(m) for j in range(table.num_blocks) for m in table.block_module(base, j).modules()}
    for module in base.modules():
        if id(module) in inside:
            continue
        for name, p in module._parameters.items():
            if p is not None:
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device)
    for j in range(table.num_blocks):  # blocks that were loaded on the GPU come back to the host
        for p in table.block_module(base, j).parameters():
            p.data = p.data.cpu()
    return device


def checkpoint_groups(engine, params: dict) -> list:
    """Per offloaded block, ``(names, fetch, commit)`` for ``checkpoint_stream`` (the names of
    ``params`` that are the block's parameters): ``fetch`` loads the block from the tier into one
    reusable buffer and returns views of it by name, ``commit`` stores the buffer back and points
    the parameters at it. Call with every unit caught up (``state_dict`` does)."""
    tier, groups, scratch = engine.tier, [], {}
    for unit in engine._block_units:
        if not unit.offloaded:
            continue
        b = engine._blocks[unit.block]
        where = {id(p): (off, p.shape) for p, off in zip(b.params, b.offsets)}
        names = [n for n, p in params.items() if id(p) in where]
        if not names:
            continue

        def fetch(j=unit.block, names=names, where=where):
            if tier.kind == "cpu":  # the host buffer itself: no copy
                flat = tier.view(j)
            else:
                size, dtype = max(x.numel for x in engine._blocks), engine.streamer.storage_dtype
                if scratch.get("buf") is None or scratch["buf"].dtype != dtype:
                    scratch["buf"] = torch.empty(size, dtype=dtype)
                flat = tier.load(j, scratch["buf"])
            scratch["flat"] = flat
            return {n: flat[where[id(params[n])][0]:][:params[n].numel()].view(where[id(params[n])][1])
                    for n in names}

        def commit(j=unit.block, unit=unit):
            if tier.kind != "cpu":
                tier.store(j, scratch["flat"], {"moves": "checkpoint"})
            engine.streamer.rebind(unit)
        groups.append((names, fetch, commit))
    return groups
