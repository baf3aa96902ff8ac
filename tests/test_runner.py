"""The model runner (zotune.objectives.runner): restarting a forward at block j from a captured input
of block j gives the full forward's logits, skips blocks 0..j-1, and leaves the model as it was."""
import pytest
import torch

from zotune.models import select_trainable, tiny_model
from zotune.objectives import BlockInput, ModelRunner, length_buckets

FAMILIES = ["llama", "qwen2", "qwen3", "opt", "gpt2"]
TOL = dict(rtol=0, atol=1e-5)
ROWS = [[0, 40, 41], [0, 50, 51, 52, 53, 54, 55], [0, 60, 61, 62, 63]]  # left padding differs


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    layers = {"n_layer": 3} if request.param == "gpt2" else {"num_hidden_layers": 3}
    model, tok = tiny_model(request.param, seed=3, **layers)
    return model, ModelRunner(model, pad_id=tok.pad_token_id, bucket_overhead=None)


def _structure(model):
    return [(name, id(m)) for name, m in model.named_modules()]


def _count_calls(model, runner):
    calls = [0] * runner.table.num_blocks
    handles = [runner.table.block_module(model, j).register_forward_hook(
        lambda m, a, o, j=j: calls.__setitem__(j, calls[j] + 1)) for j in range(len(calls))]
    return calls, handles


@pytest.mark.parametrize("block", [0, 1, 2])
@torch.no_grad()
def test_forward_from_a_captured_input_gives_the_full_logits(lm, block):
    model, runner = lm
    structure = _structure(model)
    full = runner.forward(ROWS, None)
    logits, inp = runner.block_inputs(ROWS, block)
    assert torch.equal(logits, full) and isinstance(inp, BlockInput) and inp.block == block
    assert inp.hidden.shape == (3, 7, model.config.hidden_size)
    assert inp.position_ids[0].tolist() == [0, 0, 0, 0, 0, 1, 2]  # explicit, after the padding
    calls, handles = _count_calls(model, runner)
    try:
        out = runner.forward_from(block, inp.hidden, attention_mask=inp.attention_mask,
                                  position_ids=inp.position_ids)
        kept = runner.forward_from(block, inp.hidden, attention_mask=inp.attention_mask,
                                   position_ids=inp.position_ids, keep=2)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, full, **TOL)
    torch.testing.assert_close(kept, full[:, -2:], **TOL)
    assert calls == [0] * block + [2] * (3 - block)  # blocks before `block` never ran
    assert _structure(model) == structure  # the same modules, put back
    assert torch.equal(runner.forward(ROWS, None), full)


@torch.no_grad()
def test_model_is_restored_after_an_exception(lm):
    model, runner = lm
    structure = _structure(model)
    full = runner.forward(ROWS, None)
    _, inp = runner.block_inputs(ROWS, 2)
    with pytest.raises(RuntimeError):  # hidden of the wrong width fails inside block 2
        runner.forward_from(2, inp.hidden[..., :5], attention_mask=inp.attention_mask,
                            position_ids=inp.position_ids)
    assert _structure(model) == structure
    assert all(not runner.table.block_module(model, j)._forward_pre_hooks for j in range(3))
    assert torch.equal(runner.forward(ROWS, None), full)
    with pytest.raises(IndexError, match="block 3 out of range"):
        runner.forward_from(3, inp.hidden, attention_mask=inp.attention_mask)


@torch.no_grad()
def test_capture_records_every_length_bucket():
    model, tok = tiny_model("llama", seed=3)
    runner = ModelRunner(model, pad_id=tok.pad_token_id, bucket_overhead=0)
    groups = length_buckets([len(r) for r in ROWS], 0)
    with runner.capture(1) as records:
        runner.forward(ROWS, 1)
    assert len(records) == len(groups) == 3
    for group, rec in zip(groups, records):
        want = runner.padded_forward([ROWS[i] for i in group], 1)
        got = runner.forward_from(1, rec.hidden, attention_mask=rec.attention_mask,
                                  position_ids=rec.position_ids, keep=1)
        torch.testing.assert_close(got, want, **TOL)
    with runner.capture(1) as again:  # restarting at block 0 records block 1's input anew
        _, inp0 = runner.block_inputs(ROWS, 0)
        runner.forward_from(0, inp0.hidden, attention_mask=inp0.attention_mask,
                            position_ids=inp0.position_ids)
    assert len(again) == 2 and torch.equal(again[0].hidden, again[1].hidden)
    assert not runner._recorders


@pytest.mark.parametrize("mode", ["lora", "prefix"])
@torch.no_grad()
def test_forward_from_through_peft(mode):
    model, tok = tiny_model("llama", seed=4)
    model = select_trainable(model, mode, seed=1)
    runner = ModelRunner(model, pad_id=tok.pad_token_id)
    full, inp = runner.block_inputs(ROWS, 1, keep=3)
    out = runner.forward_from(1, inp.hidden, attention_mask=inp.attention_mask,
                              position_ids=inp.position_ids, keep=3)
    torch.testing.assert_close(out, full, **TOL)


def test_device_is_explicit_or_follows_the_model():
    model, tok = tiny_model("gpt2")
    runner = ModelRunner(model, pad_id=tok.pad_token_id)
    assert runner.device == torch.device("cpu") and runner.sequences_run == 0
    assert ModelRunner(model, pad_id=2, device="cpu").device == torch.device("cpu")
    ids, mask, pos = runner.pad([[0, 5], [0, 5, 6, 7]], keep=1)
    assert ids.device == runner.device and mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert pos.tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="bucket_overhead"):
        ModelRunner(model, pad_id=2, bucket_overhead="fast")
