"""Recording neuron statistics: tl_skill's streaming recorder vs a bare forward pass and plain TransformerLens.

One set of batches (rotten_tomatoes train examples, left-padded, a random
soft prompt of length P appended) of one model, in one process, repetitions
interleaved (each repetition runs the three in a rotated order):

- forward:  the bare prompted forward pass of the full model (logits);
- recorder: every layer's `mlp.hook_post` at the P prompt positions reduced
  in the hooks by `Recorder` + `MomentStats` (exact per-class sums, sums of
  squares, min, max); the forward stops after the last layer's neurons;
  then the per-class means, mean, std and min/max;
- cache:    what a user of plain TransformerLens would write:
  `model.run_with_cache(..., names_filter=lambda n: n.endswith("mlp.hook_post"))`
  per batch, the prompt positions of every layer kept (a copy) in a list,
  then `torch.cat` and the same statistics (per-class means, mean, std,
  min, max) at the end.

Peak memory is measured in fresh child processes (`--child MODE N`): after
the model is loaded and one warm-up batch has run, freed memory is returned
to the OS and the kernel's peak-RSS counter is reset (`/proc/self/clear_refs`);
the peak RSS (VmHWM) at the end, minus the RSS at the reset, is the memory
the measured phase needed. Where the counter cannot be reset, the child
falls back to `ru_maxrss` minus the RSS after loading (then the delta can
hide under the loading peak; the JSON says which method was used). On CUDA
the peak of `torch.cuda.max_memory_allocated` is reported too. The 8N run
repeats the same N-example batches 8 times, so batch shapes are identical
and any growth comes from what the recorder keeps.

    python benchmarks/bench_record.py --out bench_record.json
    python benchmarks/bench_record.py --model tiny-llama --n 64 --reps 3 --threads 1   # smoke check
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tl_skill import SoftPrompt, compat, load_model, load_task, model_spec
from tl_skill.data import subsample
from tl_skill.files import atomic_text
from tl_skill.record import MomentStats, Recorder
from tl_skill.tuning import layout_for
from tl_skill.tuning.prompt import iterate_batches

MODES = ("forward", "recorder", "cache")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=256, help="examples in the set of batches (memory: also 8x this)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument("--max-input-tokens", type=int, default=96)
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each mode (interleaved)")
    p.add_argument("--growth", type=int, default=8, help="memory check: N and growth x N examples")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 avoids OpenMP spin-waits on a busy machine",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the child processes")
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument(
        "--child", nargs=2, metavar=("MODE", "REPEAT"), default=None, help=argparse.SUPPRESS
    )  # internal: one memory measurement
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ set-up
def setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    device = compat.model_device(model)
    prompt = SoftPrompt.from_vocab(model, args.prompt_length, seed=0).to(device)
    task = subsample(load_task("rotten_tomatoes"), {"train": args.n}, seed=0)
    layout = layout_for(model, args.prompt_length, args.max_input_tokens)
    batches = [b.to(device) for _, b in iterate_batches(layout, task, "train", args.batch_size)]
    return model, prompt, batches


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_forward(model, prompt, batches):
    for b in batches:
        with prompt.applied(model, b):
            compat.forward(model, b.input_ids, b.attention_mask)
    return None


@torch.no_grad()
def run_recorder(model, prompt, batches):
    spec = model_spec(model)
    stats = MomentStats(2, spec.n_layers, prompt.length, spec.d_mlp, compat.model_device(model))
    rec = Recorder(model, stats, positions="prompt")
    with rec.attached():
        for b in batches:
            rec.run(b, prompt)
    return {
        "class_means": [stats.mean([c]) for c in range(2)],
        "mean": stats.mean(),
        "std": stats.std(),
        "min": stats.min,
        "max": stats.max,
    }


@torch.no_grad()
def run_cache(model, prompt, batches):
    """Plain TransformerLens: cache every layer's neurons, keep the prompt positions, reduce at the end."""
    L = model.cfg.n_layers
    kept, labels = [], []
    for b in batches:
        with prompt.applied(model, b):
            _, cache = model.run_with_cache(
                b.input_ids, attention_mask=b.attention_mask, names_filter=lambda n: n.endswith("mlp.hook_post")
            )
        pos = b.prompt_positions()  # [B, P]
        rows = torch.arange(len(pos), device=pos.device)[:, None]
        kept.append(torch.stack([cache[f"blocks.{l}.mlp.hook_post"][rows, pos] for l in range(L)], 1))
        labels.append(b.labels)
        del cache
    acts, y = torch.cat(kept), torch.cat(labels)  # [N, L, P, D]
    del kept
    return {
        "class_means": [acts[y == c].double().mean(0) for c in range(2)],
        "mean": acts.double().mean(0),
        "std": acts.double().std(0, correction=0),
        "min": acts.amin(0),
        "max": acts.amax(0),
    }


