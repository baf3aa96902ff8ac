"""Model loading, tiny test models and the choice of trainable parameters (zotune.models)."""
import time

import pytest
import torch

from zotune import models
from zotune.errors import ZotuneError
from zotune.models import load_model, select_trainable, tiny_model, trainable_parameters

FAMILIES = ["llama", "opt", "gpt2", "qwen2"]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_deterministic_without_global_rng(family):
    rng = torch.random.get_rng_state()
    t0 = time.perf_counter()
    a, tok = tiny_model(family, seed=1)
    elapsed = time.perf_counter() - t0
    b, _ = tiny_model(family, seed=1)
    c, _ = tiny_model(family, seed=2)
    assert torch.equal(rng, torch.random.get_rng_state())
    sa, sb, sc = _state(a), _state(b), _state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert a.config.vocab_size == len(tok) and not a.training
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert elapsed < 1.0 or family == FAMILIES[0]  # the first build also imports the family


def test_tiny_tokenizer_verbalizers_are_single_tokens():
    _, tok = tiny_model("gpt2")
    ids = tok("It was great")["input_ids"]
    assert ids[0] == tok.bos_token_id
    for word in (" great", " terrible", " Yes", " No", " True", " False"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1
    assert tok.decode(tok("a b\nc")["input_ids"], skip_special_tokens=True) == "a b\nc"
    assert tiny_model("opt", vocab_size=400)[0].config.vocab_size == 400


@pytest.mark.parametrize("family", FAMILIES)
def test_full_freezes_embeddings_and_lists_tied_weight_once(family):
    model, _ = tiny_model(family)
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    select_trainable(model, "full")
    names = [n for n, _ in trainable_parameters(model)]
    assert not any(id(p) in embeds for _, p in trainable_parameters(model))
    assert not any("embed" in n or n.endswith(("wte.weight", "wpe.weight")) for n in names)
    assert not any("lm_head" in n for n in names)  # tied to the input embedding
    everything = list(dict(model.named_parameters()))
    assert names == [n for n in everything if n in names]  # named_parameters order
    select_trainable(model, "full", train_embeddings=True)
    names = [n for n, _ in trainable_parameters(model)]
    assert names == everything and len(names) == len(set(map(id, model.parameters())))
    assert not any("lm_head" in n for n in names)  # the tied weight appears once


QV = ("q_proj", "v_proj")


@pytest.mark.parametrize("family,targets,count", [("llama", QV, 8), ("opt", QV, 8),
                                                  ("gpt2", ("c_attn",), 4), ("qwen2", QV, 8)])
def test_lora(family, targets, count):
    model, tok = tiny_model(family)
    ids = tok(["It was great"], return_tensors="pt")
    with torch.no_grad():
        before = model(**ids).logits
    rng = torch.random.get_rng_state()
    peft_model = select_trainable(model, "lora", seed=3)
    assert torch.equal(rng, torch.random.get_rng_state())
    params = trainable_parameters(peft_model)
    assert len(params) == count
    assert all(("lora_A" in n or "lora_B" in n) and any(t in n for t in targets) for n, _ in params)
    assert all(any(t in n for n, _ in params) for t in targets)
    shapes = {tuple(p.shape) for n, p in params if "lora_A" in n}
    assert all(s[0] == 8 for s in shapes)
    with torch.no_grad():  # B = 0: LoRA starts at the base model
        assert torch.allclose(peft_model(**ids).logits, before, atol=1e-6)
    again = select_trainable(tiny_model(family)[0], "lora", seed=3)
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(params, trainable_parameters(again)))


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_prefix_runs_with_masks_and_uses_mezo_init(family):
    model, tok = tiny_model(family)
    peft_model = select_trainable(model, "prefix", seed=5)
    [(name, param)] = trainable_parameters(peft_model)
    layers = model.config.num_hidden_layers
    assert param.shape[0] == 5 and param.shape[1] % (2 * layers) == 0
    ids = torch.tensor([[0, 40, 41, 42, 43]])
    random_tokens = torch.randint(0, len(tok), (1, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        with peft_model.disable_adapter():
            want = model(input_ids=torch.cat([random_tokens, ids], 1)).logits[:, 5:]
        # MeZO's init: the prefix holds the real keys/values of 5 random vocabulary tokens.
        assert torch.allclose(got, want, atol=1e-5)
        batch = tok(["a", "a longer prompt"], return_tensors="pt", padding=True)
        out = peft_model(**batch).logits
        assert torch.isfinite(out).all() and out.shape[:2] == batch["input_ids"].shape


def test_pattern_mode():
    model, _ = tiny_model("llama")
    select_trainable(model, "pattern", pattern=r"\.mlp\.")
    names = [n for n, _ in trainable_parameters(model)]
    assert len(names) == 6 and all(".mlp." in n for n in names)
    with pytest.raises(ZotuneError, match="matches no parameter"):
        select_trainable(model, "pattern", pattern="nothing_like_this")
    with pytest.raises(ZotuneError, match="needs a regex"):
        select_trainable(model, "pattern")
    with pytest.raises(ZotuneError, match="invalid trainable pattern"):
        select_trainable(model, "pattern", pattern="(")


def test_unknown_mode_lists_valid_modes():
    model, _ = tiny_model("gpt2")
    with pytest.raises(ZotuneError, match=r"unknown trainable mode 'bitfit'.*full, lora, prefix, pattern"):
        select_trainable(model, "bitfit")
    with pytest.raises(ZotuneError, match="valid: llama, opt, gpt2, qwen2"):
        tiny_model("bert")


def test_unloadable_model_error(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ZotuneError) as err:
        load_model("no-such-org/no-such-model-xyz")
    msg = str(err.value)
    assert "no-such-org/no-such-model-xyz" in msg and "not a local directory" in msg
    assert "unreachable" in msg and "smollm2-135m" in msg and "\n" not in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZotuneError, match="local directory"):
        load_model(str(tmp_path / "empty"))


def test_load_local_directory(tmp_path):
    model, tok = tiny_model("llama", seed=4)
    tok.pad_token = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_model(str(tmp_path))
    assert not loaded.training and ltok.padding_side == "left" and ltok.pad_token is not None
    ids = torch.tensor([[0, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path / "z"))
    assert models.cache_dir() == tmp_path / "z"
    monkeypatch.delenv("ZOTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x" / "zotune"


@pytest.mark.slow
def test_embedded_model_cache_matches_gguf(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path))
    gguf_model, gguf_tok = models._load_embedded_gguf("smollm2-135m")
    model, tok = load_model()  # converts (GGUF -> safetensors) into the empty cache
    assert (tmp_path / "models" / "smollm2-135m" / "model.safetensors").is_file()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]
    t0 = time.perf_counter()
    cached, cached_tok = load_model()
    assert time.perf_counter() - t0 < 10
    text = "The capital of France is"
    ids = gguf_tok(text, return_tensors="pt")["input_ids"]
    assert torch.equal(cached_tok(text, return_tensors="pt")["input_ids"], ids)
    with torch.no_grad():
        want = gguf_model.eval()(ids).logits
        assert torch.equal(model(ids).logits, want) and torch.equal(cached(ids).logits, want)
    assert cached.lm_head.weight is cached.get_input_embeddings().weight
    assert cached_tok.padding_side == "left" and cached_tok.pad_token is not None
