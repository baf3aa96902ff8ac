"""ZOOptimizer against the MeZO reference, and its contracts: round trip, determinism, resume,
low precision, micro-batches, bad input."""
import copy
import math

import pytest
import torch

import zotune
from zotune._reference import MeZOReference
from zotune.engines import in_memory

from helpers import classification_batch, lm_batch, lm_loss, mlp, mlp_loss, tiny_llama

# fp32 tolerances for the fast path against the reference over 20 steps. The two differ only in
# rounding order (the fast path fuses restore and update into one add per direction), and
# pg = (l+ - l-) / (2 eps) amplifies a loss rounding difference by 1 / (2 eps).
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-4


def run_pair(make_model, make_loss, steps=20, defer_update=False, **kw):
    fast, ref = make_model(), make_model()
    opt = zotune.ZOOptimizer(fast.named_parameters(), method="mezo", chunk_size=256,
                             defer_update=defer_update, **kw)
    reference = MeZOReference(ref.named_parameters(), chunk_size=256, **kw)
    fast_losses = [opt.step(make_loss(fast)) for _ in range(steps)]
    ref_losses = [reference.step(make_loss(ref)) for _ in range(steps)]
    opt.flush()
    return fast, ref, fast_losses, ref_losses


@pytest.mark.parametrize("defer", [False, True])
def test_mezo_follows_reference_on_mlp(defer):
    x, y = classification_batch()
    fast, ref, lf, lr_ = run_pair(mlp, lambda m: mlp_loss(m, x, y), lr=1e-2, eps=1e-3,
                                  weight_decay=0.1, seed=3, defer_update=defer)
    torch.testing.assert_close(torch.tensor(lf), torch.tensor(lr_), rtol=LOSS_RTOL, atol=0)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=PARAM_ATOL, msg=name)
    assert lf[-1] < lf[0]  # and it is training


def test_mezo_follows_reference_on_tiny_llama():
    ids = lm_batch()
    fast, ref, lf, lr_ = run_pair(tiny_llama, lambda m: lm_loss(m, ids), lr=1e-3, eps=1e-3, seed=1)
    torch.testing.assert_close(torch.tensor(lf), torch.tensor(lr_), rtol=LOSS_RTOL, atol=0)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=PARAM_ATOL, msg=name)


def ulps(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, scale: float) -> int:
    """Largest distance between a and b in ulps of ``|b| + scale``: the +eps z / -2 eps z / +eps z
    round trip rounds at the magnitude of the perturbed value, not of the weight alone."""
    spacing = torch.finfo(dtype).eps * (b.abs() + scale)
    return int(math.ceil(float(((a - b).abs() / spacing).max())))


@pytest.mark.parametrize("dtype,budget", [(torch.float64, 4), (torch.float32, 4),
                                          (torch.bfloat16, 0), (torch.float16, 0)])
@pytest.mark.parametrize("direction", ["gaussian", "pooled"])
def test_round_trip_with_zero_lr(dtype, budget, direction):
    """With lr = 0 a step must return the parameters to where they were. In place (fp32/fp64) the
    three rounded adds may leave a few ulps; in bf16/fp16 the master copy makes it exact."""
    model = mlp(dtype=dtype)
    x, y = classification_batch(dtype=dtype)
    before = [p.detach().clone() for p in model.parameters()]
    opt = zotune.ZOOptimizer(model.parameters(), lr=0.0, eps=1e-2, direction=direction)
    for _ in range(5):
        opt.step(mlp_loss(model, x, y))
    for p, q in zip(model.parameters(), before):
        # |eps z| < 5 eps for every element drawn here
        assert ulps(p.detach().double(), q.double(), dtype, 5e-2) <= budget


