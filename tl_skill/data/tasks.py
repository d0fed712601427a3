"""Classification tasks: bundled offline data, users' files, Hugging Face datasets.

Every task comes as a `Task`: a `datasets.DatasetDict` with `train`, `dev`
and `test` splits (columns `text`, `label`, optional `text_b`) and its label
names and default label words. Bundled sources have no splits of their own:
they are shuffled with the task seed and cut 70/10/20 (train/dev/test); the
same seed always gives the same split, so tuning and probing see the same dev
examples (method §1 "Splits").
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tl_skill.errors import TaskError
from tl_skill.files import FileFormatError, atomic_json, check_types, read_json

SPLITS = ("train", "dev", "test")
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)
BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
BUNDLED_TASKS = (
    "rotten_tomatoes",
    "subjectivity",
    "word_sentiment",
    "bbc_news",
    *(
        f"bbc_news:{a}-vs-{b}"
        for a, b in (
            ("sport", "business"),
            ("tech", "politics"),
            ("entertainment", "business"),
            ("politics", "sport"),
            ("tech", "entertainment"),
        )
    ),
)


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
    # sha256 of the examples themselves (`examples_digest`) when no name can rebuild them: a task built in
    # memory (`Task.from_pandas` ...) or cut down by `subsample`. A run on such a task keeps its examples.
    examples: str = ""

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
    """A classification task: train/dev/test splits (`datasets.Dataset`s) plus its `TaskSpec`.

    Build one from data in memory with `Task.from_pandas`, `Task.from_records` or
    `Task.from_hf`, or by name with `load_task`. `task["train"]` is a `datasets.Dataset`;
    `task.texts("dev")` and `task.labels("dev")` are plain lists/arrays.
    """

    def __init__(self, data, spec: TaskSpec):
        from datasets import Dataset

        if not isinstance(spec, TaskSpec):
            raise TaskError(f"Task(data, spec): spec must be a TaskSpec, got {type(spec).__name__}")
        if not isinstance(data, Mapping) or not all(isinstance(v, Dataset) for v in data.values()):
            raise TaskError(
                f"Task(data, spec) takes a DatasetDict of splits, got {type(data).__name__}; build a task from "
                "your data with Task.from_pandas(frame, text=..., label=...), Task.from_records(rows) or "
                "Task.from_hf(dataset_dict)"
            )
        self.data = data
        self.spec = spec

    # --- building from data in memory -----------------------------------------
    @classmethod
    def from_pandas(
        cls,
        frame: Any,
        text: str = "text",
        label: str = "label",
        label_words: Sequence[str] | Mapping[str, str] | str | None = None,
        *,
        text_b: str | None = None,
        split: str | None = None,
        seed: int = 0,
        name: str = "in_memory",
    ) -> Task:
        """A task from a pandas DataFrame, checked as a csv file is.

        Args:
            frame: one row per example.
            text, label: the columns holding the text and the label. Labels are
                integers 0..C-1 (then `label_words` is needed, one per class) or names
                (numbered in the order of a `{name: word}` mapping, else of first appearance;
                the default word of a name is the name itself).
            label_words: one word per class (list in class order, `{name: word}`, or
                `"w0,w1"`); a leading space is added where missing.
            text_b: an optional second text column (sentence pairs).
            split: an optional column of `train`/`dev`/`test` (`validation` for `dev`);
                without it the rows are shuffled with `seed` and cut 70/10/20.
            seed: the split seed.
            name: the task's name in run files and reports.

        The examples are fingerprinted (`TaskSpec.examples`): a run tuned on the task
        saves them in its directory, so every later step finds the same task.
        """
        import pandas as pd

        if not isinstance(frame, pd.DataFrame):
            raise TaskError(f"Task.from_pandas expects a pandas DataFrame, got {type(frame).__name__}")
        columns = [str(c) for c in frame.columns]
        dup = sorted({c for c in columns if columns.count(c) > 1})
        if dup:
            raise TaskError(f"DataFrame: column name(s) {dup} appear more than once; rename them")
        picked = _pick_columns("DataFrame", columns, text, label, text_b, split)
        values = [frame[c].tolist() for c in picked.values()]
        rows = [dict(zip(picked, cells)) for cells in zip(*values)]
        where = [f"row {i!r}" for i in frame.index.tolist()]
        return _memory_task(name, list(picked), rows, where, seed, label_words, "DataFrame")

    @classmethod
    def from_records(
        cls,
        records: Sequence[Mapping[str, Any] | Sequence[Any]],
        text: str = "text",
        label: str = "label",
        label_words: Sequence[str] | Mapping[str, str] | str | None = None,
        *,
        text_b: str | None = None,
        split: str | None = None,
        seed: int = 0,
        name: str = "in_memory",
    ) -> Task:
        """A task from a list of records: dicts (`{"text": ..., "label": ...}`) or `(text, label)` pairs.

        Arguments as for `Task.from_pandas`; the columns name the dict keys.
        """
        if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Sequence):
            raise TaskError(
                f"Task.from_records expects a list of dicts or (text, label) pairs, got {type(records).__name__}"
            )
        if not records:
            raise TaskError("Task.from_records: no records")
        first = records[0]
        if isinstance(first, Mapping):
            keys = list(dict.fromkeys(str(k) for r in records if isinstance(r, Mapping) for k in r))
            picked = _pick_columns("records", keys, text, label, text_b, split)
            rows = []
            for i, r in enumerate(records):
                if not isinstance(r, Mapping):
                    raise TaskError(f"record {i} is a {type(r).__name__}, record 0 a dict: use one form")
                rows.append({k: r.get(c) for k, c in picked.items()})
            columns = list(picked)
        else:
            columns = ["text", "label"]
            rows = []
            for i, r in enumerate(records):
                if isinstance(r, (str, bytes, Mapping)) or not isinstance(r, Sequence) or len(r) != 2:
                    raise TaskError(
                        f"record {i} is not a (text, label) pair ({type(r).__name__}"
                        f"{f' of length {len(r)}' if isinstance(r, Sequence) else ''}); give dicts for more columns"
                    )
                rows.append({"text": r[0], "label": r[1]})
        where = [f"record {i}" for i in range(len(records))]
        return _memory_task(name, columns, rows, where, seed, label_words, "records")

    @classmethod
    def from_hf(
        cls,
        dataset: Any,
        text: str = "text",
        label: str = "label",
        label_words: Sequence[str] | Mapping[str, str] | str | None = None,
        *,
        text_b: str | None = None,
        seed: int = 0,
        name: str = "in_memory",
    ) -> Task:
        """A task from a Hugging Face `DatasetDict` (or one `Dataset`) already in memory.

        Splits named `train`, `validation` (or `dev`) and `test` are kept as they are; a
        single split (or a `Dataset`) is shuffled with `seed` and cut 70/10/20. Labels of a
        `ClassLabel` column are named and ordered by its names. Other arguments as for
        `Task.from_pandas`.
        """
        from datasets import Dataset, DatasetDict

        if isinstance(dataset, Dataset):
            dataset = DatasetDict({"train": dataset})
        if not isinstance(dataset, DatasetDict):
            raise TaskError(f"Task.from_hf expects a datasets.DatasetDict or Dataset, got {type(dataset).__name__}")
        renamed = {_SPLIT_ALIASES.get(k, k): k for k in dataset}
        unknown = sorted(k for k in renamed if k not in SPLITS)
        if unknown or (set(renamed) != set(SPLITS) and len(renamed) != 1):
            raise TaskError(
                f"DatasetDict has splits {list(dataset)}: give train, validation (or dev) and test, or a single "
                "split to be cut 70/10/20"
            )
        columns: list[str] = []
        rows: list[dict[str, Any]] = []
        where: list[str] = []
        names: list[str] | None = None
        for split, key in renamed.items():
            ds = dataset[key]
            picked = _pick_columns(f"split {key!r}", list(ds.column_names), text, label, text_b, None)
            feature_names = getattr(ds.features[label], "names", None)
            if feature_names is not None:
                if names is not None and list(feature_names) != names:
                    raise TaskError(f"the splits' label names differ: {names} and {list(feature_names)}")
                names = [str(n) for n in feature_names]
            values = [column(ds, c) for c in picked.values()]
            for i, cells in enumerate(zip(*values)):
                row = dict(zip(picked, cells))
                if names is not None and isinstance(row["label"], int) and 0 <= row["label"] < len(names):
                    row["label"] = names[row["label"]]
                if len(renamed) > 1:
                    row["split"] = split
                rows.append(row)
                where.append(f"{key!r} row {i}")
            columns = list(picked) + (["split"] if len(renamed) > 1 else [])
        if names is not None:
            words = parse_label_words(label_words) if label_words is not None else [f" {n}" for n in names]
            label_words = dict(zip(names, words_for(names, words, "Task.from_hf")))
        return _memory_task(name, columns, rows, where, seed, label_words, "Hugging Face dataset")

    @classmethod
    def from_data(cls, data: Any, **kwargs: Any) -> Task:
        """`from_pandas`, `from_hf` or `from_records`, whichever fits `data` (default columns)."""
        kind = type(data).__module__.split(".")[0]
        if isinstance(data, Task):
            return data
        if kind == "pandas":
            return cls.from_pandas(data, **kwargs)
        if kind == "datasets":
            return cls.from_hf(data, **kwargs)
        if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
            return cls.from_records(data, **kwargs)
        raise TaskError(
            f"cannot make a task of a {type(data).__name__}: give a task name, a pandas DataFrame, "
            "a list of records or a Hugging Face DatasetDict"
        )

    # --- views and copies --------------------------------------------------------
    def __getitem__(self, split: str):
        if split not in self.data:
            raise TaskError(f"task {self.spec.name!r} has no split {split!r}; it has {list(self.data)}")
        return self.data[split]

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.data.items())
        return f"Task({self.spec.name!r}, labels={list(self.spec.label_words)}, {sizes})"

    def _repr_html_(self) -> str:
        rows = []
        for split in self.data:
            counts = np.bincount(self.labels(split), minlength=self.spec.n_classes)
            cells = "".join(f"<td>{int(c)}</td>" for c in counts)
            rows.append(f"<tr><td>{html.escape(split)}</td>{cells}<td>{int(counts.sum())}</td></tr>")
        head = "".join(
            f"<th>{html.escape(n)} ({html.escape(w.strip())})</th>"
            for n, w in zip(self.spec.label_names, self.spec.label_words)
        )
        return (
            f"<div><b>Task {html.escape(self.spec.name)}</b> <small>{html.escape(self.spec.source)}, split seed "
            f"{self.spec.seed}</small></div><table><tr><th>split</th>{head}<th>all</th></tr>{''.join(rows)}</table>"
        )

    def __eq__(self, other: object) -> bool:
        """Same examples in the same splits, same label names and words (the name and source may differ)."""
        if not isinstance(other, Task):
            return NotImplemented
        same = lambda t: (t.spec.label_names, t.spec.label_words, examples_digest(t))
        return same(self) == same(other)

    __hash__ = None  # type: ignore[assignment]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def label_words(self) -> tuple[str, ...]:
        return self.spec.label_words

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.spec.label_names

    def texts(self, split: str) -> list[str]:
        return column(self[split], "text")

    def labels(self, split: str) -> np.ndarray:
        return label_array(self[split])

    def to_pandas(self) -> Any:
        """All examples as one DataFrame: text, label (number), label_name, split (and text_b)."""
        import pandas as pd

        parts = []
        for split in self.data:
            frame = pd.DataFrame({"text": self.texts(split), "label": self.labels(split)})
            if self.spec.has_text_b:
                frame["text_b"] = column(self[split], "text_b")
            frame["label_name"] = [self.spec.label_names[i] for i in frame["label"]]
            frame["split"] = split
            parts.append(frame)
        return pd.concat(parts, ignore_index=True)

    def with_spec(self, **changes: Any) -> Task:
        """The same examples with some `TaskSpec` fields changed."""
        return Task(self.data, TaskSpec(**{**asdict(self.spec), **changes}))

    def with_label_words(self, label_words: Sequence[str] | Mapping[str, str] | str) -> Task:
        """The same examples with other label words (list in class order, `{name: word}` or `"w0,w1"`)."""
        parsed = parse_label_words(label_words)
        assert parsed is not None
        words = words_for(self.spec.label_names, parsed, f"task {self.spec.name!r}")
        task = self.with_spec(label_words=tuple(words))
        validate_task(task)
        return task


_SPLIT_ALIASES = {"validation": "dev"}


def _pick_columns(
    where: str, columns: Sequence[str], text: str, label: str, text_b: str | None, split: str | None
) -> dict[str, str]:
    """{role: the user's column} for text, label and the optional text_b and split columns."""
    picked = {"text": text, "label": label}
    if text_b is not None:
        picked["text_b"] = text_b
    if split is not None:
        picked["split"] = split
    for role, col in picked.items():
        if not isinstance(col, str):
            raise TaskError(f"the {role} column must be given by name, got {col!r}")
    missing = [c for c in picked.values() if c not in columns]
    if missing:
        shown = [c[:30] for c in columns[:8]]
        raise TaskError(
            f"{where}: no column(s) {missing} (it has {len(columns)}: {shown}{' ...' if len(columns) > 8 else ''}); "
            "name the columns with text=..., label=..."
        )
    return picked


def _cell(value: Any, where: str, col: str) -> str:
    """A cell as a task file's reader sees it: "" when missing, integral numbers as integers."""
    if value is None or type(value).__name__ in ("NAType", "NaTType"):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        return str(int(value)) if float(value).is_integer() else str(float(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, str):
        return value
    raise TaskError(f"{where}, column {col!r}: expected text or a number, got a {type(value).__name__}")


def _memory_task(
    name: str,
    columns: list[str],
    rows: list[dict[str, Any]],
    where: list[str],
    seed: int,
    label_words: Any,
    kind: str,
) -> Task:
    if not isinstance(name, str) or not name.strip() or len(name) > 200 or any(c in name for c in "/\\\n"):
        raise TaskError(f"task name must be a short name without slashes, got {name!r}")
    if name in BUNDLED_TASKS or name.startswith(("csv:", "jsonl:")):
        raise TaskError(f"task name {name!r} is taken by a task tl_skill loads by name; choose another name")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TaskError(f"seed must be an integer >= 0, got {seed!r}")
    cells = [{c: _cell(r.get(c), w, c) for c in columns} for r, w in zip(rows, where)]
    task = rows_task(name, columns, cells, where, seed, label_words, f"{kind} in memory", where=kind, thing=f"a {kind}")
    return task.with_spec(examples=examples_digest(task))


_INT_LABEL = re.compile(r"[+-]?\d+(\.0*)?")


def rows_task(
    name: str,
    columns: Sequence[str],
    rows: Sequence[Mapping[str, str]],
    where_rows: Sequence[str],
    seed: int,
    label_words: Any,
    source: str,
    where: str,
    thing: str,
) -> Task:
    """A task from rows of string cells ("" when empty): the checks and label numbering of csv/jsonl files.

    `where` names the data in messages (a file's path, "DataFrame") and `where_rows[i]` row i
    ("line 7", "row 3").
    """
    label_words = parse_label_words(label_words)
    missing = [c for c in ("text", "label") if c not in columns]
    if missing:
        shown = [c[:30] for c in columns[:8]]
        raise TaskError(
            f"{where}: missing column(s) {missing}; {thing} needs 'text' and 'label' "
            f"(found {len(columns)} column(s): {shown}{' ...' if len(columns) > 8 else ''})"
        )
    if not rows:
        raise TaskError(f"{where}: no rows")
    texts = [r.get("text", "") for r in rows]
    raw = [r.get("label", "").strip() for r in rows]
    empty = [i for i, (t, l) in enumerate(zip(texts, raw)) if not t.strip() or not l]
    if empty:
        i = empty[0]
        raise TaskError(
            f"{where}: empty {'text' if not texts[i].strip() else 'label'} on {where_rows[i]} "
            f"({len(empty)} row(s) with an empty text or label)"
        )
    mapping = label_words if isinstance(label_words, dict) else None
    if all(_INT_LABEL.fullmatch(v) for v in raw):
        ints = [int(float(v)) for v in raw]
        if min(ints) < 0:
            raise TaskError(f"{where}: negative label {min(ints)} on {where_rows[ints.index(min(ints))]}")
        n = max(ints) + 1
        names = [str(i) for i in range(n)]
        if label_words is None:
            raise TaskError(
                f"{where}: integer labels need label words (--label-words / label_words=[w0, w1, ...]), "
                f"one per label 0..{n - 1}"
            )
        if mapping is None and len(label_words) < n:
            raise TaskError(
                f"{where}: label {n - 1} has no label word; {len(label_words)} label words given "
                f"({list(label_words)}) for labels 0..{n - 1}"
            )
        labels = ints
    else:
        # Classes in the order of an explicit NAME=WORD mapping, else of first appearance.
        names = list(mapping) if mapping is not None else list(dict.fromkeys(raw))
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise TaskError(f"{where}: labels {unknown} have no label word (the label words name {names})")
        index = {name: i for i, name in enumerate(names)}
        labels = [index[v] for v in raw]
    words = [f" {n}" for n in names] if label_words is None else words_for(names, label_words, where)
    if len(set(labels)) < 2:
        raise TaskError(f"{where}: all rows have label {names[labels[0]]!r}; a task needs two classes")
    text_b = [r.get("text_b", "") for r in rows] if "text_b" in columns else None
    if "split" in columns:
        split_col = [_SPLIT_ALIASES.get(r["split"].strip(), r["split"].strip()) for r in rows]
        odd = [i for i, v in enumerate(split_col) if v not in SPLITS]
        if odd:
            raise TaskError(
                f"{where}: split {rows[odd[0]]['split']!r} on {where_rows[odd[0]]} is not train, dev (validation) "
                f"or test ({len(odd)} such row(s))"
            )
        splits = {}
        for s in SPLITS:
            idx = [i for i, v in enumerate(split_col) if v == s]
            cols = {"text": [texts[i] for i in idx], "label": [labels[i] for i in idx]}
            if text_b is not None:
                cols["text_b"] = [text_b[i] for i in idx]
            splits[s] = cols
    else:
        splits = split_examples(texts, labels, seed, text_b)
    return build_task(name, splits, names, words, seed, source)


def parse_label_words(
    label_words: Sequence[str] | Mapping[str, str] | str | None,
) -> list[str] | dict[str, str] | None:
    """`w0,w1` (class order) or `name=word,...` (by label name) -> a list or a {name: word} dict.

    A leading space is added to each word where missing, since causal LMs read
    label words as continuations.
    """
    if label_words is None:
        return None
    if isinstance(label_words, str):
        items = list(label_words.split(","))
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
    out: list[str] | dict[str, str]
    if isinstance(label_words, Mapping):
        out = {str(k): space(str(v)) for k, v in label_words.items()}
        words = list(out.values())
    else:
        out = [space(str(w)) for w in label_words]
        words = out
    if any(not w.strip() for w in words):
        raise TaskError(f"empty label word in {words}")
    return out


def words_for(names: Sequence[str], label_words, where: str) -> list[str]:
    """One label word per class name, from a list (class order) or a {name: word} mapping."""
    if isinstance(label_words, dict):
        unknown = [k for k in label_words if k not in names]
        missing = [n for n in names if n not in label_words]
        if unknown or missing:
            raise TaskError(
                f"{where}: label words given for {list(label_words)} but the labels are "
                f"{list(names)}" + (f" ({missing} have none)" if missing else "")
            )
        return [label_words[n] for n in names]
    if len(label_words) != len(names):
        raise TaskError(
            f"{where}: {len(names)} labels {list(names)} but {len(label_words)} label words {list(label_words)}"
        )
    return list(label_words)


def split_examples(
    texts: Sequence[str], labels: Sequence[int], seed: int, text_b=None, groups: Sequence[str] | None = None
) -> dict[str, dict]:
    """Shuffle with `seed` and cut 70/10/20; identical inputs always land in the same split.

    The sources repeat some texts (56 review snippets, 100 BBC articles);
    splitting by row would put copies of test examples into train. With `groups` (one key per
    example, e.g. its speaker) the examples of a group are kept together instead.
    """
    n = len(texts)
    if groups is not None:
        keys: list[Any] = list(groups)
    else:
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


def build_task(name: str, splits: dict[str, dict], label_names, label_words, seed, source) -> Task:
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
        raise TaskError(
            f"task {spec.name!r} has a single class {list(spec.label_names)}; a classification task needs at least two"
        )
    if len({w.strip().lower() for w in spec.label_words}) != len(spec.label_words):
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
            every = [t for s in SPLITS if s in task.data for t in task.texts(s)]
            repeats = len(every) - len(set(every))
            hint = (
                f" (the task has {repeats} repeated text(s); copies of a text are kept in one split, so a small "
                "task's splits can come out uneven: add examples or give a `split` column)"
                if repeats
                else ""
            )
            raise TaskError(
                f"task {spec.name!r}: the {split!r} split has a single class ({only!r}); "
                f"predictivity needs both classes{hint}"
            )
        texts = task.texts(split)
        empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if empty:
            raise TaskError(f"task {spec.name!r}: {len(empty)} empty text(s) in {split!r} (first at row {empty[0]})")


def subsample(task: Task, max_examples: dict[str, int | None] | int | None, seed: int = 0) -> Task:
    """A copy of `task` with at most `max_examples` random examples per split (every class kept)."""
    if max_examples is None:
        return task
    if isinstance(max_examples, int):
        max_examples = dict.fromkeys(SPLITS, max_examples)
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
            raise TaskError(
                f"task {task.spec.name!r}: cannot keep {len(classes)} classes in {cap} {split!r} example(s)"
            )
        perm = rng.permutation(len(ds))
        picked = perm[:cap].tolist()
        # A random subset keeps the class proportions; make sure no class vanishes:
        # then take each class's first example in the random order, and fill up in that order.
        if len(np.unique(labels[picked])) < len(classes):
            firsts = [int(perm[np.flatnonzero(labels[perm] == c)[0]]) for c in classes]
            chosen = set(firsts)
            picked = firsts + [int(i) for i in perm if int(i) not in chosen][: cap - len(firsts)]
        data[split] = ds.select(sorted(picked))
    cut = Task(DatasetDict(data), task.spec)
    changed = any(data[s] is not task.data[s] for s in data)
    return cut.with_spec(
        sizes={s: len(d) for s, d in data.items()},
        examples=examples_digest(cut) if changed else task.spec.examples,
    )


def task_spec_from_dict(d: dict[str, Any]) -> TaskSpec:
    known = set(TaskSpec.__dataclass_fields__)
    kept = {k: v for k, v in d.items() if k in known}
    return TaskSpec(**{**kept, "label_names": tuple(d["label_names"]), "label_words": tuple(d["label_words"])})


def dumps_spec(spec: TaskSpec) -> str:
    return json.dumps(spec.to_dict())


def examples_digest(task: Task) -> str:
    """sha256 of a task's examples: every split's texts (and text_b) and labels, in order."""
    h = hashlib.sha256()
    for split in sorted(task.data):
        cols = {"text": task.texts(split), "label": task.labels(split).tolist()}
        if "text_b" in task.data[split].column_names:
            cols["text_b"] = column(task[split], "text_b")
        h.update(json.dumps([split, cols], ensure_ascii=False, sort_keys=True).encode())
    return h.hexdigest()


def save_examples(task: Task, path: str | Path, root: str | Path | None = None) -> str:
    """Write the task (spec and every example) to a JSON file; its examples' sha256."""
    digest = examples_digest(task)
    splits = {}
    for split in task.data:
        cols: dict[str, list] = {"text": task.texts(split), "label": task.labels(split).tolist()}
        if "text_b" in task.data[split].column_names:
            cols["text_b"] = column(task[split], "text_b")
        splits[split] = cols
    atomic_json(path, {"spec": {**task.spec.to_dict(), "examples": digest}, "splits": splits}, root)
    return digest


def load_examples(path: str | Path, digest: str) -> Task:
    """The task saved by `save_examples`, refused unless its examples still have sha256 `digest`."""
    try:
        obj = read_json(path, "task file", {"spec": dict, "splits": dict})
        check_types(obj["spec"], {"name": str, "label_names": list, "label_words": list}, f"task file {path}: spec")
        for split in SPLITS:
            check_types(obj["splits"], {split: dict}, f"task file {path}: splits")
            check_types(obj["splits"][split], {"text": list, "label": list}, f"task file {path}: {split}")
    except FileFormatError as exc:
        raise TaskError(str(exc)) from None
    spec = task_spec_from_dict(obj["spec"])
    task = build_task(spec.name, obj["splits"], spec.label_names, spec.label_words, spec.seed, spec.source)
    found = examples_digest(task)
    if found != digest:
        raise TaskError(
            f"task file {path} holds other examples than the run was tuned on (sha256 {found[:12]}..., "
            f"the run recorded {digest[:12]}...)"
        )
    return task.with_spec(**{**asdict(spec), "sizes": task.spec.sizes, "examples": found})
