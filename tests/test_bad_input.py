"""Bad input is refused clearly, before any work, and nothing half-written is left (docs/errors.md)."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from tl_skill import SoftPrompt, TuneConfig, files, load_task, tune
from tl_skill.cli import main
from tl_skill.data import subsample
from tl_skill.data.tasks import TaskError
from tl_skill.find import find_skill_neurons
from tl_skill.models import load_model
from tl_skill.neurons import NEURONS_JSON, PREDICTIVITY_FILE, NeuronsError, SkillNeurons
from tl_skill.perturb import Perturbation, PerturbationError
from tl_skill.prune import prune_model
from tl_skill.record import MomentStats, Recorder, RecordingError
from tl_skill.tuning import layout_for
from tl_skill.tuning.runs import PROMPT_FILE, RUN_JSON, Run

CFG = dict(
    prompt_length=3,
    steps=2,
    eval_every=2,
    batch_size=8,
    max_train_examples=24,
    max_dev_examples=16,
    max_test_examples=16,
    max_input_tokens=16,
    eval_batch_size=16,
)
FIND = ["--max-train-examples", "24", "--max-eval-examples", "16", "-q"]


@pytest.fixture(scope="module")
def tiny_run(tiny_gpt2, tmp_path_factory):
    task = subsample(load_task("rotten_tomatoes"), {"train": 48, "dev": 16, "test": 16})
    return tune(tiny_gpt2, task, tmp_path_factory.mktemp("bad") / "run", TuneConfig(**CFG), progress=False)


@pytest.fixture(scope="module")
def tiny_neurons(tiny_gpt2, tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad") / "neurons"
    find_skill_neurons(tiny_gpt2, [tiny_run], max_train_examples=24, max_eval_examples=16, progress=False).save(out)
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _no_work(monkeypatch):
    """Make any model loading fail the test: refusals must come before the work."""
    import tl_skill.models

    def boom(*a, **k):
        raise AssertionError("the command started working before refusing its input")

    monkeypatch.setattr(tl_skill.models, "load_model", boom)


# ------------------------------------------------------------- crashes after the work
def test_transfer_with_two_tasks_prints_na(tiny_gpt2, tiny_run, tiny_neurons, tmp_path, capsys):
    other = tune(
        tiny_gpt2,
        subsample(load_task("word_sentiment"), {"train": 48, "dev": 16, "test": 16}),
        tmp_path / "ws_run",
        TuneConfig(**CFG),
        progress=False,
    )
    assert main(["find", str(other.path), "--out", str(tmp_path / "ws"), *FIND]) == 0
    capsys.readouterr()
    args = [
        "transfer",
        str(tiny_neurons),
        str(tmp_path / "ws"),
        "--out",
        str(tmp_path / "t"),
        "--transfer-steps",
        "0",
        "--no-figures",
        "--max-eval-examples",
        "16",
        "-q",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "n/a" in out and "3+ pairs" in out and "saved to" in out
    data = json.loads((tmp_path / "t" / "transfer.json").read_text())
    assert any(c["mantel_p"] is None for c in data["correlations"].values())
    assert main(args + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == data["tasks"]


def test_study_with_two_tasks_prints(tmp_path, capsys):
    args = [
        "study",
        "--model",
        "tiny-gpt2",
        "--tasks",
        "rotten_tomatoes,word_sentiment",
        "--out",
        str(tmp_path / "s"),
        "--steps",
        "2",
        "--prompt-length",
        "2",
        "--max-dev-examples",
        "16",
        "--max-test-examples",
        "16",
        "--find-train-examples",
        "24",
        "--find-eval-examples",
        "16",
        "--transfer-steps",
        "0",
        "--max-eval-examples",
        "16",
        "--device",
        "cpu",
        "-q",
    ]
    assert main(args) == 0
    assert "n/a" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["find", "prune", "ablate"])
def test_out_that_is_a_file_is_refused_before_work(command, tiny_run, tiny_neurons, tmp_path, capsys, monkeypatch):
    _no_work(monkeypatch)
    target = tmp_path / "a_file"
    target.write_text("x")
    extra = [] if command == "find" else ["--neurons", str(tiny_neurons)]
    assert main([command, str(tiny_run.path), *extra, "--out", str(target), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"--out {target} is a file" in err and "Traceback" not in err
    assert target.read_text() == "x"


def test_unwritable_out_is_refused_before_work(tiny_run, capsys, monkeypatch):
    _no_work(monkeypatch)
    assert main(["find", str(tiny_run.path), "--out", "/proc/tl_skill_out", "-q"]) == 2
    assert "/proc/tl_skill_out is not writable" in capsys.readouterr().err


def test_prune_max_examples_zero_means_the_test_set(tiny_run, tiny_neurons, tmp_path, capsys):
    out = tmp_path / "p"
    assert (
        main(
            [
                "prune",
                str(tiny_run.path),
                "--neurons",
                str(tiny_neurons),
                "--out",
                str(out),
                "--max-examples",
                "0",
                "--keep",
                "0.1",
                "--timing-repeats",
                "1",
                "--json",
                "-q",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["n_test"] == 16  # the run's whole (capped) test split
    assert (out / "prune.json").exists() and (out / "pruned.safetensors").exists()


def test_refused_prune_leaves_nothing(tiny_gpt2, tiny_run, tiny_neurons, tmp_path):
    from tl_skill.experiments.pruning import prune_experiment
    from tl_skill.prune import PruneError

    out = tmp_path / "p"
    with pytest.raises(PruneError, match="max_examples"):
        prune_experiment(tiny_gpt2, tiny_run, tiny_neurons, out, keep=0.1, max_examples=0, progress=False)
    assert not out.exists()


# ------------------------------------------------------------------ numeric options
@pytest.mark.parametrize(
    "argv, option",
    [
        (["evaluate", "RUN", "--batch-size", "-3"], "--batch-size"),
        (["transfer", "N1", "N2", "--out", "o", "--batch-size", "-3"], "--batch-size"),
        (["tune", "--out", "o", "--patience", "-1"], "--patience"),
        (["find", "RUN", "--out", "o", "--top", "-5"], "--top"),
        (["find", "RUN", "--out", "o", "--layers", "1-0"], "--layers"),
        (["find", "RUN", "--out", "o", "--layers", "a"], "--layers"),
        (["tune", "--out", "o", "--seed", "-1"], "--seed"),
        (["tune", "--out", "o", "--seeds", "0,x"], "--seeds"),
        (["tune", "--out", "o", "--prompt-length", "0"], "--prompt-length"),
        (["tune", "--out", "o", "--lr", "nan"], "--lr"),
        (["ablate", "RUN", "--neurons", "N", "--out", "o", "--fractions", "0.1,1.5"], "--fractions"),
        (["ablate", "RUN", "--neurons", "N", "--out", "o", "--std", "0"], "--std"),
        (["prune", "RUN", "--neurons", "N", "--out", "o", "--keep", "2"], "--keep"),
        (["study", "--tasks", "a,b", "--out", "o", "--steps", "0"], "--steps"),
        (["origin", "--out", "o", "--seeds", "0"], "--seeds"),
        (["evaluate", "RUN", "--device", "gpu"], "--device"),
        (["evaluate", "RUN", "--device", "xla"], "--device"),
    ],
)
def test_bad_numbers_are_refused_while_parsing(argv, option, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err
    if option == "--device":
        assert "cpu, cuda, cuda:N" in err and "mps" in err


def test_prompt_longer_than_the_context_is_refused_before_the_run_exists(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "tune",
            "--model",
            "tiny-gpt2",
            "--out",
            str(out),
            "--prompt-length",
            "600",
            "--steps",
            "1",
            "--device",
            "cpu",
            "-q",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "prompt length 600" in err and "context of 512" in err
    assert not out.exists()  # no run left marked "running"


def test_non_positive_batch_size_in_the_library(tiny_gpt2, tiny_run):
    from tl_skill import evaluate

    task = tiny_run.load_task()
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        evaluate(tiny_gpt2, task, "test", tiny_run.verbalizer(tiny_gpt2), tiny_run.prompt, batch_size=-3)


# --------------------------------------------------------------- silently wrong results
@pytest.mark.parametrize("field, value", [("max_input_tokens", 12), ("padding_side", "right")])
def test_find_refuses_runs_probed_differently(tiny_gpt2, tiny_run, tmp_path, field, value):
    other = _copy(tiny_run.path, tmp_path / "other")
    info = json.loads((other / RUN_JSON).read_text())
    info["config"][field] = value
    (other / RUN_JSON).write_text(json.dumps(info))
    with pytest.raises(NeuronsError, match=f"runs differ in {field}"):
        find_skill_neurons(tiny_gpt2, [tiny_run.path, other], progress=False)


def test_find_refuses_the_same_run_twice(tiny_run, capsys, monkeypatch):
    _no_work(monkeypatch)
    assert main(["find", str(tiny_run.path), str(tiny_run.path) + "/", "--out", "x", "-q"]) == 2
    assert "the same run is given twice" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value, message",
    [("task", "word_sentiment", "task mismatch"), ("label_words", [" bad", " good"], "label words differ")],
)
def test_prune_refuses_neurons_of_another_task(
    tiny_run, tiny_neurons, tmp_path, capsys, monkeypatch, field, value, message
):
    _no_work(monkeypatch)
    other = _copy(tiny_neurons, tmp_path / "n")
    info = json.loads((other / NEURONS_JSON).read_text())
    info[field] = value
    (other / NEURONS_JSON).write_text(json.dumps(info))
    assert main(["prune", str(tiny_run.path), "--neurons", str(other), "--out", str(tmp_path / "p"), "-q"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def _csv(path, rows):
    path.write_text("text,label\n" + "".join(f"{t},{l}\n" for t, l in rows))
    return path


def _labelled(n=24):
    return [
        (f"a {'fine' if i % 2 else 'poor'} example number {i}", "positive" if i % 2 else "negative") for i in range(n)
    ]


TINY_TUNE = [
    "--model",
    "tiny-gpt2",
    "--steps",
    "2",
    "--eval-every",
    "2",
    "--prompt-length",
    "2",
    "--max-input-tokens",
    "16",
    "--device",
    "cpu",
    "-q",
]


def test_csv_task_is_stored_absolute_and_fingerprinted(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    _csv(data / "my.csv", _labelled(40))
    monkeypatch.chdir(data)
    assert main(["tune", "--task", "csv:my.csv", "--out", str(tmp_path / "run"), *TINY_TUNE]) == 0
    info = json.loads((tmp_path / "run" / RUN_JSON).read_text())
    assert info["task"] == f"csv:{data / 'my.csv'}"
    assert info["task_spec"]["digest"] == files.file_digest(data / "my.csv")
    monkeypatch.chdir(tmp_path)  # another working directory: the same data
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--json", "-q", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == Run.load(tmp_path / "run").metrics["test_accuracy"]
    with open(data / "my.csv", "a") as f:  # rows appended: the splits would change
        f.write("one more row,positive\n")
    assert main(["evaluate", str(tmp_path / "run"), "-q", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "has changed since it was recorded" in err and str(data / "my.csv") in err


def test_run_json_naming_a_foreign_file_is_refused(tiny_run, tmp_path, capsys):
    run = _copy(tiny_run.path, tmp_path / "run")
    info = json.loads((run / RUN_JSON).read_text())
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret first line\n")
    info["task"] = f"csv:{secret}"
    (run / RUN_JSON).write_text(json.dumps(info))
    # the run keeps its (subsampled) task's examples: they must be of the task run.json names
    assert main(["evaluate", str(run), "-q", "--device", "cpu"]) == 2
    assert "the files do not belong together" in capsys.readouterr().err
    info.pop("task_file")
    (run / RUN_JSON).write_text(json.dumps(info))
    assert main(["evaluate", str(run), "-q", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(secret) in err and "records no sha256" in err and "top secret" not in err


def test_label_words_mapping_is_explicit(tmp_path):
    path = _csv(tmp_path / "t.csv", _labelled(40))  # "negative" appears first
    task = load_task(f"csv:{path}", label_words="positive=good,negative=bad")
    assert task.spec.label_names == ("positive", "negative")
    assert task.label_words == (" good", " bad")
    for text, y in zip(task.texts("train"), task.labels("train")):
        assert ("fine" in text) == (task.spec.label_names[y] == "positive")
    plain = load_task(f"csv:{path}", label_words="bad,good")  # order of first appearance
    assert plain.spec.label_names == ("negative", "positive") and plain.label_words == (" bad", " good")
    with pytest.raises(TaskError, match="mixes"):
        load_task(f"csv:{path}", label_words="positive=good,bad")
    three = _csv(tmp_path / "n.csv", _labelled(40) + [("x y", "neutral")])
    with pytest.raises(TaskError, match=r"\['neutral'\] have no label word"):
        load_task(f"csv:{three}", label_words="positive=good,negative=bad")


def test_run_keeps_the_label_mapping(tmp_path, capsys):
    path = _csv(tmp_path / "t.csv", _labelled(40))
    out = tmp_path / "run"
    assert (
        main(
            [
                "tune",
                "--task",
                f"csv:{path}",
                "--label-words",
                "positive=good,negative=bad",
                "--out",
                str(out),
                *TINY_TUNE,
            ]
        )
        == 0
    )
    run = Run.load(out)
    assert run.info["task_spec"]["label_names"] == ["positive", "negative"]
    assert run.info["label_words"] == [" good", " bad"]
    again = run.load_task()
    assert again.spec.label_names == ("positive", "negative") and again.label_words == (" good", " bad")


@pytest.mark.parametrize("word", ["NaN", "NA", "null", "None", "n/a"])
def test_text_that_looks_missing_is_kept(tmp_path, word):
    rows = _labelled(200) + [(word, "positive")]
    task = load_task(f"csv:{_csv(tmp_path / 't.csv', rows)}")
    assert word in sum((task.texts(s) for s in ("train", "dev", "test")), [])
    jl = tmp_path / "t.jsonl"
    jl.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    assert word in sum((load_task(f"jsonl:{jl}").texts(s) for s in ("train", "dev", "test")), [])


def test_prompt_without_room_is_refused(tiny_gpt2, tiny_llama):
    for model in (tiny_gpt2, tiny_llama):
        prompt = SoftPrompt.from_vocab(model, 4)
        raw = torch.tensor([[11, 12, 13, 14, 15, 16, 17]])  # real tokens only
        with prompt.applied(model), pytest.raises(ValueError, match="not prompt placeholders"):
            model(raw)
        short = torch.tensor([[11, 12]])
        with prompt.applied(model), pytest.raises(ValueError, match="too few for a prompt of 4"):
            model(short)
        batch = layout_for(model, 4).encode(["a fine film", "bad"])  # made with room: accepted
        with torch.no_grad(), prompt.applied(model):
            assert model(batch.input_ids, attention_mask=batch.attention_mask).shape[1] == batch.input_ids.shape[1]


def test_hook_width_is_checked(tiny_gpt2, tiny_neurons, tiny_run):
    pruned = prune_model(tiny_gpt2, tiny_neurons, keep=0.1, layers=[1])
    batch = layout_for(pruned, 3, 16).encode(["a fine film", "a poor one"], [1, 0])
    rec = Recorder(pruned, MomentStats(2, 2, 3, 256), positions="prompt")
    with rec.attached(), pytest.raises(RecordingError, match=r"blocks\.1\.mlp\.hook_post has width 25"):
        rec.run(batch, tiny_run.prompt)
    pert = Perturbation(pruned, [(1, 3)], "zero")
    with (
        torch.no_grad(),
        pert.attached(),
        tiny_run.prompt.applied(pruned, batch),
        pytest.raises(PerturbationError, match="width 25, but 256"),
    ):
        pruned(batch.input_ids, attention_mask=batch.attention_mask)
    assert not pruned.hook_dict["blocks.1.mlp.hook_post"].fwd_hooks  # nothing left behind


# ----------------------------------------------------------------- unreadable files
@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda d: (d / PROMPT_FILE).write_bytes((d / PROMPT_FILE).read_bytes()[:40]),
            "prompt.safetensors is not a readable",
        ),
        (lambda d: (d / PROMPT_FILE).write_bytes(b"garbage" * 10), "prompt.safetensors is not a readable"),
        (lambda d: (d / RUN_JSON).write_text('{"model": "tiny-gpt2", '), "run.json is not valid JSON"),
        (lambda d: (d / RUN_JSON).write_text("[1, 2]"), "must hold a JSON object"),
        (lambda d: _edit(d / RUN_JSON, task_seed="zero"), "'task_seed' must be an integer"),
        (lambda d: _edit(d / RUN_JSON, label_words=[1, 2]), "'label_words' must be a list of strings"),
        (lambda d: _edit(d / RUN_JSON, config={"steps": "many"}), "'config' is not a valid tuning config"),
        (lambda d: _edit(d / RUN_JSON, drop="model"), "lacks 'model'"),
    ],
)
def test_corrupt_run_files_name_the_file(tiny_run, tmp_path, capsys, monkeypatch, damage, message):
    _no_work(monkeypatch)
    run = _copy(tiny_run.path, tmp_path / "run")
    damage(run)
    assert main(["evaluate", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(run) in err and "Traceback" not in err


def _edit(path, drop=None, **changes):
    info = json.loads(path.read_text())
    info.update(changes)
    if drop:
        del info[drop]
    path.write_text(json.dumps(info))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / PREDICTIVITY_FILE).write_bytes(b"\x00" * 64), "predictivity.safetensors is not a readable"),
        (lambda d: (d / NEURONS_JSON).write_text("{"), "neurons.json is not valid JSON"),
        (lambda d: _edit(d / NEURONS_JSON, layers="all"), "'layers' must be a list"),
        (lambda d: _edit(d / NEURONS_JSON, layers=[0]), "do not fit"),
        (lambda d: _edit(d / NEURONS_JSON, drop="subtasks"), "lacks 'subtasks'"),
    ],
)
def test_corrupt_neuron_files_name_the_file(tiny_run, tiny_neurons, tmp_path, capsys, monkeypatch, damage, message):
    _no_work(monkeypatch)
    neurons = _copy(tiny_neurons, tmp_path / "n")
    damage(neurons)
    assert main(["ablate", str(tiny_run.path), "--neurons", str(neurons), "--out", str(tmp_path / "a"), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(neurons) in err and "Traceback" not in err
    with pytest.raises(NeuronsError, match=message.split(" is")[0]):
        SkillNeurons.load(neurons)


# -------------------------------------------------------------------- hub, devices
def test_hub_offline_is_said_at_once(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}  # as a user sets it: before start
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "tl_skill", "evaluate", "RUN", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    startup = time.perf_counter() - t0
    for argv, message in [
        (
            ["tune", "--model", "someone/no-such-model", "--out", str(tmp_path / "r")],
            "HF_HUB_OFFLINE is set, and no copy is in the local Hugging Face cache",
        ),
        (
            ["tune", "--model", "tiny-gpt2", "--task", "someone/no-such-dataset", "--out", str(tmp_path / "r")],
            "cannot load Hugging Face dataset 'someone/no-such-dataset'",
        ),
    ]:
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "tl_skill", *argv, "-q"], env=env, capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1  # one line, no hub warnings even with -q
        assert time.perf_counter() - t0 < startup + 10  # no rounds of retries


def test_unreachable_hub_is_detected(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(files, "_HUB_STATE", {})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    why = files.hub_unreachable(timeout=2)
    assert why is not None and "cannot be reached" in why and "127.0.0.1" in why
    with pytest.raises(TaskError, match="HF_HUB_OFFLINE=1"):
        load_task("someone/no-such-dataset")


def test_bad_device_in_the_library():
    with pytest.raises(ValueError, match="unknown device 'gpu'; choose one of cpu, cuda"):
        load_model("tiny-gpt2", device="gpu")
