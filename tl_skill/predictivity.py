"""Binary subtasks of a task and the accuracy of the rule "above baseline -> positive" from counts
(method §3-§4): what `SkillNeurons` and the recorders compute predictivity from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from tl_skill.errors import NeuronsError


@dataclass(frozen=True)
class Subtask:
    """A binary view of a task: `positive` classes vs `negative` classes."""

    name: str
    positive: tuple[int, ...]
    negative: tuple[int, ...]

    @property
    def classes(self) -> tuple[int, ...]:
        return tuple(sorted(self.positive + self.negative))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "positive": list(self.positive), "negative": list(self.negative)}


def make_subtasks(label_names: Sequence[str], mode: str = "ovr") -> list[Subtask]:
    """Binary subtasks of a task (method §4): a binary task is its own single subtask.

    `ovr`: each class vs the rest; `pairwise`: each pair (i < j), j positive,
    on the examples of those two classes only (its baseline too).
    """
    k = len(label_names)
    if k == 2:
        return [Subtask(f"{label_names[1]} vs {label_names[0]}", (1,), (0,))]
    if mode == "ovr":
        return [Subtask(f"{label_names[c]} vs rest", (c,), tuple(x for x in range(k) if x != c)) for c in range(k)]
    if mode == "pairwise":
        return [Subtask(f"{label_names[j]} vs {label_names[i]}", (j,), (i,)) for i in range(k) for j in range(i + 1, k)]
    raise NeuronsError(f"unknown multi-class mode {mode!r}; choose 'ovr' or 'pairwise'")


def subtask_counts(
    above: torch.Tensor, count: torch.Tensor, subtasks: Sequence[Subtask], baseline_index: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Per subtask: positives above baseline [S, l, t, d], negatives above, n_pos [S] and n_neg [S].

    `above[b, c]` counts class-c examples above baseline b; `count[c]` is the
    number of class-c examples.
    """
    pos, neg, n_pos, n_neg = [], [], [], []
    for sub, b in zip(subtasks, baseline_index):
        pos.append(above[b, list(sub.positive)].sum(0))
        neg.append(above[b, list(sub.negative)].sum(0))
        n_pos.append(int(count[list(sub.positive)].sum()))
        n_neg.append(int(count[list(sub.negative)].sum()))
        if n_pos[-1] == 0 or n_neg[-1] == 0:
            raise NeuronsError(
                f"subtask {sub.name!r} has no {'positive' if n_pos[-1] == 0 else 'negative'} "
                "examples in the evaluation split"
            )
    return torch.stack(pos), torch.stack(neg), n_pos, n_neg


def accuracy_of_counts(
    pos_above: torch.Tensor, neg_above: torch.Tensor, n_pos: Sequence[int], n_neg: Sequence[int]
) -> Float[torch.Tensor, "s l t d"]:
    """Accuracy of the rule "above baseline -> positive" from per-subtask counts (subtask axis -4)."""
    shape = (-1,) + (1,) * 3
    npos = torch.tensor(n_pos, dtype=torch.float64).reshape(shape)
    nneg = torch.tensor(n_neg, dtype=torch.float64).reshape(shape)
    return (pos_above.double() + nneg - neg_above.double()) / (npos + nneg)


def accuracy_from_counts(
    above: torch.Tensor, count: torch.Tensor, subtasks: Sequence[Subtask], baseline_index: Sequence[int]
) -> Float[torch.Tensor, "s l t d"]:
    """Accuracy of the rule "above baseline -> positive" for each subtask."""
    return accuracy_of_counts(*subtask_counts(above, count, subtasks, baseline_index))


def predictivity_of(acc: torch.Tensor) -> torch.Tensor:
    return torch.maximum(acc, 1 - acc)
