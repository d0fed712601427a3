"""Unit sources beyond MLP neurons (units.py): residual stream, attention heads, SAE latents."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tl_skill import SoftPrompt, TuneConfig, compat, load_task, model_spec
from tl_skill.data import subsample
from tl_skill.find import find_skill_neurons
from tl_skill.perturb import Perturbation, PerturbationError
from tl_skill.record import Recorder, RecordingError
from tl_skill.tuning import layout_for
from tl_skill.units import SAE, UnitError, head_scores, unit_source

P, N_TRAIN, N_DEV = 3, 40, 30
TOKENS = TuneConfig().max_input_tokens  # the layout of prompts probed in memory


@pytest.fixture(scope="module")
def task(small_task):
    full = load_task("rotten_tomatoes", seed=0, label_words=small_task.spec.label_words)
    return subsample(full, {"train": N_TRAIN, "dev": N_DEV, "test": 20}, seed=0)


@pytest.fixture(scope="module")
def prompt(tiny_llama):
    return SoftPrompt.from_vocab(tiny_llama, P, seed=2)


def _find(model, task, prompt, units):
    return find_skill_neurons(
        model,
        task,
        prompts=[prompt],
        max_train_examples=N_TRAIN,
        max_eval_examples=N_DEV,
        confirm_split=None,
        progress=False,
        units=units,
    )


def _slow_predictivity(model, task, prompt, hook_of, layers, flatten=lambda a: a):
    """Every activation stored (one batch per split), baseline by math.fsum, accuracy by counting."""

    def acts(split):
        texts, labels = task.texts(split), task.labels(split)
        batch = layout_for(model, prompt.length, TOKENS).encode(texts, labels)
        with prompt.applied(model, batch), torch.no_grad():
            _, cache = model.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask)
        out = []
        for l in layers:
            a = flatten(cache[hook_of(l)])
            out.append(np.stack([a[r, int(s) : int(s) + P].double().numpy() for r, s in enumerate(batch.prompt_start)]))
        return np.stack(out, 1), labels  # [N, L, P, D]

    train, _ = acts("train")
    flat = train.reshape(len(train), -1)
    base = np.array([math.fsum(c) / len(train) for c in flat.T]).reshape(train.shape[1:])
    dev, y = acts("dev")
    acc = ((dev > base[None]) == (y == 1)[:, None, None, None]).mean(0)
    return np.maximum(acc, 1 - acc).max(-2)  # [L, D]


@pytest.mark.parametrize("units", ["mlp", "resid", "attn"])
def test_resid_and_attn_predictivity_equal_a_slow_reference(tiny_llama, task, prompt, units):
    spec = model_spec(tiny_llama)
    sn = _find(tiny_llama, task, prompt, units)
    if units == "mlp":  # the reference itself, against the path every other test checks
        want = _slow_predictivity(tiny_llama, task, prompt, compat.mlp_post_hook, range(spec.n_layers))
    elif units == "resid":
        want = _slow_predictivity(
            tiny_llama, task, prompt, lambda l: f"blocks.{l}.hook_resid_post", range(spec.n_layers)
        )
        assert sn.predictivity.shape == (spec.n_layers, spec.d_model)
    else:
        want = _slow_predictivity(
            tiny_llama,
            task,
            prompt,
            lambda l: f"blocks.{l}.attn.hook_z",
            range(spec.n_layers),
            flatten=lambda a: a.flatten(-2),
        )
        h = tiny_llama.cfg.n_heads
        assert sn.predictivity.shape == (spec.n_layers, h * tiny_llama.cfg.d_head)
        heads = head_scores(sn.predictivity, h)
        assert heads.shape == (spec.n_layers, h)
        torch.testing.assert_close(
            heads, torch.as_tensor(want).reshape(spec.n_layers, h, -1).max(-1).values.to(heads.dtype)
        )
    assert sn.units == units and (units == "mlp") == ("units" not in sn.meta)
    np.testing.assert_array_equal(sn.predictivity.double().numpy(), want)


def _write_sae(path, hook, W_enc, b_enc, W_dec, b_dec, architecture="jumprelu", threshold=None):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    d_in, d_sae = W_enc.shape
    (path / "cfg.json").write_text(
        json.dumps({"hook_name": hook, "d_in": d_in, "d_sae": d_sae, "architecture": architecture})
    )
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if threshold is not None:
        tensors["threshold"] = threshold
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


@pytest.fixture(scope="module")
def permutation_sae(tiny_llama, tmp_path_factory):
    """At layer 1's MLP: latent j = neuron perm[j] exactly (permutation encoder, a threshold below every value)."""
    d = model_spec(tiny_llama).d_mlp
    perm = torch.randperm(d, generator=torch.Generator().manual_seed(0))
    E = torch.zeros(d, d)
    E[perm, torch.arange(d)] = 1.0
    path = _write_sae(
        tmp_path_factory.mktemp("sae") / "perm",
        "blocks.1.mlp.hook_post",
        E,
        torch.zeros(d),
        E.T.clone(),
        torch.zeros(d),
        threshold=torch.full((d,), -1e30),
    )
    return path, perm


