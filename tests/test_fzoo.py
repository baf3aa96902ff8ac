"""FZOO (research/fzoo.md): the estimate's direction, its invariance to loss scale and shift, the
sigma skip, N >= 2, the single update sweep against N sequential updates, resume, both forms."""
import copy
import math

import pytest
import torch

import zotune
from zotune.directions import Rademacher, materialize
from zotune.estimators import FZOO
from zotune.plan import ZOGrad


def quadratic(d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    a = a @ a.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=torch.float64))
    w = lambda: model.weight.detach().view(-1)  # noqa: E731
    return model, lambda: float(0.5 * w() @ a @ w() + b @ w()), lambda: a @ w() + b


def test_plan_is_centre_first_then_n_one_sided_probes_and_combine_by_hand():
    est = FZOO(1e-2, num_probes=4, std_ddof=0, scale="code")
    plan = est.plan(lambda j: 100 + j)
    assert plan.points == ((),) + tuple(((j, 1e-2),) for j in range(4)) and plan.keys == (100, 101, 102, 103)
    losses = [1.0, 1.2, 0.9, 1.1, 1.0]
    sigma = math.sqrt(sum((v - 1.05) ** 2 for v in losses[1:]) / 4)
    grad = est.combine(plan, losses)
    assert [c for _, c in grad.terms] == pytest.approx([(v - 1.0) / (4 * sigma) for v in losses[1:]], rel=1e-12)
    paper = FZOO(1e-2, num_probes=4)  # sample std and 1/eps
    sigma1 = math.sqrt(sum((v - 1.05) ** 2 for v in losses[1:]) / 3)
    assert [c for _, c in paper.combine(plan, losses).terms] == pytest.approx(
        [(v - 1.0) / (1e-2 * 4 * sigma1) for v in losses[1:]], rel=1e-12)


def test_direction_agrees_with_the_true_gradient():
    """Statistical: the mean of many single-step estimates at one point, over independent keys,
    points along the true gradient (cosine > 0.9; the per-step cosine is about sqrt(N/d) = 0.45
    and averaging 400 of them leaves a standard error of the cosine near 0.02)."""
    model, loss, grad_fn = quadratic()
    est = FZOO(1e-4, num_probes=8, std_ddof=0, scale="code")
    d, mean = 40, torch.zeros(40, dtype=torch.float64)
    weight = model.weight.detach().clone()
    for s in range(400):
        plan = est.plan(lambda j: zotune.rng.probe_seed(7, s, j))
        zs, losses = [], []
        for point in plan.points:
            z = torch.zeros(d, dtype=torch.float64)
            for j, a in point:
                zj = materialize(Rademacher(), plan.keys[j], 0, d, dtype=torch.float64)
                zs.append(zj)
                z = a * zj
            with torch.no_grad():
                model.weight.copy_(weight + z.view(1, -1))
            losses.append(loss())
        with torch.no_grad():
            model.weight.copy_(weight)
        g = est.combine(plan, losses)
        mean += sum(c * z for (_, c), z in zip(g.terms, zs)) / 400
    true = grad_fn()
    cosine = float(mean @ true / (mean.norm() * true.norm()))
    assert cosine > 0.9, cosine


@pytest.mark.parametrize("form", ["fzoo", "fzoo-code"])
def test_step_is_invariant_to_loss_scale_and_shift(form):
    """Normalised SGD: multiplying the loss by 100 or adding 5 changes no parameter (to 1e-9)."""
    results = []
    lr = 0.01 * (1e-4 if form == "fzoo" else 1.0)  # the paper's step carries 1/eps: lr = eta * eps
    for transform in (lambda v: v, lambda v: 100 * v, lambda v: v + 5):
        model, loss, _ = quadratic()
        opt = zotune.ZOOptimizer(model.named_parameters(), lr=lr, eps=1e-4, method=form, seed=3)
        for _ in range(10):
            opt.step(lambda: transform(loss()))
        results.append(model.weight.detach().clone())
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=0, atol=1e-9)


def test_code_form_does_not_depend_on_eps_on_a_linear_loss():
    steps = []
    for eps in (1e-4, 1e-2):
        model = torch.nn.Linear(30, 1, bias=False).double()
        with torch.no_grad():
            model.weight.fill_(0.1)
        c = torch.linspace(-1, 1, 30, dtype=torch.float64)
        opt = zotune.ZOOptimizer(model.named_parameters(), lr=0.01, eps=eps, method="fzoo-code", seed=1)
        opt.step(lambda: float(model.weight.view(-1) @ c))
        steps.append(model.weight.detach().clone())
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-9, atol=1e-12)


def test_zero_spread_skips_the_step_and_n_below_two_is_refused():
    model, _, _ = quadratic()
    opt = zotune.ZOOptimizer(model.named_parameters(), lr=0.01, method="fzoo")
    before = model.weight.detach().clone()
    assert math.isnan(opt.step(lambda: 1.0))  # every loss equal: sigma = 0
    assert opt.skipped_steps == 1 and torch.equal(model.weight, before)
    with pytest.raises(ValueError, match="num_probes must be an integer >= 2, got 1"):
        zotune.ZOOptimizer(model.named_parameters(), method="fzoo", num_probes=1)
    with pytest.warns(UserWarning, match="heavy-tailed"):
        FZOO(num_probes=2)
    with pytest.raises(ValueError, match="valid: paper, code"):
        FZOO(scale="mine")


