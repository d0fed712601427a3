"""Static, self-contained neuron dashboards drawn from a `DashboardResult` (no CDN, no script, no network).

`write_dashboard(result, out)` writes `out/index.html` (every neuron with its
numbers and a small histogram) and `out/neuron_L{layer}_{index}.html` per
neuron. Histograms are inline SVG; token activations are highlighted text
whose colour is the activation (orange above 0, blue below, the page's
largest |activation| at full strength) and whose tooltip (`title`) gives the
value.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tl_skill.files import atomic_text

CLASS_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f")
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:70em;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.tok{border-radius:2px;padding:0 1px;white-space:pre-wrap}
.ex{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em;line-height:1.9;margin:.4em 0 .8em}
.meta{color:#555;font-size:.9em}.prompt{outline:1px dashed #999}.legend span{padding:0 .5em}
"""


def page_name(layer: int, neuron: int) -> str:
    return f"neuron_L{layer}_{neuron}.html"


UNIT_NOUNS = {"mlp": "neuron", "resid": "residual dimension", "attn": "attention unit", "sae": "SAE latent"}


def unit_noun(row: dict[str, Any]) -> str:
    """ "neuron", "residual dimension", "attention unit" or "SAE latent" for a dashboard row."""
    units = row.get("units", "mlp")
    return UNIT_NOUNS["sae" if units.startswith("sae:") else units]


def unit_label(row: dict[str, Any]) -> str:
    """L{layer}.{index}, with the head and its dimension for attention units (L3.H2.d5)."""
    if "head" in row:
        return f"L{row['layer']}.H{row['head']}.d{row['head_dim']}"
    return f"L{row['layer']}.{row['neuron']}"


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"
    return html.escape(str(x))


def histogram_svg(
    values: np.ndarray,
    labels: np.ndarray,
    names: Sequence[str],
    baseline: float | None,
    width: int = 420,
    height: int = 160,
    bins: int = 24,
    axes: bool = True,
) -> str:
    """Overlaid per-class histograms of `values` with a dashed line at `baseline`, as inline SVG."""
    values = np.asarray(values, dtype=float)
    lo, hi = float(values.min()), float(values.max())
    if baseline is not None:
        lo, hi = min(lo, baseline), max(hi, baseline)
    if hi <= lo:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(values[labels == c], edges)[0] for c in range(len(names))]
    top = max(1, max(int(c.max()) for c in counts))
    pad = 18 if axes else 2
    w, h = width - 2 * pad, height - 2 * pad
    x = lambda v: pad + (v - lo) / (hi - lo) * w
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="activation histogram">']
    for c, cnt in enumerate(counts):
        colour = CLASS_COLOURS[c % len(CLASS_COLOURS)]
        for b, n in enumerate(cnt):
            if n:
                bh = n / top * h
                parts.append(
                    f'<rect x="{x(edges[b]):.1f}" y="{pad + h - bh:.1f}" '
                    f'width="{max(1.0, x(edges[b + 1]) - x(edges[b]) - 1):.1f}" '
                    f'height="{bh:.1f}" fill="{colour}" fill-opacity="0.55"><title>{html.escape(names[c])}: '
                    f"{n} in [{edges[b]:.3g}, {edges[b + 1]:.3g})</title></rect>"
                )
    if baseline is not None:
        parts.append(
            f'<line x1="{x(baseline):.1f}" x2="{x(baseline):.1f}" y1="{pad}" y2="{pad + h}" stroke="#000" '
            f'stroke-dasharray="4 3"><title>baseline {baseline:.4g}</title></line>'
        )
    if axes:
        parts.append(f'<line x1="{pad}" x2="{pad + w}" y1="{pad + h}" y2="{pad + h}" stroke="#888"/>')
        parts.append(f'<text x="{pad}" y="{height - 3}" font-size="10">{lo:.3g}</text>')
        parts.append(f'<text x="{pad + w}" y="{height - 3}" font-size="10" text-anchor="end">{hi:.3g}</text>')
        for c, name in enumerate(names):
            parts.append(
                f'<text x="{pad + w}" y="{pad + 10 + 12 * c}" font-size="11" text-anchor="end" '
                f'fill="{CLASS_COLOURS[c % len(CLASS_COLOURS)]}">{html.escape(name)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _colour(v: float, scale: float) -> str:
    a = min(1.0, abs(v) / scale) if scale > 0 else 0.0
    rgb = "255,140,0" if v >= 0 else "30,110,230"
    return f"rgba({rgb},{0.85 * a:.2f})"


def highlighted(example: dict[str, Any], scale: float) -> str:
    """One example's tokens, each coloured by the neuron's activation there (prompt positions outlined)."""
    spans = []
    p = 0
    for tok, val, is_prompt in zip(example["tokens"], example["values"], example["is_prompt"]):
        if is_prompt:
            p += 1
            tok = f"⟨P{p}⟩"
        spans.append(
            f'<span class="tok{" prompt" if is_prompt else ""}" style="background:{_colour(val, scale)}" '
            f'title="{val:.4g}">{html.escape(tok)}</span>'
        )
    return "".join(spans)


def _head(title: str) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>"
    )


