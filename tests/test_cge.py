"""DeepZero's CGE (dense and sparse) and RGE: against autograd, query counts, masks, the rules."""
from __future__ import annotations

import pytest
import torch

from helpers import classification_batch, mlp, mlp_loss
from zotune import ZOOptimizer
from zotune.plan import SparseGrad


def counted(fn):
    calls = [0]

    def closure():
        calls[0] += 1
        return fn()
    return closure, calls


def dense(grad: SparseGrad, params) -> list[torch.Tensor]:
    out = []
    for i, p in enumerate(params):
        g = torch.zeros(p.numel(), dtype=torch.float64)
        if i in grad.entries:
            idx, v = grad.entries[i]
            g[idx] = v.double()
        out.append(g.view(p.shape))
    return out


@pytest.mark.parametrize("engine", ["in-memory", "reference"])
def test_dense_cge_is_the_autograd_gradient_in_fp64(engine):
    model = mlp(0, torch.float64)
    x, y = classification_batch(1, dtype=torch.float64)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    expected = torch.autograd.grad(loss, params)
    opt = ZOOptimizer(model.named_parameters(), lr=0.1, method="cge", eps=1e-7, engine=engine)
    closure, calls = counted(mlp_loss(model, x, y))
    result = opt.step(closure)
    d = sum(p.numel() for p in params)
    assert calls[0] == d + 1 and opt.forward_passes == d + 1
    assert result == pytest.approx(float(loss.detach()), abs=1e-12)
    got = dense(opt.last_grad, params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-6, rtol=1e-5)  # forward difference: O(mu)
    for p, b, g in zip(params, before, got):  # plain SGD, no weight decay
        torch.testing.assert_close(p.detach(), b - 0.1 * g, atol=1e-15, rtol=0)


def test_reference_and_in_memory_engines_agree():
    """fp64, so the engines' different operation orders (chunked vs whole-tensor) stay at 1e-12."""
    runs = []
    for engine in ("in-memory", "reference"):
        model = mlp(3, torch.float64)
        x, y = classification_batch(4, dtype=torch.float64)
        opt = ZOOptimizer(model.named_parameters(), lr=0.05, method="deepzero", eps=5e-3,
                          engine=engine, sparsity=0.5, weight_decay=5e-4)
        for _ in range(2):
            opt.step(mlp_loss(model, x, y))
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_sparse_cge_touches_only_masked_coordinates_and_costs_s_plus_1():
    model = mlp(1)
    x, y = classification_batch(2)
    opt = ZOOptimizer(model, lr=0.1, method="cge", eps=5e-3, sparsity=0.75)
    layout = opt.core.engine.layout
    active = opt.core.estimator.active(layout)
    names = [s.name for s in layout]
    # weights masked at exactly 25% kept; the hidden bias (a linear's) too; the head bias in full
    for spec in layout:
        n = spec.numel if isinstance(spec.numel, int) else spec.numel()
        kept = len(active[spec.index])
        assert kept == (n if spec.name == "2.bias" else round(0.25 * n)), spec.name
    assert "2.bias" in names
    before = [p.detach().clone() for p in model.parameters()]
    closure, calls = counted(mlp_loss(model, x, y))
    opt.step(closure)
    size = sum(len(v) for v in active.values())
    assert calls[0] == size + 1
    for spec, p, b in zip(layout, model.parameters(), before):
        moved = (p.detach() != b).view(-1).nonzero().view(-1)
        assert set(moved.tolist()) <= set(active[spec.index].tolist())
        assert len(moved) > 0


def test_masks_are_reproducible_redrawn_and_keyed_by_name():
    model = mlp(1)
    opt = ZOOptimizer(model, lr=0.1, method="cge", eps=5e-3, sparsity=0.5)
    est, layout = opt.core.estimator, opt.core.engine.layout
    first = {k: v.clone() for k, v in est.active(layout).items()}
    est.redraw(layout, 0)
    assert all(torch.equal(first[k], v) for k, v in est.active(layout).items())
    est.redraw(layout, 7)
    assert any(not torch.equal(first[k], v) for k, v in est.active(layout).items())


def test_deepzero_update_is_torch_sgd_with_momentum_and_coupled_decay():
    model = mlp(2, torch.float64)
    ref = mlp(2, torch.float64)
    x, y = classification_batch(3, dtype=torch.float64)
    opt = ZOOptimizer(model.named_parameters(), lr=0.1, method="deepzero", eps=1e-4, sparsity=0.5,
                      weight_decay=5e-4)
    torch_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    decays = [p.ndim > 1 for p in ref.parameters()]  # zotune exempts biases from decay
    for _ in range(3):
        opt.step(mlp_loss(model, x, y))
        for p, g, dec in zip(ref.parameters(), dense(opt.last_grad, list(model.parameters())), decays):
            p.grad = g + (0.0 if dec else -5e-4 * p.detach())  # cancel torch's decay where exempt
        torch_opt.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), atol=1e-12, rtol=0)


def test_rge_is_one_sided_spsa_with_q_plus_1_queries():
    model = mlp(0)
    x, y = classification_batch(1)
    opt = ZOOptimizer(model, lr=1e-3, method="rge", eps=5e-3, num_probes=5)
    closure, calls = counted(mlp_loss(model, x, y))
    opt.step(closure)
    assert calls[0] == 6


@pytest.mark.parametrize("bad", [1.0, -0.1, {"0.weight": 1.5}])
def test_bad_sparsity_is_refused(bad):
    with pytest.raises(ValueError, match="sparsity must be in"):
        ZOOptimizer(mlp(0), method="cge", sparsity=bad)


