"""Where skill neurons come from (method §9): pre-training controls and other tuning methods.

`origin_study` runs four parts on one model and task and writes `origin.json`
(one section per part, each with its numbers, a `claim_holds` boolean and a
one-line `statement`) and figures:

- `random_weights`: the same architecture with randomly initialised weights
  (same shapes, same tokenizer) is prompt-tuned and probed like the
  pretrained model. The paper's claim: its neurons are far less predictive.
- `lora` and `bitfit`: the model is tuned without a prompt (input, prediction
  at the last position, cross-entropy over the verbalizer logits) by methods
  that keep every MLP weight frozen, and the prompt-tuning skill neurons are
  then perturbed in the tuned model, against random neurons. The claim: the
  skill neurons found with prompt tuning matter for these models too.
  LoRA adapts the attention projections (q, k, v, o) only. BitFit trains the
  bias terms outside the MLP (attention and normalisation); the MLP biases
  are neuron weights and stay frozen, unlike the original BitFit. Where the
  architecture has no such biases (Llama, SmolLM2) the normalisation weights
  are trained instead, and the section says so.
- `label_words`: a second prompt tuned with other label words (" bad"/" good"
  instead of " negative"/" positive"); its predictivity is compared with the
  original's over all neurons. The claim: skill neurons do not depend on the
  label words.

The model variants (random copy, LoRA, BitFit) are built by `tl_skill.variants`
and trained by the same loop as prompts (`tuning.loop.train_loop`); the model passed
in is never changed. The perturbations are conditions of the runner and the
LoRA/BitFit verdicts use the one rule of `experiments.ablation.verdict`.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tl_skill import distributed
from tl_skill.compat import HookedRootModule
from tl_skill.data.sources import load_task
from tl_skill.data.tasks import Task, subsample
from tl_skill.errors import FileFormatError, OriginError
from tl_skill.experiments.ablation import (
    check_fractions_seeds,
    check_masks_select,
    perturbation_conditions,
    perturbation_rows,
    verdict,
)
from tl_skill.experiments.comparisons import compare_predictivity, predictivity_summary
from tl_skill.experiments.results import TaskResult, scalars
from tl_skill.experiments.runner import Condition, EvalSet, run_conditions
from tl_skill.files import claim_dir, jsonable, read_json, rolls_back_claims, tensor_digest
from tl_skill.find import load_or_find
from tl_skill.models import load_model, model_spec
from tl_skill.neurons import SkillNeurons
from tl_skill.perturb import MODES
from tl_skill.tuning.loop import majority_accuracy
from tl_skill.tuning.prompt import Verbalizer
from tl_skill.tuning.runs import Run, TuneConfig, tune
from tl_skill.variants import (
    BITFIT_NORMS,
    TRAINED_FILE,
    FinetuneConfig,
    add_lora,
    bitfit_parameters,
    copy_model,
    finetune,
    load_trained,
    mlp_unchanged,
    random_weights_model,
    save_trained,
)

log = logging.getLogger(__name__)

PARTS = ("random_weights", "lora", "bitfit", "label_words")
ORIGIN_JSON = "origin.json"
FIG_RANDOM = "predictivity_random_vs_pretrained.png"
FIG_LABEL_WORDS = "predictivity_label_words.png"
DEFAULT_FRACTIONS = (0.01, 0.05, 0.1, 0.2)
_ALT_WORDS = {
    "negative": "bad",
    "positive": "good",
    "bad": "negative",
    "good": "positive",
    "objective": "fact",
    "subjective": "opinion",
    "no": "false",
    "yes": "true",
}


def default_alt_label_words(label_words: Sequence[str]) -> list[str]:
    """Other label words for the label-word control: " bad"/" good" for " negative"/" positive", ..."""
    plain = [w.strip().lower() for w in label_words]
    if all(w in _ALT_WORDS for w in plain):
        return [" " + _ALT_WORDS[w] for w in plain]
    if len(plain) == 2:
        return [" no", " yes"]
    raise OriginError(
        f"no default alternative for the label words {list(label_words)}; give alt_label_words (one word per class)"
    )


# ----------------------------------------------------------------------------- the study
def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def _free_memory() -> None:
    """Give back the memory of a model copy the caller has just dropped."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclasses.dataclass(frozen=True)
