"""Prompt tuning: frozen backbone, reproducibility, resume, run directories, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import interrupted

from tl_skill import SoftPrompt, TuneConfig, compat, evaluate, tune
from tl_skill.cli import main
from tl_skill.tuning import Verbalizer
from tl_skill.tuning import loop as train
from tl_skill.tuning import runs as tuning
from tl_skill.tuning.loop import CHECKPOINT
from tl_skill.tuning.runs import PROMPT_FILE, RUN_JSON, Run, RunError

SMALL = dict(
    prompt_length=4,
    steps=6,
    eval_every=3,
    batch_size=8,
    max_train_examples=64,
    max_dev_examples=24,
    max_test_examples=24,
    max_input_tokens=24,
    eval_batch_size=24,
)


def _cfg(**kw) -> TuneConfig:
    return TuneConfig(**{**SMALL, **kw})


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in compat.hf_model_of(model).state_dict().items()}


@pytest.fixture(scope="module")
def finished_run(tiny_gpt2, small_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    before = _state(tiny_gpt2)
    run = tune(tiny_gpt2, small_task, out, _cfg(), progress=False)
    return run, before


def test_backbone_bit_identical_after_training(tiny_gpt2, finished_run):
    _, before = finished_run
    after = _state(tiny_gpt2)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in tiny_gpt2.parameters())


def test_gradient_reaches_only_the_prompt(tiny_llama, small_task, tmp_path, monkeypatch):
    seen = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, *args, **kwargs):
        params = list(params)
        seen.append(
            {
                "prompt_grads": [p.grad.detach().clone() for p in params],
                "shapes": [tuple(p.shape) for p in params],
                "model_grads": [p.grad is not None for p in tiny_llama.parameters()],
            }
        )
        return clip(params, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    tune(tiny_llama, small_task, tmp_path / "run", _cfg(steps=3, eval_every=3), progress=False, evaluate_test=False)
    assert len(seen) == 3
    for s in seen:
        assert s["shapes"] == [(4, 64)]  # only the prompt is optimised
        g = s["prompt_grads"][0]
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        assert not any(s["model_grads"])


def test_same_seed_same_prompt(tiny_gpt2, small_task, tmp_path, finished_run):
    run, _ = finished_run
    again = tune(tiny_gpt2, small_task, tmp_path / "again", _cfg(), progress=False)
    assert torch.equal(again.prompt.vectors, run.prompt.vectors)
    assert again.metrics["dev_accuracy"] == run.metrics["dev_accuracy"]
    assert [h["loss"] for h in again.info["history"]] == [h["loss"] for h in run.info["history"]]
    other = tune(tiny_gpt2, small_task, tmp_path / "other", _cfg(seed=1), progress=False, evaluate_test=False)
    assert not torch.equal(other.prompt.vectors, run.prompt.vectors)


def test_without_dev_checks_the_prompt_is_the_last_steps(tiny_gpt2, small_task, tmp_path, monkeypatch):
    # eval_every = steps: the only dev check is at the end, so it selects the last prompt anyway
    cfg = _cfg(steps=4, eval_every=4)
    checked = tune(tiny_gpt2, small_task, tmp_path / "checked", cfg, progress=False, evaluate_test=False)
    calls = []
    real = tuning.evaluate
    monkeypatch.setattr(tuning, "evaluate", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    quick = tune(
        tiny_gpt2, small_task, tmp_path / "quick", cfg, progress=False, evaluate_test=False, evaluate_dev=False
    )
    assert calls == []  # no dev (or test) evaluation at all
    assert torch.equal(quick.prompt.vectors, checked.prompt.vectors)
    assert quick.metrics["dev_accuracy"] is None and quick.metrics["best_step"] == 4
    assert [h["loss"] for h in quick.info["history"]] == [h["loss"] for h in checked.info["history"]]
    # with several steps between checks the best dev prompt may be an earlier one; without, it is the last
    cfg = _cfg(steps=6, eval_every=2)
    last = tune(tiny_gpt2, small_task, tmp_path / "last", cfg, progress=False, evaluate_test=False, evaluate_dev=False)
    ref = tune(
        tiny_gpt2, small_task, tmp_path / "ref", _cfg(steps=6, eval_every=6), progress=False, evaluate_test=False
    )
    assert torch.equal(last.prompt.vectors, ref.prompt.vectors)


@pytest.mark.parametrize("interrupt_at", [4, 3])  # between evaluations / right after one
def test_resume_gives_the_uninterrupted_prompt(tiny_gpt2, small_task, tmp_path, monkeypatch, interrupt_at):
    cfg = _cfg(steps=7, eval_every=3)
    full = tune(tiny_gpt2, small_task, tmp_path / "full", cfg, progress=False, evaluate_test=False)

    real = train.train_batch_indices
    calls = []

    def interrupting(step, *args, **kwargs):
        calls.append(step)
        if step == interrupt_at:
            raise KeyboardInterrupt
        return real(step, *args, **kwargs)

    monkeypatch.setattr(train, "train_batch_indices", interrupting)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        tune(tiny_gpt2, small_task, out, cfg, progress=False, evaluate_test=False)
    assert (out / CHECKPOINT).exists() and not (out / PROMPT_FILE).exists()
    assert json.loads((out / RUN_JSON).read_text())["status"] == "running"
    with pytest.raises(RunError, match="not a finished run"):
        Run.load(out)

    monkeypatch.setattr(train, "train_batch_indices", real)
    seen = []
    monkeypatch.setattr(train, "train_batch_indices", lambda step, *a, **k: seen.append(step) or real(step, *a, **k))
    resumed = tune(tiny_gpt2, small_task, out, cfg, progress=False, evaluate_test=False)
    assert seen == list(range(interrupt_at, 7))  # no step repeated, none skipped
    assert torch.equal(resumed.prompt.vectors, full.prompt.vectors)
    assert resumed.metrics["dev_accuracy"] == full.metrics["dev_accuracy"]
    assert resumed.metrics["best_step"] == full.metrics["best_step"]
    assert [h["loss"] for h in resumed.info["history"]] == [h["loss"] for h in full.info["history"]]
    assert not (out / CHECKPOINT).exists()


def _interrupted_then_resumed(tiny_gpt2, small_task, out, cfg, monkeypatch, target, attr, when):
    """Run `tune` with `target.attr` raising KeyboardInterrupt on its `when`-th call, then rerun it."""
    interrupted(
        monkeypatch, target, attr, when, tune, tiny_gpt2, small_task, out, cfg, progress=False, evaluate_test=False
    )
    assert (out / CHECKPOINT).exists()
    return tune(tiny_gpt2, small_task, out, cfg, progress=False, evaluate_test=False)


@pytest.mark.parametrize(
    "where, when",
    [
        ("dev_evaluation", 2),  # inside the second dev evaluation (step 4)
        ("after_optimizer_step", 5),  # between the optimiser step of step 5 and its checkpoint
    ],
)
def test_resume_is_exact_after_any_interrupt(tiny_gpt2, small_task, tmp_path, monkeypatch, where, when):
    cfg = _cfg(steps=7, eval_every=2)
    full = tune(tiny_gpt2, small_task, tmp_path / "full", cfg, progress=False, evaluate_test=False)
    if where == "dev_evaluation":
        target, attr = train, "evaluate"
    else:  # the scheduler steps right after the optimiser, before the step is recorded
        target, attr = torch.optim.lr_scheduler.LambdaLR, "step"
        when += 1  # LambdaLR steps once at construction
    resumed = _interrupted_then_resumed(
        tiny_gpt2, small_task, tmp_path / "resumed", cfg, monkeypatch, target, attr, when
    )
    assert resumed.info["history"] == full.info["history"]  # every dev evaluation kept, none repeated
    assert [h["step"] for h in resumed.info["history"] if "dev_accuracy" in h] == [2, 4, 6, 7]
    assert torch.equal(resumed.prompt.vectors, full.prompt.vectors)
    assert resumed.metrics["best_step"] == full.metrics["best_step"]


def test_pickle_checkpoints_are_never_loaded(tiny_gpt2, small_task, tmp_path):
    import pickle

    marker = tmp_path / "code_ran"

    class Hostile:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    # an interrupted run of an older tl_skill: run.json (status running) and a pickle checkpoint
    cfg = _cfg(steps=2, eval_every=2)
    first = tune(tiny_gpt2, small_task, tmp_path / "first", cfg, progress=False, evaluate_test=False)
    out = tmp_path / "run"
    out.mkdir()
    (out / RUN_JSON).write_text(json.dumps({**first.info, "status": "running"}))
    (out / train.LEGACY_CHECKPOINT).write_bytes(pickle.dumps({"x": Hostile()}))
    run = tune(tiny_gpt2, small_task, out, _cfg(steps=2, eval_every=2), progress=False, evaluate_test=False)
    assert not marker.exists() and run.metrics["steps_run"] == 2
    with pytest.raises(RunError, match="checkpoint .*checkpoint.safetensors is not a readable"):
        _garbage_resume(tiny_gpt2, small_task, tmp_path)  # a garbage checkpoint is refused by name
    from pathlib import Path

    package = Path(tuning.__file__).parent
    for source in package.rglob("*.py"):
        text = source.read_text()
        assert "torch.load(" not in text and "import pickle" not in text, source


def _garbage_resume(model, task, tmp_path):
    out = tmp_path / "garbage"
    cfg = _cfg(steps=2, eval_every=2)
    tune(model, task, out, cfg, progress=False, evaluate_test=False)
    info = json.loads((out / RUN_JSON).read_text())
    info["status"] = "running"
    (out / RUN_JSON).write_text(json.dumps(info))
    (out / CHECKPOINT).write_bytes(b"not a checkpoint")
    tune(model, task, out, cfg, progress=False, evaluate_test=False)


def test_run_directory_contents(tiny_gpt2, small_task, finished_run):
    run, _ = finished_run
    info = json.loads((run.path / RUN_JSON).read_text())
    assert info["model"] == "tiny-gpt2"
    assert info["task"] == "rotten_tomatoes" and info["task_seed"] == 0
    assert info["prompt_length"] == 4
    assert info["label_words"] == [" negative", " positive"]
    assert info["config"] == {**TuneConfig().__dict__, **SMALL}
    assert info["status"] == "done"
    metrics = info["metrics"]
    for key in ("dev_accuracy", "test_accuracy", "zero_shot_accuracy", "majority_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert info["timings"]["train_seconds"] > 0 and info["timings"]["seconds_per_step"] > 0
    assert len(info["history"]) == SMALL["steps"]

    from safetensors.torch import load_file

    tensors = load_file(str(run.path / PROMPT_FILE))
    assert list(tensors) == ["prompt"] and tensors["prompt"].shape == (4, 64)
    assert torch.equal(tensors["prompt"], run.prompt.vectors.detach())

    # The metrics are what evaluating the saved prompt gives, on the same examples.
    data = tuning._pick(small_task, run.config)
    v = Verbalizer(tiny_gpt2.tokenizer, info["label_words"])
    prompt = SoftPrompt.load(run.path / PROMPT_FILE)
    acc = lambda split, p: evaluate(tiny_gpt2, data, split, v, p, max_input_tokens=SMALL["max_input_tokens"])[
        "accuracy"
    ]
    assert acc("dev", prompt) == metrics["dev_accuracy"]
    assert acc("test", prompt) == metrics["test_accuracy"]
    assert acc("test", None) == metrics["zero_shot_accuracy"]
    majority = np.bincount(data.labels("train")).argmax()
    assert metrics["majority_accuracy"] == float((data.labels("test") == majority).mean())
    # best by dev: no evaluation in the history beats the saved prompt
    dev_hist = [h["dev_accuracy"] for h in info["history"] if "dev_accuracy" in h]
    assert dev_hist and max(dev_hist) == metrics["dev_accuracy"]


def test_finished_run_returns_at_once(tiny_gpt2, small_task, finished_run, monkeypatch):
    run, _ = finished_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(train, "train_batch_indices", no_training)
    monkeypatch.setattr(train, "evaluate", no_training)
    t0 = time.perf_counter()
    again = tune(tiny_gpt2, small_task, run.path, _cfg(), progress=False)
    assert time.perf_counter() - t0 < 2.0
    assert torch.equal(again.prompt.vectors, run.prompt.vectors)
    assert again.metrics == run.metrics


def test_run_with_other_settings_refused(tiny_gpt2, tiny_llama, small_task, finished_run):
    run, _ = finished_run
    mtime = (run.path / RUN_JSON).stat().st_mtime_ns
    with pytest.raises(RunError, match="config"):
        tune(tiny_gpt2, small_task, run.path, _cfg(steps=7), progress=False)
    with pytest.raises(RunError, match="model"):
        tune(tiny_llama, small_task, run.path, _cfg(), progress=False)
    from tl_skill import load_task
    from tl_skill.data import subsample

    other = subsample(load_task("rotten_tomatoes", label_words="bad,good"), 40)
    with pytest.raises(RunError, match="label_words"):
        tune(tiny_gpt2, other, run.path, _cfg(), progress=False)
    assert (run.path / RUN_JSON).stat().st_mtime_ns == mtime  # left untouched


def test_run_load_errors(tmp_path):
    with pytest.raises(RunError, match="not found"):
        Run.load(tmp_path / "missing")
    with pytest.raises(RunError, match="not a finished run"):
        Run.load(tmp_path)


def test_bad_config_refused():
    with pytest.raises(ValueError, match="steps"):
        TuneConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TuneConfig(lr=float("nan"))
    with pytest.raises(ValueError, match=r"invalid tuning setting\(s\): prompt_length=0, warmup_fraction=1.0"):
        TuneConfig(prompt_length=0, warmup_fraction=1.0)


# ------------------------------------------------------------------------------ CLI
CLI_TUNE = [
    "--model",
    "tiny-gpt2",
    "--task",
    "rotten_tomatoes",
    "--steps",
    "4",
    "--eval-every",
    "2",
    "--prompt-length",
    "4",
    "--max-train-examples",
    "48",
    "--max-dev-examples",
    "20",
    "--max-test-examples",
    "20",
    "--max-input-tokens",
    "24",
    "--batch-size",
    "8",
    "--device",
    "cpu",
    "-q",
]


def test_cli_tune_and_evaluate(tmp_path, capsys):
    out = tmp_path / "cli_run"
    assert main(["tune", "--out", str(out), "--json", *CLI_TUNE]) == 0
    printed = json.loads(capsys.readouterr().out)
    run = Run.load(out)
    assert printed == {str(out): json.loads(json.dumps(run.metrics))}
    assert run.config.steps == 4 and run.config.prompt_length == 4 and run.config.batch_size == 8
    assert run.prompt.vectors.shape == (4, 64)

    assert (
        main(["evaluate", str(out), "--split", "test", "--max-examples", "20", "--json", "--device", "cpu", "-q"]) == 0
    )
    ev = json.loads(capsys.readouterr().out)
    assert ev["split"] == "test" and ev["n"] == 20
    # the same 20 test examples the run was scored on
    assert ev["accuracy"] == run.metrics["test_accuracy"]
    assert ev["majority_accuracy"] == run.metrics["majority_accuracy"]

    assert main(["evaluate", str(out), "--split", "dev", "--max-examples", "20", "-q", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("dev accuracy")


def test_cli_errors(tmp_path, capsys):
    assert main(["tune", "--out", str(tmp_path / "x"), "--task", "no_such_task", "--model", "tiny-gpt2", "-q"]) == 2
    err = capsys.readouterr().err
    assert "no_such_task" in err and "rotten_tomatoes" in err
    assert main(["evaluate", str(tmp_path / "nothing"), "-q"]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("tune", "evaluate", "find"):
        assert cmd in out
    with pytest.raises(SystemExit) as exc:
        main(["tune", "--help"])
    assert exc.value.code == 0
    assert "--prompt-length" in capsys.readouterr().out


def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "tl_skill", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "evaluate" in res.stdout


def test_a_checkpoint_of_tl_skill_0_1_still_resumes(tiny_gpt2, small_task, tmp_path, monkeypatch):
    from tl_skill.files import load_state, save_state

    cfg = _cfg(steps=5, eval_every=2)
    full = tune(tiny_gpt2, small_task, tmp_path / "full", cfg, progress=False, evaluate_test=False)
    real = train.train_batch_indices

    def interrupting(step, *a, **k):
        if step == 3:
            raise KeyboardInterrupt
        return real(step, *a, **k)

    out = tmp_path / "old"
    monkeypatch.setattr(train, "train_batch_indices", interrupting)
    with pytest.raises(KeyboardInterrupt):
        tune(tiny_gpt2, small_task, out, cfg, progress=False, evaluate_test=False)
    monkeypatch.setattr(train, "train_batch_indices", real)
    ck = load_state(out / CHECKPOINT)  # rewritten in 0.1's layout: prompt / best_prompt
    old = {k: v for k, v in ck.items() if k not in ("params", "best")}
    save_state(out / CHECKPOINT, {**old, "prompt": ck["params"]["prompt"], "best_prompt": ck["best"]["prompt"]})
    resumed = tune(tiny_gpt2, small_task, out, cfg, progress=False, evaluate_test=False)
    assert resumed.info["history"] == full.info["history"]
    assert torch.equal(resumed.prompt.vectors, full.prompt.vectors)
