"""SST-2 (GLUE): binary movie-review sentiment.

MeZO template (``SST2Template``): ``"{sentence} It was"``, verbalizer 0 -> " terrible", 1 -> " great".
Data: ``sst2/train.tsv`` (67,349) and ``sst2/dev.tsv`` (872, used as MeZO's "validation"/test pool).
"""
from __future__ import annotations

from pathlib import Path

from zotune.tasks.base import Example, Task, mezo_example
from zotune.tasks.data import find_files, hub_splits, label_index, read_tsv


class SST2(Task):
    name = "sst2"
    kind = "classification"
    train_objective = "classification"
    metric = "accuracy"
    num_dev_default = 500
    words = ("terrible", "great")
    fields = ("sentence",)
    # GLUE TSV labels are strings; the Hub gives ints.
    labels = {"0": 0, "1": 1, 0: 0, 1: 1}

    def read(self, data_dir: Path | None, bad=None) -> tuple[list[dict], list[dict]]:
        if data_dir is None:
            return hub_splits(self.name, "nyu-mll/glue", "sst2", lambda r: [r])
        paths = find_files(self.name, data_dir, {"train": "sst2/train.tsv", "valid": "sst2/dev.tsv"})
        return read_tsv(paths["train"], bad), read_tsv(paths["valid"], bad)

    def to_example(self, record: dict) -> Example:
        # GLUE sentences end with a space; MeZO strips the sentence before templating.
        text = record["sentence"].strip()
        encoded = f"{text} It was"
        return mezo_example(encoded, [f"{encoded} {w}" for w in self.words],
                            label_index(self.name, record, self.labels))
