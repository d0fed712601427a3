"""Statistics for skill neurons (method §3b): exact p-values, FDR, trial stability, paired tests.

Exact p-values. The baseline comes from train, so on an evaluation split the
rule "above baseline -> positive" is fixed before the labels are seen. Under
the null (labels exchangeable) the number of positives among the `A`
above-baseline examples is hypergeometric(N, n_pos, A). Its two-sided p-value
is the probability of every outcome no more likely than the observed one (the
rule of Fisher's exact test). A constant neuron (never above its baseline,
A = 0) has p = 1. All neurons sharing (N, n_pos) are served by one table over
(A, k), so 46k neurons x 16 positions take well under a second.

Combining. A neuron's predictivity is a max over prompt positions (and
subtasks), so its p-value is Bonferroni-corrected over those (valid under any
dependence between positions); over several trials (prompts) the neuron's
p-value is the largest over trials, a valid p-value for "predictive in every
trial" (the conjunction null). Benjamini-Hochberg (or Benjamini-Yekutieli,
valid under any dependence) controls the false discovery rate over neurons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from tl_skill.errors import StatsError

TIE_TOLERANCE = 1e-7  # outcomes whose probability is within this relative margin count as ties


def _log_comb(n, k) -> torch.Tensor:
    n, k = torch.as_tensor(n, dtype=torch.float64), torch.as_tensor(k, dtype=torch.float64)
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def hypergeom_log_pmf_table(N: int, n_pos: int) -> torch.Tensor:
    """log P(K = k | A) for every A in 0..N (rows) and k in 0..n_pos (columns); -inf off the support."""
    A = torch.arange(N + 1, dtype=torch.float64)[:, None]
    k = torch.arange(n_pos + 1, dtype=torch.float64)[None, :]
    inside = (k <= A) & (A - k <= N - n_pos)
    n_neg = float(N - n_pos)
    kk, aa = torch.broadcast_tensors(k, A)
    logp = _log_comb(float(n_pos), kk) + _log_comb(n_neg, (aa - kk).clamp(min=0)) - _log_comb(float(N), aa)
    return torch.where(inside, logp, torch.tensor(-math.inf, dtype=torch.float64))


def two_sided_table(N: int, n_pos: int) -> torch.Tensor:
    """Two-sided exact p-value for every (A, k): the mass of outcomes no more likely than k."""
    pmf = hypergeom_log_pmf_table(N, n_pos).exp()
    sorted_pmf, _ = torch.sort(pmf, dim=1)
    cum = torch.cumsum(sorted_pmf, dim=1)
    # p(k) = sum of pmf(j) over pmf(j) <= pmf(k) * (1 + tol): the cumulative sum up to that rank
    idx = torch.searchsorted(sorted_pmf.contiguous(), (pmf * (1 + TIE_TOLERANCE)).contiguous(), right=True) - 1
    p = torch.gather(cum, 1, idx.clamp(min=0))
    return torch.where(pmf > 0, p.clamp(max=1.0), torch.ones_like(p))


def one_sided_tables(N: int, n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(K >= k | A), P(K <= k | A)) for every (A, k)."""
    pmf = hypergeom_log_pmf_table(N, n_pos).exp()
    upper = torch.flip(torch.cumsum(torch.flip(pmf, [1]), 1), [1]).clamp(max=1.0)
    lower = torch.cumsum(pmf, 1).clamp(max=1.0)
    return upper, lower


def hypergeom_p_values(
    pos_above: torch.Tensor, neg_above: torch.Tensor, n_pos: int, n_neg: int, alternative: str = "two-sided"
) -> torch.Tensor:
    """Exact p-values of `pos_above` positives among `pos_above + neg_above` above-baseline examples.

    Args:
        alternative: "two-sided", "greater" (more positives above than chance) or "less".
    """
    N = n_pos + n_neg
    k = pos_above.long()
    A = k + neg_above.long()
    if alternative == "two-sided":
        table = two_sided_table(N, n_pos)
    elif alternative in ("greater", "less"):
        table = one_sided_tables(N, n_pos)[0 if alternative == "greater" else 1]
    else:
        raise StatsError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    return table[A, k]


def benjamini_hochberg(p: torch.Tensor, method: str = "bh") -> torch.Tensor:
    """q-values (adjusted p-values) of step-up FDR control over all entries of `p`.

    `method`: "bh" (Benjamini-Hochberg, independent or positively dependent
    tests) or "by" (Benjamini-Yekutieli, any dependence).
    """
    flat = p.reshape(-1).double()
    m = flat.numel()
    if m == 0:
        return p.clone()
    order = torch.argsort(flat)
    ranks = torch.arange(1, m + 1, dtype=torch.float64)
    scale = 1.0
    if method == "by":
        scale = float((1.0 / ranks).sum())
    elif method != "bh":
        raise StatsError(f"FDR method must be 'bh' or 'by', got {method!r}")
    adj = flat[order] * m * scale / ranks
    adj = torch.flip(torch.cummin(torch.flip(adj, [0]), 0).values, [0]).clamp(max=1.0)
    out = torch.empty_like(flat)
    out[order] = adj
    return out.reshape(p.shape)


