"""Perturbation hooks and the skill-vs-random ablation experiment (tl_skill.ablate)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tl_skill.compat import mlp_post_hook
from tl_skill.data.sources import load_task
from tl_skill.data.tasks import subsample
from tl_skill.experiments import runner
from tl_skill.experiments.ablation import AblationError, ablation_experiment
from tl_skill.files import OutputDirError
from tl_skill.find import find_skill_neurons
from tl_skill.models import model_spec
from tl_skill.neurons import SkillNeurons, Subtask, random_mask_like
from tl_skill.perturb import Perturbation, PerturbationError, neuron_index, perturbed
from tl_skill.tuning.runs import TuneConfig, evaluate, tune
from tl_skill.viz.plots import plot_ablation


# ----------------------------------------------------------------------------- helpers
def fake_skill(model, layers=None, runs=2, positions=3, seed=0) -> SkillNeurons:
    """SkillNeurons with random statistics (no recording), rows = `layers`."""
    spec = model_spec(model)
    layers = list(range(spec.n_layers)) if layers is None else list(layers)
    g = torch.Generator().manual_seed(seed)
    shape = (runs, len(layers), positions, spec.d_mlp)
    return SkillNeurons(
        model=spec.name,
        task="fake",
        runs=[f"r{i}" for i in range(runs)],
        label_names=["a", "b"],
        label_words=[" a", " b"],
        subtasks=[Subtask("b vs a", (1,), (0,))],
        layers=layers,
        positions="prompt",
        accuracy=torch.rand((runs, 1) + shape[1:], generator=g, dtype=torch.float64),
        baseline=torch.randn(shape, generator=g, dtype=torch.float64),
        std=torch.rand(shape, generator=g) + 0.5,
        constant=torch.zeros(shape, dtype=torch.bool),
    )


def tokens(model, batch=3, pos=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (batch, pos), generator=g)
    return ids, torch.ones_like(ids)


def forward_pre_post(model, ids, am, make_context, layers):
    """Activations at each layer's hook_post just before and just after the perturbation, in one pass.

    A hook registered before the perturbation sees its input; one registered after sees its output.
    """
    pre, post = {}, {}

    def grab(store, l):
        def hook(act, hook):
            store[l] = act.detach().clone()

        return hook

    with model.hooks(fwd_hooks=[(mlp_post_hook(l), grab(pre, l)) for l in layers]):
        with make_context():
            with model.hooks(fwd_hooks=[(mlp_post_hook(l), grab(post, l)) for l in layers]):
                with torch.no_grad():
                    model(ids, attention_mask=am, return_type="logits")
    return pre, post


def all_layers(model):
    return list(range(model_spec(model).n_layers))


def hooks_left(model) -> int:
    """Non-permanent forward hooks (the bridge keeps a few permanent ones of its own)."""
    points = {id(hp): hp for hp in model.hook_dict.values()}  # aliases share a hook point
    return sum(1 for hp in points.values() for h in hp.fwd_hooks if not h.is_permanent)


def some_mask(model, k=3, seed=0):
    spec = model_spec(model)
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(spec.n_layers, spec.d_mlp, dtype=torch.bool)
    for l in range(spec.n_layers):
        mask[l, torch.randperm(spec.d_mlp, generator=g)[:k]] = True
    return mask


# ----------------------------------------------------------------------------- modes
@pytest.mark.parametrize("mode", ["noise", "zero", "mean", "fn"])
def test_each_mode_changes_exactly_the_chosen_neurons(tiny_model, mode):
    spec = model_spec(tiny_model)
    skill = fake_skill(tiny_model)
    mask = some_mask(tiny_model)
    ids, am = tokens(tiny_model)
    fn = lambda x, layer, idx: 2 * x + layer + 1
    kwargs = dict(mode=fn if mode == "fn" else mode, std=0.1, seed=3, skill=skill)
    pert_holder = {}

    def ctx():
        cm = perturbed(tiny_model, mask, **kwargs)
        return _Keep(cm, pert_holder)

    pre, post = forward_pre_post(tiny_model, ids, am, ctx, all_layers(tiny_model))
    pert = pert_holder["p"]
    base = skill.baseline.mean(dim=(0, 2))
    draws = pert.draws(range(ids.shape[0]))
    for l in range(spec.n_layers):
        idx = torch.nonzero(mask[l]).flatten()
        other = ~mask[l]
        assert torch.equal(pre[l][..., other], post[l][..., other]), f"unchosen neurons changed at layer {l}"
        got, x = post[l][..., idx], pre[l][..., idx]
        if mode == "zero":
            assert torch.equal(got, torch.zeros_like(got))
        elif mode == "mean":
            assert torch.equal(got, base[l, idx].float().expand_as(got))
        elif mode == "fn":
            assert torch.equal(got, 2 * x + l + 1)
        else:
            expected = x + (0.1 * draws[l]).float()[:, None, :]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            assert not torch.equal(got, x)
    # the first layer sees the clean input; downstream layers see the effect of earlier perturbations
    clean, _ = forward_pre_post(tiny_model, ids, am, _null, all_layers(tiny_model))
    assert torch.equal(clean[0], pre[0])
    assert not torch.equal(clean[spec.n_layers - 1], pre[spec.n_layers - 1])
    assert hooks_left(tiny_model) == 0


class _Keep:
    """Enter a perturbed() context and keep the Perturbation it yields."""

    def __init__(self, cm, holder):
        self.cm, self.holder = cm, holder

    def __enter__(self):
        self.holder["p"] = self.cm.__enter__()
        return self.holder["p"]

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _noise_of(model, mask, ids, am, **kw):
    """post - pre at every layer (float64) for one forward with noise."""
    pre, post = forward_pre_post(model, ids, am, lambda: perturbed(model, mask, "noise", **kw), all_layers(model))
    return {l: (post[l] - pre[l]).double() for l in pre}


def test_noise_same_at_every_position_differs_across_examples_and_seeds(tiny_gpt2):
    mask = some_mask(tiny_gpt2, k=20)
    ids, am = tokens(tiny_gpt2, batch=4, pos=9)
    d = _noise_of(tiny_gpt2, mask, ids, am, seed=0)
    for l, diff in d.items():
        sel = diff[..., mask[l]]  # [batch, pos, k]
        torch.testing.assert_close(sel, sel[:, :1].expand_as(sel), rtol=0, atol=1e-5)  # same at every position
        per_example = sel[:, 0]
        for a in range(per_example.shape[0]):
            for b in range(a + 1, per_example.shape[0]):
                assert (per_example[a] - per_example[b]).abs().max() > 1e-3  # differs across examples
    again = _noise_of(tiny_gpt2, mask, ids, am, seed=0)
    other = _noise_of(tiny_gpt2, mask, ids, am, seed=1)
    for l in d:
        assert torch.equal(d[l], again[l])  # reproducible per seed
        assert (d[l][..., mask[l]] - other[l][..., mask[l]]).abs().max() > 1e-3  # different seed, different draw


def test_noise_does_not_depend_on_batching_or_on_other_neurons(tiny_gpt2):
    mask = some_mask(tiny_gpt2, k=10)
    ids, am = tokens(tiny_gpt2, batch=4, pos=6)
    pert = Perturbation(tiny_gpt2, mask, "noise", seed=5)
    whole = pert.draws(range(4))
    pert.reset()
    seen = []

    def grab(act, hook):
        seen.append(act.detach().clone())

    name = mlp_post_hook(0)
    with pert.attached(), tiny_gpt2.hooks(fwd_hooks=[(name, grab)]), torch.no_grad():
        tiny_gpt2(ids[:2], attention_mask=am[:2], return_type="logits")
        tiny_gpt2(ids[2:], attention_mask=am[2:], return_type="logits")
    with tiny_gpt2.hooks(fwd_hooks=[(name, grab)]), torch.no_grad():
        tiny_gpt2(ids, attention_mask=am, return_type="logits")
    split_batches = torch.cat(seen[:2])[:, 0, mask[0]] - seen[2][:, 0, mask[0]]
    torch.testing.assert_close(split_batches.double(), 0.1 * whole[0], rtol=0, atol=1e-6)
    # a neuron's draw is the same whichever other neurons are perturbed
    bigger = mask.clone()
    bigger[0, :50] = True
    big = Perturbation(tiny_gpt2, bigger, "noise", seed=5).draws(range(4))
    cols = torch.nonzero(bigger[0]).flatten()
    pos_in_big = [int((cols == i).nonzero()) for i in torch.nonzero(mask[0]).flatten()]
    assert torch.equal(big[0][:, pos_in_big], whole[0])


def test_noise_std_absolute_and_relative(tiny_gpt2):
    spec = model_spec(tiny_gpt2)
    mask = torch.zeros(spec.n_layers, spec.d_mlp, dtype=torch.bool)
    mask[1] = True  # every neuron of layer 1
    ids, am = tokens(tiny_gpt2, batch=64, pos=3)
    diff = _noise_of(tiny_gpt2, mask, ids, am, seed=0)[1][:, 0]  # [64, d_mlp]
    assert abs(float(diff.std()) - 0.1) < 0.004  # 16384 draws: std of the estimate ~ 0.0006
    assert abs(float(diff.mean())) < 0.004
    skill = fake_skill(tiny_gpt2)
    rel = _noise_of(tiny_gpt2, mask, ids, am, seed=0, relative=True, std=0.1, skill=skill)[1][:, 0]
    neuron_std = skill.std.double().mean(dim=(0, 2))[1]
    torch.testing.assert_close(rel, diff * neuron_std, rtol=0, atol=1e-5)
    given = torch.full((spec.n_layers, spec.d_mlp), 3.0)
    rel3 = _noise_of(tiny_gpt2, mask, ids, am, seed=0, relative=True, std=0.1, neuron_std=given)[1][:, 0]
    torch.testing.assert_close(rel3, 3 * diff, rtol=0, atol=1e-5)


def test_layer_range_restricts(tiny_llama):
    mask = some_mask(tiny_llama, k=5)
    ids, am = tokens(tiny_llama)
    pre, post = forward_pre_post(
        tiny_llama, ids, am, lambda: perturbed(tiny_llama, mask, "zero", layers=[1]), all_layers(tiny_llama)
    )
    clean, _ = forward_pre_post(tiny_llama, ids, am, _null, all_layers(tiny_llama))
    assert torch.equal(post[0], clean[0])
    assert torch.equal(pre[0], post[0])
    assert not torch.equal(pre[1], post[1]) and (post[1][..., mask[1]] == 0).all()
    assert torch.equal(pre[2], post[2])  # layer 2 not perturbed (its input changed through layer 1)
    assert Perturbation(tiny_llama, mask, "zero", layers=range(1, 3)).layers == [1, 2]


def test_three_neuron_formats_agree(tiny_llama):
    spec = model_spec(tiny_llama)
    skill = fake_skill(tiny_llama, layers=[1, 2])
    sel = torch.zeros(2, spec.d_mlp, dtype=torch.bool)  # rows = skill.layers
    sel[0, [3, 7]] = True
    sel[1, [0, 5, 100]] = True
    full = torch.zeros(spec.n_layers, spec.d_mlp, dtype=torch.bool)
    full[1, [3, 7]] = True
    full[2, [0, 5, 100]] = True
    pairs = [(2, 100), (1, 7), (1, 3), (2, 0), (2, 5), (1, 3)]
    ids, am = tokens(tiny_llama)
    outs = []
    for neurons, kw in [(sel, {"skill": skill}), (full, {}), (pairs, {})]:
        pert = Perturbation(tiny_llama, neurons, "noise", seed=2, **kw)
        assert torch.equal(pert.mask(), full)
        with pert.attached(), torch.no_grad():
            outs.append(tiny_llama(ids, attention_mask=am, return_type="logits"))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    with pytest.raises(PerturbationError, match="skill="):
        Perturbation(tiny_llama, sel, "zero")  # a 2-row selection without its layer map


def test_composes_with_an_unrelated_hook_and_never_leaks(tiny_gpt2):
    mask = some_mask(tiny_gpt2, k=4)
    free = int(torch.nonzero(~mask[0])[0])
    ids, am = tokens(tiny_gpt2)
    name = mlp_post_hook(0)
    seen = {}

    def other(act, hook):
        out = act.clone()
        out[..., free] = 5.0
        return out

    def grab(act, hook):
        seen["x"] = act.detach().clone()

    with torch.no_grad():
        clean = tiny_gpt2(ids, attention_mask=am, return_type="logits")
        with tiny_gpt2.hooks(fwd_hooks=[(name, other)]):
            with perturbed(tiny_gpt2, mask, "zero"), tiny_gpt2.hooks(fwd_hooks=[(name, grab)]):
                tiny_gpt2(ids, attention_mask=am, return_type="logits")
            assert (seen["x"][..., mask[0]] == 0).all() and (seen["x"][..., free] == 5).all()
            with tiny_gpt2.hooks(fwd_hooks=[(name, grab)]):
                tiny_gpt2(ids, attention_mask=am, return_type="logits")
            assert (seen["x"][..., free] == 5).all() and not (seen["x"][..., mask[0]] == 0).all()
        assert hooks_left(tiny_gpt2) == 0
        with pytest.raises(RuntimeError, match="boom"):
            with perturbed(tiny_gpt2, mask, "noise", seed=1):
                assert hooks_left(tiny_gpt2) == 2
                raise RuntimeError("boom")
        assert hooks_left(tiny_gpt2) == 0
        assert torch.equal(tiny_gpt2(ids, attention_mask=am, return_type="logits"), clean)


def test_bad_arguments(tiny_gpt2):
    spec = model_spec(tiny_gpt2)
    mask = some_mask(tiny_gpt2)
    with pytest.raises(PerturbationError, match="unknown perturbation mode"):
        Perturbation(tiny_gpt2, mask, "shuffle")
    with pytest.raises(PerturbationError, match="out of range"):
        Perturbation(tiny_gpt2, [(0, spec.d_mlp)], "zero")
    with pytest.raises(PerturbationError, match="shape"):
        Perturbation(tiny_gpt2, torch.zeros(spec.n_layers, 3, dtype=torch.bool), "zero")
    with pytest.raises(PerturbationError, match="baseline"):
        Perturbation(tiny_gpt2, mask, "mean")
    with pytest.raises(PerturbationError, match="std"):
        Perturbation(tiny_gpt2, mask, "noise", relative=True)
    assert neuron_index([], spec.n_layers, spec.d_mlp) == {}


def test_random_control_keeps_per_layer_counts():
    mask = torch.zeros(4, 50, dtype=torch.bool)
    mask[0, :3] = True
    mask[2, 10:30] = True
    a, b = random_mask_like(mask, 0), random_mask_like(mask, 1)
    assert a.sum(1).tolist() == b.sum(1).tolist() == mask.sum(1).tolist()
    assert not torch.equal(a, b) and torch.equal(a, random_mask_like(mask, 0))


# ----------------------------------------------------------------------------- experiment
@pytest.fixture(scope="module")
def tiny_run(tiny_gpt2, tmp_path_factory):
    # tuned on the task as `load_task` gives it (as the CLI does), so that the experiment's
    # test set (the run's task, cut as the run's config says) is the run's own test set
    run = tune(
        tiny_gpt2,
        load_task("rotten_tomatoes"),
        tmp_path_factory.mktemp("ablate") / "run",
        TuneConfig(
            prompt_length=4, steps=4, eval_every=4, max_train_examples=32, max_dev_examples=24, max_test_examples=20
        ),
        progress=False,
    )
    sn = find_skill_neurons(tiny_gpt2, [run], max_train_examples=32, max_eval_examples=24, progress=False)
    return run, sn


class _Counter:
    """Stands in for `evaluate` in ablate: counts calls, and can stop the experiment after some."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, *args, **kwargs):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        return evaluate(*args, **kwargs)


