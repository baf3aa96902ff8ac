"""Block tables (zotune.models.blocks): real module paths for every tiny family, the same attention
key/value targets as DiZO's name-based default, the weight-decay rule of zotune.optim, canonical
names through peft, DataParallel and torch.compile wrappers, nn.Sequential, clear errors."""
import types

import pytest
import torch

from helpers import mlp
from zotune.errors import ZotuneError
from zotune.models import (
    BlockTable,
    ParamSlice,
    block_table,
    canonical_name,
    select_trainable,
    tiny_model,
    unwrap,
)
from zotune.optim import decays
from zotune.updates.projection import default_targets

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "opt", "gpt2"]
BLOCKS = {"opt": "model.decoder.layers", "gpt2": "transformer.h"}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


def _model(family, **kw):
    return tiny_model(family, **kw)[0]


def test_paths_are_real_modules_in_forward_order(family):
    model = _model(family)
    table = block_table(model)
    assert isinstance(table, BlockTable) and table.family == model.config.model_type
    layers = model.get_submodule(BLOCKS.get(family, "model.layers"))
    assert table.num_blocks == model.config.num_hidden_layers == len(layers) == 2
    assert [model.get_submodule(p) for p in table.blocks] == list(layers)
    assert [table.block_module(model, j) for j in range(2)] == list(layers)
    assert model.get_submodule(table.head) is model.get_output_embeddings()
    assert model.get_submodule(table.embeddings[0]) is model.get_input_embeddings()
    for path in (*table.embeddings, table.final_norm, *table.norms):
        assert isinstance(model.get_submodule(path), torch.nn.Module)
    assert table.final_norm in table.norms
    assert len(table.norms) == 2 * 2 + 1 + (4 if family == "qwen3" else 0)  # qwen3: q/k norms
    assert len(table.kv) == 2
    for j, pair in enumerate(table.kv):
        for part in pair:
            param = model.get_parameter(part.name)
            assert table.block_of(part.name) == j
            if part.dim is not None:  # GPT-2: the k and v thirds of c_attn, shape (d, 3d)
                assert part.stop - part.start == param.shape[part.dim] // 3


def test_block_of_and_block_parameters(family):
    model = _model(family)
    table = block_table(model)
    named = list(model.named_parameters())
    owners = {n: table.block_of(n) for n, _ in named}
    for n, j in owners.items():
        inside = [b for b in range(2) if n.startswith(table.blocks[b] + ".")]
        assert j == (inside[0] if inside else None)
    assert all(owners[n] is None for n, _ in named if n.startswith(table.embeddings))
    for j in range(2):
        from_model = table.block_parameters(j, model)
        assert [n for n, _ in from_model] == [n for n, _ in named if owners[n] == j]
        assert table.block_parameters(j, named) == from_model
    with pytest.raises(IndexError, match="block 2 out of range"):
        table.block_parameters(2, model)


def test_kv_targets_equal_dizo_default_targets(family):
    model = select_trainable(_model(family), "full")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    table = block_table(model)
    want = [(t.name, t.dim, t.start, t.stop) for t in default_targets(names, shapes)]
    assert table.kv_targets(names, shapes) == want == table.kv_targets(names)
    assert len(want) == 4 and all(isinstance(t, ParamSlice) for t in table.kv_targets(names))
    assert table.kv_targets([n for n in names if "mlp" in n]) == []
    if family == "gpt2":
        bad = dict(shapes, **{want[0][0]: torch.Size([32, 64])})
        with pytest.raises(ValueError, match="fused"):
            table.kv_targets(names, bad)


def test_no_weight_decay_agrees_with_optim_decays(family):
    model = _model(family)
    table = block_table(model)
    named = list(model.named_parameters(remove_duplicate=False))  # the tied head too
    assert [table.no_weight_decay(n) for n, p in named] == [not decays(n, p, True) for n, p in named]
    assert any(table.is_norm(n) for n, _ in named) and not table.is_norm(named[0][0])


@pytest.mark.parametrize("mode", ["lora", "prefix"])
@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_peft_models_have_the_same_table_and_canonical_names(family, mode):
    plain = block_table(_model(family))
    wrapped = select_trainable(_model(family), mode)
    table = block_table(wrapped)
    assert table == plain and unwrap(wrapped) is wrapped.get_base_model()
    base_names = dict(unwrap(wrapped).named_parameters())
    for name, param in wrapped.named_parameters():
        canon = canonical_name(name, wrapped)
        assert table.canonical(name) == canon
        assert base_names.get(canon, param) is param  # the base model's own name for it
        if mode == "lora":
            assert canonical_name(name) == canon  # by name alone: exact for LoRA
        assert table.block_of(name) == table.block_of(canon)
        assert table.no_weight_decay(name) == (not decays(name, param, True))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    if mode == "lora":
        assert all(table.block_of(n) in (0, 1) for n in trainable)
        lora0 = [n for n, _ in table.block_parameters(0, wrapped) if "lora_" in n]
        assert len(lora0) == len(trainable) // 2 and not lora0[0].startswith("base_model")
    else:  # the prefix embedding lies outside every block
        assert [table.block_of(n) for n in trainable] == [None]


def test_data_parallel_and_compile_wrappers_resolve():
    model = _model("llama")
    wrapped = torch.nn.DataParallel(torch.compile(model))  # no GPU: DataParallel only wraps
    assert unwrap(wrapped) is model and block_table(wrapped) == block_table(model)
    plain = [n for n, _ in model.named_parameters()]
    raw = [n for n, _ in wrapped.named_parameters()]
    assert raw[0].startswith("module._orig_mod.")
    assert [canonical_name(n) for n in raw] == plain == [canonical_name(n, wrapped) for n in raw]
    assert canonical_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"


def test_sequential_children_are_blocks():
    model = torch.nn.Sequential(mlp(), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    table = block_table(model)
    assert table.family == "sequential" and table.blocks == ("0", "1", "2")
    assert (table.embeddings, table.final_norm, table.head, table.kv) == ((), None, None, ())
    assert table.norms == ("1",) and table.kv_targets(["0.0.weight", "2.weight"]) == []
    named = list(model.named_parameters())
    assert [table.block_of(n) for n, _ in named] == [0, 0, 0, 0, 1, 1, 2, 2]
    # The name rule cannot see that "1" is a LayerNorm; the table can.
    differ = [n for n, p in named if table.no_weight_decay(n) != (not decays(n, p, True))]
    assert differ == ["1.weight"] and table.no_weight_decay("1.weight")
    assert block_table(torch.nn.DataParallel(model)) == table


def test_unknown_architectures_get_one_clear_line():
    odd = torch.nn.Linear(2, 2)
    odd.config = types.SimpleNamespace(model_type="bert")
    with pytest.raises(ZotuneError) as err:
        block_table(odd)
    msg = str(err.value)
    assert "'bert'" in msg and "Linear" in msg and "\n" not in msg
    assert all(f in msg for f in ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "Sequential"))
    assert block_table(odd, strict=False) is None
    with pytest.raises(ZotuneError, match="model type None"):
        block_table(torch.nn.Linear(2, 2))
