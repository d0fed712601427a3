"""Task transferability (SPEC §8): prompt transfer and the indicators that predict it.

For every ordered pair of tasks (A, B):

- **transfer performance**: A's prompt used as is on B's test split (with B's
  verbalizer; `zero_shot`, and `zero_shot_relative` = that over B's own
  prompt's accuracy), and A's prompt as the start of a short tuning on B
  (`init`: test accuracy after K steps; `init_gain`: that minus the accuracy
  after K steps from a random start);
- **indicators**: similarity of the two tasks' skill neurons (Spearman and
  cosine of the predictivity of all neurons, Jaccard overlap of the per-layer
  top neurons), and the baselines of Su et al. (2021): cosine similarity of the
  prompts' embeddings, and overlap of the neurons the prompts alone activate.

An indicator is judged by its rank correlation (Spearman, Kendall tau-b) with
transfer performance over all ordered pairs A != B. Matrices are indexed
`[source][target]`: row A, column B is A's prompt on task B.

`study` runs the whole pipeline from task names (tune, find skill neurons,
transfer); `transfer_from_dirs` starts from existing run and neurons
directories. Both resume: finished runs and neurons are reused, and each
pair's transfer results are cached in `transfer_cache.json` as soon as they
are known.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Bool
from tqdm.auto import tqdm

from . import compat, tuning
from .models import load_model, model_spec
from .neurons import NeuronsError, SkillNeurons, find_skill_neurons
from .prompt import SoftPrompt, Verbalizer, layout_for
from .record import Recorder
from .tasks import Task, load_task, subsample
from .tuning import Run, RunError, TuneConfig

log = logging.getLogger(__name__)

TRANSFER_JSON = "transfer.json"
STUDY_JSON = "study.json"
CACHE_JSON = "transfer_cache.json"
FIND_JSON = "study_find.json"

NEURON_INDICATORS = ("neuron_spearman", "neuron_cosine", "neuron_cosine_centered", "neuron_topk_jaccard")
PROMPT_INDICATORS = ("prompt_cosine", "prompt_cosine_mean_pooled")
ACTIVATION_INDICATORS = ("activated_jaccard", "activated_cosine")
INDICATORS = NEURON_INDICATORS + PROMPT_INDICATORS + ACTIVATION_INDICATORS
TRANSFER_KINDS = ("zero_shot", "zero_shot_relative", "init", "init_gain")
MANTEL_EXACT_MAX = 7  # up to 7 tasks every relabelling (7! = 5040) is tried


class TransferError(ValueError):
    """Tasks, runs or skill neurons that cannot be compared (other models, missing runs, ...)."""


# --------------------------------------------------------------------------- statistics
def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the average of their ranks (finite values expected)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of each distinct value's last copy
    return ((last - counts + 1 + last) / 2.0)[inverse.ravel()]


def _paired(x, y, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Both sides as flat float64 arrays of equal length; None when fewer than two pairs."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if len(x) != len(y):
        raise ValueError(f"{name}: lengths differ ({len(x)} vs {len(y)})")
    return (x, y) if len(x) >= 2 else None


def pearson(x, y) -> float:
    """Pearson correlation; NaN when either side is constant or fewer than two values."""
    pair = _paired(x, y, "pearson")
    if pair is None:
        return math.nan
    x, y = pair
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return float((dx * dy).sum()) / den if den > 0 else math.nan


def spearman(x, y) -> float:
    """Spearman's rho: Pearson correlation of average ranks (ties handled)."""
    return pearson(rankdata(x), rankdata(y))


def kendall(x, y) -> float:
    """Kendall's tau-b (ties in either variable handled); NaN when undefined."""
    pair = _paired(x, y, "kendall")
    if pair is None:
        return math.nan
    x, y = pair
    # O(n^2) over pairs: n is the number of task pairs, a few hundred at most.
    sx = np.sign(x[:, None] - x[None, :])
    sy = np.sign(y[:, None] - y[None, :])
    upper = np.triu_indices(len(x), 1)
    sx, sy = sx[upper], sy[upper]
    s = float((sx * sy).sum())  # concordant - discordant
    den = math.sqrt(float((sx != 0).sum()) * float((sy != 0).sum()))
    return s / den if den > 0 else math.nan


