"""Every setting becomes its declared type after loading (YAML 1.1 reads ``1e-5`` as a string,
flags are strings), and a value that cannot gives one line naming the key, the value and the type."""
import pytest

from zotune import ZotuneError, cli
from zotune.config import LEAVES, TrainConfig

# A value written as a string (or a number, for strings) and what it must become, per declared type.
AS_STRING = {int: ("7", 7), float: ("2.5e-1", 0.25), bool: ("true", True), str: (12, "12")}
WRONG = {int: "2.5", float: "fast", bool: "maybe", str: [1, 2]}
WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@pytest.mark.parametrize("leaf", LEAVES, ids=lambda leaf: leaf.dotted)
def test_every_setting_is_converted_to_its_declared_type(leaf):
    given, expected = AS_STRING[leaf.kind]
    for mapping in ({leaf.flat: given}, _nested(leaf, given)):
        value = leaf.get(TrainConfig.from_dict(mapping))
        assert value == expected and type(value) is leaf.kind, (mapping, value)
    if leaf.optional:
        assert leaf.get(TrainConfig.from_dict({leaf.flat: None})) is None
    wrong = WRONG[leaf.kind]
    with pytest.raises(ZotuneError) as e:
        TrainConfig.from_dict({leaf.flat: wrong}, source="run.yaml")
    msg = str(e.value)
    assert msg.startswith(f"setting '{leaf.dotted}' in run.yaml must be {WORDS[leaf.kind]}")
    assert repr(wrong) in msg and "\n" not in msg
    assert (" or null" in msg) == leaf.optional


def _nested(leaf, value) -> dict:
    mapping = value
    for name in reversed(leaf.path):
        mapping = {name: mapping}
    return mapping


def test_yaml_numbers_and_words(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-5\neps: 1e-3\nsteps: 1e3\nmax_time: 36e2\nnum_dev: null\none_sided: 'yes'\n"
                      "defer_update: 'off'\noutput_dir: 2024\nseed: '12345678901234567891'\n"
                      "method: {kernel: {s0: 5e-1, order: '3'}, pezo: {pow2: 'null'}}\n")
    cfg = cli.train_config(cli.parser().parse_args(["train", "--config", str(config)]))
    assert (cfg.method.lr, cfg.method.eps, cfg.run.steps, cfg.run.max_time) == (1e-5, 1e-3, 1000, 3600.0)
    assert cfg.data.num_dev is None and cfg.method.one_sided is True and cfg.engine.defer_update is False
    assert cfg.run.output_dir == "2024" and cfg.run.seed == 12345678901234567891  # exactly, not via float
    assert cfg.method.kernel.s0 == 0.5 and cfg.method.kernel.order == 3 and cfg.method.pezo.pow2 is None


def test_yaml_boolean_for_a_string_setting_says_to_quote_it(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("kernel_schedule: off\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "setting 'method.kernel.schedule'" in err and "got False" in err and "quote" in err


def test_flags_are_converted_like_yaml_values(capsys):
    cfg = cli.train_config(cli.parser().parse_args(["train", "--steps", "1e3", "--num-dev", "none",
                                                    "--lr", "1E-4", "--kernel-order", "5"]))
    assert (cfg.run.steps, cfg.data.num_dev, cfg.method.lr, cfg.method.kernel.order) == (1000, None, 1e-4, 5)
    assert cli.main(["train", "--steps", "abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "zotune: error: --steps must be an integer, got 'abc'"
