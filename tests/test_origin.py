"""Where skill neurons come from (method §9): random-weights control, LoRA, BitFit, label words."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import tl_skill.find
import tl_skill.tuning.loop
from tl_skill import TuneConfig, compat, model_spec, variants
from tl_skill.data import subsample
from tl_skill.experiments import origin
from tl_skill.experiments.ablation import verdict
from tl_skill.experiments.comparisons import ComparisonError
from tl_skill.experiments.origin import ORIGIN_JSON, PARTS, OriginError, compare_predictivity, origin_study
from tl_skill.files import OutputDirError
from tl_skill.perturb import Perturbation
from tl_skill.tuning.loop import TrainingError
from tl_skill.tuning.prompt import Verbalizer
from tl_skill.tuning.runs import evaluate
from tl_skill.variants import (
    BITFIT_BIASES,
    BITFIT_NORMS,
    FinetuneConfig,
    VariantError,
    add_lora,
    bitfit_parameters,
    clean_hf_copy,
    copy_model,
    finetune,
    random_weights_model,
)
from tl_skill.viz.plots import plot_origin_figures


@pytest.fixture(scope="module")
def tiny_task(small_task):
    return subsample(small_task, {"train": 32, "dev": 16, "test": 16})


def _batch(model, texts=("a fine film", "dull and far too long, with nothing to say")):
    from tl_skill.tuning.prompt import layout_for

    return layout_for(model, 0).encode(list(texts))


def _logits(model, batch):
    with torch.no_grad():
        return compat.forward(model, batch.input_ids, batch.attention_mask)


def _hf_logits(hf, batch):
    """Logits of a plain HF model; positions count real tokens only, as the bridge does with left padding."""
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions).logits


def _raw(model) -> dict[str, torch.Tensor]:
    """Every parameter under its raw module path, cloned (the slow, obvious view)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _raw_mlp(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in _raw(model).items() if ".mlp." in n}


