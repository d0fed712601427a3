"""The main job: tune -> find -> trace -> perturb -> a self-contained report.

Every phase writes its result to the output directory before the next one
starts, and a rerun skips finished phases (and resumes an interrupted tuning
or perturbation run), so Ctrl-C never loses more than the phase in progress.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import plots
from .models import load_model
from .neurons import SkillNeurons, load_or_find, trace_activations
from .tasks import load_task, subsample
from .tuning import Run, TuneConfig, tune

log = logging.getLogger(__name__)

PhaseCallback = Callable[[str, float, str], None]


@dataclass
class DemoConfig:
    """Settings of `tl-skill demo`; `quick()` is the ~3-minute variant."""

    model: str = "smollm2-135m"
    task: str = "rotten_tomatoes"
    quick: bool = False
    tune: TuneConfig = field(default_factory=lambda: TuneConfig(
        prompt_length=8, steps=120, eval_every=40, max_dev_examples=200, max_test_examples=500))
    find_train_examples: int = 1000
    find_dev_examples: int | None = 500
    ablation_mode: str = "noise"
    ablation_fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2)
    ablation_seeds: int = 2
    ablation_examples: int = 300
    top: int = 10
    batch_size: int = 32

    @classmethod
    def quick_config(cls, **kw) -> "DemoConfig":
        return cls(quick=True, tune=TuneConfig(prompt_length=8, steps=30, eval_every=15, max_train_examples=480,
                                               max_dev_examples=100, max_test_examples=200),
                   find_train_examples=300, find_dev_examples=200, ablation_fractions=(0.02, 0.2),
                   ablation_seeds=1, ablation_examples=150, **kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ablation_fractions"] = list(self.ablation_fractions)
        return d


def _phase(name: str, on_phase: PhaseCallback | None):
    class _Timer:
        def __enter__(self):
            self.t0 = time.perf_counter()
            self.summary = ""
            return self

        def __exit__(self, exc_type, exc, tb):
            if exc_type is None:
                seconds = time.perf_counter() - self.t0
                log.info("%s: %s (%.1fs)", name, self.summary, seconds)
                if on_phase:
                    on_phase(name, seconds, self.summary)
            return False

    return _Timer()


def run_demo(out: str | Path, config: DemoConfig | None = None, device=None, dtype=None,
             progress: bool = True, on_phase: PhaseCallback | None = None) -> Path:
    """Run the whole skill-neuron pipeline and write `report.html` and `report.md` into `out`."""
    from .ablate import ablation_experiment

    cfg = config or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = load_task(cfg.task)  # validates the task before any long work
    timings: dict[str, float] = {}
    prev = out / "demo.json"
    if prev.exists():
        old = json.loads(prev.read_text())
        if old.get("config") != cfg.to_dict():
            raise ValueError(f"{out} holds a demo with other settings; use another --out or delete it")
        timings = old.get("timings", {})

    def save_state():
        (out / "demo.json").write_text(json.dumps({"config": cfg.to_dict(), "timings": timings}, indent=2))

    def record(name, seconds):
        timings[name] = timings.get(name, 0.0) + seconds
        save_state()

    def cb(name, seconds, summary):
        record(name, seconds)
        if on_phase:
            on_phase(name, seconds, summary)

    with _phase("load model", cb) as ph:
        model = load_model(cfg.model, device=device, dtype=dtype)
        ph.summary = f"{cfg.model} on {next(model.parameters()).device}"
    with _phase("prompt tuning", cb) as ph:
        run = tune(model, task, out / "run", cfg.tune, progress=progress)
        m = run.metrics
        ph.summary = (f"dev {m['dev_accuracy']:.3f}, test {m['test_accuracy']:.3f} "
                      f"(zero-shot {m['zero_shot_accuracy']:.3f}, majority {m['majority_accuracy']:.3f})")
    with _phase("finding skill neurons", cb) as ph:
        sn = load_or_find(model, [run], out / "neurons", max_train_examples=cfg.find_train_examples,
                          max_eval_examples=cfg.find_dev_examples, batch_size=cfg.batch_size,
                          progress=progress, control="shuffled")
        best = sn.top(1)[0]
        ph.summary = f"best neuron L{best['layer']}.{best['neuron']} predictivity {best['predictivity']:.3f}"
    with _phase("tracing the best neurons", cb) as ph:
        trace_file = out / "trace.npz"
        top3 = sn.top(3)
        if not trace_file.exists():
            dev = subsample(run.load_task(), {"dev": cfg.find_dev_examples}, seed=run.info["task_seed"])
            layer_slot = {l: s for s, l in enumerate(sn.layers)}
            values, labels = trace_activations(
                model, dev, "dev", run.prompt.to(next(model.parameters()).device),
                [(r["layer"], r["neuron"]) for r in top3], batch_size=cfg.batch_size, progress=progress,
                max_input_tokens=run.config.max_input_tokens)
            picked = np.stack([values[:, j, r["position"]].numpy() for j, r in enumerate(top3)], 1)
            baselines = np.asarray([float(sn.baseline[0, layer_slot[r["layer"]], r["position"], r["neuron"]])
                                    for r in top3])
            np.savez(trace_file, values=picked, labels=labels.numpy(), baselines=baselines)
        ph.summary = f"{len(top3)} neurons traced on the dev split"
    with _phase("perturbation", cb) as ph:
        abl = ablation_experiment(model, run, sn, out / "ablation", mode=cfg.ablation_mode,
                                  fractions=cfg.ablation_fractions, seeds=cfg.ablation_seeds,
                                  max_examples=cfg.ablation_examples, batch_size=cfg.batch_size,
                                  progress=progress)
        last = abl["rows"][-1]
        ph.summary = (f"at {last['fraction']:.0%}: skill {last['skill_accuracy']:.3f} vs random "
                      f"{last['random_accuracy']:.3f} (clean {last['clean_accuracy']:.3f})")
    with _phase("report", cb) as ph:
        path = write_report(out)
        ph.summary = str(path)
    return path


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


def verdict(rows: list[dict]) -> str:
    """Plain statement of whether perturbing skill neurons hurts more than random ones.

    The rule (the same everywhere): at a fraction, skill neurons hurt more when the 95% CI
    of the paired bootstrap of skill minus random accuracy (test examples and random seeds
    resampled together, `ablate.paired_comparison`) lies entirely below 0.
    """
    if not rows:
        return "no perturbation results"
    if any(r.get("paired") is None for r in rows):
        return "no paired test for these results (rerun the ablation to record per-example predictions)"
    worse = [r for r in rows if r["paired"]["skill_hurts_more"]]
    detail = "; ".join(
        f"{r['fraction']:.0%}: skill {r['skill_accuracy'] - r['clean_accuracy']:+.3f} vs random "
        f"{r['random_accuracy'] - r['clean_accuracy']:+.3f}, difference {r['paired']['difference']:+.3f} "
        f"[{r['paired']['ci_low']:+.3f}, {r['paired']['ci_high']:+.3f}], McNemar p "
        + "/".join(f"{p:.2g}" for p in r["paired"]["mcnemar_p"]) for r in rows)
    if len(worse) == len(rows):
        head = "Holds: perturbing skill neurons lowers accuracy more than perturbing as many random neurons, at every fraction"
    elif worse:
        which = ", ".join(f"{r['fraction']:.0%}" for r in worse)
        head = (f"Holds partly: skill neurons hurt more than random ones at {len(worse)} of {len(rows)} fractions "
                f"({which})")
    else:
        head = "Does not hold here: perturbing skill neurons hurts no more than perturbing random neurons"
    return (f"{head} (rule: the 95% CI of the paired skill minus random accuracy lies below 0; accuracy change "
            f"from clean, paired difference [95% CI]: {detail}).")


def write_report(out: str | Path) -> Path:
    """report.md and report.html (figures embedded) from the JSON results in `out`."""
    out = Path(out)
    run = Run.load(out / "run")
    sn = SkillNeurons.load(out / "neurons")
    abl = json.loads((out / "ablation" / "ablation.json").read_text())
    demo = json.loads((out / "demo.json").read_text()) if (out / "demo.json").exists() else {}
    fig = out / "figures"
    figs = {
        "training": plots.plot_training_curve(run.info["history"], fig / "training.png",
                                              f"Prompt tuning: {run.model_name} on {run.task_name}"),
        "layers": plots.plot_layer_distribution(sn, fig / "layers.png"),
    }
    tr = np.load(out / "trace.npz")
    top = sn.top(max(10, tr["values"].shape[1]))
    best = top[0]
    figs["histogram"] = plots.plot_activation_histogram(
        tr["values"][:, 0], tr["labels"], float(tr["baselines"][0]), fig / "best_neuron.png",
        f"Best skill neuron L{best['layer']}.{best['neuron']} (position {best['position']}, "
        f"predictivity {best['predictivity']:.3f})", sn.label_names)
    ab_png = out / "ablation" / "ablation.png"
    if ab_png.exists():
        figs["ablation"] = ab_png
    m = run.metrics
    cfg = demo.get("config", {})
    quick = cfg.get("quick", False)
    rows = abl["rows"]
    md: list[str] = [f"# Skill neurons: {run.model_name} on {run.task_name}", ""]
    if quick:
        md += ["> **Quick mode**: small subsets and a short tuning run; numbers are rough. "
               "Run without `--quick` for the full settings.", ""]
    md += ["## The prompt", "",
           "| metric | value |", "|---|---|",
           f"| dev accuracy (best checkpoint) | {_fmt(m.get('dev_accuracy'))} |",
           f"| test accuracy | {_fmt(m.get('test_accuracy'))} |",
           f"| zero-shot accuracy (verbalizer, no prompt) | {_fmt(m.get('zero_shot_accuracy'))} |",
           f"| majority-class accuracy | {_fmt(m.get('majority_accuracy'))} |",
           f"| prompt length / steps | {run.config.prompt_length} / {m.get('steps_run')} |",
           f"| test examples | {run.info['task_spec']['sizes'].get('test')} |", "",
           "![training](figures/training.png)", "",
           "## Skill neurons", "",
           f"Best neuron predictivity **{_fmt(sn.best_predictivity)}** against the prompt's own dev accuracy "
           f"**{_fmt(m.get('dev_accuracy'))}** (predictivity measured on {sn.meta.get('n_eval')} dev examples, "
           f"baseline from {sn.meta.get('n_train')} train examples).", "",
           ]
    st = sn.statistics(top=10)
    if st:
        md += [f"**{st['n_significant']}** of {sn.n_layers * sn.d_mlp} neurons are significant at a false "
               f"discovery rate of {st['fdr_q']:g} (exact hypergeometric p-values, Bonferroni over prompt "
               f"positions, Benjamini-Hochberg over neurons; per layer: "
               + (", ".join(f"L{l} {c}" for l, c in st["significant_per_layer"].items() if c) or "none") + ")."]
        if "heldout_of_best" in st:
            md += ["", f"Held out on {sn.meta.get('n_confirm')} {st['confirm_split']} examples (position and "
                   f"direction chosen on dev, same baselines): the best neuron scores "
                   f"**{_fmt(st['heldout_of_best'])}**, the best of the top 1% {_fmt(st['heldout_best_of_selected'])}, "
                   f"against the prompt's test accuracy **{_fmt(m.get('test_accuracy'))}**."]
        if "control" in st:
            c = st["control"]
            md += ["", f"Shuffled-label control (dev labels permuted, same pass): {c['n_significant']} significant "
                   f"neurons, {c['fraction_position_p_below_0.05']:.3f} of neuron positions with p < 0.05 "
                   f"(chance: at most 0.05), best predictivity {_fmt(c['best_predictivity'])} by chance alone."]
        if "stability" in st:
            t = st["stability"]
            md += ["", f"Trial stability ({t['n_trials']} prompts): Spearman of predictivity {t['spearman_mean']:.3f}, "
                   f"per-layer top-1% Jaccard {t['topk_jaccard_mean']:.3f} (chance {t['topk_jaccard_chance']:.3f}), "
                   f"{t['mean_topk_in_every_trial']:.3f} of the mean top 1% in every prompt's top 1%."]
        md += ["", "See docs/statistics.md in the tl_skill repository for each statistic and its assumptions.", ""]
    md += ["| rank | layer | neuron | predictivity | prompt position | direction | q-value | held out |",
           "|---|---|---|---|---|---|---|---|"]
    stats_of = {(r["layer"], r["neuron"]): r for r in st.get("top", [])}
    for r, row in enumerate(top[:10], 1):
        s = stats_of.get((row["layer"], row["neuron"]), {})
        md.append(f"| {r} | {row['layer']} | {row['neuron']} | {_fmt(row['predictivity'], 4)} | {row['position']} | "
                  f"{'higher for ' + sn.label_names[-1] if row['direction'] > 0 else 'lower for ' + sn.label_names[-1]} | "
                  f"{_fmt_q(s.get('q_value'))} | {_fmt(s.get('heldout_predictivity'), 4)} |")
    md += ["", "![best neuron](figures/best_neuron.png)", "", "![layers](figures/layers.png)", "",
           "## Perturbation", "",
           f"Mode `{abl.get('mode', rows[0]['mode'] if rows else '')}` on {abl.get('n_examples')} test examples; "
           f"random control: {_n_seeds(abl.get('seeds'))} seed(s), same count per layer.", "",
           "| fraction | clean | skill neurons perturbed | random neurons perturbed (mean ± std) | "
           "skill − random [95% CI] | McNemar p (per seed) |", "|---|---|---|---|---|---|"]
    for r in rows:
        pr = r.get("paired") or {}
        ci = f"{pr['difference']:+.3f} [{pr['ci_low']:+.3f}, {pr['ci_high']:+.3f}]" if pr else "n/a"
        mc = " / ".join(f"{p:.2g}" for p in pr.get("mcnemar_p", [])) or "n/a"
        md.append(f"| {r['fraction']:.0%} | {_fmt(r['clean_accuracy'])} | {_fmt(r['skill_accuracy'])} | "
                  f"{_fmt(r['random_accuracy'])} ± {_fmt(r['random_accuracy_std'])} | {ci} | {mc} |")
    md += ["", f"**{verdict(rows)}**", ""]
    if "ablation" in figs:
        md += ["![ablation](ablation/ablation.png)", ""]
    if demo.get("timings"):
        md += ["## Timings", "", "| phase | seconds |", "|---|---|"]
        md += [f"| {k} | {v:.1f} |" for k, v in demo["timings"].items()]
        md.append("")
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(_markdown_to_html(text, out, figs))
    return out / "report.html"


def _markdown_to_html(text: str, out: Path, figs: dict[str, Path]) -> str:
    """A small renderer for the markdown written above (headings, tables, images, quotes, bold)."""
    import re

    body: list[str] = []
    in_table = False
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if all(set(c) <= {"-"} for c in cells):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        m = re.match(r"!\[(.*?)\]\((.*?)\)", line)
        if m:
            body.append(f"<p>{_img(out / m.group(2))}</p>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("> "):
            body.append(f"<blockquote>{_inline(line[2:])}</blockquote>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "th{background:#f3f3f3}blockquote{background:#fff6dd;padding:.5em 1em;border-left:4px solid #e0a800}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>tl_skill report</title><style>{style}</style></head><body>{''.join(body)}</body></html>"


def _inline(s: str) -> str:
    import re

    s = html.escape(s)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)
