"""Prefix-cached logits (prefix.py): the input run once, the prompt against its keys/values, the same numbers."""

from __future__ import annotations

import pytest
import torch

from tl_skill import SoftPrompt, TuneConfig, compat, tune
from tl_skill.perturb import Perturbation
from tl_skill.tuning import Verbalizer, class_logits, layout_for
from tl_skill.tuning.prefix import class_logits_cached

TOL = dict(rtol=1e-5, atol=1e-6)  # float32, relative to the values compared


def _batch(model, task, side, n=7, P=4, tokens=24):
    layout = layout_for(model, P, tokens, side)
    return layout.encode(task.texts("train")[:n], task.labels("train")[:n])


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gemma3"])
def test_logits_and_prompt_gradient_equal_the_full_pass(name, side, small_task):
    from tl_skill import load_model

    model = load_model(name, device="cpu")
    v = Verbalizer(model.tokenizer, small_task.spec.label_words)
    batch = _batch(model, small_task, side)
    assert compat.prefix_cache_supported(model)
    full_p = SoftPrompt.from_vocab(model, 4, seed=1)
    cached_p = SoftPrompt(full_p.vectors.detach().clone())
    full = class_logits(model, batch, v, full_p)
    cached = class_logits_cached(model, batch, v, cached_p)
    torch.testing.assert_close(cached, full, **TOL)
    full.logsumexp(-1).sum().backward()
    cached.logsumexp(-1).sum().backward()
    scale = full_p.vectors.grad.abs().max()
    torch.testing.assert_close(cached_p.vectors.grad / scale, full_p.vectors.grad / scale, **TOL)
    # the input really is cached: the prompt pass sees P positions only, the input pass the rest
    seen = []
    with model.hooks(fwd_hooks=[(compat.mlp_post_hook(0), lambda a, hook: seen.append(a.shape[1]))]):
        class_logits_cached(model, batch, v, cached_p)
    # (tiny-gemma3: its <bos> goes into the cache too, and its sliding window of 8 is shorter than the input)
    n_head = len(layout_for(model, 4).head)
    assert n_head == (1 if name == "tiny-gemma3" else 0)
    assert seen[1] == 4 and seen[0] == int((batch.input_end - batch.input_start).max()) + n_head


@pytest.mark.parametrize("mode", ["zero", "noise"])
def test_a_perturbation_applies_at_every_position_of_both_passes(tiny_llama, small_task, mode):
    v = Verbalizer(tiny_llama.tokenizer, small_task.spec.label_words)
    batch = _batch(tiny_llama, small_task, "left")
    batch.first_example = 5
    prompt = SoftPrompt.from_vocab(tiny_llama, 4, seed=2)
    mask = torch.zeros(3, 192, dtype=torch.bool)
    mask[:, ::3] = True

    def logits(fn):
        pert = Perturbation(tiny_llama, mask, mode, std=2.0, seed=4)
        hooks = pert.fwd_hooks()
        hooks[0][1].start_batch(batch.first_example)  # as evaluate does before each batch
        with torch.no_grad():
            return fn(tiny_llama, batch, v, prompt, hooks)

    full, cached = logits(class_logits), logits(class_logits_cached)
    torch.testing.assert_close(cached, full, **TOL)
    with torch.no_grad():
        assert not torch.allclose(class_logits(tiny_llama, batch, v, prompt), full)  # the hooks did something


def test_tuning_with_the_prefix_cache_gives_the_same_prompt(tiny_gpt2, small_task, tmp_path):
    cfg = TuneConfig(
        prompt_length=4,
        steps=4,
        eval_every=2,
        batch_size=8,
        max_train_examples=48,
        max_dev_examples=24,
        max_test_examples=24,
        max_input_tokens=24,
    )
    full = tune(tiny_gpt2, small_task, tmp_path / "full", cfg, progress=False, evaluate_test=False, prefix_cache=False)
    cached = tune(tiny_gpt2, small_task, tmp_path / "cached", cfg, progress=False, evaluate_test=False)  # default
    torch.testing.assert_close(cached.prompt.vectors, full.prompt.vectors, rtol=1e-4, atol=1e-6)
    assert [h["loss"] for h in cached.info["history"]] == pytest.approx(
        [h["loss"] for h in full.info["history"]], rel=1e-5
    )


