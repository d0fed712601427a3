"""Compatibility subset: tl_skill on TransformerLens 3.x's HookedTransformer.

Runs only where HookedTransformer exists (`make test-tl3` builds `.venv-tl3`
with transformer-lens 3.9); under 4.x every test here is skipped.

The references are the Hugging Face model itself, run the obvious way
(`inputs_embeds` with the prompt written in, position ids from the mask, the
MLP hidden activation read as the input of the output projection), and, where
this TransformerLens has it, a TransformerBridge over the same weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tl_skill import compat
from tl_skill.errors import UnsupportedModelError

pytestmark = pytest.mark.skipif(
    not compat.HAS_HOOKED_TRANSFORMER,
    reason=f"transformer-lens {compat.TL_VERSION} has no HookedTransformer: "
    "the compatibility subset runs on 3.x (`make test-tl3`)",
)

SEED = 0  # load_model's tiny-model seed: the reference Hugging Face models use the same


# ----------------------------------------------------------------------------- references
def _hf_model(name: str):
    from tl_skill.models import _tiny_hf_model

    hf = _tiny_hf_model(name, SEED).eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    return hf


def _mlp_out_proj(hf, layer: int) -> torch.nn.Module:
    """The MLP's output projection: its input is the neuron activations."""
    if hasattr(hf, "transformer"):  # GPT-2
        return hf.transformer.h[layer].mlp.c_proj
    return hf.model.layers[layer].mlp.down_proj  # Llama