# ----------------------------------------------------------------------------- copies
def test_clean_copy_is_plain_and_computes_the_same(tiny_gpt2):
    clean = clean_hf_copy(tiny_gpt2)
    assert not any("_original_component" in n for n, _ in clean.named_modules())
    assert not any(p.requires_grad for p in clean.parameters())
    batch = _batch(tiny_gpt2)
    ref = _hf_logits(clean, batch)
    torch.testing.assert_close(_logits(tiny_gpt2, batch), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_random_weights_control(name, tiny_gpt2, tiny_llama):
    model = {"tiny-gpt2": tiny_gpt2, "tiny-llama": tiny_llama}[name]
    src_before = {n: t.clone() for n, t in model.state_dict().items()}
    rand = random_weights_model(model, seed=1)
    src, got = model.state_dict(), rand.state_dict()
    assert set(got) == set(src)
    assert all(got[n].shape == src[n].shape and got[n].dtype == src[n].dtype for n in src)
    assert rand.tokenizer is model.tokenizer
    matrices = [n for n in src if src[n].ndim == 2]
    assert matrices and all(not torch.equal(got[n], src[n]) for n in matrices)
    spec, rspec = model_spec(model), model_spec(rand)
    assert rspec.name == f"{spec.name}-random"
    assert {**rspec.to_dict(), "name": None} == {**spec.to_dict(), "name": None}
    assert not any(p.requires_grad for p in rand.parameters())
    assert all(torch.equal(model.state_dict()[n], t) for n, t in src_before.items())  # source untouched
    again = random_weights_model(model, seed=1).state_dict()
    other = random_weights_model(model, seed=2).state_dict()
    assert all(torch.equal(again[n], got[n]) for n in got)
    assert not torch.equal(other[matrices[0]], got[matrices[0]])
    hooked = []
    with rand.hooks(fwd_hooks=[(compat.mlp_post_hook(0), lambda a, hook: hooked.append(a.shape))]):
        _logits(rand, _batch(rand))
    assert hooked and hooked[0][-1] == spec.d_mlp


def test_random_control_refuses_the_sources_own_initialisation(tiny_gpt2):
    # The tiny models are themselves random initialisations with seed 0.
    with pytest.raises(VariantError, match="choose another seed"):
        random_weights_model(tiny_gpt2, seed=0)


# ----------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_lora_trains_only_attention_adapters(name, tiny_gpt2, tiny_llama, tiny_task):
    model = {"tiny-gpt2": tiny_gpt2, "tiny-llama": tiny_llama}[name]
    tuned = copy_model(model, "lora")
    params = add_lora(tuned, rank=4, alpha=8, seed=0)
    n_layers = model_spec(model).n_layers
    assert params and all(re.fullmatch(r"blocks\.\d+\.attn\..+\.lora_[AB]\.default\.weight", n) for n in params)
    assert {int(n.split(".")[1]) for n in params} == set(range(n_layers))
    assert len(params) == n_layers * 4 * 2  # q, k, v, o; A and B
    batch = _batch(model)
    torch.testing.assert_close(_logits(tuned, batch), _logits(model, batch))  # B = 0 at the start
    before = _raw(tuned)
    info = finetune(
        tuned, tiny_task, params, FinetuneConfig(steps=4, lr=5e-2, batch_size=8, eval_every=2), progress=False
    )
    after = _raw(tuned)
    lora_ids = {id(p) for p in params.values()}
    raw_lora = {n for n, p in tuned.named_parameters() if id(p) in lora_ids}
    assert all(".lora_" in n for n in raw_lora) and len(raw_lora) == len(params)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= raw_lora
    assert any(".lora_B." in n for n in changed)
    assert _raw_mlp(tuned).keys() == _raw_mlp(model).keys()
    assert all(torch.equal(_raw_mlp(tuned)[n], p) for n, p in _raw_mlp(model).items())
    assert variants.mlp_unchanged(tuned, model)
    assert not any(p.requires_grad for p in tuned.parameters())
    assert info["n_trainable_parameters"] == sum(p.numel() for p in params.values())
    assert not torch.equal(_logits(tuned, batch), _logits(model, batch))
    fired = []
    with tuned.hooks(fwd_hooks=[(compat.mlp_post_hook(n_layers - 1), lambda a, hook: fired.append(1))]):
        _logits(tuned, batch)
    assert fired


def _set_lora_b(params, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in params.items():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_lora_bridge_matches_peft_on_plain_llama(tiny_llama):
    from peft import LoraConfig, inject_adapter_in_model

    tuned = copy_model(tiny_llama, "lora")
    params = add_lora(tuned, rank=4, alpha=8, seed=0)
    _set_lora_b(params)
    ref = clean_hf_copy(tiny_llama)
    inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), ref
    )
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in params.items():
            l, rest = re.fullmatch(r"blocks\.(\d+)\.attn\.(.+)", n).groups()
            ref_params[f"model.layers.{l}.self_attn.{rest}"].copy_(p)
    batch = _batch(tiny_llama)
    want = _hf_logits(ref, batch)
    torch.testing.assert_close(_logits(tuned, batch), want, atol=1e-4, rtol=1e-4)


