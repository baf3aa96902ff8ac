"""The language model a text ranking session (or an alignment run) moves.

``name`` is anything :func:`zotune.models.load_model` takes (``smollm2-135m``, a local directory,
a Hub id), or ``tiny-<family>`` (``tiny-llama``, ``tiny-gpt2``, ...): a 2-layer random model with
the tiny byte-level tokenizer, for trying the page and for tests (its completions are noise).
By default only LoRA adapters are trainable (r=8, alpha=2r, MeZO's q/v targets), so a round
perturbs ~0.1% of the weights and renders quickly; ``trainable="full"`` moves every weight but
the embeddings. :func:`steering_vector` adds the smallest parametrisation: a vector in a fixed
random subspace of the residual stream (what a ranking loop of tens of rounds can move).
"""
from __future__ import annotations

import torch

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


def steering_vector(model, layer: int, dim: int = 16, *, basis_seed: int = 0x57EE7) -> torch.Tensor:
    r"""Make a steering vector the trainable parameters of ``model``: returns z (zeros, ``dim``),
    and every forward adds :math:`U z` to the output of decoder layer ``layer``, with U a fixed
    random orthonormal ``hidden_size x dim`` basis (from ``basis_seed``, so every run and copy
    shares it): :math:`h \leftarrow h + U z`. Train z with ``RankSGD([z], ...)``.

    Why: a ZO step from m ranked candidates learns about m directions of the d trainable
    coordinates, so the rounds a ranking loop can afford (tens) move few coordinates well; d =
    ``dim`` (16) instead of LoRA's hundreds or thousands (the intrinsic-dimension idea,
    Aghajanyan et al., 2021, with a fixed basis; the measurement is in docs/benchmarks.md).
    Earlier steering hooks of ``model`` (e.g. of the model a copy was made from) are removed.
    Cost: one matrix-vector product per forward."""
    layers = next((m.layers for m in model.modules()
                   if isinstance(getattr(m, "layers", None), torch.nn.ModuleList)), None)
    if layers is None:
        raise ZotuneError(f"{type(model).__name__} has no decoder layers (a .layers ModuleList) to steer")
    if not 0 <= layer < len(layers):
        raise ZotuneError(f"steering layer must be in 0..{len(layers) - 1}, got {layer}")
    for module in layers:
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "zotune_steering", False):
                del module._forward_hooks[key]
    width = model.config.hidden_size
    if not 1 <= dim <= width:
        raise ZotuneError(f"steering dim must be in 1..{width} (the hidden size), got {dim}")
    g = torch.Generator().manual_seed(basis_seed)
    basis = torch.linalg.qr(torch.randn(width, dim, generator=g, dtype=torch.float64))[0].float()
    z = torch.zeros(dim)

    def add(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + (basis @ z).to(hidden.device, hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    add.zotune_steering = True
    layers[layer].register_forward_hook(add)
    return z