def _neuron_page(result, k: int, row: dict[str, Any]) -> str:
    names = [w.strip() for w in result.label_words]
    values = result.activations[:, k].numpy()
    labels = result.labels.numpy()
    noun = unit_noun(row)
    title = f"{result.model} / {result.task}: {noun} {unit_label(row)}"
    said = html.escape(names[1] if row["direction"] > 0 else names[0]) if len(names) == 2 else row["direction"]
    out = [
        _head(title),
        f'<p><a href="index.html">← all {noun}s</a></p><h1>{html.escape(title)}</h1>',
        f'<p class="meta">hook <code>{html.escape(row["hook_name"])}</code>, {noun} {row["neuron"]}; best prompt '
        f"position {row['position']}; above its baseline it predicts "
        f"<b>{said}</b>.</p>",
        "<table><tr>"
        + "".join(f"<th>{h}</th>" for h in ("predictivity (dev)", "held-out (test)", "p", "q (BH)", "baseline"))
        + "</tr><tr>"
        + "".join(
            f"<td>{_fmt(row[key])}</td>"
            for key in ("predictivity", "heldout_predictivity", "p_value", "q_value", "baseline")
        )
        + "</tr></table>",
        f"<h2>Activation at prompt position {row['position']} on {result.n_examples} test examples</h2>",
        histogram_svg(values, labels, names, row["baseline"]),
        "<h2>Direct effect on the label words</h2>",
    ]
    if row["direct_effect_per_unit"] is None:
        out.append(
            f"<p class='meta'>No direct path to the logits is defined for hook "
            f"<code>{html.escape(row['hook_name'])}</code>.</p>"
        )
    else:
        out.append(
            "<p class='meta'>The unit's output direction (W_out row, W_O row, basis vector or SAE decoder row) "
            "through the final normalisation (scale frozen at each example's prediction position) onto the label "
            "words' unembedding rows.</p><table><tr><th class='l'>label word</th>"
            "<th>logit per unit of activation</th><th>mean contribution at the prediction position</th></tr>"
        )
    for c, name in enumerate(names if row["direct_effect_per_unit"] is not None else []):
        out.append(
            f"<tr><td class='l'>{html.escape(name)}</td><td>{_fmt(row['direct_effect_per_unit'][c], 4)}</td>"
            f"<td>{_fmt(row['direct_effect_mean'][c], 4)}</td></tr>"
        )
    if len(names) == 2 and row["direct_effect_per_unit"] is not None:
        diff = row["direct_effect_per_unit"][1] - row["direct_effect_per_unit"][0]
        out.append(
            f"<tr><td class='l'>{html.escape(names[1])} − {html.escape(names[0])}</td><td>{_fmt(diff, 4)}</td>"
            f"<td>{_fmt(row['direct_effect_mean'][1] - row['direct_effect_mean'][0], 4)}</td></tr>"
        )
    out.append(("</table>" if row["direct_effect_per_unit"] is not None else "") + f"<h2>Without this {noun}</h2>")
    out.append(
        f"<p>{result.ablation_mode}-ablated alone: test accuracy {_fmt(row['ablated_accuracy'])} "
        f"(clean {_fmt(result.clean_accuracy)}, change {row['ablation_delta']:+.3f}; "
        f"{row['ablation_changed']} of {result.n_examples} examples change correctness).</p>"
    )
    if "attribution" in row:
        out.append(
            "<h2>Causal evidence</h2><p>Attribution (first-order effect on the margin of moving this "
            f"{noun} to its baseline, mean over the test examples): {_fmt(row['attribution'], 4)}"
            + (
                f"; patched (the true effect of mean-ablating it alone): {_fmt(row['patched_effect'], 4)}; direct "
                f"effect through its output direction: {_fmt(row['direct_effect_on_margin'], 4)}"
                if row.get("patched_effect") is not None
                else " (not among the units verified by patching)"
            )
            + ".</p>"
        )
    if result.group_effect:
        out.append(
            "<table><tr><th>group: top fraction per layer</th><th>neurons</th><th>skill Δ accuracy</th>"
            "<th>random Δ accuracy</th></tr>"
        )
        for g in result.group_effect:
            out.append(
                f"<tr><td>{g['fraction']:.0%}</td><td>{g['n_neurons']}</td><td>{_fmt(g['delta'])}</td>"
                f"<td>{_fmt(g['random_delta'])}</td></tr>"
            )
        out.append("</table>")
    scale = max((abs(v) for side in row["examples"].values() for ex in side for v in ex["values"]), default=1.0)
    out.append(
        f"<p class='legend'>colour = activation: <span style='background:{_colour(scale, scale)}'>"
        f"+{scale:.3g}</span><span style='background:{_colour(-scale, scale)}'>−{scale:.3g}</span> "
        "(hover a token for its value; ⟨P1⟩… are the prompt positions)</p>"
    )
    for side, heading in (("top", "Top-activating examples"), ("bottom", "Bottom-activating examples")):
        out.append(f"<h2>{heading}</h2>")
        for ex in row["examples"][side]:
            verdict = "✓" if ex["label"] == ex["prediction"] else "✗"
            out.append(
                f"<div class='meta'>example {ex['index']}: activation {ex['value']:.4g} · label "
                f"{html.escape(names[ex['label']])} · prediction {html.escape(names[ex['prediction']])} "
                f"{verdict}</div><div class='ex'>{highlighted(ex, scale)}</div>"
            )
    out.append("</body></html>")
    return "".join(out)


