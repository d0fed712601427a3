"""The tutorial notebook executes from top to bottom (on a tiny random Llama) and shows what it says it shows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "demos" / "tutorial.ipynb"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    out = tmp_path_factory.mktemp("tutorial")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:  # what is stored is the SmolLM2 run shown in the docs; execute afresh
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    env = {"TL_SKILL_TUTORIAL": "tiny", "TL_SKILL_TUTORIAL_OUT": str(out / "work"), "PYTHONPATH": str(ROOT)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbclient.NotebookClient(
            nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(out)}}
        ).execute()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, out / "work"


def _outputs(nb, kind):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if kind(o)]


def test_every_cell_runs_and_nothing_warns(executed):
    nb, _ = executed
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code")
    errors = _outputs(nb, lambda o: o.output_type == "error")
    assert not errors
    warnings = [
        line
        for o in _outputs(nb, lambda o: o.output_type == "stream" and o.name == "stderr")
        for line in o.text.splitlines()
        if "Warning" in line and "several tokens long" not in line
    ]
    assert not warnings, warnings


def test_the_notebook_shows_tables_figures_and_a_dashboard(executed):
    nb, work = executed
    html = [o.data["text/html"] for o in _outputs(nb, lambda o: "data" in o and "text/html" in o.data)]
    pngs = _outputs(nb, lambda o: "data" in o and "image/png" in o.data)
    assert len(pngs) >= 2  # training curve, layer profile
    assert any("Skill neurons" in h and "<table" in h for h in html)  # SkillNeurons._repr_html_
    assert any("Task sports_vs_cooking" in h for h in html)
    assert any("<iframe srcdoc=" in h for h in html)
    # the run keeps its in-memory task; the export landed where the notebook said
    assert (work / "run" / "task.json").exists() and (work / "dashboard" / "index.html").exists()
    assert list((work / "neuronpedia").rglob("batch-0.jsonl.gz"))