def test_an_sae_that_copies_neurons_gives_their_predictivity_and_their_perturbation(
    tiny_llama, task, prompt, permutation_sae
):
    path, perm = permutation_sae
    source = unit_source(tiny_llama, f"sae:{path}")
    assert source.layers == (1,) and source.width == model_spec(tiny_llama).d_mlp
    latents = _find(tiny_llama, task, prompt, f"sae:{path}")
    neurons = _find(tiny_llama, task, prompt, "mlp")
    assert latents.layers == [1] and latents.units == f"sae:{path}"
    assert torch.equal(latents.predictivity[0], neurons.predictivity[1][perm])
    batch = layout_for(tiny_llama, P, TOKENS).encode(task.texts("test")[:6], task.labels("test")[:6])
    for j in (0, 5, 17):
        lat_mask = torch.zeros(1, source.width, dtype=torch.bool)
        lat_mask[0, j] = True
        neu_mask = torch.zeros(model_spec(tiny_llama).n_layers, source.width, dtype=torch.bool)
        neu_mask[1, perm[j]] = True
        with torch.no_grad(), prompt.applied(tiny_llama, batch):
            with Perturbation(tiny_llama, lat_mask, "zero", skill=latents).attached():
                by_latent = compat.forward(tiny_llama, batch.input_ids, batch.attention_mask)
            with Perturbation(tiny_llama, neu_mask, "zero").attached():
                by_neuron = compat.forward(tiny_llama, batch.input_ids, batch.attention_mask)
            clean = compat.forward(tiny_llama, batch.input_ids, batch.attention_mask)
        torch.testing.assert_close(by_latent, by_neuron, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(by_latent, clean, rtol=1e-6, atol=1e-6)


def test_untouched_latents_leave_the_model_bit_identical(tiny_llama, tmp_path):
    """A random ReLU SAE on the residual stream: recorded latents are its encoder's, and a perturbation that
    changes no latent value keeps the reconstruction error, so the logits do not move at all."""
    d = model_spec(tiny_llama).d_model
    g = torch.Generator().manual_seed(1)
    W_enc, W_dec = torch.randn(d, 2 * d, generator=g) / 8, torch.randn(2 * d, d, generator=g) / 8
    b_enc, b_dec = torch.randn(2 * d, generator=g) / 10, torch.randn(d, generator=g) / 10
    path = _write_sae(tmp_path / "resid", "blocks.0.hook_resid_post", W_enc, b_enc, W_dec, b_dec, "standard")
    sae = SAE.load(path)
    ids = torch.randint(10, 4000, (2, 9), generator=g)
    mask = torch.ones(1, 2 * d, dtype=torch.bool)
    with torch.no_grad():
        clean = tiny_llama(ids)
        with Perturbation(tiny_llama, mask, lambda u, layer, idx: u, units=f"sae:{path}").attached():
            same = tiny_llama(ids)
        with Perturbation(tiny_llama, mask, "zero", units=f"sae:{path}").attached():
            zeroed = tiny_llama(ids)
        _, cache = tiny_llama.run_with_cache(ids, names_filter="blocks.0.hook_resid_post")
    assert torch.equal(same, clean)
    # zeroing every latent removes the whole decoder contribution but keeps the error term
    x = cache["blocks.0.hook_resid_post"]
    recon = sae.decode(sae.encode(x))
    want_resid = x - (recon - b_dec)
    hooked = []
    with torch.no_grad(), Perturbation(tiny_llama, mask, "zero", units=f"sae:{path}").attached():
        with tiny_llama.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: hooked.append(a.clone()))]):
            tiny_llama(ids)
    torch.testing.assert_close(hooked[0], want_resid, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(zeroed, clean)


def test_width_mismatches_and_bad_sources_are_refused(tiny_llama, tiny_gpt2, tmp_path, permutation_sae):
    path, _ = permutation_sae
    # an SAE for tiny-llama's MLP (width 192) on tiny-gpt2 (d_mlp 256): named when the hook runs
    with pytest.raises(RecordingError, match=r"\(192,\).*192 units|192"):
        rec = Recorder(tiny_gpt2, _Null(), units=f"sae:{path}")
        with rec.attached(), torch.no_grad():
            tiny_gpt2(torch.tensor([[5, 6, 7]]))
    with pytest.raises(UnitError, match="unknown unit source"):
        unit_source(tiny_llama, "heads")
    with pytest.raises(UnitError, match="cfg.json"):
        unit_source(tiny_llama, f"sae:{tmp_path}")
    bad = _write_sae(
        tmp_path / "bad",
        "blocks.0.hook_resid_post",
        torch.zeros(64, 8),
        torch.zeros(8),
        torch.zeros(8, 32),
        torch.zeros(64),
        "standard",
    )
    with pytest.raises(UnitError, match="W_dec has shape"):
        unit_source(tiny_llama, f"sae:{bad}")
    with pytest.raises(PerturbationError, match="units per layer"):
        sn = _find(tiny_llama, _task_of(tiny_llama), SoftPrompt.from_vocab(tiny_llama, P), "resid")
        Perturbation(tiny_llama, torch.zeros(3, 192, dtype=torch.bool), "zero", skill=sn, units="mlp")


class _Null:
    def count_batch(self, labels):
        pass

    def update(self, slot, x, labels):
        pass


def _task_of(model):
    return subsample(load_task("rotten_tomatoes", seed=0), {"train": 12, "dev": 10, "test": 4}, seed=0)


@pytest.mark.parametrize("units", ["resid", "attn"])
def test_perturbing_resid_and_attn_units_reaches_the_output(tiny_llama, units):
    """Writes at hook_resid_post / attn.hook_z feed the rest of the model (a zeroed head changes the logits,
    and equals zeroing that head's slice of hook_z by hand)."""
    source = unit_source(tiny_llama, units)
    ids = torch.tensor([[11, 52, 300, 7, 99]])
    mask = torch.zeros(model_spec(tiny_llama).n_layers, source.width, dtype=torch.bool)
    mask[1, :16] = True  # attn: head 0 of layer 1; resid: the first 16 directions
    with torch.no_grad():
        clean = tiny_llama(ids)
        with Perturbation(tiny_llama, mask, "zero", units=units).attached():
            ours = tiny_llama(ids)

        def by_hand(a, hook):
            a = a.clone()
            if units == "attn":
                a[:, :, 0, :] = 0
            else:
                a[..., :16] = 0
            return a

        with tiny_llama.hooks(fwd_hooks=[(source.hook(1), by_hand)]):
            want = tiny_llama(ids)
    assert torch.equal(ours, want) and not torch.allclose(ours, clean)


def test_cli_find_takes_units_and_refuses_bad_ones_before_work(tmp_path, tiny_llama, capsys):
    from tl_skill.cli import main
    from tl_skill.neurons import SkillNeurons

    run = tmp_path / "run"
    from tests.test_neurons import write_run

    write_run(run, "tiny-llama", SoftPrompt.from_vocab(tiny_llama, P, seed=2), max_input_tokens=TOKENS)
    common = [
        "find",
        str(run),
        "--max-train-examples",
        "20",
        "--max-eval-examples",
        "10",
        "--confirm-split",
        "none",
        "-q",
        "--device",
        "cpu",
    ]
    with pytest.raises(SystemExit):
        main(common + ["--out", str(tmp_path / "x"), "--units", "heads"])
    assert "unknown units" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(common + ["--out", str(tmp_path / "y"), "--units", f"sae:{tmp_path}"])
    assert "not a SAELens directory" in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "attn"), "--units", "attn"]) in (0, None)
    sn = SkillNeurons.load(tmp_path / "attn")
    assert sn.units == "attn" and sn.predictivity.shape == (3, 64)


