"""Batched probe evaluation (engines/batched.py) against the in-memory engine's sequential points.

The batched engine computes each point's weights as base + a z directly (the in-memory engine moves
in place from point to point), so the two agree within round-off, not bitwise: losses within
rtol 1e-5 and parameters within atol 1e-5 in fp32 after four steps (a ZO step multiplies a loss's
round-off by lr / eps, and the steps compound it), and within 1e-10 / 1e-12 in float64.
Tiny 2-block models; every test runs in well under a second."""
from __future__ import annotations

import pytest
import torch

from zotune.engines import BatchedEngine
from zotune.engines.base import MicroBatches
from zotune.engines.streaming import OpaqueObjective
from zotune.errors import ZotuneError
from zotune.models import select_trainable, tiny_model
from zotune.objectives import CandidateScorer
from zotune.optim import ZOOptimizer
from zotune.tasks.base import Example

EXAMPLES = [Example(prompt="It was the movie" + " the" * (i % 4), candidates=(" great", " terrible"),
                    label=i % 2) for i in range(8)]


def train(engine, *, family="llama", method="fzoo-code", steps=4, dtype=torch.float32, lora=False,
          micro=False, tied=True, **options):
    model, tok = tiny_model(family, seed=3, tie_word_embeddings=tied)
    model = model.to(dtype)
    if lora:
        model = select_trainable(model, "lora", seed=0)
    model.eval()
    scorer = CandidateScorer(model, tok, max_length=64)
    lr = 1e-4 if method == "fzoo" else 1e-2  # the paper's form carries 1/eps: the same step as fzoo-code
    opt = ZOOptimizer(model, lr=lr, eps=1e-2, method=method, engine=engine, seed=5, **options)

    def objective(s):
        b = EXAMPLES[s % 4: s % 4 + 4]
        if micro:
            return MicroBatches([lambda: scorer.classification_loss(b[:2]), lambda: scorer.classification_loss(b[2:])])
        return lambda: scorer.classification_loss(b)

    losses = [float(opt.step(objective(s))) for s in range(steps)]
    opt.flush()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, opt


def close(a, b, rtol, atol):
    assert a[0] == pytest.approx(b[0], rel=rtol)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=0, atol=atol)


@pytest.mark.parametrize("method,options", [("fzoo-code", {}), ("fzoo", {"num_probes": 4}), ("mezo", {}),
                                            ("mezo", {"num_probes": 3}), ("pezo", {})])
def test_batched_equals_sequential_within_round_off(method, options):
    ref = train("in-memory", method=method, **options)
    got = train("batched", method=method, **options)
    close(got, ref, rtol=1e-5, atol=1e-5)


def test_float64_agrees_to_1e10():
    close(train("batched", dtype=torch.float64), train("in-memory", dtype=torch.float64), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family,tied", [("gpt2", True), ("opt", False), ("qwen3", True)])
def test_families(family, tied):
    close(train("batched", family=family, tied=tied), train("in-memory", family=family, tied=tied),
          rtol=1e-5, atol=1e-5)


def test_lora_micro_batches_and_groups_of_points():
    ref = train("in-memory", lora=True, micro=True)
    got = train("batched", lora=True, micro=True)
    close(got, ref, rtol=1e-5, atol=1e-5)
    grouped = train("batched", lora=True, micro=True, points_per_forward=2)
    close(grouped, got, rtol=1e-6, atol=1e-7)


def test_memory_and_draws():
    _, _, opt = train("batched", steps=1, points_per_forward=4)
    trainable = sum(t.param.numel() * t.param.element_size() for t in opt.engine.tensors if t.role == "zo")
    assert opt.engine.stack_bytes == 1 * trainable  # the last group of 9 points in groups of 4: 1 point
    _, _, opt = train("batched", steps=1)
    assert opt.engine.stack_bytes == 9 * trainable
    _, _, seq = train("in-memory", steps=1)
    # batched: the 8 keys drawn once to build the stacks and once for the update, 2N = 16 draws;
    # sequential: 1 + 2 (N - 1) moving between probes, N for the update (the last restore fused): 3N - 1
    assert opt.engine.numbers_drawn / seq.engine.numbers_drawn == pytest.approx(16 / 23, rel=1e-12)


def test_bf16_master_weights_give_the_same_perturbed_weights():
    ref = train("in-memory", dtype=torch.bfloat16, steps=2, low_precision_probes="keep")
    got = train("batched", dtype=torch.bfloat16, steps=2, low_precision_probes="keep")
    assert got[0] == pytest.approx(ref[0], rel=1e-2)
    for name in ref[1]:
        torch.testing.assert_close(got[1][name].float(), ref[1][name].float(), rtol=0, atol=1e-2)


def test_errors():
    model, tok = tiny_model("llama", seed=3)
    with pytest.raises(ZotuneError, match="needs the model"):
        BatchedEngine([(n, p, 0, True) for n, p in model.named_parameters()], None)
    with pytest.raises(ZotuneError, match="points_per_forward must be an integer >= 1"):
        ZOOptimizer(model, engine="batched", points_per_forward=0)
    with pytest.raises(ValueError, match="points_per_forward apply to engine='batched' only, not 'in-memory'"):
        ZOOptimizer(model, engine="in-memory", points_per_forward=2)
    opt = ZOOptimizer(model, lr=1e-2, method="fzoo-code", engine="batched")
    with pytest.raises(OpaqueObjective):
        opt.step(lambda: 1.0)  # no model call through a ModelRunner
    scorer = CandidateScorer(model, tok, max_length=64)
    opt = ZOOptimizer(model, lr=1e-2, method="mezo", engine="batched", bp_layers=1)
    with pytest.raises(ZotuneError, match="without autograd"):
        opt.step(lambda: scorer.classification_loss(EXAMPLES[:2], ))


def test_a_model_in_train_mode_is_refused_with_the_remedy():
    model, tok = tiny_model("llama", seed=3, attention_dropout=0.1)
    model.train()
    scorer = CandidateScorer(model, tok, max_length=64)
    opt = ZOOptimizer(model, lr=1e-2, method="fzoo-code", engine="batched")
    with pytest.raises(ZotuneError, match="eval mode"):
        opt.step(lambda: scorer.classification_loss(EXAMPLES[:2]))
