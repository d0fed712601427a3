"""Pruned models (method §7): compared with the unpruned model whose removed neurons are held at their baseline."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tl_skill import SkillNeurons, SoftPrompt, TuneConfig, compat, evaluate, load_model, model_spec, tune
from tl_skill.compat import unwrapped
from tl_skill.experiments.pruning import PruneResult, prune_experiment
from tl_skill.neurons import Subtask
from tl_skill.prune import (
    PRUNE_JSON,
    PruneError,
    count_parameters,
    default_layers,
    load_pruned,
    prune_model,
    pruning_of,
    save_pruned,
)
from tl_skill.tuning import layout_for

TEXTS = ["a fine, moving film", "dull and far too long", "ok", "the best thing this year, by far"]


def fake_neurons(model, seed=0, runs=2, positions=3, layers=None, name=None, d_mlp=None) -> SkillNeurons:
    """Random predictivity and baselines (baselines far from 0 so freezing them matters)."""
    spec = model_spec(model)
    layers = list(range(spec.n_layers)) if layers is None else layers
    L, D = len(layers), d_mlp or spec.d_mlp
    g = torch.Generator().manual_seed(seed)
    return SkillNeurons(
        model=name or spec.name,
        task="rotten_tomatoes",
        runs=[f"run{r}" for r in range(runs)],
        label_names=["negative", "positive"],
        label_words=[" negative", " positive"],
        subtasks=[Subtask("positive vs negative", (1,), (0,))],
        layers=layers,
        positions="prompt",
        accuracy=torch.rand(runs, 1, L, positions, D, generator=g, dtype=torch.float64),
        baseline=0.5 + 0.3 * torch.randn(runs, L, positions, D, generator=g, dtype=torch.float64),
        std=torch.ones(runs, L, positions, D),
        constant=torch.zeros(runs, L, positions, D, dtype=torch.bool),
    )


def prompted_logits(model, prompt: SoftPrompt, hooks=()):
    batch = layout_for(model, prompt.length).encode(TEXTS)  # padded: padding must not matter either
    with torch.no_grad(), prompt.applied(model, batch), model.hooks(fwd_hooks=list(hooks)):
        return compat.forward(model, batch.input_ids, batch.attention_mask)


def baseline_hooks(model, neurons: SkillNeurons, kept: dict[int, tuple[int, ...]]):
    """The slow reference: removed neurons set to their baseline at every position of the unpruned model."""
    D = model_spec(model).d_mlp
    hooks = []
    for layer, idx in kept.items():
        row = neurons.layers.index(layer)
        base = neurons.baseline[:, row].double().mean(dim=(0, 1))  # over runs and prompt positions
        removed = torch.ones(D, dtype=torch.bool)
        removed[list(idx)] = False

        def hook(act, hook, removed=removed, base=base):
            act = act.clone()
            act[..., removed] = base[removed].to(act.dtype)
            return act

        hooks.append((compat.mlp_post_hook(layer), hook))
    return hooks


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama", "tiny-bert", "tiny-gemma3", "tiny-gemma2"])
def model(request):
    return load_model(request.param, device="cpu")


def test_keep_all_reproduces_the_model(model):
    sn = fake_neurons(model)
    pruned = prune_model(model, sn, keep=1.0, layers=range(model_spec(model).n_layers))
    prompt = SoftPrompt.from_vocab(model, 3, seed=1)
    torch.testing.assert_close(prompted_logits(pruned, prompt), prompted_logits(model, prompt), rtol=1e-5, atol=1e-5)
    spec = model_spec(model)
    # Llama's down_proj gains a (zero) bias; nothing else changes.
    extra = spec.n_layers * spec.d_model if spec.gated_mlp else 0
    assert count_parameters(pruned) == count_parameters(model) + extra


def test_pruned_equals_neurons_frozen_at_baseline(model):
    sn = fake_neurons(model, seed=3)
    pruned = prune_model(model, sn, keep=0.1)
    kept = pruning_of(pruned).kept
    prompt = SoftPrompt.from_vocab(model, 4, seed=2)
    want = prompted_logits(model, prompt, baseline_hooks(model, sn, kept))
    got = prompted_logits(pruned, prompt)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # freezing really changed something: the test would catch a missing bias fold
    assert (prompted_logits(model, prompt) - want).abs().max() > 1e-2
    try:
        from tl_skill.perturb import perturbed
    except ImportError:
        return
    removed = ~sn.select(fraction=0.1, per_layer=True)
    removed[[r for r, l in enumerate(sn.layers) if l not in kept]] = False
    batch = layout_for(model, prompt.length).encode(TEXTS)
    with torch.no_grad(), prompt.applied(model, batch), perturbed(model, removed, mode="mean", skill=sn):
        via_ablate = compat.forward(model, batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(got, via_ablate, rtol=1e-4, atol=1e-4)


def test_kept_neurons_are_the_most_predictive_and_hooks_have_kept_width(model):
    spec = model_spec(model)
    sn = fake_neurons(model, seed=4)
    keep = 0.05
    pruned = prune_model(model, sn, keep=keep)
    pruning = pruning_of(pruned)
    k = int(keep * spec.d_mlp)
    assert pruning.layers == default_layers(range(spec.n_layers))
    for layer in pruning.layers:
        best = sorted(torch.argsort(sn.predictivity[layer], descending=True)[:k].tolist())
        assert list(pruning.kept[layer]) == best
    widths = {}

    def grab(layer):
        def hook(act, hook):
            widths[layer] = act.shape[-1]

        return hook

    with torch.no_grad(), pruned.hooks(fwd_hooks=[(compat.mlp_post_hook(l), grab(l)) for l in range(spec.n_layers)]):
        pruned(torch.tensor([[11, 12, 13]]), return_type="logits")
    assert widths == {l: k if l in pruning.kept else spec.d_mlp for l in range(spec.n_layers)}
    assert model_spec(pruned) == spec  # documented: d_mlp stays the original width


def test_default_layers_are_the_top_three_quarters():
    assert default_layers(range(12)) == list(range(3, 12))  # the reference: top 9 of 12
    assert default_layers(range(30)) == list(range(8, 30))
    assert default_layers([0, 1]) == [1]
    assert default_layers([5]) == [5]


def test_parameter_counts_by_hand(tiny_gpt2, tiny_llama):
    V, d, n_ctx = 4096, 64, 512
    # tiny-gpt2: wte + wpe + 2 x (ln1, c_attn, attn c_proj, ln2, c_fc, mlp c_proj) + ln_f; lm_head tied
    D = 256
    gpt2_layer = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * D + D) + (D * d + d)
    assert count_parameters(tiny_gpt2) == V * d + n_ctx * d + 2 * gpt2_layer + 2 * d
    pruned = prune_model(tiny_gpt2, fake_neurons(tiny_gpt2), keep=0.1, layers=[0, 1])
    k = int(0.1 * D)
    assert count_parameters(pruned) == count_parameters(tiny_gpt2) - 2 * (D - k) * (d + 1 + d)
    # tiny-llama: gate/up/down without bias; pruning adds a d_model bias to down_proj
    D = 192
    before = count_parameters(tiny_llama)
    pruned = prune_model(tiny_llama, fake_neurons(tiny_llama), keep=0.02, layers=[2])
    k = int(0.02 * D)
    assert count_parameters(pruned) == before - 3 * (D - k) * d + d
    assert pruning_of(pruned).kept.keys() == {2}


def test_original_model_unchanged(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    prompt = SoftPrompt.from_vocab(tiny_llama, 3)
    logits = prompted_logits(tiny_llama, prompt)
    pruned = prune_model(tiny_llama, fake_neurons(tiny_llama), keep=0.05)
    after = tiny_llama.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(prompted_logits(tiny_llama, prompt), logits)
    assert pruning_of(tiny_llama) is None
    assert not any(p.requires_grad for p in pruned.parameters())
    # (read through state_dict: `unwrapped` rewires the module tree it is given)
    sd = compat.hf_model_of(tiny_llama).state_dict()
    assert not any("down_proj" in k and k.endswith("bias") for k in sd)
    assert all(v.shape[0] == 192 for k, v in sd.items() if "gate_proj" in k and k.endswith("weight"))


def test_save_load_round_trip(model, tmp_path):
    sn = fake_neurons(model, seed=5)
    pruned = prune_model(model, sn, keep=0.1)
    save_pruned(pruned, tmp_path)
    loaded = load_pruned(tmp_path, device="cpu")
    assert pruning_of(loaded) == pruning_of(pruned)
    assert model_spec(loaded) == model_spec(model)
    assert count_parameters(loaded) == count_parameters(pruned)
    prompt = SoftPrompt.from_vocab(model, 3, seed=7)
    torch.testing.assert_close(prompted_logits(loaded, prompt), prompted_logits(pruned, prompt), rtol=0, atol=0)


def test_save_load_from_saved_config(tiny_gpt2, tmp_path):
    """A model that is not bundled is rebuilt from the saved config and tokenizer, not from its source."""
    import shutil

    src = tmp_path / "src"
    unwrapped(compat.hf_model_of(load_model("tiny-gpt2", device="cpu", seed=3))).save_pretrained(src)
    tiny_gpt2.tokenizer.save_pretrained(src)
    local = load_model(str(src), device="cpu")
    pruned = prune_model(local, fake_neurons(local), keep=0.1)
    save_pruned(pruned, tmp_path / "pruned")
    shutil.rmtree(src)
    loaded = load_pruned(tmp_path / "pruned", device="cpu")
    assert model_spec(loaded).name == str(src)
    prompt = SoftPrompt.from_vocab(pruned, 3)
    torch.testing.assert_close(prompted_logits(loaded, prompt), prompted_logits(pruned, prompt), rtol=0, atol=0)


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, math.nan, 1e-4])
def test_bad_keep(tiny_gpt2, keep):
    with pytest.raises(PruneError, match="keep"):
        prune_model(tiny_gpt2, fake_neurons(tiny_gpt2), keep=keep)


@pytest.mark.parametrize("layers, match", [([2], "out of range"), ([-1], "out of range"), ([], "no layers")])
def test_bad_layers(tiny_gpt2, layers, match):
    with pytest.raises(PruneError, match=match):
        prune_model(tiny_gpt2, fake_neurons(tiny_gpt2), layers=layers)


def test_errors(tiny_gpt2, tiny_llama, tmp_path):
    with pytest.raises(PruneError, match="tiny-llama"):
        prune_model(tiny_gpt2, fake_neurons(tiny_gpt2, name="tiny-llama"))
    with pytest.raises(PruneError, match="d_mlp"):
        prune_model(tiny_gpt2, fake_neurons(tiny_gpt2, d_mlp=192))
    with pytest.raises(PruneError, match="tiny-gpt2"):
        prune_model(tiny_llama, fake_neurons(tiny_gpt2))
    with pytest.raises(PruneError, match="cover"):
        prune_model(tiny_gpt2, fake_neurons(tiny_gpt2, layers=[0]), layers=[1])
    pruned = prune_model(tiny_gpt2, fake_neurons(tiny_gpt2, layers=[0]))  # default: the layers the neurons cover
    assert pruning_of(pruned).layers == [0]
    with pytest.raises(PruneError, match="already pruned"):
        prune_model(pruned, fake_neurons(tiny_gpt2))
    with pytest.raises(PruneError, match="not pruned"):
        save_pruned(tiny_gpt2, tmp_path)
    with pytest.raises(PruneError, match="missing"):
        load_pruned(tmp_path)


def test_prune_experiment(tiny_gpt2, small_task, tmp_path):
    cfg = TuneConfig(
        prompt_length=4,
        steps=4,
        eval_every=4,
        max_train_examples=32,
        max_dev_examples=20,
        max_test_examples=40,
        eval_batch_size=16,
    )
    run = tune(tiny_gpt2, small_task, tmp_path / "run", cfg, progress=False, evaluate_test=False)
    sn = fake_neurons(tiny_gpt2, seed=6, positions=4)
    sn.save(tmp_path / "neurons")
    with pytest.raises(PruneError, match="retune_steps"):
        prune_experiment(tiny_gpt2, run, sn, tmp_path / "bad", retune_steps=-1)
    res = prune_experiment(
        tiny_gpt2,
        run.path,
        tmp_path / "neurons",
        tmp_path / "out",
        keep=0.1,
        retune_steps=2,
        max_examples=30,
        batch_size=8,
        progress=False,
        timing_repeats=2,
    )
    saved = json.loads((tmp_path / "out" / PRUNE_JSON).read_text())
    assert saved == json.loads(json.dumps(res.to_dict())) and PruneResult.load(tmp_path / "out") == res
    assert res["kept_fraction"] == 0.1 and res["layers"] == [1] and res["n_test"] == 30
    pruned = load_pruned(tmp_path / "out", device="cpu")
    assert res["params_before"] == count_parameters(tiny_gpt2)
    assert res["params_after"] == count_parameters(pruned) < res["params_before"]
    # the accuracies are those of tuning.evaluate on the same examples, the pruned one also
    # that of the unpruned model with the removed neurons held at their baseline
    from tl_skill.data.tasks import subsample

    data = subsample(run.load_task(), {"test": 30}, seed=cfg.task_seed)
    verb = run.verbalizer(tiny_gpt2)
    acc = lambda m, hooks=(), prompt=run.prompt: evaluate(
        m, data, "test", verb, prompt, batch_size=16, max_input_tokens=cfg.max_input_tokens, extra_hooks=hooks
    )["accuracy"]
    assert res["accuracy_before"] == acc(tiny_gpt2)
    assert res["accuracy_after"] == acc(pruned)
    assert res["accuracy_after"] == acc(tiny_gpt2, baseline_hooks(tiny_gpt2, sn, pruning_of(pruned).kept))
    assert len(res["seconds_before"]) == len(res["seconds_after"]) == 2 and res["speedup"] > 0
    assert res["median_seconds_before"] / res["median_seconds_after"] == pytest.approx(res["speedup"])
    retuned = SoftPrompt.load(tmp_path / "out" / "retuned" / "prompt.safetensors")
    assert res["accuracy_retuned"] == acc(pruned, prompt=retuned)


def test_prune_after_a_forward_with_grad(tiny_gpt2):
    # The bridge keeps the last attention pattern on its modules; after a pass
    # with a trainable prompt it is a graph node that deepcopy would refuse.
    from tl_skill.tuning.prompt import Verbalizer, class_logits, layout_for

    prompt = SoftPrompt.from_vocab(tiny_gpt2, 3)
    batch = layout_for(tiny_gpt2, 3).encode(["a fine film", "a dull film"], [1, 0])
    class_logits(tiny_gpt2, batch, Verbalizer(tiny_gpt2.tokenizer, [" negative", " positive"]), prompt).sum().backward()
    pruned = prune_model(tiny_gpt2, fake_neurons(tiny_gpt2), keep=0.5, layers=[1])
    assert pruning_of(pruned).kept.keys() == {1}
