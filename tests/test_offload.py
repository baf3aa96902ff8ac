"""The offload engine (engines/offload.py) against the in-memory engine: bitwise on CPU in fp32.

Every test trains tiny models (2 blocks, d=32) for a few steps through zotune's objectives (the
candidate scorer), once per engine, and compares the losses and every parameter with
``torch.equal``. Nothing here needs a GPU (the CUDA path: tests/test_offload_slots.py).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from zotune.engines import ENGINES
from zotune.engines.offload import OffloadEngine, throughput
from zotune.engines.streaming import OpaqueObjective
from zotune.engines.tiers import OffloadError
from zotune.errors import ZotuneError
from zotune.models import tiny_model
from zotune.objectives import CandidateScorer
from zotune.optim import ZOOptimizer
from zotune.tasks.base import Example

EXAMPLES = [Example(prompt="It was the movie" + " the" * (i % 4), candidates=(" great", " terrible"),
                    label=i % 2) for i in range(8)]


def batch(step: int) -> list[Example]:
    return EXAMPLES[step % 4: step % 4 + 4]


def train(engine: str, *, family="llama", steps=10, tied=True, defer=True, method="mezo",
          objective="classification", model=None, opt_state=None, start=0, **options):
    """``steps`` steps from step ``start``; returns (losses, parameters, optimizer)."""
    if model is None:
        model, tok = tiny_model(family, seed=3, tie_word_embeddings=tied)
    else:
        model, tok = model
    scorer = CandidateScorer(model, tok, max_length=64)
    loss_of = scorer.classification_loss if objective == "classification" else scorer.answer_loss
    opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, method=method, engine=engine, defer_update=defer,
                      seed=5, **options)
    opt.search_closures = lambda step, j: (lambda: loss_of(EXAMPLES[:3]))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    losses = [opt.step(lambda b=batch(s): loss_of(b)) for s in range(start, start + steps)]
    opt.flush()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, opt


def same(a, b) -> bool:
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][n], b[1][n]) for n in a[1])


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "qwen3"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("defer", [True, False])
def test_cpu_tier_equals_in_memory_bitwise(family, tied, defer):
    ref = train("in-memory", family=family, tied=tied, defer=defer)
    got = train("offload", family=family, tied=tied, defer=defer, offload_to="cpu")
    assert same(ref, got)
    assert got[2].engine.numbers_drawn == ref[2].engine.numbers_drawn  # the same moves
    assert got[2].engine.lookup_numbers_drawn == 0  # host memory: a tied head is copied per point


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("overlap", [True, False])
def test_disk_tier_equals_cpu_tier_and_overlap_equals_serial(tmp_path, tied, overlap):
    cpu = train("offload", tied=tied, steps=6, offload_to="cpu")
    disk = train("offload", tied=tied, steps=6, offload_to="disk", offload_dir=tmp_path, overlap=overlap)
    assert same(cpu, disk)
    # disk tier: a tied head's rows for the pre pass come from chunk copies, not a matrix copy
    assert (disk[2].engine.lookup_numbers_drawn > 0) == tied and not disk[2].engine._copies
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block-00000.safetensors", "block-00001.safetensors"]
    timing = disk[2].engine.timing
    assert all(t > 0 for t in timing.load) and all(t > 0 for t in timing.store)


def test_resident_blocks_and_micro_batches(tmp_path):
    def run(engine, **options):
        m, t = tiny_model("opt", seed=3)
        s = CandidateScorer(m, t, max_length=64)
        opt = ZOOptimizer(m, lr=1e-2, eps=1e-2, engine=engine, seed=1, num_probes=2, **options)
        parts = [lambda: s.classification_loss(EXAMPLES[:3]), lambda: s.answer_loss(EXAMPLES[3:6])]
        losses = [opt.step(parts) for _ in range(4)]
        opt.flush()
        return losses, {n: p.detach().clone() for n, p in m.named_parameters()}

    ref = run("in-memory")
    assert same(ref, run("offload", offload_to="disk", offload_dir=tmp_path, resident_blocks=1))
    assert [p.name for p in tmp_path.iterdir()] == ["block-00001.safetensors"]


@pytest.mark.parametrize("method", ["kerzoo", "kerzoo-code", "pezo", "fzoo", "zo-adam", "zo-cons"])
def test_methods_work_unchanged(method):
    ref = train("in-memory", method=method, steps=4)
    assert same(ref, train("offload", method=method, steps=4, offload_to="cpu"))


def test_dizo_projection_reads_and_writes_blocks_through_the_engine(tmp_path):
    options = dict(method="dizo", steps=4, projection={"interval": 2, "iterations": 2})
    ref = train("in-memory", **options)
    assert same(ref, train("offload", offload_to="disk", offload_dir=tmp_path, **options))


def test_n_spsa_with_answer_loss_on_gpt2():
    ref = train("in-memory", family="gpt2", num_probes=3, objective="answer", steps=5)
    assert same(ref, train("offload", family="gpt2", num_probes=3, objective="answer", steps=5,
                           offload_to="cpu"))


def test_flush_applies_the_held_update_and_evaluation_sees_the_in_memory_parameters(tmp_path):
    results = {}
    for engine, options in (("in-memory", {}), ("offload", {"offload_to": "disk", "offload_dir": tmp_path})):
        model, tok = tiny_model("llama", seed=3)
        scorer = CandidateScorer(model, tok, max_length=64)
        opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, engine=engine, defer_update=True, seed=5, **options)
        for s in range(3):
            opt.step(lambda b=batch(s): scorer.classification_loss(b))
        # a plain forward between steps (evaluation) sees what the in-memory engine holds
        with torch.no_grad():
            perturbed = scorer.scores(EXAMPLES)
        assert opt.engine.pending is not None
        opt.flush()
        assert opt.engine.pending is None and opt.engine.current == ()
        with torch.no_grad():
            flushed = scorer.scores(EXAMPLES)
        results[engine] = perturbed, flushed, {n: p.detach().clone() for n, p in model.named_parameters()}
    (p_ref, f_ref, w_ref), (p_off, f_off, w_off) = results["in-memory"], results["offload"]
    assert torch.equal(p_ref, p_off) and torch.equal(f_ref, f_off)
    assert not torch.equal(p_off, f_off)  # the flush moved the parameters: no update is lost
    assert all(torch.equal(w_ref[n], w_off[n]) for n in w_ref)


@pytest.mark.parametrize("flush", [True, False])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path, flush):
    whole = train("offload", steps=8, offload_to="disk", offload_dir=tmp_path / "a")
    model, tok = tiny_model("llama", seed=3)
    scorer = CandidateScorer(model, tok, max_length=64)
    opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, engine="offload", seed=5, defer_update=True,
                      offload_to="disk", offload_dir=tmp_path / "b")
    for s in range(4):
        opt.step(lambda b=batch(s): scorer.classification_loss(b))
    if flush:
        opt.flush()  # what zotune train does before every checkpoint
    state = opt.state_dict()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}  # the checkpoint's file
    del opt, model
    fresh, tok = tiny_model("llama", seed=3)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            p.copy_(params[n])
    resumed = train("offload", steps=4, start=4, model=(fresh, tok), opt_state=state,
                    offload_to="disk", offload_dir=tmp_path / "c")
    assert whole[0][4:] == resumed[0] and all(torch.equal(whole[1][n], resumed[1][n]) for n in whole[1])


KILLED_CHILD = """
import os, sys, time
import torch
sys.path.insert(0, {src!r})
import zotune.engines.tiers as tiers
from zotune.models import tiny_model
from zotune.objectives import CandidateScorer
from zotune.optim import ZOOptimizer
from zotune.tasks.base import Example

