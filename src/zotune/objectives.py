"""Losses a zeroth-order step evaluates: candidate scoring for prompted classification, the
answer-token LM loss, and non-differentiable accuracy; plus prediction and greedy generation.

Everything follows MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward
Passes"; research/mezo_zobench.md §1.5-1.6): prompt and prompt + candidate are tokenized with the
tokenizer's specials, the candidate is the last ``n = len(tok(prompt + cand)) - len(tok(prompt))``
tokens (MeZO's ``option_len``), sequences are truncated on the left keeping a leading BOS, and batches
are padded on the left. A candidate's score is its mean token log-likelihood

    s_c = (1 / n_c) * sum_{j < n_c} log p(y_{c,j} | x, y_{c,<j}).

MeZO computes full-vocabulary logits at every position of one sequence per candidate. The fast path
(the default) computes the same numbers with less work (research §6.4):

1. The last token of each verbalized sequence is never an input whose prediction is scored, so every
   row is ``tokens[:-1]``. When a candidate is a single token and the prompt's tokens are a prefix of
   the verbalized tokens, that row *is* the prompt, shared by all such candidates: a two-way
   single-token verbalizer costs one sequence per example instead of two.
2. Left padding right-aligns every row, so all scored positions lie in the last ``K`` columns (``K`` =
   the longest candidate). Only those logits are computed, through transformers' documented
   ``logits_to_keep`` argument (no modeling code is copied), and the log-softmax normaliser is
   taken only at the distinct scored positions.

3. On CPU, a batch is split into groups of similar length, each padded and run on its own
   (``length_buckets``): a short prompt no longer pays for the longest one. The split minimises
   padded tokens plus a per-call overhead; on GPUs, where small calls are launch-bound, one call.

Positions are passed explicitly (``cumsum(mask) - 1``) so a score does not depend on how much a row
is padded; OPT computes exactly these itself, RoPE and GPT-2 models otherwise shift with padding.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F

from zotune.errors import ZotuneError
from zotune.tasks.base import Example


CPU_CALL_OVERHEAD_TOKENS = 64
"""A model call's fixed cost on CPU, in padded tokens: the best of 0-128 for SmolLM2-135M on 2
cores, SST-2 and RTE alike (0.59x and 0.57x the time of one padded call; measured by
``benchmarks/forward_buckets.py``, recorded in docs/benchmarks.md)."""


def length_buckets(lengths: list[int], overhead: float) -> list[list[int]]:
    r"""Split rows into groups, each padded to its own longest row, at the least cost.

    Groups are runs of the rows sorted by length; dynamic programming over the cut points
    minimises :math:`\sum_g (|g| \max_{i \in g} \ell_i + c)` for lengths :math:`\ell` and a
    per-call overhead c (in tokens). O(R^2) for R rows. Returns lists of row indices.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_lengths = [lengths[i] for i in order]
    n = len(order)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end):  # group order[start:end], padded to sorted_lengths[end - 1]
            cost = best[start] + (end - start) * sorted_lengths[end - 1] + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


