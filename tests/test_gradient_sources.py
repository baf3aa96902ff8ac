"""The update rules on every gradient source: dense gradients against torch.optim, sparse against
dense, transforms on ZO and dense gradients, and both engines."""
import pytest
import torch

import zotune
from zotune.engines import ENGINES, Update
from zotune.plan import DenseGrad, SparseGrad, ZOGrad
from zotune.updates import SGD, Adam, ClipTensorNorm, Momentum, Normalize, ScalarSign, chain

from helpers import classification_batch, mlp

STEPS = 20
PLAIN_ENGINES = sorted(e for e in ENGINES if not getattr(ENGINES[e], "needs_model", False))
"""Engines that take a bare list of tensors (offload needs a causal LM: tests/test_offload.py)."""
FP32 = dict(rtol=1e-5, atol=1e-6)  # fp32 round-off over 20 steps of different operation orders


def entries(model):
    return [(n, p, 0, zotune.optim.decays(n, p, True)) for n, p in model.named_parameters()]


def grads_of(model, x, y):
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {i: p.grad.detach().clone() for i, p in enumerate(model.parameters())}


def run_engine(engine_name, rule, lr, wd, coupled, steps=STEPS):
    model = mlp()
    x, y = classification_batch()
    engine = ENGINES[engine_name](entries(model), zotune.Gaussian())
    state = [{name: torch.zeros_like(p) for name in rule.state_names} for p in model.parameters()]
    for t in range(steps):
        grad = DenseGrad(grads_of(model, x, y))
        engine.apply(Update(grad, rule, [lr], [wd], step=t + 1, state=lambda i: state[i],
                            coupled_decay=coupled))
    return model


def run_torch(make_opt, steps=STEPS):
    model = mlp()
    x, y = classification_batch()
    opt = make_opt(model)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def groups(model, wd):
    """torch.optim groups with MeZO's rule: no decay on biases and norms."""
    named = list(model.named_parameters())
    decay = [p for n, p in named if zotune.optim.decays(n, p, True)]
    return [{"params": decay, "weight_decay": wd},
            {"params": [p for n, p in named if not zotune.optim.decays(n, p, True)], "weight_decay": 0.0}]


@pytest.mark.parametrize("engine", PLAIN_ENGINES)
def test_dense_sgd_with_momentum_and_weight_decay_equals_torch(engine):
    lr, mu, wd = 0.1, 0.9, 0.05
    ours = run_engine(engine, Momentum(mu), lr, wd, coupled=True)
    theirs = run_torch(lambda m: torch.optim.SGD(groups(m, wd), lr=lr, momentum=mu))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, **FP32)
    plain = run_engine(engine, SGD(), lr, wd, coupled=False)  # decoupled = coupled for SGD
    torch_plain = run_torch(lambda m: torch.optim.SGD(groups(m, wd), lr=lr))
    for a, b in zip(plain.parameters(), torch_plain.parameters()):
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.parametrize("engine", PLAIN_ENGINES)
def test_dense_adam_with_decoupled_decay_equals_adamw(engine):
    lr, wd = 1e-2, 0.1
    ours = run_engine(engine, Adam((0.9, 0.999), 1e-8), lr, wd, coupled=False)
    theirs = run_torch(lambda m: torch.optim.AdamW(groups(m, wd), lr=lr, betas=(0.9, 0.999), eps=1e-8))
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, **FP32)
    assert not torch.equal(next(ours.parameters()), next(mlp().parameters()))  # it moved


def test_coupled_momentum_differs_from_decoupled():
    """Why coupled_decay exists: with momentum, L2 in the gradient is not decoupled decay."""
    a = run_engine("in-memory", Momentum(0.9), 0.1, 0.05, coupled=True, steps=5)
    b = run_engine("in-memory", Momentum(0.9), 0.1, 0.05, coupled=False, steps=5)
    assert not torch.allclose(a[0].weight, b[0].weight, atol=1e-6)


@pytest.mark.parametrize("engine", PLAIN_ENGINES)
def test_sparse_gradient_equals_the_dense_gradient_it_scatters_to(engine):
    g = torch.Generator().manual_seed(3)
    results = []
    for as_sparse in (False, True):
        model = mlp()
        eng = ENGINES[engine](entries(model), zotune.Gaussian(), chunk_size=100)
        state = [{"momentum_buffer": torch.zeros_like(p)} for p in model.parameters()]
        g.manual_seed(3)
        for t in range(5):
            dense, sparse = {}, {}
            for i, p in enumerate(model.parameters()):
                k = min(7, p.numel())
                idx = torch.randperm(p.numel(), generator=g)[:k]
                val = torch.randn(k, generator=g)
                dense[i] = torch.zeros(p.numel()).index_put_((idx,), val).view(p.shape)
                sparse[i] = (idx, val)
            grad = SparseGrad(sparse) if as_sparse else DenseGrad(dense)
            eng.apply(Update(grad, Momentum(0.5), [0.1], [0.01], step=t + 1, state=lambda i: state[i]))
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_dense_gradient_skips_tensors_without_one():
    model = mlp()
    eng = ENGINES["in-memory"](entries(model), zotune.Gaussian())
    before = [p.detach().clone() for p in model.parameters()]
    eng.apply(Update(DenseGrad({0: torch.ones_like(model[0].weight)}), SGD(), [0.1], [0.5]))
    moved = [not torch.equal(p, q) for p, q in zip(model.parameters(), before)]
    assert moved == [True, False, False, False]  # no gradient, no decay either (as torch.optim)


def test_transforms_agree_between_zo_and_dense_gradients():
    """A ZOGrad and the dense tensor it stands for go through clip, normalise and sign alike."""
    model = mlp()
    engine = ENGINES["in-memory"](entries(model), zotune.Gaussian(), chunk_size=64)
    keys = [11, 12, 13]
    grad = ZOGrad(tuple((k, c) for k, c in zip(keys, (0.5, -2.0, 1.5))))
    ref = ENGINES["reference"](entries(mlp()), zotune.Gaussian(), chunk_size=64)

    def dense(g):
        return {i: sum(zotune.plan.coef_at(c, spec.tensor_id) * ref._z(k, i) for k, c in g.terms)
                for i, spec in enumerate(ref.layout)}

    for transform in (ClipTensorNorm(0.7), Normalize(), chain(ClipTensorNorm(3.0), Normalize())):
        zo = dense(transform(grad, engine))
        dn = transform(DenseGrad(dense(grad)), engine).tensors
        for i in zo:
            torch.testing.assert_close(zo[i], dn[i], rtol=1e-5, atol=1e-6)
    signs = ScalarSign()(grad)
    assert [c for _, c in signs.terms] == [1.0, -1.0, 1.0]
    assert torch.equal(ScalarSign()(DenseGrad({0: torch.tensor([-2.0, 0.0, 3.0])})).tensors[0],
                       torch.tensor([-1.0, 0.0, 1.0]))


def test_zo_optimizer_on_the_reference_engine_follows_the_fast_engine():
    x, y = classification_batch()
    runs = []
    for engine in ("in-memory", "reference"):
        model = mlp()
        opt = zotune.ZOOptimizer(model.named_parameters(), lr=1e-2, weight_decay=0.1, seed=3,
                                 method="zo-adam", engine=engine, chunk_size=100)
        losses = [opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y)) for _ in range(15)]
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    torch.testing.assert_close(torch.tensor(runs[0][0]), torch.tensor(runs[1][0]), rtol=1e-5, atol=0)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