class OriginConfig:
    """Settings of `origin_study` (checked when made).

    Args:
        parts: any of `PARTS`.
        tune_config: prompt tuning when the study tunes (default `TuneConfig()`); the
            random-weights and label-word prompts use the source run's config, except
            `prompt_steps` and the test cap.
        prompt_steps: tuning steps of the random-weights and label-word prompts (None: the
            source run's). The default, 150, keeps the study within an hour on 2 CPU cores.
        steps: LoRA and BitFit training steps (`FinetuneConfig`; the train/dev/test caps are the run's).
        lora_lr: LoRA's learning rate.
        bitfit_lr: BitFit's learning rate.
        lora_rank: LoRA's rank.
        lora_alpha: LoRA's scale.
        train_batch_size: LoRA and BitFit batch size.
        eval_every: LoRA and BitFit dev evaluations every this many steps.
        fractions: the perturbed fractions per layer (as in `ablation_experiment`).
        seeds: random-control seeds (a count, or the seeds).
        mode: "noise", "zero" or "mean".
        std: noise std.
        relative: noise relative to each neuron's std.
        max_test_examples: test examples of the perturbations and extra prompts (None: the run's cap).
        alt_label_words: the label-word control's words (default `default_alt_label_words`).
        random_seed: initialisation seed of the random-weights model.
        find_train_examples: `find_skill_neurons` train cap for the neurons the study finds itself
            (given neurons keep their own).
        find_eval_examples: its evaluation cap.
        top_fraction: the per-layer top fraction compared (at least one neuron per layer).
        min_spearman: the label-word claim needs Spearman >= this ...
        min_overlap: ... and a top-fraction overlap >= this.
        batch_size: evaluation and recording batch size (no effect on the result).
    """

    parts: tuple[str, ...] = PARTS
    tune_config: TuneConfig | None = None
    steps: int = 200
    lora_lr: float = 1e-3
    bitfit_lr: float = 1e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    train_batch_size: int = 16
    eval_every: int = 50
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    seeds: tuple[int, ...] = (0, 1)
    mode: str = "noise"
    std: float = 0.1
    relative: bool = False
    max_test_examples: int | None = 300
    prompt_steps: int | None = 150
    alt_label_words: tuple[str, ...] | None = None
    random_seed: int = 1
    find_train_examples: int | None = 2000
    find_eval_examples: int | None = None
    top_fraction: float = 0.01
    min_spearman: float = 0.5
    min_overlap: float = 0.3
    batch_size: int = 32

    def __post_init__(self) -> None:
        parts = tuple(dict.fromkeys([self.parts] if isinstance(self.parts, str) else self.parts))
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise OriginError(f"unknown part(s) {bad}; choose from {list(PARTS)}" if bad else "no part to run")
        object.__setattr__(self, "parts", parts)
        fractions, seed_list = check_fractions_seeds(self.fractions, self.seeds, OriginError)
        object.__setattr__(self, "fractions", tuple(fractions))
        object.__setattr__(self, "seeds", tuple(seed_list))
        if self.mode not in MODES:
            raise OriginError(f"unknown perturbation mode {self.mode!r}; choose one of {MODES}")
        if self.mode == "noise" and not (math.isfinite(self.std) and self.std > 0):
            raise OriginError(f"noise std must be > 0, got {self.std}")
        if not 0 < self.top_fraction <= 1:
            raise OriginError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
        if self.max_test_examples is not None and self.max_test_examples < 1:
            raise OriginError(f"max_test_examples must be >= 1, got {self.max_test_examples}")
        if self.prompt_steps is not None and self.prompt_steps < 1:
            raise OriginError(f"prompt_steps must be >= 1, got {self.prompt_steps}")
        if "lora" in parts and self.lora_rank < 1:
            raise OriginError(f"LoRA rank must be >= 1, got {self.lora_rank}")
        for name in ("steps", "train_batch_size", "eval_every", "batch_size"):
            if getattr(self, name) < 1:
                raise OriginError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lora_lr", "bitfit_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise OriginError(f"{name} must be finite and > 0, got {value}")
        words = self.alt_label_words
        if isinstance(words, str):
            words = tuple(words.split(","))
        if words is not None:
            object.__setattr__(self, "alt_label_words", tuple(w if w.startswith(" ") else " " + w for w in words))

    def finetune_configs(self) -> dict[str, FinetuneConfig]:
        """The LoRA and BitFit training settings."""
        return {
            method: FinetuneConfig(
                steps=self.steps,
                lr=lr,
                batch_size=self.train_batch_size,
                eval_every=self.eval_every,
                eval_batch_size=self.batch_size,
            )
            for method, lr in (("lora", self.lora_lr), ("bitfit", self.bitfit_lr))
        }


