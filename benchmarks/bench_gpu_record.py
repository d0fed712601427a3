"""Recording throughput of tl_skill (tokens/s) on a GPU, for a large model in bfloat16.

Times `record_run` (method §2-§3: the train pass for the baselines, then the dev
pass for the above-baseline counts) with a random soft prompt, every layer,
statistics reduced in the hooks. Prints one JSON object (rank 0) and writes
it to --out when given.

    python benchmarks/bench_gpu_record.py --model meta-llama/Llama-3.2-1B --device cuda \\
        --dtype bfloat16 --n 2000 --out bench_record.json
    torchrun --nproc-per-node 4 benchmarks/bench_gpu_record.py --model /models/Qwen2.5-1.5B \\
        --device cuda --dtype bfloat16 --examples 8000     # data parallel, one GPU per process
    python benchmarks/bench_gpu_record.py --model tiny-llama --device cpu --dtype float32 --n 64   # smoke check
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from tl_skill import SoftPrompt, compat, distributed, load_model, load_task, model_spec
from tl_skill.data import subsample
from tl_skill.files import atomic_text
from tl_skill.find import record_run
from tl_skill.predictivity import make_subtasks
from tl_skill.tuning.prompt import iterate_batches, layout_for


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens(layout, task, split: str, batch_size: int) -> tuple[int, int]:
    """(real tokens, padded positions) this process feeds the model for `split`."""
    real = padded = 0
    for _, batch in iterate_batches(layout, task, split, batch_size, shard=True):
        real += batch.n_tokens
        padded += batch.input_ids.numel()
    return real, padded


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", required=True, help="local Hugging Face directory, hub id, or tiny-llama for a smoke check"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    # torchrun's own parser takes "--n" for an abbreviation of its options: use --examples there.
    p.add_argument(
        "--n", "--examples", dest="n", type=int, default=1000, help="examples in each of the train and dev passes"
    )
    p.add_argument("--task", default="rotten_tomatoes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument("--max-input-tokens", type=int, default=96)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)

    group = distributed.init_distributed(args.device)
    device_arg = group.device if group.enabled else args.device
    t0 = time.perf_counter()
    model = load_model(args.model, device=device_arg, dtype=args.dtype)
    load_seconds = time.perf_counter() - t0
    spec = model_spec(model)
    device = compat.model_device(model)
    n_params = sum(p.numel() for p in compat.hf_model_of(model).parameters())

    task = load_task(args.task)
    task = subsample(task, {"train": args.n, "dev": args.n}, seed=0)
    subtasks = make_subtasks(task.spec.label_names)
    prompt = SoftPrompt.from_vocab(model, args.prompt_length, seed=0).to(device)
    kw = dict(batch_size=args.batch_size, max_input_tokens=args.max_input_tokens)

    # Warm-up (CUDA context, kernels, allocator) on a few batches, not timed.
    warm = subsample(task, {"train": 2 * args.batch_size, "dev": 2 * args.batch_size}, seed=1)
    record_run(model, warm, prompt, subtasks, "dev", progress=False, **kw)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    layout = layout_for(model, args.prompt_length, args.max_input_tokens)
    counts = torch.tensor(
        [*_tokens(layout, task, "train", args.batch_size), *_tokens(layout, task, "dev", args.batch_size)],
        dtype=torch.long,
    )
    real_train, pad_train, real_dev, pad_dev = distributed.all_reduce_sum(counts).tolist()

    distributed.barrier()
    _sync(device)
    t0 = time.perf_counter()
    stats = record_run(model, task, prompt, subtasks, "dev", progress=group.is_main, **kw)
    _sync(device)
    distributed.barrier()
    seconds = time.perf_counter() - t0

    tokens = real_train + real_dev
    result = {
        "model": args.model,
        "architecture": spec.architecture,
        "n_params": n_params,
        "n_layers": spec.n_layers,
        "d_mlp": spec.d_mlp,
        "dtype": args.dtype,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "world_size": group.world_size,
        "batch_size": args.batch_size,
        "prompt_length": args.prompt_length,
        "n_train": stats.n_train,
        "n_dev": stats.n_eval,
        "tokens": tokens,
        "padded_tokens": pad_train + pad_dev,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "examples_per_s": (stats.n_train + stats.n_eval) / seconds,
        "load_seconds": load_seconds,
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
        "best_predictivity": float(stats.accuracy.double().sub(0.5).abs().add(0.5).amax()),
        "torch": torch.__version__,
        "transformer_lens": compat.TL_VERSION,
    }
    if group.is_main:
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            atomic_text(args.out, text + "\n")
    return result


if __name__ == "__main__":
    main()
