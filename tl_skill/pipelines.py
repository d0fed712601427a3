"""Pipelines: an experiment, then its views. The main job (`run_demo`): tune -> find -> trace -> perturb
-> dashboards -> a self-contained report.

Every phase writes its result to the output directory before the next one
starts, and a rerun skips finished phases (and resumes an interrupted tuning
or perturbation run), so Ctrl-C never loses more than the phase in progress.
`demo.json` (`DemoResult`) holds the settings and each phase's time.
"""

from __future__ import annotations

import logging
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tl_skill.data.sources import load_task
from tl_skill.data.tasks import subsample
from tl_skill.errors import FileFormatError
from tl_skill.experiments.ablation import ablation_experiment
from tl_skill.experiments.dashboard import dashboard_data
from tl_skill.experiments.demo import DEMO_JSON, DemoConfig, DemoResult, legacy_demo_identity
from tl_skill.files import atomic_write, claim_dir, rolls_back_claims
from tl_skill.find import load_or_find, trace_activations
from tl_skill.models import load_model
from tl_skill.tuning.runs import tune
from tl_skill.viz.dashboard import write_dashboard
from tl_skill.viz.report import write_report

log = logging.getLogger(__name__)

PhaseCallback = Callable[[str, float, str], None]


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


def _savez(path: Path, values: np.ndarray, labels: np.ndarray, baselines: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to the temporary name
        np.savez(f, values=values, labels=labels, baselines=baselines)


def _trace_ok(path: Path, n: int) -> bool:
    """Whether `path` holds a whole trace of `n` neurons (a truncated or foreign file does not)."""
    try:
        with np.load(path) as z:
            return z["values"].shape[1:] == (n,) and len(z["labels"]) == len(z["values"]) and len(z["baselines"]) == n
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return False


@rolls_back_claims
def run_demo(
    out: str | Path,
    config: DemoConfig | None = None,
    device=None,
    dtype=None,
    progress: bool = True,
    on_phase: PhaseCallback | None = None,
) -> Path:
    """Run the whole skill-neuron pipeline and write `report.html` and `report.md` into `out`."""
    cfg = config or DemoConfig()
    task = load_task(cfg.task)  # validates the task before any long work
    out = claim_dir(out, "demo", cfg.to_dict(), legacy=legacy_demo_identity)
    timings: dict[str, float] = {}
    if (out / DEMO_JSON).exists():
        try:
            timings = dict(DemoResult.load(out).timings)
        except FileFormatError as exc:  # only the phase timings are lost: every phase validates its own files
            log.warning("%s cannot be read (%s): its phase timings start again", out / DEMO_JSON, exc)

    def save_state():
        DemoResult(cfg.to_dict(), dict(timings)).save(out)

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
        ph.summary = (
            f"dev {m['dev_accuracy']:.3f}, test {m['test_accuracy']:.3f} "
            f"(zero-shot {m['zero_shot_accuracy']:.3f}, majority {m['majority_accuracy']:.3f})"
        )
    with _phase("finding skill neurons", cb) as ph:
        sn = load_or_find(
            model,
            [run],
            out / "neurons",
            max_train_examples=cfg.find_train_examples,
            max_eval_examples=cfg.find_dev_examples,
            batch_size=cfg.batch_size,
            progress=progress,
            control="shuffled",
        )
        best = sn.top(1)[0]
        ph.summary = f"best neuron L{best['layer']}.{best['neuron']} predictivity {best['predictivity']:.3f}"
    with _phase("tracing the best neurons", cb) as ph:
        trace_file = out / "trace.npz"
        top3 = sn.top(3)
        if not _trace_ok(trace_file, len(top3)):  # a file a crash cut short is traced again
            dev = subsample(run.load_task(), {"dev": cfg.find_dev_examples}, seed=run.info["task_seed"])
            layer_slot = {l: s for s, l in enumerate(sn.layers)}
            values, labels = trace_activations(
                model,
                dev,
                "dev",
                run.prompt.to(next(model.parameters()).device),
                [(r["layer"], r["neuron"]) for r in top3],
                batch_size=cfg.batch_size,
                progress=progress,
                max_input_tokens=run.config.max_input_tokens,
            )
            picked = np.stack([values[:, j, r["position"]].numpy() for j, r in enumerate(top3)], 1)
            baselines = np.asarray(
                [float(sn.baseline[0, layer_slot[r["layer"]], r["position"], r["neuron"]]) for r in top3]
            )
            atomic_write(trace_file, lambda tmp: _savez(tmp, values=picked, labels=labels.numpy(), baselines=baselines))
        ph.summary = f"{len(top3)} neurons traced on the dev split"
    with _phase("perturbation", cb) as ph:
        abl = ablation_experiment(
            model,
            run,
            sn,
            out / "ablation",
            mode=cfg.ablation_mode,
            fractions=cfg.ablation_fractions,
            seeds=cfg.ablation_seeds,
            max_examples=cfg.ablation_examples,
            batch_size=cfg.batch_size,
            progress=progress,
        )
        last = abl.rows[-1]
        ph.summary = (
            f"at {last['fraction']:.0%}: skill {last['skill_accuracy']:.3f} vs random "
            f"{last['random_accuracy']:.3f} (clean {last['clean_accuracy']:.3f})"
        )
    with _phase("dashboards", cb) as ph:
        dash = dashboard_data(
            model,
            run,
            sn,
            out / "dashboard",
            top=cfg.dashboard_top,
            max_examples=cfg.dashboard_examples,
            ablation=abl,
            batch_size=cfg.batch_size,
            progress=progress,
        )
        index = write_dashboard(dash, out / "dashboard")
        worst = min(dash.neurons, key=lambda r: r["ablation_delta"])
        ph.summary = (
            f"{len(dash.neurons)} neuron pages in {index.parent.name}/; alone, L{worst['layer']}."
            f"{worst['neuron']} costs the most ({worst['ablation_delta']:+.3f})"
        )
    with _phase("report", cb) as ph:
        path = write_report(out)
        ph.summary = str(path)
    return path
