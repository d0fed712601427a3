"""Writes stay inside --out, results never mix runs or units, verdicts need something to judge, warnings
are seen, and nothing a refused or interrupted command leaves blocks the next one (docs/errors.md)."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_skill import TuneConfig, load_task, tune
from tl_skill.cli import main
from tl_skill.data import subsample
from tl_skill.errors import ModelLoadError, NeuronsError, RecordingError, RunError, TaskError, UnitError
from tl_skill.experiments.runner import CONDITIONS_DIR
from tl_skill.files import check_inside, path_component
from tl_skill.find import find_skill_neurons, record_run, trace_activations
from tl_skill.neurons import NEURONS_JSON, PREDICTIVITY_FILE, SkillNeurons
from tl_skill.predictivity import make_subtasks
from tl_skill.record import MomentStats, Recorder
from tl_skill.tuning import SoftPrompt
from tl_skill.tuning.runs import PROMPT_FILE, RUN_JSON, Run
from tl_skill.units import SAE

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
SMALL = ["--max-examples", "16", "-q"]


@pytest.fixture(scope="module")
def base(tiny_gpt2, tmp_path_factory):
    """A finished tiny run and its neurons (copied by each test that changes them)."""
    root = tmp_path_factory.mktemp("rel")
    task = subsample(load_task("rotten_tomatoes"), {"train": 48, "dev": 16, "test": 16})
    run = tune(tiny_gpt2, task, root / "run", TuneConfig(**CFG), progress=False)
    find_skill_neurons(tiny_gpt2, [run], max_train_examples=24, max_eval_examples=16, progress=False).save(
        root / "neurons"
    )
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def _no_temporary_files(root: Path) -> None:
    left = list(root.rglob("*.tmp"))
    assert left == []


# ----------------------------------------------------------------------------- writes inside --out
@pytest.mark.parametrize("option", ["--model-id", "--source-set"])
def test_export_refuses_a_name_that_leads_out(base, tmp_path, option, capsys):
    out = tmp_path / "e1"
    code = main(
        [
            "export",
            "neuronpedia",
            str(base / "neurons"),
            "--run",
            str(base / "run"),
            "--out",
            str(out),
            option,
            "../../evil",
            *SMALL,
        ]
    )
    assert code == 2 and "plain name" in capsys.readouterr().err
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_export_of_a_run_from_a_model_directory_stays_inside_out(tiny_gpt2, tmp_path):
    from tl_skill.compat import hf_model_of, plain_hf_copy

    model_dir = tmp_path / "models" / "my-gpt2"
    plain_hf_copy(hf_model_of(tiny_gpt2), share_tensors=True).save_pretrained(model_dir)
    tiny_gpt2.tokenizer.save_pretrained(model_dir)
    before = _files(model_dir)
    run = tmp_path / "run"
    assert (
        main(
            [
                "tune",
                "--model",
                str(model_dir),
                "--task",
                "rotten_tomatoes",
                "--out",
                str(run),
                "--steps",
                "2",
                "--prompt-length",
                "3",
                "--max-train-examples",
                "24",
                "--max-dev-examples",
                "16",
                "--max-test-examples",
                "16",
                "-q",
            ]
        )
        == 0
    )
    assert main(["find", str(run), "--out", str(tmp_path / "n"), *FIND]) == 0
    out = tmp_path / "export"
    assert (
        main(["export", "neuronpedia", str(tmp_path / "n"), "--run", str(run), "--out", str(out), "--top", "2", *SMALL])
        == 0
    )
    assert _files(model_dir) == before  # nothing written into the model's own directory
    written = [p for p in _files(out) if p.suffix == ".gz"]
    assert written and all(p.resolve().is_relative_to(out.resolve()) for p in written)
    assert all(p.relative_to(out).parts[0] == "my-gpt2" for p in written)  # the directory's name, sanitised


def test_dashboard_replaces_a_planted_link_instead_of_writing_through_it(base, tmp_path):
    out = tmp_path / "dash"
    args = ["dashboard", str(base / "neurons"), "--run", str(base / "run"), "--out", str(out), "--top", "2", *SMALL]
    assert main(args) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / "index.html").unlink()
    (out / "index.html").symlink_to(victim)
    assert main(args) == 0
    assert victim.read_text() == "keep me"
    assert not (out / "index.html").is_symlink() and "<html" in (out / "index.html").read_text()
    _no_temporary_files(out)


@pytest.mark.parametrize("hostile", ["../../x", "/abs/olute", "a/../../b", "..", "wéird name|<>"])
def test_every_file_a_writing_command_writes_is_inside_out(base, tmp_path, hostile):
    """Property: hostile model ids, source sets, task and label names never lead a file out of --out."""
    assert path_component(hostile) not in ("", ".", "..") and "/" not in path_component(hostile)
    work = tmp_path / "work"
    work.mkdir()
    rows = [
        {"text": f"text {i} {'good' if i % 2 else 'bad'}", "label": ("yes" if i % 2 else "no") + hostile}
        for i in range(60)
    ]
    data = work / "d.csv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, ["text", "label"])
        w.writeheader()
        w.writerows(rows)
    outs = {name: work / name for name in ("run", "n", "abl", "dash", "exp")}
    assert (
        main(
            [
                "tune",
                "--model",
                "tiny-gpt2",
                "--task",
                f"csv:{data}",
                "--out",
                str(outs["run"]),
                "--steps",
                "2",
                "--prompt-length",
                "3",
                "--max-test-examples",
                "16",
                "-q",
            ]
        )
        == 0
    )
    assert main(["find", str(outs["run"]), "--out", str(outs["n"]), *FIND]) == 0
    assert (
        main(
            [
                "ablate",
                str(outs["run"]),
                "--neurons",
                str(outs["n"]),
                "--out",
                str(outs["abl"]),
                "--fractions",
                "0.1",
                "--seeds",
                "1",
                *SMALL,
            ]
        )
        == 0
    )
    assert (
        main(["dashboard", str(outs["n"]), "--run", str(outs["run"]), "--out", str(outs["dash"]), "--top", "2", *SMALL])
        == 0
    )
    code = main(
        [
            "export",
            "neuronpedia",
            str(outs["n"]),
            "--run",
            str(outs["run"]),
            "--out",
            str(outs["exp"]),
            "--model-id",
            hostile,
            *SMALL,
        ]
    )
    assert code == 2  # a hostile id is refused, never turned into a path
    assert (
        main(
            [
                "export",
                "neuronpedia",
                str(outs["n"]),
                "--run",
                str(outs["run"]),
                "--out",
                str(outs["exp"]),
                "--model-id",
                path_component(hostile),
                *SMALL,
            ]
        )
        == 0
    )
    for _name, out in outs.items():
        for p in _files(out):
            check_inside(out, p)  # raises if a file resolved outside its --out
        _no_temporary_files(out)
    assert sorted(p.name for p in work.iterdir()) == sorted(["d.csv", *outs])


# ----------------------------------------------------------------------------- results that never mix
def test_dashboard_refuses_the_ablation_of_another_run(tiny_gpt2, base, tmp_path, capsys):
    other_task = subsample(load_task("rotten_tomatoes"), {"train": 48, "dev": 16, "test": 16})
    other = tune(tiny_gpt2, other_task, tmp_path / "other", TuneConfig(**{**CFG, "seed": 5}), progress=False)
    assert (
        main(
            [
                "ablate",
                str(other.path),
                "--neurons",
                str(base / "neurons"),
                "--out",
                str(tmp_path / "abl"),
                "--fractions",
                "0.1",
                "--seeds",
                "1",
                *SMALL,
            ]
        )
        == 0
    )
    code = main(
        [
            "dashboard",
            str(base / "neurons"),
            "--run",
            str(base / "run"),
            "--out",
            str(tmp_path / "d"),
            "--ablation",
            str(tmp_path / "abl"),
            *SMALL,
        ]
    )
    assert code == 2 and "another run" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_origin_refuses_neurons_of_other_units_before_any_work(tiny_gpt2, base, tmp_path, capsys):
    resid = tmp_path / "resid"
    find_skill_neurons(
        tiny_gpt2, [Run.load(base / "run")], max_train_examples=24, max_eval_examples=16, units="resid", progress=False
    ).save(resid)
    code = main(["origin", "--run", str(base / "run"), "--neurons", str(resid), "--out", str(tmp_path / "o"), "-q"])
    assert code == 2 and "'resid'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_ablate_refuses_a_fraction_that_selects_nothing(base, tmp_path, capsys):
    # tiny-gpt2 has 256 neurons a layer: int(0.001 * 256) = 0
    code = main(
        [
            "ablate",
            str(base / "run"),
            "--neurons",
            str(base / "neurons"),
            "--out",
            str(tmp_path / "a"),
            "--fractions",
            "0.001,0.1",
            *SMALL,
        ]
    )
    assert code == 2 and "select no unit" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("argv", [["prune"], ["ablate", "--mode", "mean"]])
def test_non_finite_statistics_are_refused_when_read(base, tmp_path, argv, capsys):
    from safetensors.torch import load_file, save_file

    neurons = _copy(base / "neurons", tmp_path / "n")
    t = load_file(str(neurons / PREDICTIVITY_FILE))
    t["baseline"][0, 0, 0, :5] = float("nan")
    save_file(t, str(neurons / PREDICTIVITY_FILE))
    with pytest.raises(NeuronsError, match="NaN"):
        SkillNeurons.load(neurons)
    code = main(
        [argv[0], str(base / "run"), "--neurons", str(neurons), "--out", str(tmp_path / "o"), *argv[1:], *SMALL]
    )
    assert code == 2 and "NaN" in capsys.readouterr().err


def test_a_prompt_must_fit_its_run_json(base, tmp_path):
    run = _copy(base / "run", tmp_path / "run")
    SoftPrompt(torch.randn(6, 64)).save(run / PROMPT_FILE)  # the run says 3 vectors
    with pytest.raises(RunError, match="6 prompt vectors"):
        Run.load(run)


@pytest.mark.parametrize("command", ["evaluate", "find"])
def test_only_finished_runs_are_probed(base, tmp_path, command, capsys):
    run = _copy(base / "run", tmp_path / "run")
    info = json.loads((run / RUN_JSON).read_text())
    (run / RUN_JSON).write_text(json.dumps({**info, "status": "running"}))
    argv = [command, str(run)] + (["--out", str(tmp_path / "n")] if command == "find" else []) + ["-q"]
    assert main(argv) == 2
    assert "not a finished run" in capsys.readouterr().err


def test_a_condition_edited_by_hand_is_evaluated_again(base, tmp_path, capsys):
    out = tmp_path / "abl"
    args = [
        "ablate",
        str(base / "run"),
        "--neurons",
        str(base / "neurons"),
        "--out",
        str(out),
        "--fractions",
        "0.1",
        "--seeds",
        "1",
        *SMALL,
    ]
    assert main(args) == 0
    first = json.loads((out / "ablation.json").read_text())
    clean = next((out / CONDITIONS_DIR).glob("clean-*.json"))
    edited = json.loads(clean.read_text())
    edited["accuracy"] = 0.01
    clean.write_text(json.dumps(edited))
    assert main(args) == 0
    again = json.loads((out / "ablation.json").read_text())
    assert again["rows"] == first["rows"]  # recomputed from the examples, not the edited summary
    bits = json.loads(clean.read_text())["correct"]
    assert json.loads(clean.read_text())["accuracy"] == pytest.approx(bits.count("1") / len(bits))


def test_non_finite_metrics_never_reach_json_files_or_output(tiny_gpt2, base, tmp_path, capsys):
    run = _copy(base / "run", tmp_path / "run")
    info = json.loads((run / RUN_JSON).read_text())
    info["metrics"]["test_accuracy"] = float("inf")
    info["metrics"]["dev_accuracy"] = float("nan")
    (run / RUN_JSON).write_text(json.dumps(info))  # Python writes the bare Infinity / NaN tokens

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))

    assert main(["find", str(run), "--out", str(tmp_path / "n"), "--json", *FIND]) == 0
    strict(capsys.readouterr().out)
    strict((tmp_path / "n" / NEURONS_JSON).read_text())


def test_report_markdown_escapes_label_names(tmp_path):
    from tl_skill.viz.report import _md_plain, md_text

    name = 'good"><img src=x onerror=alert(1)> | **x** [l](javascript:y)'
    text = md_text(name)
    assert "<" not in text and ">" not in text and "|" not in text.replace("\\|", "")
    assert "](" not in text.replace("\\](", "") and _md_plain(text) == name


# ----------------------------------------------------------------------------- warnings nobody saw
def test_the_cli_shows_library_warnings(tmp_path, capsys):
    run = tmp_path / "run"
    argv = [
        "tune",
        "--model",
        "tiny-gpt2",
        "--task",
        "rotten_tomatoes",
        "--out",
        str(run),
        "--steps",
        "2",
        "--prompt-length",
        "3",
        "--max-train-examples",
        "24",
        "--max-dev-examples",
        "16",
        "--max-test-examples",
        "16",
    ]
    assert main([*argv, "-q"]) == 0
    capsys.readouterr()
    (run / "checkpoint.pt").write_bytes(b"not loaded")  # an older tl_skill's pickle checkpoint
    info = json.loads((run / RUN_JSON).read_text())
    (run / RUN_JSON).write_text(json.dumps({**info, "status": "running"}))
    assert main([*argv, "-q"]) == 0
    err = capsys.readouterr().err
    assert "pickle checkpoint" in err  # a warning shows even with -q
    assert not (run / "checkpoint.pt").exists() and "deleted" in err


def test_a_model_directory_with_pickle_weights_is_refused_in_one_line(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        from tl_skill import load_model

        load_model(str(d))
    assert main(["tune", "--model", str(d), "--task", "rotten_tomatoes", "--out", str(tmp_path / "r"), "-q"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pytorch_model.bin" in err


def test_baselines_are_exact_sums_of_the_activations_at_each_batch_size(tiny_llama, small_task):
    """What is exact (docs/design.md): for the activations the model gives at a batch size, the baseline is
    their exact mean whatever the order; another batch size pads examples differently, which moves
    activations by float rounding, and the baseline with them."""
    task = subsample(small_task, {"train": 40, "dev": 20, "test": 20}, seed=1)
    prompt = SoftPrompt.from_vocab(tiny_llama, 4, seed=0)
    subtasks = make_subtasks(task.spec.label_names)
    neurons = [(2, i) for i in range(6)]
    for bs in (3, 17):
        got = record_run(tiny_llama, task, prompt, subtasks, batch_size=bs, progress=False, confirm_split=None)
        values, _ = trace_activations(tiny_llama, task, "train", prompt, neurons, batch_size=bs, progress=False)
        for j, (l, i) in enumerate(neurons):
            for t in range(4):
                exact = math.fsum(values[:, j, t].tolist()) / len(values)
                assert got.baseline[l, t, i].item() == exact


def test_a_recorder_used_without_a_batch_says_so(tiny_gpt2):
    rec = Recorder(tiny_gpt2, MomentStats(2, 2, 1, 256), positions="last")
    with rec.attached(), pytest.raises(RecordingError, match=r"rec\.run\(batch, prompt\)"):
        tiny_gpt2(torch.tensor([[1, 2, 3]]))


# ----------------------------------------------------------------------------- state that outlives a refusal
@pytest.mark.parametrize(
    "first, second",
    [
        (["prune", "--keep", "0.0001"], ["prune", "--keep", "0.1"]),
        (["find", "--split", "test", "--confirm-split", "test"], ["find", "--split", "test"]),
        (["find", "--units", "sae:BAD"], ["find"]),
    ],
)
def test_a_refused_command_leaves_nothing_that_blocks_its_correction(base, tmp_path, first, second, capsys):
    out = tmp_path / "o"

    def argv(parts):
        cmd, *rest = parts
        if cmd == "prune":
            return [cmd, str(base / "run"), "--neurons", str(base / "neurons"), "--out", str(out), *rest, *SMALL]
        return [cmd, str(base / "run"), "--out", str(out), *rest, *FIND]

    if first[-1] == "sae:BAD":  # a SAELens directory that cannot be read
        bad = tmp_path / "bad_sae"
        bad.mkdir()
        (bad / "cfg.json").write_text(
            json.dumps(
                {"hook_name": "blocks.0.mlp.hook_post", "d_in": 256, "d_sae": 8, "architecture": "topk", "k": 99}
            )
        )
        torch.manual_seed(0)
        from safetensors.torch import save_file

        save_file(
            {
                "W_enc": torch.randn(256, 8),
                "b_enc": torch.zeros(8),
                "W_dec": torch.randn(8, 256),
                "b_dec": torch.zeros(256),
            },
            str(bad / "sae_weights.safetensors"),
        )
        first = [*first[:-1], f"sae:{bad}"]
    assert main(argv(first)) == 2
    capsys.readouterr()
    assert not out.exists() or not (out / "experiment.json").exists()
    assert main(argv(second)) == 0


def test_demo_with_an_unknown_model_leaves_no_claim(tmp_path, capsys):
    assert main(["demo", "--model", "nope-model", "--out", str(tmp_path / "d"), "-q"]) == 2
    assert not (tmp_path / "d").exists()


def test_a_truncated_neurons_file_is_found_again(tiny_gpt2, base, tmp_path):
    from tl_skill.find import load_or_find

    run = Run.load(base / "run")
    kw = dict(max_train_examples=24, max_eval_examples=16, progress=False)
    first = load_or_find(tiny_gpt2, [run], tmp_path / "n", **kw)
    text = (tmp_path / "n" / NEURONS_JSON).read_text()
    (tmp_path / "n" / NEURONS_JSON).write_text(text[: len(text) // 3])
    again = load_or_find(tiny_gpt2, [run], tmp_path / "n", **kw)
    assert torch.equal(again.predictivity, first.predictivity)
    json.loads((tmp_path / "n" / NEURONS_JSON).read_text())


def test_result_files_name_runs_by_absolute_path_and_work_from_elsewhere(base, tmp_path, monkeypatch, capsys):
    work = tmp_path / "w"
    _copy(base / "run", work / "base" / "run")
    monkeypatch.chdir(work)
    assert main(["find", "base/run", "--out", "n", *FIND]) == 0
    assert (
        main(["ablate", "base/run", "--neurons", "n", "--out", "a", "--fractions", "0.1", "--seeds", "1", *SMALL]) == 0
    )
    runs = json.loads((work / "n" / NEURONS_JSON).read_text())["runs"]
    assert runs == [str((work / "base" / "run").resolve())]
    assert json.loads((work / "a" / "ablation.json").read_text())["run"] == runs[0]
    monkeypatch.chdir(tmp_path)  # another working directory: the recorded runs are still found
    assert SkillNeurons.load(work / "n").runs == runs and Run.load(runs[0]).path == Path(runs[0])


def test_a_truncated_trace_is_traced_again(tmp_path):
    from tl_skill.pipelines import _trace_ok

    good = tmp_path / "t.npz"
    np.savez(good, values=np.zeros((4, 3)), labels=np.zeros(4), baselines=np.zeros(3))
    assert _trace_ok(good, 3) and not _trace_ok(good, 2)
    bad = tmp_path / "b.npz"
    bad.write_bytes(good.read_bytes()[:50])
    assert not _trace_ok(bad, 3) and not _trace_ok(tmp_path / "missing.npz", 3)


# ----------------------------------------------------------------------------- unclear or silent
def test_seed_and_seeds_together_are_refused(tmp_path, capsys):
    code = main(
        [
            "tune",
            "--model",
            "tiny-gpt2",
            "--task",
            "rotten_tomatoes",
            "--out",
            str(tmp_path / "r"),
            "--seed",
            "3",
            "--seeds",
            "0,1",
            "-q",
        ]
    )
    assert code == 2 and "not both" in capsys.readouterr().err


def test_a_topk_sae_with_k_above_its_width_is_refused():
    with pytest.raises(UnitError, match="k <= d_sae"):
        SAE(
            "blocks.0.mlp.hook_post",
            torch.zeros(4, 2),
            torch.zeros(2),
            torch.zeros(2, 4),
            torch.zeros(4),
            architecture="topk",
            k=3,
        )


def test_a_malformed_ablation_file_names_itself(base, tmp_path, capsys):
    abl = tmp_path / "abl"
    abl.mkdir()
    (abl / "ablation.json").write_text(
        json.dumps(
            {
                "model": "tiny-gpt2",
                "task": "rotten_tomatoes",
                "run": "r",
                "mode": "noise",
                "fractions": [0.1],
                "seeds": [0],
                "n_examples": 3,
                "rows": [{"fraction": "10%"}],
            }
        )
    )
    code = main(
        [
            "dashboard",
            str(base / "neurons"),
            "--run",
            str(base / "run"),
            "--out",
            str(tmp_path / "d"),
            "--ablation",
            str(abl),
            *SMALL,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and str(abl / "ablation.json") in err and "fraction" in err
    other = tmp_path / "data.csv"
    other.write_text("text,label\n")
    code = main(
        [
            "dashboard",
            str(base / "neurons"),
            "--run",
            str(base / "run"),
            "--out",
            str(tmp_path / "d2"),
            "--ablation",
            str(other),
            *SMALL,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "is not a" in err and "delete" not in err


def test_tensors_and_json_get_the_same_file_mode(base):
    run = base / "run"
    assert (run / PROMPT_FILE).stat().st_mode & 0o777 == (run / RUN_JSON).stat().st_mode & 0o777


def test_multi_token_label_words_are_warned_about_and_recorded(tiny_gpt2, tmp_path, caplog):
    task = load_task("rotten_tomatoes", label_words="supercalifragilistic,good")
    task = subsample(task, {"train": 24, "dev": 16, "test": 16})
    with caplog.at_level(logging.WARNING, logger="tl_skill"):
        run = tune(tiny_gpt2, task, tmp_path / "r", TuneConfig(**CFG), progress=False)
    assert "first token" in caplog.text
    counts = run.info["verbalizer"]["tokens_per_word"]
    assert counts[0] > 1 and run.info["verbalizer"]["scored_by"] == "first token"


def test_duplicate_csv_columns_are_refused(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label,label\na,0,1\nb,1,0\n")
    with pytest.raises(TaskError, match="more than once"):
        load_task(f"csv:{p}", label_words="x,y")


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--steps", "99999999999999999999"], "must be <="),
        (["--lr", "inf"], "finite"),
    ],
)
def test_absurd_or_infinite_numbers_are_refused(tmp_path, argv, says, capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--model", "tiny-gpt2", "--task", "rotten_tomatoes", "--out", str(tmp_path / "r"), *argv])
    assert says in capsys.readouterr().err


def test_jsonl_and_csv_errors_name_file_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": 0}\n\n{"text": "", "label": 1}\n')
    with pytest.raises(TaskError, match="on line 3"):
        load_task(f"jsonl:{p}", label_words="x,y")


def test_a_file_given_as_a_run_directory_is_named_a_file(base, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(RunError, match="is a file, not a run directory"):
        Run.load(f)


def test_a_single_class_split_after_grouping_repeats_says_why(tmp_path):
    p = tmp_path / "d.csv"
    rows = (
        ["text,label"] + [f"same text,{'a' if i < 8 else 'b'}" for i in range(8)] + [f"other {i},b" for i in range(4)]
    )
    p.write_text("\n".join(rows) + "\n")
    with pytest.raises(TaskError, match="repeated text"):
        load_task(f"csv:{p}")
