"""Tasks: MeZO's benchmark tasks and user-defined ones, as lists of ``Example``.

``get_task("rte").load(data_dir)`` gives ``TaskData(train, dev, test, notes)`` sampled with MeZO's
protocol (``base.mezo_splits``) and rendered with MeZO's templates.

Prompt/candidate split, as MeZO's ``encode_prompt``: the template encoding and each verbalization
are stripped of spaces only (``strip(' ')``), ``prompt`` is the former and each candidate is what the
latter adds. A "\\n" separator therefore stays in the prompt (RTE: prompt ends "Yes or No?\\n",
candidates "Yes" / "No") and only the answer tokens are scored, exactly as MeZO scores them.
SQuAD keeps MeZO's " answer\\n" target (see squad.py).
"""
from __future__ import annotations

from zotune.tasks.base import (DataNotFoundError, Example, Task, TaskData, TaskDataError, UnknownTaskError,
                               mezo_splits, sample_subset)
from zotune.tasks.custom import CustomTask, load_custom_task
from zotune.tasks.data import resolve_data_dir
from zotune.tasks.squad import SQuAD
from zotune.tasks.sst2 import SST2
from zotune.tasks.superglue import CB, COPA, RTE, WSC, BoolQ, MultiRC, WiC

_REGISTRY: dict[str, type[Task]] = {cls.name: cls for cls in (SST2, RTE, CB, BoolQ, WSC, WiC, MultiRC, COPA, SQuAD)}


def list_tasks() -> list[str]:
    """Names of the built-in tasks, in MeZO's table order."""
    return list(_REGISTRY)


def get_task(name: str) -> Task:
    """The built-in task called ``name`` (case-insensitive)."""
    cls = _REGISTRY.get(str(name).strip().lower())
    if cls is None:
        raise UnknownTaskError(f"unknown task {name!r}; valid tasks: {', '.join(_REGISTRY)} "
                               f"(or a custom task spec file)")
    return cls()


__all__ = ["CustomTask", "DataNotFoundError", "Example", "Task", "TaskData", "TaskDataError", "UnknownTaskError",
           "get_task", "list_tasks", "load_custom_task", "mezo_splits", "resolve_data_dir", "sample_subset"]