def test_ablation_experiment_rows_plot_and_resume(tiny_gpt2, tiny_run, tmp_path, monkeypatch):
    run, sn = tiny_run
    kw = dict(mode="noise", fractions=(0.2, 0.05), seeds=2, batch_size=16, progress=False)
    out = tmp_path / "abl"
    # interrupted after 3 evaluations: the json keeps them
    monkeypatch.setattr(runner, "evaluate", _Counter(fail_after=3))
    with pytest.raises(KeyboardInterrupt):
        ablation_experiment(tiny_gpt2, run, sn, out, **kw)
    assert len(list((out / "conditions").glob("*.json"))) == 3  # each finished condition, atomically
    assert not (out / "ablation.json").exists() and not (out / "ablation.png").exists()
    # the rerun does only the rest
    counter = _Counter()
    monkeypatch.setattr(runner, "evaluate", counter)
    res = ablation_experiment(tiny_gpt2, run, sn, out, **kw)
    assert counter.calls == 1 + 2 * (1 + 2) - 3
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["rows"] == res["rows"] and saved["status"] == "done"
    assert not (out / "ablation.png").exists()  # experiments never draw: the view does
    plot_ablation(res, out / "ablation.png")
    assert (out / "ablation.png").stat().st_size > 1000
    assert [r["fraction"] for r in res["rows"]] == [0.05, 0.2]
    for key in ("model", "task", "n_examples", "seeds", "settings", "wall_seconds"):
        assert key in res
    assert res["seeds"] == [0, 1] and res["n_examples"] == 20
    for row in res["rows"]:
        assert set(row) >= {
            "mode",
            "fraction",
            "clean_accuracy",
            "skill_accuracy",
            "random_accuracy",
            "random_accuracy_std",
        }
        assert row["mode"] == "noise" and len(row["random_accuracies"]) == 2

    # clean accuracy = the prompted model without hooks; skill/random = evaluate with hand-made hooks
    cfg = run.config
    task = subsample(run.load_task(), {"test": cfg.max_test_examples}, seed=cfg.task_seed)
    ev = lambda hooks: evaluate(
        tiny_gpt2,
        task,
        "test",
        run.verbalizer(tiny_gpt2),
        run.prompt,
        batch_size=7,
        max_input_tokens=cfg.max_input_tokens,
        extra_hooks=hooks,
        padding_side=cfg.padding_side,
    )["accuracy"]
    clean = ev([])
    assert clean == pytest.approx(run.metrics["test_accuracy"])
    row = res["rows"][1]
    skill_mask = sn.select(fraction=0.2)
    assert row["layer_counts"] == skill_mask.sum(1).tolist() and row["n_neurons"] == int(skill_mask.sum())
    assert row["clean_accuracy"] == clean
    # batch size 7 here vs 16 in the experiment: the noise draws do not depend on batching
    assert row["skill_accuracy"] == ev(Perturbation(tiny_gpt2, skill_mask, "noise", seed=0, skill=sn).fwd_hooks())
    rand1 = ev(Perturbation(tiny_gpt2, random_mask_like(skill_mask, 1), "noise", seed=1, skill=sn).fwd_hooks())
    assert row["random_accuracies"][1] == rand1
    assert row["random_accuracy"] == pytest.approx(np.mean(row["random_accuracies"]))
    assert row["random_accuracy_std"] == pytest.approx(np.std(row["random_accuracies"]))

    ablation_experiment(tiny_gpt2, run, sn, out, **kw)
    assert counter.calls == 4  # nothing left to do
    # a third seed for one fraction: only that evaluation runs
    more = ablation_experiment(tiny_gpt2, run, sn, out, **{**kw, "fractions": (0.2,), "seeds": 3})
    assert counter.calls == 5
    assert more["rows"][0]["random_accuracies"][:2] == row["random_accuracies"]
    with pytest.raises(OutputDirError, match=r"other settings: std \(0.1 there, 0.5 here\)"):
        ablation_experiment(tiny_gpt2, run, sn, out, **{**kw, "std": 0.5})
    assert counter.calls == 5


