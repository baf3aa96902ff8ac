"""Where task data comes from: a local directory in the official GLUE/SuperGLUE layout, or
(optionally, only when no directory is given and ``datasets`` is installed) the Hugging Face Hub."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Callable

from zotune.tasks.base import DataNotFoundError, TaskDataError, label_index  # noqa: F401 (its home was here)

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


class Rows(list):
    """The records of a file, and where each came from (``where[i]``: ``path:line``), so that a
    record that cannot become an example is reported by file and line."""

    def __init__(self, records=(), where=()):
        super().__init__(records)
        self.where = list(where)


class BadRows:
    """What happens to a row that cannot be used: an error naming its file, line and what is
    wrong (the default), or, with ``skip=True`` (``--skip-bad-rows``), it is skipped and counted."""

    def __init__(self, task: str | None = None, skip: bool = False) -> None:
        self.task, self.skip, self.count, self.first = task, skip, 0, None

    def reject(self, where: str, what: str) -> None:
        message = f"{where}: {what}" if where else what
        if not self.skip:
            prefix = f"{self.task}: " if self.task else ""
            raise TaskDataError(f"{prefix}{message} (pass --skip-bad-rows to skip such rows)")
        self.count += 1
        self.first = self.first or message

    def note(self) -> str | None:
        """The note of a run that skipped rows, or None."""
        if not self.count:
            return None
        rows = "row" if self.count == 1 else "rows"
        return (f"{self.task}: skipped {self.count} bad {rows} of the data files (--skip-bad-rows); "
                f"the first: {self.first}")


def _lines(path: Path, bad: BadRows) -> list[str | None]:
    """The lines of a UTF-8 file without their line ends (``[0]`` is line 1); a line that is not
    UTF-8 goes to ``bad`` and is None."""
    raw = Path(path).read_bytes()
    try:
        return [line.rstrip("\r") for line in raw.decode("utf-8-sig").split("\n")]
    except UnicodeDecodeError:
        pass
    lines = []
    for lineno, chunk in enumerate(raw.split(b"\n"), 1):
        try:
            lines.append(chunk.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            bad.reject(f"{path}:{lineno}", f"not valid UTF-8 (byte 0x{chunk[e.start]:02x} at "
                                           f"column {e.start + 1})")
            lines.append(None)
    return lines


def iter_jsonl(path: Path, bad: BadRows | None = None):
    """``(line number, record)`` for each non-blank line of a JSON-lines file of objects; a line
    that is not UTF-8, not JSON or not an object goes to ``bad`` (default: an error)."""
    bad = bad or BadRows()
    for lineno, line in enumerate(_lines(path, bad), 1):
        if line is None or not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            end = "" if line.rstrip().endswith("}") else " (the line may be truncated)"
            bad.reject(f"{path}:{lineno}", f"not valid JSON at column {e.colno}: {e.msg}{end}")
            continue
        if not isinstance(record, dict):
            bad.reject(f"{path}:{lineno}", f"expected a JSON object, got {type(record).__name__}")
            continue
        yield lineno, record


def read_jsonl(path: Path, bad: BadRows | None = None) -> Rows:
    """The records of a JSON-lines file, with where each came from (``Rows.where``)."""
    records, where, name = [], [], str(path)
    for lineno, record in iter_jsonl(path, bad):
        records.append(record)
        where.append(f"{name}:{lineno}")
    return Rows(records, where)


def read_tsv(path: Path, bad: BadRows | None = None) -> Rows:
    """A headed TSV, with where each record came from (``Rows.where``). GLUE files are unquoted,
    so quotes are kept as text and a line is a record; a line whose number of fields is not the
    header's (truncated, a missing or an extra column), or that is not UTF-8, goes to ``bad``
    (default: an error)."""
    bad = bad or BadRows()
    lines = _lines(path, bad)
    if not lines or not lines[0]:
        raise TaskDataError(f"{path}:1: expected a header line of tab-separated column names")
    columns = lines[0].split("\t")
    n, records, where = len(columns), [], []
    for lineno, line in enumerate(lines[1:], 2):
        if not line:
            continue
        values = line.split("\t")
        if len(values) != n:
            fewer = len(values) < n
            bad.reject(f"{path}:{lineno}", f"{len(values)} tab-separated field{'s' * (len(values) > 1)}, "
                       f"{'fewer' if fewer else 'more'} than the header's {n} ({', '.join(columns)})"
                       + ("; the line may be truncated" if fewer else ""))
            continue
        records.append(dict(zip(columns, values)))
        where.append(lineno)
    name = str(path)
    return Rows(records, [f"{name}:{lineno}" for lineno in where])


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
