"""Classification tasks: bundled offline data, users' files, Hugging Face datasets.

Every task comes as a `Task`: a `datasets.DatasetDict` with `train`, `dev`
and `test` splits (columns `text`, `label`, optional `text_b`) and its label
names and default label words. Bundled sources have no splits of their own:
they are shuffled with the task seed and cut 70/10/20 (train/dev/test); the
same seed always gives the same split, so tuning and probing see the same dev
examples (method §1 "Splits").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tl_skill.errors import TaskError

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
    spec = TaskSpec(
        **{
            **task.spec.to_dict(),
            "label_names": task.spec.label_names,
            "label_words": task.spec.label_words,
            "sizes": {s: len(d) for s, d in data.items()},
        }
    )
    return Task(DatasetDict(data), spec)


def task_spec_from_dict(d: dict[str, Any]) -> TaskSpec:
    return TaskSpec(**{**d, "label_names": tuple(d["label_names"]), "label_words": tuple(d["label_words"])})


def dumps_spec(spec: TaskSpec) -> str:
    return json.dumps(spec.to_dict())