def cosine(x, y) -> float:
    """Cosine similarity of two flattened arrays; NaN when either is all zeros."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"cosine: sizes differ ({x.size} vs {y.size})")
    den = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / den if den > 0 else math.nan


def jaccard(a, b) -> float:
    """|A and B| / |A or B| of two boolean masks; NaN when both are empty."""
    a = np.asarray(a, dtype=bool).ravel()
    b = np.asarray(b, dtype=bool).ravel()
    if a.shape != b.shape:
        raise ValueError(f"jaccard: sizes differ ({a.size} vs {b.size})")
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else math.nan


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


# --------------------------------------------------------------------------- indicators
def check_comparable(a: SkillNeurons, b: SkillNeurons) -> None:
    """Refuse to compare the skill neurons of different models or layer sets."""
    if a.model != b.model:
        raise TransferError(f"skill neurons of different models cannot be compared: "
                            f"{a.task!r} was found on {a.model!r}, {b.task!r} on {b.model!r}")
    if list(a.layers) != list(b.layers) or a.d_mlp != b.d_mlp:
        raise TransferError(f"skill neurons of {a.task!r} (layers {a.layers}, d_mlp {a.d_mlp}) and "
                            f"{b.task!r} (layers {b.layers}, d_mlp {b.d_mlp}) cover different neurons")


def top_mask(sn: SkillNeurons, top_fraction: float | None = 0.02, top_k: int | None = None) -> torch.Tensor:
    """Per-layer top neurons by predictivity: `top_k` per layer, or max(1, int(top_fraction * d_mlp))."""
    if top_k is None:
        if top_fraction is None or not 0 < top_fraction <= 1:
            raise TransferError(f"top_fraction must be in (0, 1], got {top_fraction}")
        top_k = max(1, int(top_fraction * sn.d_mlp))
    return sn.select(k=top_k, per_layer=True)


def neuron_similarity(a: SkillNeurons, b: SkillNeurons, top_fraction: float | None = 0.02,
                      top_k: int | None = None) -> dict[str, float]:
    """Skill-neuron indicators of two tasks.

    Returns:
        `neuron_spearman` and `neuron_cosine` of the predictivity of all neurons,
        `neuron_cosine_centered` of the predictivity above chance (minus 0.5;
        the raw cosine of values in [0.5, 1] is close to 1 for any two tasks),
        and `neuron_topk_jaccard`, the overlap of the per-layer top neurons.
    """
    check_comparable(a, b)
    pa = a.predictivity.double().reshape(-1).numpy()
    pb = b.predictivity.double().reshape(-1).numpy()
    return {
        "neuron_spearman": spearman(pa, pb),
        "neuron_cosine": cosine(pa, pb),
        "neuron_cosine_centered": cosine(pa - 0.5, pb - 0.5),
        "neuron_topk_jaccard": jaccard(top_mask(a, top_fraction, top_k).numpy(),
                                       top_mask(b, top_fraction, top_k).numpy()),
    }


def prompt_similarity(prompts_a: Sequence[SoftPrompt], prompts_b: Sequence[SoftPrompt]) -> dict[str, float]:
    """Cosine similarity of two tasks' prompt embeddings, averaged over all pairs of their trials.

    `prompt_cosine` compares the flattened [P, d_model] prompts (NaN when the
    lengths differ); `prompt_cosine_mean_pooled` their means over positions.
    """
    if not prompts_a or not prompts_b:
        raise TransferError("prompt_similarity needs at least one prompt per task")
    flat, pooled = [], []
    for pa in prompts_a:
        va = pa.vectors.detach().double().cpu()
        for pb in prompts_b:
            vb = pb.vectors.detach().double().cpu()
            if va.shape[1] != vb.shape[1]:
                raise TransferError(f"prompts of width {va.shape[1]} and {vb.shape[1]} come from different models")
            flat.append(cosine(va.numpy(), vb.numpy()) if va.shape == vb.shape else math.nan)
            pooled.append(cosine(va.mean(0).numpy(), vb.mean(0).numpy()))
    return {"prompt_cosine": _mean(flat), "prompt_cosine_mean_pooled": _mean(pooled)}


class _LastActivations:
    """Recorder statistics that just keep the latest batch's activations per layer."""

    def __init__(self, n_layers: int):
        self.acts: list[torch.Tensor | None] = [None] * n_layers

    def count_batch(self, labels: torch.Tensor) -> None:
        pass

    def update(self, slot: int, x: torch.Tensor, labels: torch.Tensor) -> None:
        self.acts[slot] = x[0].detach().float().cpu()