def test_lora_bridge_matches_manual_lora_on_gpt2(tiny_gpt2):
    """GPT-2's bridge splits c_attn into q/k/v: the reference adds each adapter to its slice by hand."""
    tuned = copy_model(tiny_gpt2, "lora")
    rank, alpha = 4, 8
    params = add_lora(tuned, rank=rank, alpha=alpha, seed=0)
    _set_lora_b(params)
    scale = alpha / rank
    ref = clean_hf_copy(tiny_gpt2)

    def delta(l, proj, x):
        a = params[f"blocks.{l}.attn.{proj}.lora_A.default.weight"]
        b = params[f"blocks.{l}.attn.{proj}.lora_B.default.weight"]
        return scale * (x @ a.T) @ b.T

    handles = []
    for l, block in enumerate(ref.transformer.h):

        def qkv_hook(mod, inputs, output, l=l):
            x = inputs[0]
            return output + torch.cat([delta(l, "q", x), delta(l, "k", x), delta(l, "v", x)], -1)

        def o_hook(mod, inputs, output, l=l):
            return output + delta(l, "o", inputs[0])

        handles += [block.attn.c_attn.register_forward_hook(qkv_hook), block.attn.c_proj.register_forward_hook(o_hook)]
    batch = _batch(tiny_gpt2)
    try:
        want = _hf_logits(ref, batch)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(_logits(tuned, batch), want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- BitFit
def test_bitfit_trains_only_biases_outside_the_mlp(tiny_gpt2, tiny_task):
    tuned = copy_model(tiny_gpt2, "bitfit")
    params, label = bitfit_parameters(tuned)
    assert label == BITFIT_BIASES
    assert params and all(n.endswith(".bias") and ".mlp." not in n for n in params)
    assert any(".attn." in n for n in params) and any(".ln1." in n for n in params)
    before = _raw(tuned)
    cfg = FinetuneConfig(steps=6, lr=5e-2, batch_size=8, eval_every=3)
    info = finetune(tuned, tiny_task, params, cfg, progress=False)
    after = _raw(tuned)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.endswith(".bias") and ".mlp." not in n for n in changed)
    assert all(torch.equal(_raw_mlp(tuned)[n], p) for n, p in _raw_mlp(tiny_gpt2).items())
    assert variants.mlp_unchanged(tuned, tiny_gpt2)
    verbalizer = Verbalizer(tuned.tokenizer, tiny_task.spec.label_words)
    dev = evaluate(tuned, tiny_task, "dev", verbalizer, None)["accuracy"]
    assert dev == info["dev_accuracy"] == max(h["dev_accuracy"] for h in info["history"] if "dev_accuracy" in h)


def test_finetune_keeps_the_best_dev_parameters(tiny_gpt2, tiny_task, monkeypatch):
    tuned = copy_model(tiny_gpt2, "bitfit")
    params, _ = bitfit_parameters(tuned)
    scores, seen = iter([0.6, 0.9, 0.3]), []

    def scripted_dev(*a, **k):
        seen.append({n: p.detach().clone() for n, p in params.items()})
        return {"accuracy": next(scores)}

    monkeypatch.setattr(tl_skill.tuning.loop, "evaluate", scripted_dev)
    info = finetune(
        tuned, tiny_task, params, FinetuneConfig(steps=6, lr=5e-2, batch_size=8, eval_every=2), progress=False
    )
    assert len(seen) == 3 and info["best_step"] == 4 and info["dev_accuracy"] == 0.9
    assert all(torch.equal(p, seen[1][n]) for n, p in params.items())
    assert not all(torch.equal(p, seen[2][n]) for n, p in params.items())


def test_bitfit_on_llama_falls_back_to_norm_weights(tiny_llama, tiny_task):
    hf = compat.hf_model_of(tiny_llama)
    assert not any(n.endswith("bias") for n, _ in hf.named_parameters())  # why the fallback exists
    tuned = copy_model(tiny_llama, "bitfit")
    params, label = bitfit_parameters(tuned)
    assert label == BITFIT_NORMS and "normalisation" in label
    n_layers = model_spec(tiny_llama).n_layers
    assert sorted(params) == sorted(
        [f"blocks.{l}.{ln}.weight" for l in range(n_layers) for ln in ("ln1", "ln2")] + ["ln_final.weight"]
    )
    before = _raw(tuned)
    finetune(tuned, tiny_task, params, FinetuneConfig(steps=4, lr=5e-2, batch_size=8, eval_every=2), progress=False)
    after = _raw(tuned)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(re.search(r"(layernorm|norm)\.", n) for n in changed)
    assert all(torch.equal(_raw_mlp(tuned)[n], p) for n, p in _raw_mlp(tiny_llama).items())


