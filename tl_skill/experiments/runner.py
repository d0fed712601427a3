"""The evaluation runner: an experiment is a plan of keyed conditions, run over one fixed example order.

A `Condition` is a prompt (or none), a set of hooks (a perturbation, or none)
and a model variant, evaluated on a named `EvalSet` (a task split with its
verbalizer and layout settings). `run_conditions` evaluates each condition
with `tuning.loop.evaluate`, which visits the split in one order fixed by the split
alone and tells numbering hooks each batch's global position: noise draws are
a function of `(seed, global example id)`, so accuracies do not depend on the
batch size or the number of processes. Conditions with a prompt and no hooks on the
same examples (a clean condition, the prompts of a transfer matrix) share each
batch's input pass through the prefix cache (`shared_input_groups`).

Each finished condition is written atomically to
`out/conditions/<name>-<hash>.json`, the hash taken over its full definition
(the condition's own fields, its prompt's digest, its variant and its eval
set's identity); a rerun skips the conditions already there. Which directory
may hold which experiment is decided by `files.claim_dir`, before any work.

Evaluation subsets follow one rule (`evaluation_task`): an experiment on a
run evaluates on that run's test examples, or on the first `n` of them in the
task seed's random order, `subsample(task, {"test": min(n, run cap)}, seed)`:
always a subset of the run's own test set, the same for every experiment.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from tl_skill import compat, distributed
from tl_skill.compat import HookedRootModule
from tl_skill.data.tasks import Task, subsample
from tl_skill.errors import ExperimentError
from tl_skill.files import FileFormatError, atomic_json, jsonable, read_json, tensor_digest
from tl_skill.tuning.loop import evaluate, evaluate_prompts
from tl_skill.tuning.prefix import prefix_cache_default
from tl_skill.tuning.prompt import SoftPrompt, Verbalizer
from tl_skill.tuning.runs import Run

log = logging.getLogger(__name__)

CONDITIONS_DIR = "conditions"
ModelOrLoader = HookedRootModule | Callable[[], HookedRootModule]  # a model, or a function returning one


def resolve_model(model: ModelOrLoader) -> HookedRootModule:
    """`model` itself, or what the loader returns: experiments check their directory before loading."""
    if isinstance(model, torch.nn.Module) or not callable(model):
        return cast(HookedRootModule, model)
    return model()


def evaluation_task(run: Run, max_examples: int | None = None, task: Task | None = None) -> Task:
    """The examples an experiment on `run` evaluates on (the module docstring's rule).

    Args:
        max_examples: at most this many of the run's test examples (None: all of them).
        task: the run's task, when already loaded (`run.load_task()` otherwise).
    """
    cfg = run.config
    caps = [c for c in (cfg.max_test_examples, max_examples) if c is not None]
    full = task if task is not None else run.load_task()
    return subsample(full, {"test": min(caps) if caps else None}, seed=cfg.task_seed)


@dataclass(frozen=True)
class EvalSet:
    """One split of a task, as a condition is evaluated on it."""

    task: Task
    verbalizer: Verbalizer
    split: str = "test"
    max_input_tokens: int = 96
    padding_side: str | None = None

    @classmethod
    def of_run(
        cls, run: Run, model: HookedRootModule, max_examples: int | None = None, task: Task | None = None
    ) -> EvalSet:
        """The run's test examples by `evaluation_task`, with the run's label words and layout."""
        run.check_prefix(model, ExperimentError)
        cfg = run.config
        return cls(
            evaluation_task(run, max_examples, task),
            run.verbalizer(model),
            "test",
            cfg.max_input_tokens,
            cfg.padding_side,
        )

    @functools.cached_property
    def _identity(self) -> dict[str, Any]:
        ds = self.task[self.split]
        examples = hashlib.sha1(
            json.dumps([self.task.texts(self.split), self.task.labels(self.split).tolist()]).encode()
        ).hexdigest()[:16]
        return {
            "task": self.task.name,
            "split": self.split,
            "n": len(ds),
            "examples": examples,
            "label_words": list(self.task.spec.label_words),
            "max_input_tokens": self.max_input_tokens,
            "padding_side": self.padding_side,
        }

    def identity(self) -> dict[str, Any]:
        """The examples' task, split, count and content hash, with the layout settings."""
        return dict(self._identity)


HookFactory = Callable[[Any], list]  # model -> [(hook name, fn)]


@dataclass(frozen=True)
class Condition:
    """One evaluation: `prompt` (None: zero-shot) on model `variant` with `hooks(model)` active.

    `definition` holds every JSON-able fact that decides the result beyond the prompt, variant
    and eval set (e.g. the perturbation's mode, std, seed and neuron set digest).
    """

    name: str
    definition: Mapping[str, Any] = field(default_factory=dict)
    prompt: SoftPrompt | None = None
    hooks: HookFactory | None = None
    variant: str = "model"
    eval_set: str = "test"


@dataclass(frozen=True)
class ConditionResult:
    """A finished condition: accuracy and per-example correctness in the eval set's order."""

    key: str
    name: str
    definition: dict[str, Any]
    accuracy: float
    n: int
    correct: str  # "0"/"1" per example, in the eval set's split order: for paired tests
    predictions: list[int]
    seconds: float

    def correct_array(self) -> np.ndarray:
        return np.frombuffer(self.correct.encode(), dtype=np.uint8) - ord("0")

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "definition": self.definition,
            "accuracy": self.accuracy,
            "n": self.n,
            "correct": self.correct,
            "predictions": self.predictions,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConditionResult:
        """A saved condition, checked against itself: its accuracy and count must be those of its own
        per-example `correct` bits (a summary edited by hand, or cut short, is refused)."""
        done = cls(
            **{k: d[k] for k in ("key", "name", "definition", "accuracy", "n", "correct", "predictions", "seconds")}
        )
        bits = done.correct
        if (
            not isinstance(bits, str)
            or set(bits) - {"0", "1"}
            or len(bits) != done.n
            or len(done.predictions) != done.n
        ):
            raise FileFormatError(
                f"condition {done.name!r}: {done.n} examples but {len(bits)} correct bits and "
                f"{len(done.predictions)} predictions"
            )
        if not isinstance(done.accuracy, (int, float)) or abs(done.accuracy - bits.count("1") / max(1, done.n)) > 1e-12:
            raise FileFormatError(
                f"condition {done.name!r}: accuracy {done.accuracy!r} is not that of its own "
                f"per-example results ({bits.count('1')} of {done.n} correct)"
            )
        return done


def full_definition(cond: Condition, eval_sets: Mapping[str, EvalSet], variants: Mapping[str, str]) -> dict:
    """Everything that decides `cond`'s result, as JSON: the key is its hash."""
    return jsonable(
        {
            "name": cond.name,
            **dict(cond.definition),
            "prompt": None if cond.prompt is None else tensor_digest(cond.prompt.vectors),
            "prompt_length": None if cond.prompt is None else cond.prompt.length,
            "variant": variants.get(cond.variant, cond.variant),
            "eval": eval_sets[cond.eval_set].identity(),
        }
    )


def condition_key(definition: Mapping[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(definition, sort_keys=True).encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(definition["name"])).strip("_")[:60]
    return f"{slug}-{digest}"


MAX_SHARED_PROMPTS = 8


def run_conditions(
    conditions: Sequence[Condition],
    models: Mapping[str, Any],
    eval_sets: Mapping[str, EvalSet],
    *,
    out: Path | None = None,
    variants: Mapping[str, str] | None = None,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "evaluate",
    on_result: Callable[[ConditionResult], None] | None = None,
) -> dict[str, ConditionResult]:
    """Evaluate every condition (skipping those finished in `out/conditions/`); results by condition name.

    Args:
        models: the model of each variant name.
        variants: an identity string per variant (e.g. a model name and a weights digest) for the keys;
            default the variant's name.
    """
    variants = dict(variants or {})
    names = [c.name for c in conditions]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ExperimentError(f"conditions repeat names: {dup}")
    missing = sorted({c.variant for c in conditions} - set(models)) + sorted(
        {c.eval_set for c in conditions} - set(eval_sets)
    )
    if missing:
        raise ExperimentError(f"conditions name models or eval sets that were not given: {missing}")
    store = out / CONDITIONS_DIR if out is not None else None
    results: dict[str, ConditionResult] = {}
    todo = []
    for cond in conditions:
        definition = full_definition(cond, eval_sets, variants)
        key = condition_key(definition)
        path = store / f"{key}.json" if store is not None else None
        if path is not None and path.exists():
            try:
                done = ConditionResult.from_dict(read_json(path, "condition result"))
            except (FileFormatError, KeyError, TypeError) as exc:
                log.warning("%s is unreadable (%s): evaluating it again", path, exc)
            else:
                if done.definition == definition:
                    results[cond.name] = done
                    continue
        todo.append((cond, definition, key, path))
    bar = tqdm(total=len(conditions), initial=len(conditions) - len(todo), desc=desc, disable=not progress, unit="eval")

    def finish(item, res, seconds):
        cond, definition, key, path = item
        es = eval_sets[cond.eval_set]
        correct = res["predictions"] == es.task.labels(es.split)
        done = ConditionResult(
            key,
            cond.name,
            definition,
            res["accuracy"],
            res["n"],
            "".join("1" if c else "0" for c in correct),
            [int(p) for p in res["predictions"]],
            seconds,
        )
        results[cond.name] = done
        if path is not None and distributed.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_json(path, done.to_dict())
        if on_result is not None:
            on_result(done)
        bar.set_postfix(last=f"{cond.name} {done.accuracy:.3f}")
        bar.update(1)

    try:
        for group in shared_input_groups(todo):
            t0 = time.perf_counter()
            cond = group[0][0]
            model = models[cond.variant]
            es = eval_sets[cond.eval_set]
            if len(group) > 1:  # prompts without hooks on the same examples: one input pass per batch
                device = compat.model_device(model)
                many = evaluate_prompts(
                    model,
                    es.task,
                    es.split,
                    es.verbalizer,
                    [c.prompt.to(device) for c, *_ in group],
                    batch_size=batch_size,
                    max_input_tokens=es.max_input_tokens,
                    padding_side=es.padding_side,
                )
                for item, res in zip(group, many):
                    finish(item, res, (time.perf_counter() - t0) / len(group))
                continue
            hooks = cond.hooks(model) if cond.hooks is not None else []
            prompt = cond.prompt.to(compat.model_device(model)) if cond.prompt is not None else None
            res = evaluate(
                model,
                es.task,
                es.split,
                es.verbalizer,
                prompt,
                extra_hooks=hooks,
                batch_size=batch_size,
                max_input_tokens=es.max_input_tokens,
                padding_side=es.padding_side,
            )
            finish(group[0], res, time.perf_counter() - t0)
    finally:
        bar.close()
    return {c.name: results[c.name] for c in conditions}


def shared_input_groups(todo: Sequence[tuple], max_prompts: int = MAX_SHARED_PROMPTS) -> list[list[tuple]]:
    """The conditions to evaluate, in order, with those that can share an input pass put together.

    Conditions with a prompt and no hooks, of one model variant, eval set and prompt length, share
    each batch's input pass (`tuning.loop.evaluate_prompts`, with the prefix cache on) in groups of at most
    `max_prompts` (a group's results are written when it finishes); every other condition is alone.
    """
    groups: list[list[tuple]] = []
    open_: dict[tuple, list[tuple]] = {}
    for item in todo:
        cond = item[0]
        if cond.hooks is not None or cond.prompt is None or not prefix_cache_default():
            groups.append([item])
            continue
        key = (cond.variant, cond.eval_set, cond.prompt.length)
        group = open_.get(key)
        if group is None or len(group) >= max_prompts:
            group = open_[key] = []
            groups.append(group)
        group.append(item)
    return groups
