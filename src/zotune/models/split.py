"""Where a model splits into a ZO head and a backprop tail (ElasticZO), read from its block table.

A model's *parametrised layers*, in forward order, are the units of its block table that hold a
trainable tensor: for an ``nn.Sequential`` its children (a nested ``Sequential`` or a residual
block is one unit), for a transformer its embeddings, each block, the final norm and the head.
The tail of ``bp_layers = k`` is the last k of them; a tail may also be given by module names.
Other models (no block table) use their leaf modules with parameters, in registration order;
without the model (``ZOOptimizer(named_parameters(), ...)``) the layers are the modules that own
the parameters, read from the names (``fc1.weight`` -> ``fc1``), in order.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from ..errors import ZotuneError
from .blocks import block_table, canonical_name, unwrap


def layer_paths(model: nn.Module) -> list[str]:
    """The model's candidate layer units (canonical module paths), in forward order."""
    table = block_table(model, strict=False)
    if table is not None:
        return [p for p in (*table.embeddings, *table.blocks, table.final_norm, table.head) if p]
    base = unwrap(model)
    return [path for path, m in base.named_modules()
            if path and any(True for _ in m.parameters(recurse=False))]


def _inside(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def parametrised_layers(model: nn.Module, trainable: Iterable[str]) -> list[str]:
    """The layer units holding at least one of the ``trainable`` parameter names."""
    names = [canonical_name(n, model) for n in trainable]
    return [path for path in layer_paths(model) if any(_inside(n, path) for n in names)]


def owners(trainable: Iterable[str]) -> list[str]:
    """The modules owning the named parameters, in order of first appearance (no model needed)."""
    return list(dict.fromkeys(canonical_name(n).rpartition(".")[0] for n in trainable))


def tail_layers(model: nn.Module | None, trainable: Sequence[str], bp_layers: int) -> list[str]:
    """The last ``bp_layers`` parametrised layers (of ``model``, or :func:`owners` of the names
    without one); a ZotuneError when there are fewer."""
    layers = parametrised_layers(model, trainable) if model is not None else owners(trainable)
    if not (isinstance(bp_layers, int) and 0 <= bp_layers <= len(layers)):
        raise ZotuneError(f"bp_layers={bp_layers!r} is not in 0..{len(layers)}: the model has "
                          f"{len(layers)} parametrised layers ({', '.join(layers)})")
    return layers[len(layers) - bp_layers:] if bp_layers else []


def tail_names(model: nn.Module | None, trainable: Sequence[str], *, bp_layers: int | None = None,
               tail: Sequence[str] | None = None) -> set[str]:
    """The trainable names (as given) that belong to the tail: the last ``bp_layers``
    parametrised layers of ``model``, or the modules named in ``tail`` (each must hold one)."""
    if tail is not None and bp_layers is not None:
        raise ValueError("give the tail as bp_layers or as module names (tail=...), not both")
    if tail is None:
        tail = tail_layers(model, trainable, bp_layers)
    canon = {n: (canonical_name(n, model) if model is not None else canonical_name(n)) for n in trainable}
    out = set()
    for path in tail:
        hit = {n for n, c in canon.items() if _inside(c, path)}
        if not hit:
            raise ZotuneError(f"tail module {path!r} holds no trainable parameter; trainable layers: "
                              f"{', '.join(parametrised_layers(model, trainable) if model is not None else owners(trainable))}")
        out |= hit
    return out
