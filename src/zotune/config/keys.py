"""Names of the settings: nested paths, flat names and flags, all derived from the dataclasses.

Each leaf field of :class:`TrainConfig` has

* a path (``("method", "kernel", "order")``, written ``method.kernel.order``): the nested YAML key;
* a flat name (``kernel_order``): its section's ``flat_prefix`` + the field name, or the field's
  ``flat`` metadata (``model.name`` is ``model``, ``method.name`` is ``method``,
  ``method.pezo.pool_size`` is ``pool_size``). These are the former flat TrainConfig's keys, so old YAML
  files and saved config.json files still load;
* a flag: ``--`` + the flat name with ``-`` for ``_`` (``--kernel-order``).

A mapping may mix both spellings: at the top level any flat name; inside a section its fields, its
option families, and the flat names of the settings below it; a section given a plain value
(``method: mezo``, ``model: gpt2``) sets its ``name``. Anything else is an error naming the closest
valid keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ZotuneError
from .sections import FIXED, FREE, TrainConfig

_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@dataclass(frozen=True)
class Leaf:
    """One setting: where it lives, its flat name and what its field declares."""

    path: tuple[str, ...]
    flat: str
    kind: type  # bool, int, float or str
    optional: bool
    default: object
    help: str
    resume: object  # FIXED, FREE or check(saved, new) -> reason or None
    added: bool = False  # added after zotune 0.1 (config.json holds it only when not default)

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def flag(self) -> str:
        return "--" + self.flat.replace("_", "-")

    def get(self, cfg):
        for name in self.path:
            cfg = getattr(cfg, name)
        return cfg

    def set(self, cfg, value) -> None:
        for name in self.path[:-1]:
            cfg = getattr(cfg, name)
        setattr(cfg, self.path[-1], value)


def _walk(cls, path: tuple[str, ...], sections: dict, leaves: list) -> None:
    sections[path] = cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            _walk(typ, path + (f.name,), sections, leaves)
            continue
        args = typing.get_args(typ) if isinstance(typ, types.UnionType) else (typ,)
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) != 1 or kinds[0] not in _KIND_WORDS:
            raise TypeError(f"unsupported config field type {typ} of {'.'.join(path + (f.name,))}")
        leaves.append(Leaf(path + (f.name,), f.metadata.get("flat", cls.flat_prefix + f.name),
                           kinds[0], len(args) > 1, f.default, f.metadata["help"],
                           f.metadata["resume"], f.metadata.get("added", False)))


SECTIONS: dict[tuple[str, ...], type] = {}
"""Every section by path: ``()`` is TrainConfig, ``("method", "kernel")`` KernelOptions."""
LEAVES: list[Leaf] = []
"""Every setting, in declaration order."""
_walk(TrainConfig, (), SECTIONS, LEAVES)
BY_PATH = {leaf.path: leaf for leaf in LEAVES}
BY_FLAT = {leaf.flat: leaf for leaf in LEAVES}
if len(BY_FLAT) != len(LEAVES):  # a programming error, caught at import
    raise TypeError("two config settings share a flat name")
_PATH_OF = {cls: path for path, cls in SECTIONS.items()}


def flag_of(path: tuple[str, ...]) -> str:
    return BY_PATH[path].flag


def resume_keys() -> list[str]:
    """Flat names of the settings a resumed run must keep (``steps`` may change only with a
    constant schedule, so it is listed too)."""
    return [leaf.flat for leaf in LEAVES if leaf.resume != FREE]


def resume_conflicts(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """What differs between a saved run's config and the one resuming it and may not, as
    ``flat=saved (now new)`` (with the reason, for settings that may change in other runs)."""
    out = []
    for leaf in LEAVES:
        before, after = leaf.get(saved), leaf.get(new)
        if before == after or leaf.resume == FREE:
            continue
        reason = None if leaf.resume == FIXED else leaf.resume(saved, new)
        if leaf.resume == FIXED or reason:
            out.append(f"{leaf.flat}={before!r} (now {after!r})" + (f": {reason}" if reason else ""))
    return out


# ------------------------------------------------------------------------- reading mappings
def apply(cfg: TrainConfig, mapping, source: str) -> TrainConfig:
    """Set on ``cfg`` (in place; returned) every setting of ``mapping``, nested or flat."""
    if not isinstance(mapping, Mapping):
        raise ZotuneError(f"{source} must be a mapping of settings, got {type(mapping).__name__}")
    found: dict[tuple[str, ...], tuple[str, object]] = {}
    _collect(mapping, (), source, found)
    for path, (_, value) in found.items():
        leaf = BY_PATH[path]
        leaf.set(cfg, coerce(leaf, value, source))
    return cfg


def _collect(mapping: Mapping, path: tuple[str, ...], source: str, found: dict) -> None:
    for raw, value in mapping.items():
        key = str(raw).replace("-", "_")
        sub = path + (key,)
        if sub in SECTIONS:
            if isinstance(value, Mapping):
                _collect(value, sub, source, found)
                continue
            if value is None:  # an empty section in YAML
                continue
            leaf = BY_PATH.get(sub + ("name",))
            if leaf is None:
                raise ZotuneError(f"setting '{'.'.join(sub)}' in {source} must be a mapping of its "
                                  f"settings ({', '.join(_fields(sub))}), got {value!r}")
        else:
            leaf = BY_PATH.get(sub)
            if leaf is None and key in BY_FLAT and BY_FLAT[key].path[:len(path)] == path:
                leaf = BY_FLAT[key]
            if leaf is None:
                raise ZotuneError(unknown_message(SECTIONS[path], key, source))
        spelled = ".".join(sub)
        if leaf.path in found:
            raise ZotuneError(f"setting '{leaf.dotted}' is given twice in {source}: as "
                              f"'{found[leaf.path][0]}' and as '{spelled}'")
        found[leaf.path] = (spelled, value)


def coerce(leaf: Leaf, value, source: str):
    """``value`` as the setting's type; numbers may be strings (YAML 1.1 reads 1e-5 as one)."""
    kind = leaf.kind
    if value is None and leaf.optional:
        return None
    if kind is bool and isinstance(value, bool):
        return value
    if not isinstance(value, bool):
        if kind is str and isinstance(value, str):
            return value
        if kind in (int, float) and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if kind is float and isinstance(value, (int, float)):
            return float(value)
        if kind is int and isinstance(value, int):
            return value
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
    words = _KIND_WORDS[kind] + (" or null" if leaf.optional else "")
    raise ZotuneError(f"setting '{leaf.dotted}' in {source} must be {words}, got {value!r}")


