"""The multi-task study's evidence on claims (e) and (f): one JSON, the markdown tables of
docs/results/study.md and a clustered similarity figure, from a finished `tl-skill study` directory.

    python benchmarks/study_summary.py study_suite --out benchmarks/results/study_suite.json \\
        --figures docs/figures --prefix study_suite

Task groups are declared here, before looking at any result (the Osgood evaluation dimension and
sentiment; topic and domain; the rest), and may be given on the command line as
`--group TASK=GROUP` (repeatable) for tasks this table does not know.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tl_skill.experiments.transfer import StudyResult, TransferResult
from tl_skill.files import atomic_json
from tl_skill.indicators import (
    ACTIVATION_INDICATORS,
    NEURON_INDICATORS,
    PROMPT_INDICATORS,
    TRANSFER_KINDS,
    average_linkage,
    group_separation,
)

GROUPS = {
    "rotten_tomatoes": "sentiment",
    "word_sentiment": "sentiment",
    "gi_sentiment": "sentiment",
    "gi_virtue": "sentiment",
    "moral_foundations:virtue-vs-vice": "sentiment",
    "subjectivity": "other",
    "gi_potency": "other",
    "gi_activity": "other",
    "political_party": "other",
}
GROUP_PREFIXES = {"bbc_news": "topic", "gi_domain": "topic"}
MAIN_KIND = "init_gain"
ALPHA = 0.05


def group_of(task: str, extra: dict[str, str]) -> str:
    if task in extra:
        return extra[task]
    if task in GROUPS:
        return GROUPS[task]
    prefix = task.split(":", 1)[0]
    if prefix in GROUP_PREFIXES:
        return GROUP_PREFIXES[prefix]
    raise SystemExit(f"no group declared for task {task!r}: pass --group {task}=GROUP")


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def claim_e(tr: TransferResult) -> dict:
    """Does the skill-neuron indicator predict transfer better than the baselines?

    holds: on the main transfer measure the bootstrap interval of (best neuron indicator - best
    baseline) is above 0 and the best neuron indicator's Mantel p is below ALPHA; does not hold: the
    interval is below 0; not decided otherwise.
    """
    boot = tr.bootstrap.get(MAIN_KIND) or {}
    lo, hi = boot.get("ci95", [None, None])
    best = boot.get("first")
    p = tr.correlations.get(best, {}).get("by_transfer", {}).get(MAIN_KIND, {}).get("mantel_p") if best else None
    if lo is not None and lo > 0 and p is not None and p < ALPHA:
        verdict = "holds"
    elif hi is not None and hi < 0:
        verdict = "does not hold"
    else:
        verdict = "not decided"
    return {
        "verdict": verdict,
        "transfer": MAIN_KIND,
        "best_neuron_indicator": best,
        "best_neuron_spearman": boot.get("first_spearman"),
        "best_neuron_mantel_p": p,
        "best_baseline": boot.get("second"),
        "best_baseline_spearman": boot.get("second_spearman"),
        "difference": boot.get("difference"),
        "ci95": [lo, hi],
        "share_above_zero": boot.get("share_above_zero"),
    }


def claim_f(tr: TransferResult, groups: list[str]) -> dict:
    """Are skill neurons task-specific, shared by similar tasks? The overlap of the top neurons is
    higher within a declared group than across groups (permutation p below ALPHA)."""
    sep = {
        name: group_separation(tr.indicators[name], groups)
        for name in (*NEURON_INDICATORS, *PROMPT_INDICATORS, *ACTIVATION_INDICATORS)
        if name in tr.indicators
    }
    main = sep["neuron_topk_jaccard"]
    verdict = "holds" if main["difference"] > 0 and main["p"] < ALPHA else "not decided"
    order, merges = average_linkage(tr.indicators["neuron_topk_jaccard"])
    return {
        "verdict": verdict,
        "indicator": "neuron_topk_jaccard",
        "separation": sep,
        "cluster_order": [tr.tasks[i] for i in order],
        "merges": [
            {
                "left": [tr.tasks[i] for i in m["left"]],
                "right": [tr.tasks[i] for i in m["right"]],
                "similarity": m["similarity"],
            }
            for m in merges
        ],
    }


def summary(study_dir: Path, extra: dict[str, str]) -> dict:
    tr = TransferResult.load(study_dir)
    st = StudyResult.load(study_dir)
    groups = [group_of(t, extra) for t in tr.tasks]
    return {
        "model": tr.model,
        "tasks": tr.tasks,
        "groups": dict(zip(tr.tasks, groups)),
        "trials": len(st.seeds),
        "per_task": {
            t: {k: st.per_task[t][k] for k in ("dev_accuracy", "test_accuracy", "best_predictivity")} for t in tr.tasks
        },
        "settings": {
            "tune_config": st.tune_config,
            "find_kwargs": st.find_kwargs,
            "transfer_steps": st.transfer_steps,
            "transfer_kwargs": st.transfer_kwargs,
        },
        "correlations": {
            name: {
                kind: {k: _num(c[kind].get(k)) for k in ("spearman", "mantel_p")}
                for kind in TRANSFER_KINDS
                if kind in c
            }
            for name, c in ((n, v["by_transfer"]) for n, v in tr.correlations.items())
        },
        "stability": {name: v["spearman_mean"] for name, v in tr.stability.items()},
        "trial_correlations": {name: [v["min"], v["max"]] for name, v in tr.trial_correlations.items()},
        "bootstrap": tr.bootstrap,
        "claim_e": claim_e(tr),
        "claim_f": claim_f(tr, groups),
    }


def tables(s: dict) -> str:
    """The markdown tables of the results page."""
    lines = [
        "| indicator | " + " | ".join(TRANSFER_KINDS) + " | stability across trials | per-trial range (init gain) |"
    ]
    lines.append("|---" * (len(TRANSFER_KINDS) + 3) + "|")
    for name, c in s["correlations"].items():
        cells = []
        for kind in TRANSFER_KINDS:
            v = c.get(kind, {})
            cells.append("n/a" if v.get("spearman") is None else f"{v['spearman']:+.3f} ({v['mantel_p']:.3f})")
        stab = s["stability"].get(name)
        rng = s["trial_correlations"].get(name)
        cells.append("n/a" if stab is None else f"{stab:.2f}")
        cells.append("n/a" if not rng or rng[0] is None else f"{rng[0]:+.2f} to {rng[1]:+.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "| transfer | best neuron indicator | best baseline | difference | bootstrap 95% interval | share > 0 |"
    )
    lines.append("|---|---|---|---|---|---|")
    for kind, b in s["bootstrap"].items():
        lines.append(
            f"| {kind} | {b['first']} {b['first_spearman']:+.3f} | {b['second']} {b['second_spearman']:+.3f} | "
            f"{b['difference']:+.3f} | [{b['ci95'][0]:+.3f}, {b['ci95'][1]:+.3f}] | {b['share_above_zero']:.2f} |"
        )
    lines.append("")
    lines.append("| indicator | within groups | across groups | difference | permutation p |")
    lines.append("|---|---|---|---|---|")
    for name, v in s["claim_f"]["separation"].items():
        lines.append(f"| {name} | {v['within']:.3f} | {v['across']:.3f} | {v['difference']:+.3f} | {v['p']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", type=Path, help="a finished `tl-skill study` directory")
    ap.add_argument("--out", type=Path, required=True, help="the summary JSON")
    ap.add_argument("--figures", type=Path, help="write the clustered similarity figure here")
    ap.add_argument("--prefix", default="study", help="figure file name prefix")
    ap.add_argument("--group", action="append", default=[], metavar="TASK=GROUP")
    args = ap.parse_args(argv)
    extra = {}
    for item in args.group:
        task, sep, group = item.partition("=")
        if not sep or not task or not group:
            raise SystemExit(f"--group takes TASK=GROUP, got {item!r}")
        extra[task] = group
    s = summary(args.study, extra)
    if args.figures is not None:
        from tl_skill.viz.plots import plot_task_clusters

        tr = TransferResult.load(args.study)
        path = args.figures / f"{args.prefix}_clusters_neuron_topk_jaccard.png"
        plot_task_clusters(
            tr.indicators["neuron_topk_jaccard"],
            tr.tasks,
            path,
            f"{tr.model}: tasks clustered by the overlap of their top skill neurons",
            "top-2% overlap (Jaccard)",
            groups=[s["groups"][t] for t in tr.tasks],
        )
        s["figure"] = path.as_posix()
    atomic_json(args.out, s)
    print(tables(s))
    print(f"\nclaim (e): {s['claim_e']['verdict']}; claim (f): {s['claim_f']['verdict']}")
    return s


if __name__ == "__main__":
    main()
