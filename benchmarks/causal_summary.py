"""Predictive vs causal, per (model, task): one JSON and the markdown tables of docs/results/causal.md,
from `tl-skill attribute` and `tl-skill steer` outputs.

    python benchmarks/causal_summary.py \\
        smollm2-135m/rotten_tomatoes=runs/smollm2/attribution_rt,runs/smollm2/steering_rt \\
        gemma3-270m/rotten_tomatoes=runs/gemma/attribution_rt,runs/gemma/steering_rt \\
        --out benchmarks/results/causal.json

Each item is NAME=ATTRIBUTION_DIR,STEERING_DIR (either may be left empty: NAME=ATTRIBUTION_DIR,).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tl_skill.experiments.causal import AttributionResult, SteeringResult
from tl_skill.files import atomic_json


def attribution_summary(res: AttributionResult) -> dict:
    """What the attribution run says about predictive vs causal units."""
    by = {}
    for kind in ("attribution", "predictivity"):
        # a unit chosen by both rankings counts for both
        effects = [abs(v["true_effect"]) for v in res.verified if v["picked_by"] in (kind, "both")]
        by[kind] = {
            "n": len(effects),
            "median_abs_true_effect": statistics.median(effects) if effects else None,
            "mean_abs_true_effect": statistics.fmean(effects) if effects else None,
        }
    direct = [abs(v["direct_effect"]) for v in res.verified if v.get("direct_effect") is not None]
    total = [abs(v["true_effect"]) for v in res.verified if v.get("direct_effect") is not None]
    per_layer = res.evidence["spearman_per_layer"]
    half = len(per_layer) // 2
    late = [v for k, v in per_layer.items() if int(k) >= int(list(per_layer)[half])]
    early = [v for k, v in per_layer.items() if int(k) < int(list(per_layer)[half])]
    ev = res.evidence
    return {
        "n_examples": res.n_examples,
        "mean_margin": res.mean_margin,
        "atp_vs_patching": {k: res.agreement[k] for k in ("n_units", "spearman", "sign_agreement")}
        | {"false_negatives": len(res.agreement["false_negatives"])},
        "verified_by_ranking": by,
        "direct_share_of_total": (sum(direct) / sum(total)) if total and sum(total) > 0 else None,
        "spearman_pred_vs_abs_attribution": {
            "early_layers_mean": statistics.fmean(early) if early else None,
            "late_layers_mean": statistics.fmean(late) if late else None,
        },
        "top_fraction": ev["top_fraction"],
        "top_overlap": ev["top_overlap"],
        "top_k": ev["top_k"],
        "top_overlap_ratio": ev["top_overlap_ratio"],
        "counts": ev.get("counts"),
    }


def steering_summary(res: SteeringResult) -> dict:
    """Flip rates of skill vs random units, per strength."""
    rows = []
    for r in sorted(res.rows, key=lambda r: (r["strength"], r["fraction"])):
        p = r["paired"]
        rows.append(
            {
                "strength": r["strength"],
                "fraction": r["fraction"],
                "skill": r["skill_flip_rate"],
                "random": r["random_flip_rate"],
                "ci": [p["ci_low"], p["ci_high"]],
                "skill_flips_more": p["ci_low"] > 0,
            }
        )
    return {
        "clean_accuracy": res.clean_accuracy,
        "n_pairs": res.n_pairs,
        "positions": res.positions,
        "seeds": len(res.seeds),
        "verdict_by_strength": {str(s): res.verdict(s) for s in res.strengths},
        "half_flip_fraction_by_strength": {str(s): res.half_flip_fraction(s) for s in res.strengths},
        "rows": rows,
    }


def markdown(summary: dict) -> str:
    lines = [
        "| model / task | AtP vs patching: Spearman, sign agreement, false negatives | median \\|patched effect\\|, "
        "top 20 by attribution / by predictivity | top-1% overlap (× chance) | Spearman(predictivity, "
        "\\|attribution\\|), lower / upper half of the layers |",
        "|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        a = s.get("attribution")
        if a is None:
            continue
        ag, by = a["atp_vs_patching"], a["verified_by_ranking"]
        sp = a["spearman_pred_vs_abs_attribution"]
        lines.append(
            f"| {name} | {ag['spearman']:.2f}, {ag['sign_agreement']:.2f}, {ag['false_negatives']} | "
            f"{by['attribution']['median_abs_true_effect']:.3f} / {by['predictivity']['median_abs_true_effect']:.3f} | "
            f"{a['top_overlap']} of {a['top_k']} ({a['top_overlap_ratio']:.1f}×) | "
            f"{sp['early_layers_mean']:+.3f} / {sp['late_layers_mean']:+.3f} |"
        )
    fractions = sorted({r["fraction"] for s in summary.values() for r in s.get("steering", {}).get("rows", [])})
    lines += [
        "",
        "| model / task | strength | " + " | ".join(f"{f:.0%}" for f in fractions) + " |",
        "|---|---|" + "---|" * len(fractions),
    ]
    for name, s in summary.items():
        st = s.get("steering")
        if st is None:
            continue
        for strength in sorted({r["strength"] for r in st["rows"]}):
            cells = []
            for f in fractions:
                r = next((r for r in st["rows"] if r["strength"] == strength and r["fraction"] == f), None)
                bold = "**" if r and r["skill_flips_more"] else ""
                cells.append(f"{bold}{r['skill']:.3f} / {r['random']:.3f}{bold}" if r else "–")
            lines.append(f"| {name} | {strength:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("items", nargs="+", help="NAME=ATTRIBUTION_DIR,STEERING_DIR")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    summary = {}
    for item in args.items:
        name, _, dirs = item.partition("=")
        attribution_dir, sep, steering_dir = dirs.partition(",")
        if not sep or not (attribution_dir or steering_dir):
            p.error(f"{item!r} is not NAME=ATTRIBUTION_DIR,STEERING_DIR")
        s = {}
        if attribution_dir:
            s["attribution"] = attribution_summary(AttributionResult.load(attribution_dir))
        if steering_dir:
            s["steering"] = steering_summary(SteeringResult.load(steering_dir))
        summary[name] = s
    atomic_json(Path(args.out), summary)
    print(markdown(summary))


if __name__ == "__main__":
    main()