def _fields(path: tuple[str, ...]) -> list[str]:
    return [f.name for f in dataclasses.fields(SECTIONS[path])]


def unknown_message(section: type, key: str, source: str, *, flat_ok: bool = True) -> str:
    """One line: the unknown key, where, and the closest valid keys (difflib), or what is valid.
    ``flat_ok``: whether flat names are valid here (in mappings; not in constructors)."""
    path = _PATH_OF[section]
    name = ".".join(path + (key,))
    own = {f: ".".join(path + (f,)) for f in _fields(path)}  # what is compared: what is shown
    flat = {leaf.flat: leaf.dotted if path else leaf.flat for leaf in LEAVES
            if flat_ok and leaf.path[:len(path)] == path}
    words = {**flat, **own}
    scores = {w: difflib.SequenceMatcher(None, key, w).ratio() for w in words}
    best = max(scores.values(), default=0.0)
    close = [words[w] for w in sorted(scores, key=lambda w: -scores[w])
             if scores[w] >= max(0.6, best - 0.1)]  # the best match and any nearly as close
    # The same name somewhere else (``model: {lr: ...}``, ``TrainConfig(lr=...)``).
    elsewhere = [leaf.dotted for leaf in LEAVES if key in (leaf.flat, leaf.path[-1])]
    elsewhere += [".".join(p) for p in SECTIONS if p and p[-1] == key]
    hints = list(dict.fromkeys(h for h in elsewhere + close if h != name))[:3]
    note = ""
    if not flat_ok and section is TrainConfig and key in BY_FLAT:
        note = f" (flat names go to TrainConfig.from_flat({key}=...))"
    if hints:
        return f"unknown setting '{name}' in {source}; did you mean: {', '.join(hints)}?{note}"
    valid = ", ".join(_fields(path))
    if flat_ok and not path:
        valid += ", or a flat setting such as lr or kernel_order (see `zotune train --help`)"
    return f"unknown setting '{name}' in {source}; valid here: {valid}{note}"