# ----------------------------------------------------------------------------- trials
def rankdata(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the average of their ranks (finite values expected)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of each distinct value's last copy
    return ((last - counts + 1 + last) / 2.0)[inverse.ravel()]


def spearman(x: torch.Tensor | np.ndarray | Sequence[float], y: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """Spearman correlation (average ranks for ties); NaN when either side is constant."""
    as_np = lambda v: v.reshape(-1).double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, float).ravel()
    rx, ry = rankdata(as_np(x)), rankdata(as_np(y))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def top_k_per_layer(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask [L, D] of each layer's k best scores (ties broken by index)."""
    order = torch.sort(-scores.double(), dim=1, stable=True).indices[:, :k]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask


def jaccard_chance(D: int, k: int) -> float:
    """Expected Jaccard index of two independent random k-subsets of D items."""
    if k == 0:
        return float("nan")
    x = torch.arange(0, k + 1, dtype=torch.float64)
    logp = _log_comb(k, x) + _log_comb(D - k, k - x) - _log_comb(D, k)
    return float((logp.exp() * x / (2 * k - x)).sum())


def trial_stability(per_run: torch.Tensor, fraction: float = 0.01) -> dict:
    """Agreement of R >= 2 trials' predictivity [R, L, D]: rank correlation, top-k overlap, shared top-k."""
    R, L, D = per_run.shape
    if R < 2:
        raise StatsError("trial stability needs at least two trials")
    k = max(1, int(fraction * D))
    tops = [top_k_per_layer(per_run[r], k) for r in range(R)]
    pairs, spear, jac = [], [], []
    for a in range(R):
        for b in range(a + 1, R):
            inter = (tops[a] & tops[b]).sum(1).double()
            union = (tops[a] | tops[b]).sum(1).double()
            pairs.append([a, b])
            spear.append(spearman(per_run[a], per_run[b]))
            jac.append(float((inter / union).mean()))
    mean_top = top_k_per_layer(per_run.mean(0), k)
    in_all = mean_top.clone()
    for t in tops:
        in_all &= t
    return {
        "n_trials": R,
        "fraction": fraction,
        "k_per_layer": k,
        "pairs": pairs,
        "spearman": spear,
        "spearman_mean": float(np.mean(spear)),
        "topk_jaccard": jac,
        "topk_jaccard_mean": float(np.mean(jac)),
        "topk_jaccard_chance": jaccard_chance(D, k),
        "mean_topk_in_every_trial": float(in_all.sum() / mean_top.sum()),
        "mean_topk_in_every_trial_chance": (k / D) ** R,
    }


# -------------------------------------------------------------------- paired tests
def mcnemar_exact(correct_a: Sequence[int], correct_b: Sequence[int]) -> dict:
    """Exact McNemar test of two classifiers on the same examples (two-sided binomial on discordant pairs)."""
    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise StatsError(f"paired predictions differ in length: {a.shape} vs {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        p = 1.0
    else:
        k = min(only_a, only_b)
        logs = [
            math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)
        ]
        p = min(1.0, 2 * sum(math.exp(x) for x in logs))
    return {"only_a_correct": only_a, "only_b_correct": only_b, "p_value": p}


def paired_bootstrap(
    correct_skill: Sequence[int],
    correct_random: Sequence[Sequence[int]],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """CI of accuracy(skill) - mean accuracy(random) resampling examples and random seeds together.

    Each replicate draws n examples with replacement (the same for both sides:
    the pairing) and S random seeds with replacement (the spread of the random
    control): draws are `rng.integers(0, n, (n_boot, n))`, then
    `rng.integers(0, S, (n_boot, S))` from `numpy.random.default_rng(seed)`.
    """
    skill = np.asarray(correct_skill, dtype=np.float64)
    rand = np.asarray(correct_random, dtype=np.float64)
    if rand.ndim != 2 or rand.shape[1] != skill.shape[0]:
        raise StatsError(f"random predictions must be [seeds, {skill.shape[0]}], got {rand.shape}")
    n, S = skill.shape[0], rand.shape[0]
    rng = np.random.default_rng(seed)
    ex = rng.integers(0, n, (n_boot, n))
    sd = rng.integers(0, S, (n_boot, S))
    skill_acc = skill[ex].mean(1)
    rand_acc = rand[:, ex].mean(2)  # [S, n_boot]
    picked = np.take_along_axis(rand_acc.T, sd, axis=1).mean(1)
    diffs = skill_acc - picked
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    return {
        "difference": float(skill.mean() - rand.mean()),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "level": level,
        "n_boot": n_boot,
    }
