"""The parameter layout: one object that says what every trainable tensor is and where it lies.

Every engine, estimator and checkpoint agrees on the layout: canonical names (the same with or
without DDP's ``module.``, ``torch.compile``'s ``_orig_mod.`` or PEFT's ``base_model.model.``
prefixes, so the random numbers of a tensor do not depend on how the model is wrapped), ids (the
hash of the canonical name, which keys the directions), global offsets in the flat stream of all
trainable elements (positional directions such as PeZO's pool read it), the chunk grid (DESIGN.md,
invariant 2), the parameter group, whether weight decay applies, the role (``zo``: perturbed and
updated from ZO estimates; ``backprop``: updated from real gradients, never perturbed; ``frozen``:
left alone) and the kind (``float``, or ``integer`` for integer-only training).

The layout is saved with the optimizer state and checked on load: a checkpoint made with another
chunk size, direction, random-number device or set of tensors is refused with a message that names
the difference, instead of silently regenerating other directions. Shards (for distributed and
offload engines) are whole chunks, so every rank regenerates exactly the chunks it holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import rng

ROLES = ("zo", "backprop", "frozen")
KINDS = ("float", "integer")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
"""Prefixes added by DDP/FSDP (``module.``), ``torch.compile`` (``_orig_mod.``) and PEFT
(``base_model.model.``); stripped, repeatedly, from the front of a name."""


def strip_prefixes(name: str, prefixes=WRAPPER_PREFIXES) -> str:
    """``name`` with any of ``prefixes`` removed from its front, repeatedly."""
    prefixes = tuple(prefixes)
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def canonical_name(name: str) -> str:
    """``name`` without the wrapper prefixes of DDP, ``torch.compile`` and PEFT (by name; see
    ``zotune.models.canonical_name`` for prompt-learning PEFT models, which need the model)."""
    return strip_prefixes(name)


@dataclass
class TensorSpec:
    """One trainable tensor of the layout.

    Attributes:
        name: canonical name (keys the random numbers through ``tensor_id``).
        index: position in the layout (engines address tensors by it).
        tensor_id: ``rng.name_id(name)``.
        shape, dtype: as the parameter.
        start: flat offset of its first element among all trainable elements (layout order).
        chunks: ``[(start, end), ...]`` inside the tensor.
        group: parameter-group index (lr and weight decay come from the group).
        decays: whether weight decay applies (not to biases and norm weights).
        role: ``zo``, ``backprop`` or ``frozen``; ``reason`` says why when it was not asked for.
        kind: ``float`` or ``integer``.
    """

    name: str
    index: int
    tensor_id: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int
    chunks: list[tuple[int, int]]
    group: int = 0
    decays: bool = True
    role: str = "zo"
    kind: str = "float"
    reason: str = ""

    @property
    def numel(self) -> int:
        return self.chunks[-1][1] if self.chunks else 0


@dataclass
class ParamLayout:
    """The trainable tensors, their chunk grid and the run's random-number settings.

    Args:
        tensors: the specs, in layout order.
        chunk_size: elements per regenerable chunk.
        direction: the direction's registry name (recorded; directions differ in their numbers).
        rng_device: the device random numbers are drawn on (``cpu`` or ``cuda``): CPU and CUDA
            generators give different numbers for one key, so it is fixed per run and recorded.
        blocks: the model's block table, if known.
    """

    tensors: list[TensorSpec]
    chunk_size: int
    direction: str = "gaussian"
    rng_device: str = "cpu"
    blocks: object = None
    """The model's block table (``zotune.models.block_table``) when the model is known: DiZO's
    targets and the weight-decay rule read it; later the offload, feature reuse and ElasticZO split."""
    _by_name: dict[str, TensorSpec] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._by_name = {t.name: t for t in self.tensors}

    @classmethod
    def build(cls, entries, *, chunk_size: int = rng.DEFAULT_CHUNK_SIZE, direction: str = "gaussian",
              rng_device: str | None = None) -> "ParamLayout":
        """A layout from ``(name, tensor, group, decays)`` entries (optionally a fifth: role).

        Names are made canonical; two entries with one canonical name are an error.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        specs: list[TensorSpec] = []
        seen: set[str] = set()
        start = 0
        devices = set()
        for i, entry in enumerate(entries):
            name, p, group, decays = entry[:4]
            role = entry[4] if len(entry) > 4 else "zo"
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r} for {name!r}; valid roles: {', '.join(ROLES)}")
            name = canonical_name(name)
            if name in seen:
                raise ValueError(f"duplicate trainable tensor name {name!r}")
            seen.add(name)
            kind = "float" if p.is_floating_point() else "integer"
            specs.append(TensorSpec(name, i, rng.name_id(name), tuple(p.shape), p.dtype, start,
                                    rng.chunk_bounds(p.numel(), chunk_size) if p.numel() else [],
                                    group, bool(decays), role, kind))
            start += p.numel()
            devices.add(p.device.type)
        if rng_device is None:
            rng_device = "cuda" if "cuda" in devices else "cpu"
        return cls(specs, chunk_size, direction, rng_device)

    # ------------------------------------------------------------- queries
    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __getitem__(self, index: int) -> TensorSpec:
        return self.tensors[index]

    def spec(self, name: str) -> TensorSpec:
        """The spec of a tensor by (possibly wrapped) name."""
        try:
            return self._by_name[canonical_name(name)]
        except KeyError:
            raise KeyError(f"no trainable tensor {name!r} in the layout") from None

    def with_role(self, role: str) -> list[TensorSpec]:
        return [t for t in self.tensors if t.role == role]

    def set_role(self, index: int, role: str, reason: str = "") -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        self.tensors[index].role, self.tensors[index].reason = role, reason

    def chunk_jobs(self, roles=("zo",)) -> list[tuple[int, int]]:
        """``(tensor index, chunk index)`` of every chunk of the tensors with one of ``roles``."""
        return [(t.index, c) for t in self.tensors if t.role in roles for c in range(len(t.chunks))]

    def shards(self, n: int) -> list[list[tuple[int, int]]]:
        """``n`` shards of whole chunks, balanced by element count (greedy, layout order kept
        inside each shard); every chunk of every tensor is in exactly one shard."""
        if n < 1:
            raise ValueError(f"number of shards must be >= 1, got {n}")
        jobs = [(t.index, c, e - s) for t in self.tensors for c, (s, e) in enumerate(t.chunks)]
        loads, out = [0] * n, [[] for _ in range(n)]
        for ti, c, size in sorted(jobs, key=lambda j: -j[2]):
            k = loads.index(min(loads))
            out[k].append((ti, c))
            loads[k] += size
        return [sorted(s) for s in out]

    # ---------------------------------------------------------- checkpoint
    def state_dict(self) -> dict:
        """Plain containers only (checkpoints load with ``weights_only=True``)."""
        return {"chunk_size": self.chunk_size, "direction": self.direction, "rng_device": self.rng_device,
                "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                             "group": t.group, "decays": t.decays, "role": t.role, "kind": t.kind,
                             "reason": t.reason} for t in self.tensors]}

    def check(self, saved: dict) -> None:
        """Raise ValueError naming the first difference between this layout and a saved one.

        Roles set by a policy (``reason`` non-empty, such as the low-precision probe check) are
        adopted from the saved layout, so a resumed run perturbs exactly the tensors it did."""
        for key in ("chunk_size", "direction", "rng_device"):
            if saved[key] != getattr(self, key):
                raise ValueError(f"checkpoint was made with {key}={saved[key]!r}, this optimizer has "
                                 f"{key}={getattr(self, key)!r}; its directions would differ")
        names = [t["name"] for t in saved["tensors"]]
        mine = [t.name for t in self.tensors]
        if names != mine:
            missing = sorted(set(names) - set(mine))
            extra = sorted(set(mine) - set(names))
            raise ValueError(f"checkpoint has another set of trainable tensors: {len(missing)} saved but "
                             f"not here (e.g. {missing[:2]}), {len(extra)} here but not saved (e.g. "
                             f"{extra[:2]})" if missing or extra else
                             "checkpoint lists the trainable tensors in another order")
        for t, s in zip(self.tensors, saved["tensors"]):
            if list(t.shape) != list(s["shape"]):
                raise ValueError(f"checkpoint: {t.name} has shape {tuple(s['shape'])}, here {t.shape}")
            if s["role"] != t.role:
                if not (s.get("reason") or t.reason):
                    raise ValueError(f"checkpoint: {t.name} has role {s['role']!r}, here {t.role!r}")
                self.set_role(t.index, s["role"], s.get("reason", ""))
