"""Causal evidence: attribution against a slow reference and exact patching, steering against manual hooks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tl_skill import compat, load_model, load_task
from tl_skill.attribution import attribute, margins, unit_baselines
from tl_skill.cli.main import main
from tl_skill.data.tasks import subsample
from tl_skill.experiments import ablation
from tl_skill.experiments.causal import (
    AttributionResult,
    SteeringResult,
    attribution_experiment,
    class_means,
    steering_experiment,
)
from tl_skill.find import find_skill_neurons
from tl_skill.perturb import Perturbation
from tl_skill.tuning import TuneConfig, layout_for, tune
from tl_skill.tuning.prompt import Verbalizer, iterate_batches

CFG = TuneConfig(
    prompt_length=3, steps=4, eval_every=4, max_train_examples=40, max_dev_examples=16, max_test_examples=20
)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    model = load_model("tiny-llama")
    task = subsample(load_task("rotten_tomatoes"), {"train": 40, "dev": 16, "test": 20})
    base = tmp_path_factory.mktemp("causal")
    run = tune(model, task, base / "run", CFG, progress=False)
    sn = find_skill_neurons(model, [run], progress=False)
    sn.save(base / "neurons")
    return model, run, sn, base


def _reference(model, run, sn, split="test"):
    """Slow reference: keep every activation and gradient of every batch, full logits, then sum in numpy."""
    task = run.load_task()
    cfg = run.config
    layout = layout_for(model, run.prompt.length, cfg.max_input_tokens, cfg.padding_side)
    words = Verbalizer(model.tokenizer, run.info["label_words"]).token_ids
    base = unit_baselines(sn).numpy()
    L, D = base.shape
    total = {c: np.zeros((L, D)) for c in range(2)}
    count = {0: 0, 1: 0}
    for _, batch in iterate_batches(layout, task, split, 5):
        kept: dict[int, torch.Tensor] = {}

        def keep(layer):
            def fn(act, hook):
                act.retain_grad()
                kept[layer] = act
                return act

            return fn

        def leaf(x, hook):
            return x.detach().requires_grad_(True)

        hooks = [(compat.embed_hook(model), leaf)] + [(compat.mlp_post_hook(l), keep(l)) for l in range(L)]
        with torch.enable_grad(), run.prompt.applied(model, batch), model.hooks(fwd_hooks=hooks):
            logits = model(batch.input_ids, attention_mask=batch.attention_mask, return_type="logits")
            rows = torch.arange(len(batch.labels))
            cl = logits[rows, batch.pred_pos][:, words]
            m = cl[rows, batch.labels] - cl[rows, 1 - batch.labels]  # two classes
            m.sum().backward()
        real = batch.attention_mask.numpy().astype(bool)
        for l in range(L):
            a = kept[l].detach().double().numpy()
            g = kept[l].grad.double().numpy()
            term = (base[l] - a) * g * real[..., None]
            for e, y in enumerate(batch.labels.tolist()):
                total[y][l] += term[e].sum(0)
        for y in batch.labels.tolist():
            count[y] += 1
    return {c: total[c] / count[c] for c in range(2)}, count


def test_attribution_equals_a_slow_reference(made):
    model, run, sn, _ = made
    got = attribute(model, run, sn, "test", batch_size=3, progress=False)
    ref, count = _reference(model, run, sn)
    assert got.counts == [count[0], count[1]]
    for c in range(2):
        scale = np.abs(ref[c]).max()
        assert scale > 0
        np.testing.assert_allclose(got.by_class[c].numpy(), ref[c], rtol=0, atol=2e-5 * scale)


def test_attribution_is_the_same_for_any_batch_size(made):
    model, run, sn, _ = made
    a = attribute(model, run, sn, "test", batch_size=2, progress=False)
    b = attribute(model, run, sn, "test", batch_size=20, progress=False)
    scale = float(a.by_class.abs().max())
    assert float((a.by_class - b.by_class).abs().max()) <= 1e-6 * scale  # padding moves activations by rounding
    c = attribute(model, run, sn, "test", batch_size=2, progress=False)
    assert torch.equal(a.by_class, c.by_class)  # and the same batches give the same bits


def test_attribution_of_a_linear_unit_is_its_patching_effect(made):
    """Without the final norm, the last layer's neurons act on the margin linearly: first order is exact."""
    model, run, sn, _ = made
    vars(model.ln_final)["forward"] = lambda x, *a, **k: x
    try:
        _linear_case(model, run, sn)
    finally:
        vars(model.ln_final).pop("forward")
    assert "forward" not in vars(model.ln_final)