def test_units_by_layer_figure_and_numbers(tiny_llama, task, prompt, tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "units_by_layer", Path(__file__).resolve().parents[1] / "benchmarks" / "units_by_layer.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dirs = []
    for units in ("mlp", "attn"):
        sn = _find(tiny_llama, task, prompt, units)
        sn.save(tmp_path / units)
        dirs.append(f"{units}={tmp_path / units}")
    mod.main([*dirs, "--out", str(tmp_path / "u.json"), "--figure", str(tmp_path / "u.png")])
    out = json.loads((tmp_path / "u.json").read_text())["sources"]
    attn = _find(tiny_llama, task, prompt, "attn").predictivity
    assert out["attn"]["best_by_layer"] == attn.max(1).values.tolist() and out["attn"]["width"] == 64
    assert (tmp_path / "u.png").stat().st_size > 1000


# ----------------------------------------------------- dashboards, ablation and transfer on units
def test_sae_latent_dashboards_equal_the_neurons_they_copy(tiny_llama, task, prompt, permutation_sae, tmp_path):
    """Latent j of the permutation SAE is neuron perm[j]: its dashboard row (activations, examples, direct
    effect through W_dec @ W_out, logit lens, single-unit ablation) equals that neuron's."""
    from tl_skill.experiments.dashboard import dashboard_data
    from tl_skill.tuning.runs import Run

    path, perm = permutation_sae
    run = Run.in_memory(prompt, task, "tiny-llama", TuneConfig(prompt_length=P, max_test_examples=20))
    latents = _find(tiny_llama, task, prompt, f"sae:{path}")
    neurons = find_skill_neurons(
        tiny_llama,
        task,
        prompts=[prompt],
        max_train_examples=N_TRAIN,
        max_eval_examples=N_DEV,
        confirm_split=None,
        progress=False,
        layers=[1],
    )
    d = model_spec(tiny_llama).d_mlp
    lat = dashboard_data(tiny_llama, run, latents, tmp_path / "lat", top=4, n_examples=3, progress=False)
    neu = dashboard_data(tiny_llama, run, neurons, None, top=d, n_examples=3, progress=False)
    by_neuron = {r["neuron"]: k for k, r in enumerate(neu.neurons)}
    assert lat.settings["units"] == f"sae:{path}"
    for k, row in enumerate(lat.neurons):
        assert row["layer"] == 1 and row["hook_name"] == "blocks.1.mlp.hook_post"
        kn = by_neuron[int(perm[row["neuron"]])]
        ref = neu.neurons[kn]
        assert torch.equal(lat.activations[:, k], neu.activations[:, kn])
        for key in (
            "predictivity",
            "position",
            "direction",
            "direct_effect_per_unit",
            "direct_effect_mean",
            "logit_lens",
            "ablated_accuracy",
            "examples",
        ):
            assert row[key] == ref[key], key


def test_ablation_units_override_is_checked(tiny_llama, task, prompt, permutation_sae, tmp_path):
    """`units=`: an SAE directory that moved is accepted (same latents, same result); other units are refused
    before any work."""
    import shutil

    from tl_skill.experiments.ablation import AblationError, ablation_experiment

    path, _ = permutation_sae
    latents = _find(tiny_llama, task, prompt, f"sae:{path}")
    kw = dict(task=task, fractions=[0.05], seeds=1, mode="zero", max_examples=20, progress=False)
    first = ablation_experiment(tiny_llama, prompt, latents, tmp_path / "a", **kw)
    moved = shutil.copytree(path, tmp_path / "moved")
    again = ablation_experiment(tiny_llama, prompt, latents, tmp_path / "b", units=f"sae:{moved}", **kw)
    assert again.rows == first.rows and again.settings["units"] == f"sae:{moved}"
    with pytest.raises(AblationError, match="are other units"):
        ablation_experiment(tiny_llama, prompt, latents, tmp_path / "c", units="mlp", **kw)
    small = _write_sae(
        tmp_path / "small",
        "blocks.1.mlp.hook_post",
        torch.zeros(192, 8),
        torch.zeros(8),
        torch.zeros(8, 192),
        torch.zeros(192),
        "standard",
    )
    with pytest.raises(AblationError, match="192 units per layer but the model's .* 8 wide"):
        ablation_experiment(tiny_llama, prompt, latents, tmp_path / "d", units=f"sae:{small}", **kw)
    assert not (tmp_path / "c").exists()


def test_transfer_indicators_on_resid_units_equal_slow_references(tiny_llama, task, tmp_path):
    """run_transfer on `resid` skill units: neuron indicators from their predictivity (scipy), activation
    overlap from the prompt read alone with every hook_resid_post stored; mixing units is refused."""
    from scipy.stats import spearmanr

    from tl_skill.experiments.transfer import run_transfer
    from tl_skill.indicators import TransferError
    from tl_skill.tuning.runs import Run

    other = subsample(load_task("word_sentiment", seed=0), {"train": N_TRAIN, "dev": N_DEV, "test": 10}, seed=0)
    prompts = {t.name: SoftPrompt.from_vocab(tiny_llama, P, seed=s) for t, s in ((task, 4), (other, 5))}
    runs = {t.name: [Run.in_memory(prompts[t.name], t, "tiny-llama")] for t in (task, other)}
    sns = [_find(tiny_llama, t, prompts[t.name], "resid") for t in (task, other)]
    res = run_transfer(tiny_llama, sns, runs, tmp_path / "tr", transfer_steps=0, max_eval_examples=10, progress=False)
    assert res.settings["units"] == "resid" and res.settings["top_k_per_layer"] == 1
    rho = spearmanr(sns[0].predictivity.flatten().numpy(), sns[1].predictivity.flatten().numpy())[0]
    assert res.indicators["neuron_spearman"][0][1] == pytest.approx(rho, abs=1e-12)

    def states(p):
        layout = layout_for(tiny_llama, p.length, TOKENS)
        batch = layout.collate([[]], [0])
        with p.applied(tiny_llama, batch), torch.no_grad():
            _, cache = tiny_llama.run_with_cache(batch.input_ids, attention_mask=batch.attention_mask)
        n = model_spec(tiny_llama).n_layers
        return np.stack([cache[f"blocks.{l}.hook_resid_post"][0, -p.length :].numpy() > 0 for l in range(n)])

    a, b = states(prompts[task.name]), states(prompts[other.name])
    assert res.indicators["activated_jaccard"][0][1] == pytest.approx((a & b).sum() / (a | b).sum(), abs=1e-12)
    mlp = _find(tiny_llama, other, prompts[other.name], "mlp")
    with pytest.raises(TransferError, match="found on 'resid' units, those of .* on 'mlp'"):
        run_transfer(tiny_llama, [sns[0], mlp], runs, tmp_path / "mixed", transfer_steps=0, progress=False)
    with pytest.raises(TransferError, match="are other units"):
        run_transfer(tiny_llama, sns, runs, tmp_path / "attn", transfer_steps=0, units="attn", progress=False)
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "attn").exists()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_attn_out_vectors_write_the_attention_output(name):
    """The attention output is hook_z (heads x dims flattened) times `attn_out_vectors`, plus one bias."""
    from tl_skill import load_model

    model = load_model(name, device="cpu")
    ids = torch.tensor([[11, 52, 300, 7, 99, 1000]])
    for l in range(model_spec(model).n_layers):
        out_name = next(n for n in (f"blocks.{l}.hook_attn_out", f"blocks.{l}.attn.hook_out") if n in model.hook_dict)
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, names_filter=[f"blocks.{l}.attn.hook_z", out_name])
        z = cache[f"blocks.{l}.attn.hook_z"][0].flatten(-2).double()
        rest = cache[out_name][0].double() - z @ compat.attn_out_vectors(model, l).double()
        torch.testing.assert_close(rest, rest[:1].expand_as(rest), rtol=0, atol=1e-5)  # the same bias everywhere
        assert z.abs().max() > 1e-3


