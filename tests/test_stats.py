"""Statistics (method §3b): p-values vs scipy, FDR, held-out predictivity, shuffled labels, stability, paired tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

from tl_skill import TuneConfig, find_skill_neurons, load_task, stats, tune
from tl_skill.data.tasks import subsample
from tl_skill.experiments.ablation import paired_comparison
from tl_skill.neurons import SkillNeurons

TOKENS = 8


# ---------------------------------------------------------------------------- p-values
def scipy_two_sided(N, n_pos, A, k):
    """Fisher's rule with scipy's pmf: the mass of outcomes no more likely than k."""
    dist = sps.hypergeom(N, n_pos, A)
    support = np.arange(max(0, A - (N - n_pos)), min(A, n_pos) + 1)
    pmf = dist.pmf(support)
    return min(1.0, float(pmf[pmf <= dist.pmf(k) * (1 + 1e-7)].sum()))


@pytest.mark.parametrize("N, n_pos", [(10, 4), (31, 15), (200, 120), (7, 1)])
def test_two_sided_p_equals_scipy_everywhere(N, n_pos):
    A, k = np.meshgrid(np.arange(N + 1), np.arange(n_pos + 1), indexing="ij")
    ok = (k <= A) & (A - k <= N - n_pos)
    A, k = A[ok], k[ok]
    got = stats.hypergeom_p_values(torch.tensor(k), torch.tensor(A - k), n_pos, N - n_pos).numpy()
    want = np.array([scipy_two_sided(N, n_pos, a, kk) for a, kk in zip(A, k)])
    assert np.allclose(got, want, rtol=1e-9, atol=1e-12)
    # one-sided
    up = stats.hypergeom_p_values(torch.tensor(k), torch.tensor(A - k), n_pos, N - n_pos, "greater").numpy()
    lo = stats.hypergeom_p_values(torch.tensor(k), torch.tensor(A - k), n_pos, N - n_pos, "less").numpy()
    assert np.allclose(up, [sps.hypergeom(N, n_pos, a).sf(kk - 1) for a, kk in zip(A, k)], rtol=1e-9, atol=1e-12)
    assert np.allclose(lo, [sps.hypergeom(N, n_pos, a).cdf(kk) for a, kk in zip(A, k)], rtol=1e-9, atol=1e-12)


def test_hand_built_counts_ties_and_constant_neurons():
    # 10 examples, 5 positive. Constant neuron: never above (A = 0), or always (A = 10): p = 1.
    pos = torch.tensor([0, 5, 5, 0, 3])
    neg = torch.tensor([0, 5, 0, 5, 2])
    p = stats.hypergeom_p_values(pos, neg, 5, 5)
    assert p[0] == 1 and p[1] == 1
    # a perfect split: P(K = 5 | A = 5) = 1/252, and K = 0 is as likely (a tie): p = 2/252
    assert p[2].item() == pytest.approx(2 / 252) and p[3].item() == pytest.approx(2 / 252)
    assert p[4].item() == pytest.approx(1.0)  # k = 3 of A = 5 is the mode
    assert np.allclose(p.numpy(), [scipy_two_sided(10, 5, int(a), int(k)) for a, k in zip(pos + neg, pos)])


def test_fdr_equals_scipy():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=300), rng.uniform(0, 1e-3, size=30), [1.0, 1.0]])
    for method in ("bh", "by"):
        got = stats.benjamini_hochberg(torch.tensor(p).reshape(2, -1), method).reshape(-1).numpy()
        assert np.allclose(got, sps.false_discovery_control(p, method=method), rtol=1e-12)


# -------------------------------------------------------------------- tiny-model runs
def _long_text_csv(tmp_path, n=240):
    """rotten_tomatoes snippets of >= TOKENS tokens (no padding anywhere), as a user csv file."""
    import csv

    from tl_skill.models import load_model

    tok = load_model("tiny-gpt2", device="cpu").tokenizer
    task = load_task("rotten_tomatoes")
    texts, labels = task.texts("train"), task.labels("train")
    keep = [i for i, t in enumerate(texts[:2000]) if len(tok(t, add_special_tokens=False)["input_ids"]) >= TOKENS]
    path = tmp_path / "long.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in keep[:n]:
            w.writerow([texts[i], ["rotten", "fresh"][labels[i]]])
    return path


@pytest.fixture(scope="module")
def long_run(tiny_gpt2, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats")
    task = load_task(f"csv:{_long_text_csv(tmp)}")
    cfg = TuneConfig(
        prompt_length=3,
        steps=2,
        eval_every=2,
        batch_size=8,
        max_input_tokens=TOKENS,
        max_dev_examples=24,
        max_test_examples=24,
    )
    return tune(tiny_gpt2, task, tmp / "run", cfg, progress=False, evaluate_test=False)


def _activations(model, task, split, prompt):
    """Every example's activations [N, L, T, D] at the prompt positions, one example at a time."""
    from tl_skill import compat
    from tl_skill.tuning import layout_for

    layout = layout_for(model, prompt.length, TOKENS)
    out = []
    for text in task.texts(split):
        batch = layout.encode([text])
        with prompt.applied(model, batch), torch.no_grad():
            _, cache = model.run_with_cache(
                batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n.endswith("mlp.hook_post")
            )
        s = int(batch.prompt_start[0])
        out.append(
            torch.stack(
                [cache[compat.mlp_post_hook(l)][0, s : s + prompt.length] for l in range(model.cfg.n_layers)]
            ).double()
        )
    return torch.stack(out), torch.tensor(task.labels(split))  # a copy: the task's labels are read-only


