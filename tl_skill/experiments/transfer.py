"""Prompt transfer between tasks and the indicators that predict it (method §8), and the multi-task study.

`run_transfer` measures, for every ordered pair of tasks (A, B), A's prompts
on B's test split as they are (`zero_shot`, `zero_shot_relative`) and as the
start of K tuning steps on B (`init`, `init_gain` over a random start), and
computes the indicators of `tl_skill.indicators`. Every evaluation is a
condition of the runner (`conditions/`: a rerun skips what is finished), on
the runner's evaluation subset of B's run. `study` runs the whole pipeline
from task names (tune, find skill neurons, transfer) and `transfer_from_dirs`
starts from existing run and neurons directories. Each output directory is
claimed first (`files.claim_dir`): other tasks, runs or settings are refused
before any work.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tl_skill import distributed
from tl_skill.compat import HookedRootModule
from tl_skill.data.sources import load_task
from tl_skill.data.tasks import Task
from tl_skill.experiments.results import TasksResult, scalars
from tl_skill.experiments.runner import Condition, EvalSet, ModelOrLoader, resolve_model, run_conditions
from tl_skill.files import claim_dir, read_json, rolls_back_claims, tensor_digest
from tl_skill.find import load_or_find
from tl_skill.indicators import (
    INDICATORS,
    TransferError,
    bootstrap_indicator_difference,
    check_comparable,
    indicator_correlations,
    indicator_matrices,
    indicator_stability,
    main_transfer_kind,
    mean_finite,
    prompt_activation_states,
    task_slug,
    trial_correlations,
)
from tl_skill.models import load_model, model_spec
from tl_skill.neurons import NeuronsError, SkillNeurons
from tl_skill.tuning import runs as tuning
from tl_skill.tuning.prompt import SoftPrompt
from tl_skill.tuning.runs import Run, RunError, TuneConfig
from tl_skill.units import UnitSource, check_same_units, source_for_neurons

log = logging.getLogger(__name__)

TRANSFER_JSON = "transfer.json"
STUDY_JSON = "study.json"


def _finite_or(x, default: float = -math.inf) -> float:
    return x if x is not None and math.isfinite(x) else default


@dataclasses.dataclass(frozen=True, repr=False)
class TransferResult(TasksResult):
    """Transfer matrices, indicators and their correlations; saved as `transfer.json`.

    Matrices are indexed `[source][target]`: row A, column B is A's prompt on task B.
    """

    FILE = TRANSFER_JSON

    transfer: dict[str, list[list[float | None]]]
    indicators: dict[str, list[list[float | None]]]
    correlations: dict[str, Any]
    matrix_convention: str = "matrix[i][j]: source task tasks[i] (its prompt), target task tasks[j]"
    baselines: dict[str, Any] = dataclasses.field(default_factory=dict)
    best_indicator: dict[str, str] = dataclasses.field(default_factory=dict)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    runs: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    neurons: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    figures: list[str] = dataclasses.field(default_factory=list)
    # the best skill-neuron indicator minus the best baseline, bootstrapped over tasks, per transfer kind
    bootstrap: dict[str, Any] = dataclasses.field(default_factory=dict)
    # with two or more trials per task: each indicator per trial, its agreement across trials,
    # and each trial's correlation with the main transfer measure
    indicators_by_trial: dict[str, list[list[list[float | None]]]] = dataclasses.field(default_factory=dict)
    stability: dict[str, Any] = dataclasses.field(default_factory=dict)
    trial_correlations: dict[str, Any] = dataclasses.field(default_factory=dict)

    COLUMNS = ("source", "target", "kind", "measure", "value")

    def to_dataframe(self) -> Any:
        """Every matrix in long form (`COLUMNS`): one row per (source task, target task, measure); `kind` is
        "transfer" (a prompt's accuracy on another task) or "indicator" (a predictor of it, e.g. the
        overlap of skill neurons)."""
        import pandas as pd

        rows = []
        for kind, mats in (("transfer", self.transfer), ("indicator", self.indicators)):
            for measure, mat in mats.items():
                for i, a in enumerate(self.tasks):
                    for j, b in enumerate(self.tasks):
                        rows.append((a, b, kind, measure, mat[i][j]))
        return pd.DataFrame(rows, columns=list(self.COLUMNS))

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "tasks": len(self.tasks), "best_indicator": self.best_indicator.get("name")}


@dataclasses.dataclass(frozen=True, repr=False)
class StudyResult(TasksResult):
    """The multi-task study's summary; saved as `study.json` (the matrices are in `transfer.json`)."""

    FILE = STUDY_JSON

    seeds: list[int]
    per_task: dict[str, dict[str, Any]]
    correlations: dict[str, Any]
    model_spec: dict[str, Any] = dataclasses.field(default_factory=dict)
    tune_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    find_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    transfer_steps: int = 0
    transfer_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    transfer_json: str = ""
    figures: list[str] = dataclasses.field(default_factory=list)

    def to_dataframe(self) -> Any:
        """One row per task: `task`, mean `dev_accuracy` / `test_accuracy` of its prompts, `best_predictivity`
        of its skill neurons, and where its runs and neurons are."""
        import pandas as pd

        return pd.DataFrame(
            [{"task": t, **scalars(v), "runs": len(v.get("runs", []))} for t, v in self.per_task.items()]
        )

    def facts(self) -> dict[str, Any]:
        return {"model": self.model, "tasks": len(self.tasks), "seeds": len(self.seeds)}


