"""Where task data comes from: a local directory in the official GLUE/SuperGLUE layout, or
(optionally, only when no directory is given and ``datasets`` is installed) the Hugging Face Hub."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable

from zotune.tasks.base import DataNotFoundError, TaskDataError

ENV_VAR = "ZOTUNE_DATA"
HOW_TO_PROVIDE = (f"provide the data with --data-dir DIR or the {ENV_VAR} environment variable, laid out as the "
                  f"official GLUE/SuperGLUE files (DIR/sst2/{{train,dev}}.tsv, DIR/rte/{{train,val}}.jsonl, ..., "
                  f"DIR/squad/dev-v1.1.json)")


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The explicit argument, else ``$ZOTUNE_DATA``, else None (no local data)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else None


def find_files(task: str, data_dir: Path, required: dict[str, str],
               optional: dict[str, str] | None = None) -> dict[str, Path]:
    """Paths of a task's files under ``data_dir``; optional ones only when present.

    Raises DataNotFoundError naming every required path looked at, when any is missing.
    """
    paths = {key: data_dir / rel for key, rel in required.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        looked = ", ".join(str(p) for p in paths.values())
        raise DataNotFoundError(f"{task}: data not found: looked for {looked}; missing {', '.join(missing)}; "
                                f"{HOW_TO_PROVIDE}")
    for key, rel in (optional or {}).items():
        if (data_dir / rel).is_file():
            paths[key] = data_dir / rel
    return paths


def iter_jsonl(path: Path):
    """``(line number, record)`` for each non-blank line of a JSON-lines file of objects."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise TaskDataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def read_jsonl(path: Path) -> list[dict]:
    return [record for _, record in iter_jsonl(path)]


def read_tsv(path: Path) -> list[dict]:
    """A headed TSV; GLUE files are unquoted, so quotes are kept as text."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def hub_available() -> bool:
    return importlib.util.find_spec("datasets") is not None


def hub_splits(task: str, path: str, config: str | None, convert: Callable[[dict], list[dict]],
               train_split: str = "train", valid_split: str = "validation") -> tuple[list[dict], list[dict]]:
    """Records from the Hugging Face Hub, converted to the local-file record format.

    Only used when no data directory is given; ``datasets`` is never required.
    """
    if not hub_available():
        raise DataNotFoundError(f"{task}: no data directory given and the optional `datasets` package is not "
                                f"installed; {HOW_TO_PROVIDE}")
    import datasets  # optional dependency

    try:
        loaded = datasets.load_dataset(path, config)
    except Exception as e:  # network, auth, removed dataset scripts ... all mean "not available"
        raise DataNotFoundError(f"{task}: no data directory given and loading {path}"
                                f"{'/' + config if config else ''} from the Hugging Face Hub failed "
                                f"({type(e).__name__}: {e}); {HOW_TO_PROVIDE}") from None
    return ([r for rec in loaded[train_split] for r in convert(dict(rec))],
            [r for rec in loaded[valid_split] for r in convert(dict(rec))])


def label_index(task: str, record: dict, labels: dict, field: str = "label") -> int:
    """Candidate index of a record's label (-1 when the record has none, e.g. a test file)."""
    if field not in record or record[field] is None:
        return -1
    value = record[field]
    key = value.strip() if isinstance(value, str) else value
    if key not in labels:
        valid = ", ".join(repr(k) for k in labels)
        raise TaskDataError(f"{task}: unknown label {value!r} in field {field!r}; valid labels: {valid}")
    return labels[key]