def hf_forward(hf, batch, prompt=None, zero: torch.Tensor | None = None):
    """(logits [B, T, V], neuron activations [L, B, T, d_mlp]) of the Hugging Face model.

    `zero`: bool mask [L, d_mlp] of neurons set to 0 at every position.
    """
    emb = hf.get_input_embeddings()(batch.input_ids)
    if prompt is not None:
        emb = emb.clone()
        for i, start in enumerate(batch.prompt_start.tolist()):
            emb[i, start : start + prompt.length] = prompt.vectors.to(emb.dtype)
    n_layers = hf.config.num_hidden_layers
    acts: list[torch.Tensor | None] = [None] * n_layers
    handles = []
    for layer in range(n_layers):

        def pre_hook(module, args, layer=layer):
            x = args[0]
            if zero is not None:
                x = x.masked_fill(zero[layer].to(x.device), 0.0)
            acts[layer] = x
            return (x,)

        handles.append(_mlp_out_proj(hf, layer).register_forward_pre_hook(pre_hook))
    try:
        position_ids = (batch.attention_mask.cumsum(1) - 1).clamp(min=0)
        logits = hf(inputs_embeds=emb, attention_mask=batch.attention_mask, position_ids=position_ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, torch.stack(acts)


def hf_class_logits(hf, batch, verbalizer, prompt=None, zero=None) -> torch.Tensor:
    logits, _ = hf_forward(hf, batch, prompt, zero)
    return logits[torch.arange(len(logits)), batch.pred_pos][:, verbalizer.token_ids]


def hooked_activations(model, batch, prompt=None) -> torch.Tensor:
    """Neuron activations [L, B, T, d_mlp] of a tl_skill model, read at its hook points."""
    from tl_skill.tuning.prompt import maybe_applied

    seen: dict[str, torch.Tensor] = {}
    names = [compat.mlp_post_hook(l) for l in range(model.cfg.n_layers)]

    def keep(name):
        def hook(act, hook):
            seen[name] = act.detach().clone()

        return hook

    with maybe_applied(prompt, model, batch), model.hooks(fwd_hooks=[(n, keep(n)) for n in names]):
        compat.forward(model, batch.input_ids, batch.attention_mask)
    return torch.stack([seen[n] for n in names])


def reference_predictivity(hf, task, prompt, layout, batch_size: int = 32) -> torch.Tensor:
    """method §2-3 written out: baseline = train mean at each prompt position; a neuron predicts
    class 1 when above it; predictivity = max(acc, 1 - acc), max over prompt positions."""

    def prompt_acts(split):
        out = []
        texts, labels = task.texts(split), task.labels(split).copy()
        for i in range(0, len(texts), batch_size):
            batch = layout.encode(texts[i : i + batch_size], labels[i : i + batch_size])
            with torch.no_grad():
                _, acts = hf_forward(hf, batch, prompt)  # [L, B, T, D]
            for b, start in enumerate(batch.prompt_start.tolist()):
                out.append(acts[:, b, start : start + prompt.length].double())
        return torch.stack(out), torch.as_tensor(labels)  # [N, L, P, D]

    train, _ = prompt_acts("train")
    dev, labels = prompt_acts("dev")
    baseline = train.mean(0)
    predicted_positive = dev > baseline
    acc = (predicted_positive == labels.bool()[:, None, None, None]).double().mean(0)
    return torch.maximum(acc, 1 - acc).amax(1)  # [L, D]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hooked():
    from tl_skill import load_model

    return load_model("tiny-gpt2", device="cpu", seed=SEED)


@pytest.fixture(scope="module")
def hf_gpt2():
    return _hf_model("tiny-gpt2")


@pytest.fixture(scope="module")
def bridge():
    if not compat.HAS_BRIDGE:
        pytest.skip(f"transformer-lens {compat.TL_VERSION} has no TransformerBridge")
    from tl_skill import load_model

    return load_model("tiny-gpt2", device="cpu", seed=SEED, kind="bridge")


@pytest.fixture(scope="module")
def trained_run(hooked, small_task, tmp_path_factory):
    from tl_skill.tuning.runs import TuneConfig, tune

    cfg = TuneConfig(prompt_length=4, steps=8, eval_every=4, batch_size=16, max_train_examples=160, max_input_tokens=48)
    return tune(hooked, small_task, tmp_path_factory.mktemp("tl3") / "run", cfg, progress=False, evaluate_test=False)


def _texts(task, n=6):
    return task.texts("dev")[:n], task.labels("dev")[:n].copy()


# ----------------------------------------------------------------------------- tests
def test_load_model_builds_an_unprocessed_hooked_transformer(hooked, hf_gpt2):
    from transformer_lens import HookedTransformer

    from tl_skill.models import model_spec, tiny_tokenizer_dir

    assert compat.DEFAULT_KIND == "hooked"
    assert isinstance(hooked, HookedTransformer)
    assert not compat.is_bridge(hooked)
    assert not any(p.requires_grad for p in hooked.parameters())
    spec = model_spec(hooked)
    assert (spec.family, spec.n_layers, spec.d_mlp, spec.d_model, spec.d_vocab, spec.gated_mlp) == (
        "causal",
        2,
        256,
        64,
        4096,
        False,
    )
    # tl_skill's own tokenizer is attached unchanged (no BOS-adding reload)
    assert hooked.tokenizer.name_or_path == str(tiny_tokenizer_dir())
    assert (
        hooked.tokenizer("a fine film", add_special_tokens=False)["input_ids"]
        == hooked.tokenizer("a fine film")["input_ids"]
    )
    # no weight processing: the weights are the Hugging Face model's, as they are
    assert hooked.cfg.normalization_type == "LN"
    for layer in range(2):
        mlp, ref = hooked.blocks[layer].mlp, hf_gpt2.transformer.h[layer].mlp
        assert torch.equal(mlp.W_in, ref.c_fc.weight) and torch.equal(mlp.b_in, ref.c_fc.bias)
        assert torch.equal(mlp.W_out, ref.c_proj.weight) and torch.equal(mlp.b_out, ref.c_proj.bias)
    assert torch.equal(hooked.W_E, hf_gpt2.transformer.wte.weight)
    assert torch.equal(hooked.W_U, hf_gpt2.lm_head.weight.T)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_hook_points_hold_the_hf_models_activations(name, small_task):
    """Left-padded batch, no prompt: logits and every neuron equal the Hugging Face model's."""
    from tl_skill import load_model
    from tl_skill.tuning.prompt import layout_for

    model = load_model(name, device="cpu", seed=SEED)
    hf = _hf_model(name)
    assert compat.gated_mlp(model) == (name == "tiny-llama")
    texts, labels = _texts(small_task)
    batch = layout_for(model, 0, max_input_tokens=40).encode(texts, labels)
    assert not bool(batch.attention_mask.all()), "the batch should need padding"
    real = batch.attention_mask.bool()
    with torch.no_grad():
        ref_logits, ref_acts = hf_forward(hf, batch)
        logits = compat.forward(model, batch.input_ids, batch.attention_mask)
        acts = hooked_activations(model, batch)
    torch.testing.assert_close(logits[real], ref_logits[real], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(acts[:, real], ref_acts[:, real], atol=2e-5, rtol=1e-4)


def test_soft_prompt_logits_and_gradient_match_inputs_embeds(hooked, hf_gpt2, small_task):
    """The prompt written at `hook_embed` is prompt tuning with `inputs_embeds`: same logits, same gradient."""
    from tl_skill.tuning.prompt import SoftPrompt, Verbalizer, class_logits, layout_for

    verbalizer = Verbalizer(hooked.tokenizer, small_task.spec.label_words)
    prompt = SoftPrompt.from_vocab(hooked, 4, seed=3)
    texts, labels = _texts(small_task)
    batch = layout_for(hooked, 4, max_input_tokens=40).encode(texts, labels)

    got = class_logits(hooked, batch, verbalizer, prompt)
    loss = torch.nn.functional.cross_entropy(got, batch.labels)
    (grad,) = torch.autograd.grad(loss, prompt.vectors)

    ref_prompt = SoftPrompt(prompt.vectors.detach())
    want = hf_class_logits(hf_gpt2, batch, verbalizer, ref_prompt)
    ref_loss = torch.nn.functional.cross_entropy(want, batch.labels)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_prompt.vectors)

    torch.testing.assert_close(got.detach(), want.detach(), atol=2e-5, rtol=1e-4)
    assert float(grad.abs().max()) > 0
    torch.testing.assert_close(grad, ref_grad, atol=1e-5, rtol=1e-3)

    # padding changes nothing: each example alone gives its row of the padded batch
    with torch.no_grad():
        for i in range(len(texts)):
            alone = layout_for(hooked, 4, max_input_tokens=40).encode([texts[i]], [labels[i]])
            torch.testing.assert_close(
                class_logits(hooked, alone, verbalizer, prompt)[0], got[i].detach(), atol=2e-5, rtol=1e-4
            )


def test_prompt_tuning_trains_the_prompt_only(hooked, trained_run, small_task):
    from tl_skill.tuning.prompt import SoftPrompt
    from tl_skill.tuning.runs import evaluate

    before = {k: v.clone() for k, v in hooked.state_dict().items()}
    start = SoftPrompt.from_vocab(hooked, 4, seed=trained_run.config.seed)
    assert trained_run.info["transformer_lens"] == compat.TL_VERSION
    assert not torch.allclose(trained_run.prompt.vectors, start.vectors), "the prompt did not move"
    assert trained_run.metrics["steps_run"] == 8
    # the saved dev accuracy is the accuracy of the saved prompt
    acc = evaluate(
        hooked,
        small_task,
        "dev",
        trained_run.verbalizer(hooked),
        trained_run.prompt,
        max_input_tokens=trained_run.config.max_input_tokens,
    )["accuracy"]
    assert acc == pytest.approx(trained_run.metrics["dev_accuracy"])
    after = hooked.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_zero_perturbation_matches_the_hf_model_with_those_neurons_zeroed(hooked, hf_gpt2, small_task):
    from tl_skill.perturb import perturbed
    from tl_skill.tuning.prompt import SoftPrompt, Verbalizer, class_logits, layout_for

    verbalizer = Verbalizer(hooked.tokenizer, small_task.spec.label_words)
    prompt = SoftPrompt.from_vocab(hooked, 4, seed=1)
    texts, labels = _texts(small_task)
    batch = layout_for(hooked, 4, max_input_tokens=40).encode(texts, labels)
    mask = torch.zeros(2, 256, dtype=torch.bool)
    mask[:, torch.randperm(256, generator=torch.Generator().manual_seed(0))[:64]] = True
    with torch.no_grad():
        plain = class_logits(hooked, batch, verbalizer, prompt)
        with perturbed(hooked, mask, mode="zero"):
            got = class_logits(hooked, batch, verbalizer, prompt)
        want = hf_class_logits(hf_gpt2, batch, verbalizer, prompt, zero=mask)
        after = class_logits(hooked, batch, verbalizer, prompt)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4), "zeroing a quarter of the neurons changed nothing"
    torch.testing.assert_close(after, plain)  # the hooks are gone


