"""Soft prompts, verbalizers and prompt placement (method §1), checked against plain HF forwards."""

from __future__ import annotations

import pytest
import torch

from tl_skill import SoftPrompt, compat, model_spec
from tl_skill.tuning import Batch, Verbalizer, class_logits, layout_for
from tl_skill.tuning.prompt import Layout, VerbalizerError

TEXTS = [
    "great movie",
    "an utterly boring, long and pointless film that I regret watching twice",
    "fine",
    "the acting was good but the plot was thin and the ending fell flat",
    "I loved it",
]
LABELS = [1, 0, 1, 0, 1]
WORDS = (" negative", " positive")
P = 4
MODELS = ["tiny_gpt2", "tiny_llama", "tiny_bert"]
CAUSAL = ["tiny_gpt2", "tiny_llama"]


@pytest.fixture
def model(request):
    return request.getfixturevalue(request.param)


def _prompt(model, seed: int = 0) -> SoftPrompt:
    # Random vectors at the embedding scale: far from any real token, so a misplaced
    # prompt cannot go unnoticed.
    g = torch.Generator().manual_seed(seed)
    W_E = compat.hf_model_of(model).get_input_embeddings().weight
    return SoftPrompt(torch.randn(P, W_E.shape[1], generator=g) * W_E.std() * 3)


def _batch(model, texts=TEXTS, padding_side=None, labels=LABELS) -> Batch:
    return layout_for(model, P, padding_side=padding_side).encode(texts, labels[: len(texts)])


def _hook_counts(model) -> dict[str, int]:
    return {name: len(hp._forward_hooks) + len(hp._forward_pre_hooks) for name, hp in model.hook_dict.items()}


def _hand_built_logits(model, batch: Batch, prompt: SoftPrompt) -> torch.Tensor:
    """The obvious reference: word embeddings with the prompt written in, through the HF model."""
    hf = compat.hf_model_of(model)
    embeds = hf.get_input_embeddings().weight[batch.input_ids].clone()
    for i in range(len(embeds)):
        start = int(batch.prompt_start[i])
        embeds[i, start : start + P] = prompt.vectors.detach()
    position_ids = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(inputs_embeds=embeds, attention_mask=batch.attention_mask, position_ids=position_ids).logits