def _short_config(run_b: Run, steps: int, seed: int, prompt_length: int) -> TuneConfig:
    return replace(
        run_b.config, steps=steps, eval_every=steps, seed=seed, patience=0, prompt_length=prompt_length, init_text=None
    )


def validate_inputs(
    model_name: str, neurons: Sequence[SkillNeurons], runs: Mapping[str, Sequence[Run]], spec=None
) -> list[str]:
    """Check that every task has runs and skill neurons of the model; returns the task order."""
    tasks = [sn.task for sn in neurons]
    dup = sorted({t for t in tasks if tasks.count(t) > 1})
    if dup:
        raise TransferError(f"task(s) {dup} appear more than once among the skill neurons")
    if len(tasks) < 2:
        raise TransferError(f"transfer needs at least two tasks, got {tasks}")
    extra = sorted(set(runs) - set(tasks))
    if extra:
        raise TransferError(f"runs of task(s) {extra} have no skill neurons; give their neurons directories too")
    for sn in neurons:
        if sn.model != model_name:
            raise TransferError(
                f"skill neurons of {sn.task!r} were found on {sn.model!r}, but the model is {model_name!r}"
            )
        if spec is not None and max(sn.layers) >= spec.n_layers:
            raise TransferError(f"skill neurons of {sn.task!r} do not fit {model_name!r}")
        check_comparable(neurons[0], sn)
        task_runs = runs.get(sn.task) or []
        if not task_runs:
            raise TransferError(f"task {sn.task!r} has no prompt-tuning runs")
        for run in task_runs:
            if run.model_name != model_name:
                raise TransferError(f"run {run.path} was tuned on {run.model_name!r}, but the model is {model_name!r}")
            if run.task_name != sn.task:
                raise TransferError(f"run {run.path} is of task {run.task_name!r}, not {sn.task!r}")
            if spec is not None and run.prompt.vectors.shape[1] != spec.d_model:
                raise TransferError(
                    f"run {run.path}: prompt width {run.prompt.vectors.shape[1]} != d_model {spec.d_model}"
                )
    return tasks