def test_predictivity_matches_the_hf_reference_and_the_bridge(hooked, hf_gpt2, trained_run, request):
    """The same ranking on a HookedTransformer and a bridge."""
    from tl_skill.data.tasks import subsample
    from tl_skill.find import find_skill_neurons
    from tl_skill.tuning.prompt import layout_for

    limits = dict(max_train_examples=120, max_eval_examples=80)
    found = find_skill_neurons(hooked, [trained_run], progress=False, **limits)
    pred = found.predictivity
    assert pred.shape == (2, 256)

    task = trained_run.load_task()
    task = subsample(
        task, {"train": limits["max_train_examples"], "dev": limits["max_eval_examples"]}, seed=task.spec.seed
    )
    cfg = trained_run.config
    layout = layout_for(hooked, trained_run.prompt.length, cfg.max_input_tokens, cfg.padding_side)
    ref = reference_predictivity(hf_gpt2, task, trained_run.prompt, layout)
    _assert_same_ranking(pred, ref)

    if compat.HAS_BRIDGE:
        bridge = request.getfixturevalue("bridge")
        assert compat.is_bridge(bridge)
        on_bridge = find_skill_neurons(bridge, [trained_run], progress=False, **limits)
        _assert_same_ranking(pred, on_bridge.predictivity)
        torch.testing.assert_close(found.baseline, on_bridge.baseline, atol=1e-5, rtol=1e-4)
        chosen, chosen_bridge = found.select(fraction=0.05), on_bridge.select(fraction=0.05)
        assert int((chosen & chosen_bridge).sum()) >= 0.9 * int(chosen.sum())


