"""Bad data fails at load, not when the row is sampled hours later: every reader (SST-2 TSV,
SuperGLUE JSONL, SQuAD JSON, custom JSONL) names the file, the line and what is wrong in one line;
``skip_bad_rows`` (``--skip-bad-rows``) skips and counts such rows instead."""
import json
from pathlib import Path

import pytest

from zotune import cli
from zotune.tasks import TaskDataError, get_task, load_custom_task

SIZES = dict(num_train=4, num_dev=2, num_test=4)


def head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return b"".join(f.readline() for _ in range(n))


def one_line_error(load, *where) -> str:
    with pytest.raises(TaskDataError) as e:
        load()
    msg = str(e.value)
    assert "\n" not in msg and "--skip-bad-rows" in msg, msg
    for part in where:
        assert part in msg, (part, msg)
    return msg


# ------------------------------------------------------------------------------------- SST-2
def sst2_dir(tmp_path, data_dir, bad_line: bytes) -> tuple[Path, Path]:
    """A small copy of SST-2 (header + 12 rows) whose train.tsv gets ``bad_line`` as line 6."""
    root = tmp_path / "data"
    (root / "sst2").mkdir(parents=True)
    lines = head(data_dir / "sst2" / "train.tsv", 13).splitlines(keepends=True)
    train = root / "sst2" / "train.tsv"
    train.write_bytes(b"".join(lines[:5]) + bad_line + b"".join(lines[5:]))
    (root / "sst2" / "dev.tsv").write_bytes(head(data_dir / "sst2" / "dev.tsv", 9))
    return root, train


SST2_BAD = {
    "truncated mid-line": (b"a sentence cut off in the midd", "fewer than the header's 2"),
    "missing label column": (b"a whole sentence \n", "fewer than the header's 2"),
    "extra column": (b"a sentence \t1\t0\n", "3 tab-separated fields, more"),
    "label not valid": (b"a fine sentence \t2\n", "unknown label '2'"),
    "empty label": (b"a fine sentence \t\n", "unknown label ''"),
    "undecodable bytes": (b"caf\xe9 au lait \t1\n", "not valid UTF-8 (byte 0xe9"),
}


@pytest.mark.parametrize("kind", SST2_BAD)
def test_sst2_bad_row_is_an_error_naming_file_and_line(tmp_path, data_dir, kind):
    bad_line, what = SST2_BAD[kind]
    if kind == "truncated mid-line":  # the last line of a file cut short
        root, train = sst2_dir(tmp_path, data_dir, b"")
        train.write_bytes(train.read_bytes() + bad_line)
        line = 14
    else:
        root, train = sst2_dir(tmp_path, data_dir, bad_line)
        line = 6
    one_line_error(lambda: get_task("sst2").load(root, **SIZES), f"sst2: {train}:{line}: ", what)
    data = get_task("sst2").load(root, **SIZES, skip_bad_rows=True)
    assert data.skipped_rows == 1 and len(data.train) == 4
    assert any(f"skipped 1 bad row" in n and f"{train}:{line}" in n for n in data.notes)
    assert all(e.label in (0, 1) for e in data.train + data.dev + data.test)


# -------------------------------------------------------------------------------- SuperGLUE
def superglue_dir(tmp_path, data_dir, task: str, bad_line: bytes, split: str = "train") -> tuple[Path, Path]:
    root = tmp_path / "data"
    (root / task).mkdir(parents=True)
    for name in ("train", "val"):
        good = head(data_dir / task / f"{name}.jsonl", 10)
        lines = good.splitlines(keepends=True)
        text = b"".join(lines[:3]) + bad_line + b"".join(lines[3:]) if name == split else good
        (root / task / f"{name}.jsonl").write_bytes(text)
    return root, root / task / f"{split}.jsonl"


def rte_line(**changes) -> bytes:
    record = {"premise": "A man sleeps.", "hypothesis": "A man is awake.", "label": "not_entailment", "idx": 9}
    record.update(changes)
    return (json.dumps({k: v for k, v in record.items() if v is not ...}) + "\n").encode()


