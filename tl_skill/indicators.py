"""Task transferability (method §8): prompt transfer and the indicators that predict it.

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

This module holds the indicators and their statistics; the experiment that
measures transfer (`run_transfer`, `transfer_from_dirs`, `study`) is
`tl_skill.experiments.transfer`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool

from tl_skill import compat
from tl_skill.compat import HookedRootModule
from tl_skill.errors import TransferError
from tl_skill.neurons import SkillNeurons
from tl_skill.record import Recorder
from tl_skill.stats import rankdata
from tl_skill.tuning.prompt import SoftPrompt, layout_for

log = logging.getLogger(__name__)

NEURON_INDICATORS = ("neuron_spearman", "neuron_cosine", "neuron_cosine_centered", "neuron_topk_jaccard")
PROMPT_INDICATORS = ("prompt_cosine", "prompt_cosine_mean_pooled")
ACTIVATION_INDICATORS = ("activated_jaccard", "activated_cosine")
INDICATORS = NEURON_INDICATORS + PROMPT_INDICATORS + ACTIVATION_INDICATORS
TRANSFER_KINDS = ("zero_shot", "zero_shot_relative", "init", "init_gain")
MANTEL_EXACT_MAX = 7  # up to 7 tasks every relabelling (7! = 5040) is tried


# --------------------------------------------------------------------------- statistics
def _paired(x, y, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Both sides as flat float64 arrays of equal length; None when fewer than two pairs."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if len(x) != len(y):
        raise TransferError(f"{name}: lengths differ ({len(x)} vs {len(y)})")
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
        raise TransferError(f"cosine: sizes differ ({x.size} vs {y.size})")
    den = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / den if den > 0 else math.nan


def jaccard(a, b) -> float:
    """|A and B| / |A or B| of two boolean masks; NaN when both are empty."""
    a = np.asarray(a, dtype=bool).ravel()
    b = np.asarray(b, dtype=bool).ravel()
    if a.shape != b.shape:
        raise TransferError(f"jaccard: sizes differ ({a.size} vs {b.size})")
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else math.nan


def mean_finite(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else math.nan


# --------------------------------------------------------------------------- indicators
def check_comparable(a: SkillNeurons, b: SkillNeurons) -> None:
    """Refuse to compare the skill neurons of different models or layer sets."""
    if a.model != b.model:
        raise TransferError(
            f"skill neurons of different models cannot be compared: "
            f"{a.task!r} was found on {a.model!r}, {b.task!r} on {b.model!r}"
        )
    if a.units != b.units:
        raise TransferError(
            f"skill neurons of {a.task!r} were found on {a.units!r} units, those of {b.task!r} "
            f"on {b.units!r}: find both with the same units"
        )
    if list(a.layers) != list(b.layers) or a.d_mlp != b.d_mlp:
        raise TransferError(
            f"skill neurons of {a.task!r} (layers {a.layers}, d_mlp {a.d_mlp}) and "
            f"{b.task!r} (layers {b.layers}, d_mlp {b.d_mlp}) cover different neurons"
        )


def top_mask(sn: SkillNeurons, top_fraction: float | None = 0.02, top_k: int | None = None) -> torch.Tensor:
    """Per-layer top neurons by predictivity: `top_k` per layer, or max(1, int(top_fraction * d_mlp))."""
    if top_k is None:
        if top_fraction is None or not 0 < top_fraction <= 1:
            raise TransferError(f"top_fraction must be in (0, 1], got {top_fraction}")
        top_k = max(1, int(top_fraction * sn.d_mlp))
    return sn.select(k=top_k, per_layer=True)


def neuron_similarity(
    a: SkillNeurons, b: SkillNeurons, top_fraction: float | None = 0.02, top_k: int | None = None
) -> dict[str, float]:
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
        "neuron_topk_jaccard": jaccard(
            top_mask(a, top_fraction, top_k).numpy(), top_mask(b, top_fraction, top_k).numpy()
        ),
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
    return {"prompt_cosine": mean_finite(flat), "prompt_cosine_mean_pooled": mean_finite(pooled)}


class _LastActivations:
    """Recorder statistics that just keep the latest batch's activations per layer."""

    def __init__(self, n_layers: int):
        self.acts: list[torch.Tensor | None] = [None] * n_layers

    def count_batch(self, labels: torch.Tensor) -> None:
        pass

    def update(self, slot: int, x: torch.Tensor, labels: torch.Tensor) -> None:
        self.acts[slot] = x[0].detach().float().cpu()