def transfer_identity(
    neurons: Sequence[SkillNeurons],
    runs: Mapping[str, Sequence[Run]],
    transfer_steps: int,
    init_trials: int,
    top_fraction: float,
    max_eval_examples: int | None,
    units: str | None = None,
) -> dict[str, Any]:
    units = units or neurons[0].units
    return {
        "model": neurons[0].model,
        "tasks": [sn.task for sn in neurons],
        **({} if units == "mlp" else {"units": units}),
        "neurons": [tensor_digest(sn.predictivity) for sn in neurons],
        "runs": {t: [str(Path(r.path).resolve()) for r in rs] for t, rs in runs.items()},
        "prompts": {t: [tensor_digest(r.prompt.vectors) for r in rs] for t, rs in runs.items()},
        "transfer_steps": transfer_steps,
        "init_trials": init_trials,
        "top_fraction": top_fraction,
        "max_eval_examples": max_eval_examples,
    }


@rolls_back_claims
def run_transfer(
    model: ModelOrLoader,
    neurons: Sequence[SkillNeurons],
    runs: Mapping[str, Sequence[Run]],
    out: str | Path,
    transfer_steps: int = 50,
    init_trials: int = 1,
    top_fraction: float = 0.02,
    max_eval_examples: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    loaded_tasks: Mapping[str, Task] | None = None,
    units: str | None = None,
) -> TransferResult:
    """Transfer performance and indicators for every ordered pair of tasks; writes `out/transfer.json`.

    Args:
        model: the model, or a function returning it (called once `out` has been accepted).
        neurons: skill neurons of each task (one per task, in the order of the matrices).
        runs: the prompt-tuning runs (trials) of each task, by task name.
        transfer_steps: K, the length of the short tunings of the `init` setting (0: skip it).
        init_trials: how many of the source task's prompts start a short tuning (each costs
            K steps per target task).
        top_fraction: per-layer share of top neurons for `neuron_topk_jaccard`.
        max_eval_examples: cap on each target's test examples (`experiments.runner.evaluation_task`).
        batch_size: evaluation batch size (default: the first target run's `eval_batch_size`).
        loaded_tasks: tasks already loaded, by name, as their runs load them (saves reloading).
        units: the unit source of the activation indicators (default: the one the skill
            neurons were found on, `SkillNeurons.units`; all tasks must share it; another is
            accepted only for the same units, e.g. an SAE directory that moved).

    Returns:
        A `TransferResult`: `transfer` {kind: matrix}, `indicators` {name: matrix},
        `correlations` {indicator: {spearman, kendall, n, mantel_p, transfer, by_transfer}}:
        the top-level numbers are for the main transfer measure (`main_transfer_kind`),
        `by_transfer` has them for every kind.
    """
    if transfer_steps < 0 or init_trials < 1:
        raise TransferError(f"transfer_steps must be >= 0 and init_trials >= 1 (got {transfer_steps}, {init_trials})")
    runs = {t: list(r) for t, r in runs.items()}
    validate_inputs(neurons[0].model if neurons else "", neurons, runs)
    check_same_units(neurons[0].units, units, TransferError)
    name = units.name if isinstance(units, UnitSource) else units
    identity = transfer_identity(neurons, runs, transfer_steps, init_trials, top_fraction, max_eval_examples, name)
    out = claim_dir(out, "transfer", identity, legacy=_legacy_transfer)
    return _transfer(
        model,
        neurons,
        runs,
        out,
        transfer_steps,
        init_trials,
        top_fraction,
        max_eval_examples,
        batch_size,
        progress,
        loaded_tasks,
        units,
    )


