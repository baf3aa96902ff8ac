"""Reward oracles on generated text, and alignment from rankings on a tiny model.

The alignment test is the fast stand-in for ``benchmarks/ranksgd_llm.py`` (SmolLM2): a random
2-layer Llama with LoRA (r=2) on its output head, 12 rounds of m=6 sampled completions ranked by
a length rule (ASCII letters per completion), where the reward must rise well above its start.
"""
from __future__ import annotations

import pytest
import torch

import zotune
from zotune.errors import ZotuneError
from zotune.ranking.align import align, evaluate
from zotune.ranking.models import load_lm
from zotune.ranking.reward import HFRewardModel, RewardOracle, score_texts, top_k
from zotune.ranking.text import Completer

PROMPTS = ["The movie was", "It was the", "Yes", "the movie"]


def letters(text: str) -> float:
    """The length rule: how many ASCII letters the completion has."""
    return float(sum(c.isascii() and c.isalpha() for c in text))


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A tiny random Llama sequence classifier (2 labels) with the tiny tokenizer, saved."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from zotune.models import tiny_tokenizer

    path = tmp_path_factory.mktemp("reward-model")
    tok = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=2,
                         id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
                         pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_top_k_orders_by_highest_reward_ties_by_index():
    assert top_k([1.0, 3.0, 2.0, 3.0], 3) == [1, 3, 2]
    assert top_k([float("nan"), 0.0, -1.0], 2) == [1, 2]


def test_hf_reward_model_scores_the_chosen_logit(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = ["great movie", "terrible", "it was the good one"]
    scorer = HFRewardModel(reward_model_dir, batch_size=2)  # default: the last label, POSITIVE
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(reward_model_dir)
    with torch.no_grad():
        expected = [model(**tok([t], return_tensors="pt")).logits[0].tolist() for t in texts]
    assert scorer.score(texts) == pytest.approx([e[1] for e in expected], abs=1e-5)
    negative = HFRewardModel(reward_model_dir, label="negative")
    assert negative(texts) == pytest.approx([e[0] for e in expected], abs=1e-5)
    with pytest.raises(ZotuneError, match="not one of the model's labels: NEGATIVE, POSITIVE"):
        HFRewardModel(reward_model_dir, label="neutral")
    with pytest.raises(ZotuneError, match="not a local model directory"):
        HFRewardModel(reward_model_dir / "missing")


def test_reward_oracle_ranks_the_candidates_by_their_completions(reward_model_dir):
    model, tok = load_lm("tiny-llama", trainable="lora", lora_r=2, lora_targets=["lm_head"], seed=0)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = zotune.RankSGD(params, lr=0.3, mu=0.3, m=5, k=3, seed=1)
    complete = Completer(model, tok, max_new_tokens=6, temperature=1.0)
    for reward in (letters, HFRewardModel(reward_model_dir)):
        oracle = RewardOracle(reward, complete, PROMPTS[:2], k=3, seed=lambda r: 11)
        query = opt.ask()
        ranking = oracle(query)
        # Independently: each candidate's completions and their mean reward, by hand.
        means = []
        for i in range(len(query)):
            with query.at(i):
                texts = complete(PROMPTS[:2], 11)
            assert texts == oracle.last_texts[i]
            means.append(sum(score_texts(reward, texts)) / 2)
        assert oracle.last_rewards == pytest.approx(means)
        assert list(ranking) == top_k(means, 3)
        assert len(set(oracle.last_rewards)) > 1  # the candidates do differ
    opt.tell(ranking=ranking)
    # As an oracle of opt.step: a line-search step asks a gradient round (top 3), then a search
    # round (the best one of the step sizes and x); the oracle answers both.
    searching = zotune.RankSGD(params, lr=0.3, mu=0.3, m=5, k=3, seed=1, mode="line-search", line_search=2)
    oracle = RewardOracle(letters, complete, PROMPTS[:1], k=3)
    searching.step(oracle)
    assert searching.rounds == 2 and oracle.round == 2 and len(oracle.last_rewards) == 3


def test_alignment_from_rankings_raises_the_reward():
    model, tok = load_lm("tiny-llama", trainable="lora", lora_r=2, lora_targets=["lm_head"], seed=0)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = zotune.RankSGD(params, lr=0.3, mu=0.2, m=6, k=3, seed=0)
    complete = Completer(model, tok, max_new_tokens=8, temperature=1.0)
    torch.set_num_threads(1)
    result = align(opt, complete, letters, PROMPTS, rounds=12, k=3, prompts_per_round=4,
                   eval_samples=2, eval_every=6, seed=0)
    start, *_, end = result.rewards
    assert [row["round"] for row in result.rows] == [0, 6, 12]
    # Random weights write ~1 letter per token; the rule is learnt fast (longest letter tokens).
    assert end > 3 * start, result.rows
    assert evaluate(complete, letters, PROMPTS, [123])[0] > 2 * start


def test_steering_vector_adds_a_fixed_subspace_to_one_layer():
    import copy

    from zotune.ranking.models import steering_vector

    model, tok = load_lm("tiny-llama", trainable="full", seed=0)
    ids = tok(["hello there"], return_tensors="pt")
    seen = []  # layer 0's output as the next layer gets it (a hook after the steering one)
    with torch.no_grad():
        plain = model(**ids)
        z = steering_vector(model, 0, dim=3)
        model.model.layers[0].register_forward_hook(
            lambda _m, _i, out: seen.append((out[0] if isinstance(out, tuple) else out).clone()))
        at_zero = model(**ids)
        assert torch.equal(at_zero.logits, plain.logits)  # z = 0 changes nothing
        z.copy_(torch.tensor([1.0, -2.0, 0.5]))
        moved = model(**ids)
    shift = seen[1] - seen[0]
    width = model.config.hidden_size
    assert torch.allclose(shift, shift[0, :1].expand_as(shift), atol=1e-5)  # the same vector at every token
    assert float(shift[0, 0].norm()) == pytest.approx(float(z.norm()), rel=1e-4)  # orthonormal basis
    assert not torch.equal(moved.logits, plain.logits)
    # A copy's own vector replaces the copied hook: two runs from one start stay independent.
    twin = copy.deepcopy(model)
    z2 = steering_vector(twin, 0, dim=3)
    with torch.no_grad():
        assert torch.allclose(twin(**ids).logits, plain.logits, atol=1e-6)
        z2.copy_(z)
        assert torch.allclose(twin(**ids).logits, moved.logits, atol=1e-6)  # the same basis
    steering = [h for h in twin.model.layers[0]._forward_hooks.values() if getattr(h, "zotune_steering", False)]
    assert len(steering) == 1 and width > 3
    with pytest.raises(ZotuneError, match="steering layer must be in 0..1, got 5"):
        steering_vector(model, 5)
    opt = zotune.RankSGD([z], lr=0.1, mu=0.1, m=4, seed=0)  # a plain tensor: trained as is
    opt.step(lambda: float(model(**ids).logits[0, -1, 0]))
    assert not torch.equal(z, torch.tensor([1.0, -2.0, 0.5]))