# ------------------------------------------------------------------------ verbalizer
def test_verbalizer_first_tokens(tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    v = Verbalizer(tok, [" good", " positively"])
    expected = [tok(w, add_special_tokens=False)["input_ids"][0] for w in (" good", " positively")]
    assert v.token_ids.tolist() == expected
    logits = torch.randn(2, 3, 4096)
    out = v.class_logits(logits, torch.tensor([2, 0]))
    assert torch.equal(out, torch.stack([logits[0, 2, expected], logits[1, 0, expected]]))


def test_verbalizer_shared_first_token(tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    a, b = " positive", " positively"
    first = lambda w: tok(w, add_special_tokens=False)["input_ids"][0]
    assert first(a) == first(b)  # precondition of the test
    with pytest.raises(VerbalizerError) as err:
        Verbalizer(tok, [" negative", a, b])
    assert a in str(err.value) and b in str(err.value)
    with pytest.raises(VerbalizerError, match="at least two"):
        Verbalizer(tok, [" good"])


# --------------------------------------------------------------------------- layout
def test_causal_layout_puts_prompt_after_input(tiny_gpt2):
    layout = layout_for(tiny_gpt2, P)
    tokens = layout.tokenize(TEXTS)
    b = layout.collate(tokens, LABELS)
    T = max(len(t) for t in tokens) + P
    assert b.input_ids.shape == (len(TEXTS), T)
    assert (b.prompt_start == T - P).all() and (b.pred_pos == T - 1).all()  # left padding
    for i, ids in enumerate(tokens):
        n = len(ids)
        assert b.input_ids[i, T - P - n : T - P].tolist() == ids
        assert b.attention_mask[i].tolist() == [0] * (T - P - n) + [1] * (n + P)
        assert (b.input_start[i], b.input_end[i]) == (T - P - n, T - P)
    right = layout_for(tiny_gpt2, P, padding_side="right").collate(tokens, LABELS)
    for i, ids in enumerate(tokens):
        assert right.prompt_start[i] == len(ids) and right.pred_pos[i] == len(ids) + P - 1
        assert right.input_ids[i, : len(ids)].tolist() == ids


def test_masked_layout(tiny_bert):
    tok = tiny_bert.tokenizer
    layout = layout_for(tiny_bert, P)
    tokens = layout.tokenize(TEXTS)
    b = layout.collate(tokens)
    for i, ids in enumerate(tokens):
        row = b.input_ids[i].tolist()
        assert row[0] == tok.cls_token_id and row[1] == tok.mask_token_id
        assert row[2 + P : 2 + P + len(ids)] == ids and row[2 + P + len(ids)] == tok.sep_token_id
        assert b.attention_mask[i].sum() == len(ids) + P + 3
    assert (b.pred_pos == 1).all() and (b.prompt_start == 2).all()


def test_layout_rejects_bad_settings(tiny_gpt2):
    with pytest.raises(ValueError, match="padding_side"):
        layout_for(tiny_gpt2, P, padding_side="middle")
    with pytest.raises(ValueError, match="family"):
        Layout(tiny_gpt2.tokenizer, "seq2seq", P)


# ----------------------------------------------------------------------- soft prompt
def test_soft_prompt_construction(tiny_gpt2, tmp_path):
    W_E = compat.hf_model_of(tiny_gpt2).get_input_embeddings().weight
    a = SoftPrompt.from_vocab(tiny_gpt2, 6, seed=1)
    assert a.vectors.shape == (6, 64) and a.vectors.requires_grad
    assert torch.equal(a.vectors, SoftPrompt.from_vocab(tiny_gpt2, 6, seed=1).vectors)
    assert not torch.equal(a.vectors, SoftPrompt.from_vocab(tiny_gpt2, 6, seed=2).vectors)
    for row in a.vectors:  # every row is a real token's embedding
        assert (row == W_E).all(-1).any()
    a.save(tmp_path / "p.safetensors")
    assert torch.equal(SoftPrompt.load(tmp_path / "p.safetensors").vectors, a.vectors)
    with pytest.raises(ValueError, match="NaN"):
        SoftPrompt(torch.full((2, 64), float("nan")))
    with pytest.raises(ValueError, match="d_model"):
        with SoftPrompt(torch.ones(2, 32)).applied(tiny_gpt2):
            pass


# -------------------------------------------------- prompt positions see the input
@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_prompt_activations_depend_on_input(model):
    prompt = _prompt(model)
    batch = _batch(model, TEXTS[:2])
    names = [compat.mlp_post_hook(l) for l in range(model_spec(model).n_layers)]
    with torch.no_grad(), prompt.applied(model, batch):
        _, cache = model.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n in names
        )
    pos = batch.prompt_positions()
    for name in names:
        acts = cache[name][torch.arange(2)[:, None], pos]  # [2, P, d_mlp]
        assert acts.shape == (2, P, model_spec(model).d_mlp)
        # every prompt position of every layer differs between the two inputs
        diff = (acts[0] - acts[1]).abs().amax(-1)
        assert (diff > 1e-4).all(), (name, diff)


@pytest.mark.parametrize("model", CAUSAL, indirect=True)
def test_control_prompt_before_input_is_blind(model):
    """The wrong placement (prompt first) in a causal LM: activations there ignore the input."""
    prompt = _prompt(model)
    layout = layout_for(model, 0, padding_side="right")
    tokens = layout.tokenize(TEXTS[:2])
    rows = [[layout.pad_id] * P + t for t in tokens]
    b = layout.collate(rows)
    b = Batch(b.input_ids, b.attention_mask, b.pred_pos, torch.zeros(2, dtype=torch.long), P)
    with torch.no_grad(), prompt.applied(model, b):
        _, cache = model.run_with_cache(b.input_ids, attention_mask=b.attention_mask)
    for l in range(model_spec(model).n_layers):
        acts = cache[compat.mlp_post_hook(l)][:, :P]
        torch.testing.assert_close(acts[0], acts[1])


# ------------------------------------------------------- equality with a plain forward
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_prompted_forward_equals_inputs_embeds_forward(model, padding_side):
    prompt = _prompt(model)
    batch = _batch(model, padding_side=padding_side)
    with torch.no_grad(), prompt.applied(model, batch):
        ours = model(batch.input_ids, attention_mask=batch.attention_mask)
    ref = _hand_built_logits(model, batch, prompt)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)
    # and the prompt matters: without it the logits at the prediction position differ
    with torch.no_grad():
        plain = model(batch.input_ids, attention_mask=batch.attention_mask)
    rows = torch.arange(len(TEXTS))
    assert (plain[rows, batch.pred_pos] - ours[rows, batch.pred_pos]).abs().max() > 1e-3


