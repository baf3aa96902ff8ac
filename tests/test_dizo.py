"""DiZO's layer-wise projection: closed form, trust region, trigger steps, explicit targets for
every architecture, anchors of projected tensors only, low precision, and both searches."""
import gc

import pytest
import torch

import zotune
from zotune.models import select_trainable, tiny_model
from zotune.updates.projection import DiZO, Target, default_targets


def two_layer(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return model


def optimizer(model, **projection):
    options = {"pattern": r"^0\.weight$", **projection}
    return zotune.ZOOptimizer(model.named_parameters(), lr=0.0, method="dizo", projection=options)


def displace(model, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_projection_with_fixed_ratios_is_the_closed_form_and_touches_nothing_else():
    model = two_layer()
    opt = optimizer(model)
    anchor = model[0].weight.detach().clone()
    displace(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dizo = opt.projection
    delta, n = dizo._displacements(opt.engine)
    dizo._write(opt.engine, delta, [1.15])
    torch.testing.assert_close(model[0].weight, anchor + 1.15 * (before["0.weight"] - anchor),
                               rtol=0, atol=1e-12)
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(dict(model.named_parameters())[name], before[name])


def run_search(model, opt, evaluate):
    opt.projection.project(opt.engine, evaluate, key=7)
    return opt.projection.last_ratios


def test_search_stays_in_the_trust_region_and_clip_zero_changes_nothing():
    model = two_layer()
    opt = optimizer(model, clip=0.2, iterations=20)
    anchor = model[0].weight.detach().clone()
    displace(model)
    direction = (model[0].weight - anchor).detach().clone()
    # a loss that always rewards going further along Delta: the ratio must stop at 1 + clip
    push = lambda j: float(-1e3 * ((model[0].weight - anchor) * direction).sum())  # noqa: E731
    ratios = run_search(model, opt, push)
    assert ratios[0] == pytest.approx(1.2, abs=1e-12)
    pull = lambda j: -push(j)  # noqa: E731
    assert run_search(model, opt, pull)[0] == pytest.approx(0.8, abs=1e-12)  # of the new Delta

    model = two_layer()
    opt = optimizer(model, clip=0.0)
    displace(model)
    before = model[0].weight.detach().clone()
    assert run_search(model, opt, push) == [1.0]
    torch.testing.assert_close(model[0].weight, before, rtol=0, atol=1e-12)


def test_zo_search_finds_the_best_ratio_of_a_quadratic():
    """L = k (||theta - anchor - 1.1 Delta_0||^2): the best ratio is 1.1 (inside the region)."""
    model = two_layer()
    opt = optimizer(model, iterations=30, eps=0.05)
    anchor = model[0].weight.detach().clone()
    displace(model)
    target = anchor + 1.1 * (model[0].weight.detach() - anchor)
    n = float((model[0].weight - anchor).norm())
    k = 0.0625 / n / n  # so that SPSA's step contracts the error by (1 - u^2 / 4) per iteration
    loss = lambda j: float(k * ((model[0].weight - target) ** 2).sum())  # noqa: E731
    ratio = run_search(model, opt, loss)[0]
    assert ratio == pytest.approx(1.1, abs=0.01)


def test_fo_search_finds_it_too_without_growing_memory():
    model = two_layer(torch.float32)
    opt = optimizer(model, search="fo", iterations=40, fo_lr=0.01, fo_l1=0.0)
    anchor = model[0].weight.detach().clone()
    displace(model)
    target = anchor + 1.1 * (model[0].weight.detach() - anchor)
    n = float((model[0].weight - anchor).norm())
    params = [p for p in model.parameters()]
    loss = lambda j: ((model[0].weight - target) ** 2).sum() / n**2  # noqa: E731
    with torch.enable_grad():
        opt.projection.project_fo(opt.engine, loss, key=3)
    assert opt.projection.last_ratios[0] == pytest.approx(1.1, abs=0.02)
    gc.collect()
    live = sum(1 for o in gc.get_objects() if torch.is_tensor(o))
    with torch.enable_grad():
        for _ in range(5):
            opt.projection.project_fo(opt.engine, loss, key=3)
    gc.collect()
    assert sum(1 for o in gc.get_objects() if torch.is_tensor(o)) <= live + 2
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_trigger_steps():
    dizo = DiZO(interval=50)
    assert [t for t in range(200) if dizo.due(t)] == [49, 99, 149, 199]


@pytest.mark.parametrize("family,expected", [
    ("llama", ["self_attn.k_proj.weight", "self_attn.v_proj.weight"]),
    ("qwen2", ["self_attn.k_proj.weight", "self_attn.v_proj.weight"]),
    ("opt", ["self_attn.k_proj.weight", "self_attn.v_proj.weight"]),
])
def test_default_targets_are_attention_keys_and_values(family, expected):
    model, _ = tiny_model(family)
    model = select_trainable(model, "full")
    opt = zotune.ZOOptimizer(model.named_parameters(), method="dizo")
    names = [t.name for t in opt.projection.targets]
    assert len(names) == 2 * 2 and all(any(n.endswith(e) for e in expected) for n in names)
    sizes = sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert opt.projection.memory_bytes() == 4 * sizes  # anchors of projected tensors only


def test_gpt2_projects_the_key_and_value_blocks_of_c_attn():
    model, _ = tiny_model("gpt2")
    model = select_trainable(model, "full")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    targets = default_targets(names, {n: p.shape for n, p in model.named_parameters()})
    assert targets[:2] == [Target("transformer.h.0.attn.c_attn.weight", 1, 32, 64),
                           Target("transformer.h.0.attn.c_attn.weight", 1, 64, 96)]
    opt = zotune.ZOOptimizer(model.named_parameters(), method="dizo")
    q_before = model.transformer.h[0].attn.c_attn.weight[:, :32].detach().clone()
    displace(model, 0.01)
    q_moved = model.transformer.h[0].attn.c_attn.weight[:, :32].detach().clone()
    delta, _ = opt.projection._displacements(opt.engine)
    opt.projection._write(opt.engine, delta, [0.9] * len(delta))
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight[:, :32], q_moved)  # q untouched
    assert not torch.equal(q_before, q_moved)


def test_lora_projects_every_lora_tensor_and_errors_are_clear():
    model, _ = tiny_model("llama")
    model = select_trainable(model, "lora")
    opt = zotune.ZOOptimizer(model.named_parameters(), method="dizo")
    names = [t.name for t in opt.projection.targets]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert len(names) == sum(1 for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="pattern"):
        zotune.ZOOptimizer(two_layer().named_parameters(), method="dizo")
    with pytest.raises(ValueError, match="matches no trainable"):
        zotune.ZOOptimizer(two_layer().named_parameters(), method="dizo", projection={"pattern": "k_proj"})
    for bad in ({"interval": 0}, {"clip": 1.0}, {"search": "bayes"}, {"eps": 0}):
        with pytest.raises(ValueError):
            DiZO(**bad)


def test_bf16_parameters_project_through_the_fp32_master():
    model = two_layer(torch.bfloat16)
    opt = optimizer(model)
    assert opt.engine.tensors[0].master is not None
    anchor = opt.projection.anchors[0].clone()
    with torch.no_grad():
        master = opt.engine.base(0)
        master.add_(0.25 * torch.randn(master.shape, generator=torch.Generator().manual_seed(3)))
        opt.engine.sync(0)
    moved = opt.engine.base(0).view(5, 6).clone()
    delta, _ = opt.projection._displacements(opt.engine)
    opt.projection._write(opt.engine, delta, [1.2])
    expected = anchor + 1.2 * (moved - anchor)
    torch.testing.assert_close(opt.engine.base(0).view(5, 6), expected, rtol=0, atol=1e-6)
    assert torch.equal(model[0].weight, expected.to(torch.bfloat16))


def test_state_dict_round_trip():
    model = two_layer()
    opt = optimizer(model)
    displace(model)
    state = opt.projection.state_dict()
    other = optimizer(two_layer())
    other.projection.load_state_dict(state)
    assert torch.equal(other.projection.anchors[0], opt.projection.anchors[0])
    with pytest.raises(ValueError, match="other tensors"):
        optimizer(two_layer(), pattern="bias").projection.load_state_dict(state)