def test_low_precision_without_master_drifts():
    """Why master weights exist: MeZO's in-place bf16 arithmetic does not restore the weights."""
    model = mlp(dtype=torch.bfloat16)
    x, y = classification_batch(dtype=torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    opt = zotune.ZOOptimizer(model.parameters(), lr=0.0, eps=1e-2, master_weights=False)
    for _ in range(5):
        opt.step(mlp_loss(model, x, y))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_bf16_master_accumulates_updates_below_one_ulp():
    """Each update is ~1e-3 of a bf16 ulp: rounded away in place, kept exactly by the master."""
    model = mlp(dtype=torch.bfloat16)
    x, y = classification_batch(dtype=torch.bfloat16)
    start = [p.detach().float().clone() for p in model.parameters()]
    opt = zotune.ZOOptimizer(model.parameters(), lr=1e-7, eps=1e-2)
    expected = [s.clone() for s in start]
    for _ in range(10):
        opt.step(mlp_loss(model, x, y))
        # the dense update the master must have received: -lr * sum_k c_k z_k, per tensor
        for i, (e, t) in enumerate(zip(expected, opt.engine.tensors)):
            for key, c in opt.last_grad.terms:
                z = zotune.directions.materialize(opt.direction, key, t.tensor_id, t.param.numel())
                e.view(-1).add_(z, alpha=-1e-7 * c)
    for e, t in zip(expected, opt.engine.tensors):
        torch.testing.assert_close(t.master, e.view(-1), rtol=0, atol=1e-7)
        assert not torch.equal(t.master, t.param.detach().float().view(-1) * 0 + t.master[0])
    moved = sum(int((t.master - s.view(-1)).abs().max() > 0) for t, s in zip(opt.engine.tensors, start))
    assert moved == len(start)


@pytest.mark.parametrize("threaded", [False, True])
def test_two_runs_with_one_seed_are_bitwise_equal(threaded, monkeypatch):
    if threaded:
        monkeypatch.setattr(in_memory, "PARALLEL_MIN_NUMEL", 0)
    x, y = classification_batch()
    results = []
    for _ in range(2):
        model = mlp()
        opt = zotune.ZOOptimizer(model.named_parameters(), lr=1e-2, seed=5, chunk_size=64,
                                 threads=2 if threaded else 1)
        losses = [opt.step(mlp_loss(model, x, y)) for _ in range(10)]
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_threaded_sweeps_equal_serial_sweeps(monkeypatch):
    monkeypatch.setattr(in_memory, "PARALLEL_MIN_NUMEL", 0)
    x, y = classification_batch()
    out = []
    for threads in (1, 2):
        model = mlp()
        opt = zotune.ZOOptimizer(model.named_parameters(), lr=1e-2, chunk_size=64, threads=threads,
                                 method="zo-adam")
        for _ in range(5):
            opt.step(mlp_loss(model, x, y))
        out.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*out))


RESUME_CASES = [dict(method="mezo"), dict(method="mezo", defer_update=True),
                dict(method="zo-adam"), dict(method="zo-momentum", lr=1e-3),
                dict(method="zo-sign", direction="pooled"), dict(method="zo-cons"),
                dict(method="mezo", schedule="cosine", warmup_steps=3, total_steps=20)]


@pytest.mark.parametrize("kw", RESUME_CASES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_save_load_continue_equals_uninterrupted(kw):
    x, y = classification_batch()
    kw = {"lr": 1e-2, **kw}

    def make():
        model = mlp()
        return model, zotune.ZOOptimizer(model.named_parameters(), seed=9, **kw)

    model, opt = make()
    for _ in range(12):
        opt.step(mlp_loss(model, x, y))
    opt.flush()
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model, opt = make()
    for _ in range(5):
        opt.step(mlp_loss(model, x, y))
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    model, opt = make()
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved_opt)
    for _ in range(7):
        opt.step(mlp_loss(model, x, y))
    opt.flush()
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted, model.parameters()))


def test_bf16_resume_restores_master():
    x, y = classification_batch(dtype=torch.bfloat16)

    def make():
        model = mlp(dtype=torch.bfloat16)
        return model, zotune.ZOOptimizer(model.named_parameters(), lr=1e-4, seed=2)

    model, opt = make()
    for _ in range(8):
        opt.step(mlp_loss(model, x, y))
    reference = [t.master.clone() for t in opt.engine.tensors]
    model, opt = make()
    for _ in range(3):
        opt.step(mlp_loss(model, x, y))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    model, opt = make()
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved_opt)
    for _ in range(5):
        opt.step(mlp_loss(model, x, y))
    assert all(torch.equal(a, t.master) for a, t in zip(reference, opt.engine.tensors))