def _transfer(
    model: ModelOrLoader,
    neurons,
    runs,
    out: Path,
    transfer_steps,
    init_trials,
    top_fraction,
    max_eval_examples,
    batch_size,
    progress,
    loaded_tasks,
    units=None,
) -> TransferResult:
    model = resolve_model(model)
    spec = model_spec(model)
    tasks = validate_inputs(spec.name, neurons, runs, spec)
    source = source_for_neurons(model, neurons[0], units, TransferError)
    sn_of = {sn.task: sn for sn in neurons}
    runs = {t: list(runs[t]) for t in tasks}
    n = len(tasks)
    paths = {t: [str(r.path.resolve()) for r in runs[t]] for t in tasks}
    full_tasks = {t: loaded_tasks[t] if loaded_tasks and t in loaded_tasks else runs[t][0].load_task() for t in tasks}
    eval_sets = {t: EvalSet.of_run(runs[t][0], model, max_eval_examples, full_tasks[t]) for t in tasks}
    bs = batch_size or runs[tasks[0]][0].config.eval_batch_size

    # Zero-shot: A's prompts as they are on B's test split.
    conds = [
        Condition(f"zero_shot|{a}|{b}|{k}", {}, r.prompt, None, "model", b)
        for a in tasks
        for b in tasks
        for k, r in enumerate(runs[a])
    ]
    res = run_conditions(
        conds,
        {"model": model},
        eval_sets,
        out=out,
        variants={"model": spec.name},
        batch_size=bs,
        progress=progress,
        desc="transfer: prompts as is",
    )
    zero = np.array(
        [
            [mean_finite([res[f"zero_shot|{a}|{b}|{k}"].accuracy for k in range(len(runs[a]))]) for b in tasks]
            for a in tasks
        ]
    )
    own = np.diag(zero).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(own[None, :] > 0, zero / own[None, :], math.nan)
    transfer = {"zero_shot": zero, "zero_shot_relative": relative}
    baselines: dict[str, dict[str, float]] = {"own_prompt_accuracy": dict(zip(tasks, own.tolist()))}

    # Init: A's prompt as the start of K steps on B, against K steps from a random start.
    if transfer_steps > 0:
        init = np.full((n, n), math.nan)
        gain = np.full((n, n), math.nan)
        random_acc: dict[str, float] = {}
        root = out / "transfer_runs" / f"K{transfer_steps}"  # another K is another set of runs
        bar = tqdm(
            total=n * n, desc=f"transfer: prompt as init, {transfer_steps} steps", disable=not progress, unit="pair"
        )

        def short_tune(
            b: str, run_dir: Path, seed: int, length: int, init_prompt: SoftPrompt | None, name: str
        ) -> float:
            cfg = _short_config(runs[b][0], transfer_steps, seed, length)
            # init_prompt=None: tune's own random start (vocabulary embeddings drawn with `seed`);
            # no dev check: with eval_every = K it would only confirm the last step's prompt
            run = tuning.tune(
                model,
                full_tasks[b],
                run_dir,
                cfg,
                progress=False,
                evaluate_test=False,
                init_prompt=init_prompt,
                evaluate_dev=False,
            )
            got = run_conditions(
                # the run's place within `out`: the key must not depend on how `out` was spelled
                [Condition(name, {"tuned_from": run_dir.relative_to(out).as_posix()}, run.prompt, None, "model", b)],
                {"model": model},
                eval_sets,
                out=out,
                variants={"model": spec.name},
                batch_size=bs,
                progress=False,
            )
            return got[name].accuracy

        for j, b in enumerate(tasks):
            rand: dict[tuple[int, int], float] = {}
            for i, a in enumerate(tasks):
                accs, gains = [], []
                for run_a in runs[a][:init_trials]:
                    seed, P = run_a.config.seed, run_a.prompt.length
                    if (P, seed) not in rand:
                        rand[(P, seed)] = short_tune(
                            b,
                            root / f"random_to_{task_slug(b)}" / f"P{P}_seed{seed}",
                            seed,
                            P,
                            None,
                            f"random|{b}|P{P}|seed{seed}",
                        )
                    acc = short_tune(
                        b,
                        root / f"{task_slug(a)}_to_{task_slug(b)}" / f"seed{seed}",
                        seed,
                        P,
                        run_a.prompt,
                        f"init|{a}|{b}|seed{seed}",
                    )
                    accs.append(acc)
                    gains.append(acc - rand[(P, seed)])
                init[i, j], gain[i, j] = mean_finite(accs), mean_finite(gains)
                bar.update(1)
            random_acc[b] = mean_finite(list(rand.values()))
        bar.close()
        transfer["init"] = init
        transfer["init_gain"] = gain
        baselines["random_init_accuracy"] = random_acc

    # Indicators (cheap: no data, one prompt-only forward pass per prompt).
    states = {t: [prompt_activation_states(model, r.prompt, source) for r in runs[t]] for t in tasks}
    prompts = {t: [r.prompt for r in runs[t]] for t in tasks}
    indicators = indicator_matrices(tasks, sn_of, prompts, states, top_fraction)
    evidence = _evidence(tasks, sn_of, prompts, states, top_fraction, indicators, transfer)

    by_kind = indicator_correlations(indicators, transfer)
    main_kind = main_transfer_kind(transfer)
    result = TransferResult(
        model=spec.name,
        tasks=tasks,
        transfer={k: v.tolist() for k, v in transfer.items()},
        indicators={k: v.tolist() for k, v in indicators.items()},
        correlations={name: {**c[main_kind], "transfer": main_kind, "by_transfer": c} for name, c in by_kind.items()},
        baselines=baselines,
        best_indicator={
            kind: max(by_kind, key=lambda name: _finite_or(by_kind[name][kind]["spearman"])) for kind in transfer
        },
        settings={
            "model": spec.name,
            "transfer_steps": transfer_steps,
            "max_eval_examples": max_eval_examples,
            "init_trials": init_trials,
            "top_fraction": top_fraction,
            "top_k_per_layer": max(1, int(top_fraction * source.width)),
            "batch_size": batch_size,
            **({} if source.name == "mlp" else {"units": source.name}),
        },
        runs=paths,
        neurons={t: sn_of[t].runs for t in tasks},
        **evidence,
    )
    result = type(result)(**result.to_dict())  # non-finite values as None, as saved
    if distributed.is_main():  # under torchrun rank 0 writes the result
        result.save(out)
    log.info("transfer results for %d tasks written to %s", n, out / TRANSFER_JSON)
    return result