def test_ablation_experiment_validates_before_work(tiny_gpt2, tiny_run, tmp_path, monkeypatch):
    run, sn = tiny_run

    def never(*a, **k):
        raise AssertionError("evaluate must not run on bad input")

    monkeypatch.setattr(runner, "evaluate", never)
    other_task = SkillNeurons(**{**sn.__dict__, "task": "bbc_news"})
    with pytest.raises(AblationError, match="task mismatch"):
        ablation_experiment(tiny_gpt2, run, other_task, tmp_path, progress=False)
    for bad in [(0.0, 0.1), (0.1, 1.5), ()]:
        with pytest.raises(AblationError, match="fractions"):
            ablation_experiment(tiny_gpt2, run, sn, tmp_path, fractions=bad, progress=False)
    with pytest.raises(AblationError, match="mode"):
        ablation_experiment(tiny_gpt2, run, sn, tmp_path, mode="shuffle", progress=False)
    with pytest.raises(AblationError, match="layers"):
        ablation_experiment(tiny_gpt2, run, sn, tmp_path, layers=[7], progress=False)
    assert not (tmp_path / "ablation.json").exists()


def test_ablation_experiment_zero_mode_and_layers(tiny_gpt2, tiny_run, monkeypatch):
    run, sn = tiny_run
    counter = _Counter()
    monkeypatch.setattr(runner, "evaluate", counter)
    res = ablation_experiment(
        tiny_gpt2, run, sn, None, mode="zero", fractions=(1.0,), seeds=1, layers=[1], progress=False
    )
    row = res["rows"][0]
    assert row["layer_counts"] == [0, model_spec(tiny_gpt2).d_mlp]
    # every neuron of layer 1: the random control is the same set, and zero mode draws nothing
    assert row["skill_accuracy"] == row["random_accuracy"] and row["random_accuracy_std"] == 0
    assert counter.calls == 3


