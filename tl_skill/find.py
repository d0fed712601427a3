"""Finding skill neurons (method §2-§3): record a run's activations, reduce them to predictivity.

`find_skill_neurons` records every run (prompt) of a task with `record_runs`
(baselines from train, above-baseline counts on the selection split, and
optionally a held-out split and a shuffled-label control in the same passes)
and returns `SkillNeurons`. `load_or_find` does the same into a directory
under the one output-directory rule (`files.claim_dir`): the same runs and
settings load what is there, others are refused before any recording.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from tl_skill import compat, distributed
from tl_skill.compat import HookedRootModule
from tl_skill.data.tasks import Task, subsample
from tl_skill.files import claim_dir, read_json, rolls_back_claims, tensor_digest
from tl_skill.models import model_spec
from tl_skill.neurons import NEURONS_JSON, SkillNeurons
from tl_skill.predictivity import NeuronsError, Subtask, accuracy_of_counts, make_subtasks, subtask_counts
from tl_skill.record import LabelSets, MomentStats, Recorder, ThresholdStats, TraceStats, n_positions
from tl_skill.tuning.prefix import (
    input_pass_through,
    prefix_cache_default,
    prompt_pass_for_hooks,
    split_batch,
    usable_for,
)
from tl_skill.tuning.prompt import SoftPrompt, iterate_batches, layout_for
from tl_skill.tuning.runs import Run
from tl_skill.units import UnitSource, check_source, unit_source

log = logging.getLogger(__name__)


@dataclass
class RunStats:
    """What one run's two recording passes give."""

    accuracy: torch.Tensor  # [S, L, T, D] float64
    baseline: torch.Tensor  # [L, T, D] float64, over all train examples
    std: torch.Tensor  # [L, T, D]
    constant: torch.Tensor  # [L, T, D] bool, constant on train and dev
    n_train: int
    n_eval: int
    seconds: float
    # {"eval"/"confirm"/"control": (pos_above [S, L, T, D], neg_above, n_pos [S], n_neg [S])}
    counts: dict[str, tuple] = field(default_factory=dict)


def record_run(
    model: HookedRootModule,
    task: Task,
    prompt: SoftPrompt | None,
    subtasks: Sequence[Subtask],
    split: str = "dev",
    layers: Sequence[int] | None = None,
    positions: str = "prompt",
    batch_size: int = 32,
    max_input_tokens: int = 96,
    prompt_length: int | None = None,
    padding_side: str | None = None,
    progress: bool = True,
    desc: str = "",
    confirm_split: str | None = None,
    control_seed: int | None = None,
    units: str | UnitSource | None = None,
) -> RunStats:
    """Baselines from train, then the above-baseline counts on `split`, in fixed memory.

    Args:
        confirm_split: also count on this split (held-out confirmation, the same baselines).
        control_seed: also count with the labels of `split` permuted by this seed, in the
            same pass (the shuffled-label control).
    """
    return record_runs(
        model,
        task,
        [prompt],
        subtasks,
        split,
        layers,
        positions,
        batch_size,
        max_input_tokens,
        prompt_length,
        padding_side,
        progress,
        desc,
        confirm_split,
        control_seed,
        units,
    )[0]