def test_sparsity_needs_a_coordinate_method():
    with pytest.raises(ValueError, match="sparsity applies"):
        ZOOptimizer(mlp(0), method="mezo", sparsity=0.5)


@pytest.mark.slow  # 14 s; fast: the CLI trains CGE and DeepZero in test_deepzero_protocol
def test_cli_trains_cge_deepzero_and_rge_on_a_small_cnn(tmp_path, capsys):
    import json

    from test_images import write_fashion_mnist
    from zotune import cli

    write_fashion_mnist(tmp_path / "data")
    # CGE is d + 1 = 407 forwards a step: two steps each (one epoch is 6), RGE for the whole epoch
    runs = (("cge", ("--steps", "2")), ("deepzero", ("--sparsity", "0.8", "--steps", "2")),
            ("rge", ("--num-probes", "4", "--epochs", "1")))
    for method, extra in runs:
        out = tmp_path / method
        args = ["train", "--task", "fashion-mnist", "--model", "cnn-730", "--data-dir", str(tmp_path / "data"),
                "--batch-size", "16", "--output-dir", str(out), "--quiet", "--method", method,
                "--eval-every", "100", *extra]
        assert cli.main(args) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["method"] == method
        assert summary["steps"] == (6 if method == "rge" else 2)
    capsys.readouterr()
    bad = ["train", "--task", "fashion-mnist", "--model", "cnn-730", "--data-dir", str(tmp_path / "data"),
           "--output-dir", str(tmp_path / "bad"), "--quiet", "--method", "cge", "--sparsity", "1.5", "--steps", "1"]
    assert cli.main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sparsity must be in [0, 1)" in err, err


def _cnn(seed):
    from zotune.models.vision import small_cnn

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return small_cnn(num_classes=4, in_channels=1, widths=(3, 3))


@pytest.mark.parametrize("method,extra", [("cge", {}), ("deepzero", {"sparsity": 0.5, "weight_decay": 5e-4})])
def test_feature_reuse_is_bitwise_plain_cge_with_batchnorm_in_train_mode(method, extra):
    from zotune.models.reuse import ChainLoss
    from zotune.models.vision import OnePassStatistics

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
    runs = []
    for reuse in (False, True):
        model = _cnn(0).train()
        stats = OnePassStatistics(model)
        opt = ZOOptimizer(model, lr=0.05, method=method, eps=5e-3, **extra)
        losses, forwards = [], 0
        for _ in range(2):
            if reuse:
                objective = ChainLoss(model, x, y)
                losses.append(opt.step(stats.wrap(objective)))
                forwards += objective.block_forwards
            else:
                losses.append(opt.step(stats.wrap(lambda: torch.nn.functional.cross_entropy(model(x), y))))
        runs.append((losses, [t.clone() for t in model.state_dict().values()], forwards))
    (la, sa, _), (lb, sb, fb) = runs
    assert la == lb
    assert all(torch.equal(a, b) for a, b in zip(sa, sb))  # parameters and BN running statistics
    blocks = len(list(_cnn(0).children()))
    assert fb < 0.8 * blocks * opt.forward_passes  # the reuse really skipped blocks


def test_chain_loss_restarts_at_the_first_changed_block_and_needs_a_chain():
    from zotune.errors import ZotuneError
    from zotune.models.reuse import ChainLoss

    model = _cnn(1).eval()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    loss = ChainLoss(model, x, y)
    with torch.no_grad():
        full = float(loss())
        head = model[2][2].weight
        head.view(-1)[0] += 0.1
        moved = float(loss())
        expect = float(torch.nn.functional.cross_entropy(model(x), y))
        head.view(-1)[0] -= 0.1
        model[1][0].weight.view(-1)[3] += 0.1
        float(loss())
    assert loss.restarts == [0, 2, 1] and moved == expect and full != moved
    with pytest.raises(ZotuneError, match="chain model"):
        ChainLoss(torch.nn.Linear(2, 2), x, y)


def test_a_cge_step_stopped_between_ask_and_tell_resumes_bitwise():
    from zotune.feedback import Losses

    x, y = classification_batch(6)

    @torch.no_grad()
    def answer(opt, model, query):
        return Losses(opt.evaluate(query, mlp_loss(model, x, y)))

    model = mlp(4)
    opt = ZOOptimizer(model, lr=0.1, method="deepzero", eps=5e-3, sparsity=0.5)
    for _ in range(2):
        opt.step(mlp_loss(model, x, y))
    straight = [p.detach().clone() for p in model.parameters()]

    model = mlp(4)
    opt = ZOOptimizer(model, lr=0.1, method="deepzero", eps=5e-3, sparsity=0.5)
    opt.step(mlp_loss(model, x, y))
    query = opt.ask()  # the second step's coordinate plan, stopped before its answer
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = opt.state_dict()

    model2 = mlp(0)
    model2.load_state_dict(saved_model)
    opt2 = ZOOptimizer(model2, lr=0.1, method="deepzero", eps=5e-3, sparsity=0.5)
    opt2.load_state_dict(saved_opt)
    while (query := opt2.ask()) is not None:
        opt2.tell(answer(opt2, model2, query))
    assert all(torch.equal(a, b.detach()) for a, b in zip(straight, model2.parameters()))


def test_coordinate_methods_refuse_data_parallel_modes():
    with pytest.raises(ValueError, match="use parallel='pertp', not 'ddp'"):
        ZOOptimizer(mlp(0), method="cge", parallel="ddp")
