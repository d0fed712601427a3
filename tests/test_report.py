"""The demo pipeline, its report, and the demo scripts (run in fast mode so they cannot rot)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tl_skill import cli
from tl_skill.experiments.ablation import verdict
from tl_skill.pipelines import DemoConfig, run_demo
from tl_skill.tuning.runs import TuneConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny_demo_config() -> DemoConfig:
    return DemoConfig(
        model="tiny-gpt2",
        task="rotten_tomatoes",
        tune=TuneConfig(
            prompt_length=4, steps=6, eval_every=3, max_train_examples=120, max_dev_examples=40, max_test_examples=40
        ),
        find_train_examples=80,
        find_dev_examples=40,
        ablation_fractions=(0.05, 0.2),
        ablation_seeds=2,
        ablation_examples=40,
    )


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    phases = []
    run_demo(
        out, tiny_demo_config(), device="cpu", progress=False, on_phase=lambda name, s, summary: phases.append(name)
    )
    assert phases == [
        "load model",
        "prompt tuning",
        "finding skill neurons",
        "tracing the best neurons",
        "perturbation",
        "dashboards",
        "report",
    ]
    return out


def test_demo_writes_the_dashboards_and_links_them(demo_dir):
    from tl_skill.experiments.dashboard import DashboardResult

    dash = DashboardResult.load(demo_dir / "dashboard")
    assert len(dash.neurons) == tiny_demo_config().dashboard_top
    pages = sorted(p.name for p in (demo_dir / "dashboard").glob("neuron_L*.html"))
    assert len(pages) == len(dash.neurons) and (demo_dir / "dashboard" / "index.html").exists()
    assert 'href="dashboard/index.html"' in (demo_dir / "report.html").read_text()
    # the group effect is the demo's own ablation experiment
    abl = json.loads((demo_dir / "ablation" / "ablation.json").read_text())
    assert [g["fraction"] for g in dash.group_effect] == [r["fraction"] for r in abl["rows"]]


def _png_ok(path: Path) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    # Not blank: many distinct colours, and not one colour covering everything.
    flat = img[..., :3].reshape(-1, 3)
    assert flat.std(0).max() > 0.05, f"{path} looks blank"
    assert len(np.unique((flat * 255).astype(int), axis=0)) > 20


def test_report_figures_are_real_pngs(demo_dir):
    html = (demo_dir / "report.html").read_text()
    md = (demo_dir / "report.md").read_text()
    images = re.findall(r"!\[.*?\]\((.*?)\)", md)
    assert len(images) == 4  # training curve, best-neuron histogram, layers, perturbation curve
    for rel in images:
        _png_ok(demo_dir / rel)
    assert html.count("data:image/png;base64,") == len(images)  # self-contained


def test_report_numbers_equal_json(demo_dir):
    md = (demo_dir / "report.md").read_text()
    run = json.loads((demo_dir / "run" / "run.json").read_text())
    neurons = json.loads((demo_dir / "neurons" / "neurons.json").read_text())
    abl = json.loads((demo_dir / "ablation" / "ablation.json").read_text())
    m = run["metrics"]
    for label, key in [
        ("dev accuracy (best checkpoint)", "dev_accuracy"),
        ("test accuracy", "test_accuracy"),
        ("zero-shot accuracy (verbalizer, no prompt)", "zero_shot_accuracy"),
        ("majority-class accuracy", "majority_accuracy"),
    ]:
        assert f"| {label} | {m[key]:.3f} |" in md
    assert f"Best neuron predictivity **{neurons['best_predictivity']:.3f}**" in md
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\d+) \| ([0-9.]+) \|", md, re.M)
    assert len(rows) == 10
    for (_rank, layer, neuron, pred), ref in zip(rows, neurons["top"]):
        assert (int(layer), int(neuron)) == (ref["layer"], ref["neuron"])
        assert pred == f"{ref['predictivity']:.4f}"
    table = re.findall(r"^\| (\d+)% \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) ± ([0-9.]+) \|", md, re.M)
    assert len(table) == len(abl["rows"]) == 2
    for got, ref in zip(table, abl["rows"]):
        assert got == (
            f"{ref['fraction'] * 100:.0f}",
            f"{ref['clean_accuracy']:.3f}",
            f"{ref['skill_accuracy']:.3f}",
            f"{ref['random_accuracy']:.3f}",
            f"{ref['random_accuracy_std']:.3f}",
        )
    assert verdict(abl["rows"]).sentence in md


def test_rerun_continues_without_redoing(demo_dir, monkeypatch):
    import tl_skill.find
    import tl_skill.tuning.runs

    def boom(*a, **k):
        raise AssertionError("finished work was redone")

    monkeypatch.setattr(tl_skill.find, "record_run", boom)
    monkeypatch.setattr(tl_skill.tuning.runs.torch.optim, "AdamW", boom)
    before = (demo_dir / "ablation" / "ablation.json").read_text()
    run_demo(demo_dir, tiny_demo_config(), device="cpu", progress=False)
    assert json.loads((demo_dir / "ablation" / "ablation.json").read_text())["rows"] == json.loads(before)["rows"]


def test_demo_refuses_other_settings(demo_dir):
    cfg = tiny_demo_config()
    cfg.ablation_seeds = 3
    with pytest.raises(ValueError, match="other settings"):
        run_demo(demo_dir, cfg, device="cpu", progress=False)


def test_verdict_statements():
    from tl_skill.experiments.ablation import paired_comparison

    rand = [[1] * 80 + [0] * 20, [1] * 78 + [0] * 22]  # two random seeds, 100 test examples
    worse = [1] * 60 + [0] * 40  # correct on a subset of what the random controls get right
    row = dict(fraction=0.1, clean_accuracy=0.8, random_accuracy=0.79, random_accuracy_std=0.01)
    hurt = {**row, "skill_accuracy": 0.6, "paired": paired_comparison(worse, rand)}
    same = {**row, "skill_accuracy": 0.79, "paired": paired_comparison(rand[0], rand)}
    assert hurt["paired"]["ci_high"] < 0 <= same["paired"]["ci_high"]
    assert verdict([hurt]).sentence.startswith("Holds:")
    assert verdict([same]).sentence.startswith("Does not hold")
    assert verdict([hurt, same]).sentence.startswith("Holds partly")
    assert "rule: the 95% CI of the paired skill minus random accuracy lies below 0" in verdict([hurt]).sentence
    assert verdict([row]).sentence.startswith("no paired test")


def test_every_subcommand_has_help_with_examples(capsys):
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert {"demo", "tune", "evaluate", "find", "ablate", "prune", "transfer", "study"} <= set(subs.choices)
    for name, sub in subs.choices.items():
        text = sub.format_help()
        assert "examples:" in text and f"tl-skill {name}" in text, name
        assert "--device" in text and "--dtype" in text and "--batch-size" in text, name


@pytest.mark.parametrize("script", ["01_find_and_inspect.py", "02_ablate_with_hooks.py", "03_compare_tasks.py"])
def test_demo_scripts_run_fast(script):
    res = subprocess.run(
        [sys.executable, str(ROOT / "demos" / script), "--fast"], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "accuracy" in res.stdout


def test_cli_demo_prints_phases_once_on_the_main_process(monkeypatch, tmp_path, capsys):
    import tl_skill.cli.views as report
    from tl_skill import distributed
    from tl_skill.cli import main

    def fake_run_demo(out, cfg, on_phase=None, **kw):
        assert cfg.model == "tiny-gpt2" and cfg.task == "word_sentiment"
        on_phase("tune", 1.5, "dev 0.9")
        on_phase("find", 2.0, "best neuron 0.8")
        return tmp_path / "report.html"

    monkeypatch.setattr(report, "run_demo", fake_run_demo)
    main(["demo", "--model", "tiny-gpt2", "--task", "word_sentiment", "--out", str(tmp_path), "-q"])
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split("]")[1].split()[0] for ln in lines[:2]] == ["tune", "find"] and "dev 0.9" in lines[0]
    assert lines[2] == f"report: {tmp_path / 'report.html'}"
    monkeypatch.setattr(distributed, "is_main", lambda: False)  # another torchrun rank: silent
    main(["demo", "--model", "tiny-gpt2", "--task", "word_sentiment", "--out", str(tmp_path), "-q"])
    assert capsys.readouterr().out == ""
