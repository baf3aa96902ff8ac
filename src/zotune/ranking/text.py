"""Text for ranking: the prompts of a session and the model's completions of them.

A prompts file is JSON Lines, one object per line with a string ``"prompt"`` (other keys are
ignored); a bad line is a one-line error naming the file and line. Round ``r`` shows
``per_round`` prompts, taken cyclically from the file, so a session of any length cycles
through all of them.

Completions are sampled with a **fixed decoding seed**: every candidate of a round is decoded
from the same random stream (``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``, so the
caller's global generator is untouched), so two candidates' texts differ only because their
parameters differ. ``temperature=0`` decodes greedily. Cost: one ``generate`` call per candidate
(the round's prompts are one left-padded batch), ``max_new_tokens`` cached decoding steps.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from zotune.errors import ZotuneError


@dataclass(frozen=True)
class Prompts:
    """The prompts of a ranking session, in file order."""

    prompts: tuple[str, ...]
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ZotuneError(f"{self.source}: no prompts (one JSON object per line with a "
                              "\"prompt\" string)")

    @classmethod
    def from_jsonl(cls, path: str | Path) -> "Prompts":
        """Read ``{"prompt": "..."}`` lines; blank lines are skipped, anything else is an error."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ZotuneError(f"cannot read prompts file {path}: {exc}") from None
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise ZotuneError(f"{path}:{number}: not valid JSON ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                    or not row["prompt"].strip():
                raise ZotuneError(f"{path}:{number}: each line must be an object with a non-empty "
                                  f"\"prompt\" string, got {line.strip()[:80]!r}")
            prompts.append(row["prompt"])
        return cls(tuple(prompts), str(path))

    def for_round(self, round_number: int, per_round: int) -> list[str]:
        """The ``per_round`` prompts of round ``round_number`` (0-based), cyclically."""
        n = len(self.prompts)
        start = (round_number * per_round) % n
        return [self.prompts[(start + j) % n] for j in range(min(per_round, n))]


class Completer:
    """Sample completions of prompts from a causal LM with a fixed decoding seed.

    ``chat`` wraps each prompt in the tokenizer's chat template (``None``: when it has one), as
    instruct models such as SmolLM2-Instruct expect.
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 32, temperature: float = 0.7,
                 top_p: float = 0.95, chat: bool | None = None):
        if max_new_tokens < 1:
            raise ZotuneError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ZotuneError(f"temperature must be >= 0 (0: greedy), got {temperature}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat

    def _rows(self, prompts: list[str]) -> list[str]:
        if not self.chat:
            return list(prompts)
        return [self.tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                   tokenize=False, add_generation_prompt=True)
                for p in prompts]

    @torch.no_grad()
    def __call__(self, prompts: list[str], seed: int) -> list[str]:
        """One completion per prompt, decoded from the random stream of ``seed``."""
        tok = self.tokenizer
        batch = tok(self._rows(prompts), return_tensors="pt", padding=True,
                    add_special_tokens=not self.chat)
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        sample = self.temperature > 0
        options = dict(do_sample=sample, max_new_tokens=self.max_new_tokens,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        if sample:
            options.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(**batch, **options)
        new = out[:, batch["input_ids"].shape[1]:]
        return [tok.decode(row, skip_special_tokens=True).strip() for row in new]
