r"""Candidate scores and the losses built on them: classification, answer-token LM loss, accuracy.

A candidate's score is its mean token log-likelihood (MeZO; research/mezo_zobench.md 1.5-1.6)

    s_c = (1 / n_c) * sum_{j < n_c} log p(y_{c,j} | x, y_{c,<j}).

MeZO computes full-vocabulary logits at every position of one sequence per candidate
(:func:`naive_logprobs`, the reference in tests). :func:`fast_logprobs` computes the same numbers
with less work (research section 6.4):

1. The last token of each verbalized sequence is never an input whose prediction is scored, so every
   row is ``tokens[:-1]``. When a candidate is a single token and the prompt's tokens are a prefix of
   the verbalized tokens, that row *is* the prompt, shared by all such candidates: a two-way
   single-token verbalizer costs one sequence per example instead of two.
2. Left padding right-aligns every row, so all scored positions lie in the last ``K`` columns
   (``K`` = the longest candidate). Only those logits are computed (the runner's ``keep``), and the
   log-softmax normaliser is taken only at the distinct scored positions.

Losses follow the caller's grad mode: ZO steps run them under no_grad, DiZO's first-order search
differentiates them. Accuracy is not differentiable and always runs under no_grad.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zotune.errors import ZotuneError
from zotune.tasks.base import Example

Encoded = list[tuple[list[int], int]]  # per candidate: (token ids, candidate tokens at the end)


# ----------------------------------------------------------------------------- token log-probs

def naive_logprobs(runner, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """MeZO's computation: full logits, log-softmax everywhere, gather the next tokens, keep the
    last n of each sequence. Returns flat ``(logp, segment)`` (see :func:`fast_logprobs`).
    Cost: one sequence per candidate, L x |V| logits each."""
    logits = runner.forward([ids for ids, _ in encoded], None).float()
    length = logits.shape[1]
    logp = logits[:, :-1].log_softmax(-1)
    target = torch.tensor([[runner.pad_id] * (length - len(ids)) + ids for ids, _ in encoded],
                          device=logits.device)
    token_lp = logp.gather(-1, target[:, 1:, None])[..., 0]  # [R, L-1]
    parts = [token_lp[i, length - 1 - n:] for i, (_, n) in enumerate(encoded)]
    segment = torch.cat([torch.full((n,), i) for i, (_, n) in enumerate(encoded)])
    return torch.cat(parts), segment.to(logits.device)


def fast_logprobs(runner, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate tokens' log-probs, computed only where they are needed (module docstring).

    Returns ``(logp, segment)``: flat float32 tensors over all candidate tokens, ``segment[t]``
    being the index in ``encoded`` that token ``t`` belongs to. Cost: between one sequence per
    example and one per candidate, of length L - 1, with ``max n_c`` x |V| logits each."""
    rows: dict[tuple[int, ...], int] = {}
    row_of, need = [], []
    for ids, n in encoded:  # candidates with identical inputs share one row
        key = tuple(ids[:-1])
        r = rows.setdefault(key, len(rows))
        row_of.append(r)
        need.append(n)
    keep = max(need)
    logits = runner.forward([list(k) for k in rows], keep)  # [R, keep, V]
    # Scored positions: row r_i, window columns keep-n_i .. keep-1 (rows are right-aligned).
    sites: dict[tuple[int, int], int] = {}
    site_idx, targets, segment = [], [], []
    for i, ((ids, n), r) in enumerate(zip(encoded, row_of)):
        for j in range(n):
            site_idx.append(sites.setdefault((r, keep - n + j), len(sites)))
            targets.append(ids[len(ids) - n + j])
            segment.append(i)
    dev = logits.device
    site_rows = torch.tensor([s[0] for s in sites], device=dev)
    site_cols = torch.tensor([s[1] for s in sites], device=dev)
    picked = logits[site_rows, site_cols].float()  # [S, V], distinct positions only
    logz = picked.logsumexp(-1)
    site = torch.tensor(site_idx, device=dev)
    logp = picked[site, torch.tensor(targets, device=dev)] - logz[site]
    return logp, torch.tensor(segment, device=dev)


# ----------------------------------------------------------------------------- scores and losses

def candidate_scores(logp: torch.Tensor, segment: torch.Tensor,
                     examples: list[Example]) -> torch.Tensor:
    """Mean log-prob per candidate, laid out [B, C] (-inf where an example has fewer than C
    candidates); ``logp``/``segment`` cover every candidate of every example, in order."""
    count = sum(len(ex.candidates) for ex in examples)
    sums = torch.zeros(count, device=logp.device).index_add_(0, segment, logp)
    counts = torch.zeros(count, device=logp.device).index_add_(0, segment, torch.ones_like(logp))
    means = sums / counts
    width = max(len(ex.candidates) for ex in examples)
    out = torch.full((len(examples), width), float("-inf"), device=logp.device)
    k = 0
    for b, ex in enumerate(examples):
        out[b, :len(ex.candidates)] = means[k:k + len(ex.candidates)]
        k += len(ex.candidates)
    return out


def labels(examples: list[Example], device) -> torch.Tensor:
    """The gold candidate indices; a ZotuneError for an unlabeled or out-of-range example."""
    for ex in examples:
        if not 0 <= ex.label < len(ex.candidates):
            raise ZotuneError(f"example label {ex.label} is not a candidate index "
                              f"(0..{len(ex.candidates) - 1}); unlabeled data cannot be a loss")
    return torch.tensor([ex.label for ex in examples], device=device)


def classification_loss(scores: torch.Tensor, examples: list[Example]) -> torch.Tensor:
    """MeZO's train_as_classification: mean_b CE(softmax_c s_{b,c}, label_b)."""
    return F.cross_entropy(scores, labels(examples, scores.device))


def answer_loss(gold_logp: torch.Tensor) -> torch.Tensor:
    """MeZO's SFT objective: token-level CE over the gold candidates' tokens, averaged over all
    gold tokens of the batch."""
    return -gold_logp.mean()


@torch.no_grad()
def accuracy_loss(scores: torch.Tensor, examples: list[Example]) -> torch.Tensor:
    """Minus batch accuracy of argmax_c s_{b,c}: a non-differentiable objective for ZO."""
    return -(scores.argmax(-1) == labels(examples, scores.device)).float().mean()