def _assert_same_ranking(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal predictivity up to a neuron whose activation sits on its baseline within float rounding."""
    a, b = a.double().flatten(), b.double().flatten()
    differ = int((a - b).abs().gt(1e-9).sum())
    assert differ <= max(2, a.numel() // 200), f"{differ} of {a.numel()} neurons differ in predictivity"
    top_a = set(torch.argsort(a, descending=True, stable=True)[:10].tolist())
    top_b = set(torch.argsort(b, descending=True, stable=True)[:10].tolist())
    assert len(top_a & top_b) >= 8
    ra = torch.from_numpy(np.argsort(np.argsort(a.numpy(), kind="stable"), kind="stable")).double()
    rb = torch.from_numpy(np.argsort(np.argsort(b.numpy(), kind="stable"), kind="stable")).double()
    assert float(torch.corrcoef(torch.stack([ra, rb]))[0, 1]) > 0.99


def test_pruning_is_bridge_only(hooked, trained_run):
    from tl_skill.find import find_skill_neurons
    from tl_skill.prune import PruneError, prune_model

    found = find_skill_neurons(hooked, [trained_run], progress=False, max_train_examples=32, max_eval_examples=32)
    with pytest.raises(PruneError, match="kind='bridge'"):
        prune_model(hooked, found, keep=0.1)


def test_hooked_transformer_refuses_masked_lms():
    from tl_skill import load_model

    with pytest.raises(UnsupportedModelError, match="masked LM"):
        load_model("tiny-bert", device="cpu", kind="hooked")
    with pytest.raises(ValueError, match="model kind"):
        load_model("tiny-gpt2", device="cpu", kind="hooked-transformer")


def test_prompt_room_check_on_a_hooked_transformer(hooked):
    from tl_skill import SoftPrompt
    from tl_skill.tuning import layout_for

    prompt = SoftPrompt.from_vocab(hooked, 3)
    batch = layout_for(hooked, 3).encode(["a good film", "bad"])
    with torch.no_grad(), prompt.applied(hooked):  # placeholders where the prompt goes: accepted
        assert hooked(batch.input_ids, attention_mask=batch.attention_mask).shape[:2] == batch.input_ids.shape
    with prompt.applied(hooked), pytest.raises(ValueError, match="not prompt placeholders"):
        hooked(torch.tensor([[11, 12, 13, 14, 15]]))


def test_a_users_own_hooked_transformer_runs_the_pipeline_unchanged(small_task, tmp_path):
    """A HookedTransformer built from a config (trainable, not from load_model) is tuned, probed and
    perturbed; its weights and requires_grad flags are what they were."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import AutoTokenizer

    from tl_skill import TuneConfig, evaluate, tune
    from tl_skill.data import subsample
    from tl_skill.find import find_skill_neurons
    from tl_skill.models import tiny_tokenizer_dir
    from tl_skill.perturb import Perturbation

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=64,
        d_head=16,
        n_heads=4,
        d_mlp=128,
        d_vocab=4096,
        n_ctx=128,
        act_fn="gelu",
        normalization_type="LN",
    )
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(tiny_tokenizer_dir()))
    assert all(p.requires_grad for p in model.parameters())  # as a user builds it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = subsample(small_task, {"train": 48, "dev": 24, "test": 24})
    run = tune(
        model,
        task,
        tmp_path / "run",
        TuneConfig(
            prompt_length=4, steps=2, eval_every=2, max_train_examples=48, max_dev_examples=24, max_test_examples=24
        ),
        progress=False,
    )
    sn = find_skill_neurons(model, [run], max_train_examples=48, max_eval_examples=24, progress=False)
    assert sn.predictivity.shape == (2, 128) and 0.5 <= sn.best_predictivity <= 1
    pert = Perturbation(model, sn.select(fraction=0.5), "zero", skill=sn)
    acc = evaluate(model, run.load_task(), "test", run.verbalizer(model), run.prompt, extra_hooks=pert.fwd_hooks())
    assert 0 <= acc["accuracy"] <= 1
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_hooked_transformer_prefix_cache_equals_the_full_pass(name, side, small_task):
    """HookedTransformer continues its own key/value cache: logits, prompt gradient and several prompts at
    once equal the full pass, with a zero perturbation active in both passes."""
    from tl_skill import SoftPrompt, load_model
    from tl_skill.perturb import Perturbation
    from tl_skill.tuning import Verbalizer, class_logits, layout_for
    from tl_skill.tuning.prefix import class_logits_cached, class_logits_many

    model = load_model(name, device="cpu", seed=SEED)
    if compat.DEFAULT_KIND == "bridge":
        pytest.skip("TransformerLens 4.x has no HookedTransformer")
    assert type(model).__name__ == "HookedTransformer" and compat.prefix_cache_supported(model)
    batch = layout_for(model, 4, 24, side).encode(small_task.texts("train")[:6], small_task.labels("train")[:6])
    v = Verbalizer(model.tokenizer, small_task.spec.label_words)
    full_p = SoftPrompt.from_vocab(model, 4, seed=0)
    cached_p = SoftPrompt(full_p.vectors.detach().clone())
    mask = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp, dtype=torch.bool)
    mask[:, ::3] = True
    hooks = Perturbation(model, mask, "zero").fwd_hooks()
    tol = dict(rtol=1e-5, atol=1e-6)
    full = class_logits(model, batch, v, full_p, hooks)
    cached = class_logits_cached(model, batch, v, cached_p, hooks)
    torch.testing.assert_close(cached, full, **tol)
    assert not torch.allclose(full, class_logits(model, batch, v, full_p), **tol)  # the perturbation matters
    full.logsumexp(-1).sum().backward()
    cached.logsumexp(-1).sum().backward()
    scale = full_p.vectors.grad.abs().max()
    torch.testing.assert_close(cached_p.vectors.grad / scale, full_p.vectors.grad / scale, **tol)
    other = SoftPrompt.from_vocab(model, 4, seed=5)
    with torch.no_grad():
        many = class_logits_many(model, batch, v, [full_p, other])
        torch.testing.assert_close(many[1], class_logits(model, batch, v, other), **tol)
        torch.testing.assert_close(many[0], class_logits(model, batch, v, full_p), **tol)
    seen = []
    with model.hooks(fwd_hooks=[(compat.mlp_post_hook(0), lambda a, hook: seen.append(a.shape[1]))]):
        with torch.no_grad():
            class_logits_cached(model, batch, v, cached_p)
    assert seen[1] == 4 and seen[0] == int((batch.input_end - batch.input_start).max())  # the input is cached


