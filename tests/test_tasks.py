"""Tasks: raw data, MeZO's split protocol, literal templates, custom tasks, errors, metrics."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from zotune.errors import ZotuneError
from zotune.tasks import (DataNotFoundError, Example, TaskDataError, UnknownTaskError, get_task, list_tasks,
                          load_custom_task, mezo_splits, resolve_data_dir, sample_subset)
from zotune.tasks import data as data_mod
from zotune.tasks.metrics import accuracy, exact_match, f1_score, max_f1, normalize_answer

ALL = ["sst2", "rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "squad"]


def first_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return json.loads(f.readline())


@pytest.fixture(scope="module")
def loaded(data_dir):
    return {name: get_task(name).load(data_dir) for name in ALL}


# ---------------------------------------------------------------- registry and task attributes

def test_registry_names_and_attributes():
    assert list_tasks() == ALL
    assert get_task("RTE").name == "rte" and get_task(" SsT2 ").name == "sst2"
    kinds = {n: (get_task(n).kind, get_task(n).train_objective, get_task(n).metric, get_task(n).num_dev_default)
             for n in ALL}
    assert kinds["copa"] == ("multiple_choice", "answer_lm", "accuracy", 100)
    assert kinds["squad"] == ("generation", "answer_lm", "f1", 500)
    for n in ("cb", "wsc"):
        assert kinds[n] == ("classification", "classification", "accuracy", 100)
    for n in ("sst2", "rte", "boolq", "wic", "multirc"):
        assert kinds[n] == ("classification", "classification", "accuracy", 500)


def test_unknown_task_lists_valid_names():
    with pytest.raises(UnknownTaskError) as e:
        get_task("mnli")
    assert isinstance(e.value, ZotuneError)
    for n in ALL:
        assert n in str(e.value)


# ---------------------------------------------------------------- raw data against SOURCES.md

@pytest.mark.parametrize("name,n_train,n_valid", [
    ("sst2", 67349, 872), ("rte", 2490, 277), ("cb", 250, 56), ("copa", 400, 100), ("wic", 5428, 638),
    ("wsc", 554, 104), ("multirc", 27243, 4848), ("boolq", None, 3270), ("squad", None, 10570)])
def test_raw_row_counts(data_dir, name, n_train, n_valid):
    train, valid = get_task(name).read(data_dir)
    assert (None if train is None else len(train)) == n_train
    assert len(valid) == n_valid


def test_raw_label_counts(data_dir):
    train, valid = get_task("cb").read(data_dir)
    assert sorted(np.unique([r["label"] for r in train], return_counts=True)[1]) == [16, 115, 119]
    train, valid = get_task("multirc").read(data_dir)
    assert sum(r["label"] for r in valid) == 2075


# ---------------------------------------------------------------- MeZO's protocol

@pytest.mark.parametrize("name,sizes", [
    ("sst2", (1000, 500, 872)), ("rte", (1000, 500, 277)), ("cb", (150, 100, 56)), ("copa", (300, 100, 100)),
    ("wsc", (454, 100, 104)), ("wic", (1000, 500, 638)), ("multirc", (1000, 500, 1000)),
    ("boolq", (1000, 500, 1000)), ("squad", (1000, 500, 1000))])
def test_effective_sizes(loaded, name, sizes):
    d = loaded[name]
    assert (len(d.train), len(d.dev), len(d.test)) == sizes


def test_wsc_dev_of_500_reproduces_mezos_54_training_examples(data_dir):
    # MeZO's script keeps dev = 500 for WSC; zotune's default is 100 (as for CB and COPA).
    d = get_task("wsc").load(data_dir, num_dev=500)
    assert (len(d.train), len(d.dev), len(d.test)) == (54, 500, 104)


def test_notes_explain_small_train_and_missing_train(loaded):
    assert any("454" in n and "train" in n for n in loaded["wsc"].notes)
    assert any("150" in n for n in loaded["cb"].notes)
    assert not any("train has" in n for n in loaded["rte"].notes)
    for name in ("boolq", "squad"):
        assert any("no train split" in n and "disjoint" in n for n in loaded[name].notes)


def test_labels_sane(loaded):
    for name in ALL:
        d = loaded[name]
        for split in (d.train, d.dev, d.test):
            labels = [e.label for e in split]
            assert all(0 <= y < len(e.candidates) for y, e in zip(labels, split)), name
            if name != "squad":
                assert len(set(labels)) >= 2, name  # both classes present
                assert max(np.bincount(labels)) / len(labels) < 0.8, name
    assert set(e.label for e in loaded["cb"].train) == {0, 1, 2}


def test_sample_subset_matches_mezo_global_seed():
    state = np.random.get_state()
    np.random.seed(7)
    expected = np.random.permutation(50)[:10].tolist()
    np.random.set_state(state)
    assert sample_subset(50, 7, 10) == expected
    assert sorted(sample_subset(5, 0, 100)) == [0, 1, 2, 3, 4]  # whole split, shuffled
    assert sample_subset(5, 0, 100) != [0, 1, 2, 3, 4]


def test_dev_is_last_of_one_draw():
    items = list(range(100))
    tr, dev, te, _ = mezo_splits("t", items, list(range(30)), num_train=10, num_dev=5, num_test=20, seed=3)
    draw = [items[i] for i in sample_subset(100, 3, 15)]
    assert tr == draw[:10] and dev == draw[10:]
    assert te == sample_subset(30, 3, 20)
    tr0, dev0, _, _ = mezo_splits("t", items, items, num_train=10, num_dev=0, num_test=5, seed=3)
    assert len(tr0) == 10 and dev0 == []
    with pytest.raises(ZotuneError, match="num_dev"):
        mezo_splits("t", items[:20], items, num_train=10, num_dev=20, num_test=5, seed=0)


def test_protocol_deterministic_and_seed_dependent(data_dir, loaded):
    again = get_task("rte").load(data_dir)
    assert again.train == loaded["rte"].train and again.dev == loaded["rte"].dev
    other = get_task("rte").load(data_dir, seed=1)
    assert other.train != loaded["rte"].train
    assert set(e.prompt for e in other.test) == set(e.prompt for e in loaded["rte"].test)  # whole split
    small = get_task("sst2").load(data_dir, num_train=16, num_dev=8, num_test=32, seed=5)
    assert (len(small.train), len(small.dev), len(small.test)) == (16, 8, 32)


def test_no_train_split_is_disjoint(loaded):
    tr, dev, te, notes = mezo_splits("t", None, list(range(300)), num_train=100, num_dev=50, num_test=100, seed=0)
    assert not (set(tr) & set(te)) and not (set(dev) & set(te)) and not (set(tr) & set(dev))
    assert te == sample_subset(300, 0, 100)  # test is exactly MeZO's test draw
    for name in ("boolq", "squad"):
        d = loaded[name]
        key = (lambda e: (e.prompt, e.answers)) if name == "squad" else (lambda e: e.prompt)
        test = {key(e) for e in d.test}
        assert not test & {key(e) for e in d.train}
        assert not test & {key(e) for e in d.dev}


# ---------------------------------------------------------------- literal templates (written by hand)

def test_sst2_literal(data_dir):
    with open(data_dir / "sst2/train.tsv", encoding="utf-8") as f:
        f.readline()
        sentence, label = f.readline().rstrip("\n").split("\t")
    e = get_task("sst2").to_example({"sentence": sentence, "label": label})
    assert e == Example("hide new secretions from the parental units It was", (" terrible", " great"), 0)


def test_rte_literal(data_dir):
    e = get_task("rte").to_example(first_jsonl(data_dir / "rte/train.jsonl"))
    assert e.prompt == ('No Weapons of Mass Destruction Found in Iraq Yet.\n'
                        'Does this mean that "Weapons of Mass Destruction Found in Iraq." is true? Yes or No?\n')
    assert e.candidates == ("Yes", "No") and e.label == 1  # not_entailment -> No


def test_cb_literal(data_dir):
    e = get_task("cb").to_example(first_jsonl(data_dir / "cb/train.jsonl"))
    assert e.prompt == ('Suppose It was a complex language. Not written down but handed down. One might say it '
                        'was peeled down. Can we infer that "the language was peeled down"? Yes, No, or Maybe?\n')
    assert e.candidates == ("Yes", "No", "Maybe") and e.label == 0


def test_copa_literal(data_dir):
    task = get_task("copa")
    e = task.to_example(first_jsonl(data_dir / "copa/train.jsonl"))
    assert e == Example("My body cast a shadow over the grass because",
                        (" the sun was rising.", " the grass was cut."), 0)
    rows = [json.loads(line) for line in open(data_dir / "copa/train.jsonl", encoding="utf-8")]
    e = task.to_example(next(r for r in rows if r["idx"] == 6))  # choices start with "I": kept upper-case
    assert e == Example("The stain came out of the shirt because",
                        (" I patched the shirt.", " I bleached the shirt."), 1)
    e = task.to_example({"premise": "It rained.", "choice1": "We stayed in.", "choice2": "We left.",
                         "question": "effect", "label": 0})
    assert e.prompt == "It rained so" and e.candidates == (" we stayed in.", " we left.")


def test_wic_literal(data_dir):
    e = get_task("wic").to_example(first_jsonl(data_dir / "wic/train.jsonl"))
    assert e.prompt == ('Does the word "place" have the same meaning in these two sentences? Yes, No?\n'
                        'Do you want to come over to my place later?\n'
                        'A political system with no place for the less prominent groups.\n')
    assert e.candidates == ("No", "Yes") and e.label == 0


def test_wsc_literal(data_dir):
    task = get_task("wsc")
    e = task.to_example(first_jsonl(data_dir / "wsc/train.jsonl"))
    assert e.prompt == ('Mark told Pete many lies about himself, which Pete included in his book. He should have '
                        'been more skeptical.\nIn the previous sentence, does the pronoun "he" refer to Mark? '
                        'Yes or No?\n')
    assert e.candidates == ("No", "Yes") and e.label == 0
    rows = [json.loads(line) for line in open(data_dir / "wsc/train.jsonl", encoding="utf-8")]
    row = next(r for r in rows if r["target"]["span1_text"] == "the lawyer")  # wsc.fixed repairs the case
    assert task.to_example(row).prompt.endswith('does the pronoun "he" refer to The lawyer? Yes or No?\n')


def test_boolq_literal(data_dir):
    row = first_jsonl(data_dir / "boolq/val.jsonl")
    e = get_task("boolq").to_example(row)
    assert e.prompt.startswith("Ethanol fuel -- All biomass goes through at least some of these steps")
    assert e.prompt.endswith("producing ethanol from corn uses much less petroleum than producing gasoline. "
                             "Does ethanol take more energy make that produces?\n")
    assert e.prompt == row["passage"] + " Does ethanol take more energy make that produces?\n"
    assert e.candidates == ("Yes", "No") and e.label == 1  # false -> No


def test_multirc_literal(data_dir):
    e = get_task("multirc").to_example(get_task("multirc").flatten([first_jsonl(data_dir / "multirc/train.jsonl")])[0])
    assert e.prompt.startswith("While this process moved along, diplomacy continued its rounds.")
    assert e.prompt.endswith('The U.S. effort continued. \nQuestion: What did the high-level effort to persuade '
                             'Pakistan include?\nI found this answer "Children, Gerd, or Dorian Popa". '
                             'Is that correct? Yes or No?\n')
    assert e.candidates == ("No", "Yes") and e.label == 0


def test_squad_literal(data_dir):
    train, valid = get_task("squad").read(data_dir)
    e = get_task("squad").to_example(valid[0])
    assert e.prompt.startswith("Title: Super_Bowl_50\nContext: Super Bowl 50 was an American football game to "
                               "determine the champion of the National Football League (NFL) for the 2015 season.")
    assert e.prompt.endswith("\nQuestion: Which NFL team represented the AFC at Super Bowl 50?\nAnswer:")
    assert e.candidates == (" Denver Broncos\n",) and e.label == 0
    assert e.answers == ("Denver Broncos", "Denver Broncos", "Denver Broncos")


def test_prompt_plus_candidate_is_whole_text(loaded):
    for name in ALL:
        for e in loaded[name].test[:50]:
            assert e.prompt == e.prompt.strip(' ') and all(c.strip() for c in e.candidates), name


# ---------------------------------------------------------------- data directory errors

def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("ZOTUNE_DATA", raising=False)
    assert resolve_data_dir(None) is None
    monkeypatch.setenv("ZOTUNE_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir("/x/y") == __import__("pathlib").Path("/x/y")


def test_missing_data_names_the_paths(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        get_task("rte").load(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "rte" / "train.jsonl") in msg and str(tmp_path / "rte" / "val.jsonl") in msg
    assert "--data-dir" in msg and "ZOTUNE_DATA" in msg and "\n" not in msg
    assert isinstance(e.value, ZotuneError)


def test_no_data_dir_without_datasets(monkeypatch):
    monkeypatch.delenv("ZOTUNE_DATA", raising=False)
    monkeypatch.setattr(data_mod, "hub_available", lambda: False)
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        get_task("sst2").load(None)


def test_hub_fallback_converts_records(monkeypatch):
    """With no data dir and `datasets` importable, records come from the Hub in the local format."""
    boolq = {"train": [{"question": f"is it {i}", "passage": f"P{i}", "answer": i % 2 == 0} for i in range(40)],
             "validation": [{"question": "is it so?", "passage": "Q", "answer": False}] * 10}
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda path, config=None: {"google/boolq": boolq}[path]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setattr(data_mod, "hub_available", lambda: True)
    monkeypatch.delenv("ZOTUNE_DATA", raising=False)
    d = get_task("boolq").load(None, num_train=20, num_dev=10, num_test=5)
    assert (len(d.train), len(d.dev), len(d.test)) == (20, 10, 5)
    assert d.test[0] == Example("Q Is it so?\n", ("Yes", "No"), 1)
    assert not any("no train split" in n for n in d.notes)  # the Hub has BoolQ's train split


# ---------------------------------------------------------------- custom tasks

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_custom_task_from_dict_and_yaml(tmp_path):
    rows = [{"text": f"movie {i}", "label": i % 2} for i in range(60)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    spec = {"name": "mysent", "train": str(tmp_path / "train.jsonl"), "template": "Review: {text}\nSentiment:",
            "verbalizer": {0: " bad", 1: " good"}}
    d = load_custom_task(spec).load(num_train=20, num_dev=10, num_test=15)
    assert (len(d.train), len(d.dev), len(d.test)) == (20, 10, 15)
    prompts = [e.prompt for e in d.test]
    assert not set(prompts) & {e.prompt for e in d.train + d.dev}  # disjoint when split from train
    assert any("no test file" in n for n in d.notes)
    e = next(e for e in d.train if e.prompt == "Review: movie 3\nSentiment:")
    assert e.candidates == (" bad", " good") and e.label == 1

    write_jsonl(tmp_path / "test.jsonl", [{"text": "unlabeled"}])
    (tmp_path / "spec.yaml").write_text("name: mysent\ntrain: train.jsonl\ntest: test.jsonl\n"
                                        "template: \"{text} It was\"\nverbalizer: [\" terrible\", \" great\"]\n"
                                        "num_dev: 10\n", encoding="utf-8")
    task = load_custom_task(tmp_path / "spec.yaml")
    d = task.load(num_train=20)
    assert (len(d.train), len(d.dev), len(d.test)) == (20, 10, 1)
    assert d.test[0] == Example("unlabeled It was", (" terrible", " great"), -1)
    assert task.kind == "classification" and task.metric == "accuracy"

    write_jsonl(tmp_path / "dev.jsonl", [{"text": f"dev {i}", "label": 1} for i in range(5)])
    d = load_custom_task({**spec, "dev": str(tmp_path / "dev.jsonl")}).load(num_train=10, num_test=20)
    assert (len(d.train), len(d.dev), len(d.test)) == (10, 5, 20)
    assert {e.prompt for e in d.dev} == {f"Review: dev {i}\nSentiment:" for i in range(5)}
    assert not {e.prompt for e in d.train} & {e.prompt for e in d.test}


def test_custom_task_errors(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"review": "b", "label": 1}])
    spec = {"name": "c", "train": str(tmp_path / "train.jsonl"), "template": "{text}:", "verbalizer": [" x", " y"]}
    with pytest.raises(TaskDataError) as e:
        load_custom_task(spec).load()
    msg = str(e.value)
    assert "'text'" in msg and f"{tmp_path / 'train.jsonl'}:2" in msg and "label, review" in msg

    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "pos"}])
    with pytest.raises(TaskDataError) as e:
        load_custom_task(spec).load()
    assert "'pos'" in str(e.value) and "valid labels: 0, 1" in str(e.value)

    with pytest.raises(TaskDataError, match="allowed keys"):
        load_custom_task({**spec, "templat": "x"})
    with pytest.raises(TaskDataError, match="kind"):
        load_custom_task({**spec, "kind": "generation"})
    with pytest.raises(DataNotFoundError, match="nope.jsonl"):
        load_custom_task({**spec, "train": str(tmp_path / "nope.jsonl")}).load()
    with pytest.raises(DataNotFoundError):
        load_custom_task(tmp_path / "missing.yaml")


# ---------------------------------------------------------------- metrics

def test_squad_metrics_hand_computed():
    assert normalize_answer("  The Denver  Broncos! ") == "denver broncos"
    assert normalize_answer("An apple, a pear") == "apple pear"
    assert f1_score("Denver Broncos", "the Denver Broncos.") == 1.0
    # pred {denver, broncos, team} vs gold {denver, broncos}: p = 2/3, r = 1 -> f1 = 0.8
    assert f1_score("Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)
    # pred {carolina} vs gold {carolina, panthers}: p = 1, r = 1/2 -> 2/3
    assert f1_score("Carolina", "Carolina Panthers") == pytest.approx(2 / 3)
    assert f1_score("Panthers", "Broncos") == 0.0 and f1_score("", "") == 0.0
    assert max_f1("Carolina", ["Denver", "Carolina Panthers", "Carolina"]) == 1.0
    assert max_f1("x", []) == 0.0
    assert exact_match("the Broncos", ["Denver", "Broncos"]) == 1.0 and exact_match("Denver B", "Denver") == 0.0
    assert accuracy([0, 1, 1, 2], [0, 1, 0, 2]) == 0.75