def test_one_update_sweep_equals_n_sequential_updates():
    """The engine applies the N terms in one sweep; applying them one probe at a time (the code's N
    rounded writes) gives the same fp32 parameters within round-off."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 4))
    x = torch.randn(16, 64)
    loss = lambda: float(model(x).pow(2).mean())  # noqa: E731
    opt = zotune.ZOOptimizer(model.named_parameters(), lr=0.01, method="fzoo-code", seed=2)
    start = [p.detach().clone() for p in model.parameters()]
    opt.step(loss)
    fused = [p.detach().clone() for p in model.parameters()]
    engine = zotune.engines.InMemoryEngine([(n, p, 0, True) for n, p in model.named_parameters()],
                                           Rademacher())
    with torch.no_grad():
        for p, s in zip(model.parameters(), start):
            p.copy_(s)
    for key, c in opt.last_grad.terms:  # one probe at a time
        engine.apply(zotune.engines.Update(ZOGrad(((key, c),)), zotune.updates.SGD(), [0.01], [0.0]))
    for p, q in zip(model.parameters(), fused):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
    assert opt.forward_passes == 9 and opt.engine.sweeps == 9  # centre + 8 probes; last restore fused


@pytest.mark.parametrize("form", ["fzoo", "fzoo-code"])
def test_resume_is_bitwise(form):
    def make():
        model, loss, _ = quadratic()
        return model, loss, zotune.ZOOptimizer(model.named_parameters(), lr=0.01, method=form, seed=4)

    model, loss, opt = make()
    for _ in range(8):
        opt.step(loss)
    straight = model.weight.detach().clone()
    model, loss, opt = make()
    for _ in range(3):
        opt.step(loss)
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    model, loss, opt = make()
    model.load_state_dict(weights)
    opt.load_state_dict(state)
    for _ in range(5):
        opt.step(loss)
    assert torch.equal(model.weight, straight)


def test_fzoo_trains_and_reports_the_centre_loss():
    model, loss, _ = quadratic()
    opt = zotune.ZOOptimizer(model.named_parameters(), lr=0.05, eps=1e-3, method="fzoo-code", seed=0)
    start = loss()
    first = opt.step(loss)
    assert first == pytest.approx(start, rel=1e-12)  # the logged loss is l_0
    for _ in range(100):
        opt.step(loss)
    assert loss() < 0.5 * start


def test_fzoo_composes_with_a_gaussian_direction():
    model, loss, _ = quadratic()
    opt = zotune.ZOOptimizer(model.named_parameters(), lr=0.05, eps=1e-3, method="fzoo-code",
                             direction="gaussian", seed=0)
    start = loss()
    for _ in range(100):
        opt.step(loss)
    assert type(opt.direction).__name__ == "Gaussian" and loss() < 0.5 * start


def test_fzoo_under_lora_moves_only_the_adapters():
    from zotune.models import select_trainable, tiny_model
    from zotune.objectives import CandidateScorer
    from zotune.tasks.base import Example

    model, tok = tiny_model("llama", seed=3)
    model = select_trainable(model, "lora", seed=0)
    model.eval()
    scorer = CandidateScorer(model, tok, max_length=64)
    examples = [Example(prompt="It was" + " the" * i, candidates=(" great", " bad"), label=i % 2) for i in range(4)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = zotune.ZOOptimizer(model, lr=1e-2, eps=1e-2, method="fzoo-code", seed=0)
    for _ in range(3):
        opt.step(lambda: scorer.classification_loss(examples))
    assert opt.forward_passes == 27 and opt.skipped_steps == 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == ("lora_" not in n), n


def test_fzoo_with_a_backprop_tail_and_a_skipped_head_step():
    """ElasticZO's split: FZOO drives the head, backprop the tail, from the same N + 1 forwards;
    when the head's losses have no spread (the loss ignores the head) the head step is skipped and
    the tail is still updated."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    x = torch.randn(8, 4)
    head, tail = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    opt = zotune.ZOOptimizer(model.named_parameters(), lr=0.01, method="fzoo-code", bp_layers=1, lr_bp=0.1,
                             model=model, seed=0)
    opt.step(lambda: model[1](x).pow(2).mean())  # the head is never called: every loss is equal
    assert torch.equal(model[0].weight, head) and not torch.equal(model[1].weight, tail)
    assert opt.forward_passes == 9
    opt.step(lambda: model(x).pow(2).mean())
    assert not torch.equal(model[0].weight, head)


def test_cli_default_lr_of_the_code_form_is_the_papers_over_eps():
    from zotune.config import TrainConfig

    paper = TrainConfig.from_flat(method="fzoo").resolved().method
    code = TrainConfig.from_flat(method="fzoo-code").resolved().method
    assert code.lr == pytest.approx(paper.lr / paper.eps) and code.eps == paper.eps
    assert TrainConfig.from_flat(method="fzoo-code", lr=0.5).resolved().method.lr == 0.5


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_cli_default_lr_is_fzoos_step_length_not_mezos(trainable):
    """FZOO's normalised step moves lr/eps whatever the loss's scale: its default is its own
    step length (FZOO_STEP), not MeZO's lr, which the other methods take."""
    from zotune.config import DEFAULT_LR, FZOO_STEP, TrainConfig

    resolve = lambda m: TrainConfig.from_flat(method=m, trainable=trainable).resolved().method  # noqa: E731
    paper, code, mezo, pezo = resolve("fzoo"), resolve("fzoo-code"), resolve("mezo"), resolve("pezo")
    assert code.lr == FZOO_STEP[trainable] and paper.lr == pytest.approx(FZOO_STEP[trainable] * paper.eps)
    assert mezo.lr == pezo.lr == DEFAULT_LR[trainable] != paper.lr
