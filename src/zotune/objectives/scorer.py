"""CandidateScorer: MeZO-style candidate scoring, losses, prediction and generation for one model.

It composes the parts of this package: an :class:`~.encoding.Encoder` (tokens, truncation, cache),
a :class:`~.runner.ModelRunner` (every model call), the score and loss functions of
:mod:`.losses`, and :func:`~.generation.greedy_answers`. Cost: see :class:`CandidateScorer`.
"""
from __future__ import annotations

import torch

from zotune.tasks.base import Example

from . import losses
from .encoding import Encoder
from .generation import greedy_answers
from .runner import ModelRunner


class CandidateScorer:
    """Scores candidate continuations of prompts with a causal LM, MeZO-style.

    Args:
        model: a Hugging Face causal LM (or a peft wrapper of one).
        tokenizer: its tokenizer; padding is done here, on the left.
        max_length: longest sequence fed to the model; longer ones lose tokens on the left.
        fast: compute only what the scores need (see ``zotune.objectives.losses``); ``False`` runs
            MeZO's naive computation (full logits, one sequence per candidate), the reference in
            tests.
        pad_to_multiple_of: pad each batch to a multiple of this (MeZO uses 8 on GPUs).
        bucket_overhead: what one extra model call costs, in padded tokens, when the fast path
            splits a batch by length (see ``length_buckets``); ``"auto"`` (default) is
            ``CPU_CALL_OVERHEAD_TOKENS`` on CPU and no splitting elsewhere; None never splits.

    Attributes:
        encoder, runner: the parts (tokenising; calling the model).
        sequences_run: rows sent through the model so far (for cost accounting).

    Cost of one call on B examples with C candidates: naive = B*C sequences of length L with
    L x |V| logits each; fast = between B and B*C sequences of length L - 1 with at most
    ``max n_c`` x |V| logits each.
    """

    def __init__(self, model, tokenizer, *, max_length: int = 2048, fast: bool = True,
                 pad_to_multiple_of: int | None = None, bucket_overhead: float | str | None = "auto"):
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id or 0)
        self.runner = ModelRunner(model, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of,
                                  bucket_overhead=bucket_overhead)
        self.encoder = Encoder(tokenizer, max_length)
        self.fast = bool(fast)

    # The scorer's settings live in its parts; these keep the attributes it always had.
    model = property(lambda self: self.runner.model,
                     lambda self, v: setattr(self.runner, "model", v))
    tokenizer = property(lambda self: self.encoder.tokenizer,
                         lambda self, v: setattr(self.encoder, "tokenizer", v))
    max_length = property(lambda self: self.encoder.max_length,
                          lambda self, v: setattr(self.encoder, "max_length", int(v)))
    pad_id = property(lambda self: self.runner.pad_id,
                      lambda self, v: setattr(self.runner, "pad_id", v))
    pad_to_multiple_of = property(lambda self: self.runner.pad_to_multiple_of,
                                  lambda self, v: setattr(self.runner, "pad_to_multiple_of", v))
    bucket_overhead = property(lambda self: self.runner.bucket_overhead,
                               lambda self, v: setattr(self.runner, "bucket_overhead", v))
    sequences_run = property(lambda self: self.runner.sequences_run,
                             lambda self, v: setattr(self.runner, "sequences_run", v))

    def encode(self, example: Example) -> list[tuple[list[int], int]]:
        """Per candidate: (truncated verbalized token ids, number n of candidate tokens at the end)."""
        return self.encoder.encode(example)

    def _forward(self, rows: list[list[int]], keep: int | None) -> torch.Tensor:
        """Logits [R, keep or L, V] of the left-padded rows (``ModelRunner.forward``)."""
        return self.runner.forward(rows, keep)

    def token_logprobs(self, pairs: list[tuple[Example, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the candidate tokens of each (example, candidate index) pair, in one forward.

        Returns ``(logp, segment)``: flat float32 tensors over all candidate tokens, ``segment[t]``
        being the index in ``pairs`` that token ``t`` belongs to.
        """
        encoded = [self.encode(ex)[c] for ex, c in pairs]
        compute = losses.fast_logprobs if self.fast else losses.naive_logprobs
        return compute(self.runner, encoded)

    # ------------------------------------------------------------------ scores and losses
    # Scores and training losses follow the caller's grad mode: ZO steps run them under no_grad,
    # DiZO's first-order search differentiates them.

    def scores(self, examples: list[Example]) -> torch.Tensor:
        """Length-normalised log-likelihood of every candidate: [B, C] (-inf where an example has
        fewer than C candidates)."""
        pairs = [(ex, c) for ex in examples for c in range(len(ex.candidates))]
        return losses.candidate_scores(*self.token_logprobs(pairs), examples)

    @staticmethod
    def _labels(examples: list[Example], device) -> torch.Tensor:
        return losses.labels(examples, device)

    def classification_loss(self, examples: list[Example]) -> torch.Tensor:
        """MeZO's train_as_classification: mean_b CE(softmax_c s_{b,c}, label_b)."""
        return losses.classification_loss(self.scores(examples), examples)

    def answer_loss(self, examples: list[Example]) -> torch.Tensor:
        """MeZO's SFT objective: token-level CE over the gold candidate's tokens only, averaged over
        all gold tokens of the batch (only gold sequences are run)."""
        losses.labels(examples, "cpu")
        logp, _ = self.token_logprobs([(ex, ex.label) for ex in examples])
        return losses.answer_loss(logp)

    @torch.no_grad()
    def accuracy_loss(self, examples: list[Example]) -> torch.Tensor:
        """Minus batch accuracy of argmax_c s_{b,c}: a non-differentiable objective for ZO."""
        return losses.accuracy_loss(self.scores(examples), examples)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def predict(self, examples: list[Example], batch_size: int = 16) -> list[int]:
        """Argmax candidate per example, in input order, ``batch_size`` examples per forward."""
        out: list[int] = []
        for start in range(0, len(examples), batch_size):
            out += self.scores(examples[start:start + batch_size]).argmax(-1).tolist()
        return out

    @torch.no_grad()
    def generate(self, examples: list[Example], max_new_tokens: int = 50,
                 batch_size: int = 8) -> list[str]:
        """Greedy continuation of each prompt (MeZO's SQuAD evaluation): up to ``max_new_tokens``,
        stopping at "\\n" or EOS; returns the decoded text before the first newline, stripped."""
        return greedy_answers(self.runner, self.encoder, examples, max_new_tokens, batch_size)
