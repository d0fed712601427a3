"""The demo's self-contained report (`report.md`, `report.html`), written from saved results only.

It reads the run, the skill neurons, the trace and the `AblationResult` the
demo (`pipelines.run_demo`) saved; it never runs the model.
"""

from __future__ import annotations

import base64
import html
import logging
import re
from pathlib import Path

import numpy as np

from tl_skill.experiments.ablation import AblationResult
from tl_skill.experiments.demo import DemoResult
from tl_skill.files import atomic_text
from tl_skill.neurons import SkillNeurons
from tl_skill.tuning.runs import Run
from tl_skill.viz import plots

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- report
def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" style="max-width:100%">'


def _fmt(x, digits=3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _fmt_q(q) -> str:
    return "n/a" if q is None else f"{q:.2g}"


def _n_seeds(seeds) -> int | None:
    return len(seeds) if isinstance(seeds, (list, tuple)) else seeds


def write_report(out: str | Path) -> Path:
    """report.md and report.html (figures embedded) from the JSON results in `out`."""
    out = Path(out)
    run = Run.load(out / "run")
    sn = SkillNeurons.load(out / "neurons")
    abl = AblationResult.load(out / "ablation")
    demo = DemoResult.load(out) if (out / DemoResult.FILE).exists() else None
    fig = out / "figures"
    figs = {name: fig / f"{name}.png" for name in ("training", "layers", "best_neuron", "ablation")}
    plots.plot_training_curve(run, figs["training"])
    plots.plot_layer_distribution(sn, figs["layers"])
    tr = np.load(out / "trace.npz")
    top = sn.top(max(10, tr["values"].shape[1]))
    best = top[0]
    plots.plot_activation_histogram(
        tr["values"][:, 0],
        tr["labels"],
        float(tr["baselines"][0]),
        figs["best_neuron"],
        f"Best skill neuron L{best['layer']}.{best['neuron']} (position {best['position']}, "
        f"predictivity {best['predictivity']:.3f})",
        sn.label_names,
    )
    plots.plot_ablation(abl, figs["ablation"])
    m = run.metrics
    cfg = demo.config if demo is not None else {}
    quick = cfg.get("quick", False)
    rows = abl["rows"]
    md: list[str] = [f"# Skill neurons: {md_text(run.model_name)} on {md_text(run.task_name)}", ""]
    if quick:
        md += [
            "> **Quick mode**: small subsets and a short tuning run; numbers are rough. "
            "Run without `--quick` for the full settings.",
            "",
        ]
    md += [
        "## The prompt",
        "",
        "| metric | value |",
        "|---|---|",
        f"| dev accuracy (best checkpoint) | {_fmt(m.get('dev_accuracy'))} |",
        f"| test accuracy | {_fmt(m.get('test_accuracy'))} |",
        f"| zero-shot accuracy (verbalizer, no prompt) | {_fmt(m.get('zero_shot_accuracy'))} |",
        f"| majority-class accuracy | {_fmt(m.get('majority_accuracy'))} |",
        f"| prompt length / steps | {run.config.prompt_length} / {m.get('steps_run')} |",
        f"| test examples | {run.info['task_spec']['sizes'].get('test')} |",
        "",
        "![training](figures/training.png)",
        "",
        "## Skill neurons",
        "",
        f"Best neuron predictivity **{_fmt(sn.best_predictivity)}** against the prompt's own dev accuracy "
        f"**{_fmt(m.get('dev_accuracy'))}** (predictivity measured on {sn.meta.get('n_eval')} dev examples, "
        f"baseline from {sn.meta.get('n_train')} train examples).",
        "",
    ]
    st = sn.statistics(top=10)
    if st:
        md += [
            f"**{st['n_significant']}** of {sn.n_layers * sn.d_mlp} neurons are significant at a false "
            f"discovery rate of {st['fdr_q']:g} (exact hypergeometric p-values, Bonferroni over prompt "
            f"positions, Benjamini-Hochberg over neurons; per layer: "
            + (", ".join(f"L{l} {c}" for l, c in st["significant_per_layer"].items() if c) or "none")
            + ")."
        ]
        if "heldout_of_best" in st:
            md += [
                "",
                f"Held out on {sn.meta.get('n_confirm')} {st['confirm_split']} examples (position and "
                f"direction chosen on dev, same baselines): the best neuron scores "
                f"**{_fmt(st['heldout_of_best'])}**, the best of the top 1% {_fmt(st['heldout_best_of_selected'])}, "
                f"against the prompt's test accuracy **{_fmt(m.get('test_accuracy'))}**.",
            ]
        if "control" in st:
            c = st["control"]
            md += [
                "",
                f"Shuffled-label control (dev labels permuted, same pass): {c['n_significant']} significant "
                f"neurons, {c['fraction_position_p_below_0.05']:.3f} of neuron positions with p < 0.05 "
                f"(chance: at most 0.05), best predictivity {_fmt(c['best_predictivity'])} by chance alone.",
            ]
        if "stability" in st:
            t = st["stability"]
            md += [
                "",
                f"Trial stability ({t['n_trials']} prompts): Spearman of predictivity {t['spearman_mean']:.3f}, "
                f"per-layer top-1% Jaccard {t['topk_jaccard_mean']:.3f} (chance {t['topk_jaccard_chance']:.3f}), "
                f"{t['mean_topk_in_every_trial']:.3f} of the mean top 1% in every prompt's top 1%.",
            ]
        md += ["", "See docs/statistics.md in the tl_skill repository for each statistic and its assumptions.", ""]
    md += [
        "| rank | layer | neuron | predictivity | prompt position | direction | q-value | held out |",
        "|---|---|---|---|---|---|---|---|",
    ]
    stats_of = {(r["layer"], r["neuron"]): r for r in st.get("top", [])}
    for r, row in enumerate(top[:10], 1):
        s = stats_of.get((row["layer"], row["neuron"]), {})
        md.append(
            f"| {r} | {row['layer']} | {row['neuron']} | {_fmt(row['predictivity'], 4)} | {row['position']} | "
            f"{'higher for ' if row['direction'] > 0 else 'lower for '}{md_text(sn.label_names[-1])} | "
            f"{_fmt_q(s.get('q_value'))} | {_fmt(s.get('heldout_predictivity'), 4)} |"
        )
    md += [
        "",
        "![best neuron](figures/best_neuron.png)",
        "",
        "![layers](figures/layers.png)",
        "",
        "## Perturbation",
        "",
        f"Mode `{abl.get('mode', rows[0]['mode'] if rows else '')}` on {abl.get('n_examples')} test examples; "
        f"random control: {_n_seeds(abl.get('seeds'))} seed(s), same count per layer.",
        "",
        "| fraction | clean | skill neurons perturbed | random neurons perturbed (mean ± std) | "
        "skill − random [95% CI] | McNemar p (per seed) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        pr = r.get("paired") or {}
        ci = f"{pr['difference']:+.3f} [{pr['ci_low']:+.3f}, {pr['ci_high']:+.3f}]" if pr else "n/a"
        mc = " / ".join(f"{p:.2g}" for p in pr.get("mcnemar_p", [])) or "n/a"
        md.append(
            f"| {r['fraction']:.0%} | {_fmt(r['clean_accuracy'])} | {_fmt(r['skill_accuracy'])} | "
            f"{_fmt(r['random_accuracy'])} ± {_fmt(r['random_accuracy_std'])} | {ci} | {mc} |"
        )
    md += ["", f"**{abl.verdict().sentence}**", ""]
    md += ["![ablation](figures/ablation.png)", ""]
    if (out / "dashboard" / "index.html").exists():
        md += [
            "## Neuron dashboards",
            "",
            "What each top neuron does: activations by class, top and bottom examples with token-level "
            "activations, direct effect on the label words, accuracy without it: "
            "[dashboard/index.html](dashboard/index.html).",
            "",
        ]
    if demo is not None and demo.timings:
        md += ["## Timings", "", "| phase | seconds |", "|---|---|"]
        md += [f"| {k} | {v:.1f} |" for k, v in demo.timings.items()]
        md.append("")
    text = "\n".join(md)
    atomic_text(out / "report.md", text)
    atomic_text(out / "report.html", _markdown_to_html(text, out, figs))
    return out / "report.html"


_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#!])")


def md_text(s: object) -> str:
    """User text (model, task and label names) made inert in Markdown: its special characters escaped with
    a backslash, `&`, `<` and `>` as entities, so no name can open a tag, a link or a table cell."""
    text = str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text).replace("\n", " ")


def _md_plain(s: str) -> str:
    """The text `md_text` escaped, as it reads (for the HTML, which escapes it again itself)."""
    s = re.sub(r"\\(.)", r"\1", s)
    return s.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _markdown_to_html(text: str, out: Path, figs: dict[str, Path]) -> str:
    """A small renderer for the markdown written above (headings, tables, images, quotes, bold)."""
    body: list[str] = []
    in_table = False
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(_md_plain(c))}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{html.escape(_md_plain(c))}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        m = re.match(r"!\[(.*?)\]\((.*?)\)", line)
        if m:
            body.append(f"<p>{_img(out / m.group(2))}</p>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(_md_plain(line[2:]))}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("> "):
            body.append(f"<blockquote>{_inline(line[2:])}</blockquote>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    if in_table:
        body.append("</table>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
        "th{background:#f3f3f3}blockquote{background:#fff6dd;padding:.5em 1em;border-left:4px solid #e0a800}"
    )
    head = f"<meta charset='utf-8'><title>tl_skill report</title><style>{style}</style>"
    return f"<!doctype html><html><head>{head}</head><body>{''.join(body)}</body></html>"


def _inline(s: str) -> str:
    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"\[([^\]]+?)\]\(([^)\s]+?)\)", r'<a href="\2">\1</a>', s)  # relative links (the dashboard)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)
