r"""A sentiment reward on text that repetition cannot game: naive Bayes fitted on SST-2, times a
distinct-bigram ratio and a length ramp.

:class:`NaiveBayesSentiment` is the binary ("set of words") naive Bayes classifier of Wang and
Manning (2012) without the SVM: for a word w in the vocabulary, with Laplace smoothing alpha,

.. math::
    r_w = \log\frac{(n^+_w + \alpha) / (N^+ + \alpha |V|)}{(n^-_w + \alpha) / (N^- + \alpha |V|)},
    \qquad P(+ \mid t) = \sigma\Big(\log\frac{D^+}{D^-} + \sum_{w \in \mathrm{set}(t)} r_w\Big),

where :math:`n^\pm_w` counts the positive / negative training texts that contain w, N the sums of
those counts and D the numbers of texts. Each distinct word counts once, so repeating a word
changes nothing; unknown words (gibberish) count zero.

:class:`PositiveReward` is what the alignment benchmark ranks by:

.. math::
    R(t) = P(+ \mid t) \cdot \mathrm{distinct}_2(t) \cdot \min(1, |t|_{words} / L),

with :math:`\mathrm{distinct}_2` the share of distinct word bigrams among all bigrams (1 for fewer
than two words) and L = ``min_words``: a completion that loops ("dim dim dim ...") loses most of
its reward, and a one-word "Wonderful!" scores at most 1/L of a full sentence's.

Cost: fitting reads the texts once (SST-2's 67k phrases in about a second); scoring is a
dictionary look-up per word.
"""
from __future__ import annotations

import csv
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from zotune.errors import ZotuneError

WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    """Lower-case alphabetic words of ``text``, in order."""
    return WORD.findall(text.lower())


def distinct_n(text: str, n: int = 2) -> float:
    """Distinct word n-grams over all word n-grams of ``text`` (1.0 when it has fewer than n words)."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


class NaiveBayesSentiment:
    """Binary naive Bayes sentiment (see the module docstring): ``prob(text)`` is P(positive)."""

    def __init__(self, weights: dict[str, float], bias: float) -> None:
        self.weights, self.bias = weights, bias

    @classmethod
    def fit(cls, texts: Iterable[str], labels: Iterable[int], alpha: float = 1.0) -> "NaiveBayesSentiment":
        """Fit on ``texts`` with labels 1 (positive) / 0 (negative)."""
        counts = {0: Counter(), 1: Counter()}
        docs = Counter()
        for text, label in zip(texts, labels):
            label = int(label)
            if label not in (0, 1):
                raise ZotuneError(f"sentiment labels are 0 or 1, got {label!r}")
            counts[label].update(set(words(text)))
            docs[label] += 1
        if not docs[0] or not docs[1]:
            raise ZotuneError("fitting sentiment needs positive and negative texts")
        vocab = set(counts[0]) | set(counts[1])
        total = {c: sum(counts[c].values()) + alpha * len(vocab) for c in (0, 1)}
        weights = {w: math.log((counts[1][w] + alpha) / total[1]) - math.log((counts[0][w] + alpha) / total[0])
                   for w in vocab}
        return cls(weights, math.log(docs[1] / docs[0]))

    @classmethod
    def from_sst2(cls, path: str | Path | None = None) -> "NaiveBayesSentiment":
        """Fit on SST-2's training split (``train.tsv``: sentence, label), by default
        ``$ZOTUNE_DATA/sst2/train.tsv``."""
        if path is None:
            path = Path(os.environ.get("ZOTUNE_DATA", "data")) / "sst2" / "train.tsv"
        path = Path(path)
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        except OSError as exc:
            raise ZotuneError(f"cannot read SST-2 training data {str(path)!r}: {exc.strerror or exc}") from None
        if not rows or "sentence" not in rows[0] or "label" not in rows[0]:
            raise ZotuneError(f"{path}: expected a TSV with 'sentence' and 'label' columns")
        return cls.fit((r["sentence"] for r in rows), (int(r["label"]) for r in rows))

    def logit(self, text: str) -> float:
        """log P(+|t) / P(-|t): the bias plus the weights of the distinct known words."""
        return self.bias + sum(self.weights.get(w, 0.0) for w in set(words(text)))

    def prob(self, text: str) -> float:
        z = self.logit(text)
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


class PositiveReward:
    """R(t) = P(+|t) * distinct_2(t) * min(1, words / min_words) (module docstring); a batch
    scorer for :class:`~zotune.ranking.reward.RewardOracle`."""

    def __init__(self, sentiment: NaiveBayesSentiment, min_words: int = 8, n: int = 2) -> None:
        if min_words < 1 or n < 1:
            raise ZotuneError(f"min_words and n must be >= 1, got {min_words} and {n}")
        self.sentiment, self.min_words, self.n = sentiment, min_words, n

    def parts(self, text: str) -> dict[str, float]:
        """The three factors and their product."""
        p = self.sentiment.prob(text)
        d = distinct_n(text, self.n)
        length = min(1.0, len(words(text)) / self.min_words)
        return {"sentiment": p, "distinct": d, "length": length, "reward": p * d * length}

    def __call__(self, text: str) -> float:
        return self.parts(text)["reward"]

    def score(self, texts: Sequence[str]) -> list[float]:
        return [self(t) for t in texts]
