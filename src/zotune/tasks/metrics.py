"""Task metrics: accuracy, and SQuAD's answer normalisation, token F1 and exact match.

The SQuAD functions follow the official v1.1 evaluation script, which MeZO's ``metrics.py`` also
follows (an empty overlap, including empty-vs-empty, scores 0).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of ``preds`` equal to ``labels`` (0.0 for empty input)."""
    if len(preds) != len(labels):
        raise ValueError(f"accuracy: {len(preds)} predictions but {len(labels)} labels")
    if not preds:
        return 0.0
    return sum(int(p) == int(g) for p, g in zip(preds, labels)) / len(preds)


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def f1_score(pred: str, gold: str) -> float:
    """Token-overlap F1 between normalised ``pred`` and ``gold``."""
    pred_tokens = normalize_answer(pred).split()
    gold_tokens = normalize_answer(gold).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def max_f1(pred: str, answers: Sequence[str]) -> float:
    """Best F1 of ``pred`` against any gold answer (0.0 when there are none)."""
    return max((f1_score(pred, a) for a in answers), default=0.0)


def exact_match(pred: str, answers: str | Sequence[str]) -> float:
    """1.0 if normalised ``pred`` equals any normalised gold answer, else 0.0."""
    golds = [answers] if isinstance(answers, str) else answers
    return float(any(normalize_answer(pred) == normalize_answer(a) for a in golds))
