"""Precision of the offload engine (engines/wire.py): bf16/fp16 on the wire with an fp32 master in
the tier, and a bf16 tier written back with keyed stochastic rounding.

References: the in-memory engine with the blocks in the low dtype and fp32 masters holding the
model's fp32 values (its master-weight arithmetic is what the offload engine must reproduce), and
for the bf16 tier the same reference with its masters rounded by ``stochastic_round_bf16`` after
each step, with the keys the engine uses. Tiny models (2 blocks, d=32), a few steps each.
"""
from __future__ import annotations

import pytest
import torch

from test_offload import batch, same, train
from zotune import rng
from zotune.engines import wire
from zotune.errors import ZotuneError
from zotune.models import block_table, tiny_model
from zotune.objectives import CandidateScorer
from zotune.optim import ZOOptimizer

LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def reference(transfer=None, storage=None, *, steps=4, family="llama", method="mezo"):
    """In-memory: blocks in ``transfer`` (cast hooks) with fp32 masters; with ``storage="bf16"``
    the masters start rounded to bf16 and each update, applied at once, is followed by the
    stochastic rounding of the masters with the update's keys (the offload engine rounds each
    chunk right after its update, before the perturbation fused into the same sweep)."""
    model, tok = tiny_model(family, seed=3)
    table = block_table(model)
    block_params = {id(p) for j in range(table.num_blocks) for p in table.block_module(model, j).parameters()}
    original = {id(p): p.detach().clone() for p in model.parameters()}
    for j in range(table.num_blocks):
        block = table.block_module(model, j)
        if transfer:
            block.to(LOW[transfer])
        wire.CastToBlockDtype(block)
    scorer = CandidateScorer(model, tok, max_length=64)
    opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, method=method, engine="in-memory",
                      defer_update=storage != "bf16", seed=5, low_precision_probes="keep")
    eng = opt.engine
    blocks = [t for t in eng.tensors if id(t.param) in block_params]
    for t in blocks:
        start = original[id(t.param)].reshape(-1)
        if storage == "bf16":
            start = start.to(torch.bfloat16).float()
        t.master = start.clone()  # the in-memory master arithmetic, on the block tensors only
        t.flat.copy_(t.master)
    if storage == "bf16":
        apply = eng.apply

        def apply_and_round(update, defer=False):
            apply(update, defer)
            key = wire.sr_key(update)
            for t in blocks:
                for c, (s, e) in enumerate(t.chunks):
                    t.master[s:e] = wire.stochastic_round_bf16(t.master[s:e], rng.mix(key, t.tensor_id, c)).float()
        eng.apply = apply_and_round
    losses = [opt.step(lambda b=batch(s): scorer.classification_loss(b)) for s in range(steps)]
    opt.flush()
    params = {}
    for n, p in model.named_parameters():
        t = next((t for t in blocks if t.param is p), None)
        params[n] = (t.master.view(p.shape) if t is not None else p.detach()).clone()
    return losses, params


def offload(transfer=None, storage=None, **options):
    losses, params, opt = train("offload", steps=options.pop("steps", 4), transfer_dtype=transfer,
                                storage_dtype=storage, low_precision_probes="keep", **options)
    return losses, {n: p.float() for n, p in params.items()}, opt


@pytest.mark.parametrize("transfer", ["bf16", "fp16"])
@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_low_precision_transfer_equals_in_memory_with_fp32_masters(tmp_path, transfer, tier):
    where = {"offload_to": tier, **({"offload_dir": tmp_path} if tier == "disk" else {})}
    ref = reference(transfer)
    got = offload(transfer, **where)
    assert same(ref, got[:2]) and all(isinstance(v, float) for v in got[0])
    model = got[2].engine.model
    # the tier keeps fp32: the parameters between uses are the fp32 masters
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert got[2].engine.numbers_drawn > 0


def test_updates_below_one_bf16_ulp_survive_in_the_fp32_master():
    """lr so small that every update is far below a bf16 ulp: a bf16 tier without a master
    would round it away (ZO2's AMP); the fp32 master keeps it."""
    model, tok = tiny_model("llama", seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scorer = CandidateScorer(model, tok, max_length=64)
    opt = ZOOptimizer(model, lr=1e-7, eps=1e-2, engine="offload", transfer_dtype="bf16", seed=5,
                      low_precision_probes="keep")
    for s in range(2):
        opt.step(lambda b=batch(s): scorer.classification_loss(b))
    opt.flush()
    w = "model.layers.0.mlp.up_proj.weight"
    moved = dict(model.named_parameters())[w].detach() - before[w]
    low = before[w].to(torch.bfloat16)
    ulp = (torch.nextafter(low, torch.full_like(low, float("inf"))).float() - low.float()).abs()
    assert bool(((moved != 0) & (moved.abs() < ulp / 2)).any())  # kept, though below half an ulp


@pytest.mark.parametrize("transfer", [None, "bf16"])
def test_bf16_tier_with_stochastic_rounding_equals_its_reference(tmp_path, transfer):
    ref = reference(transfer, "bf16")
    got = offload(transfer, "bf16", offload_to="disk", offload_dir=tmp_path)
    assert same(ref, got[:2])
    blocks = [p for n, p in got[2].engine.model.named_parameters() if ".layers." in n]
    assert {p.dtype for p in blocks} == {torch.bfloat16}  # the tier holds bf16
    files = sorted(tmp_path.glob("block-*.safetensors"))
    assert sum(f.stat().st_size for f in files) < 2.1 * sum(p.numel() for p in blocks)


def test_bf16_tier_in_host_memory_equals_disk_and_is_reproducible(tmp_path):
    a = offload(None, "bf16", offload_to="cpu")
    b = offload(None, "bf16", offload_to="disk", offload_dir=tmp_path / "a")
    c = offload(None, "bf16", offload_to="disk", offload_dir=tmp_path / "b", overlap=False)
    assert same(a[:2], b[:2]) and same(b[:2], c[:2])


def test_bf16_tier_resumes_bitwise(tmp_path):
    whole = offload(None, "bf16", steps=6, offload_to="disk", offload_dir=tmp_path / "a")
    model, tok = tiny_model("llama", seed=3)
    scorer = CandidateScorer(model, tok, max_length=64)
    opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, engine="offload", seed=5, defer_update=True,
                      offload_to="disk", offload_dir=tmp_path / "b", storage_dtype="bf16",
                      low_precision_probes="keep")
    for s in range(3):
        opt.step(lambda b=batch(s): scorer.classification_loss(b))
    state = opt.state_dict()  # not flushed: the held update and the blocks' rounding keys go along
    params = {n: p.detach().clone() for n, p in model.named_parameters()}  # the checkpoint's file
    del opt, model
    fresh, tok = tiny_model("llama", seed=3)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            p.copy_(params[n])  # bf16 block values: exact in fp32, stored exactly again
    resumed = train("offload", steps=3, start=3, model=(fresh, tok), opt_state=state,
                    offload_to="disk", offload_dir=tmp_path / "c", storage_dtype="bf16",
                    low_precision_probes="keep")
    assert whole[0][3:] == resumed[0]
    assert all(torch.equal(whole[1][n], resumed[1][n].float()) for n in whole[1])