def test_heldout_predictivity_equals_a_slow_reference(tiny_gpt2, long_run):
    sn = find_skill_neurons(tiny_gpt2, [long_run], max_train_examples=None, max_eval_examples=None, progress=False)
    task = subsample(long_run.load_task(), {"train": None}, seed=0)
    prompt = long_run.prompt
    train, _ = _activations(tiny_gpt2, task, "train", prompt)
    dev, y_dev = _activations(tiny_gpt2, task, "dev", prompt)
    test, y_test = _activations(tiny_gpt2, task, "test", prompt)
    base = train.mean(0)
    L, T, D = base.shape
    want = torch.empty(L, D, dtype=torch.float64)
    for l in range(L):
        for i in range(D):
            accs = [((dev[:, l, t, i] > base[l, t, i]) == (y_dev == 1)).double().mean() for t in range(T)]
            preds = [max(a, 1 - a) for a in accs]
            t = int(np.argmax(preds))  # first best position, as the rule is chosen on dev
            up = accs[t] >= 0.5
            acc = ((test[:, l, t, i] > base[l, t, i]) == (y_test == 1)).double().mean()
            want[l, i] = acc if up else 1 - acc
    got = sn.heldout_predictivity()
    assert torch.allclose(got, want, atol=1e-12)
    # and the p-values of the selection split are those of scipy on the recorded counts
    pv = sn.position_p_values()[0, 0]
    above = dev > base
    k = (above & (y_dev == 1)[:, None, None, None]).sum(0)
    A = above.sum(0)
    n_pos, N = int((y_dev == 1).sum()), len(y_dev)
    for l, t, i in [(0, 0, 0), (1, 2, 7), (1, 1, 100)]:
        assert pv[l, t, i].item() == pytest.approx(scipy_two_sided(N, n_pos, int(A[l, t, i]), int(k[l, t, i])))


def test_shuffled_labels_give_chance_p_values(tiny_gpt2, long_run):
    fractions, n_sig = [], []
    for seed in range(3):
        sn = find_skill_neurons(
            tiny_gpt2,
            [long_run],
            max_train_examples=None,
            max_eval_examples=None,
            progress=False,
            confirm_split=None,
            control="shuffled",
            control_seed=seed,
        )
        c = sn.control_summary()
        fractions.append(c["fraction_position_p_below_0.05"])
        n_sig.append(c["n_significant"])
    # a discrete test is conservative: at most the nominal rate, not far below it with 48 dev examples
    assert 0.01 <= np.mean(fractions) <= 0.07, fractions
    assert max(n_sig) <= 2, n_sig
    # and the control's p-values come from the recorded shuffled counts, not the true ones
    assert not torch.equal(sn.counts["control.pos_above"], sn.counts["eval.pos_above"])


