"""Data parallelism (distributed.py): torchrun with 2 gloo processes gives the one-process results.

One `torchrun --nproc-per-node 2` launch runs this file as a worker script
(see `_worker`): the CLI's `evaluate` and `find` (which join the process
group themselves), then `find_skill_neurons`, `evaluate` and a few DDP
prompt-tuning steps. The test process computes the same things in one
process and compares: recording and evaluation exactly, tuning within float
reduction order.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
FIND_KW = dict(max_train_examples=150, max_eval_examples=96, batch_size=16)
EVAL_EXAMPLES = 100
TUNE_KW = dict(
    prompt_length=4,
    steps=6,
    batch_size=7,
    eval_every=3,
    lr=3e-3,
    warmup_fraction=0.0,
    max_train_examples=64,
    max_dev_examples=40,
    max_test_examples=40,
    eval_batch_size=16,
)


def _tune_task():
    from tl_skill import load_task

    # the whole task (the config caps what tuning sees): find and evaluate then draw more examples from it
    return load_task("rotten_tomatoes")


def _eval_task(run):
    from tl_skill.data import subsample

    return subsample(run.load_task(), {"test": EVAL_EXAMPLES}, seed=run.info["task_seed"])


@contextlib.contextmanager
def _threads(n: int):
    # torchrun gives each worker OMP_NUM_THREADS=1: the reference uses the same kernels.
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _noisy_eval(model, run, batch_size: int):
    """Test predictions with strong noise on a quarter of the neurons of every layer (seed 3)."""
    from tl_skill import evaluate
    from tl_skill.perturb import Perturbation

    mask = torch.zeros(model.cfg.n_layers, model.cfg.d_mlp, dtype=torch.bool)
    mask[:, ::4] = True
    pert = Perturbation(model, mask, "noise", std=3.0, seed=3)
    return evaluate(
        model,
        _eval_task(run),
        "test",
        run.verbalizer(model),
        run.prompt,
        batch_size=batch_size,
        extra_hooks=pert.fwd_hooks(),
    )


# --------------------------------------------------------------------------- the worker
def _worker(run_dir: str, out_dir: str) -> None:
    from tl_skill import TuneConfig, cli, distributed, evaluate, find_skill_neurons, load_model, tune
    from tl_skill.files import save_state
    from tl_skill.tuning.runs import Run

    out = Path(out_dir)
    r = int(os.environ["RANK"])
    argv_eval = [
        "evaluate",
        run_dir,
        "--split",
        "test",
        "--max-examples",
        str(EVAL_EXAMPLES),
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--json",
        "-q",
    ]
    argv_find = [
        "find",
        run_dir,
        "--out",
        str(out / "cli_neurons"),
        "--max-train-examples",
        "150",
        "--max-eval-examples",
        "96",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--json",
        "-q",
    ]
    for name, argv in (("cli_evaluate", argv_eval), ("cli_find", argv_find)):
        with open(out / f"{name}.rank{r}.txt", "w") as f, contextlib.redirect_stdout(f):
            code = cli.main(argv)  # the first call joins the process group
        assert code == 0, (name, code)
    group = distributed.current()
    assert (group.world_size, group.rank, group.backend) == (WORLD, r, "gloo"), group

    model = load_model("tiny-gpt2", device="cpu")
    run = Run.load(run_dir)
    sn = find_skill_neurons(model, [run], progress=False, **FIND_KW)
    sn.save(out / "neurons")
    from tl_skill.attribution import attribute

    attr = attribute(model, run, sn, "test", batch_size=8, progress=False)
    res = evaluate(model, _eval_task(run), "test", run.verbalizer(model), run.prompt, batch_size=16)
    noisy = _noisy_eval(model, run, batch_size=16)
    ddp_run = tune(model, _tune_task(), out / "ddp_run", TuneConfig(**TUNE_KW), progress=False)
    ablation, zero_shot = _noisy_experiments(model, run, sn, out / "ablation", batch_size=16)
    save_state(
        out / f"rank{r}.safetensors",
        {
            "baseline": sn.baseline,
            "accuracy": sn.accuracy,
            "std": sn.std,
            "constant": sn.constant,
            "predictions": torch.from_numpy(res["predictions"]),
            "eval_accuracy": res["accuracy"],
            "noisy_predictions": torch.from_numpy(noisy["predictions"]),
            "prompt": ddp_run.prompt.vectors.detach().clone(),
            "history": ddp_run.info["history"],
            "metrics": ddp_run.metrics,
            "ablation": ablation,
            "zero_shot": zero_shot,
            "attribution": attr.by_class,
            "attribution_prompt": attr.prompt_by_class,
        },
    )


def _noisy_experiments(model, run, sn, out, batch_size: int) -> tuple[dict, dict]:
    """Per-example correctness of every condition of two noise experiments through the runner.

    The ablation experiment (prompted), and the origin study's kind of plan: the same
    perturbation conditions without a prompt.
    """
    from tl_skill.experiments.ablation import ablation_experiment, perturbation_conditions
    from tl_skill.experiments.runner import EvalSet, run_conditions

    kw = dict(mode="noise", std=3.0, fractions=(0.25,), seeds=2)
    abl = ablation_experiment(model, run, sn, out, batch_size=batch_size, progress=False, **kw)
    masks = {0.25: sn.select(fraction=0.25)}
    conds = perturbation_conditions(masks, [0, 1], "noise", std=3.0, relative=False, skill=sn)
    es = EvalSet(_eval_task(run), run.verbalizer(model), "test", run.config.max_input_tokens)
    zero = run_conditions(conds, {"model": model}, {"test": es}, batch_size=batch_size, progress=False)
    return ({e["key"]: e["correct"] for e in abl.evaluations}, {k: r.correct for k, r in zero.items()})


# --------------------------------------------------------------------------- the launch
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_gpt2):
    """(run dir, worker output dir, single-process references)."""
    from tl_skill import TuneConfig, evaluate, find_skill_neurons, tune

    base = tmp_path_factory.mktemp("dist")
    with _threads(1):
        run = tune(
            tiny_gpt2,
            _tune_task(),
            base / "run",
            TuneConfig(
                prompt_length=4, steps=2, eval_every=2, max_train_examples=32, max_dev_examples=20, max_test_examples=20
            ),
            progress=False,
            evaluate_test=False,
        )
    out = base / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(WORLD),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        str(Path(__file__).resolve()),
        str(run.path),
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    # The references run while the workers start up.
    with _threads(1):
        ref_sn = find_skill_neurons(tiny_gpt2, [run], progress=False, **FIND_KW)
        ref_eval = evaluate(tiny_gpt2, _eval_task(run), "test", run.verbalizer(tiny_gpt2), run.prompt, batch_size=16)
        ref_run = tune(tiny_gpt2, _tune_task(), base / "ref_run", TuneConfig(**TUNE_KW), progress=False)
        ref_noisy = {bs: _noisy_eval(tiny_gpt2, run, bs)["predictions"] for bs in (16, 7)}
        ref_experiments = _noisy_experiments(tiny_gpt2, run, ref_sn, base / "ref_ablation", batch_size=7)
        from tl_skill.attribution import attribute

        ref_attr = attribute(tiny_gpt2, run, ref_sn, "test", batch_size=8, progress=False)
    try:
        log, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail("torchrun workers timed out:\n" + log[-4000:])
    assert proc.returncode == 0, "torchrun workers failed:\n" + log[-6000:]
    from tl_skill.files import load_state

    ranks = [load_state(out / f"rank{r}.safetensors") for r in range(WORLD)]
    return {
        "run": run,
        "out": out,
        "ranks": ranks,
        "sn": ref_sn,
        "eval": ref_eval,
        "tuned": ref_run,
        "noisy": ref_noisy,
        "experiments": ref_experiments,
        "attribution": ref_attr,
    }


def test_attribution_equals_one_process(launched):
    """Exact sums of per-example terms: two processes give the one-process attribution bit for bit."""
    ref = launched["attribution"]
    assert ref.n == 20 and float(ref.by_class.abs().max()) > 0
    for got in launched["ranks"]:
        assert torch.equal(got["attribution"], ref.by_class)
        assert torch.equal(got["attribution_prompt"], ref.prompt_by_class)


def test_recording_equals_one_process(launched):
    from tl_skill import SkillNeurons

    ref = launched["sn"]
    assert ref.meta["n_train"] == 150 and ref.meta["n_eval"] == 96
    for got in [*launched["ranks"], SkillNeurons.load(launched["out"] / "neurons")]:
        assert torch.equal(got["baseline"] if isinstance(got, dict) else got.baseline, ref.baseline)
        assert torch.equal(got["accuracy"] if isinstance(got, dict) else got.accuracy, ref.accuracy)
        assert torch.equal(got["constant"] if isinstance(got, dict) else got.constant, ref.constant)
        std = got["std"] if isinstance(got, dict) else got.std
        torch.testing.assert_close(std, ref.std, rtol=1e-5, atol=1e-7)  # sums of squares: float order
    saved = SkillNeurons.load(launched["out"] / "neurons")
    assert saved.meta["n_train"] == 150 and saved.meta["n_eval"] == 96
    assert torch.equal(saved.predictivity, ref.predictivity)


def test_cli_find_and_evaluate_under_torchrun(launched):
    from tl_skill import SkillNeurons

    out, ref = launched["out"], launched["sn"]
    cli_sn = SkillNeurons.load(out / "cli_neurons")
    assert torch.equal(cli_sn.baseline, ref.baseline) and torch.equal(cli_sn.accuracy, ref.accuracy)
    # Only rank 0 prints.
    assert (out / "cli_find.rank1.txt").read_text() == "" == (out / "cli_evaluate.rank1.txt").read_text()
    found = json.loads((out / "cli_find.rank0.txt").read_text())
    assert found["best_predictivity"] == pytest.approx(ref.best_predictivity, abs=1e-6)
    evaluated = json.loads((out / "cli_evaluate.rank0.txt").read_text())
    assert evaluated["accuracy"] == launched["eval"]["accuracy"] and evaluated["n"] == EVAL_EXAMPLES


def test_evaluate_equals_one_process(launched):
    ref = launched["eval"]
    for got in launched["ranks"]:
        assert np.array_equal(got["predictions"].numpy(), ref["predictions"])
        assert got["eval_accuracy"] == ref["accuracy"]


def test_noise_perturbation_is_the_same_for_any_world_size_and_batch_size(launched):
    ref = launched["noisy"]
    assert np.array_equal(ref[16], ref[7])  # batch size
    assert not np.array_equal(ref[16], launched["eval"]["predictions"])  # the noise does change predictions
    for got in launched["ranks"]:  # two gloo processes, each with its own batches
        assert np.array_equal(got["noisy_predictions"].numpy(), ref[16])


def test_noise_experiments_are_the_same_for_any_world_size_and_batch_size(launched):
    """Every experiment with noise goes through the runner: 2 processes at batch 16 = 1 process at batch 7."""
    ref_ablation, ref_zero = launched["experiments"]
    assert len(ref_ablation) == 1 + 1 + 2 and len(ref_zero) == 4
    assert len(set(ref_ablation.values())) > 1  # the noise changes which examples are right
    for got in launched["ranks"]:
        assert got["ablation"] == ref_ablation and got["zero_shot"] == ref_zero
    from tl_skill.experiments.ablation import AblationResult

    saved = AblationResult.load(launched["out"] / "ablation")  # written by rank 0
    assert {e["key"]: e["correct"] for e in saved.evaluations} == ref_ablation


def test_ddp_prompt_tuning_matches_one_process(launched, tiny_gpt2):
    from tl_skill import SoftPrompt

    ref = launched["tuned"]
    r0, r1 = launched["ranks"]
    assert torch.equal(r0["prompt"], r1["prompt"])  # DDP keeps the ranks in step
    start = SoftPrompt.from_vocab(tiny_gpt2, TUNE_KW["prompt_length"], seed=0).vectors.detach()
    assert (ref.prompt.vectors.detach() - start).abs().max() > 1e-3  # the steps moved the prompt
    torch.testing.assert_close(r0["prompt"], ref.prompt.vectors.detach(), rtol=0, atol=1e-6)
    ref_hist = ref.info["history"]
    assert [h["step"] for h in r0["history"]] == [h["step"] for h in ref_hist]
    for got, want in zip(r0["history"], ref_hist):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert got.get("dev_accuracy") == want.get("dev_accuracy")
    assert r0["metrics"]["test_accuracy"] == ref.metrics["test_accuracy"]
    ddp_dir = launched["out"] / "ddp_run"
    assert json.loads((ddp_dir / "run.json").read_text())["status"] == "done"
    assert not (ddp_dir / "checkpoint.pt").exists()


# ---------------------------------------------------------------- single-process checks
def test_shard_is_strided_disjoint_and_covering():
    from tl_skill.distributed import DistributedError, shard

    for world in range(1, 5):
        for n in range(0, 11):
            parts = [list(shard(range(n), r, world)) for r in range(world)]
            flat = sorted(i for p in parts for i in p)
            assert flat == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
            assert parts[0] == list(range(0, n, world))
    assert list(shard(np.arange(5))) == [0, 1, 2, 3, 4]  # one process: everything
    with pytest.raises(DistributedError, match="rank 2 out of range"):
        shard(range(4), 2, 2)


def test_init_without_torchrun_is_a_no_op(monkeypatch):
    import torch.distributed as dist

    from tl_skill import distributed
    from tl_skill.tuning.parallel import prompt_data_parallel

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    group = distributed.init_distributed("cpu")
    assert not group.enabled and group.is_main and group.world_size == 1 and group.device == "cpu"
    assert not dist.is_initialized()
    x = np.arange(3)
    assert distributed.all_reduce_sum(x) is x and prompt_data_parallel(None, None, None, 1) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.init_distributed().enabled


def test_init_refuses_bad_launches(monkeypatch):
    import torch.distributed as dist

    from tl_skill.distributed import DistributedError, init_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DistributedError, match="launch with torchrun"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(DistributedError, match="no backend for device 'mps'"):
        init_distributed("mps")
    if not torch.cuda.is_available():
        with pytest.raises(DistributedError, match="no CUDA device"):
            init_distributed("cuda")
    assert not dist.is_initialized()


def _merged(parts):
    """What `all_reduce` makes of per-process statistics."""
    total = parts[0]
    for other in parts[1:]:
        for k in total.sum_keys:
            setattr(total, k, getattr(total, k) + getattr(other, k))
        for k in total.min_keys:
            setattr(total, k, torch.minimum(getattr(total, k), getattr(other, k)))
        for k in total.max_keys:
            setattr(total, k, torch.maximum(getattr(total, k), getattr(other, k)))
    return total


def test_sharded_statistics_are_exact_for_any_world_size_and_order(monkeypatch, tiny_gpt2, small_task):
    from tl_skill import Recorder, SoftPrompt, distributed
    from tl_skill.data import subsample
    from tl_skill.record import MomentStats
    from tl_skill.tuning import layout_for
    from tl_skill.tuning.prompt import iterate_batches

    task = subsample(small_task, {"train": 72})
    prompt = SoftPrompt.from_vocab(tiny_gpt2, 3, seed=1)
    layout = layout_for(tiny_gpt2, 3, 48)

    def moments(world, rank, reverse=False):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        stats = MomentStats(2, 2, 3, 256)
        batches = list(iterate_batches(layout, task, "train", 8, shard=True))
        rec = Recorder(tiny_gpt2, stats, positions="prompt")
        with rec.attached():
            for _, batch in reversed(batches) if reverse else batches:
                rec.run(batch, prompt)
        return stats, sum(len(i) for i, _ in batches)

    one, n = moments(1, 0)
    assert n == 72 and int(one.count.sum()) == 72
    for world in (2, 3):
        parts = [moments(world, r, reverse=r % 2 == 0) for r in range(world)]
        assert sum(k for _, k in parts) == 72
        merged = _merged([s for s, _ in parts])
        for key in ("count", "s1", "s2", "min", "max"):
            assert torch.equal(getattr(merged, key), getattr(one, key)), key
        assert torch.equal(merged.mean(), one.mean()) and torch.equal(merged.mean([1]), one.mean([1]))
        torch.testing.assert_close(merged.sumsq, one.sumsq, rtol=1e-12, atol=0)


def test_bfloat16_activations_are_summed_exactly(tiny_gpt2, small_task):
    """bf16 model: float64/int64 statistics equal an exact reference over the same bf16 activations."""
    from tl_skill import Recorder, SoftPrompt, compat, load_model
    from tl_skill.record import MomentStats, ThresholdStats, exact_parts, exact_total
    from tl_skill.tuning import layout_for
    from tl_skill.tuning.prompt import iterate_batches

    model = load_model("tiny-gpt2", device="cpu", dtype="bfloat16")
    assert compat.model_dtype(model) == torch.bfloat16
    prompt = SoftPrompt.from_vocab(model, 3, seed=2)
    layout = layout_for(model, 3, 48)
    batches = [b for _, b in iterate_batches(layout, small_task, "train", 16)][:3]

    # Reference: the raw bf16 activations at the prompt positions, collected by a plain hook.
    seen = {0: [], 1: []}

    def grab(layer, batch):
        def hook(act, hook):
            assert act.dtype == torch.bfloat16
            rows = torch.arange(act.shape[0])[:, None]
            seen[layer].append(act[rows, batch.prompt_positions()].detach().clone())

        return hook

    labels = torch.cat([b.labels for b in batches])
    for batch in batches:
        with (
            prompt.applied(model, batch),
            torch.no_grad(),
            model.hooks(fwd_hooks=[(compat.mlp_post_hook(l), grab(l, batch)) for l in (0, 1)]),
        ):
            compat.forward(model, batch.input_ids, batch.attention_mask)
    acts = torch.stack([torch.cat(seen[l]) for l in (0, 1)], 1)  # [N, L, T, D] bf16
    x64 = acts.double()
    assert len(torch.unique(x64)) > 1000  # real, varied activations

    q1, q2, rest = exact_parts(acts)
    assert torch.equal(exact_total(q1, q2, rest), x64)  # the split loses nothing

    stats = MomentStats(2, 2, 3, 256)
    rec = Recorder(model, stats, positions="prompt")
    with rec.attached():
        for batch in batches:
            rec.run(batch, prompt)
    flat = x64.reshape(len(x64), -1)
    for c in (0, 1):
        rows = flat[labels == c]
        want = torch.tensor([math.fsum(col) for col in rows.T.tolist()], dtype=torch.float64)
        got = stats.class_sums()[c].reshape(-1)
        torch.testing.assert_close(got, want, rtol=2.0**-52, atol=1e-300)  # correctly rounded sums
    assert torch.equal(stats.min, x64.amin(0)) and torch.equal(stats.max, x64.amax(0))
    assert stats.s1.dtype == torch.long and stats.rest.dtype == torch.float64

    thresholds = stats.mean()[None]
    counts = ThresholdStats(thresholds, 2)
    rec = Recorder(model, counts, positions="prompt")
    with rec.attached():
        for batch in batches:
            rec.run(batch, prompt)
    for c in (0, 1):
        want = (x64[labels == c] > thresholds[0]).sum(0)
        assert torch.equal(counts.above[0, c], want)


if __name__ == "__main__":  # launched by torchrun from the `launched` fixture
    _worker(sys.argv[1], sys.argv[2])
