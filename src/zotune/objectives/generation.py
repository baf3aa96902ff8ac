"""Greedy generation for extractive QA (MeZO's SQuAD evaluation).

Each prompt is truncated on the left to leave room for ``max_new_tokens`` (as MeZO reserves), the
batch is padded on the left, and the model continues greedily until "\\n" or EOS; the answer is the
decoded text before the first newline, stripped. Cost: up to ``max_new_tokens`` cached decoding
steps per batch of ``batch_size`` prompts.
"""
from __future__ import annotations

import torch

from zotune.tasks.base import Example


@torch.no_grad()
def greedy_answers(runner, encoder, examples: list[Example], max_new_tokens: int = 50,
                   batch_size: int = 8) -> list[str]:
    """Greedy continuation of each example's prompt, in order (see the module docstring).

    ``runner`` is a :class:`~zotune.objectives.runner.ModelRunner`, ``encoder`` an
    :class:`~zotune.objectives.encoding.Encoder` (its tokenizer decodes and its ``max_length``
    bounds prompt + answer)."""
    tokenizer = encoder.tokenizer
    limit = max(1, encoder.max_length - max_new_tokens)
    texts: list[str] = []
    for start in range(0, len(examples), batch_size):
        rows = [encoder.prompt(ex.prompt, limit) for ex in examples[start:start + batch_size]]
        new = runner.generate(rows, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              stop_strings=["\n"], tokenizer=tokenizer,
                              eos_token_id=tokenizer.eos_token_id)
        for seq in new:
            text = tokenizer.decode(seq, skip_special_tokens=True)
            texts.append(text.split("\n")[0].strip())
    return texts
