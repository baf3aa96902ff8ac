"""The SuperGLUE tasks MeZO uses: RTE, CB, BoolQ, WSC, WiC, MultiRC, COPA.

Templates are MeZO's (``large_models/templates.py``, adapted there from PromptSource/GPT-3); each
class docstring quotes its template, ``+ w`` marking where the label word is appended.
Local data: ``<task>/{train,val}.jsonl`` in the official SuperGLUE layout; ``val`` is MeZO's
"validation" split, from which the test sample is drawn.
"""
from __future__ import annotations

from pathlib import Path

from zotune.tasks.base import Example, Task, TaskDataError, mezo_example
from zotune.tasks.data import BadRows, Rows, find_files, hub_splits, label_index, read_jsonl

_NO_YES = {False: 0, True: 1}  # the Hub's 0/1 ints hash like False/True, so both forms match


class _SuperGLUETask(Task):
    folder = ""
    hub: tuple[str, str | None] = ("aps/super_glue", None)
    words: tuple[str, ...] = ()
    labels: dict = {}
    train_optional = False

    def read(self, data_dir: Path | None, bad=None) -> tuple[list[dict] | None, list[dict]]:
        if data_dir is None:
            return hub_splits(self.name, self.hub[0], self.hub[1], self.from_hub)
        bad = bad or BadRows(self.name)
        train = {"train": f"{self.folder}/train.jsonl"}
        paths = find_files(self.name, data_dir, {"valid": f"{self.folder}/val.jsonl",
                                                 **({} if self.train_optional else train)},
                           optional=train if self.train_optional else None)
        rows = {k: self.flatten(read_jsonl(p, bad), bad) for k, p in paths.items()}
        return rows.get("train"), rows["valid"]

    def flatten(self, rows: list[dict], bad=None) -> list[dict]:
        return rows

    def from_hub(self, record: dict) -> list[dict]:
        return [record]

    def with_words(self, encoded: str, record: dict) -> Example:
        return mezo_example(encoded, [encoded + w for w in self.words], label_index(self.name, record, self.labels))


class RTE(_SuperGLUETask):
    """Textual entailment. ``"{premise}\\nDoes this mean that \\"{hypothesis}\\" is true? Yes or No?\\n" + w``,
    w in (Yes, No); entailment -> Yes."""

    name, folder, hub = "rte", "rte", ("aps/super_glue", "rte")
    fields = ("premise", "hypothesis")
    words = ("Yes", "No")
    labels = {"entailment": 0, "not_entailment": 1, 0: 0, 1: 1}

    def to_example(self, r: dict) -> Example:
        return self.with_words(f"{r['premise']}\nDoes this mean that \"{r['hypothesis']}\" is true? Yes or No?\n", r)


class CB(_SuperGLUETask):
    """CommitmentBank, 3-way entailment.
    ``"Suppose {premise} Can we infer that \\"{hypothesis}\\"? Yes, No, or Maybe?\\n" + w``,
    w in (Yes, No, Maybe) for entailment, contradiction, neutral."""

    name, folder, hub = "cb", "cb", ("aps/super_glue", "cb")
    fields = ("premise", "hypothesis")
    num_dev_default = 100
    words = ("Yes", "No", "Maybe")
    labels = {"entailment": 0, "contradiction": 1, "neutral": 2, 0: 0, 1: 1, 2: 2}

    def to_example(self, r: dict) -> Example:
        return self.with_words(f"Suppose {r['premise']} Can we infer that \"{r['hypothesis']}\"? Yes, No, or Maybe?\n", r)


class BoolQ(_SuperGLUETask):
    """Yes/no questions about a passage. MeZO's default ``BoolQTemplateV3``:
    ``"{passage} {Question}\\n" + w``, the question given a capital first letter and a "?" if it
    lacks one; w in (Yes, No), true -> Yes. (ZO-Bench uses V1, a space instead of the newline.)
    ``boolq/train.jsonl`` is used when present; the reference data here has only ``val.jsonl``."""

    name, folder, hub = "boolq", "boolq", ("google/boolq", None)
    fields = ("question", "passage")
    check_renders = True
    words = ("Yes", "No")
    labels = {True: 0, False: 1}
    train_optional = True

    def from_hub(self, record: dict) -> list[dict]:
        return [{"question": record["question"], "passage": record["passage"], "label": record["answer"]}]

    def to_example(self, r: dict) -> Example:
        if not r["question"].strip():
            raise TaskDataError("field 'question' is empty")
        question = r["question"] if r["question"].endswith("?") else r["question"] + "?"
        question = question[0].upper() + question[1:]
        return self.with_words(f"{r['passage']} {question}\n", r)


