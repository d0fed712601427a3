"""Figures. Each function returns a matplotlib `Figure`; given a `path` it also writes the figure there.

Figures are made without pyplot (no global figure list, nothing shown on screen, nothing left open),
so a notebook shows the returned figure and a script writes it. `ax=` draws into the caller's axes
instead (a pair of them for the two-panel figures), e.g. to combine several plots in one figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tl_skill.experiments.ablation import AblationResult
from tl_skill.experiments.causal import AttributionResult, SteeringResult
from tl_skill.experiments.comparisons import top_mask
from tl_skill.files import atomic_write
from tl_skill.indicators import average_linkage
from tl_skill.neurons import SkillNeurons


def _panels(ax: Any, n: int, figsize: tuple[float, float], **kw: Any) -> tuple[Figure, Any]:
    """(figure, axes): the caller's `ax` (one Axes, or a sequence of `n`) or a new figure of `n` panels in a row."""
    if ax is None:
        fig = Figure(figsize=figsize, layout="tight")  # laid out whenever drawn or saved
        return fig, fig.subplots(1, n, **kw)
    axes = [ax] if isinstance(ax, Axes) else list(ax)
    if len(axes) != n or not all(isinstance(a, Axes) for a in axes):
        raise TypeError(f"ax must be {'one matplotlib Axes' if n == 1 else f'a sequence of {n} Axes'}, got {ax!r}")
    owner = axes[0].get_figure()
    assert isinstance(owner, Figure)
    return owner, (axes[0] if n == 1 else axes)


