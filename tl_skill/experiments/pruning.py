"""The pruning experiment (method §7): size, speed and accuracy of a model pruned to its skill neurons."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tl_skill import compat, distributed
from tl_skill.compat import HookedRootModule
from tl_skill.experiments.results import RunResult
from tl_skill.experiments.runner import Condition, EvalSet, ModelOrLoader, resolve_model, run_conditions
from tl_skill.files import claim_dir, read_json, rolls_back_claims, tensor_digest
from tl_skill.models import model_spec
from tl_skill.neurons import SkillNeurons, check_neurons_for_run
from tl_skill.prune import (
    PRUNE_JSON,
    PruneError,
    check_mlp_units,
    check_prune_arguments,
    count_parameters,
    prune_model,
    pruning_of,
    save_pruned,
)
from tl_skill.stats import mcnemar_exact
from tl_skill.tuning.prompt import SoftPrompt, Verbalizer, class_logits, iterate_batches, layout_for
from tl_skill.tuning.runs import Run, TuneConfig, tune

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _inference_seconds(
    model: HookedRootModule, batches, verbalizer: Verbalizer, prompt: SoftPrompt | None, device: torch.device
) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _, batch in batches:
        class_logits(model, batch, verbalizer, prompt).argmax(-1)
    _sync(device)
    return time.perf_counter() - t0


def time_inference(
    models: dict[str, Any],
    batches,
    verbalizer: Verbalizer,
    prompt: SoftPrompt | None,
    repeats: int = 5,
    progress: bool = False,
) -> dict[str, list[float]]:
    """`repeats` timings of each model, interleaved over the same batches, after one untimed warm-up pass each.

    The order alternates between repetitions so drifts in machine load fall on every model alike.
    """
    device = compat.model_device(next(iter(models.values())))
    for m in models.values():
        _inference_seconds(m, batches, verbalizer, prompt, device)
    seconds: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for r in tqdm(range(repeats), desc="timing", disable=not progress, leave=False):
        for k in names if r % 2 == 0 else names[::-1]:
            seconds[k].append(_inference_seconds(models[k], batches, verbalizer, prompt, device))
    return seconds


@dataclasses.dataclass(frozen=True, repr=False)
class PruneResult(RunResult):
    """What `prune_experiment` measured; saved as `prune.json` beside the pruned model."""

    FILE = PRUNE_JSON

    kept_fraction: float
    layers: list[int]
    params_before: int
    params_after: int
    n_test: int
    accuracy_before: float
    accuracy_after: float
    neurons: str | None = None
    neuron_runs: list[str] = dataclasses.field(default_factory=list)
    device: str = "cpu"
    kept_per_layer: dict[str, int] = dataclasses.field(default_factory=dict)
    d_mlp: int = 0
    params_fraction: float = 0.0
    run_test_accuracy: float | None = None
    mcnemar_p: float | None = None
    speedup: float | None = None
    median_seconds_before: float = 0.0
    median_seconds_after: float = 0.0
    seconds_before: list[float] = dataclasses.field(default_factory=list)
    seconds_after: list[float] = dataclasses.field(default_factory=list)
    timing_repeats: int = 0
    batch_size: int = 32
    prune_seconds: float = 0.0
    timing_seconds: float = 0.0
    retune_steps: int = 0
    accuracy_retuned: float | None = None
    retuned_dev_accuracy: float | None = None
    retuned_run: str | None = None
    retune_seconds: float | None = None
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    COLUMNS = ("model", "accuracy", "parameters", "median_seconds")

    def to_dataframe(self) -> Any:
        """One row per model (`COLUMNS`): the original, the pruned and (when retuned) the pruned with a retuned
        prompt: test accuracy, parameter count and median seconds per timed pass."""
        import pandas as pd

        rows: list[tuple[str, float | None, int, float | None]] = [
            ("original", self.accuracy_before, self.params_before, self.median_seconds_before),
            ("pruned", self.accuracy_after, self.params_after, self.median_seconds_after),
        ]
        if self.accuracy_retuned is not None:
            rows.append(("pruned, prompt retuned", self.accuracy_retuned, self.params_after, None))
        return pd.DataFrame(rows, columns=list(self.COLUMNS))

    def facts(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "task": self.task,
            "kept": self.kept_fraction,
            "accuracy": f"{self.accuracy_before:.4f} -> {self.accuracy_after:.4f}",
            "speedup": self.speedup,
        }


@rolls_back_claims
def prune_experiment(
    model: ModelOrLoader,
    run: Run | str | Path,
    neurons: SkillNeurons | str | Path,
    out: str | Path,
    keep: float = 0.02,
    layers: Sequence[int] | None = None,
    retune_steps: int = 0,
    max_examples: int | None = None,
    batch_size: int = 32,
    progress: bool = True,
    timing_repeats: int = 5,
) -> PruneResult:
    """Prune `model` to the skill neurons of `neurons`, compare it with the original on the run's test split.

    Measures parameter counts, test accuracy of the run's prompt on both models (two
    conditions of the runner: the same examples, with an exact McNemar test between them)
    and inference time (same batches, `timing_repeats` interleaved repetitions, medians);
    with `retune_steps > 0` re-tunes the prompt on the pruned model starting from the run's
    prompt (the paper's setting; run in `out/retuned`). Writes the pruned model (see
    `save_pruned`) and, last, `prune.json` to `out`.

    Args:
        model: the model, or a function returning it (called once `out` has been accepted).
        max_examples: test examples (`experiments.runner.evaluation_task`; default the run's test set).
    """
    run = run if isinstance(run, Run) else Run.load(run)
    neurons_path = None if isinstance(neurons, SkillNeurons) else str(Path(neurons).resolve())
    if not isinstance(neurons, SkillNeurons):
        neurons = SkillNeurons.load(neurons)
    check_neurons_for_run(run, neurons, None, PruneError)
    check_mlp_units(neurons)
    if retune_steps < 0:
        raise PruneError(f"retune_steps must be >= 0, got {retune_steps}")
    if timing_repeats < 1:
        raise PruneError(f"timing_repeats must be >= 1, got {timing_repeats}")
    if batch_size < 1:
        raise PruneError(f"batch_size must be >= 1, got {batch_size}")
    if max_examples is not None and max_examples < 1:
        raise PruneError(f"max_examples must be >= 1 (or None: the run's test set), got {max_examples}")
    cfg = run.config
    identity = {
        "model": run.model_name,
        "task": run.task_name,
        "run_prompt": tensor_digest(run.prompt.vectors),
        "neurons": tensor_digest(neurons.predictivity),
        "keep": float(keep),
        "layers": None if layers is None else sorted({int(l) for l in layers}),
        "retune_steps": retune_steps,
        "test_examples": max_examples,
        "task_seed": cfg.task_seed,
    }
    out = claim_dir(out, "prune", identity, legacy=_legacy_identity)
    model = resolve_model(model)
    spec = model_spec(model)
    check_neurons_for_run(run, neurons, spec.name, PruneError)
    check_prune_arguments(model, neurons, keep, layers)
    device = compat.model_device(model)
    es = EvalSet.of_run(run, model, max_examples)  # refuses bad data before the pruning work

    t0 = time.perf_counter()
    pruned = prune_model(model, neurons, keep, layers)
    prune_seconds = time.perf_counter() - t0
    pruning = pruning_of(pruned)
    assert pruning is not None  # a model prune_model made
    conditions = [
        Condition("before", {}, run.prompt, None, "before"),
        Condition("after", {}, run.prompt, None, "after"),
    ]
    # the pruned model is fixed by the neurons, keep and layers, which the directory's identity holds
    variants = {"before": spec.name, "after": f"{spec.name} pruned to {keep:g} of layers {pruning.layers}"}
    results = run_conditions(
        conditions,
        {"before": model, "after": pruned},
        {"test": es},
        out=out,
        variants=variants,
        batch_size=batch_size,
        progress=progress,
        desc="prune: accuracy",
    )

    prompt = run.prompt.to(device)
    layout = layout_for(model, prompt.length, cfg.max_input_tokens, cfg.padding_side)
    batches = [(idx, batch.to(device)) for idx, batch in iterate_batches(layout, es.task, "test", batch_size)]
    t0 = time.perf_counter()
    seconds = time_inference(
        {"before": model, "after": pruned}, batches, es.verbalizer, prompt, timing_repeats, progress
    )
    timing_seconds = time.perf_counter() - t0
    before, after = statistics.median(seconds["before"]), statistics.median(seconds["after"])
    params_before, params_after = count_parameters(model), count_parameters(pruned)
    extra: dict[str, Any] = {}
    if retune_steps > 0:
        retune_cfg = TuneConfig.from_dict(
            {**asdict(cfg), "steps": retune_steps, "eval_every": min(cfg.eval_every, retune_steps)}
        )
        t0 = time.perf_counter()
        retuned = tune(
            pruned,
            run.load_task(),
            out / "retuned",
            retune_cfg,
            progress=progress,
            evaluate_test=False,
            init_prompt=run.prompt,
        )
        again = run_conditions(
            [Condition("retuned", {}, retuned.prompt, None, "after")],
            {"after": pruned},
            {"test": es},
            out=out,
            variants=variants,
            batch_size=batch_size,
            progress=False,
        )
        extra = dict(
            accuracy_retuned=again["retuned"].accuracy,
            retuned_dev_accuracy=retuned.metrics.get("dev_accuracy"),
            retuned_run=str(retuned.path),
            retune_seconds=time.perf_counter() - t0,
        )
    a, b = results["before"], results["after"]
    result = PruneResult(
        model=spec.name,
        task=run.task_name,
        run=str(run.path),
        kept_fraction=float(keep),
        layers=pruning.layers,
        params_before=params_before,
        params_after=params_after,
        n_test=a.n,
        accuracy_before=a.accuracy,
        accuracy_after=b.accuracy,
        neurons=neurons_path,
        neuron_runs=list(neurons.runs),
        device=str(device),
        kept_per_layer={str(l): len(pruning.kept[l]) for l in pruning.layers},
        d_mlp=spec.d_mlp,
        params_fraction=params_after / params_before,
        run_test_accuracy=run.metrics.get("test_accuracy"),
        mcnemar_p=mcnemar_exact([int(c) for c in a.correct], [int(c) for c in b.correct])["p_value"],
        speedup=before / after if after > 0 else None,
        median_seconds_before=before,
        median_seconds_after=after,
        seconds_before=seconds["before"],
        seconds_after=seconds["after"],
        timing_repeats=timing_repeats,
        batch_size=batch_size,
        prune_seconds=prune_seconds,
        timing_seconds=timing_seconds,
        retune_steps=retune_steps,
        settings=identity,
        **extra,
    )
    if distributed.is_main():  # under torchrun rank 0 writes the result
        save_pruned(pruned, out)  # with prune.json last: a directory with prune.json is complete
        result.save(out)
    log.info(
        "pruned %s/%s: %.1f%% of parameters, accuracy %.3f -> %.3f, speedup %.2fx",
        spec.name,
        run.task_name,
        100 * result.params_fraction,
        result.accuracy_before,
        result.accuracy_after,
        result.speedup or float("nan"),
    )
    return result


def _legacy_identity(out: Path) -> dict[str, Any] | None:
    """A pruned-model directory of an older tl_skill: what its prune.json records."""
    if not (out / PRUNE_JSON).exists():
        return None
    prev = read_json(out / PRUNE_JSON, "prune file")
    return {
        "model": prev.get("model"),
        "task": prev.get("task"),
        "keep": prev.get("kept_fraction"),
        "retune_steps": prev.get("retune_steps"),
    }