@torch.no_grad()
def prompt_activation_states(model, prompt: SoftPrompt) -> Bool[torch.Tensor, "n_layers prompt d_mlp"]:
    """Which neurons the soft prompt alone activates (activation > 0), at each prompt position.

    The model reads the prompt with no input text (Su et al., 2021): the prompt
    positions only for a causal LM, `[CLS] [MASK] prompt [SEP]` for a masked LM.
    """
    spec = model_spec(model)
    stats = _LastActivations(spec.n_layers)
    rec = Recorder(model, stats, None, "prompt")
    batch = layout_for(model, prompt.length).collate([[]], [0]).to(compat.model_device(model))
    with rec.attached():
        rec.run(batch, prompt.to(compat.model_device(model)))
    return torch.stack(stats.acts) > 0


def activation_overlap(states_a: Sequence[torch.Tensor], states_b: Sequence[torch.Tensor]) -> dict[str, float]:
    """Overlap of the neurons activated by two tasks' prompts, averaged over pairs of trials.

    `activated_jaccard`: |A and B| / |A or B|; `activated_cosine`: cosine of the
    binary state vectors, |A and B| / sqrt(|A| |B|). NaN where prompt lengths differ.
    """
    jac, cos = [], []
    for sa in states_a:
        for sb in states_b:
            if sa.shape != sb.shape:
                jac.append(math.nan), cos.append(math.nan)
                continue
            a, b = sa.numpy().astype(bool), sb.numpy().astype(bool)
            jac.append(jaccard(a, b))
            cos.append(cosine(a.astype(np.float64), b.astype(np.float64)))
    return {"activated_jaccard": _mean(jac), "activated_cosine": _mean(cos)}


