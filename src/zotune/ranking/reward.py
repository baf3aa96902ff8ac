"""Ranking oracles that read generated text: a reward model or a user's function.

A query's m candidates each complete the same prompts with the same decoding seed (so they differ
only by their parameters); each completion is scored, a candidate's reward is the mean over its
prompts, and the oracle answers the ``k`` candidates of **highest** reward, best first (ties by
candidate id). That is the ranking oracle of research/ranksgd_deepzero.md A.1 with
f = -reward; only the order of the rewards reaches the optimizer, so any monotone transform of
the reward gives the same run.

Rewards:

* any callable ``text -> float`` (a length or keyword rule, a regex, a call into your own model);
* :class:`HFRewardModel`: a local Hugging Face sequence-classification model (a sentiment
  classifier, a preference reward model), scoring a batch of texts by one output logit.

Cost per query: m ``generate`` calls (one batch of the round's prompts each) plus m scorings.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from zotune.errors import ZotuneError


class HFRewardModel:
    """Score texts with a local ``AutoModelForSequenceClassification``: the logit of ``label``.

    ``label`` is a label name from the model's ``id2label`` (``"POSITIVE"``) or an index; by
    default the model's only output (a reward model) or its last label (positive sentiment in
    the usual binary classifiers). Texts are scored in batches of ``batch_size``, truncated to
    ``max_length`` tokens; the model runs in eval mode without gradients.
    """

    def __init__(self, path: str | Path, *, label: str | int | None = None, batch_size: int = 16,
                 max_length: int = 512, device: str | torch.device | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path).expanduser()
        if not path.is_dir():
            raise ZotuneError(f"reward model {str(path)!r} is not a local model directory")
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # transformers raises many kinds; the user needs one line
            raise ZotuneError(f"could not load reward model from {str(path)!r}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}") from None
        if device is not None:
            self.model.to(device)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.index = self._label_index(label)
        self.batch_size, self.max_length = batch_size, max_length

    def _label_index(self, label) -> int:
        labels = dict(getattr(self.model.config, "id2label", {}) or {})
        n = int(self.model.config.num_labels)
        if label is None:
            return n - 1
        if isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < n:
                raise ZotuneError(f"reward label index {label} out of range 0..{n - 1}")
            return label
        for index, name in labels.items():
            if str(name).lower() == str(label).lower():
                return int(index)
        raise ZotuneError(f"reward label {label!r} is not one of the model's labels: "
                          + ", ".join(str(labels[i]) for i in sorted(labels)))

    @torch.no_grad()
    def score(self, texts: Sequence[str]) -> list[float]:
        """The chosen logit of each text, in order."""
        device = next(self.model.parameters()).device
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[start:start + self.batch_size]), return_tensors="pt",
                                   padding=True, truncation=True, max_length=self.max_length)
            logits = self.model(**{k: v.to(device) for k, v in batch.items()}).logits
            out += logits[:, self.index].float().tolist()
        return out

    __call__ = score


def score_texts(reward, texts: Sequence[str]) -> list[float]:
    """``reward``'s score of each text: a batch scorer (an object with ``score(texts)``, such as
    :class:`HFRewardModel`) or a callable ``text -> float``."""
    if hasattr(reward, "score"):
        values = list(reward.score(list(texts)))
    else:
        values = [reward(t) for t in texts]
    if len(values) != len(texts):
        raise ZotuneError(f"the reward returned {len(values)} scores for {len(texts)} texts")
    return [float(v) for v in values]


def top_k(rewards: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` highest rewards, best first, ties by index; NaN ranks last."""
    key = lambda i: (-rewards[i] if rewards[i] == rewards[i] else float("inf"), i)  # noqa: E731
    return sorted(range(len(rewards)), key=key)[:k]


class RewardOracle:
    """Rank a query's candidates by the reward of their completions (see the module docstring).

    ``complete(prompts, seed) -> texts`` generates at the current parameters (a
    :class:`~zotune.ranking.text.Completer`); ``prompts`` is a list or a function of the round
    number; ``seed(round)`` gives the round's decoding seed (default: the round number). Calling
    the oracle on a query (``oracle(query)``) returns the top-``k`` candidate ids and keeps
    ``last_rewards`` (one per candidate) and ``last_texts`` for logging.
    """

    def __init__(self, reward, complete: Callable, prompts, *, k: int,
                 seed: Callable[[int], int] | None = None, with_prompt: bool = False):
        if k < 1:
            raise ZotuneError(f"k must be >= 1, got {k}")
        self.reward, self.complete, self.k = reward, complete, int(k)
        self.prompts = prompts if callable(prompts) else (lambda r, p=list(prompts): p)
        self.seed = seed or (lambda r: r)
        self.with_prompt = with_prompt
        self.round = 0
        self.last_rewards: list[float] = []
        self.last_texts: list[list[str]] = []

    def rewards_at_current(self, prompts: Sequence[str], seed: int) -> tuple[float, list[str]]:
        """Mean reward of the completions at the current parameters, and the completions."""
        texts = self.complete(list(prompts), seed)
        scored = [p + t for p, t in zip(prompts, texts)] if self.with_prompt else texts
        values = score_texts(self.reward, scored)
        return sum(values) / len(values), texts

    def __call__(self, query, k: int | None = None) -> list[int]:
        prompts, seed = self.prompts(self.round), self.seed(self.round)
        self.last_rewards, self.last_texts = [], []
        for i in range(len(query)):
            with query.at(i):
                value, texts = self.rewards_at_current(prompts, seed)
            self.last_rewards.append(value)
            self.last_texts.append(texts)
        self.round += 1
        wanted = k or getattr(query, "k", None) or self.k  # a search round wants only the best
        return top_k(self.last_rewards, min(wanted, len(query)))