SUPERGLUE_BAD = {
    "truncated line": ("rte", rte_line()[:30] + b"\n", "not valid JSON at column", "the line may be truncated"),
    "missing field": ("rte", rte_line(hypothesis=...), "missing field 'hypothesis'", ""),
    "field not a string": ("rte", rte_line(premise=5), "field 'premise' must be a string, got 5", ""),
    "label not valid": ("rte", rte_line(label="maybe"), "unknown label 'maybe'",
                        "valid labels: entailment, not_entailment"),
    "missing label": ("rte", rte_line(label=...), "no label (field 'label'", ""),
    "not an object": ("rte", b"[1, 2]\n", "expected a JSON object, got list", ""),
    "undecodable bytes": ("rte", b'{"premise": "caf\xe9"}\n', "not valid UTF-8", ""),
    "copa question": ("copa", b'{"premise": "It rained.", "choice1": "a", "choice2": "b", '
                              b'"question": "why", "label": 0}\n', "must be 'effect' or 'cause'", ""),
    "multirc structure": ("multirc", b'{"idx": 1, "passage": {"text": "P"}}\n',
                          "not a MultiRC record", "missing field 'questions'"),
    "wsc span": ("wsc", b'{"text": "He ran.", "target": {"span2_index": 0, "span2_text": "He"}, '
                        b'"label": true}\n', "missing field 'span1_text'", ""),
}


@pytest.mark.parametrize("kind", SUPERGLUE_BAD)
def test_superglue_bad_row_is_an_error_naming_file_and_line(tmp_path, data_dir, kind):
    task, bad_line, *what = SUPERGLUE_BAD[kind]
    root, path = superglue_dir(tmp_path, data_dir, task, bad_line)
    one_line_error(lambda: get_task(task).load(root, **SIZES), f"{task}: {path}:4", *filter(None, what))
    data = get_task(task).load(root, **SIZES, skip_bad_rows=True)
    assert data.skipped_rows == 1 and any("skipped 1 bad row" in n for n in data.notes)


def test_superglue_validation_split_is_checked_too(tmp_path, data_dir):
    root, path = superglue_dir(tmp_path, data_dir, "rte", rte_line(label="maybe"), split="val")
    one_line_error(lambda: get_task("rte").load(root, **SIZES), f"{path}:4", "'maybe'")


# ------------------------------------------------------------------------------------- SQuAD
def squad_dir(tmp_path, questions: list) -> Path:
    root = tmp_path / "data"
    (root / "squad").mkdir(parents=True)
    context = "Paris is the capital of France. It is on the Seine."
    doc = {"version": "1.1", "data": [{"title": "Paris", "paragraphs": [{"context": context, "qas": questions}]}]}
    text = json.dumps(doc, indent=1)  # several lines, so that line numbers mean something
    (root / "squad" / "dev-v1.1.json").write_text(text)
    return root


def good_questions(n=12):
    return [{"id": f"q{i:03d}", "question": f"What is {i}?", "answers": [{"text": "Paris", "answer_start": 0}]}
            for i in range(n)]


@pytest.mark.parametrize("bad,what", [
    ({"id": "bad01", "question": "Where?", "answers": []}, "non-empty 'answers' list"),
    ({"id": "bad01", "answers": [{"text": "Paris"}]}, "non-empty 'question' string"),
    ({"id": "bad01", "question": "Where?", "answers": [{"answer_start": 3}]}, "{'text': ...}"),
])
def test_squad_bad_question_names_file_line_and_path(tmp_path, bad, what):
    questions = good_questions()
    questions.insert(5, bad)
    root = squad_dir(tmp_path, questions)
    path = root / "squad" / "dev-v1.1.json"
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if '"bad01"' in text)
    one_line_error(lambda: get_task("squad").load(root, **SIZES),
                   f"squad: {path}:{line} (data[0].paragraphs[0].qas[5], id bad01)", what)
    data = get_task("squad").load(root, **SIZES, skip_bad_rows=True)
    assert data.skipped_rows == 1 and all(e.answers for e in data.train + data.dev + data.test)


