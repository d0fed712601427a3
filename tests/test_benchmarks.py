"""Every benchmark script imports and runs on a tiny model (its numbers are checked where they are computed).

A new script in benchmarks/ must be added to SMOKED below, with a smoke test.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tl_skill import TuneConfig, find_skill_neurons, tune

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# script -> the test that smoke-runs it
SMOKED = {
    "bench_tuning_step": "test_tuning_step_benchmark_writes_the_cached_ratio",
    "bench_attribution": "test_attribution_benchmark_writes_the_ratio",
    "certify_matrix": "test_certify_matrix_writes_rows_and_the_docs_table",
    "bench_bf16": "test_bf16_benchmark_writes_timings_and_differences",
    "bench_gpu_record": "test_gpu_record_benchmark_runs_on_the_cpu",
    "bench_record": "test_record_benchmark_compares_with_run_with_cache",
    "prune_baseline_probe": "test_prune_baseline_probe_runs",
    "units_by_layer": "tests/test_units.py::test_units_by_layer_figure_and_numbers",
    "causal_summary": "tests/test_causal.py::test_causal_summary_script",
    "study_summary": "tests/test_transfer.py::test_study_summary_script",
    "claims": "test_claims_rules_on_hand_made_results",
}


def test_every_benchmark_script_is_smoke_tested():
    scripts = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert scripts == sorted(SMOKED)
    for script in scripts:
        _bench(script)  # imports


def _bench(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tuning_step_benchmark_writes_the_cached_ratio(tmp_path):
    """The benchmark's JSON (tiny model, one step): the cached step's ratio to PEFT, its P, and the same loss."""
    _bench("bench_tuning_step").main(
        [
            "--model",
            "tiny-llama",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--prompt-length",
            "4",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "b.json"),
        ]
    )
    got = json.loads((tmp_path / "b.json").read_text())
    assert got["prompt_length"] == 4 and got["ratio_cached_vs_peft"] > 0
    assert got["ratio_cached_vs_peft"] == pytest.approx(got["cached_median_seconds"] / got["peft_median_seconds"])
    assert got["cached_loss_max_abs_difference"] < 1e-5  # the same losses as the full pass


def test_bf16_benchmark_writes_timings_and_differences(tmp_path):
    _bench("bench_bf16").main(
        [
            "--model",
            "tiny-llama",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--tune-steps",
            "2",
            "--test",
            "20",
            "--record-train",
            "24",
            "--record-dev",
            "12",
            "--record-reps",
            "1",
            "--out",
            str(tmp_path / "b.json"),
        ]
    )
    got = json.loads((tmp_path / "b.json").read_text())
    assert set(got["step_median_seconds"]) == {"float32", "bfloat16"}
    assert 0 <= got["predictivity"]["top1pct_overlap"] <= 1 and got["predictivity"]["max_abs_difference"] >= 0
    assert got["step_ratio_bf16_over_fp32"] == pytest.approx(
        got["step_median_seconds"]["bfloat16"] / got["step_median_seconds"]["float32"]
    )


def test_gpu_record_benchmark_runs_on_the_cpu(tmp_path):
    got = _bench("bench_gpu_record").main(
        [
            "--model",
            "tiny-llama",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--n",
            "48",
            "--out",
            str(tmp_path / "g.json"),
        ]
    )
    saved = json.loads((tmp_path / "g.json").read_text())
    assert saved == json.loads(json.dumps(got))
    assert saved["n_train"] == 48 and saved["tokens"] > 0
    assert saved["tokens_per_s"] == pytest.approx(saved["tokens"] / saved["seconds"])
    assert 0.5 <= saved["best_predictivity"] <= 1


def test_record_benchmark_compares_with_run_with_cache(tmp_path):
    got = _bench("bench_record").main(
        [
            "--model",
            "tiny-llama",
            "--device",
            "cpu",
            "--n",
            "32",
            "--reps",
            "1",
            "--no-memory",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == json.loads(json.dumps(got))
    assert saved["examples"] == 32 and saved["max_abs_difference_recorder_vs_cache"] < 1e-9
    med = saved["median_seconds"]
    assert saved["ratio_recorder_vs_forward"] == pytest.approx(med["recorder"] / med["forward"])


def test_prune_baseline_probe_runs(tiny_llama, small_task, tmp_path):
    run = tune(
        tiny_llama,
        small_task,
        tmp_path / "run",
        TuneConfig(prompt_length=4, steps=2, eval_every=2),
        progress=False,
        evaluate_test=False,
    )
    sn = find_skill_neurons(tiny_llama, [run], max_train_examples=40, max_eval_examples=30, progress=False)
    sn.save(tmp_path / "neurons")
    _bench("prune_baseline_probe").main(
        [
            str(run.path),
            str(tmp_path / "neurons"),
            "--keep",
            "0.1",
            "--layers",
            "1-2",
            "--n-train",
            "16",
            "--n-test",
            "20",
            "--out",
            str(tmp_path / "p.json"),
        ]
    )
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["layers"] == [1, 2]
    for key in ("unpruned", "prompt_position_baseline", "all_position_mean"):
        assert 0 <= saved[key] <= 1


def test_certify_matrix_writes_rows_and_the_docs_table(tmp_path):
    doc = tmp_path / "arch.md"
    doc.write_text("before\n<!-- matrix -->\nold\n<!-- /matrix -->\nafter\n")
    out = tmp_path / "m.json"
    _bench("certify_matrix").main(["--models", "tiny-llama,tiny-mixtral", "--out", str(out), "--doc", str(doc)])
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["tiny-llama"]["passed"] and set(rows["tiny-llama"]["end_to_end"]) == {"tune", "find", "ablate", "prune"}
    assert not rows["tiny-mixtral"]["passed"] and "refused" in rows["tiny-mixtral"]["end_to_end"]
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert "| `tiny-llama` | Llama | ✓ |" in text and "| `tiny-mixtral` | Mixtral | ✓ | ✗ |" in text


def test_attribution_benchmark_writes_the_ratio(tmp_path):
    out = tmp_path / "a.json"
    got = _bench("bench_attribution").main(
        ["--model", "tiny-llama", "--examples", "8", "--batch-size", "4", "--prompt-length", "2", "--repeats", "1",
         "--out", str(out)]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["ratio_attribute_to_record"] == pytest.approx(
        saved["median_seconds"]["attribute"] / saved["median_seconds"]["record"]
    )
    assert got["examples"] == 8 and len(saved["seconds"]["record"]) == 1


def test_the_claims_tables_are_the_results():
    """README.md and docs/results/index.md show what benchmarks/claims.py derives from the JSON."""
    assert _bench("claims").main(["--check"]) == 0


def _ablation(fractions_hurt: dict[float, bool]) -> dict:
    rows = [
        {
            "fraction": f,
            "clean_accuracy": 0.8,
            "skill_accuracy": 0.6 if hurt else 0.78,
            "random_accuracy": 0.77,
            "paired": {
                "skill_hurts_more": hurt,
                "difference": -0.17 if hurt else 0.01,
                "ci_low": -0.2,
                "ci_high": -0.1 if hurt else 0.05,
                "mcnemar_p": [0.001],
            },
        }
        for f, hurt in fractions_hurt.items()
    ]
    return {
        "rows": rows,
        "majority_accuracy": 0.5,
        "mode": "noise",
        "settings": {"relative": False, "std": 0.1},
        "n_examples": 1000,
        "seeds": [0, 1, 2],
        "fractions": list(fractions_hurt),
    }


def test_claims_rules_on_hand_made_results(tmp_path, monkeypatch):
    mod = _bench("claims")
    for fam in mod.FAMILIES.values():  # every result set names the command that makes it
        for key, spec in fam.items():
            options = spec if key == "b" else [spec if isinstance(spec, list) else [spec]]
            assert all(option[0] in mod.COMMANDS for option in options), (key, spec)
    monkeypatch.setattr(mod, "RESULTS", tmp_path)
    assert all(mod.cell(f, c) == "not run" for f in mod.FAMILIES for c in mod.CLAIMS)
    src = mod.FAMILIES["smollm2-135m"]

    def put(name, obj):
        (tmp_path / name).write_text(json.dumps(obj))

    neurons = {"runs": ["r0"], "prompt_test_accuracy": 0.81}
    put(src["a"], {**neurons, "statistics": {"top": [{"heldout_predictivity": 0.795, "heldout_p_value": 1e-9}]}})
    assert mod.cell("smollm2-135m", "a") == "**holds** (0.795 held out vs prompt 0.810)"
    put(src["a"], {**neurons, "statistics": {"top": [{"heldout_predictivity": 0.785, "heldout_p_value": 1e-9}]}})
    assert mod.cell("smollm2-135m", "a").startswith("**does not hold**")
    put(src["b"][1][0], {**_ablation({0.01: False}), "n_examples": 300})  # the less powered set, alone
    assert mod.cell("smollm2-135m", "b") == "**does not hold** (300 test examples, 3 seeds; noise σ=0.1)"
    put(src["b"][0][0], _ablation({0.01: True, 0.05: True}))  # the powered set, once it exists, decides
    assert mod.cell("smollm2-135m", "b") == "**holds at 1 and 5%** (1,000 test examples, 3 seeds; noise σ=0.1)"
    put(src["b"][0][2], {**_ablation({0.01: True, 0.05: False}), "mode": "mean"})  # every mode must agree
    assert mod.cell("smollm2-135m", "b").startswith("**holds at 1%** only")
    sources = mod.sources_table()
    assert "`power_noise.json`, `power_mean.json`" in sources and "stats_rt_ablation" not in sources
    prune = {"kept_fraction": 0.02, "layers": [8, 9, 29], "accuracy_before": 0.84, "speedup": 1.9}
    put(src["d"][0], {**prune, "accuracy_after": 0.6})
    put(src["d"][1], {**prune, "kept_fraction": 0.25, "accuracy_after": 0.835})
    assert mod.cell("smollm2-135m", "d") == (
        "**does not hold** at the paper's setting (2% of layers 8–29: 0.600 vs 0.840, 1.90x faster); "
        "keeps the accuracy at 25% of layers 8–29: 0.835 vs 0.840, 1.90x faster"
    )
    put(src["c"], {"random_weights": {"pretrained": {"best_predictivity": 0.8}, "random": {"best_predictivity": 0.76}}})
    assert mod.cell("smollm2-135m", "c").startswith("**does not hold**")  # 0.04 apart: not more than 0.05
    # a page whose table was edited by hand is caught, and --write puts the generated one back
    page = tmp_path / "page.md"
    page.write_text(f"intro\n\n{mod.BEGIN}\n| claim | hand-made |\n{mod.END}\n\nafter\n")
    monkeypatch.setattr(mod, "PAGES", (page,))
    monkeypatch.setattr(mod, "ROOT", tmp_path)
    assert mod.main(["--check"]) == 1
    assert mod.main(["--write"]) == 0 and mod.main(["--check"]) == 0
    text = page.read_text()
    assert text.startswith("intro\n\n") and text.endswith("\n\nafter\n") and "(0.785 held out" in text
    page.write_text("no markers")
    with pytest.raises(SystemExit, match="markers"):
        mod.main(["--check"])