@rolls_back_claims
def origin_study(
    model_name: str,
    task_name: str | None,
    out: str | Path,
    config: OriginConfig | None = None,
    *,
    run_dir: str | Path | None = None,
    neurons_dir: str | Path | None = None,
    model: HookedRootModule | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
    **settings: Any,
) -> OriginResult:
    """Where skill neurons come from: the four parts of method §9 on one model and task (module docstring).

    Args:
        model_name: the model to study; with `run_dir`, it must be the run's.
        task_name: the task (None: the run's task).
        out: output directory. `origin.json` is rewritten after every part (and
            every perturbation evaluation); a rerun with the same settings skips
            finished parts and evaluations, and resumes interrupted prompt tuning.
        run_dir: an existing prompt-tuning run (its prompt, task split and config are
            reused); default: tune one in `out/prompt` with `tune_config`.
        neurons_dir: its skill neurons; default: found in `out/neurons`. Without
            `run_dir`, the first run they were found from is used.
        config: an `OriginConfig`, or its fields as keywords (`parts=("lora",), steps=50`).
        model: an already loaded model named `model_name` (not changed).
        device: where `model_name` is loaded when `model` is not given.
        dtype: its dtype.
        progress: progress bars.
        **settings: `OriginConfig` fields, when no `config` is given.

    Returns:
        An `OriginResult` (saved as `origin.json`).
    """
    t_start = time.perf_counter()
    out = Path(out)
    oc = origin_config(config, settings)
    parts, fractions, seed_list = list(oc.parts), list(oc.fractions), list(oc.seeds)
    mode, std, relative, top_fraction = oc.mode, oc.std, oc.relative, oc.top_fraction
    tune_config, prompt_steps, batch_size = oc.tune_config, oc.prompt_steps, oc.batch_size
    ft = oc.finetune_configs()

    # --- the source run and its skill neurons (validated before anything long)
    given_neurons = SkillNeurons.load(neurons_dir) if neurons_dir is not None else None
    if given_neurons is not None and given_neurons.units != "mlp":
        raise OriginError(
            f"the skill units in {neurons_dir} were found on {given_neurons.units!r} units; the origin study compares "
            "MLP neurons (the random-weights model's are found as neurons): use neurons found with --units mlp"
        )
    if given_neurons is not None:  # every fraction must perturb something
        check_masks_select(
            {f: given_neurons.select(fraction=f) for f in oc.fractions}, given_neurons.d_mlp, True, OriginError
        )
    if run_dir is None and given_neurons is not None:
        run_dir = given_neurons.runs[0]
    run = Run.load(run_dir) if run_dir is not None else None
    if run is not None:
        if run.model_name != model_name:
            raise OriginError(f"the run {run.path} was tuned on {run.model_name!r}, not {model_name!r}")
        if task_name is not None and run.task_name != task_name:
            raise OriginError(f"the run {run.path} is for task {run.task_name!r}, not {task_name!r}")
        task_name = run.task_name
    if task_name is None:
        raise OriginError("give a task name (or a run directory)")
    if given_neurons is not None:
        if given_neurons.model != model_name or given_neurons.task != task_name:
            raise OriginError(
                f"the skill neurons in {neurons_dir} are for {given_neurons.model!r} / "
                f"{given_neurons.task!r}, not {model_name!r} / {task_name!r}"
            )
        if run is not None and list(given_neurons.label_words) != list(run.info["label_words"]):
            raise OriginError(
                f"label words differ: run {run.info['label_words']}, skill neurons {given_neurons.label_words}"
            )
    if run is not None:
        task = run.load_task()
    else:
        task = load_task(task_name, seed=(tune_config or TuneConfig()).task_seed)
    alt_words = list(oc.alt_label_words) if oc.alt_label_words else None
    if alt_words is not None:
        pass
    elif "label_words" in parts:
        alt_words = default_alt_label_words(task.spec.label_words)
    else:  # not used by this call; recorded so that a later call with the part agrees
        try:
            alt_words = default_alt_label_words(task.spec.label_words)
        except OriginError:
            alt_words = None
    if alt_words is not None:
        if len(alt_words) != task.spec.n_classes:
            raise OriginError(f"{len(alt_words)} alternative label words {alt_words} for {task.spec.n_classes} classes")
        if [w.strip().lower() for w in alt_words] == [w.strip().lower() for w in task.spec.label_words]:
            raise OriginError(f"the alternative label words {alt_words} are the task's own")
    cfg = run.config if run is not None else (tune_config or TuneConfig())
    test_cap = oc.max_test_examples if oc.max_test_examples is not None else cfg.max_test_examples
    if test_cap is not None and cfg.max_test_examples is not None:
        test_cap = min(test_cap, cfg.max_test_examples)
    control_steps = prompt_steps or cfg.steps
    control_cfg = dataclasses.replace(
        cfg, steps=control_steps, eval_every=min(cfg.eval_every, control_steps), max_test_examples=test_cap
    )
    settings = jsonable(
        {
            "model": model_name,
            "task": task_name,
            "task_seed": task.spec.seed,
            "label_words": list(task.spec.label_words),
            "steps": oc.steps,
            "lora_lr": oc.lora_lr,
            "bitfit_lr": oc.bitfit_lr,
            "lora_rank": oc.lora_rank,
            "lora_alpha": oc.lora_alpha,
            "train_batch_size": oc.train_batch_size,
            "eval_every": oc.eval_every,
            "fractions": fractions,
            "seeds": seed_list,
            "mode": mode,
            "std": std if mode == "noise" else None,
            "relative": relative if mode == "noise" else None,
            "test_examples": test_cap,
            "alt_label_words": alt_words,
            "prompt_steps": control_steps,
            "random_seed": oc.random_seed,
            "top_fraction": top_fraction,
            "min_spearman": oc.min_spearman,
            "min_overlap": oc.min_overlap,
        }
    )
    identity = {
        **settings,
        "run_prompt": tensor_digest(run.prompt.vectors) if run is not None else None,
        "neurons": tensor_digest(given_neurons.predictivity) if given_neurons is not None else None,
        "tune_config": asdict(cfg) if run is None else None,
    }
    claim_dir(out, "origin", identity, legacy=_legacy_identity)  # before any long work
    path = out / ORIGIN_JSON
    prev: dict[str, Any] = {}
    if path.exists():
        try:
            prev = read_json(path, "origin file")
        except FileFormatError as exc:  # parts are redone from their own saved runs, neurons and conditions
            log.warning("%s cannot be read (%s): its parts are gathered again", path, exc)

    if model is None:
        model = load_model(model_name, device=device, dtype=dtype)
    elif model_spec(model).name != model_name:
        raise OriginError(f"the model given is {model_spec(model).name!r}, not {model_name!r}")
    if alt_words is not None:
        Verbalizer(model.tokenizer, alt_words)  # refuses words whose first tokens clash

    if run is None:
        run = tune(model, task, out / "prompt", cfg, progress=progress)
    # the controls compare selection-split predictivity: no held-out pass (as in the published runs)
    find_kw: dict[str, Any] = dict(
        max_train_examples=oc.find_train_examples,
        max_eval_examples=oc.find_eval_examples,
        batch_size=batch_size,
        progress=progress,
        confirm_split=None,
    )
    if given_neurons is not None:
        sn = given_neurons
        find_kw.update(
            max_train_examples=sn.meta.get("max_train_examples", oc.find_train_examples),
            max_eval_examples=sn.meta.get("n_eval", oc.find_eval_examples),
            multiclass=sn.meta.get("multiclass", "ovr"),
        )
    else:
        sn = load_or_find(model, [run], out / "neurons", **find_kw)
    # fine-tuning sees the run's train/dev examples; evaluation the runner's subset of its test set
    data = subsample(
        task, {"train": cfg.max_train_examples, "dev": cfg.max_dev_examples, "test": test_cap}, seed=cfg.task_seed
    )
    settings.update(run_prompt=tensor_digest(run.prompt.vectors), neurons=tensor_digest(sn.predictivity))
    # a part not asked for in an earlier call was saved as null: only parts with a result are carried over
    state: dict[str, Any] = {p: prev[p] for p in PARTS if isinstance(prev.get(p), dict)}

    pretrained = predictivity_summary(sn, top_fraction)

    def save(status: str = "running") -> OriginResult:
        fields = {
            "model": model_name,
            "task": task_name,
            "status": status,
            "settings": settings,
            "source": {
                "run": str(run.path),
                "neurons_dir": str(Path(neurons_dir or out / "neurons").resolve()),
                "neurons_runs": sn.runs,
                "prompt_test_accuracy": run.metrics.get("test_accuracy"),
                "zero_shot_accuracy": run.metrics.get("zero_shot_accuracy"),
                "majority_accuracy": majority_accuracy(data, "test"),
                **pretrained,
            },
            **{p: state[p] for p in PARTS if p in state},
            "wall_seconds": time.perf_counter() - t_start,
        }
        result = OriginResult(**jsonable(fields))
        if distributed.is_main():
            result.save(out)
        return result

    save()
    for part in parts:
        if state.get(part, {}).get("status") == "done":
            log.info("origin study: %s already done; skipping", part)
            continue
        t0 = time.perf_counter()
        if part == "random_weights":
            state[part] = _random_weights_part(
                model, task, run, control_cfg, sn, out, pretrained, oc.random_seed, top_fraction, find_kw, progress
            )
        elif part == "label_words":
            assert alt_words is not None  # set above whenever the part is asked for
            state[part] = _label_words_part(
                model,
                task,
                run,
                control_cfg,
                sn,
                out,
                alt_words,
                top_fraction,
                oc.min_spearman,
                oc.min_overlap,
                find_kw,
                progress,
            )
        else:

            def on_update(section, part=part):
                state[part] = section
                save()

            state[part] = _tuning_part(
                part,
                model,
                data,
                run,
                sn,
                out,
                ft[part],
                oc.lora_rank,
                oc.lora_alpha,
                fractions,
                seed_list,
                mode,
                std,
                relative,
                batch_size,
                state.get(part, {}),
                on_update,
                progress,
            )
        state[part]["seconds"] = state[part].get("seconds", 0.0) + time.perf_counter() - t0
        save()
        log.info("origin study: %s: %s", part, state[part]["statement"])
    return save("done" if all(state.get(p, {}).get("status") == "done" for p in PARTS) else "partial")


