"""float32 vs bfloat16 on the machine it runs on: the tuning step, recording, and what the results lose.

One model is loaded twice (`load_model(..., dtype=...)`), float32 and bfloat16, and
on each, in one process, alternating:

- the prompt-tuning step (the default prefix-cached step: cross-entropy over the label
  words, backward, AdamW) on one batch of rotten_tomatoes train examples;
- recording (`record_runs`, every layer's `mlp.hook_post` at the P prompt positions) of
  `--record-train` / `--record-dev` examples;
- the results: the same prompt tuned `--tune-steps` steps in each dtype from the same start
  (test accuracy of each on `--test` examples, and of the float32 prompt evaluated in
  bfloat16), and the predictivity of one prompt recorded in each dtype (largest difference,
  best neuron, overlap of the top 1% per layer). Statistics stay float64 in both.

    python benchmarks/bench_bf16.py --out benchmarks/results/bench_bf16.json
    python benchmarks/bench_bf16.py --model tiny-llama --steps 2 --tune-steps 4 --test 40   # smoke check
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from tl_skill import SoftPrompt, TuneConfig, compat, evaluate, load_model, load_task, tune
from tl_skill.data import subsample
from tl_skill.files import atomic_text
from tl_skill.find import record_runs
from tl_skill.predictivity import make_subtasks
from tl_skill.tuning import Verbalizer, layout_for
from tl_skill.tuning.prefix import class_logits_cached

DTYPES = ("float32", "bfloat16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=5, help="timed tuning steps per dtype (alternating)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-length", type=int, default=8)
    p.add_argument("--record-train", type=int, default=256)
    p.add_argument("--record-dev", type=int, default=128)
    p.add_argument("--record-reps", type=int, default=2)
    p.add_argument("--tune-steps", type=int, default=60, help="steps of the short tuning compared across dtypes")
    p.add_argument("--test", type=int, default=300, help="test examples for the accuracies")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.prompt_length, args.tune_steps, args.test, args.record_reps) < 1:
        p.error("--steps, --batch-size, --prompt-length, --tune-steps, --test and --record-reps must be >= 1")
    return args


def top_overlap(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.01) -> float:
    """Mean over layers of |top(a) & top(b)| / k, k = max(1, fraction * width)."""
    k = max(1, int(fraction * a.shape[1]))
    ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    return float(np.mean([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(ta, tb)]))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = {d: load_model(args.model, device="cpu", dtype=d) for d in DTYPES}
    task = load_task("rotten_tomatoes")
    P, B = args.prompt_length, args.batch_size
    pick = np.random.RandomState(0).choice(len(task["train"]), B, replace=False)
    texts = [task.texts("train")[i] for i in pick]
    labels = torch.as_tensor(task.labels("train")[pick])
    start = SoftPrompt.from_vocab(models["float32"], P, seed=0)

    def tuning_step(model):
        v = Verbalizer(model.tokenizer, task.label_words)
        batch = layout_for(model, P, 96).encode(texts, labels.tolist())
        prompt = SoftPrompt(start.vectors.detach().clone().to(compat.model_dtype(model)))
        opt = torch.optim.AdamW(prompt.parameters(), lr=3e-3)

        def step():
            logits = class_logits_cached(model, batch, v, prompt)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        return step

    steps = {d: tuning_step(m) for d, m in models.items()}
    for _ in range(args.warmup):
        for d in DTYPES:
            steps[d]()
    step_t = {d: [] for d in DTYPES}
    for _ in range(args.steps):
        for d in DTYPES:
            t0 = time.perf_counter()
            steps[d]()
            step_t[d].append(time.perf_counter() - t0)

    rec_task = subsample(task, {"train": args.record_train, "dev": args.record_dev}, seed=0)
    subtasks = make_subtasks(task.spec.label_names)
    rec_t = {d: [] for d in DTYPES}
    rec = {}
    for _ in range(args.record_reps):
        for d in DTYPES:
            t0 = time.perf_counter()
            rec[d] = record_runs(models[d], rec_task, [start], subtasks, progress=False)[0]
            rec_t[d].append(time.perf_counter() - t0)
    pred = {d: torch.maximum(r.accuracy[0], 1 - r.accuracy[0]).amax(1) for d, r in rec.items()}  # [L, D]

    cfg = TuneConfig(
        prompt_length=P,
        steps=args.tune_steps,
        eval_every=args.tune_steps,
        batch_size=B,
        max_dev_examples=100,
        max_test_examples=args.test,
    )
    import tempfile

    acc, tune_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for d in DTYPES:
            t0 = time.perf_counter()
            runs[d] = tune(models[d], task, Path(tmp) / d, cfg, progress=False, init_prompt=start)
            tune_s[d] = time.perf_counter() - t0
            acc[d] = runs[d].metrics["test_accuracy"]
        test = subsample(task, {"test": args.test}, seed=cfg.task_seed)
        v = Verbalizer(models["bfloat16"].tokenizer, task.label_words)
        cross = evaluate(models["bfloat16"], test, "test", v, runs["float32"].prompt, max_input_tokens=96)["accuracy"]
        same = evaluate(models["float32"], test, "test", v, runs["float32"].prompt, max_input_tokens=96)["accuracy"]

    med = {d: statistics.median(step_t[d]) for d in DTYPES}
    rmed = {d: statistics.median(rec_t[d]) for d in DTYPES}
    result = {
        "model": args.model,
        "batch_size": B,
        "prompt_length": P,
        "steps": args.steps,
        "warmup": args.warmup,
        "step_seconds": step_t,
        "step_median_seconds": med,
        "step_ratio_bf16_over_fp32": med["bfloat16"] / med["float32"],
        "record_examples": {"train": args.record_train, "dev": args.record_dev},
        "record_seconds": rec_t,
        "record_median_seconds": rmed,
        "record_ratio_bf16_over_fp32": rmed["bfloat16"] / rmed["float32"],
        "tune_steps": args.tune_steps,
        "tune_seconds": tune_s,
        "test_examples": args.test,
        "test_accuracy": acc,
        "test_accuracy_difference_bf16_minus_fp32": acc["bfloat16"] - acc["float32"],
        "fp32_prompt_accuracy": {"float32": same, "bfloat16": cross},
        "predictivity": {
            "best": {d: float(p.max()) for d, p in pred.items()},
            "max_abs_difference": float((pred["bfloat16"] - pred["float32"]).abs().max()),
            "mean_abs_difference": float((pred["bfloat16"] - pred["float32"]).abs().mean()),
            "top1pct_overlap": top_overlap(pred["float32"], pred["bfloat16"]),
        },
        "cpu_flags": sorted(
            {f for f in ("avx512_bf16", "amx_bf16", "avx512f") if f in Path("/proc/cpuinfo").read_text()}
        )
        if Path("/proc/cpuinfo").exists()
        else [],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    print(
        f"{args.model}: tuning step fp32 {med['float32']:.3f} s, bf16 {med['bfloat16']:.3f} s "
        f"(x{result['step_ratio_bf16_over_fp32']:.2f}); recording fp32 {rmed['float32']:.1f} s, "
        f"bf16 {rmed['bfloat16']:.1f} s (x{result['record_ratio_bf16_over_fp32']:.2f})"
    )
    print(
        f"test accuracy after {args.tune_steps} steps: fp32 {acc['float32']:.3f}, bf16 {acc['bfloat16']:.3f}; "
        f"the fp32 prompt in bf16: {cross:.3f} (fp32 {same:.3f})"
    )
    print(
        f"predictivity: best fp32 {result['predictivity']['best']['float32']:.4f}, "
        f"bf16 {result['predictivity']['best']['bfloat16']:.4f}; largest difference "
        f"{result['predictivity']['max_abs_difference']:.4f}; top-1% overlap "
        f"{result['predictivity']['top1pct_overlap']:.3f}"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_text(args.out, json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