def test_stochastic_rounding_is_unbiased_and_keyed():
    g = torch.Generator().manual_seed(11)
    down = torch.randn(200_000, generator=g).abs().to(torch.bfloat16)
    ulp = torch.nextafter(down, torch.full_like(down, float("inf"))).float() - down.float()
    down = down.float()
    x = down + 0.3 * ulp  # 30% of the way to the next bf16 number
    keys = 8
    errors = torch.stack([(wire.stochastic_round_bf16(x, k).float() - x) / ulp for k in range(keys)])
    # each rounding error lies in (-1, 1) ulp with standard deviation <= 1/2: the mean of
    # n = 1.6e6 of them is within 5 / (2 sqrt(n)) = 0.002 of 0 unless SR is biased
    assert abs(float(errors.mean())) < 0.002
    nearest = (x.to(torch.bfloat16).float() - x) / ulp
    assert abs(float(nearest.mean()) + 0.3) < 1e-3  # round-to-nearest is biased by -0.3 ulp here
    assert torch.equal(wire.stochastic_round_bf16(-x, 5), -wire.stochastic_round_bf16(x, 5))  # symmetric
    assert torch.equal(wire.stochastic_round_bf16(x, 3), wire.stochastic_round_bf16(x, 3))
    assert not torch.equal(wire.stochastic_round_bf16(x, 3), wire.stochastic_round_bf16(x, 4))
    exact = torch.randn(1000, generator=g).to(torch.bfloat16)
    assert torch.equal(wire.stochastic_round_bf16(exact.float(), 7), exact)  # bf16 numbers stay
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0])
    out = wire.stochastic_round_bf16(special, 1).float()
    assert out[0] == float("inf") and out[1] == float("-inf") and out[2].isnan() and (out[3:] == 0).all()


def test_bad_precision_options_get_clear_errors():
    model, _ = tiny_model("llama", seed=3)
    with pytest.raises(ZotuneError, match="unknown transfer_dtype 'int8'; valid: fp32, bf16, fp16"):
        ZOOptimizer(model, engine="offload", transfer_dtype="int8")
    with pytest.raises(ZotuneError, match="unknown storage_dtype 'fp16'; valid: fp32, bf16"):
        ZOOptimizer(model, engine="offload", storage_dtype="fp16")
    with pytest.raises(ValueError, match="apply to engine='offload' only"):
        ZOOptimizer(model, engine="in-memory", transfer_dtype="bf16")
    model.to(torch.bfloat16)
    with pytest.raises(ZotuneError, match="keep an fp32 master of the blocks; this model is torch.bfloat16"):
        ZOOptimizer(model, engine="offload", transfer_dtype="fp16")
    ZOOptimizer(model, engine="offload", transfer_dtype="bf16", low_precision_probes="keep")  # its own dtype


def test_zotune_train_with_a_bf16_tier_resumes_bitwise(tiny_dir, data_dir, tmp_path, capsys):
    """Through the CLI: --transfer-dtype/--storage-dtype, checkpoints streamed from the bf16 tier
    (bf16 block tensors in the file), a resumed run equal to the straight one."""
    from test_train_cli import final_params, losses, run, train_args

    flags = ["--engine", "offload", "--offload-to", "disk", "--transfer-dtype", "bf16",
             "--storage-dtype", "bf16"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(train_args(tiny_dir, data_dir, straight, 4, *flags, "--offload-dir", tmp_path / "t1")) == 0
    assert run(train_args(tiny_dir, data_dir, resumed, 2, *flags, "--offload-dir", tmp_path / "t2")) == 0
    assert run(train_args(tiny_dir, data_dir, resumed, 4, "--resume", *flags,
                          "--offload-dir", tmp_path / "t3")) == 0
    a, b = final_params(straight), final_params(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(resumed)
    assert {v.dtype for k, v in a.items() if ".layers." in k} == {torch.bfloat16}
    capsys.readouterr()
    assert run(train_args(tiny_dir, data_dir, tmp_path / "bad", 2, "--engine", "offload",
                          "--transfer-dtype", "int8")) == 2
    err = capsys.readouterr().err
    assert "int8" in err and "fp32, bf16, fp16" in err