@torch.no_grad()
def prompt_activation_states(
    model: HookedRootModule, prompt: SoftPrompt, units=None
) -> Bool[torch.Tensor, "n_layers prompt d_mlp"]:
    """Which neurons the soft prompt alone activates (activation > 0), at each prompt position.

    The model reads the prompt with no input text (Su et al., 2021): the prompt
    positions only for a causal LM, `[CLS] [MASK] prompt [SEP]` for a masked LM.
    `units`: another unit source (`tl_skill.units`), at every layer it has: SAE latents
    are active when > 0 as neurons are; for `resid` and `attn` the state is the sign of
    each coordinate (a positive value), which only the overlap indicators read.
    """
    rec = Recorder(model, None, None, "prompt", units=units)
    stats = _LastActivations(len(rec.layers))
    rec.stats = stats
    batch = layout_for(model, prompt.length).collate([[]], [0]).to(compat.model_device(model))
    with rec.attached():
        rec.run(batch, prompt.to(compat.model_device(model)))
    acts = [a for a in stats.acts if a is not None]
    if len(acts) != len(stats.acts):
        raise TransferError("the prompt's pass did not reach every recorded layer")
    return torch.stack(acts) > 0


def activation_overlap(states_a: Sequence[torch.Tensor], states_b: Sequence[torch.Tensor]) -> dict[str, float]:
    """Overlap of the neurons activated by two tasks' prompts, averaged over pairs of trials.

    `activated_jaccard`: |A and B| / |A or B|; `activated_cosine`: cosine of the
    binary state vectors, |A and B| / sqrt(|A| |B|). NaN where prompt lengths differ.
    """
    jac, cos = [], []
    for sa in states_a:
        for sb in states_b:
            if sa.shape != sb.shape:
                jac.append(math.nan)
                cos.append(math.nan)
                continue
            a, b = sa.numpy().astype(bool), sb.numpy().astype(bool)
            jac.append(jaccard(a, b))
            cos.append(cosine(a.astype(np.float64), b.astype(np.float64)))
    return {"activated_jaccard": mean_finite(jac), "activated_cosine": mean_finite(cos)}


def indicator_matrices(
    tasks: Sequence[str],
    neurons_of: Mapping[str, SkillNeurons],
    prompts_of: Mapping[str, Sequence[SoftPrompt]],
    states_of: Mapping[str, Sequence[torch.Tensor]],
    top_fraction: float | None = 0.02,
) -> dict[str, np.ndarray]:
    """Every indicator (`INDICATORS`) for every pair of tasks, as symmetric [n, n] matrices.

    `neurons_of`: each task's skill neurons; `prompts_of`, `states_of`: each task's prompts and
    the neurons they alone activate (`prompt_activation_states`), averaged over pairs of trials.
    """
    n = len(tasks)
    out = {name: np.full((n, n), math.nan) for name in INDICATORS}
    for i, a in enumerate(tasks):
        for j in range(i, n):
            b = tasks[j]
            vals = {
                **neuron_similarity(neurons_of[a], neurons_of[b], top_fraction),
                **prompt_similarity(prompts_of[a], prompts_of[b]),
                **activation_overlap(states_of[a], states_of[b]),
            }
            for name in INDICATORS:  # all indicators are symmetric
                out[name][i, j] = out[name][j, i] = vals[name]
    return out


