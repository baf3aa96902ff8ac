"""The language model a text ranking session (or an alignment run) moves.

``name`` is anything :func:`zotune.models.load_model` takes (``smollm2-135m``, a local directory,
a Hub id), or ``tiny-<family>`` (``tiny-llama``, ``tiny-gpt2``, ...): a 2-layer random model with
the tiny byte-level tokenizer, for trying the page and for tests (its completions are noise).
By default only LoRA adapters are trainable (r=8, alpha=2r, MeZO's q/v targets), so a round
perturbs ~0.1% of the weights and renders quickly; ``trainable="full"`` moves every weight but
the embeddings.
"""
from __future__ import annotations

from zotune.errors import ZotuneError

TRAINABLE = ("lora", "full")


def load_lm(name: str, *, trainable: str = "lora", lora_r: int = 8, seed: int = 0,
            lora_targets: list[str] | None = None):
    """``(model, tokenizer)`` with ``trainable`` parameters marked (see the module docstring)."""
    from zotune.models import TINY_FAMILIES, load_model, select_trainable, tiny_model

    if trainable not in TRAINABLE:
        raise ZotuneError(f"unknown trainable {trainable!r}; valid: {', '.join(TRAINABLE)}")
    if name.lower().startswith("tiny-"):
        family = name.lower()[len("tiny-"):]
        if family not in TINY_FAMILIES:
            raise ZotuneError(f"unknown tiny model {name!r}; valid: "
                              + ", ".join(f"tiny-{f}" for f in TINY_FAMILIES))
        model, tokenizer = tiny_model(family, seed=seed)
    else:
        model, tokenizer = load_model(name)
    if trainable == "lora":
        model = select_trainable(model, "lora", lora_r=lora_r, lora_alpha=2 * lora_r,
                                 lora_targets=lora_targets, seed=seed)
    else:
        model = select_trainable(model, "full")
    return model.eval(), tokenizer
