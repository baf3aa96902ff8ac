"""The parameter layout: canonical names, ids, offsets, chunk grid, roles, shards; and the
low-precision probe check that freezes tensors whose probes round away."""
import copy
import warnings

import pytest
import torch

import zotune
from zotune.layout import ParamLayout, canonical_name

from helpers import classification_batch, mlp, mlp_loss


def test_canonical_names_strip_wrappers_so_directions_do_not_change():
    for wrapped in ("module.0.weight", "_orig_mod.0.weight", "module._orig_mod.0.weight",
                    "base_model.model.0.weight"):
        assert canonical_name(wrapped) == "0.weight"
    x, y = classification_batch()
    runs = []
    for prefix in ("", "module.", "_orig_mod.", "base_model.model."):
        model = mlp()
        named = [(prefix + n, p) for n, p in model.named_parameters()]
        opt = zotune.ZOOptimizer(named, lr=1e-2, seed=4)
        for _ in range(3):
            opt.step(mlp_loss(model, x, y))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


def test_compiled_model_names_match_the_plain_model():
    model = mlp()
    compiled = torch.compile(model, backend="eager")
    plain = [n for n, _ in model.named_parameters()]
    wrapped = [canonical_name(n) for n, _ in compiled.named_parameters()]
    assert wrapped == plain


def test_offsets_chunks_roles_and_kinds():
    a, b, c = torch.zeros(10), torch.zeros(3, 4), torch.zeros(5, dtype=torch.int8)
    layout = ParamLayout.build([("a", a, 0, True), ("b", b, 1, False, "backprop"), ("c", c, 0, False, "frozen")],
                               chunk_size=4)
    assert [t.start for t in layout] == [0, 10, 22] and layout.numel == 27
    assert layout[0].chunks == [(0, 4), (4, 8), (8, 10)] and layout[1].shape == (3, 4)
    assert [t.role for t in layout] == ["zo", "backprop", "frozen"]
    assert [t.kind for t in layout] == ["float", "float", "integer"]
    assert layout[0].tensor_id == zotune.rng.name_id("a") and layout.spec("module.b").index == 1
    assert layout.chunk_jobs() == [(0, 0), (0, 1), (0, 2)]
    with pytest.raises(ValueError, match="duplicate trainable tensor name 'a'"):
        ParamLayout.build([("a", a, 0, True), ("module.a", a, 0, True)])
    with pytest.raises(ValueError, match="valid roles: zo, backprop, frozen"):
        ParamLayout.build([("a", a, 0, True, "teacher")])


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_are_whole_chunks_covering_everything_once(n):
    tensors = [(f"t{i}", torch.zeros(s), 0, True) for i, s in enumerate((100, 7, 64, 33, 1))]
    layout = ParamLayout.build(tensors, chunk_size=16)
    shards = layout.shards(n)
    everything = sorted(j for shard in shards for j in shard)
    assert everything == sorted((t.index, c) for t in layout for c in range(len(t.chunks)))
    sizes = [sum(layout[t].chunks[c][1] - layout[t].chunks[c][0] for t, c in s) for s in shards]
    assert max(sizes) - min(sizes) <= 16  # balanced to within one chunk


def test_backprop_and_frozen_roles_are_never_perturbed():
    model = mlp()
    params = list(model.named_parameters())
    roles = ["zo", "backprop", "frozen", "zo"]
    engine = zotune.engines.InMemoryEngine([(n, p, 0, True, r) for (n, p), r in zip(params, roles)],
                                           zotune.Gaussian())
    before = [p.detach().clone() for _, p in params]
    engine.move(((123, 0.1),))
    changed = [not torch.equal(p, q) for (_, p), q in zip(params, before)]
    assert changed == [True, False, False, True]
    engine.flush()
    dense = zotune.plan.DenseGrad({i: torch.ones_like(p) for i, (_, p) in enumerate(params)})
    engine.apply(zotune.engines.Update(dense, zotune.updates.SGD(), [0.1], [0.0]))
    changed = [not torch.equal(p, q) for (_, p), q in zip(params, before)]
    assert changed == [True, True, False, True]  # frozen stays frozen, backprop takes real grads


def norm_model(dtype=torch.bfloat16):
    """A linear layer and a norm-like gain at 1.0: in bf16 the gain's ulp (2^-7) dwarfs eps |z|."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False), torch.nn.LayerNorm(16, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(16, 16, generator=g) * 0.02)
        model[1].weight.fill_(1.0)
    return model.to(dtype)


def test_bf16_tensors_whose_probes_round_away_are_excluded_and_stay_put():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    model = norm_model()
    with pytest.warns(UserWarning, match="1 low-precision tensor"):
        opt = zotune.ZOOptimizer(model.named_parameters(), lr=1e-3, eps=1e-3, seed=0)
    coverage = opt.engine.probe_coverage(1e-3)
    assert coverage[0] > 0.9 and coverage[1] < 0.1  # measured: the weight is probed, the gain not
    assert opt.excluded == ["1.weight"] and opt.engine.layout[1].role == "frozen"
    gain = model[1].weight.detach().clone()
    loss = lambda: float(model(x).float().pow(2).mean())  # noqa: E731
    for _ in range(20):
        opt.step(loss)
    assert torch.equal(model[1].weight, gain)
    kept_model = norm_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = zotune.ZOOptimizer(kept_model.named_parameters(), lr=1e-3, eps=1e-3, seed=0,
                                  low_precision_probes="keep")
    for _ in range(20):
        kept.step(lambda: float(kept_model(x).float().pow(2).mean()))
    # without the check the unprobed gain is updated by its z terms all the same: a random walk
    assert not torch.equal(kept.engine.tensors[1].master, gain.float().view(-1))


def test_excluded_tensors_are_restored_from_the_checkpoint():
    """A resumed run perturbs exactly the tensors the saved run did, even if the coverage of the
    resumed weights would decide otherwise."""
    with pytest.warns(UserWarning):
        opt = zotune.ZOOptimizer(norm_model().named_parameters(), lr=1e-3, eps=1e-3)
    state = copy.deepcopy(opt.state_dict())
    fresh = zotune.ZOOptimizer(norm_model().named_parameters(), lr=1e-3, eps=1e-3,
                               low_precision_probes="keep")
    assert fresh.engine.layout[1].role == "zo"
    fresh.load_state_dict(state)
    assert fresh.engine.layout[1].role == "frozen"


def test_an_eps_below_every_tensors_ulp_is_an_error():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.fill_(1.0)
    with pytest.raises(ValueError, match="every trainable bfloat16 tensor round away"):
        zotune.ZOOptimizer(model.named_parameters(), eps=1e-4)


def test_block_table_decides_weight_decay_and_dizo_targets_when_the_model_is_given():
    from zotune.models import select_trainable, tiny_model

    seq = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    by_name = zotune.ZOOptimizer(seq.named_parameters())
    by_table = zotune.ZOOptimizer(seq.named_parameters(), model=seq)
    assert [t.decays for t in by_name.engine.layout] == [True, False, True, False]  # "1.weight": a name
    assert [t.decays for t in by_table.engine.layout] == [True, False, False, False]  # the table: a norm
    model = select_trainable(tiny_model("gpt2")[0], "full")
    with_table = zotune.ZOOptimizer(model.named_parameters(), method="dizo", model=model)
    without = zotune.ZOOptimizer(model.named_parameters(), method="dizo")
    assert with_table.engine.layout.blocks is not None and without.engine.layout.blocks is None
    assert with_table.projection.targets == without.projection.targets
    assert [t.dim for t in with_table.projection.targets[:2]] == [1, 1]  # k and v slices of c_attn