def _linear_case(model, run, sn):
    last = model.cfg.n_layers - 1
    got = attribute(model, run, sn, "test", layers=[last], batch_size=4, progress=False)
    task = run.load_task()
    layout = layout_for(model, run.prompt.length, run.config.max_input_tokens)
    words = Verbalizer(model.tokenizer, run.info["label_words"]).token_ids

    def margin_sum(hooks=()):
        total = 0.0
        for _, batch in iterate_batches(layout, task, "test", 4):
            with torch.no_grad(), run.prompt.applied(model, batch), model.hooks(fwd_hooks=list(hooks)):
                logits = model(batch.input_ids, attention_mask=batch.attention_mask, return_type="logits")
            rows = torch.arange(len(batch.labels))
            total += float(margins(logits[rows, batch.pred_pos][:, words].double(), batch.labels).sum())
        return total / len(task["test"])

    clean = margin_sum()
    for unit in got.top(3):
        hooks = Perturbation(model, [unit], "mean", skill=sn).fwd_hooks()
        true = margin_sum(hooks) - clean
        assert got.at(*unit) == pytest.approx(true, rel=1e-4, abs=1e-7)


def test_attribution_leaves_a_trainable_model_alone(made):
    model, run, sn, _ = made
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        attribute(model, run, sn, "test", batch_size=8, progress=False)
        assert all(p.grad is None for p in model.parameters())  # autograd.grad, not backward
        assert not compat.has_forward_hooks(model)
    finally:
        for p in model.parameters():
            p.requires_grad_(False)


def test_attribution_experiment_verifies_by_patching(made, tmp_path):
    model, run, sn, _ = made
    res = attribution_experiment(model, run, sn, tmp_path / "a", k=4, progress=False)
    frame = res.to_dataframe()
    assert list(frame.columns) == list(AttributionResult.COLUMNS) and 4 <= len(frame) <= 8
    # the true effects are real mean-ablations: recompute one by hand through perturb
    row = frame.iloc[0]
    assert set(frame["picked_by"]) <= {"attribution", "predictivity", "both"}
    assert res.agreement["n_units"] == len(frame) and res.agreement["spearman"] is not None
    assert abs(row.true_effect) > 0
    back = AttributionResult.load(tmp_path / "a")
    assert torch.equal(back.attribution, res.attribution) and back.verified == res.verified
    counts = res.evidence["counts"]
    assert sum(v for k, v in counts.items() if k != "expected_both_if_independent") == sn.n_layers * sn.d_mlp


def test_steering_equals_manual_hooks(made):
    model, run, sn, _ = made
    res = steering_experiment(model, run, sn, None, fractions=[0.1], strengths=[1.0], seeds=1, progress=False)
    means = class_means(model, run, sn)
    mask = sn.select(fraction=0.1)
    best = sn.best_position()
    P = run.prompt.length
    task = subsample(run.load_task(), {"test": run.config.max_test_examples}, seed=run.config.task_seed)
    layout = layout_for(model, P, run.config.max_input_tokens)
    verbalizer = run.verbalizer(model)

    def predictions(target=None):
        preds = {}
        for idx, batch in iterate_batches(layout, task, "test", 32):
            hooks = []
            if target is not None:
                for r, l in enumerate(sn.layers):
                    units = torch.nonzero(mask[r]).flatten().tolist()

                    def fn(act, hook, r=r, units=units):
                        act = act.clone()
                        T = act.shape[1]
                        for i in units:  # one unit at a time: the plainest statement of the rule
                            t = int(best[r, i])
                            act[:, T - P + t, i] = means[target, r, t, i]
                        return act

                    hooks.append((compat.mlp_post_hook(l), fn))
            with torch.no_grad(), run.prompt.applied(model, batch), model.hooks(fwd_hooks=hooks):
                logits = model(batch.input_ids, attention_mask=batch.attention_mask, return_type="logits")
            cl = verbalizer.class_logits(logits, batch.pred_pos)
            for e, p in zip(idx.tolist(), cl.argmax(1).tolist()):
                preds[e] = p
        return np.array([preds[e] for e in range(len(preds))])

    clean = predictions()
    flips = []
    for c in range(2):
        steered = predictions(c)
        flips += list(steered[clean != c] == c)
    assert res.n_pairs == len(flips)
    assert res.rows[0]["skill_flip_rate"] == pytest.approx(np.mean(flips))
    assert res.to_dataframe()["n_units"].tolist() == [int(mask.sum())]
    # more flips is the stronger effect: the flag follows the CI's lower end, and the ablation's
    # "hurts more" flag (an accuracy drop) is not carried over
    paired = res.rows[0]["paired"]
    assert "skill_hurts_more" not in paired
    assert paired["skill_flips_more"] == (paired["ci_low"] > 0)
    assert bool(res.to_dataframe()["skill_flips_more"].iloc[0]) == paired["skill_flips_more"]


