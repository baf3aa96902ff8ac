"""Tokenising prompts and candidates MeZO's way, with left truncation and a per-example cache.

MeZO (Malladi et al. 2023; research/mezo_zobench.md sections 1.5-1.6) tokenizes ``prompt`` and
``prompt + candidate`` with the tokenizer's specials; the candidate is the last
``n = len(tok(prompt + cand)) - len(tok(prompt))`` tokens (its ``option_len``), and a sequence longer
than ``max_length`` loses tokens on the left, keeping a leading special token (BOS).

Cost: two tokenizer calls per candidate on an example's first encoding; a dictionary hit after.
"""
from __future__ import annotations

from zotune.errors import ZotuneError
from zotune.tasks.base import Example

CACHE_LIMIT = 100_000
"""Examples kept encoded; the cache is emptied beyond this, to bound memory on huge datasets."""


class Encoder:
    """Token ids of verbalized candidates, cached per example.

    Args:
        tokenizer: a Hugging Face tokenizer (its specials, e.g. BOS, are added).
        max_length: longest sequence in tokens; longer ones lose tokens on the left.
    """

    def __init__(self, tokenizer, max_length: int = 2048):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.cache: dict[Example, list[tuple[list[int], int]]] = {}

    def tokens(self, text: str) -> list[int]:
        """Token ids of ``text`` with the tokenizer's specials."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def truncate(self, ids: list[int], limit: int) -> list[int]:
        """Left truncation to ``limit`` tokens, keeping a leading special token (BOS) like MeZO."""
        if len(ids) <= limit:
            return ids
        keep = ids[:1] if ids[0] in self.tokenizer.all_special_ids else []
        return keep + ids[len(ids) - (limit - len(keep)):]

    def prompt(self, text: str, limit: int) -> list[int]:
        """The prompt's tokens, truncated on the left to ``limit`` (for generation)."""
        return self.truncate(self.tokens(text), limit)

    def encode(self, example: Example) -> list[tuple[list[int], int]]:
        """Per candidate: (truncated verbalized token ids, number n of candidate tokens at the end).

        Raises ZotuneError for a candidate that adds no token, or one too long for ``max_length``.
        """
        if example in self.cache:
            return self.cache[example]
        prompt_len = len(self.tokens(example.prompt))
        out = []
        for i, cand in enumerate(example.candidates):
            ids = self.tokens(example.prompt + cand)
            n = len(ids) - prompt_len
            if n < 1:
                raise ZotuneError(f"candidate {i} ({cand!r}) of prompt {example.prompt[:40]!r}... "
                                  "adds no tokens to the prompt")
            if n >= self.max_length - 1:
                raise ZotuneError(f"candidate {i} has {n} tokens, too long for "
                                  f"max_length={self.max_length}")
            out.append((self.truncate(ids, self.max_length), n))
        if len(self.cache) > CACHE_LIMIT:
            self.cache.clear()
        self.cache[example] = out
        return out
