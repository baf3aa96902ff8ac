"""Models: loading causal LMs (any Hugging Face model, the embedded SmolLM2-135M, tiny test models),
choosing which parameters a zeroth-order run perturbs (full, LoRA, prefix, name pattern), and block
tables that describe an architecture as a small table of module paths.

- :mod:`.loading`: :func:`load_model`, the embedded GGUF cache, :func:`tiny_model`.
- :mod:`.trainable`: :func:`select_trainable`, :func:`trainable_parameters`, peft wrappers.
- :mod:`.blocks`: :func:`block_table`, :class:`BlockTable`, :func:`canonical_name`.
"""
from .blocks import (
    LAYOUTS,
    BlockTable,
    Layout,
    ParamSlice,
    block_table,
    canonical_name,
    unwrap,
)
from .loading import (
    EMBEDDED,
    TINY_FAMILIES,
    _embedded_cache,
    _embedded_gguf,
    _first_line,
    _hub_reachable,
    _load_embedded_gguf,
    _prepare,
    cache_dir,
    load_model,
    tiny_model,
    tiny_tokenizer,
)
from .trainable import LORA_TARGETS, MODES, select_trainable, trainable_parameters

__all__ = [
    "EMBEDDED", "LAYOUTS", "LORA_TARGETS", "MODES", "TINY_FAMILIES", "BlockTable", "Layout",
    "ParamSlice", "block_table", "cache_dir", "canonical_name", "load_model", "select_trainable",
    "tiny_model", "tiny_tokenizer", "trainable_parameters", "unwrap",
]
