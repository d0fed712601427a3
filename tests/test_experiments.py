"""The experiment layer: the runner's keyed conditions, result objects, and one output-directory rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_skill import TuneConfig, load_task, tune
from tl_skill.cli import main
from tl_skill.data.tasks import subsample
from tl_skill.experiments import runner
from tl_skill.experiments.ablation import AblationResult, ablation_experiment, perturbation_conditions
from tl_skill.experiments.runner import Condition, EvalSet, evaluation_task, run_conditions
from tl_skill.files import EXPERIMENT_JSON, OutputDirError, claim_dir
from tl_skill.find import find_skill_neurons


@pytest.fixture(scope="module")
def tiny(tiny_gpt2, tmp_path_factory):
    base = tmp_path_factory.mktemp("experiments")
    run = tune(
        tiny_gpt2,
        load_task("rotten_tomatoes"),
        base / "run",
        TuneConfig(
            prompt_length=4, steps=2, eval_every=2, max_train_examples=32, max_dev_examples=24, max_test_examples=24
        ),
        progress=False,
    )
    sn = find_skill_neurons(tiny_gpt2, [run], max_train_examples=32, max_eval_examples=24, progress=False)
    sn.save(base / "neurons")
    other = tune(
        tiny_gpt2,
        load_task("word_sentiment"),
        base / "run_ws",
        TuneConfig(
            prompt_length=4, steps=2, eval_every=2, max_train_examples=32, max_dev_examples=24, max_test_examples=24
        ),
        progress=False,
        evaluate_test=False,
    )
    find_skill_neurons(tiny_gpt2, [other], max_train_examples=32, max_eval_examples=24, progress=False).save(
        base / "neurons_ws"
    )
    return base, run, sn


# ----------------------------------------------------------------------------- claim_dir
def test_claim_dir_accepts_new_and_same_and_refuses_other(tmp_path):
    out = tmp_path / "x"
    claim_dir(out, "ablation", {"std": 0.1, "config": {"steps": 3}})
    assert json.loads((out / EXPERIMENT_JSON).read_text())["kind"] == "ablation"
    claim_dir(out, "ablation", {"config": {"steps": 3}, "std": 0.1})  # same settings: accepted
    with pytest.raises(OutputDirError, match=r"other settings: config.steps \(3 there, 4 here\)"):
        claim_dir(out, "ablation", {"std": 0.1, "config": {"steps": 4}})
    with pytest.raises(OutputDirError, match="holds a ablation result, not a prune"):
        claim_dir(out, "prune", {"std": 0.1})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty and holds no tl_skill find"):
        claim_dir(foreign, "find", {})
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # nothing written
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".DS_Store").write_text("")
    claim_dir(hidden, "find", {})  # hidden files do not count
    old = tmp_path / "old"
    old.mkdir()
    (old / "result.json").write_text("{}")
    claim_dir(old, "find", {"a": 1, "b": 2}, legacy=lambda p: {"a": 1})  # an older result agreeing
    old2 = tmp_path / "old2"
    old2.mkdir()
    (old2 / "result.json").write_text("{}")
    with pytest.raises(OutputDirError, match=r"older tl_skill with other settings: a \(1 there, 5 here\)"):
        claim_dir(old2, "find", {"a": 5}, legacy=lambda p: {"a": 1})


# ----------------------------------------------------------------------------- the runner
def test_runner_keys_resume_and_reevaluate_changed_definitions(tiny_gpt2, tiny, tmp_path, monkeypatch):
    _, run, sn = tiny
    es = EvalSet.of_run(run, tiny_gpt2)
    masks = {0.25: sn.select(fraction=0.25)}
    conds = perturbation_conditions(masks, [0], "noise", std=2.0, relative=False, skill=sn, prompt=run.prompt)
    first = run_conditions(conds, {"model": tiny_gpt2}, {"test": es}, out=tmp_path, progress=False)
    files = sorted((tmp_path / "conditions").glob("*.json"))
    assert len(files) == 3 and {f.name.split("-")[0] for f in files} == {"clean", "skill_0.25_0", "random_0.25_0"}
    # correctness is per example, in the eval set's order: it gives the accuracy
    for r in first.values():
        assert r.correct_array().mean() == pytest.approx(r.accuracy) and len(r.correct) == len(es.task["test"])
        assert np.array_equal(np.asarray(r.predictions) == es.task.labels("test"), r.correct_array().astype(bool))
    calls = []
    real = runner.evaluate
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = run_conditions(conds, {"model": tiny_gpt2}, {"test": es}, out=tmp_path, progress=False)
    assert calls == [] and again == first  # everything read back
    # another std is another definition: new keys, evaluated; the old files stay
    other = perturbation_conditions(masks, [0], "noise", std=0.5, relative=False, skill=sn, prompt=run.prompt)
    run_conditions(other, {"model": tiny_gpt2}, {"test": es}, out=tmp_path, progress=False)
    assert len(calls) == 2 and len(list((tmp_path / "conditions").glob("*.json"))) == 5  # clean is shared
    # a damaged file is evaluated again, with a warning
    files[0].write_text("{not json")
    run_conditions(conds, {"model": tiny_gpt2}, {"test": es}, out=tmp_path, progress=False)
    assert len(calls) == 3


def test_runner_refuses_bad_plans(tiny_gpt2, tiny):
    _, run, _ = tiny
    es = EvalSet.of_run(run, tiny_gpt2)
    with pytest.raises(ValueError, match="repeat names"):
        run_conditions([Condition("a"), Condition("a")], {"model": tiny_gpt2}, {"test": es})
    with pytest.raises(ValueError, match="not given"):
        run_conditions([Condition("a", variant="pruned")], {"model": tiny_gpt2}, {"test": es})


def test_one_evaluation_subset_rule_is_a_subset_of_the_runs_test_set(tiny):
    _, run, _ = tiny
    full = evaluation_task(run)
    assert len(full["test"]) == 24
    for n in (5, 17, 24, 1000):
        part = evaluation_task(run, n)
        assert len(part["test"]) == min(n, 24)
        assert set(part.texts("test")) <= set(full.texts("test"))
    assert evaluation_task(run, 17).texts("test") == subsample(run.load_task(), {"test": 17}, seed=0).texts("test")


def test_result_objects_save_and_load(tiny_gpt2, tiny, tmp_path):
    _, run, sn = tiny
    res = ablation_experiment(tiny_gpt2, run, sn, tmp_path / "abl", fractions=(0.2,), seeds=1, progress=False)
    back = AblationResult.load(tmp_path / "abl")
    assert back == res and back.verdict() == res.verdict()
    assert AblationResult.load(tmp_path / "abl" / "ablation.json") == res
    with pytest.raises(Exception, match="lacks"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "ablation.json").write_text(json.dumps({"model": "x"}))
        AblationResult.load(tmp_path / "bad")


# ----------------------------------------------------------------------------- every writing command
def _boom(*a, **k):
    raise AssertionError("the model was loaded although the output directory is refused")


def _other_experiment(path: Path, kind: str = "something-else") -> Path:
    path.mkdir(parents=True)
    (path / EXPERIMENT_JSON).write_text(json.dumps({"kind": kind, "identity": {"x": 1}}))
    return path


@pytest.mark.parametrize("command", ["tune", "find", "ablate", "prune", "transfer", "study", "origin", "demo"])
def test_every_writing_command_refuses_another_experiments_directory_before_work(
    command, tiny, tmp_path, monkeypatch, capsys
):
    base, run, _ = tiny
    import tl_skill.cli.options
    import tl_skill.experiments.origin
    import tl_skill.experiments.transfer
    import tl_skill.models
    import tl_skill.pipelines

    for module in (
        tl_skill.models,
        tl_skill.pipelines,
        tl_skill.experiments.origin,
        tl_skill.experiments.transfer,
        tl_skill.cli.options,
    ):
        monkeypatch.setattr(module, "load_model", _boom)
    out = _other_experiment(tmp_path / "out")
    before = sorted(p.name for p in out.iterdir())
    neurons = str(base / "neurons")
    argv = {
        "tune": ["tune", "--model", "tiny-gpt2", "--task", "rotten_tomatoes", "--steps", "2"],
        "find": ["find", str(run.path)],
        "ablate": ["ablate", str(run.path), "--neurons", neurons],
        "prune": ["prune", str(run.path), "--neurons", neurons],
        "transfer": ["transfer", neurons, str(base / "neurons_ws")],
        "study": ["study", "--model", "tiny-gpt2", "--tasks", "rotten_tomatoes,word_sentiment"],
        "origin": ["origin", "--model", "tiny-gpt2", "--run", str(run.path), "--neurons", neurons],
        "demo": ["demo", "--model", "tiny-gpt2"],
    }[command]
    code = main(argv + ["--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "holds a something-else result" in err, err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing written


def test_prompts_without_hooks_share_input_passes_and_give_evaluate_s_results(tiny_llama, small_task, monkeypatch):
    """run_conditions groups prompt-only conditions of one eval set (one input pass per batch for all of them);
    each result equals `evaluate` of that prompt alone, with the cache off too."""
    from tl_skill import SoftPrompt, evaluate
    from tl_skill.experiments import runner
    from tl_skill.perturb import Perturbation
    from tl_skill.tuning import Verbalizer
    from tl_skill.tuning.prefix import use_prefix_cache

    es = runner.EvalSet(small_task, Verbalizer(tiny_llama.tokenizer, small_task.spec.label_words), "test", 40)
    prompts = [SoftPrompt.from_vocab(tiny_llama, 4, seed=s) for s in range(4)]
    mask = torch.zeros(3, 192, dtype=torch.bool)
    mask[:, :40] = True
    conds = [runner.Condition(f"p{k}", {}, p) for k, p in enumerate(prompts)]
    conds.insert(
        2, runner.Condition("zeroed", {"p": "zero"}, prompts[0], lambda m: Perturbation(m, mask, "zero").fwd_hooks())
    )
    groups = runner.shared_input_groups([(c,) for c in conds], max_prompts=3)
    assert [[i[0].name for i in g] for g in groups] == [["p0", "p1", "p2"], ["zeroed"], ["p3"]]
    calls = []
    real = runner.evaluate_prompts
    monkeypatch.setattr(runner, "evaluate_prompts", lambda *a, **k: calls.append(len(a[4])) or real(*a, **k))
    res = runner.run_conditions(conds, {"model": tiny_llama}, {"test": es}, batch_size=7, progress=False)
    assert calls == [4]
    for k, p in enumerate(prompts):
        want = evaluate(
            tiny_llama, small_task, "test", es.verbalizer, p, batch_size=7, max_input_tokens=40, prefix_cache=False
        )
        assert res[f"p{k}"].predictions == want["predictions"].tolist()
    hooks = Perturbation(tiny_llama, mask, "zero").fwd_hooks()
    want = evaluate(
        tiny_llama,
        small_task,
        "test",
        es.verbalizer,
        prompts[0],
        batch_size=7,
        max_input_tokens=40,
        extra_hooks=hooks,
        prefix_cache=False,
    )
    assert res["zeroed"].predictions == want["predictions"].tolist()
    calls.clear()
    with use_prefix_cache(False):
        off = runner.run_conditions(conds, {"model": tiny_llama}, {"test": es}, batch_size=7, progress=False)
    assert not calls and all(off[c.name].predictions == res[c.name].predictions for c in conds)
