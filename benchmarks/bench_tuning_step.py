"""One prompt-tuning step: tl_skill through the TransformerBridge vs PEFT prompt tuning.

Both sides train P prompt vectors of the same frozen Hugging Face weights (PEFT on
a plain Hugging Face copy, without the bridge's wrappers), on the same batch of rotten_tomatoes examples,
with the same loss (cross-entropy over the label words' logits at the
prediction position) and the same optimiser (AdamW):

- tl_skill: `class_logits` (input + prompt, left padding, the forward stops at
  the unembedding's input) + CE + backward + AdamW step on the `SoftPrompt`;
- PEFT: `PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)`,
  `get_peft_model` on that HF model (prompt + input), logits of the last
  position only (`logits_to_keep=1`; `--peft-logits-to-keep 0` for all of them).

PEFT prepends the prompt and tl_skill appends it; the total length is the same.
Both use the same attention implementation (eager). After a warm-up the two
steps alternate, `--steps` times each; the table gives the median times and
the ratio tl_skill / PEFT.

    python benchmarks/bench_tuning_step.py --out bench_tuning_step.json
    python benchmarks/bench_tuning_step.py --model tiny-llama --steps 3        # smoke check
    python benchmarks/bench_tuning_step.py --device cuda --steps 50 --batch-size 32
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from tl_skill import SoftPrompt, compat, load_model, load_task, model_spec
from tl_skill.files import atomic_text
from tl_skill.tuning import Verbalizer, class_logits, layout_for
from tl_skill.tuning.prefix import class_logits_cached


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=20, help="timed steps of each side (alternating)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each side first")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument("--max-input-tokens", type=int, default=96)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0, help="which training examples form the batch")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--peft-logits-to-keep",
        type=int,
        default=1,
        help="positions whose logits PEFT's model computes (0: all, as plain HF does)",
    )
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.prompt_length < 1 or args.warmup < 0:
        p.error("--steps, --batch-size and --prompt-length must be >= 1, --warmup >= 0")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, device: torch.device) -> tuple[float, float]:
    _sync(device)
    t0 = time.perf_counter()
    loss = step()
    _sync(device)
    return time.perf_counter() - t0, loss


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    from peft import PromptTuningConfig, get_peft_model

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    spec = model_spec(model)
    if spec.family != "causal":
        raise SystemExit(f"{args.model} is a {spec.family} LM; PEFT's CAUSAL_LM prompt tuning needs a causal one")
    hf = compat.hf_model_of(model)
    device = compat.model_device(model)
    P, B = args.prompt_length, args.batch_size

    task = load_task("rotten_tomatoes")
    train = task["train"]
    pick = np.random.RandomState(args.seed).choice(len(train), B, replace=False)
    texts = [task.texts("train")[i] for i in pick]
    labels = torch.as_tensor(task.labels("train")[pick], device=device)
    verbalizer = Verbalizer(model.tokenizer, task.label_words)
    label_ids = verbalizer.token_ids.to(device)

    # tl_skill: input + prompt, left padding (the tuning default)
    ours_batch = layout_for(model, P, args.max_input_tokens).encode(texts, labels.tolist()).to(device)

    def prompt_step(forward):
        """One AdamW step of a fresh prompt (the same start for every side) through `forward`."""
        prompt = SoftPrompt.from_vocab(model, P, seed=0).to(device)
        opt = torch.optim.AdamW(prompt.parameters(), lr=args.lr)

        def step() -> float:
            logits = forward(model, ours_batch, verbalizer, prompt)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        return step

    ours_step = prompt_step(class_logits)
    # with the prefix cache: the input once without grad, the prompt against its keys/values
    cached_step = prompt_step(class_logits_cached)

    # PEFT: prompt + input, the same input tokens, left-padded the same way
    plain = layout_for(model, 0, args.max_input_tokens).encode(texts).to(device)
    # PEFT gets a plain Hugging Face copy of the same weights (no bridge wrappers around
    # its modules), as a user of PEFT alone would have.
    from tl_skill.variants import clean_hf_copy

    plain_hf = clean_hf_copy(model)
    plain_hf.config._attn_implementation = hf.config._attn_implementation
    peft_model = get_peft_model(plain_hf, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    if n_trainable != P * spec.d_model:
        raise SystemExit(f"PEFT trains {n_trainable} values, expected P * d_model = {P * spec.d_model}")
    if any(p.requires_grad for p in model.parameters()):
        raise SystemExit("a backbone parameter requires grad after get_peft_model")
    peft_opt = torch.optim.AdamW(trainable, lr=args.lr)
    keep = {}
    if args.peft_logits_to_keep and "logits_to_keep" in inspect.signature(hf.forward).parameters:
        keep = {"logits_to_keep": args.peft_logits_to_keep}

    def peft_step() -> float:
        out = peft_model(input_ids=plain.input_ids, attention_mask=plain.attention_mask, **keep)
        logits = out.logits[:, -1][:, label_ids]
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        peft_opt.zero_grad(set_to_none=True)
        loss.backward()
        peft_opt.step()
        return loss.item()

    seq_ours = ours_batch.input_ids.shape[1]
    seq_peft = plain.input_ids.shape[1] + P
    if seq_ours != seq_peft:
        raise SystemExit(f"sequence lengths differ: tl_skill {seq_ours}, PEFT {seq_peft}")
    attn = {
        "tl_skill (bridge's HF model)": hf.config._attn_implementation,
        "peft (plain HF copy)": peft_model.base_model.config._attn_implementation,
    }
    print(
        f"model {args.model} on {device} ({compat.model_dtype(model)}), batch {B}, prompt {P}, "
        f"sequence length {seq_ours} (tl_skill: input + prompt; PEFT: prompt + input)"
    )
    print("attention implementation: " + ", ".join(f"{k}={v}" for k, v in attn.items()))
    print(f"PEFT logits: {'last position only' if keep else 'all positions'}; torch threads {torch.get_num_threads()}")

    for _ in range(args.warmup):
        ours_step()
        cached_step()
        peft_step()
    ours_t, peft_t, cached_t, ours_loss, peft_loss, cached_loss = [], [], [], [], [], []
    for _ in range(args.steps):
        t, l = _timed(ours_step, device)
        ours_t.append(t), ours_loss.append(l)
        t, l = _timed(cached_step, device)
        cached_t.append(t), cached_loss.append(l)
        t, l = _timed(peft_step, device)
        peft_t.append(t), peft_loss.append(l)
    # the hooks of class_logits are gone and the backbone is untouched by either side
    assert all(p.grad is None for p in hf.parameters()) and all(p.grad is None for p in plain_hf.parameters())

    ours_med, peft_med, cached_med = statistics.median(ours_t), statistics.median(peft_t), statistics.median(cached_t)
    result = {
        "model": args.model,
        "device": str(device),
        "dtype": str(compat.model_dtype(model)),
        "batch_size": B,
        "prompt_length": P,
        "sequence_length": seq_ours,
        "steps": args.steps,
        "warmup": args.warmup,
        "attn_implementation": attn,
        "peft_logits_to_keep": keep.get("logits_to_keep", 0),
        "tl_skill_step_seconds": ours_t,
        "peft_step_seconds": peft_t,
        "tl_skill_median_seconds": ours_med,
        "peft_median_seconds": peft_med,
        "ratio_tl_skill_over_peft": ours_med / peft_med,
        "cached_step_seconds": cached_t,
        "cached_median_seconds": cached_med,
        "ratio_cached_vs_peft": cached_med / peft_med,
        "ratio_cached_vs_uncached": cached_med / ours_med,
        # the same start and the same batch: the two tl_skill sides follow the same losses
        "cached_loss_max_abs_difference": max(abs(a - b) for a, b in zip(ours_loss, cached_loss)),
        "tl_skill_loss_first_last": [ours_loss[0], ours_loss[-1]],
        "peft_loss_first_last": [peft_loss[0], peft_loss[-1]],
        "versions": {k: _version(k) for k in ("torch", "transformers", "transformer-lens", "peft")},
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    print()
    print(f"{'':<10} {'median s/step':>14} {'min':>9} {'max':>9}")
    for name, ts in (("tl_skill", ours_t), ("cached", cached_t), ("peft", peft_t)):
        print(f"{name:<10} {statistics.median(ts):>14.4f} {min(ts):>9.4f} {max(ts):>9.4f}")
    print(
        f"ratio tl_skill / PEFT: {result['ratio_tl_skill_over_peft']:.3f}; cached / PEFT: "
        f"{result['ratio_cached_vs_peft']:.3f}; cached / uncached: {result['ratio_cached_vs_uncached']:.3f} "
        f"(prompt length {P})"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_text(args.out, json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