def test_class_means_equal_a_slow_reference(made):
    model, run, sn, _ = made
    means = class_means(model, run, sn)
    task = subsample(run.load_task(), {"train": sn.meta["max_train_examples"]}, seed=run.config.task_seed)
    layout = layout_for(model, run.prompt.length, run.config.max_input_tokens)
    seen = {0: [], 1: []}
    for _, batch in iterate_batches(layout, task, "train", 7):
        with torch.no_grad(), run.prompt.applied(model, batch):
            _, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask)
        for e, y in enumerate(batch.labels.tolist()):
            pos = batch.prompt_positions()[e]
            seen[y].append(torch.stack([cache[compat.mlp_post_hook(l)][e, pos] for l in sn.layers]).double())
    for c in range(2):
        torch.testing.assert_close(means[c], torch.stack(seen[c]).mean(0), rtol=1e-9, atol=1e-9)


def test_steering_reuses_the_ablation_paired_test():
    from tl_skill.experiments import causal

    assert causal.paired_comparison is ablation.paired_comparison


def test_cli_attribute_and_steer(made, tmp_path, capsys):
    _, run, _, base = made
    common = [str(run.path), "--neurons", str(base / "neurons"), "--device", "cpu", "-q"]
    assert main(["attribute", *common, "--out", str(tmp_path / "a"), "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert "attribution vs patching over" in out and (tmp_path / "a" / "attribution.png").exists()
    assert main(["steer", *common, "--out", str(tmp_path / "s"), "--fractions", "0.1", "--seeds", "1"]) == 0
    assert "verdict at strength 1" in capsys.readouterr().out
    saved = json.loads((tmp_path / "s" / "steering.json").read_text())
    assert SteeringResult.load(tmp_path / "s").rows == saved["rows"]
    with pytest.raises(SystemExit):  # argparse: "--strengths: must be > 0, got 0"
        main(["steer", *common, "--out", str(tmp_path / "s2"), "--strengths", "0"])
    assert "must be > 0" in capsys.readouterr().err and not (tmp_path / "s2").exists()
    assert main(["attribute", *common, "--out", str(tmp_path / "a"), "--k", "5"]) == 2  # other settings
    assert "other settings" in capsys.readouterr().err


def test_dashboards_show_attribution_and_patched_effects(made, tmp_path):
    from tl_skill.experiments.dashboard import dashboard_data
    from tl_skill.viz.dashboard import write_dashboard

    model, run, sn, _ = made
    res = attribution_experiment(model, run, sn, tmp_path / "a", k=3, progress=False)
    dash = dashboard_data(model, run, sn, None, top=3, n_examples=2, progress=False, attribution=tmp_path / "a")
    verified = {(v["layer"], v["unit"]): v for v in res.verified}
    for row in dash.neurons:
        assert row["attribution"] == res.at(row["layer"], row["neuron"])
        v = verified.get((row["layer"], row["neuron"]))
        assert row["patched_effect"] == (v["true_effect"] if v else None)
    index = write_dashboard(dash, tmp_path / "d")
    page = next(index.parent.glob("neuron_L*.html")).read_text()
    assert "Causal evidence" in page and "Attribution" in page


def test_causal_summary_script(made, tmp_path, capsys):
    """benchmarks/causal_summary.py: its numbers recomputed from the saved results by hand."""
    import importlib.util
    from pathlib import Path

    model, run, sn, _ = made
    a = attribution_experiment(model, run, sn, tmp_path / "a", k=3, progress=False)
    s = steering_experiment(model, run, sn, tmp_path / "s", fractions=[0.1], strengths=[1.0], seeds=1, progress=False)
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "causal_summary.py"
    spec = importlib.util.spec_from_file_location("causal_summary", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(
        [
            f"tiny/rt={tmp_path / 'a'},{tmp_path / 's'}",
            f"only/attr={tmp_path / 'a'},",
            "--out",
            str(tmp_path / "c.json"),
        ]
    )
    got = json.loads((tmp_path / "c.json").read_text())
    att = got["tiny/rt"]["attribution"]
    for kind in ("attribution", "predictivity"):
        effects = [abs(v["true_effect"]) for v in a.verified if v["picked_by"] in (kind, "both")]
        assert att["verified_by_ranking"][kind]["n"] == len(effects)
        assert att["verified_by_ranking"][kind]["median_abs_true_effect"] == pytest.approx(float(np.median(effects)))
    assert (
        att["top_overlap"] == a.evidence["top_overlap"]
        and att["atp_vs_patching"]["spearman"] == a.agreement["spearman"]
    )
    row = got["tiny/rt"]["steering"]["rows"][0]
    assert row["skill"] == s.rows[0]["skill_flip_rate"] and row["random"] == s.rows[0]["random_flip_rate"]
    assert "steering" not in got["only/attr"]
    table = capsys.readouterr().out
    assert f"| tiny/rt | 1 | {row['skill']:.3f} / {row['random']:.3f}" in table.replace("**", "")
    with pytest.raises(SystemExit):
        mod.main(["no-dirs", "--out", str(tmp_path / "d.json")])
    assert not (tmp_path / "d.json").exists()


def test_finished_attribution_is_reused_not_recomputed(made, tmp_path, caplog):
    model, run, sn, _ = made
    first = attribution_experiment(model, run, sn, tmp_path / "a", k=2, progress=False)

    def no_model():
        raise AssertionError("a finished attribution must not load the model")

    again = attribution_experiment(no_model, run, sn, tmp_path / "a", k=2, progress=False)
    assert again.verified == first.verified and torch.equal(again.attribution, first.attribution)
    (tmp_path / "a" / "attribution.json").write_text('{"model": ')  # truncated: computed again, with a warning
    with caplog.at_level("WARNING"):
        redone = attribution_experiment(model, run, sn, tmp_path / "a", k=2, progress=False)
    assert "not reusable" in caplog.text
    assert redone.verified == first.verified
    assert AttributionResult.load(tmp_path / "a").verified == first.verified


def test_direct_effects_through_gemma3_post_norms_by_hand(tmp_path):
    """Gemma 3 normalises each MLP's output before the residual stream (post_feedforward_layernorm): a neuron's
    direct path goes through that norm and the final one, each with its scale held at the prediction position.
    The dashboards' and the attribution's direct effects against a hand computation from the Hugging Face
    modules, one example at a time."""
    from tl_skill.experiments.dashboard import dashboard_data

    model = load_model("tiny-gemma3")
    task = subsample(load_task("rotten_tomatoes"), {"train": 24, "dev": 12, "test": 10})
    cfg = TuneConfig(
        prompt_length=2, steps=2, eval_every=2, max_train_examples=24, max_dev_examples=12, max_test_examples=10
    )
    run = tune(model, task, tmp_path / "run", cfg, progress=False)
    sn = find_skill_neurons(model, [run], progress=False)
    dash = dashboard_data(model, run, sn, None, top=3, n_examples=1, progress=False)
    att = attribution_experiment(model, run, sn, None, k=2, progress=False)
    hf = compat.hf_model_of(model)
    layers = sorted({r["layer"] for r in dash.neurons} | {v["layer"] for v in att.verified})
    seen: dict[str, torch.Tensor] = {}
    handles = [hf.model.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0].detach()))]
    for l in layers:
        block = hf.model.layers[l]
        handles.append(
            block.post_feedforward_layernorm.register_forward_pre_hook(
                lambda m, a, l=l: seen.__setitem__(f"post{l}", a[0].detach())
            )
        )
        handles.append(
            block.mlp.down_proj.register_forward_pre_hook(lambda m, a, l=l: seen.__setitem__(f"a{l}", a[0].detach()))
        )

    def rms(x, eps):
        return torch.sqrt(x.double().pow(2).mean(-1) + eps)

    layout = layout_for(model, run.prompt.length, run.config.max_input_tokens, run.config.padding_side)
    data = subsample(run.load_task(), {"test": run.config.max_test_examples}, seed=run.config.task_seed)
    words = Verbalizer(model.tokenizer, run.info["label_words"]).token_ids
    rows = hf.lm_head.weight[words].detach().double()  # [C, d_model]
    g_final = 1 + hf.model.norm.weight.detach().double()
    per_example: dict[tuple[int, int], list[torch.Tensor]] = {}
    acts: dict[tuple[int, int], list[float]] = {}
    units = list(
        dict.fromkeys(
            [(r["layer"], r["neuron"]) for r in dash.neurons] + [(v["layer"], v["unit"]) for v in att.verified]
        )
    )
    try:
        for tok in layout.tokenize(data.texts("test")):
            batch = layout.collate([tok], [0])
            with torch.no_grad(), run.prompt.applied(model, batch):
                model(batch.input_ids, attention_mask=batch.attention_mask)
            t = int(batch.pred_pos[0])
            s_final = rms(seen["final"][0, t], hf.model.norm.eps)
            for l, i in units:
                post = hf.model.layers[l].post_feedforward_layernorm
                v = hf.model.layers[l].mlp.down_proj.weight[:, i].detach().double()
                through_post = v * (1 + post.weight.detach().double()) / rms(seen[f"post{l}"][0, t], post.eps)
                per_example.setdefault((l, i), []).append(rows @ (through_post * g_final) / s_final)
                acts.setdefault((l, i), []).append(float(seen[f"a{l}"][0, t, i]))
    finally:
        for h in handles:
            h.remove()
    for r in dash.neurons:
        want = torch.stack(per_example[(r["layer"], r["neuron"])]).mean(0)
        np.testing.assert_allclose(r["direct_effect_per_unit"], want.numpy(), rtol=1e-4, atol=1e-9)
    labels = torch.tensor(data.labels("test"))
    base = unit_baselines(sn)
    for v in att.verified:
        l, i = v["layer"], v["unit"]
        e = torch.stack(per_example[(l, i)])  # [N, 2]
        a = torch.tensor(acts[(l, i)], dtype=torch.float64)
        b = float(base[sn.layers.index(l), i])
        want = ((b - a) * (e[torch.arange(len(a)), labels] - e[torch.arange(len(a)), 1 - labels])).mean()
        assert v["direct_effect"] == pytest.approx(float(want), rel=1e-3, abs=1e-9)


def test_steering_verdict_by_strength():
    """A hand-made result: the verdict and the half-flip fraction per strength, and "not run" for a strength
    that was not run (not a "does not hold" from no rows)."""

    def row(f, s, skill, ci_low):
        return {"fraction": f, "strength": s, "skill_flip_rate": skill, "paired": {"ci_low": ci_low}}

    res = SteeringResult(
        model="m", task="t", run="r", positions="selected", fractions=[0.01, 0.05], strengths=[2.0], seeds=[0],
        n_examples=10, n_pairs=10, clean_accuracy=1.0,
        rows=[row(0.01, 2.0, 0.3, 0.1), row(0.05, 2.0, 0.6, -0.01)],
    )  # fmt: skip
    assert res.verdict() == res.verdict(2.0) == "partly"  # 1 was not run: the first strength run
    assert res.verdict(1.0) == "not run" and res.half_flip_fraction(1.0) is None
    assert res.half_flip_fraction() == 0.05
    assert res.facts()["strength"] == 2.0
