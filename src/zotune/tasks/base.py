"""The unit of task data every other module consumes: one prompt with its candidate continuations."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from zotune.errors import ZotuneError


@dataclass(frozen=True)
class Example:
    """One task example in the MeZO prompt format.

    ``prompt + candidates[i]`` is the full verbalized text of candidate ``i``; the candidate tokens
    are the ones that get scored (MeZO's ``option_len`` positions).

    Attributes:
        prompt: the text before the candidate (MeZO's ``template.encode(sample).strip(' ')``).
        candidates: the continuations, each with any leading space (" great"; RTE's "Yes" follows a
            "\\n" that stays in the prompt).
        label: index of the gold candidate, or -1 when unknown (unlabeled data).
        answers: for generation tasks (SQuAD), every gold answer string, used by the F1 metric.
    """

    prompt: str
    candidates: tuple[str, ...]
    label: int = -1
    answers: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# Everything below is the task layer built on Example: errors, the split protocol, Task.
# --------------------------------------------------------------------------------------------

KINDS = ("classification", "multiple_choice", "generation")
TRAIN_OBJECTIVES = ("classification", "answer_lm")
METRICS = ("accuracy", "f1")


class DataNotFoundError(ZotuneError):
    """A task's data files are not where we looked (or no data source was given)."""


class UnknownTaskError(ZotuneError):
    """A task name that is not in the registry."""


class TaskDataError(ZotuneError):
    """Task data or a task spec that cannot be turned into examples (bad field, bad label, ...)."""


@dataclass
class TaskData:
    """The three sampled splits of one task, plus human-readable notes on how they were drawn."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]
    notes: list[str]
    skipped_rows: int = 0
    """Rows of the data files skipped as unusable (``skip_bad_rows=True``; else they are errors)."""


def sample_subset(n_items: int, seed: int, num: int | None) -> list[int]:
    """Indices of MeZO's ``sample_subset``: the first ``num`` of a seeded permutation of ``n_items``.

    ``np.random.RandomState(seed).permutation`` draws the same numbers as MeZO's
    ``temp_seed(seed)`` + ``np.random.permutation`` (both seed the legacy MT19937 the same way),
    without touching the global NumPy state. ``num=None`` or ``num > n_items`` gives the whole
    split, shuffled.
    """
    perm = np.random.RandomState(seed).permutation(n_items)
    return perm.tolist() if num is None else perm[:num].tolist()


def mezo_example(encoded: str, verbalized: Sequence[str], label: int = -1,
                 answers: Sequence[str] = ()) -> Example:
    """Turn a MeZO (``template.encode``, ``[template.verbalize(c) ...]``) pair into an Example.

    As MeZO's ``encode_prompt``, both texts are stripped of spaces only (``strip(' ')``): a "\\n"
    before "Yes" stays at the end of the prompt, so only the answer word is scored. Each candidate
    is what its verbalization adds after the prompt: ``prompt + candidate == verbalized.strip(' ')``.
    """
    prompt = encoded.strip(' ')
    candidates = []
    for text in verbalized:
        text = text.strip(' ')
        if not text.startswith(prompt):
            raise TaskDataError(f"verbalized text does not start with the prompt: {text[:80]!r}")
        candidates.append(text[len(prompt):])
    return Example(prompt=prompt, candidates=tuple(candidates), label=label, answers=tuple(answers))


def label_index(task: str, record: dict, labels: dict, field: str = "label") -> int:
    """Candidate index of a record's label (-1 when the record has none, e.g. a test file)."""
    value = record.get(field)
    if value is None:
        return -1
    key = value.strip() if isinstance(value, str) else value
    try:
        return labels[key]
    except (KeyError, TypeError):  # TypeError: an unhashable value (a list, an object)
        valid = ", ".join(dict.fromkeys(str(k) for k in labels))
        raise TaskDataError(f"unknown label {_short(value)} in field {field!r}; valid labels: "
                            f"{valid}") from None


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _too_few(name: str, split: str, got: int, asked: int, why: str) -> str:
    return f"{name}: {split} has {got} examples, not the {asked} asked: {why}"


def mezo_splits(name: str, train: Sequence[Any] | None, valid: Sequence[Any], *, num_train: int,
                num_dev: int, num_test: int | None, seed: int,
                no_train_note: str | None = None) -> tuple[list, list, list, list[str]]:
    """MeZO's data protocol over raw records; returns (train, dev, test, notes).

    With a train split: train+dev is one ``sample_subset`` of ``num_train + num_dev`` train records,
    dev its last ``num_dev``; test is ``sample_subset(valid, seed, num_test)``.
    Without one (BoolQ and SQuAD here): test is drawn from ``valid`` the same way, then train+dev
    from the remaining ``valid`` records, so the three never overlap.
    """
    if num_train < 0 or num_dev < 0 or (num_test is not None and num_test < 0):
        raise ZotuneError(f"{name}: split sizes must be >= 0 (train={num_train}, dev={num_dev}, test={num_test})")
    notes: list[str] = []
    test_idx = sample_subset(len(valid), seed, num_test)
    test = [valid[i] for i in test_idx]
    if train is None:
        taken = set(test_idx)
        pool = [r for i, r in enumerate(valid) if i not in taken]
        source = f"the {len(pool)} validation examples left after the test draw"
        notes.append(no_train_note or f"{name}: no train split available; train and dev are drawn from the "
                     f"validation examples not used for test (disjoint from test), so results are not "
                     f"comparable with MeZO's train-split numbers")
    else:
        pool = list(train)
        source = f"the train split has {len(pool)} examples"
    subset = [pool[i] for i in sample_subset(len(pool), seed, num_train + num_dev)]
    # Python's subset[:-0] is empty, so num_dev=0 needs its own branch.
    dev = subset[len(subset) - num_dev:] if num_dev else []
    tr = subset[:len(subset) - num_dev] if num_dev else subset
    if num_train > 0 and not tr:
        raise ZotuneError(f"{name}: no training examples left: {source} and num_dev={num_dev} takes them all; "
                          f"lower num_dev")
    if len(tr) < num_train:
        notes.append(_too_few(name, "train", len(tr), num_train,
                              f"{source} and the last num_dev={num_dev} of the draw go to dev first (MeZO protocol)"))
    if len(dev) < num_dev:
        notes.append(_too_few(name, "dev", len(dev), num_dev, source))
    if num_test is not None and len(test) < num_test:
        notes.append(_too_few(name, "test", len(test), num_test, "that is the whole validation split"))
    return tr, dev, test, notes


class Task:
    """One task: what kind it is, how it is trained and scored, and how its data is loaded.

    Subclasses set the class attributes and implement ``read`` (raw records per split, from a data
    directory) and ``to_example`` (one raw record -> Example). ``load`` checks every record
    (``check``), applies MeZO's protocol to the usable ones and renders those it drew.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "classification"
    train_objective: ClassVar[str] = "classification"
    metric: ClassVar[str] = "accuracy"
    num_dev_default: ClassVar[int] = 500
    fields: ClassVar[tuple[str, ...]] = ()
    """The text fields a record needs (``check``: present, strings)."""
    labels: ClassVar[dict | None] = None
    """Label value -> candidate index (``data.label_index``); None for a task without labels."""
    label_field: ClassVar[str] = "label"
    check_renders: ClassVar[bool] = False
    """Whether ``check`` also renders the record: for tasks whose ``to_example`` needs more than
    string fields and a label (and whose files are small, as rendering every row costs time)."""

    def read(self, data_dir: Path | None, bad=None) -> tuple[list[dict] | None, list[dict]]:
        """(train records or None when there is no train split, validation records), ideally as
        ``data.Rows`` (which know each record's file and line); rows that cannot be parsed go to
        ``bad`` (a ``data.BadRows``; default: an error)."""
        raise NotImplementedError

    def to_example(self, record: dict) -> Example:
        raise NotImplementedError

    def check(self, record: dict, labeled: bool = True) -> str | None:
        """What makes ``record`` unusable, or None when ``to_example`` renders it: a missing or
        non-string field of ``fields``, a label that is not one of ``labels`` or, when
        ``labeled``, is missing; with ``check_renders``, anything ``to_example`` fails on."""
        for name in self.fields:
            if name not in record:
                return f"missing field {name!r} (fields: {', '.join(map(str, record)) or 'none'})"
            if not isinstance(record[name], str):
                return f"field {name!r} must be a string, got {_short(record[name])}"
        if self.labels is not None:
            try:
                label = label_index(self.name, record, self.labels, self.label_field)
            except TaskDataError as e:
                return str(e)
            if label == -1 and labeled:
                return f"no label (field {self.label_field!r} missing or null)"
        return self.render_problem(record) if self.check_renders else None

    def render_problem(self, record: dict) -> str | None:
        """Why ``to_example`` fails on ``record``, or None."""
        try:
            self.to_example(record)
        except TaskDataError as e:
            return str(e)
        except KeyError as e:
            return f"missing field {e.args[0]!r}"
        except (TypeError, ValueError, AttributeError, IndexError) as e:
            return f"cannot be rendered ({type(e).__name__}: {e})"
        return None

    def usable(self, records: Sequence[dict], bad, *, split: str = "",
               labeled: bool = True) -> list[tuple[dict, str]]:
        """``(record, where)`` for every record that passes ``check``; the others go to ``bad``,
        named by file and line (``where``: from ``data.Rows``, else the split and index)."""
        places = getattr(records, "where", None)
        out = []
        for i, record in enumerate(records):
            where = places[i] if places else f"{split or 'records'}[{i}]"
            try:
                problem = self.check(record, labeled)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                problem = f"cannot be read ({type(e).__name__}: {e})"
            if problem is None:
                out.append((record, where))
            else:
                bad.reject(where, problem)
        return out

    def render(self, record: dict, where: str) -> Example:
        """``to_example(record)``, with an error naming ``where`` if it fails (``check`` missed
        something) or gives a label outside the candidates."""
        try:
            example = self.to_example(record)
        except Exception as e:  # noqa: BLE001 - any failure is the record's; name it
            reason = e if isinstance(e, TaskDataError) else f"{type(e).__name__}: {e}"
            raise TaskDataError(f"{self.name}: {where}: cannot be rendered ({reason})") from None
        if not -1 <= example.label < len(example.candidates):
            raise TaskDataError(f"{self.name}: {where}: label {example.label} is not one of the "
                                f"{len(example.candidates)} candidates")
        return example

    def load(self, data_dir: str | Path | None = None, *, num_train: int = 1000, num_dev: int | None = None,
             num_test: int | None = 1000, seed: int = 0, skip_bad_rows: bool = False) -> TaskData:
        """Check every record (``check``), sample train/dev/test from the usable ones with MeZO's
        protocol (see ``mezo_splits``) and render them. A record that cannot be used is an error
        naming its file, line and what is wrong; with ``skip_bad_rows`` it is skipped, counted
        (``TaskData.skipped_rows``) and noted."""
        from zotune.tasks.data import BadRows, resolve_data_dir

        bad = BadRows(self.name, skip=skip_bad_rows)
        train, valid = self.read(resolve_data_dir(data_dir), bad)
        train = None if train is None else self.usable(train, bad, split="train")
        valid = self.usable(valid, bad, split="validation")
        num_dev = self.num_dev_default if num_dev is None else num_dev
        tr, dev, test, notes = mezo_splits(self.name, train, valid, num_train=num_train, num_dev=num_dev,
                                           num_test=num_test, seed=seed)
        if bad.note():
            notes.append(bad.note())
        return TaskData([self.render(*r) for r in tr], [self.render(*r) for r in dev],
                        [self.render(*r) for r in test], notes, bad.count)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, "
                f"train_objective={self.train_objective!r}, metric={self.metric!r})")