def test_finetune_refuses_foreign_or_no_parameters(tiny_gpt2, tiny_task):
    with pytest.raises(TrainingError, match="no parameters"):
        finetune(tiny_gpt2, tiny_task, {}, progress=False)
    stranger = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TrainingError, match="belong neither to the model"):
        finetune(tiny_gpt2, tiny_task, {"x": stranger}, progress=False)
    with pytest.raises(VariantError, match=r"invalid fine-tuning setting\(s\): steps=0, batch_size=0"):
        FinetuneConfig(steps=0, batch_size=0)


# ----------------------------------------------------------------------------- comparisons
def test_compare_predictivity_against_hand_and_scipy():
    a = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.5, 0.6, 0.7, 0.1]])
    b = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.5, 0.6, 0.7, 0.1]])
    got = compare_predictivity(a, b, fraction=0.5)  # top 2 per layer
    # layer 0: {0, 1} vs {0, 2}; layer 1: {2, 1} vs {2, 1} -> 3 of 4 shared
    assert got["top_per_layer"] == 2 and got["top_overlap"] == pytest.approx(0.75)
    assert got["chance_overlap"] == pytest.approx(0.5)
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = torch.tensor(np.round(rng.random((3, 50)), 1))  # many ties
    y = x + torch.tensor(rng.normal(0, 0.2, (3, 50)))
    want = stats.spearmanr(x.reshape(-1).numpy(), y.reshape(-1).numpy()).statistic
    assert compare_predictivity(x, y)["spearman"] == pytest.approx(want, abs=1e-12)
    with pytest.raises(ComparisonError, match="shapes"):
        compare_predictivity(x, y[:2])


# ----------------------------------------------------------------------------- the study
def test_origin_study_validates_before_work(tmp_path):
    with pytest.raises(OriginError, match="unknown part"):
        origin_study("tiny-gpt2", "rotten_tomatoes", tmp_path, parts=["lora", "adapters"])
    with pytest.raises(OriginError, match="fractions"):
        origin_study("tiny-gpt2", "rotten_tomatoes", tmp_path, fractions=[0.0])
    with pytest.raises(OriginError, match="prompt_steps"):
        origin_study("tiny-gpt2", "rotten_tomatoes", tmp_path, prompt_steps=0)
    with pytest.raises(OriginError, match="task's own"):
        origin_study(
            "tiny-gpt2", "rotten_tomatoes", tmp_path, parts=["label_words"], alt_label_words="Negative,positive"
        )
    assert not (tmp_path / ORIGIN_JSON).exists()


STUDY = dict(
    tune_config=TuneConfig(
        prompt_length=4, steps=6, eval_every=3, max_train_examples=96, max_dev_examples=40, max_test_examples=40
    ),
    steps=6,
    eval_every=3,
    fractions=(0.05, 0.2),
    seeds=1,
    find_train_examples=96,
    find_eval_examples=40,
    prompt_steps=4,
    progress=False,
)


