"""How results show themselves in a notebook: one-line reprs and small HTML blocks.

Every main object (`Task`, `Run`, `SkillNeurons`, the experiment results) has a short
`__repr__` and a `_repr_html_` built from these pieces: a heading, a few facts, a table
(the head of the object's `to_dataframe()`) and, where a picture says more, a row of bars.
All text is escaped: task names, label words and example texts are the user's.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a one-line summary: floats to `digits` decimals, None and NaN as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def short(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters (a path keeps its end, where the name is)."""
    text = str(text)
    if len(text) <= limit:
        return text
    return "..." + text[-(limit - 3) :] if "/" in text else text[: limit - 3] + "..."


def repr_line(kind: str, facts: Mapping[str, Any], lead: str | None = None) -> str:
    """`Kind('lead', key=value, ...)`, each value formatted by `fmt` (strings quoted and shortened)."""
    parts = [repr(short(lead))] if lead is not None else []
    for key, value in facts.items():
        parts.append(f"{key}={short(value)!r}" if isinstance(value, str) else f"{key}={fmt(value)}")
    return f"{kind}({', '.join(parts)})"


def html_facts(title: str, facts: Mapping[str, Any]) -> str:
    """A bold title and a line of `key: value` facts."""
    items = " &middot; ".join(
        f"{html.escape(str(k))}: <code>{html.escape(short(v, 80) if isinstance(v, str) else fmt(v))}</code>"
        for k, v in facts.items()
    )
    return f"<div><b>{html.escape(title)}</b><br><small>{items}</small></div>"


def html_table(frame: Any, max_rows: int = 10, caption: str | None = None) -> str:
    """The first `max_rows` rows of a DataFrame as an escaped HTML table (with how many rows there are)."""
    shown = frame.head(max_rows)
    table = shown.to_html(index=False, escape=True, float_format=lambda x: f"{x:.4g}", na_rep="n/a", border=0)
    more = f"<small>{len(shown)} of {len(frame)} rows; all of them: <code>.to_dataframe()</code></small>"
    head = f"<div><small>{html.escape(caption)}</small></div>" if caption else ""
    return head + table + (more if len(frame) > len(shown) else "")


def html_bars(labels: Sequence[str], values: Sequence[float], caption: str, lo: float = 0.5, hi: float = 1.0) -> str:
    """A row of vertical bars, one per label, scaled from `lo` (empty) to `hi` (full), value on hover."""
    cells = []
    for label, value in zip(labels, values):
        frac = 0.0 if value is None or math.isnan(value) else min(1.0, max(0.0, (value - lo) / (hi - lo)))
        tip = html.escape(f"{label}: {fmt(value)}")
        cells.append(
            f'<div title="{tip}" style="display:inline-block;width:10px;height:48px;margin-right:1px;'
            f'background:#eee;position:relative"><div style="position:absolute;bottom:0;width:100%;'
            f'height:{frac * 100:.0f}%;background:#4c72b0"></div></div>'
        )
    return (
        f"<div><small>{html.escape(caption)}</small><br>{''.join(cells)}<br>"
        f"<small>{html.escape(labels[0]) if labels else ''} &rarr; {html.escape(labels[-1]) if labels else ''}"
        "</small></div>"
    )
