"""The command line as a new user meets it: every flag explained, the valid values listed from
their registries, one default per flag, --version, negative numbers, --task with --task-file."""
import argparse

import pytest

import zotune
from zotune import cli
from zotune.config import DTYPES, ESTIMATORS, OBJECTIVES, PROJECTIONS, TRAINABLE
from zotune.directions import DIRECTIONS
from zotune.directions.pezo import SCALINGS
from zotune.estimators.kernel import KERNELS, SCHEDULES as KERNEL_SCHEDULES, KernelSPSA
from zotune.optim import METHODS
from zotune.tasks import list_tasks
from zotune.updates import SCHEDULES, UPDATES


def subparser(name: str) -> argparse.ArgumentParser:
    top = cli.parser()
    (sub,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def helps(name: str) -> dict[str, str]:
    """Flag -> its help as printed (%-formatting applied)."""
    parser = subparser(name)
    return {a.option_strings[0]: (a.help % {**vars(a), "prog": parser.prog}) if a.help else ""
            for a in parser._actions if a.option_strings}


@pytest.mark.parametrize("command", ["train", "eval", "plan"])
def test_every_flag_has_help_and_one_default(command):
    for flag, text in helps(command).items():
        assert text.strip(), f"{command} {flag} has no help"
        assert text.lower().count("default") <= 1, f"{command} {flag}: {text}"
    subparser(command).format_help()  # renders (no stray % in a help text)


from zotune.image_trainers import TRAINERS  # noqa: E402 (the image tasks' methods, issue 11)
from zotune.steps.elastic import TAIL_GRADS  # noqa: E402
from zotune.tasks.images import IMAGE_TASKS  # noqa: E402
from zotune.estimators.rge import MODES as RGE_MODES  # noqa: E402 (DeepZero, issue 15)
from zotune.sparsity.grasp import RATIO_METHODS  # noqa: E402

REGISTRIES = {
    "--method": list(METHODS) + [m for m in TRAINERS if m not in METHODS],
    "--task": list_tasks() + list(IMAGE_TASKS), "--tail-grad": TAIL_GRADS, "--trainable": TRAINABLE, "--schedule": SCHEDULES,
    "--dtype": DTYPES, "--objective": OBJECTIVES, "--direction": list(DIRECTIONS),
    "--estimator": ESTIMATORS, "--update": list(UPDATES), "--projection": PROJECTIONS,
    "--kernel-order": [str(k) for k in KERNELS], "--kernel-schedule": KERNEL_SCHEDULES,
    "--kernel-r-sharing": KernelSPSA.R_SHARING, "--kernel-normalization": KernelSPSA.NORMALIZATIONS,
    "--pezo-scaling": SCALINGS,
    "--rge-mode": RGE_MODES, "--layer-ratios": RATIO_METHODS,
}


@pytest.mark.parametrize("flag", REGISTRIES)
def test_choices_are_listed_from_the_registries(flag):
    text = helps("train")[flag]
    listed = text.split("one of: ")[1].split(" [")[0].split(", ")
    assert sorted(listed) == sorted(map(str, REGISTRIES[flag])), text


def test_dtype_help_names_only_accepted_values_and_steps_is_the_total():
    train = helps("train")
    for word in ("bf16", "fp16", "fp32", "half"):
        assert word not in train["--dtype"]
    assert "total" in train["--steps"] and "total" in train["--resume"]
    assert "default: $ZOTUNE_DATA" in train["--data-dir"] and "default: by --trainable" in train["--lr"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"zotune {zotune.__version__}\n"


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "-1e-5", "lr must be >= 0, got -1e-05"),
    ("--eps", "-1E-3", "eps must be > 0, got -0.001"),
    ("--weight-decay", "-2", "weight_decay must be >= 0, got -2.0"),
    ("--max-time", "-inf", "max_time must be > 0 seconds, got -inf"),
])
def test_negative_numbers_reach_the_settings_own_check(tmp_path, capsys, flag, value, message):
    assert cli.main(["train", flag, value, "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == f"zotune: error: {message}"
    args = cli.parser().parse_args(["train", "--seed", "-3", "--kernel-s0", "-.5", "--lr", "-1e-5"])
    assert (args.seed, args.kernel_s0, args.lr) == ("-3", "-.5", "-1e-5")


def test_parse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--lr"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("zotune: error: argument --lr: expected one argument")
    assert "\n" not in err and "--help" in err


def test_task_and_task_file_together_is_an_error(tmp_path, capsys):
    spec = tmp_path / "task.yaml"
    spec.write_text("name: t\ntrain: t.jsonl\ntemplate: '{text}'\nverbalizer: [' a', ' b']\n")
    for command in (["train", "--output-dir", str(tmp_path / "run")], ["eval"]):
        assert cli.main([*command, "--task", "rte", "--task-file", str(spec)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("zotune: error: --task rte and --task-file") and "\n" not in err
        assert str(spec) in err
    config = tmp_path / "run.yaml"
    config.write_text(f"task_file: {spec}\n")
    assert cli.main(["train", "--config", str(config), "--task", "rte"]) == 2
    assert "--task rte and --task-file" in capsys.readouterr().err