# --------------------------------------------------------------------------- correlations
def _off_diagonal_values(ind: np.ndarray, tr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs A != B where both matrices have a value, as two flat arrays."""
    keep = ~np.eye(ind.shape[0], dtype=bool) & np.isfinite(ind) & np.isfinite(tr)
    return ind[keep], tr[keep]


def _off_diagonal_spearman(ind: np.ndarray, tr: np.ndarray) -> float:
    xs, ys = _off_diagonal_values(ind, tr)
    return spearman(xs, ys) if len(xs) >= 3 else math.nan


def mantel_p_value(indicator, transfer, max_exact: int = MANTEL_EXACT_MAX, n_random: int = 9999,
                   seed: int = 0) -> tuple[float, int]:
    """One-sided Mantel permutation test of the off-diagonal Spearman correlation.

    Task pairs share tasks, so the pairs are not independent and the usual p-value of a
    correlation over them is wrong. Relabelling the tasks of `indicator` (rows and columns
    together) keeps that structure: p is the share of relabellings whose correlation with
    `transfer` is at least the observed one. All n! relabellings when n <= `max_exact`
    (then the smallest possible p is 1/n!: 1/120 for five tasks), else `n_random` random ones
    plus the observed labelling. Returns (p, number of relabellings); NaN when undefined.
    """
    ind, tr = _as_array(indicator), _as_array(transfer)
    n = ind.shape[0]
    observed = _off_diagonal_spearman(ind, tr)
    if not math.isfinite(observed):
        return math.nan, 0
    if n <= max_exact:
        perms = itertools.permutations(range(n))
    else:
        rng = np.random.default_rng(seed)
        perms = itertools.chain([tuple(range(n))], (tuple(rng.permutation(n)) for _ in range(n_random)))
    hits = total = 0
    for perm in perms:
        idx = np.asarray(perm)
        r = _off_diagonal_spearman(ind[np.ix_(idx, idx)], tr)
        total += 1
        hits += bool(math.isfinite(r) and r >= observed - 1e-12)
    return hits / total, total


def indicator_correlations(indicators: Mapping[str, Sequence[Sequence[float]]],
                           transfer: Mapping[str, Sequence[Sequence[float]]],
                           mantel: bool = True) -> dict[str, dict[str, dict]]:
    """Spearman and Kendall correlation of each indicator with each transfer matrix over pairs A != B.

    Pairs where either value is missing (None/NaN) are left out; `n` says how many were used.
    With `mantel`, `mantel_p` is the one-sided Mantel permutation p-value of the Spearman
    correlation (`mantel_p_value`) and `mantel_permutations` how many relabellings it used.
    """
    out: dict[str, dict[str, dict]] = {}
    for name, ind in indicators.items():
        ind = _as_array(ind)
        out[name] = {}
        for kind, tr in transfer.items():
            tr = _as_array(tr)
            if ind.shape != tr.shape or ind.shape[0] != ind.shape[1]:
                raise TransferError(f"indicator {name!r} {ind.shape} and transfer {kind!r} {tr.shape} "
                                    "must be square matrices of the same size")
            xs, ys = _off_diagonal_values(ind, tr)
            out[name][kind] = {"spearman": spearman(xs, ys) if len(xs) >= 3 else math.nan,
                               "kendall": kendall(xs, ys) if len(xs) >= 3 else math.nan, "n": len(xs)}
            if mantel:
                p, count = mantel_p_value(ind, tr)
                out[name][kind].update(mantel_p=p, mantel_permutations=count)
    return out


def main_transfer_kind(transfer: Mapping[str, Any]) -> str:
    """The transfer measure `correlations` reports first: the gain of A's prompt as the start
    of K steps on B over a random start (the paper's setting) when measured, else zero-shot."""
    return "init_gain" if "init_gain" in transfer else "zero_shot"


def _as_array(m) -> np.ndarray:
    return np.asarray([[math.nan if v is None else float(v) for v in row] for row in m], dtype=np.float64)


# --------------------------------------------------------------------------- helpers
def task_slug(name: str) -> str:
    """A directory name for a task (`bbc_news:sport-vs-business` -> `bbc_news_sport-vs-business`)."""
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "task"
    if "/" in name or "\\" in name:  # paths and hub ids: keep distinct names distinct
        slug += "-" + hashlib.sha1(name.encode()).hexdigest()[:6]
    return slug


def _jsonable(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _jsonable(obj.item())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2))
    os.replace(tmp, path)


def _same_paths(a: Sequence[str | Path], b: Sequence[str | Path]) -> bool:
    return [str(Path(p).resolve()) for p in a] == [str(Path(p).resolve()) for p in b]


class _Cache:
    """Per-pair results, written to disk after every pair; dropped when the settings change."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.settings = _jsonable(settings)
        self.entries: dict[str, dict] = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError:
                log.warning("%s is unreadable; recomputing transfer results", path)
                data = {}
            if data.get("settings") == self.settings:
                self.entries = data.get("entries", {})
            elif data:
                log.warning("transfer settings changed since %s was written; recomputing", path)

    def get(self, key: str, sources: Sequence[str]) -> list[float] | None:
        e = self.entries.get(key)
        if e is not None and e.get("sources") == list(sources):
            return [math.nan if v is None else v for v in e["values"]]
        return None

    def put(self, key: str, sources: Sequence[str], values: Sequence[float]) -> None:
        self.entries[key] = {"sources": list(sources), "values": list(values)}
        _write_json(self.path, {"settings": self.settings, "entries": self.entries})


# --------------------------------------------------------------------------- transfer
def _eval_task(run: Run, full: Task, max_eval_examples: int | None) -> Task:
    """The target's test split as its runs were evaluated (same subsample), optionally smaller."""
    cfg = run.config
    task = subsample(full, {"test": cfg.max_test_examples}, seed=cfg.task_seed)
    if max_eval_examples is not None:
        task = subsample(task, {"test": max_eval_examples}, seed=cfg.task_seed)
    return task


def _accuracy(model, task: Task, run_b: Run, verbalizer: Verbalizer, prompt: SoftPrompt,
              batch_size: int | None) -> float:
    cfg = run_b.config
    return tuning.evaluate(model, task, "test", verbalizer, prompt.to(compat.model_device(model)),
                           batch_size=batch_size or cfg.eval_batch_size, max_input_tokens=cfg.max_input_tokens,
                           padding_side=cfg.padding_side)["accuracy"]


def _short_config(run_b: Run, steps: int, seed: int, prompt_length: int) -> TuneConfig:
    return replace(run_b.config, steps=steps, eval_every=steps, seed=seed, patience=0,
                   prompt_length=prompt_length, init_text=None)


def validate_inputs(model, neurons: Sequence[SkillNeurons], runs: Mapping[str, Sequence[Run]]) -> list[str]:
    """Check that every task has runs and skill neurons of `model`; returns the task order."""
    spec = model_spec(model)
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
        if sn.model != spec.name:
            raise TransferError(f"skill neurons of {sn.task!r} were found on {sn.model!r}, "
                                f"but the model is {spec.name!r}")
        if sn.d_mlp != spec.d_mlp or max(sn.layers) >= spec.n_layers:
            raise TransferError(f"skill neurons of {sn.task!r} do not fit {spec.name!r}")
        check_comparable(neurons[0], sn)
        task_runs = runs.get(sn.task) or []
        if not task_runs:
            raise TransferError(f"task {sn.task!r} has no prompt-tuning runs")
        for run in task_runs:
            if run.model_name != spec.name:
                raise TransferError(f"run {run.path} was tuned on {run.model_name!r}, "
                                    f"but the model is {spec.name!r}")
            if run.task_name != sn.task:
                raise TransferError(f"run {run.path} is of task {run.task_name!r}, not {sn.task!r}")
            if run.prompt.vectors.shape[1] != spec.d_model:
                raise TransferError(f"run {run.path}: prompt width {run.prompt.vectors.shape[1]} "
                                    f"!= d_model {spec.d_model}")
    return tasks


def run_transfer(model, neurons: Sequence[SkillNeurons], runs: Mapping[str, Sequence[Run]],
                 out: str | Path, transfer_steps: int = 50, init_trials: int = 1,
                 top_fraction: float = 0.02, max_eval_examples: int | None = None,
                 batch_size: int | None = None, figures: bool = True, progress: bool = True,
                 loaded_tasks: Mapping[str, Task] | None = None) -> dict[str, Any]:
    """Transfer performance and indicators for every ordered pair of tasks; writes `out/transfer.json`.

    Args:
        neurons: skill neurons of each task (one per task, in the order of the matrices).
        runs: the prompt-tuning runs (trials) of each task, by task name.
        transfer_steps: K, the length of the short tunings of the `init` setting (0: skip it).
        init_trials: how many of the source task's prompts start a short tuning (each costs
            K steps per target task).
        top_fraction: per-layer share of top neurons for `neuron_topk_jaccard`.
        max_eval_examples: cap on each target's test examples (default: as its runs were tested).
        batch_size: evaluation batch size (default: the target runs' `eval_batch_size`).
        loaded_tasks: tasks already loaded, by name, as their runs load them (saves reloading).

    Returns:
        The contents of `transfer.json`: `tasks`, `transfer` {kind: matrix},
        `indicators` {name: matrix}, `correlations` {indicator: {spearman, kendall, n, mantel_p,
        transfer, by_transfer}}: the top-level numbers are for the main transfer measure
        (`main_transfer_kind`), `by_transfer` has them for every kind {kind: {spearman, ...}}.
    """
    out = Path(out)
    tasks = validate_inputs(model, neurons, runs)
    if transfer_steps < 0 or init_trials < 1:
        raise TransferError(f"transfer_steps must be >= 0 and init_trials >= 1 "
                            f"(got {transfer_steps}, {init_trials})")
    spec = model_spec(model)
    sn_of = {sn.task: sn for sn in neurons}
    runs = {t: list(runs[t]) for t in tasks}
    n = len(tasks)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": spec.name, "transfer_steps": transfer_steps, "max_eval_examples": max_eval_examples}
    cache = _Cache(out / CACHE_JSON, settings)
    paths = {t: [str(r.path.resolve()) for r in runs[t]] for t in tasks}

    full_tasks = {t: loaded_tasks[t] if loaded_tasks and t in loaded_tasks else runs[t][0].load_task()
                  for t in tasks}
    eval_tasks = {t: _eval_task(runs[t][0], full_tasks[t], max_eval_examples) for t in tasks}
    verbalizers = {t: runs[t][0].verbalizer(model) for t in tasks}

    # Zero-shot: A's prompts as they are on B's test split.
    zero = np.full((n, n), math.nan)
    bar = tqdm(total=n * n, desc="transfer: prompts as is", disable=not progress, unit="pair")
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks):
            key = f"zero_shot|{a}|{b}"
            sources = paths[a] + paths[b][:1]
            accs = cache.get(key, sources)
            if accs is None:
                accs = [_accuracy(model, eval_tasks[b], runs[b][0], verbalizers[b], r.prompt, batch_size)
                        for r in runs[a]]
                cache.put(key, sources, accs)
            zero[i, j] = _mean(accs)
            bar.update(1)
    bar.close()
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
        bar = tqdm(total=n * n, desc=f"transfer: prompt as init, {transfer_steps} steps",
                   disable=not progress, unit="pair")

        def short_tune(b: str, run_dir: Path, seed: int, length: int, init_prompt: SoftPrompt | None,
                       key: str, sources: list[str]) -> float:
            got = cache.get(key, sources)
            if got is not None:
                return got[0]
            cfg = _short_config(runs[b][0], transfer_steps, seed, length)
            # init_prompt=None: tune's own random start (vocabulary embeddings drawn with `seed`)
            # no dev check: with eval_every = K it would only confirm the last step's prompt
            run = tuning.tune(model, full_tasks[b], run_dir, cfg, progress=False, evaluate_test=False,
                              init_prompt=init_prompt, evaluate_dev=False)
            acc = _accuracy(model, eval_tasks[b], runs[b][0], verbalizers[b], run.prompt, batch_size)
            cache.put(key, sources, [acc])
            return acc

        for j, b in enumerate(tasks):
            rand: dict[tuple[int, int], float] = {}
            for i, a in enumerate(tasks):
                accs, gains = [], []
                for run_a in runs[a][:init_trials]:
                    seed, P = run_a.config.seed, run_a.prompt.length
                    if (P, seed) not in rand:
                        rand[(P, seed)] = short_tune(
                            b, root / f"random_to_{task_slug(b)}" / f"P{P}_seed{seed}", seed, P, None,
                            f"random|{b}|P{P}|seed{seed}", paths[b][:1])
                    acc = short_tune(b, root / f"{task_slug(a)}_to_{task_slug(b)}" / f"seed{seed}", seed, P,
                                     run_a.prompt, f"init|{a}|{b}|seed{seed}",
                                     [str(run_a.path.resolve())] + paths[b][:1])
                    accs.append(acc)
                    gains.append(acc - rand[(P, seed)])
                init[i, j], gain[i, j] = _mean(accs), _mean(gains)
                bar.update(1)
            random_acc[b] = _mean(list(rand.values()))
        bar.close()
        transfer["init"] = init
        transfer["init_gain"] = gain
        baselines["random_init_accuracy"] = random_acc

    # Indicators (cheap: no data, one prompt-only forward pass per prompt).
    indicators = {name: np.full((n, n), math.nan) for name in INDICATORS}
    states = {t: [prompt_activation_states(model, r.prompt) for r in runs[t]] for t in tasks}
    prompts = {t: [r.prompt for r in runs[t]] for t in tasks}
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks):
            if j < i:
                for name in INDICATORS:  # all indicators are symmetric
                    indicators[name][i, j] = indicators[name][j, i]
                continue
            vals = {**neuron_similarity(sn_of[a], sn_of[b], top_fraction),
                    **prompt_similarity(prompts[a], prompts[b]),
                    **activation_overlap(states[a], states[b])}
            for name in INDICATORS:
                indicators[name][i, j] = vals[name]

    by_kind = indicator_correlations(indicators, transfer)
    main_kind = main_transfer_kind(transfer)
    correlations = {name: {**c[main_kind], "transfer": main_kind, "by_transfer": c} for name, c in by_kind.items()}
    result = {
        "model": spec.name,
        "tasks": tasks,
        "matrix_convention": "matrix[i][j]: source task tasks[i] (its prompt), target task tasks[j]",
        "transfer": {k: v.tolist() for k, v in transfer.items()},
        "indicators": {k: v.tolist() for k, v in indicators.items()},
        "correlations": correlations,
        "baselines": baselines,
        "best_indicator": {
            kind: max(by_kind, key=lambda name: _finite_or(by_kind[name][kind]["spearman"]))
            for kind in transfer
        },
        "settings": {**settings, "init_trials": init_trials, "top_fraction": top_fraction,
                     "top_k_per_layer": max(1, int(top_fraction * spec.d_mlp)), "batch_size": batch_size},
        "runs": paths,
        "neurons": {t: sn_of[t].runs for t in tasks},
    }
    if figures:
        from .plots import plot_transfer_figures

        result["figures"] = [str(p) for p in plot_transfer_figures(result, out / "figures")]
    _write_json(out / TRANSFER_JSON, result)
    log.info("transfer results for %d tasks written to %s", n, out / TRANSFER_JSON)
    return _jsonable(result)