def record_runs(
    model: HookedRootModule,
    task: Task,
    prompts: Sequence[SoftPrompt | None],
    subtasks: Sequence[Subtask],
    split: str = "dev",
    layers: Sequence[int] | None = None,
    positions: str = "prompt",
    batch_size: int = 32,
    max_input_tokens: int = 96,
    prompt_length: int | None = None,
    padding_side: str | None = None,
    progress: bool = True,
    desc: str = "",
    confirm_split: str | None = None,
    control_seed: int | None = None,
    units: str | UnitSource | None = None,
) -> list[RunStats]:
    """`record_run` for several prompts (trials) of one length on the same examples.

    With the prefix cache (causal LMs, `positions="prompt"`, `tuning.prefix.prefix_cache_default()`) and
    two or more prompts, each batch's input runs once, without hooks, up to the last recorded
    layer's keys/values, and every prompt's P positions then run against it with that prompt's
    recorder: R trials read the input once. Elsewhere (one prompt included) each prompt gets the
    full pass, one after the other.
    """
    t0 = time.perf_counter()
    source = unit_source(model, units)
    layer_list = list(source.layers) if layers is None else sorted(set(layers))
    lengths = {p.length if p is not None else (prompt_length or 0) for p in prompts}
    if len(lengths) != 1:
        raise NeuronsError(f"prompts recorded together need one length, got {sorted(lengths)}")
    P = lengths.pop()
    T = n_positions(positions, P)
    k = task.spec.n_classes
    for which in ("train", split) + ((confirm_split,) if confirm_split else ()):  # refuse before recording
        present = set(task.labels(which).tolist())
        for sub in subtasks:
            if not present & set(sub.positive) or not present & set(sub.negative):
                raise NeuronsError(
                    f"the {which!r} split of {task.name!r} has only classes {sorted(present)}: "
                    f"subtask {sub.name!r} needs examples of both sides"
                )
    device = compat.model_device(model)
    layout = layout_for(model, P, max_input_tokens, padding_side)
    prompts = [p.to(device) if p is not None else None for p in prompts]
    # one prompt gains nothing from the cache here: its batches are grouped by length (little padding)
    # and the prompt pass is one pass more (SmolLM2, 256 + 128 examples: 16.7 s full, 17.8 s cached)
    shared = (
        positions == "prompt"
        and len(prompts) > 1
        and all(p is not None for p in prompts)
        and prefix_cache_default()
        and P > 0
        and compat.prefix_cache_supported(model)
    )

    def run_pass(make_stats, which: str, shuffled: np.ndarray | None = None):
        stats = [make_stats() for _ in prompts]
        recs = [Recorder(model, st, layer_list, positions, units=source) for st in stats]
        n = len(task[which])
        bar = tqdm(total=n, desc=f"{desc}record {which}", disable=not progress, leave=False, unit="ex")
        for idx, batch in iterate_batches(layout, task, which, batch_size, shard=True):
            if shuffled is not None and batch.labels is not None:  # labels [batch, 2]: true, then permuted
                batch.labels = torch.stack([batch.labels, torch.as_tensor(shuffled[idx])], 1)
            batch = batch.to(device)
            if shared and usable_for(model, batch):
                ids, mask, chunk = split_batch(batch, compat.pad_token_id(model))
                cache = input_pass_through(model, ids, mask, max(layer_list))
                for r, (rec, prompt) in enumerate(zip(recs, prompts)):
                    assert prompt is not None  # `shared` holds only when every prompt is given
                    rec.run_prompt_pass(
                        chunk,
                        prompt,
                        compat.copy_kv_cache(cache) if r < len(recs) - 1 else cache,
                        prompt_pass_for_hooks,
                    )
            else:
                for rec, prompt in zip(recs, prompts):
                    with rec.attached():
                        rec.run(batch, prompt)
            bar.update(len(idx))
        bar.close()
        for st in stats:
            distributed.reduce_stats(st)  # exact sums and counts: the same result for any world size
        return stats

    moments = run_pass(lambda: MomentStats(k, len(layer_list), T, source.width, device), "train")
    # One baseline per distinct class set: one-vs-rest subtasks all share the global mean.
    keys, baseline_index = [], []
    for sub in subtasks:
        key = sub.classes if len(sub.classes) < k else None
        if key not in keys:
            keys.append(key)
        baseline_index.append(keys.index(key))
    thresholds = [torch.stack([m.mean(key) for key in keys]) for m in moments]
    found: list[dict[str, tuple]] = [{} for _ in prompts]
    if control_seed is None:
        slot = iter(thresholds)
        counts = run_pass(lambda: ThresholdStats(next(slot), k), split)
    else:
        labels = task.labels(split)
        shuffled = labels[np.random.default_rng([int(control_seed), 7]).permutation(len(labels))]
        slot = iter(thresholds)

        def both():
            t = next(slot)
            return LabelSets([ThresholdStats(t, k), ThresholdStats(t, k)])

        pairs = run_pass(both, split, shuffled)
        counts = [p.stats[0] for p in pairs]
        for r, p in enumerate(pairs):
            control = p.stats[1]
            found[r]["control"] = subtask_counts(control.above.cpu(), control.count.cpu(), subtasks, baseline_index)
    for r, c in enumerate(counts):
        found[r]["eval"] = subtask_counts(c.above.cpu(), c.count.cpu(), subtasks, baseline_index)
    if confirm_split:
        slot = iter(thresholds)
        held = run_pass(lambda: ThresholdStats(next(slot), k), confirm_split)
        for r, h in enumerate(held):
            found[r]["confirm"] = subtask_counts(h.above.cpu(), h.count.cpu(), subtasks, baseline_index)
    seconds = (time.perf_counter() - t0) / len(prompts)
    return [
        RunStats(
            accuracy=accuracy_of_counts(*found[r]["eval"]),
            baseline=moments[r].mean().cpu(),
            std=moments[r].std().float().cpu(),
            constant=(moments[r].constant() & counts[r].min.eq(counts[r].max) & counts[r].min.eq(moments[r].min)).cpu(),
            n_train=int(moments[r].count.sum()),
            n_eval=int(counts[r].count.sum()),
            seconds=seconds,
            counts=found[r],
        )
        for r in range(len(prompts))
    ]


