"""The skill-vs-random ablation experiment (method §6), and the one verdict rule.

For each fraction f the top `int(f * d_mlp)` skill neurons of each layer are
perturbed; the control perturbs as many random neurons per layer, once per
seed (mask seed s, noise seed s); the skill neurons' noise uses the first
seed. Every condition is evaluated on the same examples (`runner`), so the
paired test compares predictions example by example.

The verdict rule, used by `tl-skill ablate`, the demo report and the origin
study alike (`verdict`): at a fraction, perturbing skill neurons hurts more
than perturbing random ones when the 95% CI of the paired bootstrap of skill
minus random accuracy (test examples and random seeds resampled together)
lies entirely below 0. It holds when that is so at every fraction, partly at
some; it is inconclusive when the unperturbed model does not beat the
majority class.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tl_skill import distributed
from tl_skill.compat import HookedRootModule
from tl_skill.data.tasks import Task
from tl_skill.errors import AblationError
from tl_skill.experiments.results import RunResult
from tl_skill.experiments.runner import (
    Condition,
    ConditionResult,
    EvalSet,
    ModelOrLoader,
    resolve_model,
    run_conditions,
)
from tl_skill.files import claim_dir, read_json, rolls_back_claims, tensor_digest
from tl_skill.models import model_spec
from tl_skill.neurons import SELECTIONS, SkillNeurons, check_neurons_for_run, random_mask_like
from tl_skill.perturb import MODES, Perturbation, PerturbFn
from tl_skill.stats import mcnemar_exact, paired_bootstrap
from tl_skill.tuning.loop import majority_accuracy
from tl_skill.tuning.prompt import SoftPrompt
from tl_skill.tuning.runs import Run
from tl_skill.units import UnitSource, check_same_units, source_for_neurons

log = logging.getLogger(__name__)

ABLATION_JSON = "ablation.json"
ABLATION_PNG = "ablation.png"
DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2)
PAIRED_TEST = (
    "paired bootstrap over test examples and random seeds (2,000 replicates): 95% CI of "
    "skill minus random accuracy; exact McNemar test of skill vs each random seed"
)
RULE = "the 95% CI of the paired skill minus random accuracy lies below 0"


# ----------------------------------------------------------------------------- conditions and rows
def mode_name(mode) -> str:
    return mode if isinstance(mode, str) else f"fn:{getattr(mode, '__qualname__', type(mode).__name__)}"


def condition_name(kind: str, fraction: float | None = None, seed: int | None = None) -> str:
    return kind if kind == "clean" else f"{kind}|{fraction!r}|{seed}"


def perturbation_conditions(
    masks: Mapping[float, torch.Tensor],
    seeds: Sequence[int],
    mode,
    *,
    std: float,
    relative: bool,
    skill: SkillNeurons,
    prompt=None,
    variant: str = "model",
    eval_set: str = "test",
    units: UnitSource | None = None,
) -> list[Condition]:
    """Clean, then per fraction: skill neurons (seed `seeds[0]`) and random neurons once per seed.

    `units`: the source to perturb (default: the skill neurons' own, `SkillNeurons.units`).
    """
    noise = mode == "noise"

    def cond(kind: str, f: float | None, s: int | None) -> Condition:
        if kind == "clean" or f is None or s is None:
            return Condition("clean", {"perturbation": None}, prompt, None, variant, eval_set)
        mask = masks[f] if kind == "skill" else random_mask_like(masks[f], s)

        def hooks(model: HookedRootModule, mask=mask, s=s):
            return Perturbation(
                model, mask, mode, std=std, relative=relative, seed=s, skill=skill, units=units
            ).fwd_hooks()

        definition = {
            "perturbation": {
                "kind": kind,
                "fraction": f,
                "seed": s,
                "mode": mode_name(mode),
                "std": std if noise else None,
                "relative": relative if noise else None,
                "neurons": tensor_digest(mask),
                "rows": list(skill.layers),
            }
        }
        return Condition(condition_name(kind, f, s), definition, prompt, hooks, variant, eval_set)

    out = [cond("clean", None, None)]
    for f in masks:
        out += [cond("skill", f, seeds[0])] + [cond("random", f, s) for s in seeds]
    return out


def paired_comparison(skill: Sequence[int], randoms: Sequence[Sequence[int]], seed: int = 0) -> dict[str, Any]:
    """Skill vs random perturbation on the same examples: bootstrap CI and McNemar p-values (see PAIRED_TEST)."""
    boot = paired_bootstrap(skill, randoms, seed=seed)
    return {
        **boot,
        "mcnemar_p": [mcnemar_exact(skill, r)["p_value"] for r in randoms],
        "skill_hurts_more": boot["ci_high"] < 0,
        "test": PAIRED_TEST,
    }


def _correct(e: ConditionResult | Mapping) -> list[int]:
    bits = e.correct if isinstance(e, ConditionResult) else e["correct"]
    return [int(c) for c in bits]


def perturbation_rows(
    results: Mapping[str, ConditionResult],
    fractions: Sequence[float],
    seeds: Sequence[int],
    counts: Mapping[float, list[int]],
    mode: str,
) -> list[dict[str, Any]]:
    """One row per fraction: clean, skill and random accuracies and the paired test."""
    clean = results["clean"].accuracy if "clean" in results else None
    rows = []
    for f in fractions:
        skill = results.get(condition_name("skill", f, seeds[0]))
        rand = [results[k] for k in (condition_name("random", f, s) for s in seeds) if k in results]
        accs = [r.accuracy for r in rand]
        paired = None
        if skill is not None and len(rand) == len(seeds):
            paired = paired_comparison(_correct(skill), [_correct(r) for r in rand])
        rows.append(
            {
                "mode": mode,
                "fraction": f,
                "n_neurons": int(sum(counts[f])),
                "layer_counts": list(counts[f]),
                "clean_accuracy": clean,
                "skill_accuracy": skill.accuracy if skill is not None else None,
                "random_accuracy": float(np.mean(accs)) if accs else None,
                "random_accuracy_std": float(np.std(accs)) if accs else None,
                "random_accuracies": accs,
                "paired": paired,
            }
        )
    return rows


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What `verdict` concludes: `status` is holds / partly / does not hold / inconclusive / no paired test."""

    status: str
    fractions: list[float]  # where skill neurons hurt more
    sentence: str

    @property
    def holds(self) -> bool:
        return self.status == "holds"


def verdict(rows: Sequence[Mapping], majority: float | None = None) -> Verdict:
    """Whether perturbing skill neurons hurts more than random ones (the module docstring's rule)."""
    if not rows:
        return Verdict("no paired test", [], "no perturbation results")
    if any(r.get("paired") is None for r in rows):
        return Verdict(
            "no paired test",
            [],
            "no paired test for these results (rerun the experiment to record per-example predictions)",
        )
    clean = rows[0].get("clean_accuracy")
    if majority is not None and clean is not None and clean <= majority:
        return Verdict(
            "inconclusive",
            [],
            f"Inconclusive: the unperturbed accuracy {clean:.3f} does not beat the majority class ({majority:.3f}).",
        )
    worse = [r for r in rows if r["paired"]["skill_hurts_more"]]
    detail = "; ".join(
        f"{r['fraction']:.0%}: skill {r['skill_accuracy'] - r['clean_accuracy']:+.3f} vs random "
        f"{r['random_accuracy'] - r['clean_accuracy']:+.3f}, difference {r['paired']['difference']:+.3f} "
        f"[{r['paired']['ci_low']:+.3f}, {r['paired']['ci_high']:+.3f}], McNemar p "
        + "/".join(f"{p:.2g}" for p in r["paired"]["mcnemar_p"])
        for r in rows
    )
    if len(worse) == len(rows):
        status = "holds"
        head = (
            "Holds: perturbing skill neurons lowers accuracy more than perturbing as many random neurons, "
            "at every fraction"
        )
    elif worse:
        status = "partly"
        which = ", ".join(f"{r['fraction']:.0%}" for r in worse)
        head = (
            f"Holds partly: skill neurons hurt more than random ones at {len(worse)} of {len(rows)} fractions ({which})"
        )
    else:
        status = "does not hold"
        head = "Does not hold here: perturbing skill neurons hurts no more than perturbing random neurons"
    sentence = f"{head} (rule: {RULE}; accuracy change from clean, paired difference [95% CI]: {detail})."
    return Verdict(status, [r["fraction"] for r in worse], sentence)


# ----------------------------------------------------------------------------- the experiment
@dataclasses.dataclass(frozen=True, repr=False)
class AblationResult(RunResult):
    """What `ablation_experiment` measured; saved as `ablation.json`."""

    FILE = ABLATION_JSON

    mode: str
    fractions: list[float]
    seeds: list[int]
    n_examples: int
    rows: list[dict[str, Any]]
    neurons_runs: list[str] = dataclasses.field(default_factory=list)
    split: str = "test"
    run_test_accuracy: float | None = None
    majority_accuracy: float | None = None
    per_layer: bool = True
    status: str = "done"
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    wall_seconds: float = 0.0
    eval_seconds: float = 0.0
    evaluations: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def verdict(self) -> Verdict:
        return verdict(self.rows, self.majority_accuracy)

    COLUMNS = (
        "mode",
        "fraction",
        "n_neurons",
        "clean_accuracy",
        "skill_accuracy",
        "random_accuracy",
        "random_accuracy_std",
        "difference",
        "ci_low",
        "ci_high",
        "mcnemar_p_max",
        "skill_hurts_more",
        "skill_share_lost",
        "random_share_lost",
    )

    def share_lost(self, accuracy: float | None) -> float | None:
        """The fraction of the above-chance accuracy lost, (clean - perturbed) / (clean - majority class);
        None when the clean accuracy does not beat the majority class (or either is unknown)."""
        clean = self.rows[0].get("clean_accuracy") if self.rows else None
        if accuracy is None or clean is None or self.majority_accuracy is None or clean <= self.majority_accuracy:
            return None
        return (clean - accuracy) / (clean - self.majority_accuracy)

    def to_dataframe(self) -> Any:
        """One row per fraction (`COLUMNS`): accuracies clean, with the skill neurons perturbed and with as many
        random neurons (mean and std over seeds); the paired skill-minus-random `difference` with its 95%
        bootstrap CI (`ci_low`, `ci_high`), the largest McNemar p over the random seeds, whether the CI
        lies below 0 (`skill_hurts_more`), and the share of the above-chance accuracy each side loses
        (`share_lost`)."""
        import pandas as pd

        out = []
        for r in self.rows:
            p = r.get("paired") or {}
            out.append(
                {
                    **{k: r.get(k) for k in self.COLUMNS[:7]},
                    "difference": p.get("difference"),
                    "ci_low": p.get("ci_low"),
                    "ci_high": p.get("ci_high"),
                    "mcnemar_p_max": max(p["mcnemar_p"]) if p.get("mcnemar_p") else None,
                    "skill_hurts_more": p.get("skill_hurts_more"),
                    "skill_share_lost": self.share_lost(r.get("skill_accuracy")),
                    "random_share_lost": self.share_lost(r.get("random_accuracy")),
                }
            )
        return pd.DataFrame(out, columns=list(self.COLUMNS))

    def facts(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "task": self.task,
            "mode": self.mode,
            "examples": self.n_examples,
            "verdict": self.verdict().status,
        }

    def check(self) -> str | None:
        number = (int, float)
        if not isinstance(self.rows, list):
            return "'rows' must be a list"
        for i, row in enumerate(self.rows):
            if not isinstance(row, dict) or not isinstance(row.get("fraction"), number):
                return f"row {i} has no numeric 'fraction'"
            for key in ("clean_accuracy", "skill_accuracy", "random_accuracy", "random_accuracy_std"):
                if row.get(key) is not None and not isinstance(row[key], number):
                    return f"row {i}: {key!r} must be a number, found {row[key]!r}"
            paired = row.get("paired")
            if paired is not None and not (
                isinstance(paired, dict)
                and all(isinstance(paired.get(k), number) for k in ("difference", "ci_low", "ci_high"))
            ):
                return f"row {i}: 'paired' must hold numeric difference, ci_low and ci_high"
        if self.majority_accuracy is not None and not isinstance(self.majority_accuracy, number):
            return f"'majority_accuracy' must be a number, found {self.majority_accuracy!r}"
        return None


def check_fractions_seeds(
    fractions: Iterable[float], seeds: int | Sequence[int], error=AblationError
) -> tuple[list[float], list[int]]:
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise error(f"fractions must be in (0, 1], got {fractions}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise error(f"need at least one seed and no repeats, got {seeds!r}")
    return sorted(set(fractions)), seed_list


@dataclasses.dataclass(frozen=True)
class AblationConfig:
    """Settings of `ablation_experiment` (checked when made).

    Args:
        mode: "noise", "zero", "mean", or a function `fn(x [batch, pos, k], layer, neurons [k]) -> x'`.
        fractions: per-layer fractions of units perturbed, each in (0, 1].
        seeds: number of random-control seeds (0..n-1), or the seeds themselves.
        std: noise std (absolute, or times each unit's std with `relative`).
        layers: perturb only these layers (default: every layer the skill neurons cover).
        max_examples: test examples (`experiments.runner.evaluation_task`; default the run's own test set).
        batch_size: examples per forward pass (no effect on the result).
        per_layer: rank within each layer (the reference) or globally.
        selection: for a multi-class task, "score" ranks by the aggregated predictivity;
            "round_robin" takes the next best unit of each binary subtask in turn (the reference's
            rule; `SkillNeurons.select`). The two agree on a binary task.
        units: the unit source to perturb (default: the one the skill neurons were found on;
            another is accepted only for the same units, e.g. an SAE directory that moved).
    """

    mode: str | PerturbFn = "noise"
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    seeds: tuple[int, ...] = (0, 1, 2)
    std: float = 0.1
    relative: bool = False
    layers: tuple[int, ...] | None = None
    max_examples: int | None = None
    batch_size: int = 32
    per_layer: bool = True
    units: Any = None
    selection: str = "score"

    def __post_init__(self) -> None:
        if self.selection not in SELECTIONS:
            raise AblationError(f"unknown selection {self.selection!r}; choose one of {SELECTIONS}")
        if not callable(self.mode) and self.mode not in MODES:
            raise AblationError(f"unknown perturbation mode {self.mode!r}; choose one of {MODES} or pass a function")
        fractions, seed_list = check_fractions_seeds(self.fractions, self.seeds)
        object.__setattr__(self, "fractions", tuple(fractions))
        object.__setattr__(self, "seeds", tuple(seed_list))
        if self.mode == "noise" and not (np.isfinite(self.std) and self.std > 0):
            raise AblationError(f"noise std must be finite and > 0, got {self.std}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise AblationError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_examples is not None and (not isinstance(self.max_examples, int) or self.max_examples < 1):
            raise AblationError(f"max_examples must be >= 1, got {self.max_examples}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(layer) for layer in self.layers})))

    @property
    def mode_name(self) -> str:
        return mode_name(self.mode)

    def identity(self, run: Run, neurons: SkillNeurons) -> dict[str, Any]:
        """What decides the result's rows for `run` and `neurons` (fractions and seeds only add rows)."""
        noise = self.mode == "noise"
        cfg = run.config
        units = self.units
        return {
            "model": run.model_name,
            "task": run.task_name,
            "run_prompt": tensor_digest(run.prompt.vectors),
            "neurons": tensor_digest(neurons.predictivity),
            "neuron_layers": list(neurons.layers),
            "mode": self.mode_name,
            "std": float(self.std) if noise else None,
            "relative": bool(self.relative) if noise else None,
            "layers": list(neurons.layers) if self.layers is None else list(self.layers),
            "per_layer": self.per_layer,
            **({} if self.selection == "score" else {"selection": self.selection}),
            "test_examples": self.max_examples,
            "task_seed": cfg.task_seed,
            "max_input_tokens": cfg.max_input_tokens,
            "padding_side": cfg.padding_side,
            **(
                {}
                if neurons.units == "mlp" and units in (None, "mlp")
                else {"units": units.name if isinstance(units, UnitSource) else (units or neurons.units)}
            ),
        }


def check_masks_select(
    masks: Mapping[float, torch.Tensor], width: int, per_layer: bool, error: type[Exception]
) -> None:
    """Refuse a fraction that selects no unit: a verdict from perturbing nothing would say nothing."""
    empty = [f for f, m in masks.items() if not bool(m.any())]
    if empty:
        total = width if per_layer else masks[empty[0]].numel()
        where = f"{width} units per layer" if per_layer else f"{total} units in all"
        raise error(
            f"fraction(s) {empty} select no unit ({where}: int(fraction x {total}) is 0); "
            f"use fractions of at least {1 / total:.2g}"
        )


def ablation_config(config: AblationConfig | None, settings: Mapping[str, Any]) -> AblationConfig:
    """`config`, or an `AblationConfig` of the keyword settings (one of the two)."""
    if config is not None and settings:
        raise AblationError(f"give an AblationConfig or settings ({', '.join(settings)}), not both")
    if config is not None:
        return config
    known = {f.name for f in dataclasses.fields(AblationConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown ablation setting(s) {unknown}; AblationConfig has {sorted(known)}")
    return AblationConfig(**settings)


@rolls_back_claims
def ablation_experiment(
    model: ModelOrLoader,
    run: Run | SoftPrompt | str | Path,
    neurons: SkillNeurons | str | Path,
    out: str | Path | None = None,
    config: AblationConfig | None = None,
    *,
    task: Task | None = None,
    progress: bool = True,
    **settings: Any,
) -> AblationResult:
    """Test accuracy of the prompted model with skill neurons vs random neurons perturbed (module docstring).

    Args:
        model: the model, or a function returning it (called once `out` has been accepted).
        run: the prompt-tuning run whose prompt and task are used; or a `SoftPrompt` in memory,
            with `task` (layout and test cap of `TuneConfig()`; `Run.in_memory` for others).
        neurons: skill neurons of the same model and task.
        out: directory for `ablation.json` and each finished condition (`conditions/`); a rerun
            with the same settings skips what is done (more fractions or seeds add conditions),
            other settings are refused before any work. `viz.plots.plot_ablation` draws it.
        config: an `AblationConfig`, or its fields as keywords (`mode="zero", fractions=(0.01,)`).
    """
    t_start = time.perf_counter()
    cfg_a = ablation_config(config, settings)
    neurons = neurons if isinstance(neurons, SkillNeurons) else SkillNeurons.load(neurons)
    if isinstance(run, SoftPrompt):
        if task is None:
            raise AblationError(
                "a prompt in memory needs its task: ablation_experiment(model, prompt, neurons, task=task)"
            )
        run = Run.in_memory(run, task, neurons.model)
    elif task is not None:
        raise AblationError("task= goes with a prompt in memory; a run brings its own task")
    run = run if isinstance(run, Run) else Run.load(run)
    # --- validate everything before any evaluation
    check_neurons_for_run(run, neurons, None, AblationError)
    check_same_units(neurons.units, cfg_a.units, AblationError)
    layer_list = list(neurons.layers) if cfg_a.layers is None else list(cfg_a.layers)
    bad = [l for l in layer_list if l not in neurons.layers]
    if bad:
        raise AblationError(f"layers {bad} hold no skill neurons: the skill neurons cover layers {neurons.layers}")
    row_keep = torch.tensor([l in layer_list for l in neurons.layers])
    fractions, seed_list = list(cfg_a.fractions), list(cfg_a.seeds)
    masks = {
        f: neurons.select(fraction=f, per_layer=cfg_a.per_layer, multiclass=cfg_a.selection) & row_keep[:, None]
        for f in fractions
    }
    check_masks_select(masks, neurons.d_mlp, cfg_a.per_layer, AblationError)
    identity = cfg_a.identity(run, neurons)
    if out is not None:
        out = claim_dir(out, "ablation", identity, legacy=_legacy_identity)
    model = resolve_model(model)
    spec = model_spec(model)
    check_neurons_for_run(run, neurons, spec.name, AblationError)
    source = source_for_neurons(model, neurons, cfg_a.units, AblationError)

    task = run.load_task()
    es = EvalSet.of_run(run, model, cfg_a.max_examples, task)
    counts = {f: [int(c) for c in m.sum(1)] for f, m in masks.items()}
    name = cfg_a.mode_name
    conditions = perturbation_conditions(
        masks,
        seed_list,
        cfg_a.mode,
        std=cfg_a.std,
        relative=cfg_a.relative,
        skill=neurons,
        prompt=run.prompt,
        units=source,
    )
    results = run_conditions(
        conditions,
        {"model": model},
        {"test": es},
        out=out,
        variants={"model": spec.name},
        batch_size=cfg_a.batch_size,
        progress=progress,
        desc=f"ablate {run.task_name} ({name})",
    )
    result = AblationResult(
        model=spec.name,
        task=run.task_name,
        run=str(run.path),
        mode=name,
        fractions=fractions,
        seeds=seed_list,
        n_examples=len(es.task["test"]),
        rows=perturbation_rows(results, fractions, seed_list, counts, name),
        neurons_runs=list(neurons.runs),
        run_test_accuracy=run.metrics.get("test_accuracy"),
        majority_accuracy=majority_accuracy(es.task, "test"),
        per_layer=cfg_a.per_layer,
        settings={**identity, "batch_size": cfg_a.batch_size},
        wall_seconds=time.perf_counter() - t_start,
        eval_seconds=sum(r.seconds for r in results.values()),
        evaluations=[
            {"key": r.name, "accuracy": r.accuracy, "seconds": r.seconds, "correct": r.correct, "file": r.key}
            for r in results.values()
        ],
    )
    if out is not None and distributed.is_main():  # under torchrun rank 0 writes the result
        result.save(out)
    return result


def _legacy_identity(out: Path) -> dict[str, Any] | None:
    """An ablation.json of an older tl_skill: its settings, without the fractions and seeds it did not record."""
    if not (out / ABLATION_JSON).exists():
        return None
    settings = read_json(out / ABLATION_JSON, "ablation file").get("settings") or {}
    return {k: v for k, v in settings.items() if k != "batch_size"}
