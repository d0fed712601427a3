"""`tl-skill attribute` and `tl-skill steer`: is a skill neuron causal? (argument parsing and printing only)."""

from __future__ import annotations

from pathlib import Path

from tl_skill.cli.options import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_FLOAT,
    emit,
    finish,
    list_of,
    load_model_for,
    subparser,
)
from tl_skill.distributed import is_main
from tl_skill.experiments.causal import POSITIONS, attribution_experiment, steering_experiment
from tl_skill.neurons import SkillNeurons
from tl_skill.tuning.runs import Run
from tl_skill.viz.plots import plot_attribution, plot_steering

ATTRIBUTION_PNG = "attribution.png"
STEERING_PNG = "steering.png"


def _num(x, fmt: str = "+.4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def add_attribute(sub) -> None:
    p = subparser(
        "attribute",
        sub,
        "attribution of the margin to every unit, verified by patching, vs predictivity",
        """
        tl-skill attribute runs/rt/seed0 --neurons neurons/rt --out attribution/rt
        tl-skill attribute runs/rt/seed0 --neurons neurons/rt --out attribution/rt-k40 --k 40 --max-examples 500
    """,
    )
    p.add_argument("run_dir")
    p.add_argument("--neurons", required=True, help="directory written by `tl-skill find` (baselines, units)")
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=POSITIVE, default=20, help="units verified by patching, per ranking (default 20)")
    p.add_argument("--max-examples", type=NON_NEGATIVE, default=300, help="test examples (0: the run's whole test set)")
    p.add_argument("--dev-examples", type=NON_NEGATIVE, default=300, help="dev examples of the causal threshold")
    finish(p, cmd_attribute)


def cmd_attribute(args) -> None:
    run = Run.load(args.run_dir)
    res = attribution_experiment(
        lambda: load_model_for(args, run.model_name, run),
        run,
        SkillNeurons.load(args.neurons),
        args.out,
        k=args.k,
        max_examples=args.max_examples or None,
        dev_examples=args.dev_examples or None,
        batch_size=args.batch_size or 16,
        progress=not args.quiet,
    )
    if is_main():
        plot_attribution(res, Path(args.out) / ATTRIBUTION_PNG)
    ag, ev = res.agreement, res.evidence
    lines = [
        f"{res.model} / {res.task}: attribution on {res.n_examples} test examples (mean margin {res.mean_margin:+.3f})",
        f"{'layer':>5} {'unit':>6} {'picked by':<13} {'predictivity':>12} {'attribution':>12} {'patched':>10} "
        f"{'direct':>10}",
    ]
    for _, r in res.to_dataframe().iterrows():
        lines.append(
            f"{r.layer:>5} {r.unit:>6} {r.picked_by:<13} {r.predictivity:>12.4f} {r.attribution:>+12.4f} "
            f"{r.true_effect:>+10.4f} {_num(r.direct_effect, '+10.4f'):>10}"
        )
    lines.append(
        f"attribution vs patching over {ag['n_units']} units: Spearman {_num(ag['spearman'], '.3f')}, "
        f"sign agreement {_num(ag['sign_agreement'], '.2f')}, {len(ag['false_negatives'])} false negative(s)"
    )
    lines.append(
        f"top {ev['top_fraction']:.0%} by predictivity and by |attribution| share {ev['top_overlap']} of {ev['top_k']} "
        f"units ({ev['top_overlap_ratio']:.1f}x chance)"
    )
    if "counts" in ev:
        c = ev["counts"]
        lines.append(
            f"predictive (FDR) and causal: {c['predictive_and_causal']} (independence: "
            f"{c['expected_both_if_independent']:.1f}); predictive only {c['predictive_only']}, causal only "
            f"{c['causal_only']}"
        )
    emit(res.to_dict(), args.json, "\n".join(lines))


def add_steer(sub) -> None:
    p = subparser(
        "steer",
        sub,
        "steer skill units vs random units towards another class and count flipped predictions",
        """
        tl-skill steer runs/rt/seed0 --neurons neurons/rt --out steering/rt
        tl-skill steer runs/rt/seed0 --neurons neurons/rt --out steer/all --positions all --fractions 0.1 --strengths 1
    """,
    )
    p.add_argument("run_dir")
    p.add_argument("--neurons", required=True, help="directory written by `tl-skill find`")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--fractions",
        type=list_of(FRACTION),
        default=[0.01, 0.02, 0.05, 0.1, 0.2],
        help="units per layer, comma-separated (default: 0.01,0.02,0.05,0.1,0.2)",
    )
    p.add_argument(
        "--strengths",
        type=list_of(POSITIVE_FLOAT),
        default=[0.5, 1.0],
        help="s in a + s (mean_c - a); 1 sets a unit to the class mean (default: 0.5,1)",
    )
    p.add_argument("--seeds", type=POSITIVE, default=3, help="random-unit control seeds")
    p.add_argument("--positions", choices=POSITIONS, default="selected", help="where to steer (default: selected)")
    p.add_argument("--max-examples", type=NON_NEGATIVE, default=300, help="test examples (0: the run's whole test set)")
    finish(p, cmd_steer)


def cmd_steer(args) -> None:
    run = Run.load(args.run_dir)
    res = steering_experiment(
        lambda: load_model_for(args, run.model_name, run),
        run,
        SkillNeurons.load(args.neurons),
        args.out,
        fractions=args.fractions,
        strengths=args.strengths,
        seeds=args.seeds,
        positions=args.positions,
        max_examples=args.max_examples or None,
        batch_size=args.batch_size or 16,
        progress=not args.quiet,
    )
    if is_main():
        plot_steering(res, Path(args.out) / STEERING_PNG)
    lines = [
        f"{res.model} / {res.task}: steering ({res.positions}) over {res.n_pairs} example-target pairs",
        f"{'fraction':>8} {'strength':>8} {'skill':>7} {'random':>15} {'skill-random [95% CI]':>26}",
    ]
    for r in res.rows:
        p = r["paired"]
        lines.append(
            f"{r['fraction']:>8.0%} {r['strength']:>8g} {r['skill_flip_rate']:>7.3f} "
            f"{r['random_flip_rate']:>7.3f} ± {r['random_flip_rate_std']:.3f} "
            f"{p['difference']:>+8.3f} [{p['ci_low']:+.3f}, {p['ci_high']:+.3f}]"
        )
    for s in res.strengths:
        half = res.half_flip_fraction(s)
        lines.append(
            f"verdict at strength {s:g}: {res.verdict(s)}; half the predictions flip with "
            + (f"{half:.0%} of each layer's skill units" if half is not None else "none of the fractions tried")
        )
    emit(res.to_dict(), args.json, "\n".join(lines))