def _evidence(tasks, sn_of, prompts, states, top_fraction, indicators, transfer) -> dict[str, Any]:
    """The bootstrap over tasks of the skill-neuron indicators against the baselines (per transfer
    measure), and, where every task has two or more trials, the indicators of each trial alone,
    their agreement across trials and each trial's correlation with transfer.

    Trial k pairs every task's k-th prompt with the skill neurons of that prompt alone
    (`SkillNeurons.trial`).
    """
    out: dict[str, Any] = {
        "bootstrap": {kind: bootstrap_indicator_difference(indicators, m) for kind, m in transfer.items()}
    }
    n_trials = min(min(len(prompts[t]), sn_of[t].n_trials) for t in tasks)
    aligned = all(len(prompts[t]) == sn_of[t].n_trials for t in tasks)
    if n_trials < 2 or not aligned:
        return out
    by_trial: dict[str, list[np.ndarray]] = {name: [] for name in INDICATORS}
    for k in range(n_trials):
        mats = indicator_matrices(
            tasks,
            {t: sn_of[t].trial(k) for t in tasks},
            {t: [prompts[t][k]] for t in tasks},
            {t: [states[t][k]] for t in tasks},
            top_fraction,
        )
        for name in INDICATORS:
            by_trial[name].append(mats[name])
    main = transfer[main_transfer_kind(transfer)]
    out["indicators_by_trial"] = {name: [m.tolist() for m in ms] for name, ms in by_trial.items()}
    out["stability"] = indicator_stability(by_trial)
    out["trial_correlations"] = trial_correlations(by_trial, main)
    return out


