"""DeepZero's protocol: masks at the layer-wise ratios redrawn every K steps, BatchNorm and the
head's bias always estimated, |S| + 1 queries a step, the recipe's defaults, files and errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

from zotune import ZOOptimizer
from zotune.models.vision import small_cnn


def _cnn(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return small_cnn(num_classes=4, in_channels=1, widths=(2, 3))


def test_masks_are_redrawn_every_k_steps_at_the_ratios_and_a_step_costs_s_plus_1():
    model = _cnn()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
    ratios = {"0.0.weight": 0.5, "1.0.weight": 0.75, "2.2.weight": 1.0}
    opt = ZOOptimizer(model, lr=0.05, eps=5e-3, method="deepzero", sparsity=ratios, mask_redraw_steps=3)
    layout, est = opt.core.engine.layout, opt.core.estimator
    dense = {"0.0.bias", "0.1.weight", "0.1.bias", "1.0.bias", "1.1.weight", "1.1.bias", "2.2.bias"}
    masks, calls = [], []
    for _ in range(7):
        active = est.active(layout)
        masks.append({spec.name: tuple(active[spec.index].tolist()) for spec in layout})
        count = [0]

        def closure():
            count[0] += 1
            return torch.nn.functional.cross_entropy(model(x), y)

        opt.step(closure)
        calls.append(count[0])
        for spec in layout:
            n = len(masks[-1][spec.name])
            size = math.prod(spec.shape)
            if spec.name in dense:  # BN parameters, conv biases (not in the ratios) and the head's bias
                assert n == size, spec.name
            else:
                assert n == round((1 - ratios[spec.name]) * size), spec.name
    size = sum(len(v) for v in masks[0].values())
    assert calls == [size + 1] * 7
    changed = [t for t in range(1, 7) if masks[t] != masks[t - 1]]
    assert changed == [3, 6]
    assert masks[0]["2.2.weight"] == ()  # a layer at ratio 1 is not estimated at all


def test_mask_schedule_resumes_from_a_checkpoint():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
    runs = []
    for split in (None, 4):
        model = _cnn(2)
        make = lambda m: ZOOptimizer(m, lr=0.05, eps=5e-3, method="deepzero", sparsity=0.5,  # noqa: E731
                                     mask_redraw_steps=3)
        opt = make(model)
        for t in range(6):
            if t == split:
                saved_model = {k: v.clone() for k, v in model.state_dict().items()}
                saved = opt.state_dict()
                model = _cnn(9)
                model.load_state_dict(saved_model)
                opt = make(model)
                opt.load_state_dict(saved)
            opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_deepzero_needs_a_block_table_and_redraw_needs_cge():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(ValueError, match="needs a model with a block table"):
        ZOOptimizer(Net(), method="deepzero")
    with pytest.raises(ValueError, match="mask_redraw_steps applies"):
        ZOOptimizer(_cnn(), method="mezo", mask_redraw_steps=2)
    with pytest.raises(ValueError, match="mask_redraw_steps must be an integer >= 1"):
        ZOOptimizer(_cnn(), method="deepzero", mask_redraw_steps=0)


def test_deepzero_defaults_and_schedule():
    from zotune.config import TrainConfig
    from zotune.sparsity import protocol

    cfg = protocol.with_deepzero_defaults(TrainConfig.from_flat(task="fashion-mnist", method="deepzero"))
    m = cfg.method
    assert (m.lr, m.eps, m.sparsity, m.weight_decay, m.schedule, m.warmup_epochs, m.mask_redraw_epochs,
            m.layer_ratios) == (0.1, 5e-3, 0.9, 5e-4, "cosine", 3, 5, "zo-grasp")
    options = protocol.schedule_options(cfg, 50 * 196, 196)
    assert options == {"schedule": "cosine", "warmup_steps": 3 * 196, "total_steps": 50 * 196,
                       "mask_redraw_steps": 5 * 196}
    mine = protocol.with_deepzero_defaults(TrainConfig.from_flat(task="fashion-mnist", method="deepzero",
                                                                 lr=0.3, weight_decay=1e-3))
    assert (mine.method.lr, mine.method.weight_decay) == (0.3, 1e-3)
    cge = protocol.with_deepzero_defaults(TrainConfig.from_flat(task="fashion-mnist", method="cge"))
    assert cge.method.layer_ratios is None and cge.method.schedule == "constant"


def _train(tmp_path, out, *extra):
    from zotune import cli

    args = ["train", "--task", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--batch-size", "16",
            "--output-dir", str(tmp_path / out), "--quiet", "--eval-every", "100", *extra]
    return cli.main(args)


def test_cli_cnn_width_cge_and_deepzero_with_saved_ratios(tmp_path, capsys):
    from test_images import write_fashion_mnist

    write_fashion_mnist(tmp_path / "data", n_train=48, n_test=16)
    assert _train(tmp_path, "cge", "--model", "cnn", "--cnn-width", "2", "--method", "cge", "--epochs", "1") == 0
    summary = json.loads((tmp_path / "cge" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["status"] == "completed"
    deep = ("--model", "cnn", "--cnn-width", "2", "--method", "deepzero", "--sparsity", "0.5", "--steps", "2")
    assert _train(tmp_path, "dz", *deep) == 0
    saved = json.loads((tmp_path / "dz" / "layer_ratios.json").read_text())
    assert saved["method"] == "zo-grasp" and saved["num_probes"] == 192 and saved["sparsity"] == 0.5
    assert set(saved["ratios"]) == {"0.0.weight", "1.0.weight", "2.2.weight"}
    summary = json.loads((tmp_path / "dz" / "summary.json").read_text())
    assert summary["layer_ratios"]["ratios"] == saved["ratios"]
    config = json.loads((tmp_path / "dz" / "config.json").read_text())
    assert config["weight_decay"] == 5e-4 and config["schedule"] == "cosine"
    text = (tmp_path / "dz" / "layer_ratios.json").read_text()
    from zotune import cli

    capsys.readouterr()
    # zotune eval rebuilds the run's own trainer (its ratios, mask schedule and lr schedule)
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "dz"), "--which", "latest"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["value"] == summary["test"]
    assert _train(tmp_path, "dz", *deep, "--resume") == 0  # reads the ratios, does not recompute
    assert (tmp_path / "dz" / "layer_ratios.json").read_text() == text
    (tmp_path / "dz" / "layer_ratios.json").unlink()
    capsys.readouterr()
    assert _train(tmp_path, "dz", *deep, "--resume") == 2
    assert "no layer_ratios.json" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (("--model", "cnn", "--method", "deepzero", "--sparsity", "1.5"), "sparsity must be in [0, 1)"),
    (("--model", "cnn", "--method", "deepzero", "--sparsity", "-0.1"), "sparsity must be in [0, 1)"),
    (("--model", "cnn", "--cnn-width", "0", "--method", "cge"), "cnn_width must be an integer >= 1"),
    (("--model", "resnet20", "--cnn-width", "8", "--method", "cge"), "applies to --model cnn only"),
    (("--model", "cnn", "--method", "mezo", "--layer-ratios", "grasp"), "applies to the coordinate-wise"),
    (("--model", "cnn", "--method", "cge", "--mask-redraw-epochs", "0", "--sparsity", "0.5"),
     "mask_redraw_epochs must be an integer >= 1"),
])
def test_cli_bad_inputs_are_one_line_errors(tmp_path, capsys, extra, message):
    from test_images import write_fashion_mnist

    write_fashion_mnist(tmp_path / "data", n_train=48, n_test=16)
    capsys.readouterr()
    assert _train(tmp_path, "bad", *extra, "--steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_resnet20_at_uniform_90_percent_costs_the_research_notes_query_count():
    """Research note B.9: ResNet-20 with 268,336 prunable weights (20 conv/linear layers) and
    1,386 always-dense BatchNorm parameters and head bias, uniform 90% sparsity: 28,221 queries a
    step, counting 10% of all prunable weights at once; rounding each layer's mask on its own
    (round(0.1 d_l), as CGE draws them) gives 28,218."""
    from zotune.models.vision import resnet20
    from zotune.sparsity import prunable, uniform_ratios

    model = resnet20()
    weights = prunable(model)
    assert sum(w.numel() for w in weights.values()) == 268336 and len(weights) == 20
    opt = ZOOptimizer(model, lr=0.1, eps=5e-3, method="deepzero", sparsity=uniform_ratios(model, 0.9))
    queries = opt.core.estimator.forward_passes(opt.core.engine.layout)
    assert queries == 1 + 1386 + sum(round((1 - 0.9) * w.numel()) for w in weights.values()) == 28218
    assert abs(queries - 28221) <= len(weights) / 2
