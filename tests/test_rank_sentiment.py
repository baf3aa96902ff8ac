"""The sentiment reward of the SmolLM2 alignment benchmark: naive Bayes weights against the
formula by hand, repetition and one-word answers not paying, and the SST-2 fit."""
import math
import os
from pathlib import Path

import pytest

from zotune.errors import ZotuneError
from zotune.ranking.sentiment import NaiveBayesSentiment, PositiveReward, distinct_n, words

TEXTS = ["a good film", "good good fun", "a bad film", "dull and bad", "fun and good"]
LABELS = [1, 1, 0, 0, 1]


def test_naive_bayes_weights_match_the_formula_by_hand():
    nb = NaiveBayesSentiment.fit(TEXTS, LABELS, alpha=1.0)
    vocab = {"a", "good", "film", "fun", "bad", "dull", "and"}
    assert set(nb.weights) == vocab
    # texts containing each word (a word counts once per text): positive / negative
    pos = {"a": 1, "good": 3, "film": 1, "fun": 2, "bad": 0, "dull": 0, "and": 1}
    neg = {"a": 1, "good": 0, "film": 1, "fun": 0, "bad": 2, "dull": 1, "and": 1}
    n_pos, n_neg = sum(pos.values()) + len(vocab), sum(neg.values()) + len(vocab)
    for w in vocab:
        assert nb.weights[w] == pytest.approx(math.log((pos[w] + 1) / n_pos) - math.log((neg[w] + 1) / n_neg))
    assert nb.bias == pytest.approx(math.log(3 / 2))
    z = nb.bias + nb.weights["good"] + nb.weights["fun"]
    assert nb.prob("Good fun!") == pytest.approx(1 / (1 + math.exp(-z)))
    assert nb.prob("good fun good fun good fun") == nb.prob("good fun")  # each word once
    assert nb.prob("zzqx blorp") == pytest.approx(1 / (1 + math.exp(-nb.bias)))  # unknown words: 0
    assert nb.prob("bad dull") < 0.5 < nb.prob("good fun")


def test_distinct_bigrams_and_words():
    assert words("It's a GOOD day, 2 days!") == ["it", "s", "a", "good", "day", "days"]
    assert distinct_n("the cat sat on the mat") == 1.0
    assert distinct_n("dim dim dim dim dim") == pytest.approx(1 / 4)
    assert distinct_n("a b a b a b") == pytest.approx(2 / 5)
    assert distinct_n("one") == 1.0 and distinct_n("a b c", n=3) == 1.0


def test_positive_reward_does_not_pay_for_loops_or_one_word_answers():
    nb = NaiveBayesSentiment.fit(TEXTS, LABELS)
    reward = PositiveReward(nb, min_words=8)
    fluent = "it was a good film and good fun for all of us"
    loop = "good fun good fun good fun good fun good fun"
    parts = reward.parts(fluent)
    assert parts["reward"] == pytest.approx(nb.prob(fluent)) and parts["distinct"] == 1.0
    assert reward(loop) == pytest.approx(nb.prob(loop) * 2 / 9)
    assert reward(loop) < 0.5 * reward(fluent)
    assert reward("Good!") == pytest.approx(nb.prob("good") / 8)
    assert reward.score([fluent, loop]) == [reward(fluent), reward(loop)]
    with pytest.raises(ZotuneError, match="min_words and n must be >= 1"):
        PositiveReward(nb, min_words=0)


def test_fit_errors_are_one_line(tmp_path):
    with pytest.raises(ZotuneError, match="needs positive and negative"):
        NaiveBayesSentiment.fit(["good"], [1])
    with pytest.raises(ZotuneError, match="labels are 0 or 1"):
        NaiveBayesSentiment.fit(["good"], [2])
    with pytest.raises(ZotuneError, match="cannot read SST-2 training data"):
        NaiveBayesSentiment.from_sst2(tmp_path / "missing.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tscore\nfine\t1\n")
    with pytest.raises(ZotuneError, match="'sentence' and 'label' columns"):
        NaiveBayesSentiment.from_sst2(bad)


SST2 = Path(os.environ.get("ZOTUNE_DATA", "data")) / "sst2" / "train.tsv"


@pytest.mark.skipif(not SST2.exists(), reason=f"SST-2 not found at {SST2} (set ZOTUNE_DATA)")
def test_sst2_fit_separates_plain_positive_and_negative_sentences():
    nb = NaiveBayesSentiment.from_sst2()
    assert len(nb.weights) > 10000
    assert nb.prob("a wonderful, moving and beautiful story") > 0.9
    assert nb.prob("a dull, boring and stupid mess") < 0.1
    dev = Path(SST2.parent / "dev.tsv").read_text().splitlines()[1:]
    right = sum((nb.prob(s) > 0.5) == (lab == "1") for s, lab in (line.rsplit("\t", 1) for line in dev))
    assert right / len(dev) > 0.75  # binary naive Bayes on SST-2 sentences: about 0.8