def check_runs(runs: Sequence[Run]) -> None:
    """Refuse to mix runs that would be probed differently, or the same run twice.

    All runs are probed with one layout, so they must agree in model, task,
    split seed, label words, prompt length, input truncation and padding side.
    """
    if not runs:
        raise NeuronsError("no runs given")
    seen: dict[Path, Path] = {}
    for run in runs:
        key = Path(run.path).resolve()
        if key in seen:
            raise NeuronsError(
                f"the same run is given twice ({seen[key]} and {run.path}); trials must be different runs"
            )
        seen[key] = run.path
    first = runs[0]
    for run in runs[1:]:
        for what, a, b in (
            ("model", first.model_name, run.model_name),
            ("task", first.task_name, run.task_name),
            ("task seed", first.info["task_seed"], run.info["task_seed"]),
            ("label words", first.info["label_words"], run.info["label_words"]),
            ("prompt length", first.prompt.length, run.prompt.length),
            ("max_input_tokens", first.config.max_input_tokens, run.config.max_input_tokens),
            ("padding_side", first.config.padding_side, run.config.padding_side),
        ):
            if a != b:
                raise NeuronsError(f"runs differ in {what}: {first.path} has {a!r}, {run.path} has {b!r}")


POSITIONS = ("prompt", "last", "mean")