def test_origin_study_end_to_end_and_resume(tiny_gpt2, tmp_path, monkeypatch):
    out = tmp_path / "origin"
    res = origin_study("tiny-gpt2", "rotten_tomatoes", out, model=tiny_gpt2, **STUDY)
    plot_origin_figures(res, out)  # the view draws each section's figure
    saved = json.loads((out / ORIGIN_JSON).read_text())
    assert saved["status"] == "done" and res["status"] == "done"
    for part in PARTS:
        sec = saved[part]
        assert sec["status"] == "done" and isinstance(sec["claim_holds"], bool)
        assert isinstance(sec["statement"], str) and len(sec["statement"]) > 20 and "\n" not in sec["statement"]
        assert (out / sec["figure"]).is_file()
    rw = saved["random_weights"]
    for side in ("pretrained", "random"):
        assert 0.5 <= rw[side]["top_mean_predictivity"] <= rw[side]["best_predictivity"] <= 1
    assert rw["claim_holds"] == (rw["best_gap"] > 0 and rw["top_mean_gap"] > 0)
    rw_run = json.loads((out / "random_weights" / "run" / "run.json").read_text())
    assert rw_run["model"] == "tiny-gpt2-random"
    # the extra prompts: the source run's config but `prompt_steps` steps, tested on the study's test cap
    source_cfg = json.loads((out / "prompt" / "run.json").read_text())["config"]
    assert rw_run["config"] == {**source_cfg, "steps": 4, "eval_every": 3, "max_test_examples": 40}
    assert len(rw_run["history"]) == 4 and saved["settings"]["prompt_steps"] == 4
    for part in ("lora", "bitfit"):
        sec = saved[part]
        assert sec["mlp_weights_unchanged"] is True
        assert [r["fraction"] for r in sec["rows"]] == [0.05, 0.2]
        assert all(r["skill_accuracy"] is not None and r["random_accuracy"] is not None for r in sec["rows"])
        assert len(sec["evaluations"]) == 1 + 2 * 2
    assert saved["bitfit"]["trained"] == BITFIT_BIASES and saved["bitfit"]["fallback"] is False
    for part in ("lora", "bitfit"):  # the one verdict rule of the ablation experiment, on the saved rows
        sec = saved[part]
        want = verdict(sec["rows"], sec["majority_accuracy"])
        assert sec["verdict"] == want.status and sec["claim_holds"] == want.holds
        assert want.sentence in sec["statement"]
        assert all(r["paired"] is not None for r in sec["rows"])
    lw = saved["label_words"]
    assert lw["alternative"] == [" bad", " good"] and lw["original"] == [" negative", " positive"]
    assert -1 <= lw["spearman"] <= 1 and 0 <= lw["top_overlap"] <= 1
    lw_run = json.loads((out / "label_words" / "run" / "run.json").read_text())
    assert lw_run["label_words"] == [" bad", " good"] and lw_run["config"] == rw_run["config"]

    # The saved LoRA weights reproduce the reported accuracies.
    tuned = copy_model(tiny_gpt2, "lora")
    params = add_lora(tuned, seed=0)
    variants.load_trained(params, out / "lora" / variants.TRAINED_FILE)
    from tl_skill.data.sources import load_task
    from tl_skill.neurons import SkillNeurons

    sn = SkillNeurons.load(out / "neurons")
    cfg = STUDY["tune_config"]
    data = subsample(
        load_task("rotten_tomatoes"),
        {"train": cfg.max_train_examples, "dev": cfg.max_dev_examples, "test": cfg.max_test_examples},
        seed=cfg.task_seed,
    )
    verbalizer = Verbalizer(tuned.tokenizer, data.spec.label_words)
    kw = dict(max_input_tokens=cfg.max_input_tokens)
    assert evaluate(tuned, data, "test", verbalizer, None, **kw)["accuracy"] == saved["lora"]["clean_accuracy"]
    pert = Perturbation(tuned, sn.select(fraction=0.2), "noise", std=0.1, seed=0, skill=sn)
    skill = evaluate(tuned, data, "test", verbalizer, None, extra_hooks=pert.fwd_hooks(), **kw)["accuracy"]
    assert skill == saved["lora"]["rows"][1]["skill_accuracy"]

    # An existing run and its neurons are reused as they are (and refused for another model).
    reuse = {k: v for k, v in STUDY.items() if k != "tune_config"}
    reuse.update(model=tiny_gpt2, run_dir=out / "prompt", neurons_dir=out / "neurons")
    other = origin_study("tiny-gpt2", None, tmp_path / "reuse", parts=["label_words"], **reuse)
    assert other["status"] == "partial" and list(other.parts()) == ["label_words"]
    assert other["source"]["run"] == str(out / "prompt") and not (tmp_path / "reuse" / "prompt").exists()
    assert other["label_words"]["spearman"] == saved["label_words"]["spearman"]
    # Another part asked for later in the same directory is added beside the finished one (the parts not
    # asked for the first time were saved as null).
    assert json.loads((tmp_path / "reuse" / ORIGIN_JSON).read_text())["random_weights"] is None
    more = origin_study("tiny-gpt2", None, tmp_path / "reuse", parts=["random_weights"], **reuse)
    assert list(more.parts()) == ["random_weights", "label_words"] and more["status"] == "partial"
    assert more["label_words"] == other["label_words"]
    assert more["random_weights"]["random"] == saved["random_weights"]["random"]  # seeded: the same control
    with pytest.raises(OriginError, match="tuned on"):
        origin_study("tiny-llama", None, tmp_path / "x", run_dir=out / "prompt")

    # A rerun skips every finished part (the source prompt is only read back) ...
    real_tune, real_runner = origin.tune, origin.run_conditions

    def tune_finished_only(model, task, run_dir, *a, **k):
        assert json.loads((run_dir / "run.json").read_text())["status"] == "done", "a prompt was re-tuned"
        return real_tune(model, task, run_dir, *a, **k)

    def boom(*a, **k):
        raise AssertionError("a finished part was redone")

    monkeypatch.setattr(origin, "tune", tune_finished_only)
    for fn in ("finetune", "run_conditions", "random_weights_model"):
        monkeypatch.setattr(origin, fn, boom)
    monkeypatch.setattr(tl_skill.find, "find_skill_neurons", boom)  # reached through load_or_find
    again = origin_study("tiny-gpt2", "rotten_tomatoes", out, model=tiny_gpt2, **STUDY)
    assert {p: again[p] for p in PARTS} == {p: saved[p] for p in PARTS}
    # ... and redoes only an unfinished one.
    partial = {k: v for k, v in saved.items() if k != "bitfit"}
    (out / ORIGIN_JSON).write_text(json.dumps(partial))
    (out / "bitfit" / variants.TRAINED_FILE).unlink()
    calls = []
    monkeypatch.setattr(origin, "finetune", lambda *a, **k: calls.append(1) or finetune(*a, **k))
    monkeypatch.setattr(origin, "run_conditions", real_runner)
    redo = origin_study("tiny-gpt2", "rotten_tomatoes", out, model=tiny_gpt2, **STUDY)
    assert calls == [1] and redo["bitfit"]["status"] == "done"
    assert redo["bitfit"]["rows"] == saved["bitfit"]["rows"]  # deterministic training and noise
    assert {p: redo[p] for p in PARTS if p != "bitfit"} == {p: saved[p] for p in PARTS if p != "bitfit"}
    with pytest.raises(OutputDirError, match=r"other settings: steps \(6 there, 7 here\)"):
        origin_study("tiny-gpt2", "rotten_tomatoes", out, model=tiny_gpt2, **{**STUDY, "steps": 7})