def _finite_or(x, default: float = -math.inf) -> float:
    return x if x is not None and math.isfinite(x) else default


def _resolve_model(model, name: str, device=None, dtype=None):
    if model is None or isinstance(model, str):
        want = model or name
        if want != name:
            raise TransferError(f"the runs were tuned on {name!r}, not {want!r}")
        return load_model(name, device=device, dtype=dtype)
    return model


def transfer_from_dirs(model, neurons_dirs: Sequence[str | Path], run_dirs: Sequence[str | Path] | None,
                       out: str | Path, device=None, dtype=None, **kwargs) -> dict[str, Any]:
    """Transfer and indicators from existing skill-neuron directories (one per task) and runs.

    Args:
        model: a loaded model, a model name, or None to load the runs' model (on `device`, `dtype`).
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
        raise TransferError(f"the neurons directories come from different models {models}; "
                            "transfer compares tasks on one model")
    runs: dict[str, list[Run]] = {}
    if run_dirs is None:
        for sn in neurons:
            try:
                runs[sn.task] = [Run.load(p) for p in sn.runs]
            except RunError as exc:
                raise TransferError(f"the runs of {sn.task!r} recorded in its neurons directory are "
                                    f"gone ({exc}); pass run directories explicitly") from exc
    else:
        for d in run_dirs:
            run = Run.load(d)
            runs.setdefault(run.task_name, []).append(run)
    run_models = sorted({r.model_name for rs in runs.values() for r in rs})
    if run_models != models:
        raise TransferError(f"the runs were tuned on {run_models} but the skill neurons were found on {models}")
    model = _resolve_model(model, models[0], device, dtype)
    return run_transfer(model, neurons, runs, out, **kwargs)


# --------------------------------------------------------------------------- study
def _check_existing_runs(out: Path, tasks: Sequence[str], seeds: Sequence[int], model_name: str) -> None:
    for t in tasks:
        for s in seeds:
            path = out / "runs" / task_slug(t) / f"seed{s}" / tuning.RUN_JSON
            if path.exists():
                prev = json.loads(path.read_text())
                if prev.get("model") != model_name:
                    raise TransferError(f"{path.parent} holds a run of model {prev.get('model')!r}, but this "
                                        f"study uses {model_name!r}; use another --out")
        nj = out / "neurons" / task_slug(t) / "neurons.json"
        if nj.exists():
            prev = json.loads(nj.read_text())
            if prev.get("model") != model_name:
                raise TransferError(f"{nj.parent} holds skill neurons of model {prev.get('model')!r}, but "
                                    f"this study uses {model_name!r}; use another --out")


def _neurons_for(model, runs: list[Run], path: Path, find_kwargs: dict, progress: bool) -> SkillNeurons:
    marker = path / FIND_JSON
    want = _jsonable({"runs": [str(r.path.resolve()) for r in runs], "find_kwargs": find_kwargs})
    if marker.exists() and (path / "neurons.json").exists():
        if json.loads(marker.read_text()) == want:
            log.info("reusing skill neurons in %s", path)
            return SkillNeurons.load(path)
        log.info("runs or settings changed since %s was written; finding skill neurons again", path)
    # The study compares tasks by their selection-split predictivity: no held-out pass is needed.
    sn = find_skill_neurons(model, runs, progress=progress, **{"confirm_split": None, **find_kwargs})
    sn.save(path)
    _write_json(marker, want)
    return sn


def study(model, tasks: Sequence[str], out: str | Path, seeds: Sequence[int] = (0, 1),
          tune_config: TuneConfig | None = None, find_kwargs: Mapping[str, Any] | None = None,
          transfer_steps: int = 50, progress: bool = True, device=None, dtype=None,
          **transfer_kwargs) -> dict[str, Any]:
    """The multi-task study: tune prompts, find skill neurons, then transfer and indicators.

    Layout of `out`: `runs/<task>/seed<S>` (prompt tuning), `neurons/<task>`
    (skill neurons), `transfer_runs/K<K>/` (the short tunings of the init setting),
    `transfer.json`, `study.json`, `figures/`. A rerun reuses everything that
    is finished.

    Args:
        model: a loaded model or a model name.
        tasks: task names (at least two), e.g. word_sentiment, rotten_tomatoes, subjectivity.
        seeds: one prompt (trial) per seed.
        tune_config: tuning settings (its `seed` is replaced by each of `seeds`).
        find_kwargs: passed to `find_skill_neurons` (max_train_examples, max_eval_examples, ...).
        transfer_steps: K for the init setting (0: only zero-shot transfer).
        **transfer_kwargs: passed to `run_transfer` (init_trials, top_fraction, max_eval_examples, ...).
    """
    out = Path(out)
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
    if isinstance(model, str):
        model = load_model(model, device=device, dtype=dtype)
    spec = model_spec(model)
    _check_existing_runs(out, tasks, seeds, spec.name)
    loaded = {t: load_task(t, seed=cfg.task_seed) for t in tasks}  # unknown names fail here, before tuning

    runs: dict[str, list[Run]] = {}
    neurons: list[SkillNeurons] = []
    for t in tqdm(tasks, desc="study: tune and find", disable=not progress, unit="task"):
        runs[t] = tuning.tune_trials(model, loaded[t], out / "runs" / task_slug(t), seeds, cfg, progress=progress)
        neurons.append(_neurons_for(model, runs[t], out / "neurons" / task_slug(t), find_kwargs, progress))
    result = run_transfer(model, neurons, runs, out, transfer_steps=transfer_steps, progress=progress,
                          loaded_tasks=loaded, **transfer_kwargs)
    info = {
        "model": spec.name,
        "model_spec": spec.to_dict(),
        "tasks": tasks,
        "seeds": seeds,
        "tune_config": asdict(cfg),
        "find_kwargs": find_kwargs,
        "transfer_steps": transfer_steps,
        "transfer_kwargs": dict(transfer_kwargs),
        "per_task": {
            t: {"runs": [str(r.path) for r in runs[t]],
                "neurons": str(out / "neurons" / task_slug(t)),
                "dev_accuracy": _mean([r.metrics.get("dev_accuracy", math.nan) for r in runs[t]]),
                "test_accuracy": _mean([r.metrics.get("test_accuracy", math.nan) for r in runs[t]]),
                "best_predictivity": sn.best_predictivity}
            for t, sn in zip(tasks, neurons)
        },
        "transfer_json": str(out / TRANSFER_JSON),
        "correlations": result["correlations"],
        "figures": result.get("figures", []),
    }
    _write_json(out / STUDY_JSON, info)
    return _jsonable(info)