def test_prompts_in_memory_give_what_their_run_directories_give(tiny_gpt2, tiny_run):
    """find_skill_neurons(model, task, prompts=[...]) and ablation_experiment(model, prompt, neurons, task=...)
    equal the same prompts probed through run directories."""
    from tl_skill import Run, SoftPrompt
    from tl_skill.experiments import ablation_experiment
    from tl_skill.neurons import NeuronsError

    run, sn = tiny_run
    task = run.load_task()
    cfg = run.config
    prompt = SoftPrompt(run.prompt.vectors.detach().clone())
    mem = Run.in_memory(prompt, task, run.model_name, cfg)
    other = SoftPrompt.from_vocab(tiny_gpt2, 4, seed=7)
    from_memory = find_skill_neurons(
        tiny_gpt2,
        [mem, Run.in_memory(other, task, run.model_name, cfg, name="b")],
        max_train_examples=32,
        max_eval_examples=24,
        progress=False,
    )
    assert torch.equal(from_memory.accuracy[0], sn.accuracy[0])  # the run's prompt: the same numbers
    assert not torch.equal(from_memory.accuracy[1], sn.accuracy[0])  # another prompt: others
    # the short form takes TuneConfig()'s layout: the same as the run's here but for the input cap
    short = find_skill_neurons(
        tiny_gpt2, task, prompts=[prompt], max_train_examples=32, max_eval_examples=24, progress=False
    )
    assert short.runs == ["<in-memory prompt 0>"] and short.predictivity.shape == sn.predictivity.shape
    with pytest.raises(NeuronsError, match="prompts"):
        find_skill_neurons(tiny_gpt2, task)
    with pytest.raises(NeuronsError, match="Task"):
        find_skill_neurons(tiny_gpt2, [run], prompts=[prompt])

    kw = dict(mode="zero", fractions=[0.1], seeds=1, max_examples=20, progress=False)
    want = ablation_experiment(tiny_gpt2, run, sn, **kw)
    got = ablation_experiment(tiny_gpt2, mem, sn, **kw)
    keys = ("clean_accuracy", "skill_accuracy", "random_accuracy")
    assert [[r[k] for k in keys] for r in got.rows] == [[r[k] for k in keys] for r in want.rows]
    got_short = ablation_experiment(tiny_gpt2, prompt, sn, task=task, **kw)
    assert len(got_short.rows) == len(want.rows)
    with pytest.raises(AblationError, match="task"):
        ablation_experiment(tiny_gpt2, prompt, sn, **kw)