def test_squad_truncated_or_undecodable_file_is_an_error_with_line(tmp_path):
    root = squad_dir(tmp_path, good_questions())
    path = root / "squad" / "dev-v1.1.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    for skip in (False, True):  # a file that is not JSON cannot be skipped row by row
        with pytest.raises(TaskDataError, match=rf"squad: {path}:\d+:\d+: not valid JSON: .*truncated"):
            get_task("squad").load(root, **SIZES, skip_bad_rows=skip)
    path.write_bytes(text.encode().replace(b"Seine", b"Se\xefne"))
    with pytest.raises(TaskDataError, match=rf"squad: {path}:\d+: not valid UTF-8 \(byte 0xef"):
        get_task("squad").load(root, **SIZES)


# ---------------------------------------------------------------------------- custom JSONL
def custom_spec(tmp_path, bad_line: bytes) -> tuple[dict, Path]:
    rows = b"".join(json.dumps({"text": f"film {i}", "label": i % 2}).encode() + b"\n" for i in range(12))
    lines = rows.splitlines(keepends=True)
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"".join(lines[:6]) + bad_line + b"".join(lines[6:]))
    spec = {"name": "films", "train": str(path), "template": "{text} was", "verbalizer": [" bad", " good"]}
    return spec, path


@pytest.mark.parametrize("bad_line,what", [
    (b'{"text": "film x", "lab\n', "not valid JSON"),
    (b'{"review": "film x", "label": 1}\n', "template field 'text' missing"),
    (b'{"text": "film x", "label": 7}\n', "unknown label 7"),
    (b'{"text": "film x"}\n', "label field 'label' missing"),
    (b'{"text": "caf\xe9", "label": 1}\n', "not valid UTF-8"),
    (b'"just a string"\n', "expected a JSON object"),
])
def test_custom_task_bad_row_names_file_and_line(tmp_path, bad_line, what):
    spec, path = custom_spec(tmp_path, bad_line)
    one_line_error(lambda: load_custom_task(spec).load(**SIZES), f"films: {path}:7: ", what)
    data = load_custom_task(spec).load(**SIZES, skip_bad_rows=True)
    assert data.skipped_rows == 1 and all(e.label in (0, 1) for e in data.train + data.dev)


def test_custom_template_that_does_not_render_is_a_bad_row(tmp_path):
    spec, path = custom_spec(tmp_path, b'{"text": "film x", "label": 1}\n')
    spec["template"] = "{text[0]} was"  # needs indexable text
    path.write_bytes(path.read_bytes() + b'{"text": 5, "label": 1}\n')
    one_line_error(lambda: load_custom_task(spec).load(**SIZES), f"{path}:14: ", "cannot be rendered")


# --------------------------------------------------------------------------- end to end
def test_train_stops_at_load_or_skips_and_counts(tiny_dir, data_dir, tmp_path, capsys):
    root, train = sst2_dir(tmp_path, data_dir, b"a sentence with a bad label \t5\n")
    args = ["train", "--model", tiny_dir, "--task", "sst2", "--data-dir", root, "--steps", 1,
            "--eval-every", 1, "--num-train", 6, "--num-dev", 2, "--num-test", 2, "--batch-size", 2,
            "--lr", 1e-3, "--quiet"]
    assert cli.main([str(a) for a in args + ["--output-dir", tmp_path / "strict"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"zotune: error: sst2: {train}:6: unknown label '5'") and "\n" not in err
    assert cli.main([str(a) for a in args + ["--output-dir", tmp_path / "skip", "--skip-bad-rows"]]) == 0
    captured = capsys.readouterr()
    assert f"note: sst2: skipped 1 bad row" in captured.err and f"{train}:6" in captured.err
    assert isinstance(json.loads(captured.out), dict)  # stdout holds the final JSON only
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_rows"] == 1
    saved = json.loads((tmp_path / "skip" / "config.json").read_text())
    assert saved["skip_bad_rows"] is True
