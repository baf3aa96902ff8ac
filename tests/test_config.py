"""The config: nested and flat YAML, flags over YAML, unknown keys with suggestions, resume rules
derived from the fields, and flat and nested config.json files both loading."""
import json
from pathlib import Path

import pytest

from zotune import ZotuneError, cli
from zotune.config import (FIXED, FREE, LEAVES, DataConfig, MethodConfig, RunConfig, TrainConfig,
                           resume_conflicts, resume_keys)

# The former flat TrainConfig: its 59 field names (= flat names, YAML keys, flags) and the
# RESUME_KEYS it listed by hand. The nested config must keep every one.
OLD_FLAT = ("task task_file model method direction trainable pattern lora_r lora_alpha prefix_tokens "
            "steps batch_size lr eps weight_decay num_probes one_sided schedule warmup_steps "
            "defer_update objective eval_every eval_dev eval_batch_size num_train num_dev num_test "
            "data_dir data_seed seed output_dir log_every max_time max_length dtype device estimator "
            "update projection clip_norm pool_size pezo_bits pezo_scaling pezo_pow2 "
            "pezo_decorrelate_copies pezo_lanes pezo_reuse kernel_order kernel_schedule "
            "kernel_r_sharing kernel_normalization kernel_s0 kernel_shrink_steps dizo_interval "
            "dizo_iterations dizo_eps dizo_step_size dizo_clip dizo_pattern").split()
# Settings added since (issue 10: skip_bad_rows, keep_checkpoints), each with its generated flag;
# config.json holds them only where they are not at their default (TrainConfig.saved), so it keeps the 59 keys.
NEW_FLAT = ("skip_bad_rows", "keep_checkpoints", "engine", "offload_to", "offload_dir", "resident_blocks",
            "parallel", "pertp", "dist_timeout", "transfer_dtype", "storage_dtype",
            "query_batch", "query_exact",  # issue 15
            "offload_sliced")  # issue 14: sliced offload
IMAGE_FLAT = ("epochs", "augment", "bp_layers", "lr_bp", "tail_grad", "momentum",
              "sparsity", "cnn_width", "cnn_depth", "rge_mode", "layer_ratios", "mask_redraw_epochs",
              "warmup_epochs")  # issue 11; sparsity and after: issue 15
OLD_RESUME_KEYS = set(OLD_FLAT) - {"steps", "defer_update", "eval_every", "eval_dev", "eval_batch_size",
                                   "num_test", "data_dir", "output_dir", "log_every", "max_time", "device"}


def args_of(*argv):
    return cli.parser().parse_args(["train", *map(str, argv)])


