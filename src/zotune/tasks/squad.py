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

from zotune.tasks.base import Example, Task, TaskDataError
from zotune.tasks.data import BadRows, Rows, find_files, hub_splits


def _flatten(squad: dict, path: Path | str = "", text: str = "", bad: BadRows | None = None) -> list[dict]:
    """One record per question, in file order (the order Hugging Face's ``squad`` uses). A
    question, paragraph or article that is not SQuAD's shape goes to ``bad`` (default: an error),
    named by the file, the line of its id (the official files are one line) and its JSON path."""
    bad = bad or BadRows("squad")
    data = squad.get("data") if isinstance(squad, dict) else None
    if not isinstance(data, list):
        raise TaskDataError(f"squad: {path}: no 'data' list at the top: not a SQuAD v1.1 file")

    def where(at: str, qa=None, line: bool = True) -> str:
        """``path:line (json path, id)``; the line (a search of the text) only for errors."""
        qid = qa.get("id") if isinstance(qa, dict) else None
        found = text.find(json.dumps(qid)) if line and text and isinstance(qid, str) else -1
        place = f"{path}:{text.count(chr(10), 0, found) + 1}" if found >= 0 else str(path)
        return f"{place} ({at}" + (f", id {qid})" if qid is not None else ")")

    out, places = [], []
    for a, article in enumerate(data):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        title = article.get("title") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list) or not isinstance(title, str):
            bad.reject(where(f"data[{a}]"), "an article needs a 'title' string and a 'paragraphs' list")
            continue
        for p, para in enumerate(paragraphs):
            context = para.get("context") if isinstance(para, dict) else None
            qas = para.get("qas") if isinstance(para, dict) else None
            if not isinstance(context, str) or not isinstance(qas, list):
                bad.reject(where(f"data[{a}].paragraphs[{p}]"),
                           "a paragraph needs a 'context' string and a 'qas' list")
                continue
            for q, qa in enumerate(qas):
                at = f"data[{a}].paragraphs[{p}].qas[{q}]"
                question = qa.get("question") if isinstance(qa, dict) else None
                answers = qa.get("answers") if isinstance(qa, dict) else None
                texts = ([x.get("text") if isinstance(x, dict) else None for x in answers]
                         if isinstance(answers, list) else [])
                if not isinstance(question, str) or not question.strip():
                    bad.reject(where(at, qa), "a question needs a non-empty 'question' string")
                elif not texts or not all(isinstance(t, str) for t in texts):
                    bad.reject(where(at, qa), "a question needs a non-empty 'answers' list of "
                                              "{'text': ...} objects")
                else:
                    out.append({"title": title, "context": context, "question": question,
                                "answers": texts})
                    places.append(where(at, qa, line=False))
    return Rows(out, places)


def _from_hub(record: dict) -> list[dict]:
    return [{"title": record["title"], "context": record["context"], "question": record["question"],
             "answers": list(record["answers"]["text"])}]


class SQuAD(Task):
    name = "squad"
    kind = "generation"
    train_objective = "answer_lm"
    metric = "f1"
    num_dev_default = 500
    fields = ("title", "context", "question")

    def read(self, data_dir: Path | None, bad=None) -> tuple[list[dict] | None, list[dict]]:
        if data_dir is None:
            return hub_splits(self.name, "rajpurkar/squad", None, _from_hub)
        paths = find_files(self.name, data_dir, {"valid": "squad/dev-v1.1.json"},
                           optional={"train": "squad/train-v1.1.json"})

        def load(path: Path) -> list[dict]:
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                line = raw.count(b"\n", 0, e.start) + 1
                raise TaskDataError(f"{self.name}: {path}:{line}: not valid UTF-8 (byte "
                                    f"0x{raw[e.start]:02x} at byte offset {e.start})") from None
            try:
                squad = json.loads(text)
            except json.JSONDecodeError as e:
                end = "" if text.rstrip().endswith("}") else " (the file may be truncated)"
                raise TaskDataError(f"{self.name}: {path}:{e.lineno}:{e.colno}: not valid JSON: "
                                    f"{e.msg}{end}") from None
            # A whole file that is not JSON cannot be skipped; a question that is not SQuAD's can.
            return _flatten(squad, path, text, bad)

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
