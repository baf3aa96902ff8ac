"""The ranking session's state machine and its saved state (no server, no browser).

Sessions here rank a plain tensor (the rendering is the candidate's values as text), except the
last test, which builds ``zotune rank serve``'s own session on a tiny random Llama with LoRA.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import zotune
from zotune.errors import ZotuneError
from zotune.ranking import session as session_module
from zotune.ranking.server import ServeSettings, text_session
from zotune.ranking.session import RankingSession, StaleRound, SubmissionError, display_order
from zotune.ranking.text import Prompts

M, K = 5, 3


def tensor_session(directory, seed=0, **settings):
    x = torch.zeros(8, dtype=torch.float64)
    opt = zotune.RankSGD([x], lr=0.1, mu=0.1, m=M, k=K, seed=seed)

    def render(query, i, r):
        with query.at(i):
            return [" ".join(f"{v:+.4f}" for v in x.tolist())]

    return x, RankingSession(opt, {"x": x}, k=K, settings={"m": M, "k": K, **settings},
                             render=render, render_current=lambda r: [str(x.sum().item())],
                             prompts=lambda r: [f"prompt {r}"], directory=directory, seed=seed)


def test_positions_are_mapped_to_candidate_ids(tmp_path):
    x, s = tensor_session(tmp_path)
    s.start()
    order = s.shown["order"]
    assert sorted(order) == list(range(M)) and order == display_order(0, 0, M)
    assert order != list(range(M))  # this seed's permutation is not the identity
    view = s.view()
    assert [c["texts"] for c in view["candidates"]] == [s.shown["texts"][i] for i in order]
    assert "order" not in json.dumps(view) and "ranking" not in json.dumps(view)  # ids never shown

    # The same answer given to a second optimizer directly as candidate ids moves it identically.
    y = torch.zeros(8, dtype=torch.float64)
    ref = zotune.RankSGD([y], lr=0.1, mu=0.1, m=M, k=K, seed=0)
    unmapped = torch.zeros(8, dtype=torch.float64)
    wrong = zotune.RankSGD([unmapped], lr=0.1, mu=0.1, m=M, k=K, seed=0)
    ref.ask(), wrong.ask()
    s.submit({"round": 0, "order": [4, 0, 2]})
    ref.tell(ranking=[order[4], order[0], order[2]])
    wrong.tell(ranking=[4, 0, 2])  # the authors' demo bug: positions taken as ids
    # Equal up to the rounding of the session's visits to the candidates (x + mu xi - mu xi).
    torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    assert (x - unmapped).abs().max() > 1e-3
    assert s.history[0]["ranking"] == [order[4], order[0], order[2]]
    assert s.history[0]["labels"] == ["E", "A", "C"]
    assert s.history[0]["moved"] == pytest.approx(float(y.norm()))


@pytest.mark.parametrize("payload, error, message", [
    ({"round": 0, "order": [0, 1]}, SubmissionError, "fewer than the 3"),
    ({"round": 0, "order": [0, 1, 2, 3]}, SubmissionError, "more than the 3"),
    ({"round": 0, "order": [0, 1, 1]}, SubmissionError, "candidate B is ranked twice"),
    ({"round": 0, "order": [0, 1, 5]}, SubmissionError, "unknown candidate position 5; valid: 0..4 (A..E)"),
    ({"round": 0, "order": [0, 1, -1]}, SubmissionError, "unknown candidate position -1"),
    ({"round": 0, "order": [0, 1, True]}, SubmissionError, "order must be a list of display positions"),
    ({"round": 0, "order": "A,B,C"}, SubmissionError, "order must be a list"),
    ({"round": 1, "order": [0, 1, 2]}, StaleRound, "round 1 is not the current round 0"),
    ({"round": "0", "order": [0, 1, 2]}, SubmissionError, "round must be an integer"),
    ({"order": [0, 1, 2]}, SubmissionError, "a submission is a JSON object"),
    ([0, 1, 2], SubmissionError, "a submission is a JSON object"),
])
def test_bad_submissions_change_nothing(tmp_path, payload, error, message):
    x, s = tensor_session(tmp_path)
    s.start()
    saved = (tmp_path / "state.pt").read_bytes()
    before, view = x.clone(), s.view()
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        s.submit(payload)
    assert torch.equal(x, before) and s.view() == view and s.round == 0
    assert (tmp_path / "state.pt").read_bytes() == saved
    assert error.status == (409 if error is StaleRound else 400)


def test_restart_resumes_the_same_round_and_continues_bitwise(tmp_path):
    answers = [[2, 0, 4], [1, 3, 0], [4, 3, 2], [0, 1, 2]]
    x, whole = tensor_session(tmp_path / "whole")
    whole.start()
    for r, order in enumerate(answers):
        whole.submit({"round": r, "order": order})

    x2, first = tensor_session(tmp_path / "split")
    first.start()
    for r, order in enumerate(answers[:2]):
        first.submit({"round": r, "order": order})
    shown = first.view()
    del first  # a new process: nothing but the directory survives
    x3, second = tensor_session(tmp_path / "split")
    second.start()
    assert second.view() == shown and second.round == 2
    for r, order in enumerate(answers[2:], start=2):
        second.submit({"round": r, "order": order})
    assert torch.equal(x3, x)

    def timeless(view):  # the history's wall-clock stamps differ between the two runs
        return {**view, "history": [{k: v for k, v in h.items() if k != "time"} for h in view["history"]]}

    assert timeless(second.view()) == timeless(whole.view())
    assert [h["ranking"] for h in second.history] == [h["ranking"] for h in whole.history]


def test_a_failed_save_leaves_the_last_round_on_disk_and_in_memory(tmp_path, monkeypatch):
    x, s = tensor_session(tmp_path)
    s.start()
    s.submit({"round": 0, "order": [0, 1, 2]})
    saved, before, view = (tmp_path / "state.pt").read_bytes(), x.clone(), s.view()

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(session_module.os, "replace", broken)
    with pytest.raises(OSError, match="No space left"):
        s.submit({"round": 1, "order": [3, 1, 2]})
    monkeypatch.undo()
    assert (tmp_path / "state.pt").read_bytes() == saved
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert torch.equal(x, before) and s.view() == view and s.round == 1
    s.submit({"round": 1, "order": [3, 1, 2]})  # and the session goes on from there
    assert s.round == 2


def test_resume_with_other_settings_is_refused(tmp_path):
    _, s = tensor_session(tmp_path, lr_note="a")
    s.start()
    _, other = tensor_session(tmp_path, lr_note="b")
    with pytest.raises(ZotuneError, match="lr_note: saved 'a', now 'b'"):
        other.start()


def test_prompts_file_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a"}\n\n{"prompt": "b", "id": 3}\n{"prompt": "c"}\n')
    prompts = Prompts.from_jsonl(good)
    assert prompts.prompts == ("a", "b", "c")
    assert prompts.for_round(0, 2) == ["a", "b"] and prompts.for_round(1, 2) == ["c", "a"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ZotuneError, match=r"bad.jsonl:2: each line must be an object"):
        Prompts.from_jsonl(bad)
    bad.write_text('{"prompt": "a"\n')
    with pytest.raises(ZotuneError, match=r"bad.jsonl:1: not valid JSON"):
        Prompts.from_jsonl(bad)
    with pytest.raises(ZotuneError, match="cannot read prompts file"):
        Prompts.from_jsonl(tmp_path / "missing.jsonl")


def test_text_session_on_a_tiny_lm_resumes_its_texts_exactly(tmp_path):
    task = tmp_path / "prompts.jsonl"
    task.write_text('{"prompt": "The movie was"}\n{"prompt": "It was the"}\n{"prompt": "Yes"}\n')
    settings = dict(task=str(task), model="tiny-llama", m=4, k=2, mu=0.5, max_new_tokens=5,
                    prompts_per_round=2, seed=1)
    s = text_session(ServeSettings(**settings), tmp_path / "run").start()
    texts = [c["texts"] for c in s.view()["candidates"]]
    assert len(texts) == 4 and all(len(t) == 2 for t in texts)
    assert len({tuple(t) for t in texts}) > 1  # mu = 0.5 makes the candidates differ
    s.submit({"round": 0, "order": [3, 1]})
    s.submit({"round": 1, "order": [0, 2]})
    resumed = text_session(ServeSettings(**settings), tmp_path / "run").start()
    assert resumed.view() == s.view()
    # Rendering the shown round again at the resumed parameters gives the saved texts.
    query = resumed.opt.ask()
    again = [resumed.render(query, i, resumed.round) for i in range(len(query))]
    assert again == resumed.shown["texts"]
    assert resumed.render_current(resumed.round) == resumed.shown["current"]
    with pytest.raises(ZotuneError, match="--k must be in 1..m=4"):
        text_session(ServeSettings(**{**settings, "k": 5}), tmp_path / "other")
