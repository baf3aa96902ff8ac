"""SQuAD v1.1: extractive question answering, trained and scored as free-form generation.

MeZO template (``SQuADv2Template``, which MeZO also uses for v1.1):
``"Title: {title}\\nContext: {context}\\nQuestion: {question}\\nAnswer:"``, verbalized with
``" {answers[0]}\\n"`` appended. Metric: SQuAD token F1, max over all gold answers.
Data: ``squad/dev-v1.1.json``; ``squad/train-v1.1.json`` is used when present. Without it, test is
drawn from dev first and train/dev from the remaining dev questions (disjoint), see ``mezo_splits``.
"""
from __future__ import annotations

import json
from pathlib import Path

from zotune.tasks.base import Example, Task
from zotune.tasks.data import find_files, hub_splits


def _flatten(squad: dict) -> list[dict]:
    """One record per question, in file order (the order Hugging Face's ``squad`` uses)."""
    return [{"title": article["title"], "context": para["context"], "question": qa["question"],
             "answers": [a["text"] for a in qa["answers"]]}
            for article in squad["data"] for para in article["paragraphs"] for qa in para["qas"]]


def _from_hub(record: dict) -> list[dict]:
    return [{"title": record["title"], "context": record["context"], "question": record["question"],
             "answers": list(record["answers"]["text"])}]


class SQuAD(Task):
    name = "squad"
    kind = "generation"
    train_objective = "answer_lm"
    metric = "f1"
    num_dev_default = 500

    def read(self, data_dir: Path | None) -> tuple[list[dict] | None, list[dict]]:
        if data_dir is None:
            return hub_splits(self.name, "rajpurkar/squad", None, _from_hub)
        paths = find_files(self.name, data_dir, {"valid": "squad/dev-v1.1.json"},
                           optional={"train": "squad/train-v1.1.json"})

        def load(path: Path) -> list[dict]:
            with open(path, encoding="utf-8") as f:
                return _flatten(json.load(f))

        return (load(paths["train"]) if "train" in paths else None), load(paths["valid"])

    def to_example(self, record: dict) -> Example:
        answers = tuple(record["answers"])
        prompt = (f"Title: {record['title']}\nContext: {record['context']}\n"
                  f"Question: {record['question'].strip()}\nAnswer:").strip()
        # The training target keeps MeZO's trailing "\n" so the model learns to stop where greedy
        # decoding stops (eos "\n"). MeZO's encode_prompt strips only spaces (``strip(' ')``) and, on
        # the gold-answer training path, does not strip the verbalization at all, so the "\n"
        # survives there: the candidate is " {answers[0]}\n", not answers[0] stripped.
        return Example(prompt=prompt, candidates=(f" {answers[0]}\n",), label=0, answers=answers)
