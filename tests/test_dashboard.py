"""Neuron dashboards (experiments/dashboard.py, dashboard_html.py) and the Neuronpedia export (neuronpedia.py)."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tl_skill import TuneConfig, compat, evaluate, load_task, tune
from tl_skill.cli import main
from tl_skill.experiments.dashboard import DashboardError, DashboardResult, dashboard_data
from tl_skill.experiments.runner import EvalSet
from tl_skill.find import find_skill_neurons, trace_activations
from tl_skill.perturb import Perturbation
from tl_skill.tuning.prompt import layout_for
from tl_skill.viz.dashboard import page_name, write_dashboard
from tl_skill.viz.neuronpedia import ACTIVATION_FIELDS, FEATURE_FIELDS, export_neuronpedia

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tiny_gpt2, tmp_path_factory):
    base = tmp_path_factory.mktemp("dashboard")
    run = tune(
        tiny_gpt2,
        load_task("rotten_tomatoes"),
        base / "run",
        TuneConfig(
            prompt_length=4,
            steps=3,
            eval_every=3,
            max_train_examples=48,
            max_dev_examples=24,
            max_test_examples=30,
            max_input_tokens=24,
        ),
        progress=False,
    )
    sn = find_skill_neurons(tiny_gpt2, [run], max_train_examples=48, max_eval_examples=24, progress=False)
    sn.save(base / "neurons")
    res = dashboard_data(tiny_gpt2, run, sn, base / "dash", top=4, n_examples=3, progress=False)
    return base, run, sn, res


def _single_example_activations(model, run, text_tokens, layer, neuron):
    """Slow reference: one example alone (no padding), the neuron at every position, via a plain hook."""
    layout = layout_for(model, run.prompt.length, run.config.max_input_tokens, run.config.padding_side)
    batch = layout.collate([text_tokens], [0])
    seen = {}

    def grab(act, hook):
        seen["a"] = act[0, :, neuron].detach().clone()

    with run.prompt.applied(model, batch), model.hooks(fwd_hooks=[(compat.mlp_post_hook(layer), grab)]):
        model(batch.input_ids, attention_mask=batch.attention_mask)
    return seen["a"], batch


def test_activations_and_top_examples_equal_slow_references(tiny_gpt2, made):
    _, run, sn, res = made
    es = EvalSet.of_run(run, tiny_gpt2, 200)
    assert res.n_examples == len(es.task["test"]) == 30
    layout = layout_for(tiny_gpt2, run.prompt.length, run.config.max_input_tokens, run.config.padding_side)
    tokens = layout.tokenize(es.task.texts("test"))
    for k, row in enumerate(res.neurons):
        l, i = row["layer"], row["neuron"]
        # the activation at the best prompt position on every example = trace_activations
        values, labels = trace_activations(
            tiny_gpt2,
            es.task,
            "test",
            run.prompt,
            [(l, i)],
            progress=False,
            max_input_tokens=run.config.max_input_tokens,
        )
        want = values[:, 0, row["position"]]
        torch.testing.assert_close(res.activations[:, k], want.float(), rtol=1e-5, atol=1e-6)
        assert torch.equal(res.labels, labels.long())
        # top and bottom examples: the extremes of that activation, in order
        order = np.argsort(-want.numpy(), kind="stable")
        assert [e["index"] for e in row["examples"]["top"]] == order[:3].tolist()
        assert [e["index"] for e in row["examples"]["bottom"]] == order[::-1][:3].tolist()
        # token-level activations over the whole sequence (input and prompt positions), one example at a time
        for ex in row["examples"]["top"][:2]:
            ref, batch = _single_example_activations(tiny_gpt2, run, tokens[ex["index"]], l, i)
            assert len(ex["values"]) == len(ref) == len(ex["tokens"])
            np.testing.assert_allclose(ex["values"], ref.numpy(), rtol=1e-4, atol=1e-5)
            assert sum(ex["is_prompt"]) == run.prompt.length
            want_tokens = [tiny_gpt2.tokenizer.decode([t]) for t in batch.input_ids[0].tolist()]
            assert ex["tokens"] == want_tokens


def test_direct_effect_equals_a_hand_computation(tiny_gpt2, made):
    _, run, sn, res = made
    hf = compat.hf_model_of(tiny_gpt2)
    es = EvalSet.of_run(run, tiny_gpt2, 200)
    layout = layout_for(tiny_gpt2, run.prompt.length, run.config.max_input_tokens, run.config.padding_side)
    ln = hf.transformer.ln_f
    pre_norm = []
    handle = ln.register_forward_hook(lambda mod, inp, out: pre_norm.append(inp[0].detach().double()))
    try:
        xs = []
        for tok in layout.tokenize(es.task.texts("test")):
            batch = layout.collate([tok], [0])
            pre_norm.clear()
            with run.prompt.applied(tiny_gpt2, batch):
                tiny_gpt2(batch.input_ids, attention_mask=batch.attention_mask)
            xs.append(pre_norm[-1][0, int(batch.pred_pos[0])])
    finally:
        handle.remove()
    x = torch.stack(xs)  # [N, d_model]: the stream entering ln_f at each prediction position
    scale = torch.sqrt(x.var(-1, unbiased=False) + ln.eps)
    ids = es.verbalizer.token_ids
    rows = hf.lm_head.weight[ids].detach().double()  # [C, d_model]
    for row in res.neurons:
        v = hf.transformer.h[row["layer"]].mlp.c_proj.weight[row["neuron"]].detach().double()  # Conv1D: [d_mlp, d]
        per_example = (rows @ ((v - v.mean()) * ln.weight.detach().double()))[None, :] / scale[:, None]
        np.testing.assert_allclose(row["direct_effect_per_unit"], per_example.mean(0).numpy(), rtol=1e-4)


def test_single_neuron_ablation_equals_perturb(tiny_gpt2, made):
    _, run, sn, res = made
    es = EvalSet.of_run(run, tiny_gpt2, 200)
    clean = evaluate(tiny_gpt2, es.task, "test", es.verbalizer, run.prompt, max_input_tokens=es.max_input_tokens)
    assert res.clean_accuracy == clean["accuracy"]
    for row in res.neurons:
        pert = Perturbation(tiny_gpt2, [(row["layer"], row["neuron"])], "mean", skill=sn)
        got = evaluate(
            tiny_gpt2,
            es.task,
            "test",
            es.verbalizer,
            run.prompt,
            max_input_tokens=es.max_input_tokens,
            extra_hooks=pert.fwd_hooks(),
        )
        assert row["ablated_accuracy"] == got["accuracy"]
        assert row["ablation_changed"] == int(
            ((got["predictions"] == es.task.labels("test")) != (clean["predictions"] == es.task.labels("test"))).sum()
        )


def test_saved_result_and_html(tiny_gpt2, made, tmp_path):
    base, run, sn, res = made
    assert DashboardResult.load(base / "dash") == res
    index = write_dashboard(res, tmp_path / "html")
    text = index.read_text()
    links = re.findall(r"href='(neuron_L\d+_\d+\.html)'", text)
    assert links == [page_name(r["layer"], r["neuron"]) for r in res.neurons]
    assert "http" not in text and "<script" not in text  # self-contained, no network
    row = res.neurons[0]
    page = (tmp_path / "html" / links[0]).read_text()
    assert "<svg" in page and f"{row['predictivity']:.3f}" in page
    shown = [float(v) for v in re.findall(r'class="tok[^"]*" style="[^"]*" title="([^"]+)"', page)]
    want = [v for side in ("top", "bottom") for ex in row["examples"][side] for v in ex["values"]]
    np.testing.assert_allclose(shown, want, rtol=1e-3)  # every token's value, as printed (4 significant digits)
    # another run's neurons are refused before any work
    other = type(sn)(**{**sn.__dict__, "task": "bbc_news"})
    with pytest.raises(DashboardError, match="task mismatch"):
        dashboard_data(tiny_gpt2, run, other, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_neuronpedia_export_has_the_documented_fields(made, tmp_path):
    _, _, _, res = made
    files = export_neuronpedia(res, tmp_path / "np", model_id="tiny-gpt2")
    layers = sorted({r["layer"] for r in res.neurons})
    assert len(files) == 2 * len(layers)
    features, activations = [], []
    for f in files:
        lines = [json.loads(x) for x in gzip.decompress(f.read_bytes()).decode().splitlines()]
        (features if f.parent.name == "features" else activations).extend(lines)
    assert len(features) == len(res.neurons)
    for feat in features:
        assert tuple(feat) == FEATURE_FIELDS
        row = next(
            r for r in res.neurons if str(r["neuron"]) == feat["index"] and feat["layer"].startswith(f"{r['layer']}-")
        )
        assert feat["hookName"] == f"blocks.{row['layer']}.mlp.hook_post"
        assert sum(feat["freq_hist_data_bar_heights"]) == res.n_examples
        assert feat["pos_str"] == row["logit_lens"]["pos_str"] and len(feat["neg_values"]) == 10
    assert len(activations) == sum(len(r["examples"]["top"]) + len(r["examples"]["bottom"]) for r in res.neurons)
    for act in activations:
        assert tuple(act) == ACTIVATION_FIELDS
        assert act["maxValue"] == max(act["values"]) and act["values"][act["maxValueTokenIndex"]] == act["maxValue"]
        assert len(act["tokens"]) == len(act["values"])


def test_cli_dashboard_and_export(made, tmp_path, capsys):
    base, run, _, _ = made
    args = [
        str(base / "neurons"),
        "--run",
        str(run.path),
        "--top",
        "2",
        "--examples",
        "2",
        "--max-examples",
        "20",
        "--device",
        "cpu",
        "-q",
    ]
    assert main(["dashboard", *args, "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "index.html").exists() and len(list((tmp_path / "d").glob("neuron_L*.html"))) == 2
    assert main(["export", "neuronpedia", *args, "--out", str(tmp_path / "e")]) == 0
    assert list((tmp_path / "e" / "tiny-gpt2").glob("*-tlskill-mlp/features/batch-0.jsonl.gz"))
    assert main(["dashboard", *args, "--top", "3", "--out", str(tmp_path / "d")]) == 2  # other settings
    assert "other settings: top (2 there, 3 here)" in capsys.readouterr().err


@pytest.mark.skipif(
    shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
    reason="the browser check needs Chromium (Debian package `chromium`)",
)
def test_dashboard_opens_in_headless_chromium(made, tmp_path):
    base, _, _, res = made
    write_dashboard(res, tmp_path / "html")
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "browser" / "check_dashboard.py"), str(tmp_path / "html")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "html" / "index.png").stat().st_size > 2000


# ------------------------------------------------------------- other unit sources
@pytest.fixture(scope="module", params=["attn", "resid"])
def unit_dash(request, tiny_gpt2, made):
    base, run, _, _ = made
    sn = find_skill_neurons(
        tiny_gpt2, [run], max_train_examples=48, max_eval_examples=24, progress=False, units=request.param
    )
    res = dashboard_data(tiny_gpt2, run, sn, base / f"dash_{request.param}", top=3, n_examples=2, progress=False)
    return request.param, run, sn, res


def _unit_hook(units, layer):
    return f"blocks.{layer}.attn.hook_z" if units == "attn" else f"blocks.{layer}.hook_resid_post"


def test_unit_dashboards_trace_the_units_they_name(tiny_gpt2, unit_dash):
    """attn / resid units: activations by a plain hook on one example at a time, the unit axis flattened by hand."""
    units, run, sn, res = unit_dash
    assert res.settings["units"] == units and all(r["units"] == units for r in res.neurons)
    es = EvalSet.of_run(run, tiny_gpt2, 200)
    layout = layout_for(tiny_gpt2, run.prompt.length, run.config.max_input_tokens, run.config.padding_side)
    tokens = layout.tokenize(es.task.texts("test"))
    d_head = tiny_gpt2.cfg.d_head
    for k, row in enumerate(res.neurons):
        l, i = row["layer"], row["neuron"]
        assert row["hook_name"] == _unit_hook(units, l)
        if units == "attn":
            assert (row["head"], row["head_dim"]) == (i // d_head, i % d_head)
        for e in (0, 7, 19):
            batch = layout.collate([tokens[e]], [0])
            seen = {}

            def grab(act, hook):
                a = act[0].detach()
                seen["a"] = a[:, i // d_head, i % d_head] if units == "attn" else a[:, i]

            with run.prompt.applied(tiny_gpt2, batch), tiny_gpt2.hooks(fwd_hooks=[(_unit_hook(units, l), grab)]):
                tiny_gpt2(batch.input_ids, attention_mask=batch.attention_mask)
            at = int(batch.prompt_start[0]) + row["position"]
            assert float(res.activations[e, k]) == pytest.approx(float(seen["a"][at]), rel=1e-5, abs=1e-6)
        for ex in row["examples"]["top"]:
            assert float(ex["value"]) == float(res.activations[ex["index"], k])


def test_unit_dashboards_direct_effect_and_ablation_by_hand(tiny_gpt2, unit_dash):
    units, run, sn, res = unit_dash
    hf = compat.hf_model_of(tiny_gpt2)
    es = EvalSet.of_run(run, tiny_gpt2, 200)
    layout = layout_for(tiny_gpt2, run.prompt.length, run.config.max_input_tokens, run.config.padding_side)
    ln = hf.transformer.ln_f
    xs = []
    handle = ln.register_forward_hook(lambda mod, inp, out: xs.append(inp[0].detach().double()))
    try:
        for tok in layout.tokenize(es.task.texts("test")):
            batch = layout.collate([tok], [0])
            with run.prompt.applied(tiny_gpt2, batch):
                tiny_gpt2(batch.input_ids, attention_mask=batch.attention_mask)
            xs[-1] = xs[-1][0, int(batch.pred_pos[0])]
    finally:
        handle.remove()
    x = torch.stack(xs)
    scale = torch.sqrt(x.var(-1, unbiased=False) + ln.eps)
    rows = hf.lm_head.weight[es.verbalizer.token_ids].detach().double()
    clean = evaluate(tiny_gpt2, es.task, "test", es.verbalizer, run.prompt, max_input_tokens=es.max_input_tokens)
    for row in res.neurons:
        l, i = row["layer"], row["neuron"]
        if units == "attn":  # hook_z unit (head, dim) is input i of c_proj (Conv1D: [in, out])
            v = hf.transformer.h[l].attn.c_proj.weight[i].detach().double()
        else:
            v = torch.zeros(hf.config.n_embd, dtype=torch.float64)
            v[i] = 1.0
        per_example = (rows @ ((v - v.mean()) * ln.weight.detach().double()))[None, :] / scale[:, None]
        np.testing.assert_allclose(row["direct_effect_per_unit"], per_example.mean(0).numpy(), rtol=1e-4, atol=1e-9)
        pert = Perturbation(tiny_gpt2, [(l, i)], "mean", skill=sn)  # the neurons' own units
        got = evaluate(
            tiny_gpt2,
            es.task,
            "test",
            es.verbalizer,
            run.prompt,
            max_input_tokens=es.max_input_tokens,
            extra_hooks=pert.fwd_hooks(),
        )
        assert row["ablated_accuracy"] == got["accuracy"]
        assert row["ablation_delta"] == pytest.approx(got["accuracy"] - clean["accuracy"])


def test_unit_dashboards_html_export_and_refusals(tiny_gpt2, unit_dash, tmp_path):
    units, run, sn, res = unit_dash
    index = write_dashboard(res, tmp_path / "html").read_text()
    noun = {"attn": "attention unit", "resid": "residual dimension"}[units]
    assert f"<th class='l'>{noun}</th>" in index and f"units ({units})" in index
    if units == "attn":
        r = res.neurons[0]
        assert f"L{r['layer']}.H{r['head']}.d{r['head_dim']}" in index
    files = export_neuronpedia(res, tmp_path / "np", model_id="tiny-gpt2")
    assert all(f"-tlskill-{units}" in str(f) for f in files)
    other = "resid" if units == "attn" else "attn"
    with pytest.raises(DashboardError, match=f"found on '{units}' units; units '{other}' are other units"):
        dashboard_data(tiny_gpt2, run, sn, tmp_path / "x", units=other, progress=False)
    assert not (tmp_path / "x").exists()
