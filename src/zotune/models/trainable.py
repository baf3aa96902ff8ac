"""Choose which parameters a zeroth-order run perturbs: full, LoRA, prefix, or a name pattern.

The choice follows MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward
Passes", section 1.7 of research/mezo_zobench.md): full fine-tuning leaves token and position
embeddings frozen; LoRA is r=8, alpha=16 on q/v projections; prefix tuning uses 5 virtual tokens
initialised from the real keys and values of random vocabulary tokens.

Cost: ``full`` and ``pattern`` only flip ``requires_grad``; ``lora`` and ``prefix`` wrap the model
with peft (prefix also runs one forward pass of the frozen model on 5 tokens).
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from zotune.errors import ZotuneError

from .loading import _first_line

MODES = ("full", "lora", "prefix", "pattern")
# MeZO's LoRA targets (q and v projections); other architectures fall back to peft's defaults.
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
                "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
                "mistral": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters with ``requires_grad``, in ``named_parameters`` order, tied ones listed once."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def select_trainable(model: nn.Module, mode: str = "full", *, pattern: str | None = None,
                     train_embeddings: bool = False, lora_r: int = 8, lora_alpha: int = 16,
                     lora_targets: list[str] | None = None, prefix_tokens: int = 5,
                     seed: int = 0) -> nn.Module:
    """Mark the parameters a ZO run perturbs and return the (possibly PEFT-wrapped) model.

    Modes (MeZO §1.7): ``full`` = all but token/position embeddings (tied output embeddings are
    therefore frozen too; ``train_embeddings=True`` includes them); ``lora`` = peft LoRA with rank
    ``lora_r``, scale ``lora_alpha / lora_r``, no dropout, B = 0 and A ~ Kaiming-uniform drawn from
    ``seed``; ``prefix`` = peft prefix tuning with ``prefix_tokens`` virtual tokens per layer,
    initialised as in MeZO from the keys and values the frozen model computes for random
    vocabulary tokens (drawn from ``seed``); ``pattern`` = parameters whose name matches the regex
    ``pattern`` (``re.search``). The global RNG is left unchanged.
    """
    if mode not in MODES:
        raise ZotuneError(f"unknown trainable mode {mode!r}; valid modes: {', '.join(MODES)}")
    if mode == "full":
        frozen = set()
        if not train_embeddings:
            frozen = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        for param in model.parameters():
            param.requires_grad_(id(param) not in frozen)
        return model
    if mode == "pattern":
        if not pattern:
            raise ZotuneError("trainable mode 'pattern' needs a regex: pattern=...")
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ZotuneError(f"invalid trainable pattern {pattern!r}: {exc}") from exc
        for name, param in model.named_parameters(remove_duplicate=False):
            param.requires_grad_(False)
        for name, param in model.named_parameters(remove_duplicate=False):
            if regex.search(name):
                param.requires_grad_(True)
        if not trainable_parameters(model):
            raise ZotuneError(f"trainable pattern {pattern!r} matches no parameter name "
                              f"(e.g. {next(iter(dict(model.named_parameters())))!r})")
        return model
    return _peft(model, mode, lora_r=lora_r, lora_alpha=lora_alpha, lora_targets=lora_targets,
                 prefix_tokens=prefix_tokens, seed=seed)


def _peft(model, mode, *, lora_r, lora_alpha, lora_targets, prefix_tokens, seed):
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    model_type = getattr(model.config, "model_type", "")
    if mode == "lora":
        targets = lora_targets or LORA_TARGETS.get(model_type)
        config = LoraConfig(task_type="CAUSAL_LM", r=lora_r, lora_alpha=lora_alpha,
                            lora_dropout=0.0, target_modules=targets,
                            fan_in_fan_out=model_type == "gpt2")  # GPT-2's Conv1D stores W^T
    else:
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_tokens)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    # peft initialises adapters from the global RNG; fork_rng puts it back, and the random parts
    # are redrawn below from an explicit generator so the result depends on `seed` only.
    with torch.random.fork_rng(devices=devices):
        try:
            peft_model = get_peft_model(model, config)
        except (ValueError, TypeError, KeyError) as exc:
            raise ZotuneError(f"cannot apply {mode} to model type {model_type!r}: "
                              f"{_first_line(exc)}; set lora_targets=[...]") from exc
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if mode == "lora":
            for name, param in peft_model.named_parameters():
                if "lora_A" in name:  # nn.Linear's default: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
                    bound = 1.0 / math.sqrt(param.shape[1])
                    param.copy_((torch.rand(param.shape, generator=gen) * 2 - 1) * bound)
        else:
            _init_prefix(peft_model, prefix_tokens, gen)
    return peft_model


def _init_prefix(peft_model, num_tokens: int, gen: torch.Generator) -> None:
    """MeZO's prefix init: the frozen model's own keys/values for random vocabulary tokens.

    peft stores the prefix as one [tokens, layers * 2 * kv_heads * head_dim] embedding that it views
    as [tokens, layers * 2, kv_heads, head_dim] (key of layer l at 2l, value at 2l + 1).
    """
    base = peft_model.get_base_model()
    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight
    vocab = base.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, num_tokens), generator=gen).to(embedding.device)
    with peft_model.disable_adapter():
        cache = base(input_ids=ids, use_cache=True).past_key_values
    keys_values = []
    for layer in range(len(cache)):
        key, value = _cache_layer(cache, layer)
        keys_values += [key[0].transpose(0, 1), value[0].transpose(0, 1)]  # [tokens, heads, dim]
    stacked = torch.stack(keys_values, dim=1)  # [tokens, layers*2, kv_heads, head_dim]
    embedding.copy_(stacked.reshape(embedding.shape).to(embedding.dtype))


def _cache_layer(cache, layer: int):
    if hasattr(cache, "layers"):  # transformers >= 4.56 Cache objects
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache[layer][0], cache[layer][1]
