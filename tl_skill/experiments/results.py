"""Result objects: frozen dataclasses with `save(dir)` / `load(path)`.

JSON for every plain field (`<FILE>`), safetensors for tensor fields
(`<stem>.safetensors`, written first, so a directory with the JSON is
complete). Plots, verdict sentences and the report read these objects; they
never run the model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from tl_skill.display import html_facts, html_table, repr_line
from tl_skill.files import FileFormatError, atomic_json, atomic_tensors, jsonable, read_json, read_tensors

R = TypeVar("R", bound="Result")


@dataclasses.dataclass(frozen=True, repr=False)
class Result:
    """Base of the result dataclasses; subclasses set `FILE` (the JSON file's name)."""

    FILE: ClassVar[str] = "result.json"

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def to_dict(self) -> dict[str, Any]:
        """The plain (JSON) fields."""
        skip = set(self._tensor_fields())
        return jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip})

    def __getitem__(self, key: str) -> Any:  # results read like the JSON they are saved as
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in {f.name for f in dataclasses.fields(self)}

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def save(self, path: str | Path) -> Path:
        """Write into directory `path`; returns the JSON file's path."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {n: getattr(self, n) for n in self._tensor_fields()}
        if tensors:
            atomic_tensors(path / (Path(self.FILE).stem + ".safetensors"), tensors)
        atomic_json(path / self.FILE, self.to_dict())
        return path / self.FILE

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read a result saved by `save` (a directory, or its JSON file); fields it lacks take their defaults."""
        path = Path(path)
        file = path / cls.FILE if path.is_dir() or not path.suffix else path
        if path.is_file() and path.name != cls.FILE:
            raise FileFormatError(f"{path} is not a {cls.__name__} (a directory holding {cls.FILE}, or that file)")
        if not file.exists():
            raise FileFormatError(f"{path} holds no {cls.__name__}: {file.name} not found")
        data = read_json(file, f"{cls.__name__} file")
        names = {f.name: f for f in dataclasses.fields(cls)}
        required = [
            n for n, f in names.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        tensor_file = file.with_name(file.stem + ".safetensors")
        tensors = read_tensors(tensor_file, f"{cls.__name__} tensors") if tensor_file.exists() else {}
        lacking = [n for n in required if n not in data and n not in tensors]
        if lacking:
            raise FileFormatError(f"{cls.__name__} file {file} lacks {', '.join(lacking)}")
        result = cls(**{n: (tensors[n] if n in tensors else data[n]) for n in names if n in data or n in tensors})
        problem = result.check()
        if problem:
            raise FileFormatError(f"{cls.__name__} file {file}: {problem}")
        return result

    def check(self) -> str | None:
        """What is wrong with a loaded result's values (None: nothing); subclasses check their fields."""
        return None

    # --- notebook display ------------------------------------------------------
    def to_dataframe(self) -> Any:
        """The result as a table (pandas DataFrame); each result documents its columns."""
        raise NotImplementedError(f"{type(self).__name__} has no table")

    def facts(self) -> dict[str, Any]:
        """The few numbers a one-line summary shows (model, task and what the result found)."""
        return {k: getattr(self, k) for k in ("model", "task", "tasks") if k in self}

    def __repr__(self) -> str:
        return repr_line(type(self).__name__, self.facts())

    def _repr_html_(self) -> str:
        try:
            table = html_table(self.to_dataframe(), max_rows=12)
        except NotImplementedError:
            table = ""
        return html_facts(type(self).__name__, self.facts()) + table


def scalars(d: Any) -> dict[str, Any]:
    """The plain number/text/flag entries of a dict (a table row's cells); lists and dicts left out."""
    if not isinstance(d, dict):
        return {}
    return {k: v for k, v in d.items() if v is None or isinstance(v, (bool, int, float, str))}


@dataclasses.dataclass(frozen=True, repr=False)
class TaskResult(Result):
    """A result about one model on one task: the fields such results start with."""

    model: str
    task: str


@dataclasses.dataclass(frozen=True, repr=False)
class RunResult(TaskResult):
    """A result about one tuning run's prompt (`run`: its directory)."""

    run: str


@dataclasses.dataclass(frozen=True, repr=False)
class TasksResult(Result):
    """A result about one model on several tasks."""

    model: str
    tasks: list[str]
