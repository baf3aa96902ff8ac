"""ElasticZO-INT8: perturbation at use, quantised ZO gradient + stochastic rounding, the integer
backprop tail, integer-only steps, exact resume."""
import io
import math

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from zotune import rng
from zotune.directions.standard import Rademacher
from zotune.errors import ZotuneError
from zotune.quant import ElasticZOInt8, Int8Config, IntSequential, build_elasticzo_int8
from zotune.quant import elasticzo_int8 as trainer_module
from zotune.quant.fixed import quantize
from zotune.quant.noise import PERTURBATION, rademacher_int8, stream_key


def lenet5(num_classes=10, in_channels=1):
    """The interface-contract LeNet-5 (zotune.models.vision.lenet5 builds the same)."""
    return nn.Sequential(nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                         nn.Linear(84, num_classes))


def mlp(seed=0, width=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 4))


def batch(seed=0, n=16, shape=(1, 28, 28), classes=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def params_copy(trainer):
    return {k: v.clone() for k, v in trainer.model.params().items()}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_int8_signs_are_the_float_rademacher_signs():
    z = rademacher_int8(5, 3, "7.weight", 1000, chunk_size=300)
    assert z.dtype == torch.int8 and set(z.unique().tolist()) == {-1, 1}
    ref = torch.cat([Rademacher().chunk(stream_key(5, 3, PERTURBATION, "7.weight", c), torch.empty(hi - lo))[0]
                     for c, (lo, hi) in enumerate(rng.chunk_bounds(1000, 300))])
    assert torch.equal(z.double(), ref.double())
    assert not torch.equal(z, rademacher_int8(5, 4, "7.weight", 1000, chunk_size=300))  # a new step, new signs


def test_converted_lenet_logits_track_the_float_model():
    torch.manual_seed(0)
    model = lenet5()
    x, _ = batch(n=8)
    int_model = IntSequential.from_float(model, headroom_bits=0)
    with torch.no_grad():
        ref = model(x)
    got = int_model.logits(x)
    assert got.shape == ref.shape
    assert float((got - ref).norm() / ref.norm()) < 0.1


def test_converter_rejects_unsupported_layers():
    with pytest.raises(ZotuneError, match="Tanh"):
        IntSequential.from_float(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    with pytest.raises(ZotuneError, match="nn.Sequential|Sequential"):
        IntSequential.from_float(nn.Linear(2, 2))


def test_bp_layers_bounds_are_clear_errors():
    with pytest.raises(ZotuneError, match="between 0 and 5"):
        ElasticZOInt8(lenet5(), Int8Config(bp_layers=6))
    with pytest.raises(ZotuneError, match="at most 3 bp layers"):
        ElasticZOInt8(lenet5(), Int8Config(bp_layers=4))
    with pytest.raises(ZotuneError, match="tail_grad"):
        Int8Config(tail_grad="mean")
    with pytest.raises(ZotuneError, match="momentum"):
        build_elasticzo_int8(lenet5(), {"momentum": 0.9})
    t = ElasticZOInt8(lenet5(), Int8Config(bp_layers=2))
    assert t.tail_names == ["9.weight", "9.bias", "11.weight", "11.bias"]
    assert ElasticZOInt8(lenet5(), Int8Config(bp_layers=0)).tail_names == []


def test_weights_bit_identical_after_the_perturbed_passes():
    t = ElasticZOInt8(lenet5(), Int8Config(bp_layers=1, eps_q=2))
    x, y = batch()
    xq, e = quantize(x)
    before = params_copy(t)
    plus = t._pass(xq, e, y, t._perturb(+1), None)
    minus = t._pass(xq, e, y, t._perturb(-1), {})
    clean = t._pass(xq, e, y, None, None)
    assert_same_params(before, t.model.params())
    assert len({plus, minus, clean}) > 1   # the perturbation did reach the forward


def _expected_head_update_lsb(t, name, delta_loss, batch_size):
    """The real-valued ZO-SGD update in LSBs: -lr * (dL_real / (2 eps_real)) * z / 2**e_w."""
    c, e_w = t.config, t.model.exponents()[name]
    w = t.model.params()[name]
    z = rademacher_int8(c.seed, t.step_count, name, w.numel()).double().view(w.shape)
    if c.zo_grad_quant == "fixed_shift":
        delta_real = delta_loss * 2.0 ** -c.frac_bits * math.log(2) / batch_size
        return -c.lr * delta_real / (2 * c.eps_q * 2.0 ** e_w) * z / 2.0 ** e_w
    s = max(0, abs(delta_loss).bit_length() - c.dynamic_bits)
    g = (delta_loss + (1 << (s - 1))) >> s if s else delta_loss
    return -c.lr * g * 2.0 ** -c.dynamic_bits * z / 2.0 ** e_w


@pytest.mark.parametrize("quant,lr,delta", [("fixed_shift", 2e-4, 3000), ("fixed_shift", 5e-5, -777),
                                            ("dynamic", 3e-4, 100000)])
def test_stochastic_rounding_update_is_unbiased(quant, lr, delta, monkeypatch):
    """Mean of N SR updates vs the real-valued update: each SR error is in (-1, 1) with variance
    <= 1/4 LSB^2, so the mean of N = 400 trials is within 6 * 0.5 / sqrt(N) = 0.15 LSB per weight."""
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 3))
    t = ElasticZOInt8(model, Int8Config(bp_layers=1, lr=lr, zo_grad_quant=quant, seed=3))
    name = "0.weight"
    t.model.set_param(name, torch.zeros(20, 30, dtype=torch.int8))  # far from saturation
    expect = _expected_head_update_lsb(t, name, delta, 32)
    assert 0.05 < float(expect.abs().mean()) < 20
    trials, total = 400, torch.zeros(20, 30, dtype=torch.float64)
    counter = iter(range(10 ** 6))
    monkeypatch.setattr(trainer_module, "rounding_generator", lambda *a: rng.generator(next(counter)))
    for _ in range(trials):
        t.model.set_param(name, torch.zeros(20, 30, dtype=torch.int8))
        t._update_head(delta, 32)
        total += t.model.params()[name].double()
    assert (total / trials - expect).abs().max() < 0.15


