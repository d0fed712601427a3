"""Predictivity, multi-class subtasks and selection (tl_skill.neurons) against slow references.

The references keep every activation (`run_with_cache`) and compute the
baseline with `math.fsum`, accuracies with numpy, rankings with `np.lexsort`
(best first, ties by flat index). Split sizes are chosen so each split runs
in one batch (or all examples have one length): activations then do not
depend on batching and every comparison can be exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import DatasetDict

from tl_skill import compat, load_model, load_task
from tl_skill.cli import main as cli_main
from tl_skill.data import subsample
from tl_skill.data.tasks import Task
from tl_skill.find import find_skill_neurons, record_run, trace_activations
from tl_skill.models import model_spec
from tl_skill.neurons import NEURONS_JSON, PREDICTIVITY_FILE, NeuronsError, SkillNeurons, random_mask_like
from tl_skill.predictivity import make_subtasks
from tl_skill.record import MomentStats, Recorder
from tl_skill.tuning.prompt import SoftPrompt, layout_for
from tl_skill.tuning.runs import PROMPT_FILE, RUN_JSON, RunError, TuneConfig, tune

P = 4
N_TRAIN, N_DEV, MAX_TOKENS = 48, 40, 24


# ----------------------------------------------------------------------------- reference
def reference_activations(model, task, split, prompt, max_input_tokens, indices=None):
    """Prompt-position activations [N, L, P, D] (float32) of a split, all examples in one batch."""
    texts, labels = task.texts(split), task.labels(split)
    idx = list(range(len(texts))) if indices is None else list(indices)
    batch = layout_for(model, prompt.length, max_input_tokens).encode([texts[i] for i in idx], labels[idx])
    with prompt.applied(model, batch), torch.no_grad():
        _, cache = model.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n.endswith("mlp.hook_post")
        )
    acts = torch.stack([cache[compat.mlp_post_hook(l)] for l in range(model_spec(model).n_layers)], 1)
    return np.stack(
        [acts[r, :, int(s) : int(s) + prompt.length].numpy() for r, s in enumerate(batch.prompt_start)]
    ), labels[idx]


def ref_mean(acts):
    flat = acts.reshape(len(acts), -1).astype(np.float64)
    return np.array([math.fsum(col) / len(acts) for col in flat.T]).reshape(acts.shape[1:])


def ref_accuracy(acts, labels, baseline, positive, negative):
    keep = np.isin(labels, positive + negative)
    pred = acts[keep].astype(np.float64) > baseline[None]
    y = np.isin(labels[keep], positive)[:, None, None, None]
    return (pred == y).mean(0)  # [L, T, D]


def ref_predictivity(acc):
    """[..., L, T, D] accuracy -> [..., L, D]: max(acc, 1-acc), max over prompt positions."""
    return np.maximum(acc, 1 - acc).max(-2)


def ref_order(scores):
    """Flat indices best first, ties broken by index."""
    flat = np.asarray(scores, dtype=np.float64).reshape(-1)
    return np.lexsort((np.arange(flat.size), -flat))


def write_run(
    path: Path,
    model_name,
    prompt,
    task="rotten_tomatoes",
    label_words=(" negative", " positive"),
    metrics=None,
    max_input_tokens=MAX_TOKENS,
) -> Path:
    """A finished run directory in the format `tune` writes (without tuning)."""
    path.mkdir(parents=True)
    cfg = asdict(TuneConfig(prompt_length=prompt.length, max_input_tokens=max_input_tokens))
    info = {
        "model": model_name,
        "task": task,
        "task_seed": 0,
        "label_words": list(label_words),
        "config": cfg,
        "status": "done",
        "metrics": metrics or {},
    }
    (path / RUN_JSON).write_text(json.dumps(info))
    prompt.save(path / PROMPT_FILE)
    return path


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def rt_runs(tmp_path_factory, tiny_gpt2, small_task):
    root = tmp_path_factory.mktemp("runs")
    words = small_task.spec.label_words
    return [
        write_run(
            root / f"seed{s}",
            "tiny-gpt2",
            SoftPrompt.from_vocab(tiny_gpt2, P, seed=s),
            label_words=words,
            metrics={"dev_accuracy": 0.5 + s / 10, "test_accuracy": 0.4 + s / 10},
        )
        for s in (1, 2)
    ]


@pytest.fixture(scope="module")
def rt_task(small_task):
    """The examples `find_skill_neurons` uses for N_TRAIN / N_DEV."""
    full = load_task("rotten_tomatoes", seed=0, label_words=small_task.spec.label_words)
    return subsample(full, {"train": N_TRAIN, "dev": N_DEV}, seed=0)


@pytest.fixture(scope="module")
def found(tiny_gpt2, rt_runs):
    # the full pass, as the reference runs: the statistics must then agree bit for bit (the prefix
    # cache's activations equal the full pass's to float rounding, tests/test_prefix.py)
    from tl_skill.tuning.prefix import use_prefix_cache

    with use_prefix_cache(False):
        return find_skill_neurons(
            tiny_gpt2, rt_runs, max_train_examples=N_TRAIN, max_eval_examples=N_DEV, batch_size=64, progress=False
        )


@pytest.fixture(scope="module")
def reference(tiny_gpt2, rt_runs, rt_task):
    """Per run: baseline [L, T, D] and accuracy [L, T, D]."""
    out = []
    for run in rt_runs:
        prompt = SoftPrompt.load(run / PROMPT_FILE)
        train, _ = reference_activations(tiny_gpt2, rt_task, "train", prompt, MAX_TOKENS)
        dev, y = reference_activations(tiny_gpt2, rt_task, "dev", prompt, MAX_TOKENS)
        base = ref_mean(train)
        out.append({"baseline": base, "accuracy": ref_accuracy(dev, y, base, [1], [0]), "dev_labels": y})
    return out


# ------------------------------------------------------------------------ predictivity
def test_find_skill_neurons_matches_reference(found, reference, tiny_gpt2):
    spec = model_spec(tiny_gpt2)
    assert found.accuracy.shape == (2, 1, spec.n_layers, P, spec.d_mlp)
    assert found.layers == list(range(spec.n_layers))
    assert (found.meta["n_train"], found.meta["n_eval"]) == (N_TRAIN, N_DEV)
    for r, ref in enumerate(reference):
        assert torch.equal(found.baseline[r], torch.from_numpy(ref["baseline"]))
        assert torch.equal(found.accuracy[r, 0], torch.from_numpy(ref["accuracy"]))
    per_run = np.stack([ref_predictivity(ref["accuracy"]) for ref in reference])  # [R, L, D]
    assert torch.equal(found.predictivity, torch.from_numpy(per_run.mean(0)))
    assert torch.equal(dataclasses.replace(found, aggregate_runs="min").predictivity, torch.from_numpy(per_run.min(0)))
    assert found.best_predictivity == per_run.mean(0).max()
    assert found.predictivity.min() >= 0.5 and found.predictivity.max() <= 1


def test_ranking_top_and_dataframe(found):
    pred = found.predictivity.numpy()
    order = ref_order(pred)
    D = found.d_mlp
    top = found.top(25)
    assert [(t["layer"], t["neuron"]) for t in top] == [divmod(int(i), D) for i in order[:25]]
    assert [t["predictivity"] for t in top] == [float(pred.reshape(-1)[i]) for i in order[:25]]
    frame = found.to_dataframe()
    assert len(frame) == found.n_layers * D
    assert list(zip(frame["layer"], frame["neuron"])) == [divmod(int(i), D) for i in order]
    assert (np.diff(frame["predictivity"].to_numpy()) <= 0).all()


@pytest.mark.parametrize("fraction", [0.01, 0.02, 0.1, 0.2])
def test_select_per_layer_and_global(found, fraction):
    pred = found.predictivity.numpy()
    L, D = pred.shape
    mask = found.select(fraction=fraction)
    assert found.layer_counts(mask) == [int(fraction * D)] * L
    for l in range(L):
        want = set(ref_order(pred[l])[: int(fraction * D)].tolist())
        assert set(torch.nonzero(mask[l]).flatten().tolist()) == want
    glob = found.select(fraction=fraction, per_layer=False)
    assert int(glob.sum()) == int(fraction * L * D)
    assert set(torch.nonzero(glob.flatten()).flatten().tolist()) == set(
        ref_order(pred)[: int(fraction * L * D)].tolist()
    )


def test_select_top_k_and_bad_arguments(found):
    pred = found.predictivity.numpy()
    for k in (1, 7, 100):
        mask = found.select(k=k, per_layer=False)
        assert set(torch.nonzero(mask.flatten()).flatten().tolist()) == set(ref_order(pred)[:k].tolist())
    assert found.layer_counts(found.select(k=3)) == [3] * found.n_layers
    for kwargs in (
        {},
        {"fraction": 0.1, "k": 3},
        {"fraction": 1.5},
        {"k": found.d_mlp + 1},
        {"k": 3, "multiclass": "best"},
    ):
        with pytest.raises(NeuronsError):
            found.select(**kwargs)


def test_random_mask_like_keeps_per_layer_counts(found):
    mask = found.select(fraction=0.1)
    mask[0, :5] = True  # uneven counts
    a, b, again = random_mask_like(mask, 0), random_mask_like(mask, 1), found.random_like(mask, 0)
    for r in (a, b):
        assert r.dtype == torch.bool and r.shape == mask.shape
        assert found.layer_counts(r) == found.layer_counts(mask)
    assert torch.equal(a, again) and not torch.equal(a, b)


def test_save_load_round_trip(found, rt_runs, tmp_path):
    found.save(tmp_path / "sn")
    assert (tmp_path / "sn" / PREDICTIVITY_FILE).exists()
    back = SkillNeurons.load(tmp_path / "sn")
    for key in ("accuracy", "baseline", "std", "constant"):
        a, b = getattr(found, key), getattr(back, key)
        assert a.dtype == b.dtype and torch.equal(a, b), key
    assert torch.equal(back.predictivity, found.predictivity)
    for key in (
        "model",
        "task",
        "runs",
        "label_names",
        "label_words",
        "subtasks",
        "layers",
        "positions",
        "run_metrics",
        "aggregate_runs",
        "aggregate_subtasks",
        "meta",
    ):
        assert getattr(back, key) == getattr(found, key), key

    info = json.loads((tmp_path / "sn" / NEURONS_JSON).read_text())
    assert (info["model"], info["task"]) == ("tiny-gpt2", "rotten_tomatoes")
    assert info["runs"] == [str(r) for r in rt_runs]
    assert info["best_predictivity"] == float(found.predictivity.max())
    order = ref_order(found.predictivity.numpy())
    top = info["top"]
    assert [(t["layer"], t["neuron"]) for t in top] == [divmod(int(i), found.d_mlp) for i in order[: len(top)]]
    preds = [t["predictivity"] for t in top]
    assert preds == sorted(preds, reverse=True)
    assert info["prompt_dev_accuracy"] == pytest.approx(0.65)  # mean of the runs' 0.6 and 0.7
    assert info["prompt_test_accuracy"] == pytest.approx(0.55)

    with pytest.raises(NeuronsError, match="missing"):
        SkillNeurons.load(tmp_path / "nothing")


def test_constant_neuron_has_majority_predictivity(rt_runs, rt_task):
    """Neuron 7 of layer 0 made constant: GELU of a bias alone."""
    model = load_model("tiny-gpt2", device="cpu")
    if compat.is_bridge(model):
        c_fc = compat.hf_model_of(model).transformer.h[0].mlp.c_fc
        W_in, b_in = c_fc.weight, c_fc.bias  # Conv1D weight: [d_model, d_mlp]
    else:  # HookedTransformer (TransformerLens 3.x)
        W_in, b_in = model.blocks[0].mlp.W_in, model.blocks[0].mlp.b_in
    with torch.no_grad():
        W_in[:, 7] = 0.0
        b_in[7] = 0.5
    sn = find_skill_neurons(
        model, rt_runs, max_train_examples=N_TRAIN, max_eval_examples=N_DEV, batch_size=64, progress=False
    )
    y = rt_task.labels("dev")
    majority = max(y.mean(), 1 - y.mean())
    assert sn.constant[:, 0, :, 7].all()
    assert int(sn.constant.sum()) == sn.constant.shape[0] * P  # nothing else is constant
    assert float(sn.predictivity[0, 7]) == majority
    assert torch.equal(sn.accuracy[:, 0, 0, :, 7], torch.full((2, P), float((y == 0).mean()), dtype=torch.float64))
    assert sn.std[:, 0, :, 7].abs().max() < 1e-6
    assert sn.summary()["n_constant"] == 1


def test_trace_activations_match_reference(tiny_gpt2, rt_runs, rt_task):
    prompt = SoftPrompt.load(rt_runs[0] / PROMPT_FILE)
    neurons = [(1, 3), (0, 7), (1, 200), (1, 4)]
    values, labels = trace_activations(
        tiny_gpt2, rt_task, "dev", prompt, neurons, batch_size=64, max_input_tokens=MAX_TOKENS, progress=False
    )
    dev, y = reference_activations(tiny_gpt2, rt_task, "dev", prompt, MAX_TOKENS)
    assert torch.equal(labels, torch.from_numpy(y))
    want = np.stack([dev[:, l, :, i] for l, i in neurons], 1).astype(np.float64)  # [N, n, T]
    assert torch.equal(values, torch.from_numpy(want))
    with pytest.raises(NeuronsError, match="does not exist"):
        trace_activations(tiny_gpt2, rt_task, "dev", prompt, [(2, 0)], progress=False)


# -------------------------------------------------------------------------- multi-class
@pytest.fixture(scope="module")
def mc(tiny_gpt2, small_multiclass_task):
    """5-class BBC News: record_run with one-vs-rest and pairwise subtasks, and the reference activations."""
    task = small_multiclass_task
    lens = [
        len(ids)
        for ids in tiny_gpt2.tokenizer(task.texts("train") + task.texts("dev"), add_special_tokens=False)["input_ids"]
    ]
    assert min(lens) >= MAX_TOKENS  # truncation gives every example the same length
    prompt = SoftPrompt.from_vocab(tiny_gpt2, P, seed=5)
    subtasks = make_subtasks(task.spec.label_names, "ovr") + make_subtasks(task.spec.label_names, "pairwise")
    stats = record_run(tiny_gpt2, task, prompt, subtasks, batch_size=64, max_input_tokens=MAX_TOKENS, progress=False)
    train, ytr = reference_activations(tiny_gpt2, task, "train", prompt, MAX_TOKENS)
    dev, ydev = reference_activations(tiny_gpt2, task, "dev", prompt, MAX_TOKENS)
    return dict(task=task, prompt=prompt, subtasks=subtasks, stats=stats, train=train, ytr=ytr, dev=dev, ydev=ydev)


def test_multiclass_subtasks_match_reference(mc, tiny_gpt2):
    subtasks, stats = mc["subtasks"], mc["stats"]
    assert [s.name for s in subtasks[:5]] == [f"{n} vs rest" for n in mc["task"].spec.label_names]
    assert len(subtasks) == 5 + 10
    assert all(len(s.positive) == 1 and len(s.negative) == 1 for s in subtasks[5:])
    global_base = ref_mean(mc["train"])
    assert torch.equal(stats.baseline, torch.from_numpy(global_base))
    for s, sub in enumerate(subtasks):
        pair = len(sub.classes) == 2
        base = ref_mean(mc["train"][np.isin(mc["ytr"], sub.classes)]) if pair else global_base
        want = ref_accuracy(mc["dev"], mc["ydev"], base, list(sub.positive), list(sub.negative))
        assert torch.equal(stats.accuracy[s], torch.from_numpy(want)), sub.name

    # pairwise baselines: means over the two classes' train examples only
    spec = model_spec(tiny_gpt2)
    moments = MomentStats(5, spec.n_layers, P, spec.d_mlp)
    layout = layout_for(tiny_gpt2, P, MAX_TOKENS)
    rec = Recorder(tiny_gpt2, moments)
    texts, y = mc["task"].texts("train"), mc["task"].labels("train")
    with rec.attached():
        for s in range(0, len(texts), 64):
            rec.run(layout.encode(texts[s : s + 64], y[s : s + 64]), mc["prompt"])
    for sub in subtasks[5:]:
        want = ref_mean(mc["train"][np.isin(mc["ytr"], sub.classes)])
        assert torch.equal(moments.mean(sub.classes), torch.from_numpy(want)), sub.name


def _multiclass_neurons(mc, aggregate_subtasks="max"):
    st = mc["stats"]
    return SkillNeurons(
        model="tiny-gpt2",
        task="bbc_news",
        runs=["r0"],
        label_names=list(mc["task"].spec.label_names),
        label_words=list(mc["task"].spec.label_words),
        subtasks=mc["subtasks"][:5],
        layers=[0, 1],
        positions="prompt",
        accuracy=st.accuracy[None, :5],
        baseline=st.baseline[None],
        std=st.std[None],
        constant=st.constant[None],
        aggregate_subtasks=aggregate_subtasks,
    )


def test_multiclass_scores_and_round_robin_selection(mc):
    sn = _multiclass_neurons(mc)
    per_sub = ref_predictivity(mc["stats"].accuracy[:5].numpy())  # [S, L, D]
    assert torch.equal(sn.per_subtask, torch.from_numpy(per_sub))
    assert torch.equal(sn.predictivity, torch.from_numpy(per_sub.max(0)))
    assert torch.equal(_multiclass_neurons(mc, "mean").predictivity, torch.from_numpy(per_sub.mean(0)))

    k = 9
    mask = sn.select(k=k, multiclass="round_robin")
    S, L, D = per_sub.shape
    for l in range(L):
        orders = [ref_order(per_sub[s, l]).tolist() for s in range(S)]
        chosen: list[int] = []
        while len(chosen) < k:  # each subtask in turn adds its best neuron not taken yet
            for s in range(S):
                if len(chosen) < k:
                    chosen.append(next(i for i in orders[s] if i not in chosen))
        assert set(torch.nonzero(mask[l]).flatten().tolist()) == set(chosen)
    glob = sn.select(k=k, per_layer=False, multiclass="round_robin")
    assert int(glob.sum()) == k
    flat_orders = [ref_order(per_sub[s]).tolist() for s in range(S)]
    for s in range(S):
        assert glob.flatten()[flat_orders[s][0]]  # every subtask's best neuron is in


# ------------------------------------------------------------------------------ bad input
def test_inconsistent_or_missing_runs_are_refused(tmp_path, tiny_gpt2, rt_runs):
    prompt = SoftPrompt.from_vocab(tiny_gpt2, P, seed=9)
    llama = write_run(tmp_path / "llama", "tiny-llama", prompt)
    subj = write_run(tmp_path / "subj", "tiny-gpt2", prompt, task="subjectivity")
    longer = write_run(tmp_path / "longer", "tiny-gpt2", SoftPrompt.from_vocab(tiny_gpt2, P + 2))
    for other, what in ((llama, "model"), (subj, "task"), (longer, "prompt length")):
        with pytest.raises(NeuronsError, match=f"differ in {what}"):
            find_skill_neurons(tiny_gpt2, [rt_runs[0], other], progress=False)
    with pytest.raises(NeuronsError, match="tuned on 'tiny-llama'"):
        find_skill_neurons(tiny_gpt2, [llama], progress=False)
    with pytest.raises(NeuronsError, match="no runs"):
        find_skill_neurons(tiny_gpt2, [], progress=False)
    with pytest.raises(NeuronsError, match="split"):
        find_skill_neurons(tiny_gpt2, rt_runs, split="train", progress=False)

    half = tmp_path / "half"
    half.mkdir()
    (half / RUN_JSON).write_text((rt_runs[0] / RUN_JSON).read_text())
    with pytest.raises(RunError, match="missing prompt.safetensors"):
        find_skill_neurons(tiny_gpt2, [half], progress=False)
    with pytest.raises(RunError, match="not found"):
        find_skill_neurons(tiny_gpt2, [tmp_path / "nowhere"], progress=False)


def test_single_class_split_refused_before_recording(tiny_gpt2, small_task):
    dev = small_task["dev"]
    only_pos = dev.select([i for i, y in enumerate(dev["label"]) if y == 1])
    task = Task(
        DatasetDict({"train": small_task["train"], "dev": only_pos, "test": small_task["test"]}), small_task.spec
    )
    calls = []
    with tiny_gpt2.hooks(fwd_hooks=[(compat.embed_hook(tiny_gpt2), lambda a, hook: calls.append(1))]):
        with pytest.raises(NeuronsError, match="only classes \\[1\\]"):
            record_run(
                tiny_gpt2,
                task,
                SoftPrompt.from_vocab(tiny_gpt2, P),
                make_subtasks(task.spec.label_names),
                progress=False,
            )
    assert not calls  # no forward pass ran


def test_unknown_multiclass_mode(small_multiclass_task):
    with pytest.raises(NeuronsError, match="multi-class mode"):
        make_subtasks(small_multiclass_task.spec.label_names, "one-vs-one")


# ----------------------------------------------------------------------------------- CLI
def test_cli_find_on_a_tuned_run(tmp_path, tiny_gpt2, small_task, capsys):
    cfg = TuneConfig(
        prompt_length=P,
        steps=2,
        eval_every=2,
        batch_size=8,
        max_train_examples=16,
        max_dev_examples=16,
        max_test_examples=16,
        max_input_tokens=16,
    )
    run = tune(tiny_gpt2, small_task, tmp_path / "run", cfg, progress=False)
    out = tmp_path / "neurons"
    capsys.readouterr()
    code = cli_main(
        [
            "find",
            str(run.path),
            "--out",
            str(out),
            "--max-train-examples",
            "50",
            "--max-eval-examples",
            "60",
            "--top",
            "5",
            "--json",
            "-q",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert (out / PREDICTIVITY_FILE).exists() and (out / NEURONS_JSON).exists()
    sn = SkillNeurons.load(out)
    assert (sn.model, sn.task, sn.runs) == ("tiny-gpt2", "rotten_tomatoes", [str(run.path)])
    assert (sn.meta["n_train"], sn.meta["n_eval"]) == (50, 60)
    assert printed["best_predictivity"] == pytest.approx(sn.best_predictivity)
    assert printed["prompt_dev_accuracy"] == pytest.approx(run.metrics["dev_accuracy"])
    assert [(t["layer"], t["neuron"]) for t in printed["top"]] == [(t["layer"], t["neuron"]) for t in sn.top(5)]

    code = cli_main(["find", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "-q"])
    assert code == 2
    assert "run directory not found" in capsys.readouterr().err


def test_cli_multiclass_pairwise_mean_and_round_robin(tmp_path, capsys):
    """A 5-class task through the command line: pairwise subtasks aggregated by their mean in `find`
    (each subtask's best neuron printed), then `ablate --selection round_robin` perturbs the units the
    reference's rule picks."""
    from tl_skill.cli.main import main
    from tl_skill.experiments.ablation import AblationResult
    from tl_skill.files import tensor_digest

    run, neurons, abl = tmp_path / "run", tmp_path / "n", tmp_path / "a"
    tiny = ["--model", "tiny-llama", "--device", "cpu", "-q"]
    assert main(["tune", "--task", "moral_foundations", "--out", str(run), "--steps", "2", "--eval-every", "2",
                 "--prompt-length", "2", "--max-train-examples", "60", "--max-dev-examples", "40",
                 "--max-test-examples", "30", *tiny]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["find", str(run), "--out", str(neurons), "--multiclass", "pairwise", "--aggregate-subtasks",
                 "mean", "--device", "cpu", "-q"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    sn = SkillNeurons.load(neurons)
    assert sn.aggregate_subtasks == "mean" and len(sn.subtasks) == 10  # 5 classes, pairwise
    acc = sn.accuracy.double().mean(0)  # [S, L, T, D], one run
    per_sub = torch.maximum(acc, 1 - acc).amax(2)  # the best position of each subtask, either direction
    torch.testing.assert_close(sn.predictivity.double(), per_sub.mean(0), rtol=0, atol=1e-6)
    first = sn.subtasks[0]
    ys = load_task("moral_foundations").labels("dev")  # find counts the whole dev split
    l, i = divmod(int(per_sub[0].reshape(-1).argmax()), sn.d_mlp)
    n_pos, n_neg = (int(sum(y in first.positive for y in ys)), int(sum(y in first.negative for y in ys)))
    majority = max(n_pos, n_neg) / (n_pos + n_neg)
    assert f"{first.name} {float(per_sub[0].max()):.4f} (L{sn.layers[l]}.{i}; majority {majority:.4f})" in printed
    assert "(a neuron's score: their mean)" in printed
    assert main(["ablate", str(run), "--neurons", str(neurons), "--out", str(abl), "--fractions", "0.1",
                 "--seeds", "1", "--selection", "round_robin", "--mode", "zero", *tiny[2:]]) == 0  # fmt: skip
    res = AblationResult.load(abl)
    want = tensor_digest(sn.select(fraction=0.1, multiclass="round_robin"))
    assert want != tensor_digest(sn.select(fraction=0.1))  # the two rules pick other units here
    skill = json.loads(next((abl / "conditions").glob("skill*.json")).read_text())
    assert skill["definition"]["perturbation"]["neurons"] == want
    assert json.loads((abl / "experiment.json").read_text())["identity"]["selection"] == "round_robin"
    assert res.rows[0]["fraction"] == 0.1
    from tl_skill.errors import AblationError
    from tl_skill.experiments.ablation import AblationConfig

    with pytest.raises(AblationError, match="unknown selection 'best'"):
        AblationConfig(selection="best")