def _random_weights_part(
    model: HookedRootModule,
    task,
    run: Run,
    cfg: TuneConfig,
    sn: SkillNeurons,
    out: Path,
    pretrained: dict,
    seed: int,
    top_fraction: float,
    find_kw: dict,
    progress: bool,
) -> dict[str, Any]:
    rand_model = random_weights_model(model, seed)
    rand_run = tune(rand_model, task, out / "random_weights" / "run", cfg, progress=progress)
    ndir = out / "random_weights" / "neurons"
    rand_sn = load_or_find(rand_model, [rand_run], ndir, layers=sn.layers, positions=sn.positions, **find_kw)
    del rand_model
    _free_memory()
    random = predictivity_summary(rand_sn, top_fraction)
    holds = (
        pretrained["best_predictivity"] > random["best_predictivity"]
        and pretrained["top_mean_predictivity"] > random["top_mean_predictivity"]
    )
    verb = "more" if holds else "not more"
    statement = (
        f"Pretrained neurons are {verb} predictive than those of the same architecture with random weights: "
        f"best {_fmt(pretrained['best_predictivity'])} vs {_fmt(random['best_predictivity'])}, "
        f"top-{top_fraction:.0%} mean {_fmt(pretrained['top_mean_predictivity'])} vs "
        f"{_fmt(random['top_mean_predictivity'])} (prompt test accuracy "
        f"{_fmt(pretrained['prompt_test_accuracy'])} vs {_fmt(random['prompt_test_accuracy'])})."
    )
    return {
        "status": "done",
        "pretrained": pretrained,
        "random": random,
        "best_gap": pretrained["best_predictivity"] - random["best_predictivity"],
        "top_mean_gap": pretrained["top_mean_predictivity"] - random["top_mean_predictivity"],
        "random_seed": seed,
        "run": str(rand_run.path),
        "neurons_dir": str(ndir.resolve()),
        "figure": FIG_RANDOM,
        "claim_holds": bool(holds),
        "statement": statement,
    }