RUNNERS = {"forward": run_forward, "recorder": run_recorder, "cache": run_cache}


# ------------------------------------------------------------------------------ memory
def _rss_kib(field: str = "VmRSS") -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _rss_kib("VmHWM") is not None
    except OSError:
        return False


def child(args) -> dict:
    mode, repeat = args.child[0], int(args.child[1])
    model, prompt, batches = setup(args)
    device = compat.model_device(model)
    RUNNERS[mode](model, prompt, batches[:1])  # warm-up: kernels, thread pools, allocator
    _release_free_memory()
    rss0 = _rss_kib() or 0
    method = "VmHWM after clear_refs" if _reset_peak() else "ru_maxrss"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda0 = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    RUNNERS[mode](model, prompt, batches * repeat)
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {
        "mode": mode,
        "examples": sum(len(b.input_ids) for b in batches) * repeat,
        "method": method,
        "rss_after_load_mib": rss0 / 1024,
        "peak_rss_mib": peak / 1024,
        "delta_rss_mib": (peak - rss0) / 1024,
        "seconds": seconds,
    }
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["cuda_delta_mib"] = (torch.cuda.max_memory_allocated(device) - cuda0) / 2**20
    return out


def measure_memory(args, mode: str, repeat: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        str(repeat),
        "--model",
        args.model,
        "--n",
        str(args.n),
        "--batch-size",
        str(args.batch_size),
        "--prompt-length",
        str(args.prompt_length),
        "--max-input-tokens",
        str(args.max_input_tokens),
    ]
    for flag, value in (("--device", args.device), ("--dtype", args.dtype), ("--threads", args.threads)):
        if value:
            cmd += [flag, str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {mode} x{repeat} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------- main
def check_same_statistics(a: dict, b: dict) -> float:
    """Largest difference between the recorder's and the cache way's statistics (a sanity check)."""
    worst = 0.0
    for key in ("mean", "std", "min", "max"):
        worst = max(worst, float((a[key].double() - b[key].double()).abs().max()))
    for x, y in zip(a["class_means"], b["class_means"]):
        worst = max(worst, float((x - y).abs().max()))
    return worst


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    model, prompt, batches = setup(args)
    device = compat.model_device(model)
    spec = model_spec(model)
    n = sum(len(b.input_ids) for b in batches)

    results = {m: RUNNERS[m](model, prompt, batches[:1]) for m in MODES}  # warm-up
    diff = check_same_statistics(run_recorder(model, prompt, batches), run_cache(model, prompt, batches))
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(args.reps):
        for m in MODES[rep % 3 :] + MODES[: rep % 3]:
            _sync(device)
            t0 = time.perf_counter()
            results[m] = RUNNERS[m](model, prompt, batches)
            _sync(device)
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    report = {
        "model": spec.name,
        "device": str(device),
        "dtype": str(compat.model_dtype(model)),
        "n_layers": spec.n_layers,
        "d_mlp": spec.d_mlp,
        "examples": n,
        "batch_size": args.batch_size,
        "batches": len(batches),
        "prompt_length": args.prompt_length,
        "tokens": sum(b.n_tokens for b in batches),
        "reps": args.reps,
        "seconds": times,
        "median_seconds": med,
        "ratio_recorder_vs_forward": med["recorder"] / med["forward"],
        "ratio_recorder_vs_cache": med["recorder"] / med["cache"],
        "max_abs_difference_recorder_vs_cache": diff,
        "torch": torch.__version__,
        "transformer_lens": compat.TL_VERSION,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if not args.no_memory:
        mem = {
            "recorder_n": measure_memory(args, "recorder", 1),
            f"recorder_{args.growth}n": measure_memory(args, "recorder", args.growth),
            "cache_n": measure_memory(args, "cache", 1),
            "forward_n": measure_memory(args, "forward", 1),
        }
        report["memory"] = mem
        small, big = mem["recorder_n"], mem[f"recorder_{args.growth}n"]
        report["recorder_peak_growth"] = big["peak_rss_mib"] / small["peak_rss_mib"] - 1
        report["recorder_delta_growth_mib"] = big["delta_rss_mib"] - small["delta_rss_mib"]
        report["cache_vs_recorder_delta_mib"] = mem["cache_n"]["delta_rss_mib"] - small["delta_rss_mib"]
        if "cuda_peak_mib" in small:
            report["recorder_cuda_peak_growth"] = big["cuda_peak_mib"] / small["cuda_peak_mib"] - 1
    print_table(report)
    if args.out:
        atomic_text(args.out, json.dumps(report, indent=2))
    return report


def print_table(r: dict) -> None:
    med = r["median_seconds"]
    print(
        f"{r['model']} on {r['device']} ({r['dtype']}): {r['examples']} examples, {r['batches']} batches of "
        f"{r['batch_size']}, {r['tokens']} tokens, P={r['prompt_length']}, {r['n_layers']} layers x "
        f"{r['d_mlp']} neurons, {r['reps']} interleaved reps"
    )
    print(f"{'mode':<10} {'median s':>9} {'min s':>8} {'vs forward':>11}")
    for m in MODES:
        print(f"{m:<10} {med[m]:>9.3f} {min(r['seconds'][m]):>8.3f} {med[m] / med['forward']:>11.3f}")
    print(
        f"(a) recorder / bare forward: {r['ratio_recorder_vs_forward']:.3f}   "
        f"(b) recorder / run_with_cache: {r['ratio_recorder_vs_cache']:.3f}   "
        f"statistics agree to {r['max_abs_difference_recorder_vs_cache']:.2e}"
    )
    if "memory" in r:
        print(
            f"{'memory':<12} {'examples':>8} {'after load MiB':>15} {'peak MiB':>9} {'delta MiB':>10}"
            + ("  cuda peak MiB" if "cuda_peak_mib" in r["memory"]["recorder_n"] else "")
        )
        for name, m in r["memory"].items():
            line = (
                f"{name:<12} {m['examples']:>8} {m['rss_after_load_mib']:>15.1f} {m['peak_rss_mib']:>9.1f} "
                f"{m['delta_rss_mib']:>10.1f}"
            )
            if "cuda_peak_mib" in m:
                line += f"  {m['cuda_peak_mib']:>13.1f}"
            print(line)
        mem = list(r["memory"].values())
        print(
            f"(c) recorder peak RSS {mem[0]['examples']} -> {mem[1]['examples']} examples: "
            f"{r['recorder_peak_growth']:+.2%} (delta {r['recorder_delta_growth_mib']:+.1f} MiB); the cache way "
            f"needs {r['cache_vs_recorder_delta_mib']:+.1f} MiB more than the recorder at "
            f"{mem[0]['examples']} [{mem[0]['method']}]"
        )


if __name__ == "__main__":
    main()
