"""Candidate scoring and losses (zotune.objectives): fast paths against MeZO's naive computation and
against losses built by hand from full, unpadded logits."""
import pytest
import torch
import torch.nn.functional as F

from zotune.errors import ZotuneError
from zotune.models import select_trainable, tiny_model
from zotune.objectives import CandidateScorer, length_buckets
from zotune.tasks.base import Example

FAMILIES = ["llama", "opt", "gpt2"]
TOL = dict(rtol=1e-5, atol=1e-5)

SINGLE = [Example("Review: the movie was fine. It was", (" great", " terrible"), 0),
          Example("Bad", (" great", " terrible"), 1),
          Example("A much longer review that goes on and on about the plot. It was",
                  (" terrible", " great"), 1)]
MULTI = [Example("Question: is the sky blue? Answer:", (" Yes", " No", " maybe, who knows"), 2),
         Example("x", (" a b c", " d"), 0),
         Example("Premise and a long hypothesis here\n", (" because it rained", " so"), 1)]
MIXED = SINGLE[:2] + MULTI[:2]


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    return tiny_model(request.param, seed=7)


def _hand_logprobs(model, tok, example, cand, max_length=2048):
    """Candidate token log-probs from one unpadded sequence with full logits (MeZO's definition)."""
    prompt = tok(example.prompt)["input_ids"]
    full = tok(example.prompt + example.candidates[cand])["input_ids"]
    n = len(full) - len(prompt)
    if len(full) > max_length:
        full = full[:1] + full[len(full) - max_length + 1:]
    with torch.no_grad():
        logp = model(torch.tensor([full])).logits[0].log_softmax(-1)
    targets = torch.tensor(full[-n:])
    return logp[len(full) - n - 1:len(full) - 1].gather(-1, targets[:, None])[:, 0]


def _hand_scores(model, tok, examples, **kw):
    return torch.tensor([[_hand_logprobs(model, tok, ex, c, **kw).mean().item()
                          for c in range(len(ex.candidates))] for ex in examples])


@pytest.mark.parametrize("batch", [SINGLE, MULTI, MIXED], ids=["single", "multi", "mixed"])
def test_fast_scores_equal_naive_and_hand(lm, batch):
    model, tok = lm
    fast = CandidateScorer(model, tok).scores(batch)
    naive = CandidateScorer(model, tok, fast=False).scores(batch)
    finite = torch.isfinite(naive)
    assert torch.equal(finite, torch.isfinite(fast))
    torch.testing.assert_close(fast[finite], naive[finite], **TOL)
    hand = _hand_scores(model, tok, [ex for ex in batch if len(ex.candidates) == 2])
    rows = [i for i, ex in enumerate(batch) if len(ex.candidates) == 2]
    torch.testing.assert_close(fast[rows, :2], hand, **TOL)


def _cost(groups, lengths, overhead):
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def test_length_buckets_are_the_cheapest_split():
    """Against every split of the sorted rows into runs (2^(R-1) of them), on random lengths."""
    import itertools
    g = torch.Generator().manual_seed(0)
    for trial in range(30):
        lengths = torch.randint(1, 60, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        overhead = [0, 5, 32, 1e9][trial % 4]
        groups = length_buckets(lengths, overhead)
        assert sorted(i for grp in groups for i in grp) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        best = min(_cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (len(order),))], lengths, overhead)
                   for k in range(len(order)) for cuts in itertools.combinations(range(1, len(order)), k))
        assert _cost(groups, lengths, overhead) == best
    assert len(length_buckets([5, 50, 6, 49], 1e9)) == 1
    assert length_buckets([5, 50, 6, 49], 0) == [[0], [2], [3], [1]]


@pytest.mark.parametrize("batch", [SINGLE, MULTI, MIXED], ids=["single", "multi", "mixed"])
def test_length_buckets_change_no_score_or_gradient(lm, batch):
    """Split (overhead 0: every length its own call) against one padded call: the same scores in
    the same order, and the same gradients, so DiZO's first-order search may split too."""
    model, tok = lm
    one, split = CandidateScorer(model, tok, bucket_overhead=None), CandidateScorer(model, tok, bucket_overhead=0)
    runs = split.sequences_run
    torch.testing.assert_close(split.scores(batch), one.scores(batch), **TOL)
    assert split.sequences_run - runs == one.sequences_run  # the same rows, in several calls
    grads = []
    for scorer in (one, split):
        model.zero_grad()
        scorer.classification_loss(batch).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        model.zero_grad()
    assert grads[0]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="bucket_overhead"):
        CandidateScorer(model, tok, bucket_overhead=-1)