def _label_words_part(
    model: HookedRootModule,
    task: Task,
    run: Run,
    cfg: TuneConfig,
    sn: SkillNeurons,
    out: Path,
    alt_words: list[str],
    top_fraction: float,
    min_spearman: float,
    min_overlap: float,
    find_kw: dict,
    progress: bool,
) -> dict[str, Any]:
    alt_task = task.with_label_words(alt_words)
    base = out / "label_words"
    alt_run = tune(model, alt_task, base / "run", cfg, progress=progress)
    ndir = base / "neurons"
    alt_sn = load_or_find(model, [alt_run], ndir, layers=sn.layers, positions=sn.positions, **find_kw)
    cmp = compare_predictivity(sn, alt_sn, top_fraction)
    rho, overlap = cmp["spearman"], cmp["top_overlap"]
    holds = bool(math.isfinite(rho) and rho >= min_spearman and overlap >= min_overlap)
    statement = (
        f"With label words {'/'.join(w.strip() for w in alt_words)} instead of "
        f"{'/'.join(w.strip() for w in sn.label_words)}, neuron predictivity has Spearman {_fmt(rho)} "
        f"with the original and {overlap:.0%} of the top-{top_fraction:.0%} skill neurons are shared "
        f"(chance {cmp['chance_overlap']:.0%}): skill neurons are "
        f"{'insensitive' if holds else 'not shown to be insensitive'} to the label words "
        f"(criterion: Spearman >= {min_spearman:g} and overlap >= {min_overlap:.0%})."
    )
    return {
        "status": "done",
        "original": list(sn.label_words),
        "alternative": list(alt_words),
        **cmp,
        "original_summary": predictivity_summary(sn, top_fraction),
        "alternative_summary": predictivity_summary(alt_sn, top_fraction),
        "run": str(alt_run.path),
        "neurons_dir": str(ndir.resolve()),
        "figure": FIG_LABEL_WORDS,
        "claim_holds": holds,
        "statement": statement,
    }


