"""DiZO's layer-wise projection: closed form, trust region, trigger steps, explicit targets for
every architecture, anchors of projected tensors only, low precision, both searches, resume.

Most tests build the engine directly (``InMemoryEngine`` + ``DiZO.bind``); the ``ZOOptimizer``
wiring is checked once at the end."""
import gc
import math

import pytest
import torch

import zotune
from zotune.directions import Gaussian
from zotune.engines.in_memory import InMemoryEngine, Update
from zotune.models import select_trainable, tiny_model
from zotune.plan import ZOGrad
from zotune.updates.projection import (
    DiZO,
    Target,
    default_targets,
    targets_from_pattern,
)
from zotune.updates.rules import SGD


def two_layer(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    return model


def engine_of(model, master_weights="auto"):
    tensors = [(n, p, 0, True) for n, p in model.named_parameters() if p.requires_grad]
    return InMemoryEngine(tensors, Gaussian(), master_weights=master_weights)


def bound(model, pattern=r"^0\.weight$", **options):
    engine = engine_of(model)
    dizo = DiZO(pattern=pattern, **options)
    dizo.bind(engine)
    return engine, dizo


def displace(model, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((scale * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype))


def test_projection_with_fixed_ratios_is_the_closed_form_and_touches_nothing_else():
    model = two_layer()
    engine, dizo = bound(model)
    anchor = model[0].weight.detach().clone()
    displace(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dizo.rescale(engine, [1.15])
    torch.testing.assert_close(model[0].weight, anchor + 1.15 * (before["0.weight"] - anchor),
                               rtol=0, atol=1e-12)  # float64: rounding only
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(dict(model.named_parameters())[name], before[name])
    with pytest.raises(ValueError, match="one ratio per target"):
        dizo.rescale(engine, [1.0, 1.0])


def test_search_stays_in_the_trust_region_and_clip_zero_changes_nothing():
    model = two_layer()
    engine, dizo = bound(model, clip=0.2, iterations=20)
    anchor = model[0].weight.detach().clone()
    displace(model)
    direction = (model[0].weight - anchor).detach().clone()
    # a loss that always rewards going further along Delta: the ratio must stop at 1 + clip
    push = lambda j: float(-1e3 * ((model[0].weight - anchor) * direction).sum())
    dizo.project(engine, push, key=7)
    assert dizo.last_ratios[0] == pytest.approx(1.2, abs=1e-12)
    assert dizo.forward_passes == 40 and dizo.searches == 1
    dizo.project(engine, lambda j: -push(j), key=8)
    assert dizo.last_ratios[0] == pytest.approx(0.8, abs=1e-12)  # of the new Delta

    model = two_layer()
    engine, dizo = bound(model, clip=0.0)
    displace(model)
    before = model[0].weight.detach().clone()
    dizo.project(engine, push, key=7)
    assert dizo.last_ratios == [1.0]
    torch.testing.assert_close(model[0].weight, before, rtol=0, atol=1e-12)


def test_no_displacement_keeps_ratio_one_and_an_error_restores_the_start():
    model = two_layer()
    engine, dizo = bound(model)
    before = model[0].weight.detach().clone()
    dizo.project(engine, lambda j: 1.0, key=1)
    assert dizo.last_ratios == [1.0] and torch.equal(model[0].weight, before)

    displace(model)
    moved = model[0].weight.detach().clone()

    def failing(j):
        if j == 1:
            raise KeyboardInterrupt
        return float(model[0].weight.sum())
    with pytest.raises(KeyboardInterrupt):
        dizo.project(engine, failing, key=1)
    torch.testing.assert_close(model[0].weight, moved, rtol=0, atol=1e-12)


def test_non_finite_losses_do_not_move_gamma():
    model = two_layer()
    engine, dizo = bound(model, iterations=5)
    displace(model)
    moved = model[0].weight.detach().clone()
    dizo.project(engine, lambda j: float("nan"), key=2)
    assert dizo.last_ratios == [1.0] and dizo.forward_passes == 10
    torch.testing.assert_close(model[0].weight, moved, rtol=0, atol=1e-12)


def quadratic(model, best=1.1):
    """L = k ||theta - anchor - best Delta_0||^2 over the first layer: the best ratio is ``best``.
    Returns (loss as a tensor-valued function, k)."""
    anchor = model[0].weight.detach().clone()
    displace(model)
    target = anchor + best * (model[0].weight.detach() - anchor)
    n = float((model[0].weight - anchor).norm())
    k = 0.0625 / n / n  # so that SPSA's step contracts the error by about (1 - u^2 / 4) per iteration
    return (lambda j: k * ((model[0].weight - target) ** 2).sum()), k


@pytest.mark.parametrize("key", [0, 1, 2, 3])
def test_zo_search_finds_the_best_ratio_of_a_quadratic(key):
    model = two_layer()
    engine, dizo = bound(model, iterations=30, eps=0.05)
    loss, _ = quadratic(model)
    start = float(loss(0))
    dizo.project(engine, lambda j: float(loss(j)), key=key)
    assert dizo.last_ratios[0] == pytest.approx(1.1, abs=0.01)
    assert float(loss(0)) < 0.01 * start


def test_fo_search_finds_it_too_without_growing_memory_or_touching_parameters():
    model = two_layer(torch.float32)
    engine, dizo = bound(model, search="fo", iterations=40, fo_lr=0.01, fo_l1=0.0)
    loss, k = quadratic(model)
    params = list(model.parameters())
    dizo.project_fo(engine, lambda j: loss(j) / k / 16, key=3)  # no enable_grad needed by callers
    assert dizo.last_ratios[0] == pytest.approx(1.1, abs=0.02)
    assert dizo.forward_passes == dizo.backward_passes == 40
    gc.collect()
    live = sum(1 for o in gc.get_objects() if torch.is_tensor(o))
    for _ in range(5):
        dizo.project_fo(engine, lambda j: loss(j) / k / 16, key=3)
    gc.collect()
    assert sum(1 for o in gc.get_objects() if torch.is_tensor(o)) <= live + 2
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    with torch.no_grad():
        frozen = loss(0)
    with pytest.raises(RuntimeError, match="grad enabled"):
        dizo.project_fo(engine, lambda j: frozen, key=3)


def test_fo_search_through_gpt2_slices_restores_flags_and_projects_only_k_and_v():
    model, _ = tiny_model("gpt2")
    model = select_trainable(model, "full")
    engine = engine_of(model)
    dizo = DiZO(search="fo", iterations=2)
    dizo.bind(engine)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    displace(model, 0.01)
    attn = model.transformer.h[0].attn.c_attn.weight
    q_moved, mlp_moved = attn[:, :32].detach().clone(), model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    ids = torch.arange(12).view(2, 6) % model.config.vocab_size
    dizo.project_fo(engine, lambda j: model(input_ids=ids, labels=ids).loss, key=0)
    assert len(dizo.last_ratios) == 4 and all(math.isfinite(r) and r != 1.0 for r in dizo.last_ratios)
    assert torch.equal(attn[:, :32], q_moved) and torch.equal(model.transformer.h[0].mlp.c_fc.weight, mlp_moved)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_fo_state_round_trip_resumes_exactly_with_persistent_zero_init():
    target = two_layer(torch.float32)[0].weight.detach().clone() * 1.05

    def run(searches, resume_at=None):
        model = two_layer(torch.float32)
        engine, dizo = bound(model, search="fo", iterations=3, fo_init="zero")
        for s in range(searches):
            displace(model, 0.05, seed=10 + s)  # the MeZO steps between searches
            if s == resume_at:  # a fresh model and DiZO, restored from the saved state
                state, params = dizo.state_dict(), [p.detach().clone() for p in model.parameters()]
                model = two_layer(torch.float32, seed=5)
                engine, dizo = bound(model, search="fo", iterations=3, fo_init="zero")
                with torch.no_grad():
                    for p, v in zip(model.parameters(), params):
                        p.copy_(v)
                dizo.load_state_dict(state)
            dizo.project_fo(engine, lambda j, m=model: ((m[0].weight - target) ** 2).sum(), key=s)
        return [p.detach().clone() for p in model.parameters()], dizo

    straight, a = run(3)
    resumed, b = run(3, resume_at=2)
    assert all(torch.equal(x, y) for x, y in zip(straight, resumed))
    assert torch.equal(a.gamma, b.gamma) and a.searches == b.searches == 3
    assert a.adam_state["state"][0]["step"] == 9  # Adam persists across searches


def test_trigger_steps():
    dizo = DiZO(interval=50)
    assert [t for t in range(200) if dizo.due(t)] == [49, 99, 149, 199]
    assert [t for t in range(5) if DiZO(interval=1).due(t)] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_default_targets_are_attention_keys_and_values(family):
    model, _ = tiny_model(family)
    model = select_trainable(model, "full")
    engine = engine_of(model)
    dizo = DiZO()
    dizo.bind(engine)
    names = [t.name for t in dizo.targets]
    prefix = "model.decoder.layers" if family == "opt" else "model.layers"
    assert names == [f"{prefix}.{i}.self_attn.{kv}_proj.weight" for i in range(2) for kv in "kv"]
    sizes = sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert dizo.memory_bytes() == 4 * sizes  # fp32 anchors of projected tensors only
    assert len(dizo.anchors) == 4


def test_gpt2_projects_the_key_and_value_blocks_of_c_attn():
    model, _ = tiny_model("gpt2")
    model = select_trainable(model, "full")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    targets = default_targets(names, {n: p.shape for n, p in model.named_parameters()})
    assert targets[:2] == [Target("transformer.h.0.attn.c_attn.weight", 1, 32, 64),
                           Target("transformer.h.0.attn.c_attn.weight", 1, 64, 96)]
    engine = engine_of(model)
    dizo = DiZO()
    dizo.bind(engine)
    assert dizo.memory_bytes() == 4 * 2 * 2 * 32 * 32  # 2 blocks x (k, v) x d x d
    q_before = model.transformer.h[0].attn.c_attn.weight[:, :32].detach().clone()
    kv_anchor = model.transformer.h[0].attn.c_attn.weight[:, 32:].detach().clone()
    displace(model, 0.01)
    attn = model.transformer.h[0].attn.c_attn.weight
    q_moved, kv_moved = attn[:, :32].detach().clone(), attn[:, 32:].detach().clone()
    dizo.rescale(engine, [0.9] * len(dizo.targets))
    assert torch.equal(attn[:, :32], q_moved) and not torch.equal(q_before, q_moved)  # q untouched
    torch.testing.assert_close(attn[:, 32:], kv_anchor + 0.9 * (kv_moved - kv_anchor), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="start < stop"):
        Target("x", 1, 4, 4)


def test_lora_projects_every_lora_tensor_and_errors_are_clear():
    model, _ = tiny_model("llama")
    model = select_trainable(model, "lora")
    engine = engine_of(model)
    dizo = DiZO()
    dizo.bind(engine)
    names = [t.name for t in dizo.targets]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert len(names) == sum(1 for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="pass a pattern"):
        DiZO().bind(engine_of(two_layer()))
    with pytest.raises(ValueError, match="'k_proj' matches no trainable"):
        DiZO(pattern="k_proj").bind(engine_of(two_layer()))
    with pytest.raises(ValueError, match="bad DiZO pattern"):
        targets_from_pattern(["a"], "(")
    for bad, message in (({"interval": 0}, "interval must be an integer >= 1, got 0"),
                         ({"iterations": True}, "iterations"), ({"clip": 1.0}, r"clip must be in \[0, 1\)"),
                         ({"search": "bayes"}, "valid: zo, fo"), ({"eps": 0}, "eps must be"),
                         ({"step_size": float("inf")}, "step_size"), ({"fo_init": "one"}, "norm, zero"),
                         ({"fo_l1": -1}, "fo_l1")):
        with pytest.raises(ValueError, match=message):
            DiZO(**bad)


def test_bf16_parameters_project_through_the_fp32_master():
    model = two_layer(torch.bfloat16)
    engine, dizo = bound(model)
    assert engine.tensors[0].master is not None and dizo.anchors[0].dtype == torch.float32
    anchor = dizo.anchors[0].clone()
    with torch.no_grad():
        master = engine.base(0)
        master.add_(0.25 * torch.randn(master.shape, generator=torch.Generator().manual_seed(3)))
        engine.sync(0)
    moved = engine.base(0).view(5, 6).clone()
    dizo.rescale(engine, [1.2])
    expected = anchor + 1.2 * (moved - anchor)
    torch.testing.assert_close(engine.base(0).view(5, 6), expected, rtol=0, atol=1e-6)
    assert torch.equal(model[0].weight, expected.to(torch.bfloat16))
    # the ZO search too: the ratio stays in range and the parameter is the rounded master
    dizo.project(engine, lambda j: float(model[0].weight.float().pow(2).sum()), key=4)
    assert 0.8 <= dizo.last_ratios[0] <= 1.2
    assert torch.equal(model[0].weight, engine.base(0).view(5, 6).to(torch.bfloat16))


def test_mezo_steps_through_the_engine_then_projection():
    """Plain MeZO steps taken with engine.move, then a projection: non-projected tensors are
    bitwise what MeZO alone gives, projected ones are anchor + ratio * Delta."""
    def run(project):
        model = two_layer(torch.float32)
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(4))
        loss = lambda: float(model(x).pow(2).mean())
        engine, dizo = bound(model, interval=3, iterations=4)
        for step in range(3):
            key = zotune.rng.probe_seed(0, step, 0)
            engine.move(((key, 1e-3),))
            plus = loss()
            engine.move(((key, -1e-3),))
            minus = loss()
            engine.move((), Update(ZOGrad(((key, (plus - minus) / 2e-3),)), SGD(), [0.05], [0.0]))
            if project and dizo.due(step):
                dizo.project(engine, lambda j: loss(), key=step)
        return model, dizo

    plain, _ = run(False)
    projected, dizo = run(True)
    assert dizo.searches == 1
    for name in ("0.bias", "1.weight", "1.bias"):
        assert torch.equal(dict(plain.named_parameters())[name], dict(projected.named_parameters())[name])
    anchor = dizo.anchors[0]
    torch.testing.assert_close(projected[0].weight, anchor + dizo.last_ratios[0] * (plain[0].weight - anchor),
                               rtol=1e-6, atol=1e-6)  # float32 rounding
    assert dizo.last_ratios[0] != 1.0


def test_optimizer_wiring_and_state_dict_round_trip():
    model = two_layer()
    opt = zotune.ZOOptimizer(model.named_parameters(), lr=0.0, method="dizo",
                             projection={"pattern": r"^0\.weight$"})
    assert isinstance(opt.projection, DiZO) and [t.name for t in opt.projection.targets] == ["0.weight"]
    displace(model)
    state = opt.projection.state_dict()
    _, other = bound(two_layer(seed=1))
    other.load_state_dict(state)
    assert torch.equal(other.anchors[0], opt.projection.anchors[0])
    with pytest.raises(ValueError, match="other tensors"):
        bound(two_layer(), pattern="bias")[1].load_state_dict(state)