def test_masked_lms_keep_the_full_pass(tiny_bert, small_task):
    assert not compat.prefix_cache_supported(tiny_bert)
    v = Verbalizer(tiny_bert.tokenizer, small_task.spec.label_words)
    batch = _batch(tiny_bert, small_task, "right")
    prompt = SoftPrompt.from_vocab(tiny_bert, 4, seed=0)
    with torch.no_grad():
        assert torch.equal(class_logits_cached(tiny_bert, batch, v, prompt), class_logits(tiny_bert, batch, v, prompt))


def test_several_prompts_share_one_input_pass_and_match_evaluate(tiny_llama, small_task):
    from tl_skill import evaluate
    from tl_skill.tuning.loop import evaluate_prompts
    from tl_skill.tuning.prefix import class_logits_many

    v = Verbalizer(tiny_llama.tokenizer, small_task.spec.label_words)
    prompts = [SoftPrompt.from_vocab(tiny_llama, 4, seed=s) for s in range(3)]
    batch = _batch(tiny_llama, small_task, "left")
    with torch.no_grad():
        many = class_logits_many(tiny_llama, batch, v, prompts)
        for k, p in enumerate(prompts):
            torch.testing.assert_close(many[k], class_logits(tiny_llama, batch, v, p), **TOL)
    seen = []
    with tiny_llama.hooks(fwd_hooks=[(compat.mlp_post_hook(0), lambda a, hook: seen.append(a.shape[1]))]):
        class_logits_many(tiny_llama, batch, v, prompts)
    assert seen[1:] == [4, 4, 4] and len(seen) == 4  # one input pass, then one pass of P positions per prompt
    got = evaluate_prompts(tiny_llama, small_task, "dev", v, prompts, batch_size=16, max_input_tokens=24)
    for k, p in enumerate(prompts):
        want = evaluate(tiny_llama, small_task, "dev", v, p, batch_size=16, max_input_tokens=24)
        assert (got[k]["predictions"] == want["predictions"]).all() and got[k]["accuracy"] == want["accuracy"]


def test_length_groups_is_the_cheapest_contiguous_split():
    """Brute force over every split of the sorted rows into runs: the DP finds the minimum cost."""
    import itertools
    import random

    from tl_skill.tuning.prefix import length_groups

    def cost(groups, lengths, over):
        return sum(len(g) * max(max(1, lengths[r]) for r in g) + over for g in groups)

    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randint(0, 40) for _ in range(rng.randint(1, 8))]
        over = rng.choice([0, 5, 30, 100])
        groups = length_groups(lengths, over)
        assert sorted(r for g in groups for r in g) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda r: (lengths[r], r))
        best = min(
            cost([order[a:b] for a, b in zip((0,) + cuts, cuts + (len(order),))], lengths, over)
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
        )
        assert cost(groups, lengths, over) == best


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gemma3"])
def test_rows_grouped_by_length_give_the_full_pass(name, side, small_task, monkeypatch):
    """Without a plain view (here: taken away) and with no hook attached, the input runs in groups of
    similar length (forced here: no overhead per group) and stops after the last layer's keys/values;
    logits and gradients still equal the full pass."""
    from tl_skill import load_model
    from tl_skill.tuning import prefix

    model = load_model(name, device="cpu")
    monkeypatch.setattr(compat, "plain_view", lambda m: None)
    v = Verbalizer(model.tokenizer, small_task.spec.label_words)
    batch = _batch(model, small_task, side, n=9, tokens=80)  # rows of many lengths
    monkeypatch.setattr(prefix, "GROUP_OVERHEAD_TOKENS", 0)
    calls = []
    run_input = prefix._run_input
    monkeypatch.setattr(
        prefix,
        "_run_input",
        lambda m, ids, mask, hooks, stop: calls.append((ids.shape, stop)) or run_input(m, ids, mask, hooks, stop),
    )
    full_p = SoftPrompt.from_vocab(model, 4, seed=1)
    cached_p = SoftPrompt(full_p.vectors.detach().clone())
    full = class_logits(model, batch, v, full_p)
    cached = class_logits_cached(model, batch, v, cached_p)
    assert len(calls) > 2 and sum(s[0] for s, _ in calls) == 9  # every row once, in several groups
    assert all(stop == f"blocks.{model.cfg.n_layers - 1}.attn.hook_attn_scores" for _, stop in calls)
    torch.testing.assert_close(cached, full, **TOL)
    full.logsumexp(-1).sum().backward()
    cached.logsumexp(-1).sum().backward()
    scale = full_p.vectors.grad.abs().max()
    torch.testing.assert_close(cached_p.vectors.grad / scale, full_p.vectors.grad / scale, **TOL)
    # any hook attached (the user's own): one pass over the whole batch, to the last layer
    calls.clear()
    with model.hooks(fwd_hooks=[(compat.mlp_post_hook(0), lambda a, hook: None)]), torch.no_grad():
        torch.testing.assert_close(class_logits_cached(model, batch, v, cached_p), cached.detach(), **TOL)
    assert len(calls) == 1 and calls[0][1] == compat.final_resid_hook(model)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-gemma2"])
