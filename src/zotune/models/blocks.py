"""Block tables: an architecture described as a small table of module paths, not a rewritten forward.

A :class:`BlockTable` names, for one model, its embedding modules, its transformer blocks in order,
the final norm, the head, every norm module, and where each block keeps its attention keys and
values. Streaming offload, feature reuse (restarting a forward from a cached block input, see
``zotune.objectives.runner``), DiZO's projected layers, the ElasticZO split and the weight-decay
exemption all read it instead of matching parameter names by hand.

Paths are canonical: those of the underlying Hugging Face model (or ``nn.Sequential``), without the
prefixes that wrappers add (peft ``base_model.model.`` or ``base_model.``, DDP ``module.``,
``torch.compile`` ``_orig_mod.``); :func:`canonical_name` strips them. Families: Llama, Mistral,
Qwen2, Qwen3 (``model.layers.i``), OPT (``model.decoder.layers.i``), GPT-2 (``transformer.h.i``,
keys and values as column slices of the fused ``c_attn``), and any ``nn.Sequential`` (each child
a block). Adding a family is one :class:`Layout` entry in :data:`LAYOUTS`.

Cost: building a table walks ``named_modules`` once (milliseconds); lookups are dictionary hits.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
from torch import nn

from zotune.errors import ZotuneError
from zotune.layout import canonical_name as layout_canonical_name, strip_prefixes

# Prefixes wrappers put in front of the wrapped model's names (peft's depends on the tuner; see
# _wrapper_prefixes). Order does not matter: a DDP of a compiled model nests both.
_RUNTIME_PREFIXES = ("_orig_mod.", "module.")
_PEFT_PREFIX = "base_model.model."


class ParamSlice(NamedTuple):
    """A parameter, or the slice ``start:stop`` of it along ``dim`` (``dim=None``: all of it).

    A plain tuple ``(name, dim, start, stop)``, the fields of DiZO's ``Target``."""

    name: str
    dim: int | None = None
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class Layout:
    """How one family names its parts, relative to the causal-LM model (the table's source data).

    ``blocks`` is the path of the ``ModuleList`` of blocks; ``kv`` the key and value weights
    relative to a block, or ``fused_qkv`` one weight holding [q | k | v] side by side along
    ``fused_dim``, each ``hidden_size`` wide (GPT-2's Conv1D ``c_attn``, shape (d, 3d)).
    """

    embeddings: tuple[str, ...]
    blocks: str
    final_norm: str | None
    head: str | None
    kv: tuple[str, str] | None = None
    fused_qkv: str | None = None
    fused_dim: int = 1


_DECODER = Layout(("model.embed_tokens",), "model.layers", "model.norm", "lm_head",
                  kv=("self_attn.k_proj.weight", "self_attn.v_proj.weight"))
