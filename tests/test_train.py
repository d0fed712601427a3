"""The one trainer (train.py): fine-tuning resumes exactly like prompt tuning, and leaves the model as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import interrupted

from tl_skill import TuneConfig, tune
from tl_skill.tuning import loop as train
from tl_skill.tuning.loop import CHECKPOINT, TrainingError
from tl_skill.variants import FinetuneConfig, bitfit_parameters, copy_model, finetune

CFG = FinetuneConfig(steps=7, lr=5e-2, batch_size=8, eval_every=2, max_input_tokens=24, eval_batch_size=24)


@pytest.fixture(scope="module")
def tiny_task(small_task):
    from tl_skill.data import subsample

    return subsample(small_task, {"train": 64, "dev": 24, "test": 24})


def _bitfit(model):
    tuned = copy_model(model, "bitfit")
    params, _ = bitfit_parameters(tuned)
    return tuned, params


def _values(params):
    return {n: p.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize(
    "where, when",
    [
        ("dev_evaluation", 2),  # inside the second dev evaluation (step 4)
        ("after_optimizer_step", 5),  # between the optimiser step of step 5 and its checkpoint
        ("between_steps", 3),  # at the start of step 3's batch
    ],
)
def test_finetune_resumes_exactly_after_any_interrupt(tiny_gpt2, tiny_task, tmp_path, monkeypatch, where, when):
    full_model, full_params = _bitfit(tiny_gpt2)
    full = finetune(full_model, tiny_task, full_params, CFG, progress=False, out=tmp_path / "full")
    assert not (tmp_path / "full" / CHECKPOINT).exists()  # removed once finished

    if where == "dev_evaluation":
        target, attr = train, "evaluate"
    elif where == "after_optimizer_step":  # the scheduler steps right after the optimiser
        target, attr = torch.optim.lr_scheduler.LambdaLR, "step"
        when += 1  # LambdaLR steps once at construction
    else:
        target, attr = train, "train_batch_indices"
        when += 1  # steps count from 0
    out = tmp_path / "resumed"
    model, params = _bitfit(tiny_gpt2)
    interrupted(monkeypatch, target, attr, when, finetune, model, tiny_task, params, CFG, progress=False, out=out)
    assert (out / CHECKPOINT).exists()
    assert all(not p.requires_grad for p in model.parameters())  # frozen again after the interrupt
    # a fresh copy, as a rerun of the origin study builds it: everything comes from the checkpoint
    model, params = _bitfit(tiny_gpt2)
    resumed = finetune(model, tiny_task, params, CFG, progress=False, out=out)
    assert resumed["history"] == full["history"]
    assert [h["step"] for h in resumed["history"] if "dev_accuracy" in h] == [2, 4, 6, 7]
    assert resumed["best_step"] == full["best_step"] and resumed["dev_accuracy"] == full["dev_accuracy"]
    got, want = _values(params), _values(full_params)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_checkpoint_of_other_parameters_is_refused(tiny_gpt2, tiny_task, tmp_path, monkeypatch):
    model, params = _bitfit(tiny_gpt2)
    real = train.train_batch_indices
    monkeypatch.setattr(
        train,
        "train_batch_indices",
        lambda step, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt) if step == 3 else real(step, *a, **k),
    )
    with pytest.raises(KeyboardInterrupt):
        finetune(model, tiny_task, params, CFG, progress=False, out=tmp_path / "ft")
    monkeypatch.setattr(train, "train_batch_indices", real)
    fewer = dict(list(params.items())[:2])
    with pytest.raises(TrainingError, match="holds other parameters"):
        finetune(model, tiny_task, fewer, CFG, progress=False, out=tmp_path / "ft")


def test_tuning_freezes_a_trainable_model_and_restores_it(tiny_gpt2, small_task, tmp_path):
    """A model whose parameters require grad (a freshly booted bridge) is tuned frozen and given back as it was."""
    cfg = TuneConfig(
        prompt_length=4,
        steps=3,
        eval_every=3,
        batch_size=8,
        max_train_examples=32,
        max_dev_examples=16,
        max_test_examples=16,
        max_input_tokens=24,
    )
    ref = tune(tiny_gpt2, small_task, tmp_path / "frozen", cfg, progress=False, evaluate_test=False)
    before = {n: p.detach().clone() for n, p in tiny_gpt2.named_parameters()}
    flags = {n: p.requires_grad for n, p in tiny_gpt2.named_parameters()}
    try:
        for i, p in enumerate(tiny_gpt2.parameters()):
            p.requires_grad_(i % 2 == 0)  # a mix, to see that each flag comes back
        mixed = {n: p.requires_grad for n, p in tiny_gpt2.named_parameters()}
        run = tune(tiny_gpt2, small_task, tmp_path / "trainable", cfg, progress=False, evaluate_test=False)
        assert {n: p.requires_grad for n, p in tiny_gpt2.named_parameters()} == mixed
        assert all(p.grad is None for p in tiny_gpt2.parameters())
    finally:
        for n, p in tiny_gpt2.named_parameters():
            p.requires_grad_(flags[n])
    assert all(torch.equal(p, before[n]) for n, p in tiny_gpt2.named_parameters())  # weights untouched
    assert torch.equal(run.prompt.vectors, ref.prompt.vectors)  # and the same prompt as a frozen model gives


def test_a_freshly_booted_bridge_is_tuned_and_given_back_unchanged(small_task, tmp_path):
    """A TransformerBridge the user booted (parameters require grad) works without load_model."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from tl_skill import compat
    from tl_skill.data import subsample
    from tl_skill.find import find_skill_neurons
    from tl_skill.models import tiny_tokenizer_dir

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=4096,
            n_positions=128,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_inner=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            attn_implementation="eager",
        )
    )
    bridge = compat.build_bridge(hf, AutoTokenizer.from_pretrained(tiny_tokenizer_dir()), "gpt2", device="cpu")
    assert all(p.requires_grad for p in bridge.parameters())
    before = {n: p.detach().clone() for n, p in bridge.named_parameters()}
    task = subsample(small_task, {"train": 48, "dev": 24, "test": 24})
    run = tune(
        bridge,
        task,
        tmp_path / "run",
        TuneConfig(
            prompt_length=4, steps=2, eval_every=2, max_train_examples=48, max_dev_examples=24, max_test_examples=24
        ),
        progress=False,
    )
    sn = find_skill_neurons(bridge, [run], max_train_examples=48, max_eval_examples=24, progress=False)
    assert sn.model == run.model_name and sn.predictivity.shape == (2, 128)
    from tl_skill import evaluate
    from tl_skill.perturb import Perturbation

    v = run.verbalizer(bridge)
    clean = evaluate(bridge, run.load_task(), "test", v, run.prompt)
    pert = Perturbation(bridge, torch.ones(2, 128, dtype=torch.bool), "zero")  # every neuron: the task breaks
    broken = evaluate(bridge, run.load_task(), "test", v, run.prompt, extra_hooks=pert.fwd_hooks())
    assert (np.asarray(clean["predictions"]) != np.asarray(broken["predictions"])).any()
    assert all(p.requires_grad for p in bridge.parameters())
    assert all(torch.equal(p, before[n]) for n, p in bridge.named_parameters())
    assert not hasattr(bridge, "_tl_skill_spec")  # nothing of tl_skill's left on the user's model
    # the bridge is in training mode (dropout): tl_skill says so, and its probes ran without dropout
    assert "training_mode" in compat.model_notices(bridge) and bridge.training
    assert "training_mode" in json.loads((run.path / "run.json").read_text())["notices"]