def test_the_plain_view_packs_the_input_and_gives_the_full_pass(name, side, small_task, monkeypatch):
    """With nobody listening, both passes run through the plain Hugging Face view: it holds the bridge's
    own tensors, the input rows run packed (forced into several packs here; tiny-gemma3's rows are
    longer than its sliding window of 8), and logits and prompt gradients equal the bridge's full pass."""
    from tl_skill import load_model
    from tl_skill.compat import plain as compat_plain

    model = load_model(name, device="cpu")
    hf = compat.hf_model_of(model)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    view = compat.plain_view(model)
    assert view is not None and compat.plain_view(model) is view  # built once
    bridge_tensors = {id(t) for t in [*hf.parameters(), *hf.buffers()]}
    assert all(id(t) in bridge_tensors for t in [*view.parameters(), *view.buffers()])  # nothing copied
    monkeypatch.setattr(compat_plain, "PACK_TOKENS", 20)
    packed, prompt_passes = [], []
    real_in, real_pp = compat_plain.base_forward, compat.plain_prompt_logits
    monkeypatch.setattr(
        compat_plain, "base_forward", lambda base, cache, **kw: packed.append(kw) or real_in(base, cache, **kw)
    )
    monkeypatch.setattr(compat, "plain_prompt_logits", lambda *a: prompt_passes.append(1) or real_pp(*a))
    v = Verbalizer(model.tokenizer, small_task.spec.label_words)
    batch = _batch(model, small_task, side, n=9, tokens=80)  # rows of many lengths
    full_p = SoftPrompt.from_vocab(model, 4, seed=1)
    cached_p = SoftPrompt(full_p.vectors.detach().clone())
    full = class_logits(model, batch, v, full_p)
    cached = class_logits_cached(model, batch, v, cached_p)
    packed = [kw for kw in packed if "input_ids" in kw]  # the input's packed passes (the prompt's has embeddings)
    assert len(packed) > 1 and prompt_passes == [1]
    lengths = (batch.input_end - batch.input_start + len(layout_for(model, 4).head)).tolist()
    assert sum(kw["input_ids"].shape[1] for kw in packed) == sum(lengths)  # no padding token ran
    torch.testing.assert_close(cached, full, **TOL)
    full.logsumexp(-1).sum().backward()
    cached.logsumexp(-1).sum().backward()
    scale = full_p.vectors.grad.abs().max()
    torch.testing.assert_close(cached_p.vectors.grad / scale, full_p.vectors.grad / scale, **TOL)
    for n, p in model.named_parameters():  # the model is as it was
        assert torch.equal(p.detach(), before[n][0]) and p.requires_grad == before[n][1] and p.grad is None
    # a cache up to layer 0 ends the pass before layer 0's MLP: later layers never run
    from tl_skill.tuning.prefix import split_batch

    ids, mask, _ = split_batch(batch, compat.pad_token_id(model))
    ran = []
    layers = view.base_model._modules.get("layers", view.base_model._modules.get("h"))
    handles = [
        layers[0].mlp.register_forward_hook(lambda *a: ran.append(0)),
        layers[1].register_forward_hook(lambda *a: ran.append(1)),
    ]
    cache = compat.plain_input_cache(model, view, ids, mask, 0)
    for h in handles:
        h.remove()
    assert ran == [] and len(cache.layers) == 1


