"""An offload evaluation stopped by an exception part-way (Ctrl-C inside block k's forward, in
the embeddings, or in the loss code) continues bitwise: asked again in the same process, or
after a checkpoint loaded into a fresh model and engine (engines/partial.py). The disk tier is
left consistent: every block file whole, the block the stop landed in written back."""
from __future__ import annotations

import json

import pytest
import torch

from test_offload import batch, train
from zotune.engines import streaming
from zotune.models import tiny_model
from zotune.objectives import CandidateScorer
from zotune.optim import ZOOptimizer

STEPS, STOP_AT = 5, 3


class Stop:
    """Raises KeyboardInterrupt at the ``n``-th call of ``target`` during step STOP_AT."""

    def __init__(self, monkeypatch, where: str, n: int) -> None:
        self.where, self.n, self.calls, self.armed = where, n, 0, False
        if where in ("block", "pre", "post"):
            name = {"block": "run_block", "pre": "run_pre", "post": "run_post"}[where]
            real = getattr(streaming, name)

            def stopping(*args, **kwargs):
                self.tick()
                return real(*args, **kwargs)
            monkeypatch.setattr(streaming, name, stopping)

    def tick(self) -> None:
        if self.armed:
            self.calls += 1
            if self.calls == self.n:
                self.armed = False
                raise KeyboardInterrupt


def options(tier, tmp_path, name):
    return {"offload_to": tier, **({"offload_dir": tmp_path / name} if tier == "disk" else {})}


def interrupted(monkeypatch, tmp_path, tier, tied, where, n, *, checkpoint, **extra):
    stop = Stop(monkeypatch, where, n)
    model, tok = tiny_model("llama", seed=3, tie_word_embeddings=tied)
    scorer = CandidateScorer(model, tok, max_length=64)
    opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, engine="offload", defer_update=True, seed=5,
                      **options(tier, tmp_path, "a"), **extra)

    def loss(s):
        def f():
            if where == "loss":
                stop.tick()
            return scorer.classification_loss(batch(s))
        return f

    losses = [opt.step(loss(s)) for s in range(STOP_AT)]
    stop.armed = True
    with pytest.raises(KeyboardInterrupt):
        opt.step(loss(STOP_AT))
    assert stop.calls == n and opt.steps_taken == STOP_AT
    if tier == "disk":
        check_tier(opt.engine)
    if checkpoint:  # a fresh process: the parameters from the checkpoint, the engine state loaded
        state = opt.state_dict()
        saved = {k: p.detach().clone() for k, p in model.named_parameters()}
        opt.engine.close()
        model, tok = tiny_model("llama", seed=3, tie_word_embeddings=tied)
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(saved[k])
        scorer = CandidateScorer(model, tok, max_length=64)
        opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, engine="offload", defer_update=True, seed=5,
                          **options(tier, tmp_path, "b"), **extra)
        opt.load_state_dict(state)
    losses += [opt.step(loss(s)) for s in range(STOP_AT, STEPS)]
    opt.flush()
    return losses, {k: p.detach().clone() for k, p in model.named_parameters()}


def check_tier(engine) -> None:
    from safetensors import safe_open

    assert not list(engine.tier.dir.glob("*.tmp"))
    for j in range(engine.table.num_blocks):  # every file whole, written after the block's last move
        with safe_open(str(engine.tier.path(j)), "pt") as st:
            assert st.get_tensor("flat").numel() == engine._blocks[j].numel
            assert json.loads(st.metadata()["names"]) == engine._blocks[j].names
            assert st.metadata()["moves"] == str(engine._block_units[j].done)


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("where,n", [("block", 3), ("block", 2), ("pre", 2), ("post", 1), ("loss", 3)])
def test_a_stopped_evaluation_continues_bitwise(monkeypatch, tmp_path, tier, tied, checkpoint, where, n):
    whole = train("offload", steps=STEPS, tied=tied, **options(tier, tmp_path, "whole"))
    got = interrupted(monkeypatch, tmp_path, tier, tied, where, n, checkpoint=checkpoint)
    assert whole[0] == got[0]
    assert all(torch.equal(whole[1][k], got[1][k]) for k in whole[1])


@pytest.mark.parametrize("storage", [None, "bf16"])
def test_a_stopped_evaluation_continues_bitwise_with_masters(monkeypatch, tmp_path, storage):
    extra = {"transfer_dtype": "bf16", "storage_dtype": storage, "low_precision_probes": "keep"}
    whole = train("offload", steps=STEPS, **options("disk", tmp_path, "whole"), **extra)
    got = interrupted(monkeypatch, tmp_path, "disk", True, "block", 3, checkpoint=True, **extra)
    assert whole[0] == got[0]
    assert all(torch.equal(whole[1][k], got[1][k]) for k in whole[1])


def test_flush_after_a_stop_redoes_the_evaluation_correctly(monkeypatch, tmp_path):
    """After a stop, anything that moves every block (flush) drops the partial evaluation: the
    step is then evaluated again from its first point (correct, rounded differently)."""
    stop = Stop(monkeypatch, "block", 3)
    model, tok = tiny_model("llama", seed=3)
    scorer = CandidateScorer(model, tok, max_length=64)
    opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, engine="offload", seed=5)
    opt.step(lambda: scorer.classification_loss(batch(0)))
    stop.armed = True
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: scorer.classification_loss(batch(1)))
    opt.flush()
    assert opt.engine.partial is None and opt.engine.current == ()
    loss = opt.step(lambda: scorer.classification_loss(batch(1)))
    whole = train("offload", steps=2, offload_to="cpu")
    assert abs(loss - whole[0][1]) < 1e-5