def _tuning_part(
    method: str,
    model: HookedRootModule,
    data: Task,
    run: Run,
    sn: SkillNeurons,
    out: Path,
    ft: FinetuneConfig,
    lora_rank: int,
    lora_alpha: float,
    fractions: list[float],
    seeds: list[int],
    mode: str,
    std: float,
    relative: bool,
    batch_size: int,
    prev: dict,
    on_update: Callable[[dict], None],
    progress: bool,
) -> dict[str, Any]:
    cfg = run.config
    ft = dataclasses.replace(ft, max_input_tokens=cfg.max_input_tokens, padding_side=cfg.padding_side)
    base = out / method
    tuned = copy_model(model, method)
    if method == "lora":
        params = add_lora(tuned, rank=lora_rank, alpha=lora_alpha, seed=ft.seed)
        trained = f"LoRA (rank {lora_rank}, alpha {lora_alpha:g}) on the attention projections q, k, v, o"
    else:
        params, trained = bitfit_parameters(tuned)
    es = EvalSet(
        data, Verbalizer(tuned.tokenizer, data.spec.label_words), "test", cfg.max_input_tokens, cfg.padding_side
    )
    section = dict(prev) if prev.get("training") else {}
    if section and (base / TRAINED_FILE).exists():
        load_trained(params, base / TRAINED_FILE)
    else:
        before = run_conditions(
            [Condition("untrained", {}, None, None, "tuned")],
            {"tuned": tuned},
            {"test": es},
            batch_size=batch_size,
            progress=False,
        )["untrained"].accuracy
        info = finetune(tuned, data, params, ft, progress=progress, desc=f"{method} {data.name}", out=base)
        if distributed.is_main():
            save_trained(params, base / TRAINED_FILE)
        section = {
            "status": "trained",
            "trained": trained,
            "fallback": trained == BITFIT_NORMS,
            "trainable_parameters": sorted(params),
            "training": {**info, "config": asdict(ft)},
            "zero_shot_accuracy": before,
        }
    unchanged = mlp_unchanged(tuned, model)
    if not unchanged:  # cannot happen unless the bridge shares storage in an unexpected way
        raise OriginError(f"{method} changed MLP weights; the comparison would be meaningless")
    masks = {f: sn.select(fraction=f) for f in fractions}
    counts = {f: [int(c) for c in m.sum(1)] for f, m in masks.items()}
    majority = majority_accuracy(data, "test")
    conditions = perturbation_conditions(masks, seeds, mode, std=std, relative=relative, skill=sn, variant="tuned")
    variant = f"{sn.model}+{method} " + tensor_digest(
        torch.cat([p.detach().float().flatten() for p in params.values()])
    )
    done: dict[str, Any] = {}

    def fill(status: str) -> dict[str, Any]:
        rows = perturbation_rows(done, fractions, seeds, counts, mode)
        section.update(
            status=status,
            mlp_weights_unchanged=unchanged,
            clean_accuracy=done["clean"].accuracy if "clean" in done else None,
            majority_accuracy=majority,
            prompt_test_accuracy=run.metrics.get("test_accuracy"),
            n_examples=len(data["test"]),
            rows=rows,
            evaluations=[
                {"key": r.name, "accuracy": r.accuracy, "seconds": r.seconds, "file": r.key} for r in done.values()
            ],
        )
        return section

    def on_result(r):
        done[r.name] = r
        on_update(fill("trained"))

    done.update(
        run_conditions(
            conditions,
            {"tuned": tuned},
            {"test": es},
            out=base,
            variants={"tuned": variant},
            batch_size=batch_size,
            progress=progress,
            desc=f"perturb {method}",
            on_result=on_result,
        )
    )
    del tuned
    _free_memory()
    fill("done")
    what = "LoRA" if method == "lora" else f"BitFit ({'normalisation weights' if section['fallback'] else 'biases'})"
    v = verdict(section["rows"], majority)
    statement = f"In the {what}-tuned model (test accuracy {_fmt(section['clean_accuracy'])}): {v.sentence}"
    figure = f"perturbation_{method}.png"
    section.update(
        conclusive=v.status != "inconclusive",
        verdict=v.status,
        fractions_holding=v.fractions,
        figure=figure,
        claim_holds=v.holds,
        statement=statement,
    )
    return section