def test_no_plain_view_where_someone_listens_or_the_model_changed(small_task):
    from tl_skill import load_model
    from tl_skill.compat import plain as compat_plain

    model = load_model("tiny-llama", device="cpu")
    hf = compat.hf_model_of(model)
    view = compat.plain_view(model)
    assert view is not None
    # a hook on a hook point, or the user's own torch hook on any module: the bridge runs
    with model.hooks(fwd_hooks=[(compat.mlp_post_hook(1), lambda a, hook: None)]):
        assert compat.plain_view(model) is None
    layer = [m for n, m in hf.named_modules() if compat.hf_param_name(n) == "model.layers.0.mlp"][-1]  # HF's own
    handle = layer.register_forward_hook(lambda mod, args, out: None)
    assert compat.plain_view(model) is None
    handle.remove()
    assert compat.plain_view(model) is view
    # an in-place edit of a weight is the view's too (the same tensor): no rebuild, still equal to the bridge
    w = next(p for n, p in hf.named_parameters() if n.endswith("up_proj._original_component.weight"))
    with torch.no_grad():
        w.mul_(1.25)
    assert compat.plain_view(model) is view and compat_plain._agrees(model, view)
    # a replaced weight: a new view around the new tensor, still equal to the bridge
    name, p = next((n, p) for n, p in hf.named_parameters() if n.endswith("down_proj._original_component.weight"))
    owner = hf.get_submodule(name.rsplit(".", 1)[0])
    owner._parameters["weight"] = torch.nn.Parameter(p.detach() * 1.5, requires_grad=False)
    new = compat.plain_view(model)
    assert new is not None and new is not view
    assert any(t is owner._parameters["weight"] for t in new.parameters())
    # an adapter's weight that the plain class has no place for: no view
    owner.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(2, 2), requires_grad=False))
    assert compat.plain_view(model) is None
    del owner._parameters["lora_A"]
    # GPT-2's bridge computes with its own split QKV copies, which a view would not follow: none
    assert compat.plain_view(load_model("tiny-gpt2", device="cpu")) is None
    # the probe can fail: another model's view does not agree with this bridge
    other = compat.plain_view(load_model("tiny-llama", device="cpu", seed=7))
    assert other is not None and not compat_plain._agrees(model, other)
    assert compat_plain._agrees(model, compat.plain_view(model))