def write_dashboard(result, out: str | Path) -> Path:
    """index.html and one page per neuron into `out`; returns the index's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [w.strip() for w in result.label_words]
    labels = result.labels.numpy()
    rows = []
    for k, row in enumerate(result.neurons):
        page = page_name(row["layer"], row["neuron"])
        atomic_text(out / page, _neuron_page(result, k, row), root=out)
        rows.append(
            f"<tr><td>{k + 1}</td><td class='l'><a href='{page}'>{unit_label(row)}</a></td>"
            f"<td>{row['layer']}</td><td>{row['position']}</td><td>{'+' if row['direction'] > 0 else '−'}</td>"
            f"<td>{_fmt(row['predictivity'])}</td><td>{_fmt(row['heldout_predictivity'])}</td>"
            f"<td>{_fmt(row['q_value'])}</td><td>{row['ablation_delta']:+.3f}</td>"
            f"<td>{histogram_svg(result.activations[:, k].numpy(), labels, names, row['baseline'], 160, 40, 16, False)}"
            "</td></tr>"
        )
    noun = unit_noun(result.neurons[0]) if result.neurons else "neuron"
    units = result.settings.get("units", "mlp")
    kind = "neurons" if units == "mlp" else f"units ({html.escape(units)})"
    index = [
        _head(f"Skill {kind}: {result.model} / {result.task}"),
        f"<h1>Skill {kind}: {html.escape(result.model)} / {html.escape(result.task)}</h1>",
        f"<p class='meta'>Top {len(result.neurons)} {noun}s by predictivity; activations on "
        f"{result.n_examples} test examples of run <code>{html.escape(result.run)}</code> (prompted accuracy "
        f"{_fmt(result.clean_accuracy)}). Histogram colours: "
        + ", ".join(
            f"<span style='color:{CLASS_COLOURS[c % len(CLASS_COLOURS)]}'>{html.escape(n)}</span>"
            for c, n in enumerate(names)
        )
        + "; dashed: baseline.</p>",
        f"<table><tr><th>#</th><th class='l'>{noun}</th><th>layer</th><th>position</th><th>direction</th>"
        "<th>predictivity</th><th>held-out</th><th>q</th><th>Δ acc. alone</th><th>activation by class</th></tr>",
        *rows,
        "</table></body></html>",
    ]
    return atomic_text(out / "index.html", "".join(index), root=out)
