"""One trainer for everything tl_skill trains, and the evaluation it selects with.

Prompt tuning (`tuning.tune`: the soft prompt's vectors) and the origin
study's LoRA and BitFit fine-tuning (`variants.finetune`: adapter matrices,
biases or norm weights, no prompt) differ only in the parameters trained and
in whether a prompt is applied: both run `train_loop`, with the same batches
(`tuning.prompt.train_batch_indices`), loss (cross-entropy over the verbalizer
logits), AdamW with linear warm-up and decay, gradient clipping, dev
evaluations for model selection, and the same checkpoint and resume rule:

- a checkpoint (`checkpoint.safetensors`: parameters, best parameters,
  optimiser, scheduler and loop state, JSON in the file's metadata, no pickle)
  is written at every evaluation and on Ctrl-C;
- an interrupt in the middle of a step (inside the dev evaluation, between
  the optimiser step and the checkpoint) saves the state from the start of
  that step, so the rerun redoes the whole step and ends with the history
  and parameters of an uninterrupted run.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tl_skill import compat, distributed
from tl_skill.compat import HookedRootModule
from tl_skill.data.tasks import Task, column, label_array
from tl_skill.errors import TrainingError
from tl_skill.files import FileFormatError, load_state, save_state
from tl_skill.tuning.prefix import class_logits_cached, class_logits_many, prefix_cache_default, resolve_prefix_cache
from tl_skill.tuning.prompt import (
    SoftPrompt,
    Verbalizer,
    batch_starters,
    class_logits,
    iterate_batches,
    layout_for,
    train_batch_indices,
)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # pickle: never loaded


MAX_STEPS = 10**8  # more is a typing slip: the warm-up alone would outlast any machine


def check_training_settings(cfg, error: type[Exception] = TrainingError, what: str = "tuning", **more: bool) -> None:
    """Refuse impossible training settings of a config, naming each bad field.

    Used by `LoopConfig` (and so `TuneConfig`, `variants.FinetuneConfig`); `more` adds {field: is it valid}.
    """
    checks = {
        **more,
        "steps": 1 <= cfg.steps <= MAX_STEPS,
        "batch_size": cfg.batch_size >= 1,
        "lr": cfg.lr > 0 and math.isfinite(cfg.lr),
        "eval_every": cfg.eval_every >= 1,
        "max_input_tokens": cfg.max_input_tokens >= 1,
        "warmup_fraction": 0 <= cfg.warmup_fraction < 1,
        "seed": cfg.seed >= 0,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise error(f"invalid {what} setting(s): " + ", ".join(f"{k}={getattr(cfg, k)!r}" for k in bad))


@dataclass
class LoopConfig:
    """The settings of `train_loop` that prompt tuning and fine-tuning share (their configs extend it)."""

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    max_grad_norm: float = 1.0
    eval_every: int = 50
    patience: int = 0  # evaluations without dev improvement before stopping; 0 = never stop early
    seed: int = 0  # initialisation and data order
    max_input_tokens: int = 96
    padding_side: str | None = None
    eval_batch_size: int = 32

    def _check(self, error: type[Exception], what: str, **more: bool) -> None:
        check_training_settings(
            self, error, what, patience=self.patience >= 0, eval_batch_size=self.eval_batch_size >= 1, **more
        )


@torch.no_grad()
def evaluate(
    model: HookedRootModule,
    task: Task,
    split: str,
    verbalizer: Verbalizer,
    prompt: SoftPrompt | None,
    prompt_length: int | None = None,
    batch_size: int = 32,
    max_input_tokens: int = 96,
    extra_hooks: Sequence = (),
    padding_side: str | None = None,
    progress: bool = False,
    desc: str | None = None,
    prefix_cache: bool | None = None,
) -> dict[str, Any]:
    """Accuracy of the prompted (or zero-shot, `prompt=None`) model on one split.

    `prefix_cache` (default: `tuning.prefix.prefix_cache_default()`, on): for a causal LM without
    `extra_hooks` each batch's input runs once and the prompt against its keys/values
    (`tuning.prefix.class_logits_cached`, through the plain view where nobody listens; the same logits to
    float rounding). With hooks (a perturbation) one prompt gains nothing from the cache: both passes
    would run through the bridge's hooks, so the full pass runs (SmolLM2, 192 examples under noise
    hooks: 9.5 s cached, 9.1 s full); `prefix_cache=True` forces the cache.

    Returns `accuracy`, `n` and `predictions` (in the split's order).
    """
    cached = prompt is not None and (
        bool(prefix_cache) if prefix_cache is not None else prefix_cache_default() and not extra_hooks
    )
    forward = class_logits_cached if cached else class_logits
    P = prompt.length if prompt is not None else (prompt_length or 0)
    layout = layout_for(model, P, max_input_tokens, padding_side)
    device = compat.model_device(model)
    n = len(task[split])
    preds = np.zeros(n, dtype=np.int64)
    bar = tqdm(total=n, desc=desc or f"eval {split}", disable=not progress, leave=False, unit="ex")
    # Hooks that number examples (noise perturbations) hear each batch's global position, so
    # their draws do not depend on batch size or on how processes share the batches.
    starters = batch_starters(extra_hooks)
    for idx, batch in iterate_batches(layout, task, split, batch_size, shard=True):
        batch = batch.to(device)
        for start_batch in starters:
            start_batch(batch.first_example)
        logits = forward(model, batch, verbalizer, prompt, extra_hooks)
        preds[idx] = logits.argmax(-1).cpu().numpy()
        bar.update(len(idx))
    bar.close()
    preds = distributed.all_reduce_sum(preds)  # each process filled its own batches, zeros elsewhere
    labels = task.labels(split)
    return {"accuracy": float((preds == labels).mean()), "n": n, "predictions": preds}


def majority_accuracy(task: Task, split: str = "test", train: Task | None = None) -> float:
    """Accuracy on `split` of always answering the most common class of `train`'s train split.

    Pass the full task as `train` when `task` is a subsample, so the majority
    class does not depend on which training examples were drawn.
    """
    majority = np.bincount((train or task).labels("train")).argmax()
    return float((task.labels(split) == majority).mean())


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _snapshot(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def train_loop(
    model: HookedRootModule,
    data: Task,
    verbalizer: Verbalizer,
    params: Mapping[str, torch.nn.Parameter],
    cfg,
    *,
    prompt: SoftPrompt | None = None,
    out: Path | None = None,
    evaluate_dev: bool = True,
    progress: bool = True,
    desc: str = "train",
    ddp: Callable | None = None,
    prefix_cache: bool | None = None,
) -> dict[str, Any]:
    """Train `params` of `model` on `data`'s train split, selecting by dev accuracy (module docstring).

    Args:
        params: the trainable tensors by name (the prompt's vectors, or model parameters); every
            other parameter of the model stays frozen, and the model's `requires_grad` flags are
            restored on return, also after an error.
        cfg: steps, batch_size, lr, weight_decay, warmup_fraction, max_grad_norm, eval_every,
            patience (optional), seed, eval_batch_size, max_input_tokens, padding_side.
        prompt: applied in every forward pass (prompt tuning); None for fine-tuning without one.
        out: directory for the checkpoint (None: no checkpoint, no resume).
        evaluate_dev: without dev evaluations the last step's parameters are kept.
        ddp: under torchrun, a callable `(batch, global batch size) -> loss` that averages the
            gradient over processes (`tuning.parallel.prompt_data_parallel`).
        prefix_cache: run each batch's input once without grad and only the prompt positions
            with grad against its cached keys/values (`tuning.prefix.class_logits_cached`; causal
            models with a prompt that is the only trained tensor; elsewhere the full pass).
            None: `tuning.prefix.prefix_cache_default()` (on). The same loss and
            gradient: it is not part of any run's identity.

    Returns:
        The loop state: `history` (one entry per step, with `dev_accuracy` at evaluations),
        `best_dev`, `best_step`, `step` (steps run), `stopped_early`, `train_seconds`. On
        return `params` hold the selected values.
    """
    if not params:
        raise TrainingError("no parameters to train")
    owned = {id(p) for p in model.parameters()} | ({id(prompt.vectors)} if prompt is not None else set())
    foreign = [n for n, p in params.items() if id(p) not in owned]
    if foreign:
        raise TrainingError(f"parameters {foreign[:3]} belong neither to the model nor to the prompt")
    P = prompt.length if prompt is not None else 0
    layout = layout_for(model, P, cfg.max_input_tokens, cfg.padding_side)
    layout.check_fits(compat.context_length(model))
    device = compat.model_device(model)
    train = data["train"]
    tb = column(train, "text_b") if "text_b" in train.column_names else None
    train_tokens = layout.tokenize(column(train, "text"), tb)
    train_labels = label_array(train)
    plist = list(params.values())
    # the input's keys/values are fixed only while the prompt is all that trains
    cached = (
        resolve_prefix_cache(prefix_cache) and prompt is not None and [id(p) for p in plist] == [id(prompt.vectors)]
    )
    opt = torch.optim.AdamW(plist, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_fraction * cfg.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, warmup))
    log.info(
        "%s: %d steps of %d examples; AdamW lr %g, linear warm-up over %d steps then linear decay to 0; dev check "
        "every %d steps",
        desc,
        cfg.steps,
        cfg.batch_size,
        cfg.lr,
        warmup,
        cfg.eval_every,
    )
    patience = getattr(cfg, "patience", 0)
    state: dict[str, Any] = {
        "step": 0,
        "best_dev": -1.0,
        "best_step": -1,
        "evals_since_best": 0,
        "history": [],
        "train_seconds": 0.0,
    }
    best = _snapshot(params)
    ck_path = out / CHECKPOINT if out is not None else None
    if out is not None and (out / LEGACY_CHECKPOINT).exists():
        log.warning(
            "%s is a pickle checkpoint of an older tl_skill: not loaded (it could run code); "
            "training restarts from step 0",
            out / LEGACY_CHECKPOINT,
        )
    if ck_path is not None and ck_path.exists():
        try:
            ck = load_state(ck_path, "checkpoint", device)
            if "params" not in ck and "prompt" in ck:  # a prompt-tuning checkpoint of tl_skill 0.1
                ck = {**ck, "params": {"prompt": ck["prompt"]}, "best": {"prompt": ck["best_prompt"]}}
            if set(ck.get("params", {})) != set(params):
                raise FileFormatError(
                    f"checkpoint {ck_path} holds other parameters "
                    f"({sorted(ck.get('params', {}))[:3]}) than those trained"
                )
        except FileFormatError as exc:
            raise TrainingError(f"{exc}; delete it to restart the training") from None
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ck["params"][n])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        best = {n: t.to(device) for n, t in ck["best"].items()}
        state = ck["state"]
        log.info("resuming %s at step %d", out, state["step"])

    def current() -> dict[str, Any]:
        return {
            "params": _snapshot(params),
            "optimizer": copy.deepcopy(opt.state_dict()),
            "scheduler": copy.deepcopy(sched.state_dict()),
            "best": _snapshot(best),
            "state": copy.deepcopy(state),
        }

    def checkpoint(saved: dict[str, Any] | None = None):
        if ck_path is not None and distributed.is_main():
            ck_path.parent.mkdir(parents=True, exist_ok=True)
            save_state(ck_path, saved or current())

    def dev_eval() -> float:
        return evaluate(
            model,
            data,
            "dev",
            verbalizer,
            prompt,
            batch_size=cfg.eval_batch_size,
            max_input_tokens=cfg.max_input_tokens,
            padding_side=cfg.padding_side,
        )["accuracy"]

    grad_flags = {id(p): p.requires_grad for p in model.parameters()}
    step_start: dict[str, Any] | None = None
    bar = tqdm(total=cfg.steps, initial=state["step"], desc=desc, disable=not progress, unit="step")
    state["stopped_early"] = False
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in plist:
            p.requires_grad_(True)
        while state["step"] < cfg.steps:
            step_start = current()
            t0 = time.perf_counter()
            step = state["step"]
            idx = train_batch_indices(step, cfg.batch_size, len(train_tokens), cfg.seed)
            if ddp is None:
                batch = layout.collate([train_tokens[i] for i in idx], train_labels[idx]).to(device)
                forward = class_logits_cached if cached else class_logits
                logits = forward(model, batch, verbalizer, prompt)
                loss = torch.nn.functional.cross_entropy(logits.float(), torch.as_tensor(batch.labels))
                batch_loss = loss.detach()
            else:  # this process's part of the global batch; the logged loss is the global mean
                part = np.asarray(distributed.shard(list(idx)))
                batch = layout.collate([train_tokens[i] for i in part], train_labels[part]).to(device)
                loss = ddp(batch, len(idx))
                batch_loss = distributed.all_reduce_sum(loss.detach()) / distributed.world_size()
            if not torch.isfinite(batch_loss):
                raise FloatingPointError(
                    f"{desc}: loss became {batch_loss.item()} at step {step}; lower the learning rate"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plist, cfg.max_grad_norm)
            opt.step()
            sched.step()
            state["step"] = step + 1
            state["train_seconds"] += time.perf_counter() - t0
            entry = {"step": step + 1, "loss": batch_loss.item()}
            at_eval = state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps
            postfix = {"loss": f"{entry['loss']:.3f}"}
            if at_eval and evaluate_dev:
                acc = dev_eval()
                entry["dev_accuracy"] = acc
                if acc > state["best_dev"]:
                    state.update(best_dev=acc, best_step=state["step"], evals_since_best=0)
                    best = _snapshot(params)
                else:
                    state["evals_since_best"] += 1
                postfix.update(dev=f"{acc:.3f}", best=f"{state['best_dev']:.3f}")
            state["history"].append(entry)
            step_start = None
            if at_eval:  # with or without dev checks: a resumable checkpoint
                checkpoint()
            bar.set_postfix(**postfix)
            bar.update(1)
            if at_eval and evaluate_dev and patience and state["evals_since_best"] >= patience:
                state["stopped_early"] = True
                break
    except KeyboardInterrupt:
        checkpoint(step_start)
        log.warning("interrupted at step %d; rerun the same command to resume", state["step"])
        raise
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)
        for p in plist:
            p.grad = None
        for p in model.parameters():
            p.requires_grad_(grad_flags.get(id(p), False))
        if prompt is not None:
            prompt.vectors.requires_grad_(True)

    if not evaluate_dev:  # no model selection: the last step's parameters
        best = _snapshot(params)
        state["best_step"] = state["step"]
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(best[n])
    return state


def remove_checkpoint(out: Path) -> None:
    """Delete a finished training's checkpoints (rank 0)."""
    if distributed.is_main():
        (out / CHECKPOINT).unlink(missing_ok=True)
        legacy = out / LEGACY_CHECKPOINT
        if legacy.exists():
            legacy.unlink()
            log.warning("deleted %s, the unused pickle checkpoint of an older tl_skill (the run is finished)", legacy)


@torch.no_grad()
def evaluate_prompts(
    model: HookedRootModule,
    task: Task,
    split: str,
    verbalizer: Verbalizer,
    prompts: Sequence[SoftPrompt],
    batch_size: int = 32,
    max_input_tokens: int = 96,
    extra_hooks: Sequence = (),
    padding_side: str | None = None,
) -> list[dict[str, Any]]:
    """`evaluate` of several prompts (one length) on the same examples, sharing each batch's input pass.

    With the prefix cache (`tuning.prefix.class_logits_many`) K prompts cost one input pass plus K
    prompt passes; the results are `evaluate`'s for each prompt.
    """
    lengths = {p.length for p in prompts}
    if len(lengths) != 1:
        raise TrainingError(f"evaluate_prompts needs prompts of one length, got lengths {sorted(lengths)}")
    layout = layout_for(model, lengths.pop(), max_input_tokens, padding_side)
    device = compat.model_device(model)
    n = len(task[split])
    preds = np.zeros((len(prompts), n), dtype=np.int64)
    prompts = [p.to(device) for p in prompts]
    starters = batch_starters(extra_hooks)
    for idx, batch in iterate_batches(layout, task, split, batch_size, shard=True):
        batch = batch.to(device)
        for start_batch in starters:  # as `evaluate` does (the full-pass fallback needs it)
            start_batch(batch.first_example)
        preds[:, idx] = class_logits_many(model, batch, verbalizer, prompts, extra_hooks).argmax(-1).cpu().numpy()
    preds = distributed.all_reduce_sum(preds)
    labels = task.labels(split)
    return [{"accuracy": float((p == labels).mean()), "n": n, "predictions": p} for p in preds]
