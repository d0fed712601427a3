"""Transfer indicators and the multi-task study (method §8)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tl_skill import indicators as tr
from tl_skill.experiments import transfer as xt
from tl_skill.indicators import TransferError
from tl_skill.neurons import SkillNeurons, Subtask
from tl_skill.tuning.prompt import SoftPrompt
from tl_skill.viz.plots import plot_transfer_figures


def make_neurons(pred: list[list[float]], model: str = "tiny-gpt2", task: str = "t") -> SkillNeurons:
    """SkillNeurons whose predictivity is exactly `pred` [L, D] (one run, subtask and position)."""
    acc = torch.tensor(pred, dtype=torch.float64)[None, None, :, None, :]  # [R, S, L, T, D]
    L, D = acc.shape[2], acc.shape[4]
    return SkillNeurons(
        model=model,
        task=task,
        runs=[],
        label_names=["neg", "pos"],
        label_words=[" neg", " pos"],
        subtasks=[Subtask("pos vs neg", (1,), (0,))],
        layers=list(range(L)),
        positions="prompt",
        accuracy=acc,
        baseline=torch.zeros(1, L, 1, D, dtype=torch.float64),
        std=torch.ones(1, L, 1, D),
        constant=torch.zeros(1, L, 1, D, dtype=torch.bool),
    )


PA = [[0.5, 0.6, 0.9], [0.7, 0.8, 0.55]]
PB = [[0.55, 0.6, 0.8], [0.9, 0.7, 0.5]]


# ------------------------------------------------------------------ statistics
def test_rankdata_gives_average_ranks_to_ties():
    assert tr.rankdata([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert tr.rankdata([5, 5, 5]).tolist() == [2.0, 2.0, 2.0]
    from scipy.stats import rankdata as scipy_rankdata

    x = np.random.default_rng(0).integers(0, 15, size=300).astype(float)  # many ties
    assert tr.rankdata(x).tolist() == scipy_rankdata(x).tolist()


def test_spearman_and_kendall_hand_computed_with_ties():
    x, y = [1, 2, 2, 3], [1, 3, 2, 4]
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]: sum dxdy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5
    assert tr.spearman(x, y) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    # 5 concordant, 0 discordant, one pair tied in x: tau_b = 5 / sqrt(5 * 6)
    assert tr.kendall(x, y) == pytest.approx(5 / math.sqrt(30))
    assert tr.spearman(x, [-v for v in y]) == pytest.approx(-4.5 / math.sqrt(22.5))
    assert tr.kendall(x, [-v for v in y]) == pytest.approx(-5 / math.sqrt(30))
    # ties on both sides: 4 concordant, 0 discordant, one tie in each: 4 / sqrt(5 * 5)
    assert tr.kendall([1, 1, 2, 3], [1, 2, 2, 3]) == pytest.approx(0.8)
    assert math.isnan(tr.spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(tr.kendall([1, 1, 1], [1, 2, 3]))


def test_rank_correlations_match_scipy_on_tied_data():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.RandomState(0)
    for _ in range(5):
        x, y = rng.randint(0, 4, 15), rng.randint(0, 5, 15)
        assert tr.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
        assert tr.kendall(x, y) == pytest.approx(stats.kendalltau(x, y)[0], abs=1e-12)


def test_cosine_and_jaccard_hand_computed():
    assert tr.cosine([1, 2, 2], [2, 0, 1]) == pytest.approx(4 / (3 * math.sqrt(5)))
    assert tr.jaccard([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(1 / 3)
    assert math.isnan(tr.jaccard([0, 0], [0, 0]))
    assert math.isnan(tr.cosine([0, 0], [1, 2]))


# ------------------------------------------------------------------ indicators
def test_neuron_similarity_hand_computed():
    a, b = make_neurons(PA, task="a"), make_neurons(PB, task="b")
    got = tr.neuron_similarity(a, b, top_k=1)
    # ranks a = [1,3,6,4,5,2], b = [2,3,5,6,4,1]: sum d^2 = 8, rho = 1 - 6*8 / (6*35)
    assert got["neuron_spearman"] == pytest.approx(1 - 48 / 210)
    fa, fb = sum(PA, []), sum(PB, [])
    dot = sum(u * v for u, v in zip(fa, fb))
    assert got["neuron_cosine"] == pytest.approx(dot / math.sqrt(sum(u * u for u in fa) * sum(v * v for v in fb)))
    ca, cb = [u - 0.5 for u in fa], [v - 0.5 for v in fb]
    dot = sum(u * v for u, v in zip(ca, cb))
    assert got["neuron_cosine_centered"] == pytest.approx(
        dot / math.sqrt(sum(u * u for u in ca) * sum(v * v for v in cb))
    )
    # top-1 per layer: a = {(0,2), (1,1)}, b = {(0,2), (1,0)}
    assert got["neuron_topk_jaccard"] == pytest.approx(1 / 3)
    # top_fraction 1/3 of d_mlp=3 is one per layer, the same sets
    assert tr.neuron_similarity(a, b, top_fraction=0.34)["neuron_topk_jaccard"] == pytest.approx(1 / 3)
    assert tr.neuron_similarity(b, a, top_k=1) == pytest.approx(got)  # symmetric
    assert all(v == pytest.approx(1.0) for v in tr.neuron_similarity(a, a, top_k=1).values())


def test_neuron_similarity_refuses_other_models_and_shapes():
    a = make_neurons(PA, model="tiny-gpt2")
    with pytest.raises(TransferError, match="different models"):
        tr.neuron_similarity(a, make_neurons(PB, model="tiny-llama"))
    with pytest.raises(TransferError, match="different neurons"):
        tr.neuron_similarity(a, make_neurons([[0.5, 0.6], [0.7, 0.8]]))


def test_prompt_similarity_hand_computed_and_averaged_over_trials():
    p1 = SoftPrompt(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    p2 = SoftPrompt(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    p3 = SoftPrompt(torch.tensor([[0.0, 1.0], [-1.0, 0.0]]))
    got = tr.prompt_similarity([p1], [p2])
    assert got["prompt_cosine"] == pytest.approx(2 / math.sqrt(6))
    assert got["prompt_cosine_mean_pooled"] == pytest.approx(0.75 / math.sqrt(0.5 * 1.25))
    # p3 flattened is orthogonal to p1 (0+0+0+0) and has cos (0+1+0+0)/(sqrt2*sqrt3) with p2
    two = tr.prompt_similarity([p1, p3], [p2])
    assert two["prompt_cosine"] == pytest.approx((2 / math.sqrt(6) + 1 / math.sqrt(6)) / 2)
    assert all(v == pytest.approx(1.0) for v in tr.prompt_similarity([p1], [p1]).values())
    longer = SoftPrompt(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    mixed = tr.prompt_similarity([p1], [longer])
    assert math.isnan(mixed["prompt_cosine"]) and math.isfinite(mixed["prompt_cosine_mean_pooled"])


def test_activation_overlap_hand_computed():
    a = torch.tensor([[[1, 1, 0, 0]]], dtype=torch.bool)
    b = torch.tensor([[[1, 0, 1, 1]]], dtype=torch.bool)
    got = tr.activation_overlap([a], [b])
    assert got["activated_jaccard"] == pytest.approx(1 / 4)
    assert got["activated_cosine"] == pytest.approx(1 / math.sqrt(2 * 3))
    assert tr.activation_overlap([a], [a]) == pytest.approx({"activated_jaccard": 1.0, "activated_cosine": 1.0})


def _reference_states(model, prompt, ids, start):
    """Slow reference: full forward with the prompt over `ids`, every MLP activation captured."""
    from tl_skill import compat
    from tl_skill.models import model_spec

    L = model_spec(model).n_layers
    got = {}
    hooks = [
        (compat.mlp_post_hook(l), (lambda l: lambda act, hook: got.__setitem__(l, act.detach()))(l)) for l in range(L)
    ]
    with torch.no_grad(), prompt.applied(model), model.hooks(fwd_hooks=hooks):
        model(ids, attention_mask=torch.ones_like(ids), return_type="logits")
    return torch.stack([got[l][0, start : start + prompt.length] for l in range(L)]) > 0


def test_prompt_activation_states_causal(tiny_gpt2):
    prompt = SoftPrompt.from_vocab(tiny_gpt2, 3, seed=1)
    states = tr.prompt_activation_states(tiny_gpt2, prompt)
    assert states.dtype == torch.bool and states.shape == (2, 3, 256)
    ids = torch.zeros(1, 3, dtype=torch.long)
    assert torch.equal(states, _reference_states(tiny_gpt2, prompt, ids, 0))
    # causal: a prefix of the prompt activates the same neurons at its positions
    prefix = SoftPrompt(prompt.vectors[:2].detach())
    assert torch.equal(tr.prompt_activation_states(tiny_gpt2, prefix), states[:, :2])


def test_prompt_activation_states_masked(tiny_bert):
    prompt = SoftPrompt.from_vocab(tiny_bert, 3, seed=1)
    states = tr.prompt_activation_states(tiny_bert, prompt)
    tok = tiny_bert.tokenizer
    ids = torch.tensor([[tok.cls_token_id, tok.mask_token_id, 0, 0, 0, tok.sep_token_id]])
    assert torch.equal(states, _reference_states(tiny_bert, prompt, ids, 2))


def test_indicator_correlations_use_off_diagonal_pairs_only():
    transfer = [[9.0, 0.5, 0.2], [0.1, -9.0, 0.4], [0.3, 0.6, 9.0]]
    indicator = [[-5.0, 5.0, 2.0], [1.0, 7.0, 4.0], [3.0, 6.0, -1.0]]  # off-diagonal: same order
    got = tr.indicator_correlations({"ind": indicator}, {"kind": transfer})["ind"]["kind"]
    assert got["spearman"] == pytest.approx(1.0) and got["kendall"] == pytest.approx(1.0) and got["n"] == 6
    anti = [[-v for v in row] for row in indicator]
    assert tr.indicator_correlations({"i": anti}, {"k": transfer})["i"]["k"]["spearman"] == pytest.approx(-1.0)
    indicator[0][1] = None
    assert tr.indicator_correlations({"ind": indicator}, {"k": transfer})["ind"]["k"]["n"] == 5


def test_task_slug():
    assert tr.task_slug("bbc_news:sport-vs-business") == "bbc_news_sport-vs-business"
    assert tr.task_slug("csv:a/b.csv") != tr.task_slug("csv:a_b.csv")


# ------------------------------------------------------------------ study end to end
TASKS = ["word_sentiment", "rotten_tomatoes", "subjectivity"]


def _tune_config():
    from tl_skill import TuneConfig

    return TuneConfig(
        prompt_length=2,
        steps=2,
        eval_every=2,
        batch_size=8,
        max_train_examples=24,
        max_dev_examples=16,
        max_test_examples=16,
        max_input_tokens=24,
    )


FIND = {"max_train_examples": 24, "max_eval_examples": 16}


@pytest.fixture(scope="module")
def study_dir(tiny_gpt2, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    info = xt.study(
        tiny_gpt2,
        TASKS,
        out,
        seeds=(0, 1),
        tune_config=_tune_config(),
        find_kwargs=FIND,
        transfer_steps=1,
        progress=False,
    )
    return out, info


def test_study_writes_documented_transfer_json(study_dir):
    out, info = study_dir
    data = json.loads((out / "transfer.json").read_text())
    assert data["tasks"] == TASKS
    assert set(data["transfer"]) == set(tr.TRANSFER_KINDS)
    assert set(data["indicators"]) == set(tr.INDICATORS)
    for m in list(data["transfer"].values()) + list(data["indicators"].values()):
        assert np.asarray(m, dtype=float).shape == (3, 3)
    for name in tr.INDICATORS:  # similarity indicators are symmetric
        m = np.asarray(data["indicators"][name], dtype=float)
        assert np.allclose(m, m.T, equal_nan=True), name
    for name in tr.NEURON_INDICATORS:
        assert np.allclose(np.diag(np.asarray(data["indicators"][name], dtype=float)), 1.0), name
    assert set(data["correlations"]) == set(tr.INDICATORS)
    for main in data["correlations"].values():
        by_kind = main["by_transfer"]
        assert set(by_kind) == set(tr.TRANSFER_KINDS)
        # the top level repeats the main measure's numbers: {name: {spearman, kendall, ...}}
        assert main["transfer"] == "init_gain" and {**main, "transfer": None, "by_transfer": None} == {
            **by_kind["init_gain"],
            "transfer": None,
            "by_transfer": None,
        }
        for c in by_kind.values():
            assert {"spearman", "kendall"} <= set(c) and c["n"] == 6
            for v in (c["spearman"], c["kendall"]):
                assert v is None or -1 - 1e-9 <= v <= 1 + 1e-9
    # A prompt on its own task: the runs' own test accuracy (same subsample, same evaluation).
    zero = np.asarray(data["transfer"]["zero_shot"])
    for i, t in enumerate(TASKS):
        assert zero[i, i] == pytest.approx(info["per_task"][t]["test_accuracy"])
    gain = np.asarray(data["transfer"]["init_gain"])
    init = np.asarray(data["transfer"]["init"])
    rand = np.asarray([data["baselines"]["random_init_accuracy"][t] for t in TASKS])
    assert np.allclose(gain, init - rand[None, :])
    assert (out / "transfer_runs" / "K1" / "word_sentiment_to_subjectivity" / "seed0" / "prompt.safetensors").exists()
    assert (out / "transfer_runs" / "K1" / "random_to_subjectivity" / "P2_seed0" / "prompt.safetensors").exists()
    assert not (out / "figures").exists()  # experiments never draw: the view does
    plot_transfer_figures(xt.TransferResult.load(out), out / "figures")
    assert (out / "study.json").exists() and (out / "figures" / "correlations.png").exists()
    assert (out / "figures" / "indicator_neuron_spearman.png").exists()
    assert (out / "figures" / "clusters_neuron_topk_jaccard.png").exists()
    assert (out / "figures" / "transfer_zero_shot.png").exists()
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(TASKS)
    assert sorted(p.name for p in (out / "runs" / "rotten_tomatoes").iterdir()) == ["seed0", "seed1"]


def test_zero_shot_transfer_is_source_prompt_with_target_verbalizer(study_dir, tiny_gpt2):
    from tl_skill.data.tasks import subsample
    from tl_skill.tuning.runs import Run, evaluate

    out, _ = study_dir
    data = json.loads((out / "transfer.json").read_text())
    target = Run.load(out / "runs" / "subjectivity" / "seed0")
    cfg = target.config
    test = subsample(target.load_task(), {"test": cfg.max_test_examples}, seed=cfg.task_seed)
    verb = target.verbalizer(tiny_gpt2)
    accs = [
        evaluate(
            tiny_gpt2,
            test,
            "test",
            verb,
            Run.load(out / "runs" / "word_sentiment" / f"seed{s}").prompt,
            max_input_tokens=cfg.max_input_tokens,
        )["accuracy"]
        for s in (0, 1)
    ]
    i, j = TASKS.index("word_sentiment"), TASKS.index("subjectivity")
    assert data["transfer"]["zero_shot"][i][j] == pytest.approx(np.mean(accs))
    assert data["transfer"]["zero_shot_relative"][i][j] == pytest.approx(
        np.mean(accs) / data["transfer"]["zero_shot"][j][j]
    )


def test_tune_starts_from_init_prompt(tiny_gpt2, small_task, tmp_path):
    from tl_skill import TuneConfig, tune

    init = SoftPrompt(torch.randn(2, 64) * 0.3)
    cfg = TuneConfig(
        prompt_length=2, steps=1, eval_every=1, lr=1e-9, max_train_examples=8, max_dev_examples=8, max_test_examples=8
    )
    run = tune(tiny_gpt2, small_task, tmp_path / "r", cfg, progress=False, evaluate_test=False, init_prompt=init)
    assert torch.allclose(run.prompt.vectors, init.vectors, atol=1e-6)
    with pytest.raises(ValueError, match="length"):
        tune(tiny_gpt2, small_task, tmp_path / "r2", cfg, progress=False, init_prompt=SoftPrompt(torch.randn(3, 64)))


def test_study_rerun_reuses_everything(study_dir, tiny_gpt2, monkeypatch):
    out, info = study_dir
    before = json.loads((out / "transfer.json").read_text())
    calls = {"train_or_eval": 0, "find": 0}

    def no_forward(*a, **k):  # every training step and every evaluation goes through it
        calls["train_or_eval"] += 1
        raise AssertionError("a rerun must not tune or evaluate again")

    def no_find(*a, **k):
        calls["find"] += 1
        raise AssertionError("a rerun must not find skill neurons again")

    monkeypatch.setattr("tl_skill.tuning.loop.class_logits", no_forward)
    monkeypatch.setattr("tl_skill.find.find_skill_neurons", no_find)
    again = xt.study(
        tiny_gpt2,
        TASKS,
        out,
        seeds=(0, 1),
        tune_config=_tune_config(),
        find_kwargs=FIND,
        transfer_steps=1,
        progress=False,
    )
    assert calls == {"train_or_eval": 0, "find": 0}
    after = json.loads((out / "transfer.json").read_text())
    assert after["transfer"] == before["transfer"] and after["indicators"] == before["indicators"]
    assert again["correlations"] == info["correlations"]


def test_transfer_from_dirs_matches_study(study_dir, tiny_gpt2, tmp_path):
    out, _ = study_dir
    neurons = [out / "neurons" / tr.task_slug(t) for t in TASKS]
    got = xt.transfer_from_dirs(tiny_gpt2, neurons, None, tmp_path / "t", transfer_steps=0, progress=False)
    study = json.loads((out / "transfer.json").read_text())
    assert set(got["transfer"]) == {"zero_shot", "zero_shot_relative"}
    for name, c in got["correlations"].items():  # without the init setting, zero-shot is the main measure
        assert c["transfer"] == "zero_shot" and c["spearman"] == c["by_transfer"]["zero_shot"]["spearman"]
        assert c["spearman"] == pytest.approx(
            study["correlations"][name]["by_transfer"]["zero_shot"]["spearman"], nan_ok=True
        )
    as_np = lambda m: np.asarray(m, dtype=float)
    assert np.allclose(as_np(got["transfer"]["zero_shot"]), as_np(study["transfer"]["zero_shot"]))
    for name, m in study["indicators"].items():
        assert np.allclose(as_np(got["indicators"][name]), as_np(m), equal_nan=True), name
    # explicit run directories, in any order, give the same tasks
    runs = sorted((out / "runs").glob("*/seed*"))
    again = xt.transfer_from_dirs(tiny_gpt2, neurons, runs, tmp_path / "t2", transfer_steps=0, progress=False)
    assert again["tasks"] == TASKS


def test_mismatched_models_are_refused(study_dir, tiny_gpt2, tmp_path, monkeypatch):
    out, _ = study_dir
    other = make_neurons(PA, model="tiny-llama", task="x")
    other.save(tmp_path / "other")
    with pytest.raises(TransferError, match="different models"):
        xt.transfer_from_dirs(
            tiny_gpt2, [out / "neurons" / "word_sentiment", tmp_path / "other"], None, tmp_path / "t", progress=False
        )
    # a study over a directory holding another model's runs stops before tuning anything
    monkeypatch.setattr("tl_skill.tuning.runs.tune", lambda *a, **k: pytest.fail("tuned despite the mismatch"))
    bad = tmp_path / "s" / "runs" / "subjectivity" / "seed0"
    bad.mkdir(parents=True)
    (bad / "run.json").write_text(json.dumps({"model": "tiny-llama"}))
    from tl_skill.files import OutputDirError

    with pytest.raises(OutputDirError, match="holds no tl_skill study"):
        xt.study(tiny_gpt2, TASKS, tmp_path / "s", seeds=(0,), tune_config=_tune_config(), progress=False)
    # runs of a model other than the one given
    with pytest.raises(TransferError, match="tuned on 'tiny-gpt2'"):
        xt.transfer_from_dirs("tiny-llama", [out / "neurons" / t for t in TASKS], None, tmp_path / "t3")


def test_study_refuses_bad_input_early(tiny_gpt2, tmp_path):
    with pytest.raises(TransferError, match="at least two"):
        xt.study(tiny_gpt2, ["word_sentiment"], tmp_path, progress=False)
    with pytest.raises(TransferError, match="repeat"):
        xt.study(tiny_gpt2, ["word_sentiment", "word_sentiment"], tmp_path, progress=False)
    from tl_skill.data.tasks import TaskError

    with pytest.raises(TaskError):
        xt.study(tiny_gpt2, ["word_sentiment", "no_such_task"], tmp_path, progress=False)
    assert not (tmp_path / "runs").exists()


def _slow_mantel(ind, trm):
    """Reference: every relabelling written out, Spearman from scipy."""
    import itertools

    from scipy.stats import spearmanr

    n = len(ind)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    ys = [trm[i][j] for i, j in pairs]
    obs = spearmanr([ind[i][j] for i, j in pairs], ys).statistic
    rs = [spearmanr([ind[p[i]][p[j]] for i, j in pairs], ys).statistic for p in itertools.permutations(range(n))]
    return sum(r >= obs - 1e-12 for r in rs) / len(rs)


def test_mantel_p_value_counts_relabellings():
    rng = np.random.default_rng(3)
    trm = rng.normal(size=(4, 4)).tolist()
    ind = rng.normal(size=(4, 4)).tolist()
    p, count = tr.mantel_p_value(ind, trm)
    assert count == 24 and p == pytest.approx(_slow_mantel(ind, trm))
    # the indicator *is* the transfer matrix: only labellings that preserve the order reach rho = 1
    trm = rng.normal(size=(4, 4)).tolist()
    p, _ = tr.mantel_p_value(trm, trm)
    assert p == pytest.approx(1 / 24)
    # a perfectly anti-correlated indicator: every relabelling does at least as well
    anti = [[-v for v in row] for row in trm]
    assert tr.mantel_p_value(anti, trm)[0] == 1.0
    # more tasks than the exact limit: random relabellings plus the observed one
    big = rng.normal(size=(5, 5))
    p, count = tr.mantel_p_value(big, big, max_exact=4, n_random=199)
    assert count == 200 and 1 / 200 <= p < 0.05
    assert math.isnan(tr.mantel_p_value([[1.0, 1.0], [1.0, 1.0]], [[0.0, 1.0], [2.0, 0.0]])[0])


def test_indicator_correlations_report_mantel_p():
    rng = np.random.default_rng(4)
    trm, ind = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    got = tr.indicator_correlations({"i": ind}, {"k": trm})["i"]["k"]
    assert got["mantel_p"] == pytest.approx(_slow_mantel(ind.tolist(), trm.tolist()))
    assert got["mantel_permutations"] == 24
    assert "mantel_p" not in tr.indicator_correlations({"i": ind}, {"k": trm}, mantel=False)["i"]["k"]


# ------------------------------------------------------------------ evidence over tasks and trials
def _ref_pairs_spearman(ind, trm, idx):
    """Reference: the ordered pairs of a resample written out one by one, Spearman from scipy."""
    from scipy.stats import spearmanr

    xs, ys = [], []
    for a in range(len(idx)):
        for b in range(len(idx)):
            if idx[a] != idx[b]:
                xs.append(ind[idx[a]][idx[b]])
                ys.append(trm[idx[a]][idx[b]])
    return spearmanr(xs, ys).statistic


def test_bootstrap_indicator_difference_matches_a_slow_reference():
    rng = np.random.default_rng(11)
    n = 5
    trm = rng.normal(size=(n, n))
    inds = {name: rng.normal(size=(n, n)) for name in ("n1", "n2", "b1")}
    inds["n1"] = trm + rng.normal(scale=0.3, size=(n, n))  # a good indicator
    got = tr.bootstrap_indicator_difference(inds, trm, ["n1", "n2"], ["b1"], n_boot=60, seed=5)
    draws = np.random.default_rng(5)
    diffs = []
    for _ in range(60):
        idx = [int(i) for i in draws.integers(0, n, size=n)]
        if len(set(idx)) < 3:
            continue
        best_first = max(_ref_pairs_spearman(inds[k], trm, idx) for k in ("n1", "n2"))
        diffs.append(best_first - _ref_pairs_spearman(inds["b1"], trm, idx))
    everything = list(range(n))
    assert got["first"] == "n1" and got["second"] == "b1"
    assert got["first_spearman"] == pytest.approx(_ref_pairs_spearman(inds["n1"], trm, everything))
    assert got["difference"] == pytest.approx(got["first_spearman"] - _ref_pairs_spearman(inds["b1"], trm, everything))
    assert got["n_resamples"] == len(diffs)
    assert got["ci95"] == pytest.approx([np.quantile(diffs, 0.025), np.quantile(diffs, 0.975)])
    assert got["share_above_zero"] == pytest.approx(np.mean(np.asarray(diffs) > 0))
    with pytest.raises(TransferError, match="measured"):
        tr.bootstrap_indicator_difference(inds, trm, ["nope"], ["b1"])


def test_indicator_stability_and_trial_correlations_against_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(2)
    mats = [rng.normal(size=(4, 4)) for _ in range(3)]
    mats = [(m + m.T) / 2 for m in mats]
    got = tr.indicator_stability({"x": mats})["x"]
    upper = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    want = [
        spearmanr([mats[a][i, j] for i, j in upper], [mats[b][i, j] for i, j in upper]).statistic
        for a, b in ((0, 1), (0, 2), (1, 2))
    ]
    assert got["pairs"] == [[0, 1], [0, 2], [1, 2]]
    assert got["spearman"] == pytest.approx(want) and got["spearman_mean"] == pytest.approx(np.mean(want))
    trm = rng.normal(size=(4, 4))
    off = [(i, j) for i in range(4) for j in range(4) if i != j]
    per = tr.trial_correlations({"x": mats}, trm)["x"]
    want = [spearmanr([m[i, j] for i, j in off], [trm[i, j] for i, j in off]).statistic for m in mats]
    assert per["spearman"] == pytest.approx(want) and per["min"] == pytest.approx(min(want))
    with pytest.raises(TransferError, match="two trials"):
        tr.indicator_stability({"x": mats[:1]})


def test_average_linkage_matches_scipy():
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    rng = np.random.default_rng(7)
    pts = rng.normal(size=(7, 3))
    dist = np.sqrt(((pts[:, None] - pts[None, :]) ** 2).sum(-1))
    sim = 1.0 - dist  # average linkage on 1 - s merges as average linkage on s
    order, merges = tr.average_linkage(sim)
    ref = linkage(squareform(dist, checks=False), method="average")
    assert [1 - m["similarity"] for m in merges] == pytest.approx(ref[:, 2].tolist())
    assert sorted(order) == list(range(7))
    # every merge joins tasks that sit next to each other in the order
    for m in merges:
        pos = sorted(order.index(i) for i in m["left"] + m["right"])
        assert pos == list(range(pos[0], pos[0] + len(pos)))
    # two obvious blocks come out as two contiguous halves
    block = np.full((4, 4), 0.1)
    block[np.ix_([0, 2], [0, 2])] = block[np.ix_([1, 3], [1, 3])] = 0.9
    order, _ = tr.average_linkage(block)
    assert {frozenset(order[:2]), frozenset(order[2:])} == {frozenset({0, 2}), frozenset({1, 3})}


def test_group_separation_hand_computed_and_exact_p():
    import itertools

    sim = np.array(
        [
            [1.0, 0.8, 0.2, 0.1],
            [0.8, 1.0, 0.3, 0.2],
            [0.2, 0.3, 1.0, 0.6],
            [0.1, 0.2, 0.6, 1.0],
        ]
    )
    groups = ["a", "a", "b", "b"]
    got = tr.group_separation(sim, groups, n_perm=4000, seed=1)
    assert got["within"] == pytest.approx((0.8 + 0.6) / 2)
    assert got["across"] == pytest.approx((0.2 + 0.1 + 0.3 + 0.2) / 4)
    assert got["groups"] == {"a": [0, 1], "b": [2, 3]}

    def stat(lab):
        same = [sim[i, j] for i in range(4) for j in range(i + 1, 4) if lab[i] == lab[j]]
        diff = [sim[i, j] for i in range(4) for j in range(i + 1, 4) if lab[i] != lab[j]]
        return np.mean(same) - np.mean(diff)

    perms = list(itertools.permutations(groups))
    exact = np.mean([stat(p) >= stat(groups) - 1e-12 for p in perms])  # 8 of 24 labellings
    assert exact == pytest.approx(1 / 3)
    assert got["p"] == pytest.approx(exact, abs=0.03)
    with pytest.raises(TransferError, match="group labels"):
        tr.group_separation(sim, ["a", "b"])
    with pytest.raises(TransferError, match="within a group"):
        tr.group_separation(sim, ["a", "b", "c", "d"], n_perm=10)


def test_skill_neurons_of_one_trial_are_those_found_from_its_prompt_alone(study_dir, tiny_gpt2):
    from tl_skill import find_skill_neurons
    from tl_skill.tuning.runs import Run

    out, _ = study_dir
    both = SkillNeurons.load(out / "neurons" / "rotten_tomatoes")
    assert both.n_trials == 2
    alone = find_skill_neurons(
        tiny_gpt2, [Run.load(out / "runs" / "rotten_tomatoes" / "seed1")], progress=False, confirm_split=None, **FIND
    )
    one = both.trial(1)
    assert one.runs == alone.runs and one.n_trials == 1
    assert torch.equal(one.predictivity, alone.predictivity)
    assert torch.equal(one.counts["eval.pos_above"], alone.counts["eval.pos_above"])
    assert torch.allclose(one.baseline, alone.baseline)
    assert torch.equal(both.trial(-1).accuracy, one.accuracy)
    with pytest.raises(Exception, match="out of range"):
        both.trial(2)


def test_study_reports_each_trial_and_the_bootstrap(study_dir):
    from scipy.stats import spearmanr

    from tl_skill.tuning.runs import Run

    out, _ = study_dir
    data = json.loads((out / "transfer.json").read_text())
    n = len(TASKS)
    by_trial = data["indicators_by_trial"]
    assert set(by_trial) == set(tr.INDICATORS) and all(len(v) == 2 for v in by_trial.values())
    prompts = {t: [Run.load(out / "runs" / t / f"seed{k}").prompt.vectors.double() for k in (0, 1)] for t in TASKS}
    per_run = {}
    for t in TASKS:
        acc = SkillNeurons.load(out / "neurons" / tr.task_slug(t)).accuracy.double()  # [R, S, L, T, D]
        per_run[t] = torch.maximum(acc, 1 - acc).amax(dim=(1, 3))  # [R, L, D]
    for k in (0, 1):
        for i, a in enumerate(TASKS):
            for j, b in enumerate(TASKS):
                pa, pb = prompts[a][k].detach().flatten(), prompts[b][k].detach().flatten()
                cos = float(pa @ pb / (pa.norm() * pb.norm()))
                assert by_trial["prompt_cosine"][k][i][j] == pytest.approx(cos)
                rho = spearmanr(per_run[a][k].flatten(), per_run[b][k].flatten()).statistic
                assert by_trial["neuron_spearman"][k][i][j] == pytest.approx(rho)
    upper = [(i, j) for i in range(n) for j in range(i + 1, n)]
    m0, m1 = (np.asarray(m, dtype=float) for m in by_trial["prompt_cosine"])
    rho = spearmanr([m0[i, j] for i, j in upper], [m1[i, j] for i, j in upper]).statistic
    assert data["stability"]["prompt_cosine"]["spearman"] == pytest.approx([rho])
    assert set(data["bootstrap"]) == set(tr.TRANSFER_KINDS)
    boot = data["bootstrap"]["init_gain"]
    assert boot["first"] in tr.NEURON_INDICATORS and boot["second"] not in tr.NEURON_INDICATORS
    best = max(tr.NEURON_INDICATORS, key=lambda k: data["correlations"][k]["by_transfer"]["init_gain"]["spearman"])
    assert boot["first"] == best
    assert boot["first_spearman"] == pytest.approx(data["correlations"][best]["by_transfer"]["init_gain"]["spearman"])


def test_clustered_task_figure_orders_by_the_clustering(tmp_path):
    from tl_skill.viz.plots import plot_task_clusters

    sim = np.full((4, 4), 0.1)
    sim[np.ix_([0, 2], [0, 2])] = sim[np.ix_([1, 3], [1, 3])] = 0.9
    tasks = ["a0", "b1", "a2", "b3"]
    fig = plot_task_clusters(sim, tasks, tmp_path / "c.png", groups=["a", "b", "a", "b"])
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert {frozenset(labels[:2]), frozenset(labels[2:])} == {frozenset({"a0", "a2"}), frozenset({"b1", "b3"})}
    colours = {t.get_text(): t.get_color() for t in fig.axes[0].get_yticklabels()}
    assert colours["a0"] == colours["a2"] != colours["b1"] == colours["b3"]
    assert (tmp_path / "c.png").stat().st_size > 0


def test_study_summary_script(study_dir, tmp_path, capsys):
    """benchmarks/study_summary.py: its verdict inputs recomputed from the study's files."""
    import importlib.util
    from pathlib import Path

    out, _ = study_dir
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "study_summary.py"
    spec = importlib.util.spec_from_file_location("study_summary", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    s = mod.main([str(out), "--out", str(tmp_path / "s.json"), "--figures", str(tmp_path), "--prefix", "x"])
    saved = json.loads((tmp_path / "s.json").read_text())
    data = json.loads((out / "transfer.json").read_text())
    assert saved["groups"] == {"word_sentiment": "sentiment", "rotten_tomatoes": "sentiment", "subjectivity": "other"}
    jac = np.asarray(data["indicators"]["neuron_topk_jaccard"], dtype=float)
    sep = saved["claim_f"]["separation"]["neuron_topk_jaccard"]
    assert sep["within"] == pytest.approx(jac[0, 1])
    assert sep["across"] == pytest.approx((jac[0, 2] + jac[1, 2]) / 2)
    e = saved["claim_e"]
    assert e["best_neuron_indicator"] == data["bootstrap"]["init_gain"]["first"]
    assert e["ci95"] == pytest.approx(data["bootstrap"]["init_gain"]["ci95"])
    lo, hi = e["ci95"]
    want = "does not hold" if hi < 0 else ("holds" if lo > 0 and e["best_neuron_mantel_p"] < 0.05 else "not decided")
    assert e["verdict"] == want
    assert (tmp_path / "x_clusters_neuron_topk_jaccard.png").exists() and s["figure"].endswith(".png")
    printed = capsys.readouterr().out
    assert f"claim (e): {want}" in printed and "| neuron_topk_jaccard |" in printed
    with pytest.raises(SystemExit, match="no group declared"):
        mod.group_of("my_task", {})
    assert mod.group_of("bbc_news:a-vs-b", {}) == "topic" and mod.group_of("my_task", {"my_task": "g"}) == "g"


def test_transfer_and_study_print_the_evidence(study_dir):
    from tl_skill.cli.tables import evidence_table

    out, _ = study_dir
    res = xt.TransferResult.load(out)
    text = evidence_table(res)
    b = res.bootstrap["init_gain"]
    row = next(line for line in text.splitlines() if line.startswith("init_gain "))
    assert b["first"] in row and b["second"] in row and f"{b['difference']:.3f}" in row
    assert f"[{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}]" in row
    assert f"prompt_cosine {res.stability['prompt_cosine']['spearman_mean']:.3f}" in text
    assert evidence_table({"correlations": {}}) == ""  # results saved before the evidence existed