def _legacy_transfer(out: Path) -> dict[str, Any] | None:
    if not (out / TRANSFER_JSON).exists():
        return None
    prev = read_json(out / TRANSFER_JSON, "transfer file")
    return {"model": prev.get("model"), "tasks": prev.get("tasks")}


@rolls_back_claims
def transfer_from_dirs(
    model: HookedRootModule | str | None,
    neurons_dirs: Sequence[str | Path],
    run_dirs: Sequence[str | Path] | None,
    out: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    **kwargs: Any,
) -> TransferResult:
    """Transfer and indicators from existing skill-neuron directories (one per task) and runs.

    Args:
        model: a loaded model, a model name, or None to load the runs' model (on `device`, `dtype`),
            after `out` has been accepted.
        neurons_dirs: `SkillNeurons` directories, one per task (the matrices follow their order).
        run_dirs: run directories of those tasks (any order); None uses the runs each
            neurons directory was found from.
        **kwargs: passed to `run_transfer` (transfer_steps, init_trials, top_fraction, ...).
    """
    if not neurons_dirs:
        raise TransferError("no neurons directories given")
    neurons = []
    for d in neurons_dirs:
        try:
            neurons.append(SkillNeurons.load(d))
        except NeuronsError as exc:
            raise TransferError(str(exc)) from exc
    models = sorted({sn.model for sn in neurons})
    if len(models) > 1:
        raise TransferError(
            f"the neurons directories come from different models {models}; transfer compares tasks on one model"
        )
    runs: dict[str, list[Run]] = {}
    if run_dirs is None:
        for sn in neurons:
            try:
                runs[sn.task] = [Run.load(p) for p in sn.runs]
            except RunError as exc:
                raise TransferError(
                    f"the runs of {sn.task!r} recorded in its neurons directory are "
                    f"gone ({exc}); pass run directories explicitly"
                ) from exc
    else:
        for d in run_dirs:
            run = Run.load(d)
            runs.setdefault(run.task_name, []).append(run)
    run_models = sorted({r.model_name for rs in runs.values() for r in rs})
    if run_models != models:
        raise TransferError(f"the runs were tuned on {run_models} but the skill neurons were found on {models}")
    loader: ModelOrLoader
    if model is None or isinstance(model, str):
        want = model or models[0]
        if want != models[0]:
            raise TransferError(f"the runs were tuned on {models[0]!r}, not {want!r}")
        loader = lambda: load_model(want, device=device, dtype=dtype)
    else:
        loader = model
    return run_transfer(loader, neurons, runs, out, **kwargs)