class CandidateScorer:
    """Scores candidate continuations of prompts with a causal LM, MeZO-style.

    Args:
        model: a Hugging Face causal LM (or a peft wrapper of one).
        tokenizer: its tokenizer; padding is done here, on the left.
        max_length: longest sequence fed to the model; longer ones lose tokens on the left.
        fast: compute only what the scores need (see the module docstring); ``False`` runs MeZO's
            naive computation (full logits, one sequence per candidate), the reference in tests.
        pad_to_multiple_of: pad each batch to a multiple of this (MeZO uses 8 on GPUs).
        bucket_overhead: what one extra model call costs, in padded tokens, when the fast path
            splits a batch by length (see ``length_buckets``); ``"auto"`` (default) is
            ``CPU_CALL_OVERHEAD_TOKENS`` on CPU and no splitting elsewhere; None never splits.

    Cost of one call on B examples with C candidates: naive = B*C sequences of length L with
    L x |V| logits each; fast = between B and B*C sequences of length L - 1 with at most
    ``max n_c`` x |V| logits each.
    """

    def __init__(self, model, tokenizer, *, max_length: int = 2048, fast: bool = True,
                 pad_to_multiple_of: int | None = None, bucket_overhead: float | str | None = "auto"):
        if not (bucket_overhead in ("auto", None) or (isinstance(bucket_overhead, (int, float))
                                                      and bucket_overhead >= 0)):
            raise ValueError(f"bucket_overhead must be 'auto', None or a number >= 0, got {bucket_overhead!r}")
        self.bucket_overhead = bucket_overhead
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.fast = int(max_length), bool(fast)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
            tokenizer.eos_token_id or 0)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        # Models without these arguments still work: padded positions, or full logits sliced.
        self._position_ids = "position_ids" in params
        self._logits_to_keep = "logits_to_keep" in params
        self._cache: dict[Example, list[tuple[list[int], int]]] = {}
        self.sequences_run = 0  # rows sent through the model so far (for cost accounting)

    # ------------------------------------------------------------------ encoding

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def _truncate(self, ids: list[int], limit: int) -> list[int]:
        """Left truncation to ``limit`` tokens, keeping a leading special token (BOS) like MeZO."""
        if len(ids) <= limit:
            return ids
        keep = ids[:1] if ids[0] in self.tokenizer.all_special_ids else []
        return keep + ids[len(ids) - (limit - len(keep)):]

    def encode(self, example: Example) -> list[tuple[list[int], int]]:
        """Per candidate: (truncated verbalized token ids, number n of candidate tokens at the end)."""
        if example in self._cache:
            return self._cache[example]
        prompt_len = len(self._tokens(example.prompt))
        out = []
        for i, cand in enumerate(example.candidates):
            ids = self._tokens(example.prompt + cand)
            n = len(ids) - prompt_len
            if n < 1:
                raise ZotuneError(f"candidate {i} ({cand!r}) of prompt {example.prompt[:40]!r}... "
                                  "adds no tokens to the prompt")
            if n >= self.max_length - 1:
                raise ZotuneError(f"candidate {i} has {n} tokens, too long for "
                                  f"max_length={self.max_length}")
            out.append((self._truncate(ids, self.max_length), n))
        if len(self._cache) > 100_000:  # bound memory on huge datasets
            self._cache.clear()
        self._cache[example] = out
        return out

    # ------------------------------------------------------------------ model calls

    def _forward(self, rows: list[list[int]], keep: int | None) -> torch.Tensor:
        """Logits [R, keep or L, V] of the left-padded rows (last ``keep`` positions only)."""
        device = next(self.model.parameters()).device
        overhead = self.bucket_overhead
        if overhead == "auto":
            overhead = CPU_CALL_OVERHEAD_TOKENS if device.type == "cpu" else None
        # Only the fast path splits, and only where positions are explicit (scores then do not
        # depend on a row's padding, so not on its group).
        split = keep is not None and overhead is not None and self._position_ids and len(rows) > 1
        groups = length_buckets([len(r) for r in rows], overhead) if split else []
        if len(groups) > 1:
            parts = [self._padded_forward([rows[i] for i in g], keep, device) for g in groups]
            order = torch.tensor([i for g in groups for i in g])
            return torch.cat(parts)[order.argsort().to(device)]  # back to the rows' order
        return self._padded_forward(rows, keep, device)

    def _padded_forward(self, rows: list[list[int]], keep: int | None, device) -> torch.Tensor:
        length = max(max(map(len, rows)), keep or 0)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, length - len(row):] = torch.tensor(row)
            mask[r, length - len(row):] = 1
        kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
        if self._position_ids:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        if keep is not None and self._logits_to_keep:
            kwargs["logits_to_keep"] = keep
        self.sequences_run += len(rows)
        logits = self.model(**kwargs).logits
        return logits if keep is None else logits[:, -keep:]

    def token_logprobs(self, pairs: list[tuple[Example, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the candidate tokens of each (example, candidate index) pair, in one forward.

        Returns ``(logp, segment)``: flat float32 tensors over all candidate tokens, ``segment[t]``
        being the index in ``pairs`` that token ``t`` belongs to.
        """
        encoded = [self.encode(ex)[c] for ex, c in pairs]
        return self._fast(encoded) if self.fast else self._naive(encoded)

    def _naive(self, encoded):
        # MeZO: full logits, log-softmax everywhere, gather the next tokens, keep the last n.
        logits = self._forward([ids for ids, _ in encoded], None).float()
        length = logits.shape[1]
        logp = logits[:, :-1].log_softmax(-1)
        target = torch.tensor([[self.pad_id] * (length - len(ids)) + ids for ids, _ in encoded],
                              device=logits.device)
        token_lp = logp.gather(-1, target[:, 1:, None])[..., 0]  # [R, L-1]
        parts = [token_lp[i, length - 1 - n:] for i, (_, n) in enumerate(encoded)]
        segment = torch.cat([torch.full((n,), i) for i, (_, n) in enumerate(encoded)])
        return torch.cat(parts), segment.to(logits.device)

    def _fast(self, encoded):
        rows: dict[tuple[int, ...], int] = {}
        row_of, need = [], []
        for ids, n in encoded:  # candidates with identical inputs share one row
            key = tuple(ids[:-1])
            r = rows.setdefault(key, len(rows))
            row_of.append(r)
            need.append(n)
        keep = max(need)
        logits = self._forward([list(k) for k in rows], keep)  # [R, keep, V]
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

    # ------------------------------------------------------------------ scores and losses
    # Scores and training losses follow the caller's grad mode: ZO steps run them under no_grad,
    # DiZO's first-order search differentiates them.

    def scores(self, examples: list[Example]) -> torch.Tensor:
        """Length-normalised log-likelihood of every candidate: [B, C] (-inf where an example has
        fewer than C candidates)."""
        pairs = [(ex, c) for ex in examples for c in range(len(ex.candidates))]
        logp, segment = self.token_logprobs(pairs)
        sums = torch.zeros(len(pairs), device=logp.device).index_add_(0, segment, logp)
        counts = torch.zeros(len(pairs), device=logp.device).index_add_(
            0, segment, torch.ones_like(logp))
        means = sums / counts
        width = max(len(ex.candidates) for ex in examples)
        out = torch.full((len(examples), width), float("-inf"), device=logp.device)
        k = 0
        for b, ex in enumerate(examples):
            out[b, :len(ex.candidates)] = means[k:k + len(ex.candidates)]
            k += len(ex.candidates)
        return out

    @staticmethod
    def _labels(examples: list[Example], device) -> torch.Tensor:
        for ex in examples:
            if not 0 <= ex.label < len(ex.candidates):
                raise ZotuneError(f"example label {ex.label} is not a candidate index "
                                  f"(0..{len(ex.candidates) - 1}); unlabeled data cannot be a loss")
        return torch.tensor([ex.label for ex in examples], device=device)

    def classification_loss(self, examples: list[Example]) -> torch.Tensor:
        """MeZO's train_as_classification: mean_b CE(softmax_c s_{b,c}, label_b)."""
        scores = self.scores(examples)
        return F.cross_entropy(scores, self._labels(examples, scores.device))

    def answer_loss(self, examples: list[Example]) -> torch.Tensor:
        """MeZO's SFT objective: token-level CE over the gold candidate's tokens only, averaged over
        all gold tokens of the batch (only gold sequences are run)."""
        self._labels(examples, "cpu")
        logp, _ = self.token_logprobs([(ex, ex.label) for ex in examples])
        return -logp.mean()

    @torch.no_grad()
    def accuracy_loss(self, examples: list[Example]) -> torch.Tensor:
        """Minus batch accuracy of argmax_c s_{b,c}: a non-differentiable objective for ZO."""
        scores = self.scores(examples)
        labels = self._labels(examples, scores.device)
        return -(scores.argmax(-1) == labels).float().mean()

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
        device = next(self.model.parameters()).device
        limit = max(1, self.max_length - max_new_tokens)  # room for the answer, as MeZO reserves
        texts: list[str] = []
        for start in range(0, len(examples), batch_size):
            rows = [self._truncate(self._tokens(ex.prompt), limit)
                    for ex in examples[start:start + batch_size]]
            length = max(map(len, rows))
            ids = torch.tensor([[self.pad_id] * (length - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows],
                                device=device)
            self.sequences_run += len(rows)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=False, num_beams=1, stop_strings=["\n"], tokenizer=self.tokenizer,
                pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_token_id)
            for seq in out[:, length:]:
                text = self.tokenizer.decode(seq, skip_special_tokens=True)
                texts.append(text.split("\n")[0].strip())
        return texts