def _float_tail_grads(t, xq, e, y):
    """Autograd gradients of the mean natural CE w.r.t. the dequantised tail parameters, on the
    same integer tail input."""
    h, e_h = t.model.forward(xq, e, None, 0, t.tail_start)
    layers = {"Linear": lambda lay: (lambda v: torch.nn.functional.linear(v, *ws[lay.name])),
              "ReLU": lambda lay: torch.relu, "Flatten": lambda lay: (lambda v: v.flatten(1))}
    exps = t.model.exponents()
    ws = {}
    leaves = []
    for lay in t.model.layers[t.tail_start:]:
        if lay.kind == "param":
            w = (lay.weight.double() * 2.0 ** exps[f"{lay.name}.weight"]).requires_grad_()
            b = (lay.bias.double() * 2.0 ** exps[f"{lay.name}.bias"]).requires_grad_()
            ws[lay.name] = (w, b)
            leaves += [(f"{lay.name}.weight", w), (f"{lay.name}.bias", b)]
    v = h.double() * 2.0 ** e_h
    for lay in t.model.layers[t.tail_start:]:
        v = layers[type(lay).__name__[3:]](lay)(v)
    torch.nn.functional.cross_entropy(v, y).backward()
    return {n: p.grad for n, p in leaves}


@pytest.mark.parametrize("rounding", ["nearest", "pseudo"])
def test_integer_tail_gradient_matches_float_backprop(rounding):
    torch.manual_seed(1)
    t = ElasticZOInt8(lenet5(), Int8Config(bp_layers=3, tail_grad="plus", error_rounding=rounding))
    x, y = batch(n=64, seed=2)
    xq, e = quantize(x)
    grads, tape = {}, []
    h, e_h = t.model.forward(xq, e, None, 0, t.tail_start)
    out, e_out = t.model.forward(h, e_h, None, t.tail_start, None, tape)
    _, (err, e_err) = t.ce.loss_and_error(out, e_out, y, rounding=rounding)
    t.model.backward(tape, err, e_err, grads, rounding)
    ref = _float_tail_grads(t, xq, e, y)
    for name in t.tail_names:
        g, e_g = grads[name]
        got = g.double() * 2.0 ** e_g / 64
        cos = float(torch.nn.functional.cosine_similarity(got.flatten(), ref[name].flatten(), dim=0))
        ratio = float(got.norm() / ref[name].norm())
        assert cos > 0.97 and 0.85 < ratio < 1.15, (name, cos, ratio)


class IntegerOnly(TorchDispatchMode):
    """Records every aten op; any floating-point tensor among its inputs or outputs is a failure."""

    def __init__(self):
        super().__init__()
        self.ops, self.float_ops = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(a, torch.Tensor)]
        self.ops.append(func)
        if any(a.is_floating_point() or a.is_complex() for a in tensors):
            self.float_ops.append(str(func))
        return out


@pytest.mark.parametrize("tail_grad,quant", [("avg", "fixed_shift"), ("clean", "dynamic")])
def test_step_is_integer_only(tail_grad, quant):
    t = ElasticZOInt8(lenet5(), Int8Config(bp_layers=2, tail_grad=tail_grad, zo_grad_quant=quant,
                                           weight_decay=1e-4))
    x, y = batch(n=8)
    xq, e = quantize(x)  # the float batch is quantised before the integer step starts
    before = params_copy(t)
    with IntegerOnly() as mode:
        t.step_quantized(xq, e, y)
    assert not mode.float_ops, sorted(set(mode.float_ops))
    names = {str(op) for op in mode.ops}
    assert any("_int_mm" in n for n in names) and len(mode.ops) > 100
    assert any(not torch.equal(before[k], v) for k, v in t.model.params().items())