def test_single_token_path_runs_one_sequence_per_example(lm):
    model, tok = lm
    shapes = []
    hook = model.register_forward_hook(lambda m, a, kw, out: shapes.append(
        (tuple(kw["input_ids"].shape), out.logits.shape[1])), with_kwargs=True)
    try:
        fast = CandidateScorer(model, tok, bucket_overhead=None)  # one call (splits: below)
        fast.scores(SINGLE)
        assert fast.sequences_run == len(SINGLE)
        # the rows are the prompts, and logits are computed at the last position only
        longest = max(len(tok(ex.prompt)["input_ids"]) for ex in SINGLE)
        assert shapes == [((len(SINGLE), longest), 1)]
        naive = CandidateScorer(model, tok, fast=False)
        naive.scores(SINGLE)
        assert naive.sequences_run == 2 * len(SINGLE) and shapes[1][1] == longest + 1
        shapes.clear()
        fast.scores(MULTI)  # multi-token: one row per candidate, logits only for the longest one
        longest_cand = max(len(tok(ex.prompt + c)["input_ids"]) - len(tok(ex.prompt)["input_ids"])
                           for ex in MULTI for c in ex.candidates)
        # 7 candidates, but " Yes" and " No" are single tokens and share their prompt's row
        assert shapes[0][0][0] == 6 and shapes[0][1] == longest_cand
        shapes.clear()
        CandidateScorer(model, tok, bucket_overhead=0).scores(SINGLE)  # the 3 prompts differ in length
        assert sorted(s[0] for s in shapes) == sorted((1, len(tok(ex.prompt)["input_ids"])) for ex in SINGLE)
        shapes.clear()
        CandidateScorer(model, tok, bucket_overhead=1e9).scores(SINGLE)
        assert shapes == [((len(SINGLE), longest), 1)]
    finally:
        hook.remove()


def test_losses_equal_hand_built(lm):
    model, tok = lm
    scorer = CandidateScorer(model, tok)
    batch = SINGLE + MULTI
    hand = [_hand_logprobs(model, tok, ex, c) for ex in batch for c in range(len(ex.candidates))]
    width = max(len(ex.candidates) for ex in batch)
    scores = torch.full((len(batch), width), float("-inf"))
    k = 0
    for b, ex in enumerate(batch):
        for c in range(len(ex.candidates)):
            scores[b, c] = hand[k].mean()
            k += 1
    labels = torch.tensor([ex.label for ex in batch])
    torch.testing.assert_close(scorer.classification_loss(batch),
                               F.cross_entropy(scores, labels), **TOL)
    gold = torch.cat([_hand_logprobs(model, tok, ex, ex.label) for ex in batch])
    for fast in (True, False):
        s = CandidateScorer(model, tok, fast=fast)
        torch.testing.assert_close(s.answer_loss(batch), -gold.mean(), **TOL)
        assert s.sequences_run == len(batch)  # only the gold sequences are run
    want = -(scores.argmax(-1) == labels).float().mean()
    assert scorer.accuracy_loss(batch).item() == pytest.approx(want.item())


def test_accuracy_loss_values():
    model, tok = tiny_model("gpt2", seed=3)
    scorer = CandidateScorer(model, tok)
    batch = SINGLE + MULTI
    pred = scorer.predict(batch, batch_size=2)
    assert pred == scorer.scores(batch).argmax(-1).tolist()
    right = [Example(ex.prompt, ex.candidates, p) for ex, p in zip(batch, pred)]
    wrong = [Example(ex.prompt, ex.candidates, (p + 1) % len(ex.candidates))
             for ex, p in zip(batch, pred)]
    assert scorer.accuracy_loss(right).item() == -1.0
    assert scorer.accuracy_loss(wrong).item() == 0.0
    half = right[:3] + wrong[3:]
    assert scorer.accuracy_loss(half).item() == -0.5


@pytest.mark.parametrize("fast", [True, False])
def test_left_truncation_keeps_bos_and_candidate(lm, fast):
    model, tok = lm
    ex = Example("word " * 40 + "It was", (" great", " a b c"), 1)
    scorer = CandidateScorer(model, tok, max_length=12, fast=fast)
    ids, n = scorer.encode(ex)[1]
    assert len(ids) == 12 and ids[0] == tok.bos_token_id and n == 5  # " b" is a merge
    assert tok.decode(ids[-n:]) == " a b c"
    torch.testing.assert_close(scorer.scores([ex]), _hand_scores(model, tok, [ex], max_length=12),
                               **TOL)


def test_padding_multiple_and_peft_models_agree():
    for mode in ("lora", "prefix"):
        model, tok = tiny_model("llama", seed=2)
        model = select_trainable(model, mode)
        a = CandidateScorer(model, tok, pad_to_multiple_of=8).scores(MIXED)
        b = CandidateScorer(model, tok, fast=False).scores(MIXED)
        torch.testing.assert_close(a[torch.isfinite(a)], b[torch.isfinite(b)], **TOL)


def test_generate_is_greedy_and_stops_at_newline():
    model, tok = tiny_model("opt", seed=1)
    scorer = CandidateScorer(model, tok)
    batch = [Example("Context: a b. Question: what? Answer:", ("",)), Example("Hi", ("",))]
    got = scorer.generate(batch, max_new_tokens=8)
    for ex, text in zip(batch, got):
        ids = tok(ex.prompt)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(8):
                nxt = model(torch.tensor([ids + new])).logits[0, -1].argmax().item()
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        assert text == tok.decode(new, skip_special_tokens=True).split("\n")[0].strip()


def test_bad_inputs():
    model, tok = tiny_model("gpt2")
    scorer = CandidateScorer(model, tok)
    with pytest.raises(ZotuneError, match="not a candidate index"):
        scorer.classification_loss([Example("p", (" a", " b"))])
    with pytest.raises(ZotuneError, match="adds no tokens"):
        scorer.scores([Example("p", (" a", ""), 0)])
    with pytest.raises(ZotuneError, match="too long"):
        CandidateScorer(model, tok, max_length=4).scores([Example("p", (" a b c d e",), 0)])