def test_the_cache_is_the_default_where_it_is_exact_and_can_be_turned_off(tiny_gpt2, small_task, tmp_path, monkeypatch):
    """tune/evaluate use the cached path by default; `prefix_cache=False`, `use_prefix_cache(False)` and the CLI's
    --no-prefix-cache turn it off; training anything besides the prompt (LoRA, BitFit) keeps the full pass."""
    from tl_skill import evaluate
    from tl_skill.cli import main
    from tl_skill.tuning import loop as train
    from tl_skill.tuning.prefix import prefix_cache_default, use_prefix_cache

    calls = []
    real = train.class_logits_cached
    monkeypatch.setattr(train, "class_logits_cached", lambda *a, **k: calls.append(1) or real(*a, **k))
    v = Verbalizer(tiny_gpt2.tokenizer, small_task.spec.label_words)
    prompt = SoftPrompt.from_vocab(tiny_gpt2, 4, seed=0)
    base = evaluate(tiny_gpt2, small_task, "dev", v, prompt, max_input_tokens=24)
    assert len(calls) > 0
    calls.clear()
    with use_prefix_cache(False):
        assert not prefix_cache_default()
        off = evaluate(tiny_gpt2, small_task, "dev", v, prompt, max_input_tokens=24)
    assert not calls and prefix_cache_default()
    assert (off["predictions"] == base["predictions"]).all()
    # with hooks (a perturbation) one prompt takes the full pass unless the cache is asked for; same results
    pert = Perturbation(tiny_gpt2, torch.ones(2, 256, dtype=torch.bool), "noise", std=1.0, seed=0)
    hooked = evaluate(tiny_gpt2, small_task, "dev", v, prompt, max_input_tokens=24, extra_hooks=pert.fwd_hooks())
    assert not calls
    forced = evaluate(
        tiny_gpt2, small_task, "dev", v, prompt, max_input_tokens=24, extra_hooks=pert.fwd_hooks(), prefix_cache=True
    )
    assert calls and (forced["predictions"] == hooked["predictions"]).all()
    assert (hooked["predictions"] != base["predictions"]).any()  # the noise did something
    calls.clear()
    cfg = TuneConfig(
        prompt_length=4,
        steps=2,
        eval_every=2,
        batch_size=8,
        max_train_examples=16,
        max_dev_examples=8,
        max_test_examples=8,
        max_input_tokens=24,
    )
    tune(tiny_gpt2, small_task, tmp_path / "off", cfg, progress=False, evaluate_test=False, prefix_cache=False)
    assert not calls
    # a model parameter trains beside the prompt: its input keys/values change, so the full pass
    bias = dict(tiny_gpt2.named_parameters())
    name = next(n for n in bias if n.endswith("bias"))
    train.train_loop(
        tiny_gpt2,
        small_task,
        v,
        {"prompt": prompt.vectors, name: bias[name]},
        cfg,
        prompt=prompt,
        progress=False,
        evaluate_dev=False,
    )
    assert not calls
    run = tmp_path / "run"
    assert (
        main(
            [
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
                "4",
                "--max-train-examples",
                "16",
                "--max-dev-examples",
                "8",
                "--max-test-examples",
                "8",
                "--no-prefix-cache",
                "-q",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert not calls and prefix_cache_default()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gemma3"])
def test_recording_several_trials_reads_the_input_once(name, small_task, monkeypatch):
    """record_runs of R prompts: one input pass per batch (up to the last recorded layer), R prompt passes;
    baselines, std, counts and accuracies equal each prompt recorded alone on the full pass."""
    from tl_skill import load_model
    from tl_skill.data import subsample
    from tl_skill.find import record_run, record_runs
    from tl_skill.predictivity import make_subtasks
    from tl_skill.tuning import prefix

    model = load_model(name, device="cpu")
    task = subsample(small_task, {"train": 40, "dev": 24, "test": 24}, seed=0)
    subtasks = make_subtasks(task.spec.label_names)
    prompts = [SoftPrompt.from_vocab(model, 4, seed=s) for s in range(3)]
    layers = [0, 1]
    kw = dict(
        split="dev",
        layers=layers,
        batch_size=16,
        max_input_tokens=40,
        progress=False,
        confirm_split="test",
        control_seed=3,
    )
    with prefix.use_prefix_cache(False):
        alone = [record_run(model, task, p, subtasks, **kw) for p in prompts]
    inputs, passes = [], []
    import tl_skill.find as find_module

    real_in, real_pp = prefix.input_pass_through, prefix.prompt_pass_for_hooks
    monkeypatch.setattr(
        find_module, "input_pass_through", lambda m, i, k, last: inputs.append(last) or real_in(m, i, k, last)
    )
    monkeypatch.setattr(find_module, "prompt_pass_for_hooks", lambda *a: passes.append(1) or real_pp(*a))
    together = record_runs(model, task, prompts, subtasks, **kw)
    n_batches = sum(-(-len(task[s]) // 16) for s in ("train", "dev", "test"))
    assert inputs == [max(layers)] * n_batches and len(passes) == 3 * n_batches
    for a, b in zip(alone, together):
        torch.testing.assert_close(b.baseline, a.baseline, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.std, a.std, rtol=1e-4, atol=1e-6)
        assert torch.equal(b.accuracy, a.accuracy) and torch.equal(b.constant, a.constant)
        for which in ("eval", "confirm", "control"):
            assert all(
                torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for x, y in zip(a.counts[which], b.counts[which])
            )
    # one prompt, or positions that are not prompt positions, keep the full pass
    inputs.clear()
    record_runs(model, task, prompts[:1], subtasks, **kw)
    record_runs(model, task, prompts[:2], subtasks, positions="last", **kw)
    assert not inputs
