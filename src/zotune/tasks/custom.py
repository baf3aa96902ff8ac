"""User-defined tasks from a spec (a dict or a YAML file), no code needed.

Spec keys::

    name: my_sentiment                      # required
    train: data/train.jsonl                 # required, JSON lines, one record per line
    dev: data/dev.jsonl                     # optional
    test: data/test.jsonl                   # optional (labels may be absent -> label -1)
    template: "Review: {text}\\nSentiment:"  # required, str.format fields name record fields
    verbalizer: {0: " bad", 1: " good"}     # required; label value -> words (a list means 0, 1, ...)
    label_field: label                      # default "label"
    kind: classification                    # or multiple_choice
    train_objective: classification         # or answer_lm
    num_dev: 500                            # default, as MeZO

Candidate i is ``template.format(**record) + verbalizer word i``, split into prompt/candidate as
for the built-in tasks. Relative paths are relative to the YAML file (or the working directory for
a dict spec). Missing dev/test files are drawn from train with MeZO's protocol (test first, so the
three sets are disjoint).
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from zotune.tasks.base import Example, Task, TaskData, TaskDataError, mezo_example, mezo_splits, sample_subset
from zotune.tasks.data import BadRows, DataNotFoundError, read_jsonl

REQUIRED = ("name", "train", "template", "verbalizer")
OPTIONAL = ("dev", "test", "label_field", "kind", "train_objective", "num_dev", "description")


def _template_fields(template: str) -> list[str]:
    fields = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is not None:
            # "{a.b}" / "{a[0]}" need record field "a"; "{}" / "{0}" have no name to look up.
            root = field.split(".")[0].split("[")[0]
            if not root or root.isdigit():
                raise TaskDataError(f"template field {{{field}}} must name a record field, e.g. {{text}}")
            fields.append(root)
    return fields


class CustomTask(Task):
    """A classification / multiple-choice task described by a spec; see the module docstring."""

    def __init__(self, spec: dict[str, Any], base_dir: Path | None = None):
        if not isinstance(spec, dict):
            raise TaskDataError(f"a custom task spec must be a mapping, got {type(spec).__name__}")
        missing = [k for k in REQUIRED if k not in spec]
        unknown = sorted(set(spec) - set(REQUIRED) - set(OPTIONAL))
        if missing or unknown:
            raise TaskDataError(f"custom task spec: missing keys {missing}, unknown keys {unknown}; "
                                f"allowed keys: {', '.join(REQUIRED + OPTIONAL)}")
        self.name = str(spec["name"])
        self.kind = spec.get("kind", "classification")
        self.train_objective = spec.get("train_objective", "classification")
        self.metric = "accuracy"
        self.num_dev_default = int(spec.get("num_dev", 500))
        if self.kind not in ("classification", "multiple_choice"):
            raise TaskDataError(f"{self.name}: kind must be classification or multiple_choice, got {self.kind!r}")
        if self.train_objective not in ("classification", "answer_lm"):
            raise TaskDataError(f"{self.name}: train_objective must be classification or answer_lm, "
                                f"got {self.train_objective!r}")
        self.template = str(spec["template"])
        self.template_fields = _template_fields(self.template)
        self.label_field = str(spec.get("label_field", "label"))
        verbalizer = spec["verbalizer"]
        items = list(enumerate(verbalizer)) if isinstance(verbalizer, list) else list(dict(verbalizer).items())
        if len(items) < 2:
            raise TaskDataError(f"{self.name}: the verbalizer needs at least two label words")
        # Labels are matched as strings so YAML keys (0, "0", true) and JSON values agree.
        self.labels = {str(k): i for i, (k, _) in enumerate(items)}
        self.words = [str(w) for _, w in items]
        base = base_dir or Path.cwd()
        self.files = {k: (base / Path(spec[k]).expanduser()) for k in ("train", "dev", "test") if spec.get(k)}

    def _read(self, split: str, bad) -> list[Example]:
        """The examples of one split's file; a line that cannot be one goes to ``bad``."""
        path = self.files[split]
        if not path.is_file():
            raise DataNotFoundError(f"{self.name}: {split} file not found: {path}")
        usable = self.usable(read_jsonl(path, bad), bad, split=split, labeled=split != "test")
        if not usable:
            raise TaskDataError(f"{self.name}: {path} has no records"
                                + (f" that can be used ({bad.count} skipped)" if bad.count else ""))
        return [self.render(*pair) for pair in usable]

    def check(self, record: dict, labeled: bool = True) -> str | None:
        """What makes a record unusable (a template field or, when ``labeled``, the label field
        missing, an unknown label, a template that does not render), or None."""
        for field in self.template_fields:
            if field not in record:
                return (f"template field {field!r} missing from the record; fields available: "
                        f"{', '.join(sorted(record))}")
        if self.label_field not in record:
            if labeled:
                return (f"label field {self.label_field!r} missing from the record; fields available: "
                        f"{', '.join(sorted(record))}")
        elif str(record[self.label_field]) not in self.labels:
            return (f"unknown label {record[self.label_field]!r}; valid labels: "
                    f"{', '.join(self.labels)}")
        return self.render_problem(record)

    def to_example(self, record: dict) -> Example:
        encoded = self.template.format(**record)
        label = self.labels[str(record[self.label_field])] if self.label_field in record else -1
        return mezo_example(encoded, [encoded + w for w in self.words], label)

    def load(self, data_dir: str | Path | None = None, *, num_train: int = 1000, num_dev: int | None = None,
             num_test: int | None = 1000, seed: int = 0, skip_bad_rows: bool = False) -> TaskData:
        """As ``Task.load``; ``data_dir`` is unused (the spec names its files)."""
        num_dev = self.num_dev_default if num_dev is None else num_dev
        bad = BadRows(self.name, skip=skip_bad_rows)
        train = self._read("train", bad)
        test = self._read("test", bad) if "test" in self.files else None
        if "dev" in self.files:
            dev = self._read("dev", bad)
            notes = []
            if test is None:  # test from train first (as for BoolQ), then train from what is left
                test_idx = sample_subset(len(train), seed, num_test)
                taken = set(test_idx)
                te = [train[i] for i in test_idx]
                train = [r for i, r in enumerate(train) if i not in taken]
                notes.append(f"{self.name}: no test file; test is drawn from the train file (disjoint from train)")
            else:
                te = [test[i] for i in sample_subset(len(test), seed, num_test)]
            tr = [train[i] for i in sample_subset(len(train), seed, num_train)]
            dv = [dev[i] for i in sample_subset(len(dev), seed, num_dev)]
        else:
            note = (f"{self.name}: no test file; test is drawn from the train file first, then train and dev "
                    f"from the rest (disjoint)")
            tr, dv, te, notes = mezo_splits(self.name, train if test is not None else None,
                                            test if test is not None else train, num_train=num_train,
                                            num_dev=num_dev, num_test=num_test, seed=seed, no_train_note=note)
            if test is not None:
                notes.append(f"{self.name}: no dev file; dev is the last {num_dev} of the train draw (MeZO protocol)")
        if bad.note():
            notes.append(bad.note())
        return TaskData(tr, dv, te, notes, bad.count)


def load_custom_task(spec_or_path: dict[str, Any] | str | Path) -> CustomTask:
    """A CustomTask from a spec dict or a YAML/JSON spec file."""
    if isinstance(spec_or_path, dict):
        return CustomTask(spec_or_path)
    path = Path(spec_or_path).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"custom task spec not found: {path}")
    import yaml  # YAML is a superset of JSON, so .json specs load too

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise TaskDataError(f"{path}: not valid YAML ({e})") from None
    return CustomTask(spec, base_dir=path.parent)