@dataclass(frozen=True)
class FindConfig:
    """How `find_skill_neurons` records and scores; every field but `batch_size` decides the result.

    Args:
        split: where predictivity is measured ("dev" or "test"); the baseline always comes from train.
        layers: layers to record (default: every layer that has such units).
        positions: "prompt" (every prompt position, the method), "last" or "mean" (input tokens).
        batch_size: examples per forward pass (no effect on the result).
        max_train_examples: train examples for the baseline (None: all).
        max_eval_examples: examples of `split` (and of `confirm_split`) counted (None: all).
        multiclass: binary subtasks of a k-class task, "ovr" (one-vs-rest) or "pairwise".
        aggregate_runs: over trials, "mean" or "min"; aggregate_subtasks: "max" or "mean".
        confirm_split: a held-out split counted with the same baselines ("auto": test when
            selecting on dev; None: none), for `SkillNeurons.heldout_predictivity`.
        control: "shuffled" also counts with the selection split's labels permuted (seed
            `control_seed`) in the same pass (`SkillNeurons.control_summary`).
        units: which units to score: "mlp" (neurons), "resid", "attn", "sae:PATH" or a `UnitSource`.
    """

    split: str = "dev"
    layers: tuple[int, ...] | None = None
    positions: str = "prompt"
    batch_size: int = 32
    max_train_examples: int | None = 2000
    max_eval_examples: int | None = None
    multiclass: str = "ovr"
    aggregate_runs: str = "mean"
    aggregate_subtasks: str = "max"
    confirm_split: str | None = "auto"
    control: str | None = None
    control_seed: int = 0
    units: Any = "mlp"

    def __post_init__(self) -> None:
        if self.split not in ("dev", "test"):
            raise NeuronsError(f"split must be 'dev' or 'test', got {self.split!r}")
        confirm = self.heldout_split
        if confirm is not None and (confirm not in ("dev", "test") or confirm == self.split):
            raise NeuronsError(f"confirm_split must be the other of 'dev'/'test' or None, got {self.confirm_split!r}")
        if self.control not in (None, "shuffled"):
            raise NeuronsError(f"control must be None or 'shuffled', got {self.control!r}")
        if self.positions not in POSITIONS:
            raise NeuronsError(f"unknown position mode {self.positions!r}; choose one of {POSITIONS}")
        if self.multiclass not in ("ovr", "pairwise"):
            raise NeuronsError(f"unknown multi-class mode {self.multiclass!r}; choose 'ovr' or 'pairwise'")
        if self.aggregate_runs not in ("mean", "min"):
            raise NeuronsError(f"unknown run aggregation {self.aggregate_runs!r}; use 'mean' or 'min'")
        if self.aggregate_subtasks not in ("max", "mean"):
            raise NeuronsError(f"unknown subtask aggregation {self.aggregate_subtasks!r}; use 'max' or 'mean'")
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise NeuronsError(f"{name} must be None (all) or an integer >= 1, got {value!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise NeuronsError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if isinstance(self.control_seed, bool) or not isinstance(self.control_seed, int) or self.control_seed < 0:
            raise NeuronsError(f"control_seed must be an integer >= 0, got {self.control_seed!r}")
        if self.layers is not None:
            try:
                layers = tuple(sorted({int(layer) for layer in self.layers}))
            except (TypeError, ValueError):
                raise NeuronsError(f"layers must be layer numbers, got {self.layers!r}") from None
            if not layers or layers[0] < 0:
                raise NeuronsError(f"layers must be non-negative layer numbers, got {self.layers!r}")
            object.__setattr__(self, "layers", layers)

    @property
    def heldout_split(self) -> str | None:
        """The held-out split `confirm_split` names ("auto" resolved)."""
        if self.confirm_split == "auto":
            return "test" if self.split == "dev" else None
        return self.confirm_split

    @property
    def units_name(self) -> str:
        units = self.units
        if units is None or isinstance(units, str):
            return units or "mlp"
        return units.name if hasattr(units, "name") else f"sae:{units.hook_name}"

    def identity(self) -> dict[str, Any]:
        """The settings that decide the result (a neurons directory's identity; `batch_size` is not one)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("batch_size", "units")}
        out["layers"] = list(self.layers) if self.layers is not None else None
        if self.units_name != "mlp":  # as before units existed: earlier directories still match
            out["units"] = self.units_name
        return out


def _config(config: FindConfig | None, settings: dict[str, Any]) -> FindConfig:
    if config is not None and settings:
        raise NeuronsError(f"give a FindConfig or settings ({', '.join(settings)}), not both")
    if config is not None:
        return config
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(FindConfig)})
    if unknown:
        raise TypeError(
            f"unknown find setting(s) {unknown}; FindConfig has {[f.name for f in dataclasses.fields(FindConfig)]}"
        )
    return FindConfig(**settings)


def find_skill_neurons(
    model: HookedRootModule,
    runs: Sequence[Run | str | Path] | Task,
    config: FindConfig | None = None,
    *,
    prompts: Sequence[SoftPrompt] | None = None,
    progress: bool = True,
    **settings: Any,
) -> SkillNeurons:
    """Predictivity of every neuron for the task of `runs` (one or more prompts of one task).

    `runs` are run directories (or `Run`s); or give the `Task` itself in their place and the
    prompts in memory: `find_skill_neurons(model, task, prompts=[SoftPrompt, ...])` (layout
    and caps of `TuneConfig()`; see `Run.in_memory` for other settings).

    The settings are a `FindConfig`, or its fields as keywords
    (`find_skill_neurons(model, [run], max_train_examples=500)`). The baseline is the mean over
    (at most `max_train_examples` of) the train split; accuracy is measured on `split`.
    """
    cfg = _config(config, settings)
    spec = model_spec(model)
    compat.say_fast_path(model)
    compat.say_training_mode(model)
    source = unit_source(model, cfg.units)
    check_source(model, source, NeuronsError)
    run_list = _runs_of(runs, prompts, spec.name)
    check_runs(run_list)
    if run_list[0].model_name != spec.name:
        raise NeuronsError(f"the runs were tuned on {run_list[0].model_name!r} but the model is {spec.name!r}")
    for run in run_list:
        run.check_prefix(model, NeuronsError)
    split, confirm_split = cfg.split, cfg.heldout_split
    task = run_list[0].load_task()
    caps = {"train": cfg.max_train_examples, split: cfg.max_eval_examples}
    if confirm_split:
        caps[confirm_split] = cfg.max_eval_examples
    task = subsample(task, caps, seed=task.spec.seed)
    for s in ("train", split) + ((confirm_split,) if confirm_split else ()):
        present = np.unique(task.labels(s))
        if len(present) < 2:
            raise NeuronsError(f"the {s!r} split of {task.name!r} has a single class; predictivity needs two")
    subtasks = make_subtasks(task.spec.label_names, cfg.multiclass)
    run_cfg = run_list[0].config
    layers = list(cfg.layers) if cfg.layers is not None else None
    # all runs' prompts together: with the prefix cache each batch's input is read once for all of them
    stats = record_runs(
        model,
        task,
        [run.prompt for run in run_list],
        subtasks,
        split,
        layers,
        cfg.positions,
        cfg.batch_size,
        run_cfg.max_input_tokens,
        padding_side=run_cfg.padding_side,
        progress=progress,
        desc=f"[{len(run_list)} run{'s' if len(run_list) > 1 else ''}] ",
        confirm_split=confirm_split,
        control_seed=cfg.control_seed if cfg.control else None,
        units=source,
    )
    log.info("recorded %d run(s) in %.1fs", len(run_list), sum(s.seconds for s in stats))
    return SkillNeurons(
        model=spec.name,
        task=task.name,
        runs=[str(r.path) for r in run_list],
        label_names=list(task.spec.label_names),
        label_words=list(task.spec.label_words),
        subtasks=subtasks,
        layers=list(source.layers) if layers is None else layers,
        positions=cfg.positions,
        accuracy=torch.stack([s.accuracy for s in stats]),
        baseline=torch.stack([s.baseline for s in stats]),
        std=torch.stack([s.std for s in stats]),
        constant=torch.stack([s.constant for s in stats]),
        run_metrics=[dict(r.metrics) for r in run_list],
        aggregate_runs=cfg.aggregate_runs,
        aggregate_subtasks=cfg.aggregate_subtasks,
        meta={
            "split": split,
            "n_train": stats[0].n_train,
            "n_eval": stats[0].n_eval,
            "record_seconds": [s.seconds for s in stats],
            "multiclass": cfg.multiclass,
            "max_train_examples": cfg.max_train_examples,
            "confirm_split": confirm_split,
            "n_confirm": len(task[confirm_split]) if confirm_split else None,
            "control": cfg.control,
            "control_seed": cfg.control_seed if cfg.control else None,
            **({} if source.name == "mlp" else {"units": source.name, "unit_hook": source.template}),
            **({"notices": compat.model_notices(model)} if compat.model_notices(model) else {}),
        },
        counts={
            f"{which}.{name}": torch.stack([s.counts[which][j] for s in stats]).long()
            for which in stats[0].counts
            for j, name in ((0, "pos_above"), (1, "neg_above"))
        },
        class_counts={
            which: {"n_pos": stats[0].counts[which][2], "n_neg": stats[0].counts[which][3]} for which in stats[0].counts
        },
    )


def _runs_of(runs, prompts: Sequence[SoftPrompt] | None, model_name: str) -> list[Run]:
    if prompts is None:
        if isinstance(runs, Task):
            raise NeuronsError("a Task was given in place of the runs: pass its prompts too (prompts=[...])")
        return [r if isinstance(r, Run) else Run.load(r) for r in runs]
    if not isinstance(runs, Task):
        raise NeuronsError("with prompts=[...], give the Task they are for in place of the runs")
    if isinstance(prompts, SoftPrompt) or not len(prompts):
        raise NeuronsError("prompts must be a non-empty list of SoftPrompts")
    return [Run.in_memory(p, runs, model_name, name=f"in-memory prompt {i}") for i, p in enumerate(prompts)]


def find_identity(runs: Sequence[Run], config: FindConfig) -> dict[str, Any]:
    """What decides `find_skill_neurons(model, runs, config)`: the runs (paths, prompts) and the config."""
    return {
        "model": runs[0].model_name,
        "task": runs[0].task_name,
        "runs": [str(Path(r.path).resolve()) for r in runs],
        "prompts": [tensor_digest(r.prompt.vectors) for r in runs],
        **config.identity(),
    }


def _legacy_identity(path: Path) -> dict[str, Any] | None:
    """A neurons directory of an older tl_skill: the model, task and runs its neurons.json records."""
    if not (path / NEURONS_JSON).exists():
        return None
    info = read_json(path / NEURONS_JSON, "skill-neuron file")
    return {
        "model": info.get("model"),
        "task": info.get("task"),
        "runs": [str(Path(p).resolve()) for p in info.get("runs", [])],
    }


@rolls_back_claims
def load_or_find(
    model: HookedRootModule | Callable[[], HookedRootModule],
    runs: Sequence[Run | str | Path],
    path: str | Path,
    config: FindConfig | None = None,
    *,
    progress: bool = True,
    **settings: Any,
) -> SkillNeurons:
    """`find_skill_neurons(model, runs, config)` saved in `path`, or what is there from the same call.

    `path` is claimed first (`files.claim_dir`): a directory holding neurons of other runs or
    settings, or anything else, is refused before any recording. `model` may be a function
    returning the model, called only when recording is needed. Every process calls it:
    `save` writes on rank 0 and holds the others at a barrier.
    """
    cfg = _config(config, settings)
    run_list = [r if isinstance(r, Run) else Run.load(r) for r in runs]
    check_runs(run_list)
    path = claim_dir(path, "find", find_identity(run_list, cfg), legacy=_legacy_identity)
    if (path / NEURONS_JSON).exists():
        try:
            found = SkillNeurons.load(path)
        except NeuronsError as exc:  # cut short by a crash: recorded again, not a dead end
            log.warning("the skill neurons in %s cannot be read (%s): finding them again", path, exc)
        else:
            log.info("reusing the skill neurons in %s", path)
            return found
    loaded = cast(HookedRootModule, model) if isinstance(model, torch.nn.Module) else model()
    sn = find_skill_neurons(loaded, run_list, cfg, progress=progress)
    sn.save(path)
    return sn


def trace_activations(
    model: HookedRootModule,
    task: Task,
    split: str,
    prompt: SoftPrompt | None,
    neurons: Sequence[tuple[int, int]],
    positions: str = "prompt",
    batch_size: int = 32,
    max_input_tokens: int = 96,
    padding_side: str | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations of a few neurons on every example of `split`: (values [N, n, T], labels [N]).

    Memory is O(N x len(neurons) x T): meant for inspecting a handful of neurons
    (histograms), not for whole layers. The forward pass stops after the
    deepest traced layer.
    """
    if not neurons:
        raise NeuronsError("no neurons to trace")
    spec = model_spec(model)
    for l, i in neurons:
        if not (0 <= l < spec.n_layers and 0 <= i < spec.d_mlp):
            raise NeuronsError(
                f"neuron ({l}, {i}) does not exist in {spec.name} ({spec.n_layers} layers x {spec.d_mlp} neurons)"
            )
    layers = sorted({l for l, _ in neurons})
    P = prompt.length if prompt is not None else 0
    layout = layout_for(model, P, max_input_tokens, padding_side)
    stats = TraceStats(neurons, layers)
    rec = Recorder(model, stats, layers, positions)
    device = compat.model_device(model)
    order = []
    bar = tqdm(total=len(task[split]), desc=f"trace {split}", disable=not progress, leave=False, unit="ex")
    with rec.attached():
        for idx, batch in iterate_batches(layout, task, split, batch_size):
            rec.run(batch.to(device), prompt)
            order.append(torch.as_tensor(idx))
            bar.update(len(idx))
    bar.close()
    values, labels = stats.result()
    inverse = torch.empty(len(labels), dtype=torch.long)
    inverse[torch.cat(order)] = torch.arange(len(labels))
    return values[inverse], labels[inverse]