@pytest.mark.parametrize("model", CAUSAL, indirect=True)
def test_default_positions_without_batch(model):
    """`applied(model)` without a batch writes the last P positions of a left-padded causal batch."""
    prompt = _prompt(model)
    batch = _batch(model)
    with torch.no_grad():
        with prompt.applied(model):
            ours = model(batch.input_ids, attention_mask=batch.attention_mask)
    ref = _hand_built_logits(model, batch, prompt)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], ref[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_left_and_right_padding_agree(model):
    prompt = _prompt(model)
    v = Verbalizer(model.tokenizer, WORDS)
    with torch.no_grad():
        left = class_logits(model, _batch(model, padding_side="left"), v, prompt)
        right = class_logits(model, _batch(model, padding_side="right"), v, prompt)
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_padding_never_changes_a_prediction(model, padding_side):
    prompt = _prompt(model)
    v = Verbalizer(model.tokenizer, WORDS)
    with torch.no_grad():
        batched = class_logits(model, _batch(model, padding_side=padding_side), v, prompt)
        alone = torch.cat(
            [class_logits(model, _batch(model, [t], padding_side, [y]), v, prompt) for t, y in zip(TEXTS, LABELS)]
        )
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    # the examples really differ, so equality above is not trivial
    assert (alone - alone[0]).abs().max() > 1e-4


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_padding_does_not_change_prompt_activations(model):
    prompt = _prompt(model)
    name = compat.mlp_post_hook(model_spec(model).n_layers - 1)

    def prompt_acts(texts):
        b = _batch(model, texts)
        with torch.no_grad(), prompt.applied(model, b):
            _, cache = model.run_with_cache(
                b.input_ids, attention_mask=b.attention_mask, names_filter=lambda n: n == name
            )
        return cache[name][torch.arange(len(texts))[:, None], b.prompt_positions()]

    batched = prompt_acts(TEXTS)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(batched[i], prompt_acts([text])[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- class_logits
@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_class_logits_equal_full_logits(model):
    prompt = _prompt(model)
    v = Verbalizer(model.tokenizer, WORDS)
    batch = _batch(model)
    with torch.no_grad():
        fast = class_logits(model, batch, v, prompt)
        with prompt.applied(model, batch):
            full = model(batch.input_ids, attention_mask=batch.attention_mask)
    slow = full[torch.arange(len(TEXTS)), batch.pred_pos][:, v.token_ids]
    assert fast.shape == (len(TEXTS), 2)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    b0 = layout_for(model, 0).encode(TEXTS)
    with torch.no_grad():
        zero_shot = class_logits(model, b0, v, None)
        plain = model(b0.input_ids, attention_mask=b0.attention_mask)
    torch.testing.assert_close(
        zero_shot, plain[torch.arange(len(TEXTS)), b0.pred_pos][:, v.token_ids], rtol=1e-5, atol=1e-5
    )


def test_class_logits_extra_hooks_apply(tiny_llama):
    prompt = _prompt(tiny_llama)
    v = Verbalizer(tiny_llama.tokenizer, WORDS)
    batch = _batch(tiny_llama)
    name = compat.mlp_post_hook(2)
    built_in = _hook_counts(tiny_llama)

    def zero(act, hook):
        return torch.zeros_like(act)

    with torch.no_grad():
        base = class_logits(tiny_llama, batch, v, prompt)
        ablated = class_logits(tiny_llama, batch, v, prompt, extra_hooks=[(name, zero)])
        with prompt.applied(tiny_llama, batch), tiny_llama.hooks(fwd_hooks=[(name, zero)]):
            full = tiny_llama(batch.input_ids, attention_mask=batch.attention_mask)
    slow = full[torch.arange(len(TEXTS)), batch.pred_pos][:, v.token_ids]
    torch.testing.assert_close(ablated, slow, rtol=1e-5, atol=1e-5)
    assert (ablated - base).abs().max() > 1e-4
    assert _hook_counts(tiny_llama) == built_in


# --------------------------------------------------------------- hooks never leak
@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_hooks_removed_after_context_and_after_exception(model):
    built_in = _hook_counts(model)  # BERT bridges keep a few hooks of their own
    batch = _batch(model)
    v = Verbalizer(model.tokenizer, WORDS)
    with torch.no_grad():
        before = model(batch.input_ids, attention_mask=batch.attention_mask)
    before_state = {k: t.clone() for k, t in model.state_dict().items()}
    prompt = _prompt(model)
    assert _hook_counts(model) == built_in
    with torch.no_grad(), prompt.applied(model, batch):
        assert _hook_counts(model) != built_in
        model(batch.input_ids, attention_mask=batch.attention_mask)
    assert _hook_counts(model) == built_in
    with pytest.raises(RuntimeError, match="boom"):
        with prompt.applied(model, batch):
            raise RuntimeError("boom")
    assert _hook_counts(model) == built_in

    def fail(act, hook):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        class_logits(model, batch, v, prompt, extra_hooks=[(compat.mlp_post_hook(0), fail)])
    assert _hook_counts(model) == built_in
    with torch.no_grad():
        after = model(batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.equal(before, after)
    after_state = model.state_dict()
    assert before_state.keys() == after_state.keys()
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_gradient_reaches_only_the_prompt(model):
    prompt = _prompt(model)
    v = Verbalizer(model.tokenizer, WORDS)
    batch = _batch(model)
    logits = class_logits(model, batch, v, prompt)
    torch.nn.functional.cross_entropy(logits, batch.labels).backward()
    assert prompt.vectors.grad is not None and prompt.vectors.grad.abs().sum() > 0
    assert torch.isfinite(prompt.vectors.grad).all()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in compat.hf_model_of(model).parameters())
