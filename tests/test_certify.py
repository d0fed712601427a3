"""Certification: the neuron hook is the input of the MLP's output projection, on every family of the matrix;
a wrong hook fails its check and is refused; the docs' matrix is what a fresh certification gives."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tl_skill import compat, load_model, load_task
from tl_skill.basis import allow_uncertified, forget, neuron_basis
from tl_skill.certification import CHECKS, certify
from tl_skill.cli.main import main
from tl_skill.data.tasks import subsample
from tl_skill.errors import NeuronsError, PruneError, RunError
from tl_skill.find import find_skill_neurons
from tl_skill.models import TINY_MODELS, model_spec
from tl_skill.tuning import TuneConfig, tune

ROOT = Path(__file__).resolve().parents[1]
MOE = {"tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe"}
CFG = TuneConfig(prompt_length=2, steps=2, eval_every=2, batch_size=8, eval_batch_size=12)


def _doc_matrix() -> dict[str, list[str]]:
    text = (ROOT / "docs" / "architectures.md").read_text()
    body = text.split("<!-- matrix -->", 1)[1].split("<!-- /matrix -->", 1)[0]
    rows = {}
    for line in body.splitlines():
        m = re.match(r"\| `([^`]+)` \| [^|]+ \|(.*)\|", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")][: len(CHECKS)]
    return rows


def test_the_matrix_covers_twenty_families_and_mixture_of_experts():
    rows = _doc_matrix()
    assert set(rows) == set(TINY_MODELS) and len(TINY_MODELS) - len(MOE) >= 20
    assert set(rows) >= MOE


@pytest.mark.parametrize("name", TINY_MODELS)
def test_certification_matches_the_documented_matrix(name):
    cert = certify(load_model(name))
    mark = {True: "✓", False: "✗", None: "n/a"}
    assert [mark[c.passed] for c in cert.checks] == _doc_matrix()[name], cert.table()
    assert [c.name for c in cert.checks] == list(CHECKS)
    # every dense family passes; mixture of experts fails the neuron basis, and says why
    assert cert.passed == (name not in MOE), cert.table()
    if name in MOE:
        assert "mixture-of-experts" in next(c.detail for c in cert.checks if c.name == "hook_fires")


def _swap(model, name: str, other: str) -> None:
    """Put another hook point under `name` (the bridge's registry, or a HookedTransformer's dicts)."""
    if compat.is_bridge(model):  # the name and every alias of its hook point (the bridge resolves aliases)
        registry = model._hook_registry
        target, replacement = model.hook_dict[name], model.hook_dict[other]
        for key in [k for k, v in registry.items() if v is target] + [name]:
            registry[key] = replacement
    else:
        model.hook_dict[name] = model.hook_dict[other]
        model.mod_dict[name] = model.mod_dict[other]


@pytest.mark.parametrize(
    "other, failed",
    [("blocks.0.mlp.hook_pre", "equals_projection_input"), ("blocks.0.hook_resid_mid", "hook_fires")],
)
def test_a_wrong_hook_fails_its_check_and_is_refused(other, failed, tmp_path):
    model = load_model("tiny-llama")
    assert certify(model).passed
    _swap(model, "blocks.0.mlp.hook_post", other)
    forget(model)
    cert = certify(model)
    bad = [c for c in cert.checks if c.passed is False]
    assert bad[0].name == failed and 0 in bad[0].failed_layers, cert.table()
    task = subsample(load_task("rotten_tomatoes"), {"train": 24, "dev": 12, "test": 12})
    with pytest.raises(RunError, match=f"prompt tuning refused: .* fails the neuron-basis check '{failed}'"):
        tune(model, task, tmp_path / "run", CFG, progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written
    allow_uncertified(model)
    run = tune(model, task, tmp_path / "run", CFG, progress=False)  # the user's choice, and it is said
    assert "uncertified" in compat.model_notices(model)
    assert run.metrics["dev_accuracy"] is not None


def test_refusals_name_the_check_in_find_and_prune(tmp_path):
    good = load_model("tiny-llama")
    task = subsample(load_task("rotten_tomatoes"), {"train": 24, "dev": 12, "test": 12})
    run = tune(good, task, tmp_path / "run", CFG, progress=False)
    sn = find_skill_neurons(good, [run], max_train_examples=24, max_eval_examples=12, progress=False)
    bad = load_model("tiny-llama")
    _swap(bad, "blocks.1.mlp.hook_post", "blocks.1.mlp.hook_pre")
    with pytest.raises(NeuronsError, match="reading MLP neurons refused: .*'equals_projection_input'"):
        find_skill_neurons(bad, [run], max_train_examples=24, max_eval_examples=12, progress=False)
    from tl_skill.prune import prune_model

    with pytest.raises(PruneError, match="pruning refused"):
        prune_model(bad, sn, keep=0.5)


def test_certify_leaves_the_model_and_its_hooks_alone():
    model = load_model("tiny-gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heard = []
    model.add_hook("blocks.0.mlp.hook_post", lambda x, hook: heard.append(1))
    try:
        forget(model)
        assert certify(model).passed
        assert heard == []  # the probes ran with everyone's hooks paused
        model(torch.tensor([[5, 6, 7]]))
        assert heard == [1]  # and the user's hook is back
    finally:
        model.reset_hooks()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not compat.has_forward_hooks(model)


def test_facts_come_from_the_module_not_the_config():
    opt = load_model("tiny-opt")
    assert model_spec(opt).d_mlp == 160  # TransformerLens 4.3 says 4 x d_model for OPT
    assert compat.mlp_output_projection(opt, 0)[0] == "fc2"
    # a parallel attention/MLP block cannot continue a cache: the full pass is used
    assert not compat.prefix_cache_supported(load_model("tiny-gpt-neox"))
    assert compat.prefix_cache_supported(load_model("tiny-llama"))


def test_cli_certify(capsys):
    assert main(["certify", "tiny-qwen2", "-q"]) == 0
    out = capsys.readouterr().out
    assert "equals_projection_input  pass" in out and out.rstrip().endswith("certified")
    assert main(["certify", "tiny-mixtral", "-q"]) == 2
    captured = capsys.readouterr()
    assert "hook_fires               FAIL" in captured.out
    assert "tiny-mixtral is not certified: check(s) hook_fires failed" in captured.err


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in TINY_MODELS if n not in MOE])
def test_every_certified_family_runs_end_to_end(name, tmp_path):
    from tl_skill.experiments.ablation import ablation_experiment
    from tl_skill.prune import prune_model, pruning_of

    model = load_model(name)
    task = subsample(load_task("rotten_tomatoes"), {"train": 16, "dev": 8, "test": 8})
    run = tune(model, task, tmp_path / "run", CFG, progress=False, evaluate_test=False)
    sn = find_skill_neurons(model, [run], max_train_examples=16, max_eval_examples=8, progress=False)
    abl = ablation_experiment(model, run, sn, None, fractions=[0.1], seeds=1, progress=False)
    assert abl.rows[0]["skill_accuracy"] is not None
    pruned = prune_model(model, sn, keep=0.5)
    kept = pruning_of(pruned)
    assert kept is not None and all(len(v) == sn.d_mlp // 2 for v in kept.kept.values())


def test_mixture_of_experts_tunes_but_has_no_neurons(tmp_path):
    model = load_model("tiny-mixtral")
    task = subsample(load_task("rotten_tomatoes"), {"train": 16, "dev": 8, "test": 8})
    run = tune(model, task, tmp_path / "run", CFG, progress=False, evaluate_test=False)
    with pytest.raises(NeuronsError, match="mixture-of-experts"):
        find_skill_neurons(model, [run], progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_the_bundled_models_are_certified(name):
    cert = certify(load_model(name))
    assert cert.passed, cert.table()
    assert all(c.passed is True for c in cert.checks if c.name in neuron_basis.__globals__["BASIS_CHECKS"])