# --------------------------------------------------------------------------- correlations
def _off_diagonal_values(ind: np.ndarray, tr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs A != B where both matrices have a value, as two flat arrays."""
    keep = ~np.eye(ind.shape[0], dtype=bool) & np.isfinite(ind) & np.isfinite(tr)
    return ind[keep], tr[keep]


def _off_diagonal_spearman(ind: np.ndarray, tr: np.ndarray) -> float:
    xs, ys = _off_diagonal_values(ind, tr)
    return spearman(xs, ys) if len(xs) >= 3 else math.nan


def mantel_p_value(
    indicator, transfer, max_exact: int = MANTEL_EXACT_MAX, n_random: int = 9999, seed: int = 0
) -> tuple[float, int]:
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
    perms: Iterable[tuple[int, ...]]
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


def indicator_correlations(
    indicators: Mapping[str, Sequence[Sequence[float]] | np.ndarray],
    transfer: Mapping[str, Sequence[Sequence[float]] | np.ndarray],
    mantel: bool = True,
) -> dict[str, dict[str, dict]]:
    """Spearman and Kendall correlation of each indicator with each transfer matrix over pairs A != B.

    Pairs where either value is missing (None/NaN) are left out; `n` says how many were used.
    With `mantel`, `mantel_p` is the one-sided Mantel permutation p-value of the Spearman
    correlation (`mantel_p_value`) and `mantel_permutations` how many relabellings it used.
    """
    out: dict[str, dict[str, dict]] = {}
    for name, ind_values in indicators.items():
        ind = _as_array(ind_values)
        out[name] = {}
        for kind, tr_values in transfer.items():
            tr = _as_array(tr_values)
            if ind.shape != tr.shape or ind.shape[0] != ind.shape[1]:
                raise TransferError(
                    f"indicator {name!r} {ind.shape} and transfer {kind!r} {tr.shape} "
                    "must be square matrices of the same size"
                )
            xs, ys = _off_diagonal_values(ind, tr)
            out[name][kind] = {
                "spearman": spearman(xs, ys) if len(xs) >= 3 else math.nan,
                "kendall": kendall(xs, ys) if len(xs) >= 3 else math.nan,
                "n": len(xs),
            }
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


# --------------------------------------------------------------------------- evidence over tasks and trials
def _pairs_spearman(ind: np.ndarray, tr: np.ndarray, idx: np.ndarray) -> float:
    """Spearman of an indicator with transfer over the ordered pairs of the tasks `idx` (a resample may
    draw a task twice: pairs of a task with itself are left out, repeated pairs count each time)."""
    sub_i, sub_t = ind[np.ix_(idx, idx)], tr[np.ix_(idx, idx)]
    keep = (idx[:, None] != idx[None, :]) & np.isfinite(sub_i) & np.isfinite(sub_t)
    return spearman(sub_i[keep], sub_t[keep]) if int(keep.sum()) >= 3 else math.nan


def _best_of(ind: Mapping[str, np.ndarray], names: Sequence[str], tr: np.ndarray, idx: np.ndarray):
    vals = {name: _pairs_spearman(ind[name], tr, idx) for name in names}
    finite = {k: v for k, v in vals.items() if math.isfinite(v)}
    if not finite:
        return math.nan, None
    name = max(finite, key=lambda k: finite[k])
    return finite[name], name


def bootstrap_indicator_difference(
    indicators: Mapping[str, Any],
    transfer: Any,
    first: Sequence[str] = NEURON_INDICATORS,
    second: Sequence[str] = PROMPT_INDICATORS + ACTIVATION_INDICATORS,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Bootstrap over tasks of (best of `first`) - (best of `second`) rank correlation with transfer.

    Tasks, not pairs, are resampled with replacement (pairs share tasks, so they are not
    independent units); in every resample the best indicator of each group is chosen again, so
    the difference carries the cost of picking the best of several. `difference` is the observed
    one, `ci95` the percentile interval, `share_above_zero` the share of resamples where `first`
    wins: an interval above 0 says the first group predicts transfer better on tasks like these.
    """
    if n_boot < 1:
        raise TransferError(f"n_boot must be >= 1, got {n_boot}")
    ind = {name: _as_array(indicators[name]) for name in (*first, *second) if name in indicators}
    first = [f for f in first if f in ind]
    second = [f for f in second if f in ind]
    if not first or not second:
        raise TransferError(f"both groups need an indicator that was measured (have {sorted(indicators)})")
    tr = _as_array(transfer)
    n = tr.shape[0]
    everything = np.arange(n)
    obs_a, name_a = _best_of(ind, first, tr, everything)
    obs_b, name_b = _best_of(ind, second, tr, everything)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        idx = np.asarray(rng.integers(0, n, size=n))
        if len(set(idx.tolist())) < 3:
            continue
        a, _ = _best_of(ind, first, tr, idx)
        b, _ = _best_of(ind, second, tr, idx)
        if math.isfinite(a) and math.isfinite(b):
            diffs.append(a - b)
    d = np.asarray(diffs)
    return {
        "first": name_a,
        "second": name_b,
        "first_spearman": obs_a,
        "second_spearman": obs_b,
        "difference": obs_a - obs_b,
        "ci95": [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))] if len(d) else [math.nan, math.nan],
        "share_above_zero": float((d > 0).mean()) if len(d) else math.nan,
        "n_resamples": len(d),
        "n_boot": n_boot,
        "seed": seed,
        "first_group": list(first),
        "second_group": list(second),
    }