# --------------------------------------------------------------------------- study
@rolls_back_claims
def study(
    model: HookedRootModule | str,
    tasks: Sequence[str],
    out: str | Path,
    seeds: Sequence[int] = (0, 1),
    tune_config: TuneConfig | None = None,
    find_kwargs: Mapping[str, Any] | None = None,
    transfer_steps: int = 50,
    progress: bool = True,
    device=None,
    dtype=None,
    **transfer_kwargs: Any,
) -> StudyResult:
    """The multi-task study: tune prompts, find skill neurons, then transfer and indicators.

    Layout of `out`: `runs/<task>/seed<S>` (prompt tuning), `neurons/<task>`
    (skill neurons), `transfer_runs/K<K>/` (the short tunings of the init setting),
    `conditions/`, `transfer.json`, `study.json` (`viz.plots.plot_transfer_figures` draws them). A rerun reuses
    everything that is finished; other tasks or settings are refused before any work.

    Args:
        model: a loaded model or a model name (loaded once `out` has been accepted).
        tasks: task names (at least two), e.g. word_sentiment, rotten_tomatoes, subjectivity.
        seeds: one prompt (trial) per seed.
        tune_config: tuning settings (its `seed` is replaced by each of `seeds`).
        find_kwargs: passed to `find_skill_neurons` (max_train_examples, max_eval_examples, ...).
        transfer_steps: K for the init setting (0: only zero-shot transfer).
        **transfer_kwargs: passed to `run_transfer` (init_trials, top_fraction, max_eval_examples, ...).
    """
    tasks = list(tasks)
    if len(set(tasks)) != len(tasks):
        raise TransferError(f"tasks repeat: {tasks}")
    if len(tasks) < 2:
        raise TransferError(f"a transfer study needs at least two tasks, got {tasks}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise TransferError("no seeds given")
    cfg = tune_config or TuneConfig()
    find_kwargs = dict(find_kwargs or {})
    bad = sorted(set(find_kwargs) & {"model", "runs", "progress"})
    if bad:
        raise TransferError(f"find_kwargs may not set {bad}")
    unknown = sorted(set(transfer_kwargs) - {"init_trials", "top_fraction", "max_eval_examples", "batch_size"})
    if unknown:
        raise TransferError(f"unknown transfer settings {unknown}")
    model_name = model if isinstance(model, str) else model_spec(model).name
    loaded = {t: load_task(t, seed=cfg.task_seed) for t in tasks}  # unknown names fail here, before tuning
    identity = {
        "model": model_name,
        "tasks": tasks,
        "seeds": seeds,
        "tune_config": asdict(cfg),
        "find_kwargs": find_kwargs,
        "transfer_steps": transfer_steps,
        "transfer_kwargs": {k: v for k, v in transfer_kwargs.items() if k not in ("batch_size", "figures")},
    }
    out = claim_dir(out, "study", identity, legacy=_legacy_study)
    if isinstance(model, str):
        model = load_model(model, device=device, dtype=dtype)
    assert not isinstance(model, str)
    spec = model_spec(model)

    runs: dict[str, list[Run]] = {}
    neurons: list[SkillNeurons] = []
    for t in tqdm(tasks, desc="study: tune and find", disable=not progress, unit="task"):
        runs[t] = tuning.tune_trials(model, loaded[t], out / "runs" / task_slug(t), seeds, cfg, progress=progress)
        # tasks are compared by their selection-split predictivity: no held-out pass is needed
        neurons.append(
            load_or_find(
                model,
                runs[t],
                out / "neurons" / task_slug(t),
                progress=progress,
                **{"confirm_split": None, **find_kwargs},
            )
        )
    kw = dict(init_trials=1, top_fraction=0.02, max_eval_examples=None, batch_size=None)
    kw.update(transfer_kwargs)
    result = _transfer(
        model,
        neurons,
        runs,
        out,
        transfer_steps,
        kw["init_trials"],
        kw["top_fraction"],
        kw["max_eval_examples"],
        kw["batch_size"],
        progress,
        loaded,
    )
    info = StudyResult(
        model=spec.name,
        model_spec=spec.to_dict(),
        tasks=tasks,
        seeds=seeds,
        tune_config=asdict(cfg),
        find_kwargs=find_kwargs,
        transfer_steps=transfer_steps,
        transfer_kwargs=dict(transfer_kwargs),
        per_task={
            t: {
                "runs": [str(r.path) for r in runs[t]],
                "neurons": str((out / "neurons" / task_slug(t)).resolve()),
                "dev_accuracy": mean_finite([r.metrics.get("dev_accuracy", math.nan) for r in runs[t]]),
                "test_accuracy": mean_finite([r.metrics.get("test_accuracy", math.nan) for r in runs[t]]),
                "best_predictivity": sn.best_predictivity,
            }
            for t, sn in zip(tasks, neurons)
        },
        transfer_json=str((out / TRANSFER_JSON).resolve()),
        correlations=result.correlations,
    )
    info = StudyResult(**info.to_dict())
    info.save(out)
    return info


def _legacy_study(out: Path) -> dict[str, Any] | None:
    if not (out / STUDY_JSON).exists():
        return None
    prev = read_json(out / STUDY_JSON, "study file")
    return {k: prev[k] for k in ("model", "tasks", "seeds", "tune_config", "transfer_steps") if k in prev}