def yaml_file(tmp_path, text, name="run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


NESTED = """
model: {name: tiny, trainable: lora, lora_r: 4}
data: {task: rte, batch_size: 2, eval-dev: 8}
method:
  name: zo-adam
  lr: 1e-5            # YAML 1.1 reads this as a string; it is coerced
  kernel: {order: 3}
  pezo: {pool_size: 4099, bits: 8}
engine: {defer_update: false}
run: {steps: 7, seed: 3}
"""
FLAT = """
model: tiny
trainable: lora
lora_r: 4
task: rte
batch_size: 2
eval-dev: 8
method: zo-adam
lr: 1.0e-5
kernel_order: 3
pool_size: 4099
pezo_bits: 8
defer_update: false
steps: 7
seed: 3
"""


def test_nested_and_flat_yaml_give_the_same_config(tmp_path):
    nested = cli.train_config(args_of("--config", yaml_file(tmp_path, NESTED)))
    flat = cli.train_config(args_of("--config", yaml_file(tmp_path, FLAT, "flat.yaml")))
    assert nested == flat
    assert nested.model.name == "tiny" and nested.model.trainable == "lora" and nested.model.lora_r == 4
    assert nested.method.name == "zo-adam" and nested.method.lr == 1e-5
    assert nested.method.kernel.order == 3 and nested.method.pezo.pool_size == 4099
    assert nested.method.pezo.bits == 8 and nested.engine.defer_update is False
    assert nested.data.eval_dev == 8 and nested.run.steps == 7 and nested.run.seed == 3
    mixed = TrainConfig.from_dict({"method": {"name": "zo-adam", "kernel_order": 3}, "lr": 1e-5})
    assert (mixed.method.kernel.order, mixed.method.lr) == (3, 1e-5)


def test_flags_override_yaml(tmp_path):
    cfg = cli.train_config(args_of("--config", yaml_file(tmp_path, NESTED), "--lr", 1e-3, "--kernel-order", 5,
                                   "--defer-update", "--steps", 9, "--method", "zo-sign", "--pezo-bits", 4))
    assert cfg.method.lr == 1e-3 and cfg.method.kernel.order == 5 and cfg.engine.defer_update is True
    assert cfg.run.steps == 9 and cfg.method.name == "zo-sign" and cfg.method.pezo.bits == 4
    assert cfg.model.trainable == "lora" and cfg.run.seed == 3  # the rest from the YAML


def test_every_old_flat_name_and_flag_remains():
    assert [leaf.flat for leaf in LEAVES] and {leaf.flat for leaf in LEAVES} == set(OLD_FLAT) | set(NEW_FLAT) | set(IMAGE_FLAT)
    assert set(resume_keys()) == (OLD_RESUME_KEYS | {"steps", "skip_bad_rows"} | set(IMAGE_FLAT)  # steps: only with a constant schedule
                                  | {"transfer_dtype", "storage_dtype", "query_exact"})  # they change the numbers
    parser = cli.parser()
    train = next(a for a in parser._actions if hasattr(a, "choices") and a.choices and "train" in a.choices)
    flags = {o for a in train.choices["train"]._actions for o in a.option_strings}
    for name in (*OLD_FLAT, *NEW_FLAT):
        assert "--" + name.replace("_", "-") in flags, name
    assert {"--no-defer-update", "--no-one-sided", "--no-pezo-pow2", "--no-pezo-decorrelate-copies"} <= flags
    for leaf in LEAVES:
        assert leaf.help and (leaf.resume in (FIXED, FREE) or callable(leaf.resume)), leaf.dotted


def test_round_trips_nested_flat_and_from_flat():
    cfg = TrainConfig.from_flat(task="rte", steps=5, lr=1e-4, kernel_order=3, dizo_interval=2,
                                pool_size=4099, defer_update=False, model="tiny")
    assert cfg == TrainConfig(data=DataConfig(task="rte"), run=RunConfig(steps=5),
                              method=MethodConfig(lr=1e-4, kernel=cfg.method.kernel, dizo=cfg.method.dizo,
                                                  pezo=cfg.method.pezo),
                              engine=cfg.engine, model=cfg.model)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig.from_dict(cfg.flat()) == cfg
    assert cfg.updated({"lr": 1e-3}).method.lr == 1e-3 and cfg.method.lr == 1e-4  # a copy


@pytest.mark.parametrize("text,message", [
    ("stepz: 3\n", "unknown setting 'stepz' in {path}; did you mean: steps?"),
    ("method: {kernal: {order: 3}}\n",
     "unknown setting 'method.kernal' in {path}; did you mean: method.kernel?"),
    ("method: {kernel: {ordr: 3}}\n",
     "unknown setting 'method.kernel.ordr' in {path}; did you mean: method.kernel.order?"),
    ("model: {lr: 1.0e-5}\n", "unknown setting 'model.lr' in {path}; did you mean: method.lr?"),
    ("lr: 1.0e-5\nmethod: {lr: 1.0e-4}\n",
     "setting 'method.lr' is given twice in {path}: as 'lr' and as 'method.lr'"),
    ("run: {steps: 2.5}\n", "setting 'run.steps' in {path} must be an integer, got 2.5"),
    ("lr: fast\n", "setting 'method.lr' in {path} must be a number or null, got 'fast'"),
    ("data: rte\n", "setting 'data' in {path} must be a mapping of its settings"),
])
def test_bad_yaml_keys_are_one_line_errors_with_suggestions(tmp_path, capsys, text, message):
    path = yaml_file(tmp_path, text)
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zotune: error: " + message.format(path=path)) and "\n" not in err


def test_programmatic_unknown_keys_name_the_closest():
    with pytest.raises(ZotuneError, match=r"'stepz' .*TrainConfig.from_flat; did you mean: steps\?"):
        TrainConfig.from_flat(stepz=3)
    with pytest.raises(ZotuneError, match=r"unknown setting 'lr' .* did you mean: method.lr\? .*from_flat\(lr="):
        TrainConfig(lr=1e-5)
    with pytest.raises(ZotuneError, match=r"unknown setting 'method.kernal' .* did you mean: method.kernel\?"):
        MethodConfig(kernal={})


def test_resume_rules_are_derived_from_the_fields():
    saved = TrainConfig.from_flat(lr=1e-3, eps=1e-3, steps=3)
    assert resume_conflicts(saved, saved.updated({"lr": 1e-2})) == ["lr=0.001 (now 0.01)"]
    free = saved.updated({"output_dir": "elsewhere", "log_every": 1, "eval_every": 1, "max_time": 5.0,
                          "device": "cpu", "defer_update": False, "num_test": 10, "data_dir": "d"})
    assert resume_conflicts(saved, free) == []
    assert resume_conflicts(saved, saved.updated({"steps": 6})) == []  # constant schedule: may grow
    for schedule in ("linear", "cosine"):
        run = saved.updated({"schedule": schedule})
        (conflict,) = resume_conflicts(run, run.updated({"steps": 6}))
        assert conflict.startswith("steps=3 (now 6): ") and schedule in conflict and "horizon" in conflict
    assert [c.split("=")[0] for c in resume_conflicts(saved, saved.updated({"kernel_order": 3, "seed": 1}))] \
        == ["kernel_order", "seed"]


def test_zotune_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for line in ("models:", "tasks:", "methods:", "directions:", "trainable:  full, lora, prefix, pattern",
                 "objectives: auto"):
        assert line in out


# ----------------------------------------------------------------- end to end, on a tiny Llama
def train(tiny_dir, data_dir, out, steps, *extra):
    return cli.main([str(a) for a in ["train", "--model", tiny_dir, "--task", "sst2", "--data-dir", data_dir,
                                      "--steps", steps, "--eval-every", 2, "--num-train", 8, "--num-dev", 4,
                                      "--num-test", 4, "--batch-size", 2, "--lr", 1e-3, "--output-dir", out,
                                      "--quiet", *extra]])


def test_steps_may_not_change_on_resume_with_a_decaying_schedule(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_dir, data_dir, out, 2, "--schedule", "cosine") == 0
    capsys.readouterr()
    assert train(tiny_dir, data_dir, out, 4, "--schedule", "cosine", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zotune: error: cannot resume") and "\n" not in err
    assert "steps=2 (now 4)" in err and "'cosine'" in err and "horizon" in err and "--steps 2" in err


def test_flat_and_nested_config_json_both_resume_and_evaluate(tiny_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(tiny_dir, data_dir, out, 2) == 0
    flat = json.loads((out / "config.json").read_text())
    assert set(flat) == set(OLD_FLAT)  # written as zotune 0.1 wrote it: the 59 keys, flat
    nested = TrainConfig.from_dict(flat).to_dict()
    assert set(nested) == {"model", "data", "method", "engine", "run"}
    (out / "config.json").write_text(json.dumps(nested, indent=1))
    capsys.readouterr()
    assert cli.main(["train", "--output-dir", str(out), "--lr", "1e-2", "--resume", "--quiet"]) == 2
    assert "lr=0.001 (now 0.01)" in capsys.readouterr().err
    assert cli.main(["train", "--output-dir", str(out), "--steps", "3", "--resume", "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    (out / "config.json").write_text(json.dumps(nested, indent=1))
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out), "--which", "latest"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["examples"] == 4