def _finish(fig: Figure, path: str | Path | None) -> Figure:
    """Write `fig` to `path` when one is given; the figure."""
    if path is not None:
        path = Path(path)
        fmt = path.suffix[1:] or "png"
        # bbox "tight": nothing clipped (long task names, colorbars)
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"))
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` to `path` (atomically; the format from the suffix, PNG by default)."""
    _finish(fig, path)
    return Path(path)


def plot_layer_distribution(sn, path: str | Path | None = None, fraction: float = 0.01, *, ax: Any = None) -> Figure:
    """Per layer: best and mean predictivity (left), and how many of the global top neurons it holds (right)."""
    pred = sn.predictivity.numpy()
    layers = np.asarray(sn.layers)
    mask = sn.select(fraction=fraction, per_layer=False).numpy()
    top_k = int(mask.sum())
    fig, (a, b) = _panels(ax, 2, (11, 3.8))
    a.plot(layers, pred.max(1), "o-", label="best neuron")
    a.plot(
        layers, np.sort(pred, 1)[:, -max(1, pred.shape[1] // 100) :].mean(1), "s-", label="top 1% of the layer (mean)"
    )
    a.plot(layers, pred.mean(1), "^-", label="all neurons (mean)")
    acc = sn.prompt_accuracy("dev_accuracy")
    if acc is not None:
        a.axhline(acc, color="k", ls="--", lw=1, label=f"prompt's dev accuracy ({acc:.3f})")
    a.set_xlabel("layer")
    a.set_ylabel("predictivity")
    a.set_title(f"Predictivity by layer: {sn.task}")
    a.legend(fontsize=8)
    b.bar(layers, mask.sum(1), color="tab:orange")
    b.set_xlabel("layer")
    b.set_ylabel("neurons")
    b.set_title(f"Where the global top {fraction:.0%} ({top_k}) skill neurons are")
    return _finish(fig, path)


def plot_units_by_layer(found: dict, path: str | Path | None = None, title: str = "", *, ax: Any = None) -> Figure:
    """Best (left) and top-1% mean (right) predictivity by layer, one curve per unit source ({name: SkillNeurons})."""
    fig, axes = _panels(ax, 2, (11, 3.8), sharey=True)
    for name, sn in found.items():
        pred = sn.predictivity.numpy()
        layers = np.asarray(sn.layers)
        top = np.sort(pred, 1)[:, -max(1, pred.shape[1] // 100) :].mean(1)
        label = f"{name} ({pred.shape[1]} per layer)"
        axes[0].plot(layers, pred.max(1), "o-", ms=3, label=label)
        axes[1].plot(layers, top, "o-", ms=3, label=label)
    first = next(iter(found.values()))
    acc = first.prompt_accuracy("dev_accuracy")
    for ax, what in zip(axes, ("best unit", "top 1% of the layer (mean)")):
        if acc is not None:
            ax.axhline(acc, color="k", ls="--", lw=1, label=f"prompt's dev accuracy ({acc:.3f})")
        ax.set_xlabel("layer")
        ax.set_title(what)
    axes[0].set_ylabel("predictivity")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _finish(fig, path)


def plot_statistics(sn, path: str | Path | None = None, q: float = 0.05, *, ax: Any = None) -> Figure:
    """FDR-significant neurons per layer (left); selection-split vs held-out predictivity of the top 1% (right)."""
    layers = np.asarray(sn.layers)
    sig = sn.significant(q).sum(1).numpy()
    fig, (a, b) = _panels(ax, 2, (11, 3.8))
    a.bar(layers, sig, color="tab:blue")
    a.axhline(sn.d_mlp, color="k", ls=":", lw=1, label=f"all {sn.d_mlp} neurons of a layer")
    a.set_xlabel("layer")
    a.set_ylabel(f"neurons with q <= {q:g}")
    a.set_title(f"FDR-significant neurons: {int(sig.sum())} of {sn.n_layers * sn.d_mlp}")
    a.legend(fontsize=8, loc="upper left")
    if sn.has_counts("confirm"):
        mask = sn._top1pct_mask().numpy()
        x, y = sn.predictivity.numpy()[mask], sn.heldout_predictivity().numpy()[mask]
        b.scatter(x, y, s=6, alpha=0.5, label="top 1% of each layer")
        lo, hi = min(x.min(), y.min()) - 0.01, max(x.max(), y.max()) + 0.01
        b.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="held out = selection")
        acc = sn.prompt_accuracy("test_accuracy")
        if acc is not None:
            b.axhline(acc, color="tab:red", ls="--", lw=1, label=f"prompt's test accuracy ({acc:.3f})")
        if sn.has_counts("control"):
            c = sn.control_summary(q)["best_predictivity"]
            b.axvline(c, color="tab:gray", ls=":", lw=1, label=f"best under shuffled labels ({c:.3f})")
        b.set_xlabel(f"predictivity on {sn.meta.get('split', 'dev')} (selection)")
        b.set_ylabel(f"held-out accuracy on {sn.meta.get('confirm_split')}")
        b.set_title("Held-out confirmation of the selected neurons")
        b.legend(fontsize=8, loc="upper left")
    else:
        b.axis("off")
    return _finish(fig, path)


def plot_activation_histogram(
    values: np.ndarray,
    labels: np.ndarray,
    baseline: float,
    path: str | Path | None = None,
    title: str = "",
    label_names: Sequence[str] | None = None,
    *,
    ax: Any = None,
) -> Figure:
    """Activation of one neuron on each example, by class, with its baseline (the paper's Figure 1)."""
    values, labels = np.asarray(values), np.asarray(labels)
    if label_names is None:
        label_names = [f"class {c}" for c in range(int(labels.max()) + 1)]
    fig, ax = _panels(ax, 1, (6.4, 3.8))
    lo, hi = np.percentile(values, [0.5, 99.5])
    bins: Any = np.linspace(lo, hi, 40).tolist() if hi > lo else 20
    for c, name in enumerate(label_names):
        ax.hist(values[labels == c], bins=bins, alpha=0.55, label=f"{name.strip()} (n={int((labels == c).sum())})")
    ax.axvline(baseline, color="k", ls="--", lw=1.2, label="baseline (train mean)")
    ax.set_xlabel("activation at the prompt position")
    ax.set_ylabel("examples")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_predictivity_histogram(
    samples: dict[str, np.ndarray], path: str | Path | None = None, title: str = "", *, ax: Any = None
) -> Figure:
    """Distribution of neuron predictivity for one or more models/settings."""
    fig, ax = _panels(ax, 1, (6.4, 3.8))
    lo = min(float(v.min()) for v in samples.values())
    hi = max(float(v.max()) for v in samples.values())
    bins = np.linspace(lo, hi, 50).tolist()
    for name, v in samples.items():
        ax.hist(v, bins=bins, alpha=0.5, label=f"{name} (best {v.max():.3f})", density=True)
    ax.set_xlabel("neuron predictivity")
    ax.set_ylabel("density")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_training_curve(history: Any, path: str | Path | None = None, title: str = "", *, ax: Any = None) -> Figure:
    """Training loss (moving mean) and dev accuracy by step, from a run's history (or the `Run` itself)."""
    if hasattr(history, "info"):
        title = title or f"Prompt tuning: {history.info['model']} on {history.info['task']}"
        history = history.info.get("history", [])
    steps = [h["step"] for h in history]
    loss = [h["loss"] for h in history]
    dev = [(h["step"], h["dev_accuracy"]) for h in history if "dev_accuracy" in h]
    fig, ax = _panels(ax, 1, (6.4, 3.6))
    k = max(1, len(loss) // 30)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    ax.plot(steps[k - 1 :], smooth, color="tab:blue", label=f"train loss (moving mean of {k})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if dev:
        ax2 = ax.twinx()
        ax2.plot(*zip(*dev), "o-", color="tab:red", label="dev accuracy")
        ax2.set_ylabel("dev accuracy", color="tab:red")
    ax.set_title(title, fontsize=10)
    return _finish(fig, path)


def plot_ablation(result, path: str | Path | None = None, *, ax: Any = None) -> Figure:
    """Test accuracy against the fraction of neurons perturbed: skill neurons, random neurons
    (mean ± std over seeds, as a band) and the unperturbed model (a horizontal line).

    `result` is an `AblationResult` (or a dict of its fields: the origin study's sections), or
    the directory / `ablation.json` it was saved in.
    """
    from matplotlib.ticker import NullFormatter

    if isinstance(result, (str, Path)):
        result = AblationResult.load(result)
    nan = float("nan")
    val = lambda v: nan if v is None else float(v)
    rows = result["rows"]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    settings = result.get("settings", {})
    fig, ax = _panels(ax, 1, (6.8, 4.2))
    skill_colors, random_colors = ["tab:red", "tab:purple", "tab:brown"], ["tab:blue", "tab:cyan", "tab:green"]
    n_seeds = len(result.get("seeds", [])) or max((len(r.get("random_accuracies", [])) for r in rows), default=0)
    for j, mode in enumerate(modes):
        rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["fraction"])
        x = np.array([100 * r["fraction"] for r in rs])
        skill = np.array([val(r["skill_accuracy"]) for r in rs])
        rand = np.array([val(r["random_accuracy"]) for r in rs])
        sd = np.array([val(r["random_accuracy_std"]) for r in rs])
        tag = f" ({mode})" if len(modes) > 1 else ""
        ax.plot(x, skill, "o-", color=skill_colors[j % 3], label=f"skill neurons{tag}")
        ax.plot(
            x,
            rand,
            "s--",
            color=random_colors[j % 3],
            label=f"random neurons{tag}, mean ± std over {n_seeds} seed{'s' if n_seeds != 1 else ''}",
        )
        ax.fill_between(x, rand - sd, rand + sd, color=random_colors[j % 3], alpha=0.2, lw=0)
    clean = next((r["clean_accuracy"] for r in rows if r.get("clean_accuracy") is not None), None)
    if clean is not None:
        ax.axhline(clean, color="k", ls="-", lw=1, label=f"no perturbation ({clean:.3f})")
    if result.get("majority_accuracy") is not None:
        ax.axhline(
            result["majority_accuracy"],
            color="gray",
            ls=":",
            lw=1,
            label=f"majority class ({result['majority_accuracy']:.3f})",
        )
    fr = sorted({100 * r["fraction"] for r in rows})
    if fr and fr[0] > 0:
        ax.set_xscale("log")
        ax.set_xticks(fr)
        ax.set_xticklabels([f"{v:g}" for v in fr])
        ax.xaxis.set_minor_formatter(NullFormatter())
    per_layer = result.get("per_layer", settings.get("per_layer", True))
    ax.set_xlabel("neurons perturbed (% of each layer)" if per_layer else "neurons perturbed (% of all neurons)")
    ax.set_ylabel(f"test accuracy (n={result.get('n_examples', '?')})")
    if modes == ["noise"] and settings.get("std") is not None:
        how = f"Gaussian noise, std {settings['std']:g}" + (" × neuron std" if settings.get("relative") else "")
    else:
        how = (
            {"zero": "set to zero", "mean": "set to baseline mean"}.get(modes[0], modes[0])
            if len(modes) == 1
            else "perturbation"
        )
    ax.set_title(
        f"{result.get('model', '?')} / {result.get('task', '?')}: skill vs random neurons\n({how})", fontsize=10
    )
    ax.legend(fontsize=8)
    return _finish(fig, path)


# --- transfer (method §8) --------------------------------------------------------
def plot_task_matrix(
    matrix,
    tasks: Sequence[str],
    path: str | Path | None = None,
    title: str = "",
    cbar_label: str = "",
    cmap: str = "viridis",
    center: float | None = None,
    scale_diagonal: bool = True,
    *,
    ax: Any = None,
) -> Figure:
    """Task x task heatmap (rows: source task, columns: target task), each cell annotated.

    `scale_diagonal=False`: the colour scale spans the off-diagonal cells only and the
    diagonal is drawn grey (a similarity of a task with itself, 1, would otherwise
    flatten every other difference); its values are still written in the cells.
    """
    m = np.asarray([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
    n = len(tasks)
    size = max(4.0, 0.9 * n + 2.2)
    fig, ax = _panels(ax, 1, (size + 1.0, size))
    shown = m.copy()
    if not scale_diagonal and n > 1:
        np.fill_diagonal(shown, np.nan)
        ax.imshow(np.where(np.eye(n, dtype=bool), 1.0, np.nan), cmap="Greys", vmin=0, vmax=4)
    finite = shown[np.isfinite(shown)]
    kw: dict[str, Any] = {}
    if center is not None and finite.size:
        half = float(np.abs(finite - center).max()) or 1.0
        kw = dict(vmin=center - half, vmax=center + half)
        cmap = "RdBu_r" if cmap == "viridis" else cmap
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, **kw)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=cbar_label)
    labels = [t if len(t) <= 28 else t[:26] + ".." for t in tasks]
    ax.set_xticks(range(n), labels, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("target task")
    ax.set_ylabel("source task (prompt)")
    if n <= 12:
        fmt = ".3f" if finite.size and float(np.abs(finite).max()) < 0.1 else ".2f"
        for i in range(n):
            for j in range(n):
                if np.isfinite(m[i, j]):
                    r, g, b, _ = im.cmap(im.norm(m[i, j])) if np.isfinite(shown[i, j]) else (0.9, 0.9, 0.9, 1)
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # the cell's own colour decides the text's
                    ax.text(
                        j,
                        i,
                        format(m[i, j], fmt),
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if dark else "black",
                    )
    ax.set_title(title, fontsize=10)
    return _finish(fig, path)


def plot_indicator_correlations(
    correlations: dict, path: str | Path | None = None, title: str = "", *, ax: Any = None
) -> Figure:
    """Spearman correlation of each indicator (bars) with each kind of transfer performance (groups).

    `correlations`: {indicator: {kind: {spearman, ...}}}, or `transfer.json`'s form with the
    kinds under `by_transfer`.
    """
    correlations = {name: c.get("by_transfer", c) for name, c in correlations.items()}
    indicators = list(correlations)
    kinds = list(next(iter(correlations.values()))) if indicators else []
    fig, ax = _panels(ax, 1, (max(6.4, 1.1 * len(indicators) + 2), 4.0))
    width = 0.8 / max(1, len(kinds))
    x = np.arange(len(indicators))
    for k, kind in enumerate(kinds):
        vals = [correlations[name][kind]["spearman"] for name in indicators]
        vals = [np.nan if v is None else v for v in vals]
        ax.bar(x + (k - (len(kinds) - 1) / 2) * width, vals, width, label=kind)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, indicators, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Spearman correlation with transfer")
    ax.set_ylim(-1.05, 1.05)
    ax.set_title(title or "Indicators vs transfer performance (pairs A != B)", fontsize=10)
    ax.legend(fontsize=8, title="transfer", title_fontsize=8)
    return _finish(fig, path)


def plot_task_clusters(
    matrix,
    tasks: Sequence[str],
    path: str | Path | None = None,
    title: str = "",
    cbar_label: str = "",
    groups: Sequence[str] | None = None,
    *,
    ax: Any = None,
) -> Figure:
    """A symmetric task-similarity matrix with its tasks in the order of an average-linkage clustering
    (`indicators.average_linkage`): similar tasks sit next to each other. `groups` (one label per task,
    declared beforehand) colours the tick labels, so a grouping the data recovers shows as blocks."""
    order, _ = average_linkage(matrix)
    m = np.asarray([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
    ordered = m[np.ix_(order, order)]
    names = [tasks[i] for i in order]
    fig = plot_task_matrix(ordered, names, None, title, cbar_label, scale_diagonal=False, ax=ax)
    axes = fig.axes[0] if ax is None else ax
    axes.set_xlabel("task (clustered)")
    axes.set_ylabel("task (clustered)")
    if groups is not None:
        if len(groups) != len(tasks):
            raise ValueError(f"{len(groups)} group labels for {len(tasks)} tasks")
        palette = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:gray"]
        kinds = list(dict.fromkeys(str(g) for g in groups))
        colour = {k: palette[i % len(palette)] for i, k in enumerate(kinds)}
        for ticks in (axes.get_xticklabels(), axes.get_yticklabels()):
            for label, i in zip(ticks, order):
                label.set_color(colour[str(groups[i])])
        handles = [axes.plot([], [], "s", color=colour[k], label=k)[0] for k in kinds]
        axes.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.25, 1.0), title="group")
    return _finish(fig, path)


def plot_transfer_figures(result: Any, out_dir: str | Path) -> list[Path]:
    """Write all transfer figures of a `transfer.json` dict into `out_dir`: one heatmap per transfer kind and
    indicator, and the indicators' correlations with transfer; their paths."""
    out_dir = Path(out_dir)
    tasks = result["tasks"]
    model = result.get("model", "")
    paths = []
    for kind, m in result["transfer"].items():
        center = 0.0 if kind.endswith("gain") else None
        paths.append(out_dir / f"transfer_{kind}.png")
        cmap = "magma" if center is None else "RdBu_r"
        plot_task_matrix(m, tasks, paths[-1], f"{model}: transfer ({kind})", kind, cmap=cmap, center=center)
    for name, m in result["indicators"].items():
        paths.append(out_dir / f"indicator_{name}.png")
        plot_task_matrix(m, tasks, paths[-1], f"{model}: task similarity ({name})", name, scale_diagonal=False)
    if len(tasks) >= 3:
        for name in ("neuron_topk_jaccard", "neuron_spearman"):
            if name in result["indicators"]:
                paths.append(out_dir / f"clusters_{name}.png")
                plot_task_clusters(
                    result["indicators"][name], tasks, paths[-1], f"{model}: tasks clustered by {name}", name
                )
    if result.get("correlations"):
        paths.append(out_dir / "correlations.png")
        title = f"{model}: indicators vs transfer ({len(tasks)} tasks)"
        plot_indicator_correlations(result["correlations"], paths[-1], title)
    return paths


# --- origin of skill neurons (method §9) -------------------------------------------
def plot_predictivity_scatter(
    x: np.ndarray,
    y: np.ndarray,
    path: str | Path | None = None,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    highlight: np.ndarray | None = None,
    *,
    ax: Any = None,
) -> Figure:
    """Predictivity of every neuron under two settings, one point per neuron, with the diagonal.

    `highlight` (bool per neuron) marks the skill neurons of either setting.
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    fig, ax = _panels(ax, 1, (5.2, 5.0))
    rest = np.ones(len(x), dtype=bool) if highlight is None else ~np.asarray(highlight, dtype=bool).ravel()
    ax.scatter(x[rest], y[rest], s=4, alpha=0.3, color="tab:blue", lw=0, label="neurons")
    if highlight is not None and (~rest).any():
        ax.scatter(x[~rest], y[~rest], s=12, alpha=0.9, color="tab:red", lw=0, label="skill neurons (either)")
    lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([lo, hi], [lo, hi], color="k", lw=1, ls="--", label="y = x")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _finish(fig, path)


def plot_origin_figures(result, out_dir: str | Path) -> list[Path]:
    """The origin study's figures from its `origin.json` (an `OriginResult`) and the neuron directories it
    names: predictivity pretrained vs random weights, original vs other label words, and each tuned
    model's perturbation curve (file names as each section's `figure` records them)."""
    out_dir = Path(out_dir)
    parts = {name: sec for name, sec in result.parts().items() if sec.get("status") == "done"}
    if not parts:
        return []
    source = SkillNeurons.load(result.source["neurons_dir"])
    paths = []
    rw = parts.get("random_weights")
    if rw:
        rand = SkillNeurons.load(rw["neurons_dir"])
        paths.append(out_dir / rw["figure"])
        plot_predictivity_histogram(
            {
                "pretrained": source.predictivity.reshape(-1).numpy(),
                "random weights": rand.predictivity.reshape(-1).numpy(),
            },
            paths[-1],
            f"{source.model} / {source.task}: neuron predictivity, pretrained vs random weights",
        )
    lw = parts.get("label_words")
    if lw:
        alt = SkillNeurons.load(lw["neurons_dir"])
        k = lw["top_per_layer"]
        rho, overlap = lw.get("spearman"), lw.get("top_overlap")
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
        paths.append(out_dir / lw["figure"])
        plot_predictivity_scatter(
            source.predictivity.reshape(-1).numpy(),
            alt.predictivity.reshape(-1).numpy(),
            paths[-1],
            xlabel=f"predictivity with {'/'.join(w.strip() for w in lw['original'])}",
            ylabel=f"predictivity with {'/'.join(w.strip() for w in lw['alternative'])}",
            title=f"{source.model} / {source.task}: label words\n(Spearman {fmt(rho)}, top overlap {fmt(overlap)})",
            highlight=(top_mask(source.predictivity, k) | top_mask(alt.predictivity, k)).reshape(-1).numpy(),
        )
    settings = result.settings
    for method in ("lora", "bitfit"):
        sec = parts.get(method)
        if not sec:
            continue
        what = (
            "LoRA" if method == "lora" else f"BitFit ({'normalisation weights' if sec.get('fallback') else 'biases'})"
        )
        noise = settings.get("mode") == "noise"
        paths.append(out_dir / sec["figure"])
        plot_ablation(
            {
                "rows": sec["rows"],
                "model": f"{source.model} ({what})",
                "task": source.task,
                "seeds": settings.get("seeds", []),
                "n_examples": sec["n_examples"],
                "majority_accuracy": sec.get("majority_accuracy"),
                "settings": {
                    "std": settings.get("std") if noise else None,
                    "relative": settings.get("relative"),
                    "per_layer": True,
                },
            },
            paths[-1],
        )
    return paths


# --- causal evidence ----------------------------------------------------------------
def plot_attribution(result: Any, path: str | Path | None = None, *, ax: Any = None) -> Figure:
    """Attribution (first-order estimate) against the true effect of mean-ablating each verified unit on the
    margin (left), and per layer, Spearman of predictivity vs |attribution| (right). `result`: an
    `AttributionResult` (or its directory)."""
    if isinstance(result, (str, Path)):
        result = AttributionResult.load(result)
    fig, (a, b) = _panels(ax, 2, (11, 4.0))
    colours = {"attribution": "tab:blue", "predictivity": "tab:orange", "both": "tab:green"}
    for kind, colour in colours.items():
        rows = [v for v in result.verified if v["picked_by"] == kind]
        if rows:
            a.scatter(
                [v["attribution"] for v in rows],
                [v["true_effect"] for v in rows],
                s=18,
                color=colour,
                label=f"top by {kind}" if kind != "both" else "top by both",
            )
    vals = [v["attribution"] for v in result.verified] + [v["true_effect"] for v in result.verified]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    a.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    rho = result.agreement.get("spearman")
    a.set_xlabel("attribution (first-order effect on the margin)")
    a.set_ylabel("true effect of mean-ablating the unit")
    a.set_title(f"{result.model} / {result.task}: attribution vs patching (Spearman {_fmt(rho)})", fontsize=10)
    a.legend(fontsize=8)
    per = result.evidence.get("spearman_per_layer", {})
    layers = [int(l) for l in per]
    b.bar(layers, [np.nan if v is None else v for v in per.values()], color="tab:purple")
    b.axhline(0, color="k", lw=0.8)
    b.set_xlabel("layer")
    b.set_ylabel("Spearman(predictivity, |attribution|)")
    ratio = result.evidence.get("top_overlap_ratio")
    b.set_title(f"Predictive vs causal ranking per layer (top-1% overlap {_fmt(ratio)} x chance)", fontsize=10)
    return _finish(fig, path)


def plot_steering(result: Any, path: str | Path | None = None, *, ax: Any = None) -> Figure:
    """Share of predictions flipped to the target class against the units steered per layer, for each strength:
    skill units (solid) and random units (dashed, mean ± std over seeds). `result`: a `SteeringResult`."""
    if isinstance(result, (str, Path)):
        result = SteeringResult.load(result)
    fig, ax = _panels(ax, 1, (6.8, 4.2))
    for j, s in enumerate(result.strengths):
        rows = sorted((r for r in result.rows if r["strength"] == s), key=lambda r: r["fraction"])
        x = np.array([100 * r["fraction"] for r in rows])
        skill = np.array([r["skill_flip_rate"] for r in rows])
        rand = np.array([r["random_flip_rate"] for r in rows])
        sd = np.array([r["random_flip_rate_std"] for r in rows])
        colour = f"C{j}"
        ax.plot(x, skill, "o-", color=colour, label=f"skill units, strength {s:g}")
        ax.plot(x, rand, "s--", color=colour, alpha=0.7, label=f"random units, strength {s:g}")
        ax.fill_between(x, rand - sd, rand + sd, color=colour, alpha=0.15, lw=0)
    ax.axhline(0.5, color="gray", ls=":", lw=1, label="half the predictions")
    if result.fractions and min(result.fractions) > 0:
        ax.set_xscale("log")
        ax.set_xticks([100 * f for f in result.fractions], [f"{100 * f:g}" for f in result.fractions])
    ax.set_xlabel("units steered (% of each layer)")
    ax.set_ylabel(f"predictions flipped (n={result.n_pairs} example-target pairs)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{result.model} / {result.task}: steering towards another class ({result.positions})", fontsize=10)
    ax.legend(fontsize=7)
    return _finish(fig, path)


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.2f}"
