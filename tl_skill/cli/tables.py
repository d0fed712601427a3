"""The text tables `find`, `transfer` and `study` print."""

from __future__ import annotations


def format_neurons_table(sn, top: int, q: float = 0.05) -> str:
    st = sn.statistics(q=q, top=top)
    held = "heldout_of_best" in st
    lines = [
        f"{sn.model} / {sn.task}: best predictivity {sn.best_predictivity:.4f}"
        + (f"  (prompt dev accuracy {sn.prompt_accuracy():.4f})" if sn.prompt_accuracy() is not None else "")
    ]
    if len(sn.subtasks) > 1:
        lines.append(subtask_line(sn))
    if held:
        test_acc = sn.prompt_accuracy("test_accuracy")
        lines.append(
            f"held out ({st['confirm_split']}, rule chosen on {sn.meta.get('split')}): best neuron "
            f"{st['heldout_of_best']:.4f}, best of the top 1% {st['heldout_best_of_selected']:.4f}, "
            f"top-1% mean {st['heldout_top1pct_mean']:.4f} (selection split {st['selection_top1pct_mean']:.4f})"
            + (f"; prompt test accuracy {test_acc:.4f}" if test_acc is not None else "")
        )
    head = f"{'rank':>4} {'layer':>5} {'neuron':>6} {'predictivity':>12} {'pos':>4} {'dir':>4}"
    lines.append(head + (f" {'q-value':>9} {'held out':>8}" if st else ""))
    by_key = {(r["layer"], r["neuron"]): r for r in st.get("top", [])}
    for r, row in enumerate(sn.top(top), 1):
        line = (
            f"{r:>4} {row['layer']:>5} {row['neuron']:>6} {row['predictivity']:>12.4f} "
            f"{row['position']:>4} {'+' if row['direction'] > 0 else '-':>4}"
        )
        s = by_key.get((row["layer"], row["neuron"]))
        if s:
            line += f" {s['q_value']:>9.2e} " + (f"{s['heldout_predictivity']:>8.4f}" if held else f"{'':>8}")
        lines.append(line)
    frac = 0.01 if sn.d_mlp >= 100 else 0.1
    counts = sn.layer_counts(sn.select(fraction=frac, per_layer=False))
    lines.append(
        f"layers of the global top {frac:.0%}: " + " ".join(f"L{sn.layers[l]}:{c}" for l, c in enumerate(counts) if c)
    )
    if st:
        per = " ".join(f"L{l}:{c}" for l, c in st["significant_per_layer"].items() if c)
        lines.append(
            f"FDR-significant neurons (Benjamini-Hochberg, q <= {q:g}): {st['n_significant']} of "
            f"{sn.n_layers * sn.d_mlp}" + (f" ({per})" if per else "")
        )
    if "control" in st:
        c = st["control"]
        lines.append(
            f"shuffled-label control: {c['n_significant']} significant, "
            f"{c['fraction_position_p_below_0.05']:.3f} of positions with p < 0.05, "
            f"best predictivity {c['best_predictivity']:.4f}"
        )
    if "stability" in st:
        t = st["stability"]
        lines.append(
            f"trial stability ({t['n_trials']} trials): Spearman {t['spearman_mean']:.3f}, "
            f"per-layer top-{t['fraction']:.0%} Jaccard {t['topk_jaccard_mean']:.3f} "
            f"(chance {t['topk_jaccard_chance']:.3f}), mean top-{t['fraction']:.0%} in every trial "
            f"{t['mean_topk_in_every_trial']:.3f} (chance {t['mean_topk_in_every_trial_chance']:.2g})"
        )
    return "\n".join(lines)


def subtask_line(sn) -> str:
    """A multi-class task's binary subtasks, each with its best neuron and the share of its larger side (a rule
    that always answers that side scores it: one-vs-rest subtasks start high), and how they are combined."""
    counts = sn.class_counts.get("eval")
    parts = []
    for s, sub in enumerate(sn.subtasks):
        pred = sn.per_subtask[s]
        l, i = divmod(int(pred.reshape(-1).argmax()), sn.d_mlp)
        part = f"{sub.name} {float(pred.max()):.4f} (L{sn.layers[l]}.{i}"
        if counts:
            n_pos, n_neg = counts["n_pos"][s], counts["n_neg"][s]
            part += f"; majority {max(n_pos, n_neg) / (n_pos + n_neg):.4f}"
        parts.append(part + ")")
    return f"{len(sn.subtasks)} subtasks, best neuron of each (a neuron's score: their {sn.aggregate_subtasks}): " + (
        "; ".join(parts)
    )


def _num(x, width: int) -> str:
    """A table cell: the number to 3 decimals, or n/a where it is undefined (None or NaN)."""
    if x is None or x != x:
        return f"{'n/a':>{width}}"
    return f"{x:{width}.3f}"


def correlation_table(res) -> str:
    lines = [f"{'indicator':<28} {'transfer':<20} {'spearman':>9} {'kendall':>8} {'mantel p':>9}"]
    undefined = False
    for ind, main in res["correlations"].items():
        for kind, c in main["by_transfer"].items():
            sp, kd, p = c.get("spearman"), c.get("kendall"), c.get("mantel_p")
            undefined |= sp is None or kd is None or p is None
            lines.append(f"{ind:<28} {kind:<20} {_num(sp, 9)} {_num(kd, 8)} {_num(p, 9)}")
    if undefined:
        lines.append(
            "n/a: undefined with so few task pairs or constant values (rank correlations need "
            "3+ pairs; the Mantel test needs 3+ tasks)"
        )
    return "\n".join(lines)


def evidence_table(res) -> str:
    """The bootstrap over tasks (best skill-neuron indicator vs best baseline) and, with several
    trials, each indicator's stability across them; empty for results saved without them."""
    lines = []
    boot = res.get("bootstrap") or {}
    if boot:
        lines.append(
            f"{'transfer':<20} {'best neuron indicator':<30} {'best baseline':<30} {'difference':>10}  bootstrap 95%"
        )
        for kind, b in boot.items():
            ci = b.get("ci95") or [None, None]
            first = f"{b.get('first')} {_num(b.get('first_spearman'), 6).strip()}"
            second = f"{b.get('second')} {_num(b.get('second_spearman'), 6).strip()}"
            lines.append(
                f"{kind:<20} {first:<30} {second:<30} {_num(b.get('difference'), 10)}  "
                f"[{_num(ci[0], 6).strip()}, {_num(ci[1], 6).strip()}]"
            )
    stab = res.get("stability") or {}
    if stab:
        lines.append(
            "stability across trials (Spearman of the trials' matrices): "
            + ", ".join(f"{name} {_num(v.get('spearman_mean'), 5).strip()}" for name, v in stab.items())
        )
    return "\n".join(lines)