def test_saved_statistics_round_trip(tiny_gpt2, long_run, tmp_path):
    sn = find_skill_neurons(tiny_gpt2, [long_run], max_train_examples=60, progress=False, control="shuffled")
    sn.save(tmp_path / "n")
    back = SkillNeurons.load(tmp_path / "n")
    assert torch.equal(back.p_value(), sn.p_value())
    assert torch.equal(back.heldout_predictivity(), sn.heldout_predictivity())
    assert back.control_summary() == sn.control_summary()
    import json

    from tl_skill.viz.plots import plot_statistics

    plot_statistics(back, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "n" / "neurons.json").read_text())["statistics"]
    assert saved["n_significant"] == int(sn.significant().sum())
    assert {"heldout_predictivity", "p_value", "q_value"} <= set(saved["top"][0])


# ------------------------------------------------------------------------ trial stability
def test_trial_stability_by_hand():
    # 2 trials, 1 layer of 4 neurons, top-1 per layer (fraction 0.25)
    a = torch.tensor([[[0.9, 0.6, 0.55, 0.5]], [[0.8, 0.7, 0.5, 0.55]]], dtype=torch.float64)
    st = stats.trial_stability(a, fraction=0.25)
    assert st["k_per_layer"] == 1
    assert st["spearman"][0] == pytest.approx(sps.spearmanr(a[0, 0], a[1, 0]).statistic)
    assert st["topk_jaccard"] == [1.0]  # both trials' best is neuron 0
    assert st["topk_jaccard_chance"] == pytest.approx(0.25)  # two random singletons of 4 agree 1/4 of the time
    assert st["mean_topk_in_every_trial"] == 1.0 and st["mean_topk_in_every_trial_chance"] == pytest.approx(1 / 16)
    b = torch.tensor([[[0.9, 0.6, 0.55, 0.5]], [[0.5, 0.9, 0.6, 0.55]]], dtype=torch.float64)
    st = stats.trial_stability(b, fraction=0.5)  # tops {0, 1} and {1, 2}: Jaccard 1/3
    assert st["topk_jaccard"][0] == pytest.approx(1 / 3)
    # mean [0.7, 0.75, 0.575, 0.525]: top-2 {1, 0}; neuron 1 in both trials' tops, neuron 0 not
    assert st["mean_topk_in_every_trial"] == pytest.approx(0.5)
    # chance Jaccard of two random 2-subsets of 4: P(overlap 0, 1, 2) = 1/6, 4/6, 1/6 -> 0 + 4/6 * 1/3 + 1/6
    assert st["topk_jaccard_chance"] == pytest.approx(4 / 6 / 3 + 1 / 6)


# ------------------------------------------------------------------------- paired tests
def test_mcnemar_equals_binomial_test():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, 150), rng.integers(0, 2, 150)
    got = stats.mcnemar_exact(a, b)
    n01, n10 = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    assert (got["only_a_correct"], got["only_b_correct"]) == (n01, n10)
    assert got["p_value"] == pytest.approx(sps.binomtest(n01, n01 + n10, 0.5).pvalue)
    assert stats.mcnemar_exact(a, a)["p_value"] == 1.0


def test_paired_bootstrap_equals_a_loop():
    rng = np.random.default_rng(2)
    skill = rng.integers(0, 2, 40)
    rand = rng.integers(0, 2, (3, 40))
    got = stats.paired_bootstrap(skill, rand, n_boot=500, seed=7)
    # the documented draws, replayed one replicate at a time
    r = np.random.default_rng(7)
    ex, sd = r.integers(0, 40, (500, 40)), r.integers(0, 3, (500, 3))
    diffs = []
    for b in range(500):
        s_acc = sum(skill[j] for j in ex[b]) / 40
        r_acc = sum(sum(rand[s][j] for j in ex[b]) / 40 for s in sd[b]) / 3
        diffs.append(s_acc - r_acc)
    assert got["ci_low"] == pytest.approx(np.quantile(diffs, 0.025))
    assert got["ci_high"] == pytest.approx(np.quantile(diffs, 0.975))
    assert got["difference"] == pytest.approx(skill.mean() - rand.mean())
    cmp = paired_comparison(skill, rand)
    assert cmp["mcnemar_p"] == [stats.mcnemar_exact(skill, x)["p_value"] for x in rand]
    assert cmp["skill_hurts_more"] == (cmp["ci_high"] < 0)