LAYOUTS: dict[str, Layout] = {
    "llama": _DECODER, "mistral": _DECODER, "qwen2": _DECODER, "qwen3": _DECODER,
    "opt": Layout(("model.decoder.embed_tokens", "model.decoder.embed_positions"),
                  "model.decoder.layers", "model.decoder.final_layer_norm", "lm_head",
                  kv=("self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    "gpt2": Layout(("transformer.wte", "transformer.wpe"), "transformer.h", "transformer.ln_f",
                   "lm_head", fused_qkv="attn.c_attn.weight"),
}
"""model_type -> Layout. ``nn.Sequential`` needs no entry."""


@dataclass(frozen=True)
class BlockTable:
    """One model's parts as canonical module paths.

    Fields: ``family`` (a ``model_type`` or ``"sequential"``), ``embeddings``, ``blocks`` (in
    forward order), ``final_norm`` and ``head`` (or None), ``kv`` (per block, its (key, value)
    :class:`ParamSlice` pair; empty for ``nn.Sequential``) and ``norms`` (every norm module).

    Methods accept raw names (from a wrapped model's ``named_parameters``) as well as canonical
    ones; those that return names return the caller's names, so they index the caller's dicts.
    """

    family: str
    embeddings: tuple[str, ...]
    blocks: tuple[str, ...]
    final_norm: str | None
    head: str | None
    kv: tuple[tuple[ParamSlice, ParamSlice], ...]
    norms: tuple[str, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @cached_property
    def _block_index(self) -> dict[str, int]:
        return {path: j for j, path in enumerate(self.blocks)}

    @cached_property
    def _kv_index(self) -> dict[str, list[ParamSlice]]:
        index: dict[str, list[ParamSlice]] = {}
        for pair in self.kv:
            for part in pair:  # key before value, also within one fused tensor
                index.setdefault(part.name, []).append(part)
        return index

    @cached_property
    def _norm_set(self) -> frozenset[str]:
        return frozenset(self.norms)

    @cached_property
    def _roots(self) -> frozenset[str]:
        paths = (*self.embeddings, *self.blocks, *self.norms, self.final_norm, self.head)
        return frozenset(p.split(".", 1)[0] for p in paths if p)

    def canonical(self, name: str) -> str:
        """``name`` without wrapper prefixes, using this table's paths to tell peft's adapter
        prefix (``base_model.model.``) from its prompt-learning one (``base_model.``)."""
        name = _strip(name, _RUNTIME_PREFIXES)
        if not name.startswith("base_model."):
            return name
        rest = name[len("base_model."):]
        if rest.startswith("model.") and rest[len("model."):].split(".", 1)[0] in self._roots:
            return rest[len("model."):]
        return rest

    def block_of(self, name: str) -> int | None:
        """Index of the block a parameter (or module) belongs to; None outside every block."""
        parts = self.canonical(name).split(".")
        for end in range(len(parts), 0, -1):
            j = self._block_index.get(".".join(parts[:end]))
            if j is not None:
                return j
        return None

    def is_norm(self, name: str) -> bool:
        """Whether a parameter belongs to a norm module (LayerNorm, RMSNorm, ...)."""
        return self.canonical(name).rpartition(".")[0] in self._norm_set

    def no_weight_decay(self, name: str) -> bool:
        """Whether weight decay skips a parameter: norm weights and biases (MeZO's rule)."""
        return self.is_norm(name) or self.canonical(name).rpartition(".")[2].endswith("bias")

    def kv_targets(self, names: Iterable[str],
                   shapes: Mapping[str, torch.Size] | None = None) -> list[ParamSlice]:
        """The attention key and value weights among ``names``, in their order: whole tensors,
        or for a fused [q | k | v] weight its k and v slices. ``shapes`` (name -> shape), when
        given, is checked against the slices. Empty when no name is a key or value.

        On the tiny llama, qwen2, opt and gpt2 models with every parameter trainable, this is
        what DiZO's name-based ``default_targets`` gives (tested)."""
        out = []
        for name in names:
            for part in self._kv_index.get(self.canonical(name), ()):
                if part.dim is not None and shapes is not None:
                    shape = tuple(shapes[name])
                    width = 3 * (part.stop - part.start)
                    if len(shape) != 2 or shape[part.dim] != width:
                        raise ValueError(f"{name!r} has shape {shape}; the fused [q|k|v] weight of "
                                         f"{self.family} should be {width} wide along dim "
                                         f"{part.dim}. Pass a DiZO pattern instead")
                out.append(ParamSlice(name, part.dim, part.start, part.stop))
        return out

    def block_parameters(self, j: int, params) -> list[tuple[str, torch.Tensor]]:
        """The parameters of block ``j``: from a model, as (canonical name, parameter) in
        ``named_parameters`` order (adapters inside the block included); from an iterable of
        (name, tensor) pairs, the pairs whose name lies in block ``j``, names as given."""
        if not 0 <= j < len(self.blocks):
            raise IndexError(f"block {j} out of range: {self.family} has {len(self.blocks)} blocks")
        if isinstance(params, nn.Module):
            path = self.blocks[j]
            return list(unwrap(params).get_submodule(path).named_parameters(prefix=path))
        return [(n, p) for n, p in params if self.block_of(n) == j]

    def block_module(self, model: nn.Module, j: int) -> nn.Module:
        """Block ``j`` of ``model`` (wrappers resolved)."""
        return unwrap(model).get_submodule(self.blocks[j])


# ----------------------------------------------------------------------------- wrappers

def _strip(name: str, prefixes: Iterable[str]) -> str:
    return strip_prefixes(name, prefixes)


def _unwrap_once(model: nn.Module) -> tuple[nn.Module, str] | None:
    """(wrapped model, the prefix the wrapper adds to its names), or None for an unwrapped one."""
    orig = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(orig, nn.Module):
        return orig, "_orig_mod."
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module, "module."
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        base = model.get_base_model()
        # LoRA-like tuners nest the model one level deeper than prompt learning does.
        for path, module in model.named_modules():
            if module is base and path:
                return base, path + "."
    return None


def _wrapper_prefixes(model: nn.Module) -> tuple[nn.Module, list[str]]:
    prefixes = []
    while (step := _unwrap_once(model)) is not None:
        model, prefix = step
        prefixes.append(prefix)
    return model, prefixes


def unwrap(model: nn.Module) -> nn.Module:
    """The model under peft (``get_base_model()``), DDP/DataParallel (``.module``) and
    ``torch.compile`` (``._orig_mod``) wrappers, in any nesting."""
    return _wrapper_prefixes(model)[0]


def canonical_name(name: str, model: nn.Module | None = None) -> str:
    """A parameter or module name without wrapper prefixes (``base_model.model.``, ``module.``,
    ``_orig_mod.``), e.g. ``base_model.model.model.layers.0.mlp.up_proj.weight`` ->
    ``model.layers.0.mlp.up_proj.weight``.

    Without ``model`` the prefixes are stripped by name, which is exact for LoRA-style peft models,
    DDP and ``torch.compile``. peft's prompt-learning models (prefix tuning) nest the model under
    ``base_model.`` only; pass ``model`` (or use :meth:`BlockTable.canonical`) to strip exactly
    what that model's wrappers add."""
    if model is None:
        return layout_canonical_name(name)
    for prefix in _wrapper_prefixes(model)[1]:
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


# ----------------------------------------------------------------------------- building tables

def _is_norm_module(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
    # Hugging Face's RMSNorms (LlamaRMSNorm, Qwen3RMSNorm, ...) are plain Modules, named so.
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def _norms(model: nn.Module) -> tuple[str, ...]:
    return tuple(path for path, m in model.named_modules() if path and _is_norm_module(m))


def _has(model: nn.Module, path: str) -> bool:
    try:
        return isinstance(model.get_submodule(path), nn.Module)
    except AttributeError:  # also raised for an attribute that is None (OPT without final norm)
        return False


def _from_layout(model: nn.Module, family: str, layout: Layout) -> BlockTable:
    root = ""
    if not _has(model, layout.blocks):
        # A backbone without its head (LlamaModel, GPT2Model): the same paths one level up.
        root = layout.blocks.split(".", 1)[0] + "."
        if not (layout.blocks.startswith(root) and _has(model, layout.blocks[len(root):])):
            raise ZotuneError(f"model type {family!r} ({type(model).__name__}) has no module "
                              f"{layout.blocks!r}; its block table does not fit this model")

    def at(path):  # the path under this model, or None where the model lacks the module
        if path is None or not path.startswith(root):
            return None
        path = path[len(root):]
        return path if _has(model, path) else None

    container = at(layout.blocks)
    blocks = tuple(f"{container}.{name}" for name, _ in model.get_submodule(container).named_children())
    kv = []
    for block in blocks:
        if layout.fused_qkv is not None:
            d = model.config.hidden_size
            name = f"{block}.{layout.fused_qkv}"
            kv.append((ParamSlice(name, layout.fused_dim, d, 2 * d),
                       ParamSlice(name, layout.fused_dim, 2 * d, 3 * d)))
        elif layout.kv is not None:
            kv.append(tuple(ParamSlice(f"{block}.{rel}") for rel in layout.kv))
    embeddings = tuple(p for p in map(at, layout.embeddings) if p)
    return BlockTable(family, embeddings, blocks, at(layout.final_norm), at(layout.head),
                      tuple(kv), _norms(model))


def block_table(model: nn.Module, *, strict: bool = True) -> BlockTable | None:
    """The block table of ``model`` (wrappers resolved; names canonical), from
    ``model.config.model_type``, or one block per child of an ``nn.Sequential``.

    An unsupported architecture raises a ZotuneError naming its type and the supported families;
    with ``strict=False`` it returns None instead, for callers with a fallback."""
    base = unwrap(model)
    if isinstance(base, nn.Sequential):
        blocks = tuple(name for name, _ in base.named_children())
        return BlockTable("sequential", (), blocks, None, None, (), _norms(base))
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    layout = LAYOUTS.get(model_type)
    if layout is None:
        if not strict:
            return None
        raise ZotuneError(f"no block table for model type {model_type!r} ({type(base).__name__}); "
                          f"supported: {', '.join(LAYOUTS)}, and torch.nn.Sequential")
    return _from_layout(base, model_type, layout)
