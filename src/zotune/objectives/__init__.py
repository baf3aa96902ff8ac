"""Objectives: what a zeroth-order step evaluates. Candidate scoring for prompted classification,
the answer-token LM loss, non-differentiable accuracy; plus prediction and greedy generation.

Everything follows MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward
Passes"; research/mezo_zobench.md sections 1.5-1.6), in parts of one concept each:

- :mod:`.encoding`: prompt and candidate tokens, MeZO's ``option_len``, left truncation keeping BOS,
  the per-example cache (:class:`Encoder`).
- :mod:`.runner`: the one place the model is called (:class:`ModelRunner`): left padding,
  explicit positions, ``logits_to_keep``, length buckets, and :meth:`ModelRunner.forward_from`,
  which restarts a forward at block j from a cached input of block j.
- :mod:`.losses`: scores (naive and fast log-probs) and the losses built on them.
- :mod:`.generation`: greedy generation for SQuAD.
- :mod:`.scorer`: :class:`CandidateScorer`, composing them for one model and tokenizer.
"""
from .encoding import Encoder
from .generation import greedy_answers
from .losses import (
    accuracy_loss,
    answer_loss,
    candidate_scores,
    classification_loss,
    fast_logprobs,
    naive_logprobs,
)
from .runner import CPU_CALL_OVERHEAD_TOKENS, BlockInput, ModelRunner, length_buckets
from .scorer import CandidateScorer

__all__ = [
    "CPU_CALL_OVERHEAD_TOKENS", "BlockInput", "CandidateScorer", "Encoder", "ModelRunner",
    "accuracy_loss", "answer_loss", "candidate_scores", "classification_loss", "fast_logprobs",
    "greedy_answers", "length_buckets", "naive_logprobs",
]