def test_cli_ablate_dashboard_transfer_take_units(tmp_path, tiny_llama, capsys):
    """`--units` on ablate / dashboard / transfer: the neurons' own units by default, other units refused before
    any work (exit 2, nothing written), the indicators computed on the units found."""
    from tests.test_neurons import write_run
    from tl_skill.cli import main

    ws_words = load_task("word_sentiment").spec.label_words
    runs = {
        "rt": write_run(
            tmp_path / "rt", "tiny-llama", SoftPrompt.from_vocab(tiny_llama, P, seed=2), max_input_tokens=TOKENS
        ),
        "ws": write_run(
            tmp_path / "ws",
            "tiny-llama",
            SoftPrompt.from_vocab(tiny_llama, P, seed=3),
            task="word_sentiment",
            label_words=ws_words,
            max_input_tokens=TOKENS,
        ),
    }
    common = ["--device", "cpu", "-q"]
    for t, run in runs.items():
        assert main(
            [
                "find",
                str(run),
                "--out",
                str(tmp_path / f"n_{t}"),
                "--units",
                "attn",
                "--max-train-examples",
                "20",
                "--max-eval-examples",
                "10",
                "--confirm-split",
                "none",
                *common,
            ]
        ) in (0, None)
    abl = [
        "ablate",
        str(runs["rt"]),
        "--neurons",
        str(tmp_path / "n_rt"),
        "--fractions",
        "0.05",
        "--seeds",
        "1",
        "--mode",
        "zero",
        "--max-examples",
        "10",
        *common,
    ]
    assert main(abl + ["--out", str(tmp_path / "a_bad"), "--units", "resid"]) == 2
    assert "found on 'attn' units; units 'resid' are other units" in capsys.readouterr().err
    assert not (tmp_path / "a_bad").exists()
    assert main(abl + ["--out", str(tmp_path / "a"), "--units", "attn"]) in (0, None)
    assert json.loads((tmp_path / "a" / "ablation.json").read_text())["settings"]["units"] == "attn"
    dash = [
        "dashboard",
        str(tmp_path / "n_rt"),
        "--run",
        str(runs["rt"]),
        "--top",
        "2",
        "--examples",
        "1",
        "--max-examples",
        "10",
        *common,
    ]
    assert main(dash + ["--out", str(tmp_path / "d_bad"), "--units", "mlp"]) == 2
    assert not (tmp_path / "d_bad").exists()
    assert main(dash + ["--out", str(tmp_path / "d")]) in (0, None)
    assert "attention unit" in (tmp_path / "d" / "index.html").read_text()
    tr = [
        "transfer",
        str(tmp_path / "n_rt"),
        str(tmp_path / "n_ws"),
        "--transfer-steps",
        "0",
        "--max-eval-examples",
        "10",
        "--no-figures",
        *common,
    ]
    assert main(tr + ["--out", str(tmp_path / "t_bad"), "--units", "mlp"]) == 2
    assert not (tmp_path / "t_bad").exists()
    capsys.readouterr()
    assert main(tr + ["--out", str(tmp_path / "t"), "--json"]) in (0, None)
    got = json.loads((tmp_path / "t" / "transfer.json").read_text())
    assert got["settings"]["units"] == "attn" and got["settings"]["top_k_per_layer"] == 1


def test_pruning_refuses_units_other_than_mlp_neurons(tiny_llama, task, prompt, permutation_sae, tmp_path):
    """An SAE as wide as d_mlp would otherwise prune the neurons with the latents' indices."""
    from tl_skill.experiments.pruning import prune_experiment
    from tl_skill.prune import PruneError, prune_model
    from tl_skill.tuning.runs import Run

    path, _ = permutation_sae
    latents = _find(tiny_llama, task, prompt, f"sae:{path}")
    assert latents.d_mlp == model_spec(tiny_llama).d_mlp
    with pytest.raises(PruneError, match="pruning removes MLP neurons, but these skill units are 'sae:"):
        prune_model(tiny_llama, latents, keep=0.1)
    run = Run.in_memory(prompt, task, "tiny-llama")
    with pytest.raises(PruneError, match="units='mlp'"):
        prune_experiment(tiny_llama, run, latents, tmp_path / "p")
    assert not (tmp_path / "p").exists()