def test_attn_out_vectors_on_a_hooked_transformer():
    """W_O flattened: hook_attn_out = hook_z (heads x dims) @ attn_out_vectors + b_O."""
    from tl_skill import load_model

    model = load_model("tiny-gpt2", device="cpu", seed=SEED)
    ids = torch.tensor([[11, 52, 300, 7, 99]])
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    for l in range(model.cfg.n_layers):
        z = cache[f"blocks.{l}.attn.hook_z"][0].flatten(-2)
        want = cache[f"blocks.{l}.hook_attn_out"][0]
        got = z @ compat.attn_out_vectors(model, l) + model.blocks[l].attn.b_O
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hooked_transformer_grouped_input_pass_equals_the_full_pass(small_task, monkeypatch):
    """No hook attached: rows run in length groups whose TransformerLens caches are merged."""
    from tl_skill import SoftPrompt, load_model
    from tl_skill.tuning import Verbalizer, class_logits, layout_for, prefix

    model = load_model("tiny-llama", device="cpu", seed=SEED)
    if compat.DEFAULT_KIND == "bridge":
        pytest.skip("TransformerLens 4.x has no HookedTransformer")
    monkeypatch.setattr(prefix, "GROUP_OVERHEAD_TOKENS", 0)
    calls = []
    run_input = prefix._run_input
    monkeypatch.setattr(
        prefix,
        "_run_input",
        lambda m, ids, mask, hooks, stop: calls.append(ids.shape[0]) or run_input(m, ids, mask, hooks, stop),
    )
    batch = layout_for(model, 4, 80).encode(small_task.texts("train")[:9], small_task.labels("train")[:9])
    v = Verbalizer(model.tokenizer, small_task.spec.label_words)
    full_p = SoftPrompt.from_vocab(model, 4, seed=0)
    cached_p = SoftPrompt(full_p.vectors.detach().clone())
    full = class_logits(model, batch, v, full_p)
    cached = prefix.class_logits_cached(model, batch, v, cached_p)
    assert len(calls) > 2 and sum(calls) == 9
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)
    full.logsumexp(-1).sum().backward()
    cached.logsumexp(-1).sum().backward()
    scale = full_p.vectors.grad.abs().max()
    torch.testing.assert_close(cached_p.vectors.grad / scale, full_p.vectors.grad / scale, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- certification on 3.9
TL3_CERTIFIED = [
    "tiny-gpt2",
    "tiny-llama",
    "tiny-gpt-neox",
    "tiny-gptj",
    "tiny-opt",
    "tiny-bloom",
    "tiny-mistral",
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-phi3",
]


@pytest.mark.parametrize("name", TL3_CERTIFIED)
def test_hooked_transformers_are_certified(name):
    """On a HookedTransformer the projection is W_out: hook_post @ W_out + b_out must be hook_mlp_out."""
    from tl_skill import load_model
    from tl_skill.certification import certify

    cert = certify(load_model(name, kind="hooked"))
    assert cert.passed, cert.table()
    assert next(c for c in cert.checks if c.name == "pruning").passed is None  # pruning needs a bridge


def test_hooked_transformer_failures_are_named():
    from tl_skill import load_model
    from tl_skill.basis import basis_checks

    # OLMo 3 in TransformerLens 3.9: hook_mlp_out is not hook_post @ W_out + b_out (a norm follows the projection)
    olmo = {c.name: c.passed for c in basis_checks(load_model("tiny-olmo3", kind="hooked"))}
    assert olmo["equals_projection_input"] is False
    # a wrong tensor under the neuron's name
    model = load_model("tiny-llama", kind="hooked")
    model.hook_dict["blocks.1.mlp.hook_post"] = model.hook_dict["blocks.1.mlp.hook_pre"]
    model.mod_dict["blocks.1.mlp.hook_post"] = model.mod_dict["blocks.1.mlp.hook_pre"]
    bad = [c for c in basis_checks(model) if c.passed is False]
    assert bad[0].name == "equals_projection_input" and bad[0].failed_layers == (1,)