class WSC(_SuperGLUETask):
    """Winograd schema (pronoun resolution). ``"{text}\\nIn the previous sentence, does the pronoun
    \\"{span2 lower-cased}\\" refer to {span1}? Yes or No?\\n" + w``, w in (No, Yes), true -> Yes.
    MeZO reads Hugging Face's ``wsc.fixed``, so the official files' spans get the same repair.
    Dev is 100 examples, as for CB and COPA: MeZO's script keeps 500 for WSC, which leaves 54 of
    its 554 training examples to train on (``--num-dev 500`` reproduces that)."""

    name, folder, hub = "wsc", "wsc", ("aps/super_glue", "wsc.fixed")
    fields = ("text",)
    num_dev_default = 100
    check_renders = True
    words = ("No", "Yes")
    labels = _NO_YES
    # wsc.fixed leaves these alone: the subjects have intervening text, nothing to repair.
    _UNFIXABLE = ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin")

    def _span(self, r: dict, spans: dict, key: str) -> str:
        """``wsc.fixed``'s repair of a span that is not a substring of the text (96 of 658 rows):
        match the case of the word at the span index, drop trailing ".", "\n" -> " "."""
        span = spans[f"{key}_text"]
        if span in r["text"] or span in self._UNFIXABLE:
            return span
        word = r["text"].split()[spans[f"{key}_index"]]
        span = (span[0].lower() if word[0].islower() else span[0].upper()) + span[1:]
        return span.rstrip(".").replace("\n", " ")

    def to_example(self, r: dict) -> Example:
        spans = r.get("target", r)  # official files nest the spans under "target"; the Hub does not
        span1, span2 = self._span(r, spans, "span1"), self._span(r, spans, "span2")
        return self.with_words(f"{r['text']}\nIn the previous sentence, does the pronoun "
                               f"\"{span2.lower()}\" refer to {span1}? Yes or No?\n", r)


class WiC(_SuperGLUETask):
    """Word in context. ``"Does the word \\"{word}\\" have the same meaning in these two sentences?
    Yes, No?\\n{sentence1}\\n{sentence2}\\n" + w``, w in (No, Yes), true -> Yes."""

    name, folder, hub = "wic", "wic", ("aps/super_glue", "wic")
    fields = ("word", "sentence1", "sentence2")
    words = ("No", "Yes")
    labels = _NO_YES

    def to_example(self, r: dict) -> Example:
        return self.with_words(f"Does the word \"{r['word']}\" have the same meaning in these two sentences? "
                               f"Yes, No?\n{r['sentence1']}\n{r['sentence2']}\n", r)


class MultiRC(_SuperGLUETask):
    """Multi-sentence reading comprehension, one example per (paragraph, question, answer) row.
    ``"{paragraph}\\nQuestion: {question}\\nI found this answer \\"{answer}\\". Is that correct?
    Yes or No?\\n" + w``, w in (No, Yes), 1 -> Yes. Scored by per-row accuracy, as in MeZO."""

    name, folder, hub = "multirc", "multirc", ("aps/super_glue", "multirc")
    fields = ("paragraph", "question", "answer")
    words = ("No", "Yes")
    labels = _NO_YES

    def flatten(self, rows: list[dict], bad=None) -> list[dict]:
        # Same order as Hugging Face's flattening: paragraph, then question, then answer.
        bad = bad or BadRows(self.name)
        out, where = [], []
        for i, row in enumerate(rows):
            place = rows.where[i] if getattr(rows, "where", None) else f"records[{i}]"
            try:
                flat = [({"paragraph": row["passage"]["text"], "question": q["question"],
                          "answer": a["text"], **({"label": a["label"]} if "label" in a else {})},
                         f"{place} (question {i + 1}, answer {j + 1})")
                        for i, q in enumerate(row["passage"]["questions"])
                        for j, a in enumerate(q["answers"])]
            except (KeyError, TypeError) as e:
                what = f"missing field {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
                bad.reject(place, f"not a MultiRC record (passage.text, passage.questions[].question, "
                                  f".answers[].text): {what}")
                continue
            out += [record for record, _ in flat]
            where += [w for _, w in flat]
        return Rows(out, where)

    def to_example(self, r: dict) -> Example:
        return self.with_words(f"{r['paragraph']}\nQuestion: {r['question']}\nI found this answer "
                               f"\"{r['answer']}\". Is that correct? Yes or No?\n", r)


class COPA(_SuperGLUETask):
    """Choice of plausible alternatives (cause/effect). MeZO's ``CopaTemplate``: the premise without
    its final ".", then " so " (effect) or " because " (cause), then the choice with its first word
    lower-cased unless it is "I". Trained on the gold continuation only (answer LM)."""

    name, folder, hub = "copa", "copa", ("aps/super_glue", "copa")
    kind = "multiple_choice"
    train_objective = "answer_lm"
    num_dev_default = 100
    fields = ("premise", "choice1", "choice2", "question")
    check_renders = True
    labels = {0: 0, 1: 1}

    def to_example(self, r: dict) -> Example:
        premise = r["premise"].rstrip()
        premise = premise[:-1] if premise.endswith(".") else premise
        conjunctions = {"effect": " so ", "cause": " because "}
        if r["question"] not in conjunctions:
            raise TaskDataError(f"field 'question' must be 'effect' or 'cause', got {r['question']!r}")
        conjunction = conjunctions[r["question"]]
        encoded = premise + conjunction

        def lower_first(choice: str) -> str:
            first, *rest = choice.split(" ")
            return " ".join([first if first == "I" else first.lower(), *rest])

        return mezo_example(encoded, [encoded + lower_first(r["choice1"]), encoded + lower_first(r["choice2"])],
                            label_index(self.name, r, self.labels))