def indicator_stability(by_trial: Mapping[str, Sequence[Any]]) -> dict[str, dict[str, Any]]:
    """How much each indicator's task ranking depends on the trial (the prompt) it was measured on.

    `by_trial[name]` holds one matrix per trial (each task's k-th prompt and its skill neurons);
    for every pair of trials the Spearman correlation of their values over the task pairs A < B
    (the indicators are symmetric). 1: the trials rank task pairs alike.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, mats in by_trial.items():
        arrs = [_as_array(m) for m in mats]
        if len(arrs) < 2:
            raise TransferError(f"indicator stability needs at least two trials, {name!r} has {len(arrs)}")
        upper = np.triu_indices(arrs[0].shape[0], 1)
        pairs, rs = [], []
        for a, b in itertools.combinations(range(len(arrs)), 2):
            x, y = arrs[a][upper], arrs[b][upper]
            keep = np.isfinite(x) & np.isfinite(y)
            pairs.append([a, b])
            rs.append(spearman(x[keep], y[keep]) if int(keep.sum()) >= 3 else math.nan)
        out[name] = {"pairs": pairs, "spearman": rs, "spearman_mean": mean_finite(rs)}
    return out


def trial_correlations(by_trial: Mapping[str, Sequence[Any]], transfer: Any) -> dict[str, dict[str, Any]]:
    """Each trial's indicator against the transfer matrix: Spearman over pairs A != B, per trial."""
    tr = _as_array(transfer)
    out: dict[str, dict[str, Any]] = {}
    for name, mats in by_trial.items():
        rs = [_off_diagonal_spearman(_as_array(m), tr) for m in mats]
        fin = [r for r in rs if math.isfinite(r)]
        out[name] = {
            "spearman": rs,
            "min": min(fin) if fin else math.nan,
            "max": max(fin) if fin else math.nan,
        }
    return out


def average_linkage(similarity: Any) -> tuple[list[int], list[dict[str, Any]]]:
    """Agglomerative clustering of tasks by a symmetric similarity matrix (average linkage).

    Repeatedly merges the two clusters with the highest mean similarity between their members.
    Returns the leaf order of the resulting tree (similar tasks next to each other, for a
    clustered heatmap) and the merges: `{"left": [...], "right": [...], "similarity": s}`.
    """
    sim = _as_array(similarity)
    n = sim.shape[0]
    if sim.shape != (n, n):
        raise TransferError(f"a similarity matrix must be square, got {sim.shape}")
    clusters: list[list[int]] = [[i] for i in range(n)]
    merges: list[dict[str, Any]] = []
    while len(clusters) > 1:
        best, pair = -math.inf, (0, 1)
        for a, b in itertools.combinations(range(len(clusters)), 2):
            vals = sim[np.ix_(clusters[a], clusters[b])]
            vals = vals[np.isfinite(vals)]
            s = float(vals.mean()) if len(vals) else -math.inf
            if s > best:
                best, pair = s, (a, b)
        a, b = pair
        merges.append({"left": list(clusters[a]), "right": list(clusters[b]), "similarity": best})
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    return clusters[0], merges


def group_separation(similarity: Any, groups: Sequence[str], n_perm: int = 9999, seed: int = 0) -> dict[str, Any]:
    """Are tasks of the same group more similar than tasks of different groups?

    `groups[i]` names task i's group (declared before looking, e.g. "sentiment", "topic").
    The statistic is the mean similarity of pairs within a group minus that of pairs across
    groups; `p` is the one-sided permutation p-value over relabellings of the tasks' groups
    (the observed labelling included).
    """
    sim = _as_array(similarity)
    n = sim.shape[0]
    if len(groups) != n:
        raise TransferError(f"{len(groups)} group labels for {n} tasks")
    labels = np.asarray([str(g) for g in groups])
    upper = np.triu_indices(n, 1)
    vals = sim[upper]
    keep = np.isfinite(vals)

    def stat(lab: np.ndarray) -> float:
        same = (lab[:, None] == lab[None, :])[upper] & keep
        diff = ~(lab[:, None] == lab[None, :])[upper] & keep
        if not same.any() or not diff.any():
            return math.nan
        return float(vals[same].mean() - vals[diff].mean())

    observed = stat(labels)
    if not math.isfinite(observed):
        raise TransferError("group separation needs at least one pair within a group and one across groups")
    rng = np.random.default_rng(seed)
    hits = 1 + sum(stat(rng.permutation(labels)) >= observed - 1e-12 for _ in range(n_perm))
    same = (labels[:, None] == labels[None, :])[upper] & keep
    return {
        "within": float(vals[same].mean()),
        "across": float(vals[~same & keep].mean()),
        "difference": observed,
        "p": hits / (n_perm + 1),
        "permutations": n_perm,
        "groups": {g: [i for i in range(n) if labels[i] == g] for g in dict.fromkeys(labels.tolist())},
    }


# --------------------------------------------------------------------------- helpers
def task_slug(name: str) -> str:
    """A directory name for a task (`bbc_news:sport-vs-business` -> `bbc_news_sport-vs-business`)."""
    slug = re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "task"
    if "/" in name or "\\" in name:  # paths and hub ids: keep distinct names distinct
        slug += "-" + hashlib.sha1(name.encode()).hexdigest()[:6]
    return slug