def test_cli_origin_passes_its_options(monkeypatch, tmp_path, capsys):
    from tl_skill.cli import main

    seen = []

    def fake(model, task, out, **kw):
        seen.append((model, task, str(out), kw))
        return origin.OriginResult(
            model=model,
            task=task,
            status="partial",
            settings={},
            source={},
            random_weights={"claim_holds": True, "statement": "stated"},
        )

    import tl_skill.cli.experiments

    monkeypatch.setattr(tl_skill.cli.experiments, "origin_study", fake)
    main(["origin", "--model", "tiny-gpt2", "--out", str(tmp_path), "-q"])
    model, task, out, kw = seen[-1]
    assert (model, task, out) == ("tiny-gpt2", "rotten_tomatoes", str(tmp_path))
    # the defaults that keep the SmolLM2 study within an hour
    assert kw["prompt_steps"] == 150 and kw["max_test_examples"] == 300 and kw["steps"] == 200
    assert kw["fractions"] == (0.01, 0.05, 0.1, 0.2) and kw["seeds"] == 2
    assert "random_weights  holds: stated" in capsys.readouterr().out
    main(
        [
            "origin",
            "--model",
            "tiny-gpt2",
            "--out",
            str(tmp_path),
            "--prompt-steps",
            "0",
            "--max-test-examples",
            "0",
            "--parts",
            "lora,bitfit",
            "--alt-label-words",
            "bad,good",
            "-q",
        ]
    )
    kw = seen[-1][3]
    assert kw["prompt_steps"] is None and kw["max_test_examples"] is None  # 0: the source run's
    assert kw["parts"] == ("lora", "bitfit") and kw["alt_label_words"] == ["bad", "good"]