@dataclasses.dataclass(frozen=True, repr=False)
class OriginResult(TaskResult):
    """What `origin_study` found; saved as `origin.json`, one section per part (each with `claim_holds`)."""

    FILE = ORIGIN_JSON

    status: str
    settings: dict[str, Any]
    source: dict[str, Any]
    random_weights: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    bitfit: dict[str, Any] | None = None
    label_words: dict[str, Any] | None = None
    wall_seconds: float = 0.0

    def parts(self) -> dict[str, dict[str, Any]]:
        return {p: getattr(self, p) for p in PARTS if getattr(self, p) is not None}

    def to_dataframe(self) -> Any:
        """One row per part run: `part`, `claim_holds`, the part's plain numbers (e.g. `best_gap`,
        `spearman`, `clean_accuracy`) and its `statement`."""
        import pandas as pd

        return pd.DataFrame([{"part": p, **scalars(v)} for p, v in self.parts().items()])

    def facts(self) -> dict[str, Any]:
        holds = {p: v.get("claim_holds") for p, v in self.parts().items()}
        return {"model": self.model, "task": self.task, **{f"{p}_holds": h for p, h in holds.items()}}


def _legacy_identity(out: Path) -> dict[str, Any] | None:
    """An origin.json of an older tl_skill: its settings (the digests it recorded after tuning dropped)."""
    if not (out / ORIGIN_JSON).exists():
        return None
    settings = read_json(out / ORIGIN_JSON, "origin file").get("settings") or {}
    return {k: v for k, v in settings.items() if k not in ("run_prompt", "neurons")}


def origin_config(config: OriginConfig | None, settings: dict[str, Any]) -> OriginConfig:
    """`config`, or an `OriginConfig` of the keyword settings (one of the two)."""
    if config is not None and settings:
        raise OriginError(f"give an OriginConfig or settings ({', '.join(settings)}), not both")
    if config is not None:
        return config
    known = {f.name for f in dataclasses.fields(OriginConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise TypeError(f"unknown origin setting(s) {unknown}; OriginConfig has {sorted(known)}")
    return OriginConfig(**settings)