def test_micro_batches_average_the_loss_with_the_same_directions():
    x, y = classification_batch(n=32, dtype=torch.float64)
    a, b = mlp(dtype=torch.float64), mlp(dtype=torch.float64)
    whole = zotune.ZOOptimizer(a.parameters(), lr=1e-2, seed=4)
    parts = zotune.ZOOptimizer(b.parameters(), lr=1e-2, seed=4)
    for _ in range(5):
        whole.step(mlp_loss(a, x, y))
        parts.step([mlp_loss(b, x[:16], y[:16]), mlp_loss(b, x[16:], y[16:])])
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert parts.forward_passes == 2 * whole.forward_passes


def test_nan_loss_skips_the_step():
    model = mlp()
    x, y = classification_batch()
    opt = zotune.ZOOptimizer(model.parameters(), lr=1e-2)
    opt.step(mlp_loss(model, x, y))
    before = [p.detach().clone() for p in model.parameters()]
    calls = iter([1.0, float("nan")])
    assert math.isnan(opt.step(lambda: next(calls)))
    assert opt.skipped_steps == 1
    for p, q in zip(model.parameters(), before):  # back where it was, up to the round trip
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)


def test_deferred_update_is_applied_by_flush():
    model = mlp()
    x, y = classification_batch()
    opt = zotune.ZOOptimizer(model.parameters(), lr=1e-2, defer_update=True)
    opt.step(mlp_loss(model, x, y))
    assert opt.engine.current  # still perturbed
    opt.flush()
    assert not opt.engine.current and opt._pending is None


def test_frozen_parameters_are_untouched():
    model = mlp()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    x, y = classification_batch()
    opt = zotune.ZOOptimizer(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.step(mlp_loss(model, x, y))
    assert torch.equal(model[0].weight, frozen)


def test_weight_decay_skips_biases_and_norms():
    from zotune.optim import decays
    w = torch.zeros(2, 2)
    assert decays("model.layers.0.mlp.up_proj.weight", w, True)
    for name in ("model.layers.0.input_layernorm.weight", "model.norm.weight", "fc.bias",
                 "transformer.h.0.ln_1.weight", "ln_f.weight"):
        assert not decays(name, w, True)
    assert not decays("p", torch.zeros(3), False) and decays("p", w, False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(eps=0.0), "eps"), (dict(eps=-1e-3), "eps"),
    (dict(method="adamw"), "valid methods: mezo"), (dict(direction="sobol"), "valid directions"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(schedule="step"), "valid schedules"),
    (dict(schedule="cosine"), "total_steps"), (dict(momentum=1.5, method="zo-momentum"), "momentum"),
])
def test_bad_arguments_give_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zotune.ZOOptimizer(mlp().parameters(), **kwargs)


def test_non_float_parameters_are_rejected():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False)
    p.requires_grad_  # integer tensors cannot require grad; pass one through a fake tensor list
    fake = torch.zeros(3, dtype=torch.int32)
    with pytest.raises(TypeError, match="floating point"):
        zotune.engines.InMemoryEngine([("counts", fake, 0, False)], zotune.Gaussian())


def test_step_without_closure_and_without_params():
    with pytest.raises(ValueError, match="closure"):
        zotune.ZOOptimizer(mlp().parameters()).step()
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        zotune.ZOOptimizer(frozen.parameters())


def test_load_state_dict_rejects_mismatches():
    opt = zotune.ZOOptimizer(mlp().parameters(), method="mezo")
    other = zotune.ZOOptimizer(mlp().parameters(), method="zo-adam")
    with pytest.raises(ValueError, match="method"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="ZOOptimizer"):
        opt.load_state_dict({"state": {}, "param_groups": []})
