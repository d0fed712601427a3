"""The notebook surface: tasks from data in memory, results indexed by name, tables, figures, displays."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tl_skill import Task, TLSkillError, load_task
from tl_skill.data.tasks import subsample
from tl_skill.errors import NeuronsError, RunError, TaskError
from tl_skill.experiments.ablation import AblationResult, ablation_experiment
from tl_skill.experiments.dashboard import dashboard_data
from tl_skill.experiments.origin import OriginResult
from tl_skill.experiments.pruning import PruneResult
from tl_skill.experiments.transfer import StudyResult, TransferResult
from tl_skill.find import find_skill_neurons
from tl_skill.neurons import SkillNeurons
from tl_skill.tuning import Run, TuneConfig, tune
from tl_skill.viz import export_neuronpedia, plots, write_dashboard

ROOT = Path(__file__).resolve().parents[1]

SPORT = ["the striker scored twice", "a late goal won the cup", "the keeper saved a penalty", "fans cheered the team"]
COOKING = ["simmer the sauce slowly", "knead the dough well", "roast the garlic first", "season the soup to taste"]


def _rows(n: int = 90) -> list[tuple[str, str]]:
    rows = []
    for i in range(n):
        pool, label = (SPORT, "sport") if i % 2 else (COOKING, "cooking")
        rows.append((f"{pool[i % 4]} ({i})", label))
    return rows


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return pd.DataFrame(_rows(), columns=["sentence", "topic"])


# ----------------------------------------------------------------------------- tasks in memory
def test_dataframe_records_and_datasetdict_become_the_same_task(frame):
    from datasets import Dataset, DatasetDict

    a = Task.from_pandas(frame, text="sentence", label="topic", seed=3)
    b = Task.from_records(frame.to_dict("records"), text="sentence", label="topic", seed=3)
    c = Task.from_records(list(frame.itertuples(index=False, name=None)), seed=3)
    d = Task.from_hf(DatasetDict({"train": Dataset.from_pandas(frame)}), text="sentence", label="topic", seed=3)
    assert a == b == c == d
    # the split rule of files: shuffled with the seed, cut 70/10/20, classes numbered by first appearance
    assert a.label_names == ("cooking", "sport") and a.label_words == (" cooking", " sport")
    assert [len(a[s]) for s in ("train", "dev", "test")] == [63, 9, 18]
    assert sorted(a.to_pandas()["text"]) == sorted(frame["sentence"])
    assert a != Task.from_pandas(frame, text="sentence", label="topic", seed=4)
    # load_task takes the data itself too (default columns)
    renamed = frame.rename(columns={"sentence": "text", "topic": "label"})
    assert load_task(renamed, seed=3) == a
    assert a.spec.examples and a.spec.source == "DataFrame in memory"


def test_given_splits_and_class_labels_are_kept(frame):
    from datasets import ClassLabel, Dataset, DatasetDict

    split = np.where(np.arange(len(frame)) < 60, "train", np.where(np.arange(len(frame)) < 70, "validation", "test"))
    with_split = frame.assign(part=split)
    a = Task.from_pandas(with_split, text="sentence", label="topic", split="part")
    assert [len(a[s]) for s in ("train", "dev", "test")] == [60, 10, 20]
    assert a.texts("dev") == list(frame["sentence"][60:70])
    parts = {"train": frame[:60], "validation": frame[60:70], "test": frame[70:]}
    dd = DatasetDict({k: Dataset.from_pandas(v, preserve_index=False) for k, v in parts.items()})
    assert Task.from_hf(dd, text="sentence", label="topic") == a
    # a ClassLabel column names and orders the classes as its feature says
    coded = {
        k: Dataset.from_dict(
            {"text": list(v["sentence"]), "label": [1 if t == "sport" else 0 for t in v["topic"]]}
        ).cast_column("label", ClassLabel(names=["cooking", "sport"]))
        for k, v in parts.items()
    }
    t = Task.from_hf(DatasetDict(coded), label_words=["food", "game"])
    assert t.label_names == ("cooking", "sport") and t.label_words == (" food", " game")
    assert t.labels("train").tolist() == [1 if x == "sport" else 0 for x in frame["topic"][:60]]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda f: Task(f, None), "spec must be a TaskSpec"),
        (lambda f: Task.from_pandas(f), "no column(s) ['text', 'label']"),
        (lambda f: Task.from_pandas(f.assign(topic=0), text="sentence", label="topic"), "integer labels need"),
        (lambda f: Task.from_pandas(f.assign(topic=f.index % 2), text="sentence", label="topic"), "label words"),
        (lambda f: Task.from_pandas(f.assign(topic="x"), text="sentence", label="topic"), "need"),
        (
            lambda f: Task.from_pandas(
                f.assign(sentence=[None] + list(f.sentence[1:])), text="sentence", label="topic"
            ),
            "empty text on row 0",
        ),
        (lambda f: Task.from_pandas(f.assign(p="val"), text="sentence", label="topic", split="p"), "'val' on row 0"),
        (lambda f: Task.from_records([("a", 0), ("b",)]), "record 1 is not a (text, label) pair"),
        (lambda f: Task.from_records("abc"), "list of dicts"),
        (lambda f: load_task(42), "cannot make a task of a int"),
        (lambda f: Task.from_pandas(f, text="sentence", label="topic", name="rotten_tomatoes"), "taken"),
        (lambda f: Task.from_pandas(f, text="sentence", label="topic", label_words=["a"]), "2 labels"),
    ],
)
def test_bad_data_is_refused_with_its_row(frame, make, message):
    with pytest.raises(TaskError) as err:
        make(frame)
    assert message in str(err.value)


def test_task_of_a_dataframe_is_refused_by_the_constructor(frame):
    task = Task.from_pandas(frame, text="sentence", label="topic")
    with pytest.raises(TaskError, match="Task.from_pandas"):
        Task(frame, task.spec)


def test_string_numbers_are_integer_labels_as_in_files(frame, tmp_path):
    coded = frame.assign(topic=[1 if t == "sport" else 0 for t in frame.topic])
    mem = Task.from_pandas(coded, text="sentence", label="topic", label_words="food,game")
    path = tmp_path / "t.csv"
    coded.rename(columns={"sentence": "text", "topic": "label"}).to_csv(path, index=False)
    from_file = load_task(f"csv:{path}", label_words="food,game")
    assert mem == from_file


# ----------------------------------------------------------------------------- runs keep their task
CFG = TuneConfig(
    prompt_length=3, steps=3, eval_every=3, max_train_examples=40, max_dev_examples=16, max_test_examples=18
)


@pytest.fixture(scope="module")
def memory_run(tiny_gpt2, frame, tmp_path_factory):
    task = Task.from_pandas(frame, text="sentence", label="topic", name="sports_vs_cooking")
    out = tmp_path_factory.mktemp("memory") / "run"
    run = tune(tiny_gpt2, task, out, CFG, progress=False)
    return task, run


def test_a_run_keeps_its_in_memory_task(memory_run):
    task, run = memory_run
    saved = json.loads((run.path / "task.json").read_text())
    assert saved["spec"]["name"] == "sports_vs_cooking"
    back = Run.load(run.path)
    assert back.load_task() == task and back.load_task().name == "sports_vs_cooking"
    info = json.loads((run.path / "run.json").read_text())
    assert info["task_file"]["sha256"] == task.spec.examples


def test_a_changed_task_file_is_refused(memory_run, tmp_path):
    import shutil

    _, run = memory_run
    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    saved = json.loads((copy / "task.json").read_text())
    saved["splits"]["test"]["label"][0] = 1 - saved["splits"]["test"]["label"][0]
    (copy / "task.json").write_text(json.dumps(saved))
    with pytest.raises(RunError, match="other examples than the run was tuned on"):
        Run.load(copy).load_task()
    (copy / "task.json").unlink()
    with pytest.raises(RunError, match="task.json; that file is missing"):
        Run.load(copy).load_task()


def test_a_subsampled_task_stays_subsampled_downstream(tiny_gpt2, tmp_path):
    full = load_task("subjectivity")
    small = subsample(full, {"train": 30, "dev": 12, "test": 14}, seed=1)
    run = tune(tiny_gpt2, small, tmp_path / "run", CFG, progress=False)
    back = Run.load(run.path).load_task()
    assert back == small and [len(back[s]) for s in ("train", "dev", "test")] == [30, 12, 14]
    assert back != full
    # the examples decide the run: another cut of the task is another run, refused in the same directory
    other = subsample(full, {"train": 30, "dev": 12, "test": 14}, seed=2)
    with pytest.raises(RunError, match="task_examples"):
        tune(tiny_gpt2, other, tmp_path / "run", CFG, progress=False)


def test_in_memory_run_through_find_ablate_dashboard_export(tiny_gpt2, memory_run, tmp_path):
    task, run = memory_run
    sn = find_skill_neurons(tiny_gpt2, [run], max_train_examples=40, max_eval_examples=16, progress=False)
    assert sn.task == "sports_vs_cooking"
    res = ablation_experiment(tiny_gpt2, run, sn, tmp_path / "abl", fractions=[0.1], seeds=2, progress=False)
    assert res.n_examples == 18  # the run's own test cap of its own task
    dash = dashboard_data(tiny_gpt2, run, sn, tmp_path / "dash", top=2, n_examples=2, progress=False)
    write_dashboard(dash, tmp_path / "html")
    assert (tmp_path / "html" / "index.html").exists()
    paths = export_neuronpedia(dash, tmp_path / "np")
    assert paths and all(p.exists() for p in paths)
    # the examples shown are the in-memory task's own test examples
    texts = task.texts("test")
    shown = {
        "".join(t for t, p in zip(e["tokens"], e["is_prompt"]) if not p)
        for n in dash.neurons
        for e in n["examples"]["top"]
    }
    assert shown and all(any(s.strip() in t or t in s for t in texts) for s in shown)


def test_in_memory_run_through_the_cli_in_a_fresh_process(memory_run, tmp_path):
    _, run = memory_run
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "tl_skill"]
    steps = [
        [
            "find",
            str(run.path),
            "--out",
            str(tmp_path / "n"),
            "--max-train-examples",
            "40",
            "--max-eval-examples",
            "16",
        ],
        ["ablate", str(run.path), "--neurons", str(tmp_path / "n"), "--out", str(tmp_path / "a")]
        + ["--fractions", "0.1", "--seeds", "1"],
        ["dashboard", str(tmp_path / "n"), "--run", str(run.path), "--top", "2", "--examples", "2"]
        + ["--out", str(tmp_path / "d")],
    ]
    for args in steps:
        done = subprocess.run([*cli, *args, "-q", "--device", "cpu"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, (args[0], done.stderr[-2000:])
    assert SkillNeurons.load(tmp_path / "n").task == "sports_vs_cooking"
    assert AblationResult.load(tmp_path / "a").n_examples == 18
    assert (tmp_path / "d" / "index.html").exists()


# ----------------------------------------------------------------------------- by name, tables, displays
@pytest.fixture(scope="module")
def layer_subset(tiny_llama, tmp_path_factory):
    task = subsample(load_task("rotten_tomatoes"), {"train": 60, "dev": 30, "test": 20})
    run = tune(tiny_llama, task, tmp_path_factory.mktemp("sub") / "run", CFG, progress=False)
    sn = find_skill_neurons(
        tiny_llama, [run], layers=[1], max_train_examples=40, max_eval_examples=30, confirm_split="test", progress=False
    )
    return run, sn


def test_named_accessors_equal_indexing_by_row(layer_subset):
    _, sn = layer_subset
    assert sn.layers == [1]
    for neuron in (0, 7, sn.d_mlp - 1):
        assert sn.predictivity_at(1, neuron) == float(sn.predictivity[0, neuron])
        for pos in range(sn.baseline.shape[2]):
            assert sn.baseline_at(1, pos, neuron) == float(sn.baseline[0, 0, pos, neuron])
    with pytest.raises(NeuronsError, match=r"layer 0 was not recorded; these skill neurons have layers \[1\]"):
        sn.predictivity_at(0, 0)
    with pytest.raises(NeuronsError, match="neuron must be an integer"):
        sn.predictivity_at(1, sn.d_mlp)
    top = sn.table(5)
    assert torch.equal(sn.mask_of(top), sn.select(k=5, per_layer=False))


def test_neurons_dataframe_has_every_statistic_the_cli_prints(layer_subset):
    _, sn = layer_subset
    frame = sn.to_dataframe()
    assert list(frame.columns[: len(SkillNeurons.DATAFRAME_COLUMNS)]) == list(SkillNeurons.DATAFRAME_COLUMNS)
    assert len(frame) == sn.d_mlp and set(frame["layer"]) == {1}
    st = sn.statistics(top=5)
    for row, want in zip(frame.head(5).itertuples(), st["top"]):
        assert (row.layer, row.neuron) == (want["layer"], want["neuron"])
        assert row.predictivity == pytest.approx(want["predictivity"])
        assert row.p_value == pytest.approx(want["p_value"]) and row.q_value == pytest.approx(want["q_value"])
        assert row.heldout_predictivity == pytest.approx(want["heldout_predictivity"])
    assert int(frame["significant"].sum()) == st["n_significant"]


def test_result_tables_have_their_documented_columns(tiny_gpt2, memory_run, tmp_path):
    _, run = memory_run
    sn = find_skill_neurons(tiny_gpt2, [run], max_train_examples=40, max_eval_examples=16, progress=False)
    abl = ablation_experiment(tiny_gpt2, run, sn, None, fractions=[0.1, 0.2], seeds=2, progress=False)
    frame = abl.to_dataframe()
    assert list(frame.columns) == list(AblationResult.COLUMNS) and list(frame["fraction"]) == [0.1, 0.2]
    assert frame["difference"].tolist() == [r["paired"]["difference"] for r in abl.rows]
    # the share of the above-chance accuracy lost, by hand from the saved accuracies
    clean, majority = abl.rows[0]["clean_accuracy"], abl.majority_accuracy
    for got, r in zip(frame.itertuples(), abl.rows):
        if clean > majority:
            assert got.skill_share_lost == pytest.approx((clean - r["skill_accuracy"]) / (clean - majority))
            assert got.random_share_lost == pytest.approx((clean - r["random_accuracy"]) / (clean - majority))
        else:
            assert got.skill_share_lost is None and got.random_share_lost is None
    hand = dataclasses.replace(abl, majority_accuracy=0.5, rows=[{**abl.rows[0], "clean_accuracy": 0.9}])
    assert hand.share_lost(0.8) == pytest.approx(0.25) and hand.share_lost(None) is None
    assert dataclasses.replace(hand, majority_accuracy=0.95).share_lost(0.8) is None  # clean below majority
    dash = dashboard_data(tiny_gpt2, run, sn, None, top=3, n_examples=2, progress=False)
    dframe = dash.to_dataframe()
    for col in ("layer", "neuron", "position", "predictivity", "ablation_delta", "direct_effect[cooking]"):
        assert col in dframe.columns
    assert len(dframe) == 3 and dframe["neuron"].tolist() == [n["neuron"] for n in dash.neurons]
    tasks = ["a", "b"]
    tr = TransferResult(
        model="m", tasks=tasks, transfer={"zero_shot": [[0.9, 0.6], [0.5, 0.8]]}, indicators={}, correlations={}
    )
    tframe = tr.to_dataframe()
    assert list(tframe.columns) == list(TransferResult.COLUMNS)
    assert tframe.query("source == 'b' and target == 'a'")["value"].item() == 0.5
    study = StudyResult(
        model="m",
        tasks=tasks,
        seeds=[0],
        correlations={},
        per_task={t: {"dev_accuracy": 0.7, "runs": []} for t in tasks},
    )
    assert study.to_dataframe()["task"].tolist() == tasks
    prune = PruneResult(
        model="m", task="t", run="r", kept_fraction=0.5, layers=[0], params_before=10, params_after=8, n_test=5,
        accuracy_before=0.8, accuracy_after=0.6,
    )  # fmt: skip
    assert list(prune.to_dataframe().columns) == list(PruneResult.COLUMNS)
    assert prune.to_dataframe()["accuracy"].tolist() == [0.8, 0.6]
    origin = OriginResult(
        model="m", task="t", status="done", settings={}, source={}, lora={"claim_holds": True, "clean_accuracy": 0.8}
    )
    assert origin.to_dataframe().to_dict("records") == [{"part": "lora", "claim_holds": True, "clean_accuracy": 0.8}]


def test_reprs_are_short_and_html_is_escaped(tiny_gpt2, memory_run, layer_subset, frame, tmp_path):
    task, run = memory_run
    _, sn = layer_subset
    for obj in (run, sn, task):
        assert len(repr(obj)) < 300, repr(obj)
    assert "dev=" in repr(run) and "best='L1 N" in repr(sn)
    sn2 = find_skill_neurons(tiny_gpt2, [run], max_train_examples=20, max_eval_examples=16, progress=False)
    html = SkillNeurons(**{**sn2.__dict__, "task": "<script>x</script>"})._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html and "<table" in html
    assert "<table" in run._repr_html_() or "Prompt-tuning run" in run._repr_html_()
    abl = ablation_experiment(tiny_gpt2, run, sn2, None, fractions=[0.1], seeds=1, progress=False)
    assert "<table" in abl._repr_html_() and len(repr(abl)) < 300


def test_plots_return_figures_and_write_nothing_unless_asked(layer_subset, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    run, sn = layer_subset
    monkeypatch.chdir(tmp_path)
    values = np.random.RandomState(0).randn(40)
    labels = np.arange(40) % 2
    figs = [
        plots.plot_layer_distribution(sn),
        plots.plot_statistics(sn),
        plots.plot_training_curve(run),
        plots.plot_activation_histogram(values, labels, 0.0),
        plots.plot_predictivity_histogram({"a": values}),
        plots.plot_task_matrix([[1, 0.5], [0.5, 1]], ["a", "b"]),
        plots.plot_predictivity_scatter(values, values),
        plots.plot_units_by_layer({"mlp": sn}),
        plots.plot_indicator_correlations({"overlap": {"zero_shot": {"spearman": 0.5}}}),
    ]
    assert all(isinstance(f, Figure) for f in figs)
    assert list(tmp_path.iterdir()) == []
    # ax=: drawn into the caller's axes
    fig = Figure()
    ax = fig.subplots()
    assert plots.plot_task_matrix([[1, 0.5], [0.5, 1]], ["a", "b"], ax=ax) is fig and ax.images
    with pytest.raises(TypeError, match="a sequence of 2 Axes"):
        plots.plot_layer_distribution(sn, ax=ax)
    plots.plot_layer_distribution(sn, tmp_path / "x.png")
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- what differs is said
def test_a_user_booted_bridge_is_told_what_differs(tmp_path, caplog):
    from transformers import AutoTokenizer

    from tl_skill import compat
    from tl_skill.models import _tiny_hf_model, tiny_tokenizer_dir

    if not compat.HAS_BRIDGE:
        pytest.skip("needs TransformerLens 4.x")
    from transformer_lens.model_bridge import TransformerBridge

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos=True))
    bridge = TransformerBridge.boot_transformers("tiny-llama", hf_model=_tiny_hf_model("tiny-llama", 0), tokenizer=tok)
    for p in bridge.parameters():
        p.requires_grad_(False)
    hook = bridge.blocks[0].mlp.register_forward_hook(lambda *a: None)
    task = Task.from_records(_rows(40))
    with caplog.at_level(logging.INFO, logger="tl_skill"):
        run = tune(bridge, task, tmp_path / "run", CFG, progress=False)
    hook.remove()
    said = caplog.text
    assert "every row starts with ['<bos>']" in said and "set_special_prefix(model, [])" in said
    assert "not its faster plain view: a hook on module blocks.0" in said
    assert said.count("every row starts with") == 1  # once per model
    notices = json.loads((run.path / "run.json").read_text())["notices"]
    assert set(notices) == {"name", "special_prefix", "fast_path"}
    compat.set_special_prefix(bridge, [])
    assert compat.model_prefix_ids(bridge) == []


def test_errors_are_one_family():
    assert issubclass(TaskError, TLSkillError) and issubclass(TaskError, ValueError)
