"""ElasticZO (issue 11): ZO for the head, backprop for the tail, in one step of the core.

References: the MeZO step (empty tail), ``torch.optim.SGD`` (empty head), the clean tail gradient
(``avg`` is within O(eps^2) of it, ``plus`` within O(eps)), autograd's own bookkeeping (no graph
on the head)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zotune import ZOOptimizer
from zotune.errors import ZotuneError
from zotune.memory import choose_tail
from zotune.models.split import parametrised_layers, tail_names
from zotune.models.vision import OnePassStatistics, lenet5, small_cnn

from helpers import classification_batch, fill_, tiny_llama


def net(dtype=torch.float32, seed=0):
    """A smooth 4-layer tanh MLP: 16 -> 24 -> 24 -> 16 -> 4."""
    m = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 16),
                      nn.Tanh(), nn.Linear(16, 4))
    return fill_(m.to(dtype), seed, scale=0.4)


def closure_of(model, x, y):
    return lambda: F.cross_entropy(model(x), y)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_roles_follow_bp_layers_and_tail_names():
    m = net()
    opt = ZOOptimizer(m, lr=1e-3, method="elasticzo", bp_layers=2)
    roles = {t.name: t.role for t in opt.engine.layout}
    assert [roles[f"{i}.weight"] for i in (0, 2, 4, 6)] == ["zo", "zo", "backprop", "backprop"]
    by_name = ZOOptimizer(m, lr=1e-3, method="elasticzo", tail=["4", "6"])
    assert {t.name: t.role for t in by_name.engine.layout} == roles
    assert parametrised_layers(lenet5(), [n for n, _ in lenet5().named_parameters()]) == ["0", "3", "7", "9", "11"]


def test_empty_tail_is_the_mezo_step_exactly():
    x, y = classification_batch(n=32)
    a, b = net(), net()
    oa = ZOOptimizer(a, lr=1e-2, eps=1e-3, method="elasticzo", bp_layers=0, seed=3)
    ob = ZOOptimizer(b, lr=1e-2, eps=1e-3, method="mezo", seed=3)
    la = [oa.step(closure_of(a, x, y)) for _ in range(5)]
    lb = [ob.step(closure_of(b, x, y)) for _ in range(5)]
    assert la == lb
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 1e-2)])
def test_empty_head_is_the_plain_sgd_step_exactly(momentum, weight_decay):
    x, y = classification_batch(n=32)
    a, b = net(), net()
    oa = ZOOptimizer(a, lr=1e-2, method="elasticzo", bp_layers=4, lr_bp=0.1, seed=3,
                     tail_update="momentum" if momentum else "sgd", tail_momentum=momentum or 0.9,
                     tail_weight_decay=weight_decay)
    assert not oa.engine.layout.with_role("zo")
    # zotune's rule: no weight decay on biases (MeZO's); the same groups for torch.optim.SGD
    groups = [{"params": [p for n, p in b.named_parameters() if n.endswith("weight")]},
              {"params": [p for n, p in b.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]
    sgd = torch.optim.SGD(groups, lr=0.1, momentum=momentum, weight_decay=weight_decay)
    for _ in range(5):
        loss_a = oa.step(closure_of(a, x, y))
        sgd.zero_grad()
        loss_b = F.cross_entropy(b(x), y)
        loss_b.backward()
        sgd.step()
        assert loss_a == float(loss_b.detach())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def tail_grad(mode, eps, x, y):
    """The tail gradient of one step at a fixed point (lr = 0: nothing moves)."""
    m = net(torch.float64)
    opt = ZOOptimizer(m, lr=0.0, eps=eps, method="elasticzo", bp_layers=2, lr_bp=0.0, tail_grad=mode, seed=5)
    opt.step(closure_of(m, x, y))
    grads = opt.core.program.last_tail_grad.tensors
    return torch.cat([grads[i].reshape(-1) for i in sorted(grads)])


def test_avg_tail_gradient_is_second_order_and_plus_first_order_in_eps():
    x, y = classification_batch(n=64, dtype=torch.float64)
    clean = tail_grad("clean", 1e-3, x, y)
    m = net(torch.float64)  # the clean gradient is the true one at the unperturbed point
    F.cross_entropy(m(x), y).backward()
    true = torch.cat([p.grad.reshape(-1) for p in list(m.parameters())[4:]])
    torch.testing.assert_close(clean, true, rtol=1e-12, atol=1e-14)
    err = {(mode, eps): float((tail_grad(mode, eps, x, y) - clean).norm())
           for mode in ("avg", "plus") for eps in (2e-3, 1e-3)}
    avg_ratio = err[("avg", 2e-3)] / err[("avg", 1e-3)]
    plus_ratio = err[("plus", 2e-3)] / err[("plus", 1e-3)]
    assert 3.5 < avg_ratio < 4.5, err   # O(eps^2): halving eps quarters the error
    assert 1.7 < plus_ratio < 2.3, err  # O(eps)
    assert err[("avg", 1e-3)] < 0.1 * err[("plus", 1e-3)]
    # at the default eps avg is within 1e-4 of the clean gradient (relative; measured 5e-5)
    assert float((tail_grad("avg", 1e-3, x, y) - clean).norm()) < 1e-4 * float(clean.norm())


def test_no_autograd_graph_on_head_tensors_and_tail_weights_untouched_by_probes():
    x, y = classification_batch(n=32)
    m = net()
    opt = ZOOptimizer(m, lr=1e-2, eps=1e-3, method="elasticzo", bp_layers=2, lr_bp=0.1, tail_grad="avg")
    tail_before = [p.detach().clone() for p in list(m.parameters())[4:]]
    seen = {"head": [], "tail": [], "tail_weights": []}

    def head_hook(module, inputs, output):
        seen["head"].append((output.requires_grad, output.grad_fn))

    def tail_hook(module, inputs, output):
        seen["tail"].append(output.grad_fn is not None)
        seen["tail_weights"].append([p.detach().clone() for p in module.parameters()])

    for i in (0, 1, 2, 3):
        m[i].register_forward_hook(head_hook)
    m[6].register_forward_hook(tail_hook)
    opt.step(closure_of(m, x, y))
    assert seen["head"] and all(rg is False and fn is None for rg, fn in seen["head"])
    assert seen["tail"] == [True, True]  # both perturbed passes differentiate the tail (avg)
    for weights in seen["tail_weights"]:  # the probes never touch the tail
        assert torch.equal(weights[0], tail_before[2]) and torch.equal(weights[1], tail_before[3])
    assert all(p.grad is None for p in m.parameters())  # autograd.grad: no .grad buffers
    assert all(p.requires_grad for p in m.parameters())  # flags restored


def test_head_weights_bit_identical_after_the_probes_with_master_weights():
    x, y = classification_batch(n=32)
    m = net()
    before = params(m)
    # lr = 0: after the +/- passes and the (zero) update the head must be exactly where it was.
    opt = ZOOptimizer(m, lr=0.0, eps=1e-3, method="elasticzo", bp_layers=2, lr_bp=0.0, master_weights=True)
    for _ in range(3):
        opt.step(closure_of(m, x, y))
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    # in place (MeZO's default) the round trip x + eps z - 2 eps z + eps z is exact up to rounding
    m2 = net()
    opt2 = ZOOptimizer(m2, lr=0.0, eps=1e-3, method="elasticzo", bp_layers=2, lr_bp=0.0)
    opt2.step(closure_of(m2, x, y))
    for p, q in zip(m2.parameters(), before):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_elasticzo_learns_faster_than_mezo_at_equal_steps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, :4].argmax(1))
    losses = {}
    for method, kw in (("mezo", {}), ("elasticzo", {"bp_layers": 2, "lr_bp": 0.2})):
        m = net()
        opt = ZOOptimizer(m, lr=3e-3, eps=1e-3, method=method, seed=1, **kw)
        for _ in range(100):
            opt.step(closure_of(m, x, y))
        losses[method] = float(F.cross_entropy(m(x), y).detach())
    assert losses["elasticzo"] < 0.8 * losses["mezo"], losses


def test_pezo_directions_drive_the_head():
    x, y = classification_batch(n=32)
    m = net()
    opt = ZOOptimizer(m, lr=1e-3, eps=1e-3, method="elasticzo", bp_layers=1, direction="pezo-pool", lr_bp=0.1)
    head = params(m)[:6]
    start = float(F.cross_entropy(m(x), y).detach())
    for _ in range(20):
        opt.step(closure_of(m, x, y))
    assert opt.direction.name == "pezo-pool"
    assert all(not torch.equal(p, q) for p, q in zip(list(m.parameters())[:6], head))
    assert float(F.cross_entropy(m(x), y).detach()) < start


def test_batchnorm_running_statistics_from_the_first_pass_only():
    m = small_cnn(in_channels=1, widths=(4,))
    bn = m[0][1]
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(m).train()
    ref(x)  # one pass: the reference running statistics
    stats = OnePassStatistics(m)
    m.train()
    run = stats.wrap(lambda: m(x))
    run()
    run()  # a second (e.g. the - pass) forward changes nothing
    run()
    assert torch.equal(bn.running_mean, ref[0][1].running_mean)
    assert torch.equal(bn.running_var, ref[0][1].running_var)
    assert int(bn.num_batches_tracked) == 1


def test_bad_tails_are_one_line_errors():
    m = lenet5()
    with pytest.raises(ZotuneError, match=r"bp_layers=6 is not in 0\.\.5: the model has 5 parametrised layers"):
        ZOOptimizer(m, lr=1e-3, method="elasticzo", bp_layers=6)
    with pytest.raises(ZotuneError, match="tail module 'fc' holds no trainable parameter"):
        ZOOptimizer(m, lr=1e-3, method="elasticzo", tail=["fc"])
    with pytest.raises(ValueError, match="unknown tail_grad 'both'"):
        ZOOptimizer(m, lr=1e-3, method="elasticzo", tail_grad="both")
    with pytest.raises(ValueError, match="zo-cons runs the 'conservative' step"):
        ZOOptimizer(m, lr=1e-3, method="zo-cons", bp_layers=1)
    # without the model, the layers are the parameters' owners by name
    assert tail_names(None, ["0.weight", "0.bias", "2.weight", "2.bias"], bp_layers=1) == {"2.weight", "2.bias"}
    with pytest.raises(ZotuneError, match=r"bp_layers=3 is not in 0\.\.2: the model has 2 parametrised layers \(0, 2\)"):
        tail_names(None, ["0.weight", "2.weight"], bp_layers=3)


def test_choose_tail_returns_the_longest_tail_that_fits():
    m = lenet5()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    assert choose_tail(m, 1 << 40, x, y) == 5  # everything fits: all layers by backprop
    with pytest.raises(ZotuneError, match="no ElasticZO split fits 1 bytes"):
        choose_tail(m, 1, x, y)


def test_llm_zo_blocks_with_a_backprop_last_block_under_lora():
    from zotune.models import select_trainable

    model = select_trainable(tiny_llama(), "lora", lora_r=2, lora_alpha=4, seed=0)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    layers = parametrised_layers(model, names)
    assert layers == ["model.layers.0", "model.layers.1"]  # LoRA: only the blocks train
    opt = ZOOptimizer(model, lr=1e-3, eps=1e-2, method="elasticzo", bp_layers=1, lr_bp=1e-2)
    roles = {t.name: t.role for t in opt.engine.layout}
    assert {r for n, r in roles.items() if ".layers.1." in n} == {"backprop"}
    assert {r for n, r in roles.items() if ".layers.0." in n} == {"zo"}
    ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = [opt.step(lambda: model(input_ids=ids, labels=ids).loss) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert any(".layers.1." in n and "lora_B" in n for n in moved)  # the tail took a gradient step
    assert any(".layers.0." in n for n in moved)                    # the head a ZO step


def test_deferred_and_immediate_updates_agree_bitwise():
    x, y = classification_batch(n=32)
    out = []
    for defer in (False, True):
        m = net()
        opt = ZOOptimizer(m, lr=1e-2, eps=1e-3, method="elasticzo", bp_layers=2, lr_bp=0.1, tail_grad="clean",
                          defer_update=defer, seed=2)
        losses = [opt.step(closure_of(m, x, y)) for _ in range(5)]
        opt.flush()
        out.append((losses, params(m), opt.engine.sweeps))
    assert out[0][0] == out[1][0]
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))
    # per step: the three points, the in-place tail update (no draws), the head update (immediate)
    assert out[0][2] - out[1][2] == 4


def test_cli_llm_run_with_a_backprop_last_block(tiny_dir, data_dir, tmp_path):
    """`zotune train --method elasticzo --bp-layers 1` on an LLM under LoRA: the last block's
    adapters by backprop, the first block's by ZO, through the LLM recipe."""
    import json

    from safetensors.torch import load_file

    from zotune import cli

    out = tmp_path / "run"
    args = ["train", "--model", tiny_dir, "--task", "sst2", "--data-dir", data_dir, "--steps", 4,
            "--eval-every", 4, "--num-train", 16, "--num-dev", 8, "--num-test", 8, "--batch-size", 4,
            "--trainable", "lora", "--method", "elasticzo", "--bp-layers", 1, "--lr-bp", 1e-2,
            "--output-dir", out, "--quiet"]
    assert cli.main([str(a) for a in args]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["skipped_steps"] == 0
    trained = load_file(str(out / "checkpoints" / "step-0000004" / "trainable.safetensors"))
    assert any(".layers.1." in n and "lora_B" in n and t.abs().max() > 0 for n, t in trained.items())


@pytest.mark.slow
def test_smollm2_lora_elasticzo_memory_stays_near_inference():
    """SmolLM2-135M under LoRA, ZO for blocks 0..28, backprop for the last block's adapters: the
    step's measured peak (tensor memory above the loaded model) stays within 1.5x of one inference
    forward's (the tail's activations and gradient are small against the forward's working set)."""
    from zotune.memory import peak_bytes
    from zotune.models import load_model, select_trainable

    model, tokenizer = load_model("smollm2-135m")
    model = select_trainable(model, "lora", lora_r=8, lora_alpha=16, seed=0)
    ids = tokenizer(["a sentence of a few words to score, " * 4] * 8, return_tensors="pt").input_ids
    closure = lambda: model(input_ids=ids, labels=ids).loss  # noqa: E731
    with torch.no_grad():
        closure()
        inference = peak_bytes(lambda: closure())
    opt = ZOOptimizer(model, lr=1e-4, eps=1e-2, method="elasticzo", bp_layers=1, lr_bp=1e-3)
    opt.step(closure)
    step = peak_bytes(lambda: opt.step(closure))
    assert step < 1.5 * inference, (step, inference)


def test_a_step_stopped_between_its_points_resumes_bitwise():
    """Ctrl-C after the + pass: the engine keeps that pass's loss and tail gradient, and the
    resumed step differentiates the - pass (the point is read from the engine), bitwise."""
    x, y = classification_batch(n=32)

    def make():
        m = net()
        return m, ZOOptimizer(m, lr=1e-2, eps=1e-3, method="elasticzo", bp_layers=2, lr_bp=0.1,
                              tail_update="momentum", seed=4)

    ref, ref_opt = make()
    ref_losses = [ref_opt.step(closure_of(ref, x, y)) for _ in range(3)]
    m, opt = make()
    opt.step(closure_of(m, x, y))
    calls = [0]

    def stopping():
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return F.cross_entropy(m(x), y)

    with pytest.raises(KeyboardInterrupt):
        opt.step(stopping)
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(m.state_dict())
    m2 = net()
    m2.load_state_dict(weights)
    opt2 = ZOOptimizer(m2, lr=1e-2, eps=1e-3, method="elasticzo", bp_layers=2, lr_bp=0.1,
                       tail_update="momentum", seed=4)
    opt2.load_state_dict(state)
    losses = [opt2.step(closure_of(m2, x, y)) for _ in range(2)]
    assert losses == ref_losses[1:]
    assert all(torch.equal(p, q) for p, q in zip(m2.parameters(), ref.parameters()))