def test_resume_is_bitwise():
    options = {"lr": 1e-3, "lr_bp": 1e-2, "eps": 1e-3, "seed": 7, "bp_layers": 2, "tail_grad": "avg",
               "momentum": 0.0, "weight_decay": 0.0}
    torch.manual_seed(0)
    model = lenet5()
    batches = [batch(seed=s, n=8) for s in range(4)]
    straight = build_elasticzo_int8(model, options)
    losses = [straight.step(x, y) for x, y in batches]
    first = build_elasticzo_int8(model, options)
    for x, y in batches[:2]:
        first.step(x, y)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = build_elasticzo_int8(model, options)
    resumed.load_state_dict(torch.load(buf))
    assert [resumed.step(x, y) for x, y in batches[2:]] == losses[2:]
    assert_same_params(straight.model.params(), resumed.model.params())
    with pytest.raises(ZotuneError, match="does not match"):
        build_elasticzo_int8(mlp(), options).load_state_dict(first.state_dict())


def _blobs(n, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.randint(0, 4, (n,), generator=g)
    return (centers[y] + torch.randn(n, 16, generator=g)).view(n, 1, 4, 4), y


@pytest.mark.parametrize("bp_layers,quant,lr", [(1, "fixed_shift", 2e-2), (0, "dynamic", 1e-2)])
def test_training_learns_separable_blobs(bp_layers, quant, lr):
    t = ElasticZOInt8(mlp(), Int8Config(bp_layers=bp_layers, lr=lr, lr_bp=5e-2, zo_grad_quant=quant, seed=1))
    xt, yt = _blobs(256, 0)
    start = float((t.logits(xt).argmax(1) == yt).float().mean())
    for s in range(150):
        x, y = _blobs(32, s + 1)
        t.step(x, y)
    acc = float((t.logits(xt).argmax(1) == yt).float().mean())
    assert acc > 0.8 and acc > start + 0.3, (start, acc)


def test_fused_conv_relu_pool_is_bit_identical_to_unfused():
    torch.manual_seed(3)
    model = lenet5()
    fused, plain = IntSequential.from_float(model), IntSequential.from_float(model, fuse=False)
    assert [type(lay).__name__ for lay in fused.layers[:3]] == ["IntConv2d", "IntFused", "IntFused"]
    x, _ = batch(n=21)
    xq, e = quantize(x)
    for perturb in (None, lambda name, q: (q.to(torch.int16) + 3).clamp(-127, 127).to(torch.int8)):
        a, ea = fused.forward(xq, e, perturb)
        b, eb = plain.forward(xq, e, perturb)
        assert ea == eb and torch.equal(a, b)


def test_integer_loss_difference_has_the_float_sign():
    """On a trained toy model, sign(L_q(+) - L_q(-)) matches the float loss difference of the same
    dequantised +-eps_q z weights in >= 95% of 120 draws at eps_q = 4 (measured: 98%; 95% at
    eps_q = 2, 93.5% at 1, where int8 activation rounding flips more of the near-zero differences)."""
    t = ElasticZOInt8(mlp(), Int8Config(bp_layers=1, lr=2e-2, lr_bp=5e-2, seed=1, eps_q=4))
    for s in range(150):
        t.step(*_blobs(32, s + 1))
    agree, draws = 0, 120
    exps = t.model.exponents()
    for k in range(draws):
        x, y = _blobs(64, 1000 + k)
        xq, e = quantize(x)
        t._z_cache = {}
        delta_int = t._pass(xq, e, y, t._perturb(+1), None) - t._pass(xq, e, y, t._perturb(-1), None)
        losses = []
        for sign in (+1, -1):
            state = {n: (q.double() + (sign * 4 * t._z(n, q).double() if n in t.head_names else 0)).clamp(-127, 127)
                     * 2.0 ** exps[n] for n, q in t.model.params().items()}
            reference = mlp().double()
            reference.load_state_dict(state)
            with torch.no_grad():
                losses.append(float(nn.functional.cross_entropy(reference(x.double()), y)))
        t._z_cache = None
        agree += (delta_int > 0) == (losses[0] - losses[1] > 0)
        t.step_count += 1
    assert agree / draws >= 0.95, agree / draws


@pytest.mark.parametrize("s", [3, 20, 40])
def test_sign_update_is_stochastic_rounding_of_z_c(s):
    """``z (q + [u < r])`` has mean ``z c / 2**s`` (std of the mean of 20,000: 0.0032 LSB; bound 0.02),
    and takes only the two neighbouring integers."""
    z = torch.ones(20000, dtype=torch.int8)
    z[::2] = -1
    c = int(5.3 * 2 ** s)
    out = trainer_module._sign_update(z, c, s, rng.generator(s))
    assert set((out * z).unique().tolist()) <= {5, 6}
    assert abs(float((out * z).double().mean()) - c / 2 ** s) < 0.02
    assert torch.equal(trainer_module._sign_update(z, 3, -2, rng.generator(0)), z.to(torch.int16) * 12)