real_replace = os.replace
def slow_replace(a, b):  # a slow disk: the kill lands between writing a block and renaming it
    if str(a).endswith(".tmp") and os.path.exists({marker!r}):
        open({marker!r} + ".mid", "w").close()
        time.sleep(30)
    real_replace(a, b)
tiers.os.replace = slow_replace
model, tok = tiny_model("llama", seed=3)
scorer = CandidateScorer(model, tok, max_length=64)
opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, engine="offload", offload_to="disk",
                  offload_dir={tier!r}, seed=5)
ex = [Example(prompt="It was the movie", candidates=(" great", " terrible"), label=0)]
for step in range(1000):
    opt.step(lambda: scorer.classification_loss(ex))
    if step == 1:
        open({marker!r}, "w").close()
"""


def test_a_killed_run_leaves_the_disk_tier_consistent(tmp_path):
    tier, marker = tmp_path / "tier", tmp_path / "marker"
    src = str(Path(__file__).resolve().parents[1] / "src")
    script = KILLED_CHILD.format(src=src, marker=str(marker), tier=str(tier))
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not Path(str(marker) + ".mid").exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never reached a write-back"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)  # mid-step, between a block's write and its rename
    finally:
        child.kill()
        child.wait()
    from safetensors import safe_open

    files = sorted(tier.glob("block-*.safetensors"))
    assert [f.name for f in files] == ["block-00000.safetensors", "block-00001.safetensors"]
    assert list(tier.glob("*.tmp")), "the kill should have left the unrenamed write-back"
    model, _ = tiny_model("llama", seed=3)
    for j, f in enumerate(files):  # every block file whole: readable, the block's size, finite
        with safe_open(str(f), "pt") as st:
            flat = st.get_tensor("flat")
            names = json.loads(st.metadata()["names"])
        block = dict(model.model.layers[j].named_parameters())
        assert names == list(block) and flat.numel() == sum(p.numel() for p in block.values())
        assert torch.isfinite(flat).all()
    # a new engine on the directory removes the stale temporary file
    ZOOptimizer(model, engine="offload", offload_to="disk", offload_dir=tier)
    assert not list(tier.glob("*.tmp"))


def test_throughput_report():
    _, _, opt = train("offload", steps=2, offload_to="cpu")
    report = throughput(opt.engine.timing)
    assert report["bound"] in ("transfer", "compute") and report["compute_s"] > 0
    assert report["tokens_per_step"] > 0
    assert len(report["per_block_s"]["compute"]) == 2 and min(report["per_block_s"]["compute"]) > 0


def test_bad_inputs_get_clear_errors(tmp_path, monkeypatch):
    model, tok = tiny_model("llama", seed=3)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OffloadError, match="not writable"):
        ZOOptimizer(model, engine="offload", offload_to="disk", offload_dir=blocker / "sub")
    import zotune.engines.tiers as tiers

    monkeypatch.setattr(tiers.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(OffloadError, match="GiB free"):
        ZOOptimizer(model, engine="offload", offload_to="disk", offload_dir=tmp_path / "full")
    monkeypatch.undo()

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiers.os, "fsync", full)  # the disk fills up during a write-back
    with pytest.raises(OffloadError, match="is full"):
        ZOOptimizer(model, engine="offload", offload_to="disk", offload_dir=tmp_path / "filling")
    assert not list((tmp_path / "filling").glob("*.tmp"))
    monkeypatch.undo()
    with pytest.raises(ZotuneError, match="offload_to"):
        ZOOptimizer(model, engine="offload", offload_to="gpu")
    with pytest.raises(ZotuneError, match="needs offload_dir"):
        ZOOptimizer(model, engine="offload", offload_to="disk")
    with pytest.raises(ValueError, match="apply to engine='offload' only"):
        ZOOptimizer(model, engine="in-memory", offload_to="cpu")
    with pytest.raises(ZotuneError, match="needs the model"):
        ZOOptimizer(model.named_parameters(), engine="offload")
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    with pytest.raises(ZotuneError, match="block table"):
        ZOOptimizer(mlp, engine="offload")
    bert = torch.nn.Module()
    bert.config = type("C", (), {"model_type": "bert"})()
    bert.lin = torch.nn.Linear(2, 2)
    with pytest.raises(ZotuneError, match="no block table for model type 'bert'"):
        ZOOptimizer(bert, engine="offload")
    opt = ZOOptimizer(model, engine="offload")
    ids = torch.tensor([[0, 5, 6]])
    with pytest.raises(OpaqueObjective, match="calls the model directly"):
        opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    with pytest.raises(OpaqueObjective, match="made no model call"):
        opt.step(lambda: torch.tensor(1.0))


def test_registered():
    assert ENGINES["offload"] is OffloadEngine


def test_dense_gradients_through_the_engine():
    """Updates from real gradients (DenseGrad, Adam with decoupled decay) applied immediately:
    replayed at each block's next touch, equal to in-memory; a backward through the model works."""
    import zotune
    from zotune.engines import Update
    from zotune.plan import DenseGrad
    from zotune.updates import Adam

    results = []
    for engine in ("in-memory", "offload"):
        model, _ = tiny_model("gpt2", seed=3)
        named = list(model.named_parameters())
        entries = [(n, p, 0, zotune.optim.decays(n, p, True)) for n, p in named]
        options = {"model": model, "offload_to": "cpu"} if engine == "offload" else {}
        eng = ENGINES[engine](entries, zotune.Gaussian(), **options)
        state = [{name: torch.zeros_like(p) for name in Adam.state_names} for _, p in named]
        ids = torch.arange(10).view(2, 5) + 3
        for t in range(3):
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            grad = DenseGrad({i: p.grad.detach().clone() for i, (_, p) in enumerate(named)})
            eng.apply(Update(grad, Adam((0.9, 0.999), 1e-8), [1e-2], [0.1], step=t + 1,
                             state=lambda i: state[i]))
        eng.flush()
        results.append([p.detach().clone() for _, p in named])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_zotune_train_with_offload_resumes_to_the_in_memory_run(tiny_dir, data_dir, tmp_path):
    from test_train_cli import final_params, losses, run, train_args

    straight, offload = tmp_path / "straight", tmp_path / "offload"
    tier = ["--engine", "offload", "--offload-to", "disk", "--offload-dir", tmp_path / "tier"]
    assert run(train_args(tiny_dir, data_dir, straight, 4)) == 0
    assert run(train_args(tiny_dir, data_dir, offload, 2, *tier)) == 0
    assert run(train_args(tiny_dir, data_dir, offload, 4, "--resume", *tier)) == 0
    a, b = final_params(straight), final_params(offload)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(offload)
    summary = json.loads((offload / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test"] is not None
    assert summary["offload"]["bound"] in ("transfer", "compute")


def test_zotune_train_offload_errors_exit_2(tiny_dir, data_dir, tmp_path, capsys):
    from test_train_cli import run, train_args

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run(train_args(tiny_dir, data_dir, tmp_path / "r1", 2, "--engine", "offload",
                          "--offload-to", "disk")) == 2
    assert "--offload-dir" in capsys.readouterr().err
    assert run(train_args(tiny_dir, data_dir, tmp_path / "r2", 2, "--engine", "offload",
                          "--offload-to", "disk", "--offload-dir", blocker / "sub")) == 2
    err = capsys.readouterr().err.strip()
    assert "not writable" in err and len(err.splitlines()) == 1
    assert run(train_args(tiny_dir, data_dir, tmp_path / "r3", 2, "--engine", "offload",
                          "--offload-to", "tape")) == 2
    assert "valid: cpu, disk" in capsys.readouterr().err


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_bf16_model_with_fp32_masters_equals_in_memory(tmp_path, tier):
    """bf16 parameters (the tier holds them, the wire carries them), fp32 masters, fp32 losses."""
    def run(engine, **options):
        model, tok = tiny_model("llama", seed=3)
        model.to(torch.bfloat16)
        scorer = CandidateScorer(model, tok, max_length=64)
        opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, engine=engine, seed=5,
                          low_precision_probes="keep", **options)
        losses = [opt.step(lambda b=batch(s): scorer.classification_loss(b)) for s in range(4)]
        opt.flush()
        return losses, {n: p.detach().clone() for n, p in model.named_parameters()}

    options = {"offload_to": tier, **({"offload_dir": tmp_path} if tier == "disk" else {})}
    ref, got = run("in-memory"), run("offload", **options)
    assert same(ref, got) and all(isinstance(v, float) for v in got[0])
    assert next(iter(got[1].values())).dtype == torch.bfloat16
