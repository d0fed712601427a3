"""Prompt tuning of a frozen model (SPEC §1), run directories and resume.

A run directory holds:
- `prompt.safetensors`: tensor `prompt`, shape [P, d_model], the best prompt by dev accuracy;
- `run.json`: model, task, seeds, label words, settings, metrics, timings;
- `checkpoint.safetensors`: prompt, optimizer, scheduler and loop state (tensors, plus
  JSON in the file's metadata; no pickle), so an interrupted run resumes and ends with
  the same history and prompt as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import compat, distributed
from .files import (FileFormatError, atomic_json, check_output_dir, check_str_list, check_types, load_state,
                    read_json, save_state)
from .models import model_spec
from .prompt import Layout, SoftPrompt, Verbalizer, class_logits, layout_for
from .tasks import Task, column, label_array, load_task, subsample

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
PROMPT_FILE = "prompt.safetensors"
CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # pickle: never loaded


class RunError(ValueError):
    """A run directory that is missing, incomplete or inconsistent."""


def check_training_settings(cfg, error: type[Exception] = ValueError, what: str = "tuning", **more: bool) -> None:
    """Refuse impossible training settings of a config, naming each bad field.

    Shared by `TuneConfig` and `origin.FinetuneConfig`; `more` adds {field: is it valid}.
    """
    checks = {
        **more,
        "steps": cfg.steps >= 1,
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
class TuneConfig:
    """Prompt-tuning settings. Defaults are those measured on SmolLM2-135M (see README)."""

    prompt_length: int = 16
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    max_grad_norm: float = 1.0
    eval_every: int = 50
    patience: int = 0  # evaluations without dev improvement before stopping; 0 = never stop early
    seed: int = 0  # prompt initialisation and data order
    task_seed: int = 0  # train/dev/test split
    max_input_tokens: int = 96
    padding_side: str | None = None
    max_train_examples: int | None = None
    max_dev_examples: int | None = 300
    max_test_examples: int | None = 1000
    eval_batch_size: int = 32
    init_text: str | None = None

    def __post_init__(self):
        optional = lambda v: v is None or v >= 1
        check_training_settings(
            self, prompt_length=self.prompt_length >= 1, patience=self.patience >= 0,
            task_seed=self.task_seed >= 0, eval_batch_size=self.eval_batch_size >= 1,
            max_train_examples=optional(self.max_train_examples), max_dev_examples=optional(self.max_dev_examples),
            max_test_examples=optional(self.max_test_examples))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TuneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _pick(task: Task, cfg: TuneConfig) -> Task:
    return subsample(task, {"train": cfg.max_train_examples, "dev": cfg.max_dev_examples,
                            "test": cfg.max_test_examples}, seed=cfg.task_seed)


def iterate_batches(layout: Layout, task: Task, split: str, batch_size: int, sort: bool = True,
                    shard: bool = False):
    """Yield (indices, Batch) over a split; sorted by length so padding stays small.

    With `shard` under torch.distributed, only this process's batches (every
    world-th one): each batch is the one a single process would see.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    ds = task[split]
    tb = column(ds, "text_b") if "text_b" in ds.column_names else None
    tokens = layout.tokenize(column(ds, "text"), tb)
    labels = label_array(ds)
    order = np.argsort([len(t) for t in tokens], kind="stable") if sort else np.arange(len(tokens))
    starts = range(0, len(order), batch_size)
    for start in distributed.shard(starts) if shard else starts:
        idx = order[start:start + batch_size]
        batch = layout.collate([tokens[i] for i in idx], labels[idx])
        batch.first_example = int(start)
        yield idx, batch


@torch.no_grad()
def evaluate(model, task: Task, split: str, verbalizer: Verbalizer, prompt: SoftPrompt | None,
             prompt_length: int | None = None, batch_size: int = 32, max_input_tokens: int = 96,
             extra_hooks: Sequence = (), padding_side: str | None = None, progress: bool = False,
             desc: str | None = None) -> dict[str, Any]:
    """Accuracy of the prompted (or zero-shot, `prompt=None`) model on one split."""
    P = prompt.length if prompt is not None else (prompt_length or 0)
    layout = layout_for(model, P, max_input_tokens, padding_side)
    device = compat.model_device(model)
    n = len(task[split])
    preds = np.zeros(n, dtype=np.int64)
    bar = tqdm(total=n, desc=desc or f"eval {split}", disable=not progress, leave=False, unit="ex")
    # Hooks that number examples (noise perturbations) hear each batch's global position, so
    # their draws do not depend on batch size or on how processes share the batches.
    starters = [fn.start_batch for _, fn in extra_hooks if callable(getattr(fn, "start_batch", None))]
    for idx, batch in iterate_batches(layout, task, split, batch_size, shard=True):
        batch = batch.to(device)
        for start_batch in starters:
            start_batch(batch.first_example)
        logits = class_logits(model, batch, verbalizer, prompt, extra_hooks)
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


def _batch_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """Indices of training batch `step`: a stream of per-epoch permutations, so resume is exact."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start, n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        take = perm[offset: offset + batch_size - len(out)]
        out.extend(take.tolist())
        start += len(take)
    return np.asarray(out)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


@dataclass
class Run:
    """A prompt-tuning run read back from its directory."""

    path: Path
    info: dict[str, Any]
    prompt: SoftPrompt

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        """Read a run directory, refusing (with the file's name) anything missing, corrupt or mistyped."""
        path = Path(path)
        if not path.is_dir():
            raise RunError(f"run directory not found: {path}")
        missing = [f for f in (RUN_JSON, PROMPT_FILE) if not (path / f).exists()]
        if missing:
            raise RunError(f"{path} is not a finished run: missing {', '.join(missing)}")
        where = path / RUN_JSON
        try:
            info = read_json(where, "run file", {"model": str, "task": str, "task_seed": int,
                                                 "label_words": list, "config": dict})
            check_str_list(info, "label_words", f"run file {where}")
            if "task_spec" in info:
                check_types(info, {"task_spec": dict}, f"run file {where}")
                check_types(info["task_spec"], {"label_names": list, "label_words": list},
                            f"run file {where}: task_spec")
        except FileFormatError as exc:
            raise RunError(str(exc)) from None
        try:
            TuneConfig.from_dict(info["config"])
        except (TypeError, ValueError) as exc:
            raise RunError(f"run file {where}: 'config' is not a valid tuning config ({exc})") from None
        prompt = SoftPrompt.load(path / PROMPT_FILE)
        width = (info.get("model_spec") or {}).get("d_model")
        if isinstance(width, int) and prompt.vectors.shape[1] != width:
            raise RunError(f"{path / PROMPT_FILE} holds a prompt of width {prompt.vectors.shape[1]}, but "
                           f"{where} says the model's d_model is {width}")
        return cls(path, info, prompt)

    @property
    def model_name(self) -> str:
        return self.info["model"]

    @property
    def task_name(self) -> str:
        return self.info["task"]

    @property
    def config(self) -> TuneConfig:
        return TuneConfig.from_dict(self.info["config"])

    @property
    def metrics(self) -> dict[str, Any]:
        return self.info.get("metrics", {})

    def load_task(self) -> Task:
        """The run's task, with its split seed and label words.

        A user data file (csv:/jsonl:) is read only when run.json records its
        sha256 and the file still has it; its path is logged, since run.json
        names it.
        """
        spec = self.info.get("task_spec") or {}
        words: Any = self.info["label_words"]
        if list(spec.get("label_words", [])) == list(words) and len(spec.get("label_names", [])) == len(words):
            words = dict(zip(spec["label_names"], words))  # the exact class order of the run
        if self.task_name.startswith(("csv:", "jsonl:")):
            digest = spec.get("digest")
            if not digest:
                raise RunError(f"{self.path / RUN_JSON} names the data file {self.task_name.split(':', 1)[1]} "
                               "but records no sha256 of it, so a changed or substituted file could not be "
                               "told apart; tune the run again with this version of tl_skill")
            log.info("run %s reads its data from %s (named in its run.json)", self.path,
                     self.task_name.split(":", 1)[1])
            return load_task(self.task_name, seed=self.info["task_seed"], label_words=words, digest=digest)
        return load_task(self.task_name, seed=self.info["task_seed"], label_words=words)

    def verbalizer(self, model) -> Verbalizer:
        return Verbalizer(model.tokenizer, self.info["label_words"])


def tune(model, task: Task, out: str | Path, config: TuneConfig | None = None,
         progress: bool = True, evaluate_test: bool = True,
         init_prompt: SoftPrompt | None = None, evaluate_dev: bool = True) -> Run:
    """Prompt-tune `model` (kept frozen) on `task`; results and checkpoints go to `out`.

    `init_prompt` (length `config.prompt_length`) replaces the random start,
    e.g. another task's prompt for prompt transfer (SPEC §8).

    `evaluate_dev=False` skips the dev evaluations (no model selection): the
    saved prompt is the last step's and `dev_accuracy` is None. Short tunings
    whose only dev check would be at their last step (the transfer study's)
    get the same prompt for less work.

    Reruns with the same directory resume from the last checkpoint, or return
    the finished run at once.
    """
    cfg = config or TuneConfig()
    out = Path(out)
    check_output_dir(out)
    spec = model_spec(model)
    verbalizer = Verbalizer(model.tokenizer, task.spec.label_words)
    identity = {"model": spec.name, "task": task.spec.name, "task_seed": task.spec.seed,
                "label_words": list(task.spec.label_words), "config": asdict(cfg)}
    if task.spec.digest:  # a user data file: resuming on changed data would mix two tasks
        identity["task_digest"] = task.spec.digest
    if (out / RUN_JSON).exists():
        try:
            prev = read_json(out / RUN_JSON, "run file")
        except FileFormatError as exc:
            raise RunError(f"{exc}; use another --out or delete it") from None
        clash = [k for k in identity if prev.get(k) != identity[k]]
        if clash:
            raise RunError(
                f"{out} already holds a run with different {', '.join(clash)}; "
                "use another --out or delete it"
            )
        if prev.get("status") == "done" and (out / PROMPT_FILE).exists():
            log.info("run in %s is already finished; reusing it", out)
            return Run.load(out)

    data = _pick(task, cfg)
    device = compat.model_device(model)
    layout = layout_for(model, cfg.prompt_length, cfg.max_input_tokens, cfg.padding_side)
    layout.check_fits(compat.context_length(model))
    train = data["train"]
    tb = column(train, "text_b") if "text_b" in train.column_names else None
    train_tokens = layout.tokenize(column(train, "text"), tb)
    train_labels = label_array(train)
    n_train = len(train_tokens)

    for p in model.parameters():
        if p.requires_grad:
            raise RuntimeError("the backbone must be frozen: a model parameter requires grad")
    if init_prompt is not None:
        if init_prompt.length != cfg.prompt_length:
            raise ValueError(f"init_prompt has length {init_prompt.length}, the config asks for "
                             f"prompt_length={cfg.prompt_length}")
        prompt = SoftPrompt(init_prompt.vectors.detach().cpu())
    elif cfg.init_text:
        prompt = SoftPrompt.from_text(model, cfg.init_text, cfg.prompt_length)
    else:
        prompt = SoftPrompt.from_vocab(model, cfg.prompt_length, seed=cfg.seed)
    prompt = prompt.to(device)
    opt = torch.optim.AdamW(prompt.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_fraction * cfg.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps, warmup))
    state = {"step": 0, "best_dev": -1.0, "best_step": -1, "evals_since_best": 0,
             "history": [], "train_seconds": 0.0}
    best_vectors = prompt.vectors.detach().clone()
    if (out / LEGACY_CHECKPOINT).exists():
        log.warning("%s is a pickle checkpoint of an older tl_skill: not loaded (it could run code); "
                    "tuning restarts from step 0", out / LEGACY_CHECKPOINT)
    if (out / CHECKPOINT).exists():
        try:
            ck = load_state(out / CHECKPOINT, "checkpoint", device)
        except FileFormatError as exc:
            raise RunError(f"{exc}; delete it to restart the tuning") from None
        prompt.vectors.data.copy_(ck["prompt"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        best_vectors = ck["best_prompt"].to(device)
        state = ck["state"]
        log.info("resuming %s at step %d", out, state["step"])
    # Under torchrun: rank 0 writes the files; the prompt's gradient is averaged over processes.
    ddp = distributed.prompt_data_parallel(model, verbalizer, prompt, cfg.batch_size)

    info = {**identity, "model_spec": spec.to_dict(), "task_spec": data.spec.to_dict(),
            "prompt_length": cfg.prompt_length, "verbalizer": verbalizer.to_dict(),
            "status": "running", "torch": torch.__version__, "transformer_lens": compat.TL_VERSION}
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        atomic_json(out / RUN_JSON, info)

    def current() -> dict[str, Any]:
        return {"prompt": prompt.vectors.detach().clone(), "optimizer": copy.deepcopy(opt.state_dict()),
                "scheduler": copy.deepcopy(sched.state_dict()), "best_prompt": best_vectors.detach().clone(),
                "state": copy.deepcopy(state)}

    def checkpoint(saved: dict[str, Any] | None = None):
        if distributed.is_main():
            save_state(out / CHECKPOINT, saved or current())

    # An interrupt mid-step (inside the dev evaluation, between the optimiser step and the
    # checkpoint) saves the state from the start of that step: the rerun redoes the whole step,
    # so its history and prompt are those of an uninterrupted run.
    step_start: dict[str, Any] | None = None

    def dev_eval() -> float:
        with torch.no_grad():
            return evaluate(model, data, "dev", verbalizer, prompt, batch_size=cfg.eval_batch_size,
                            max_input_tokens=cfg.max_input_tokens, padding_side=cfg.padding_side)["accuracy"]

    bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"tune {task.spec.name}",
               disable=not progress, unit="step")
    stopped_early = False
    try:
        while state["step"] < cfg.steps:
            step_start = current()
            t0 = time.perf_counter()
            step = state["step"]
            idx = _batch_indices(step, cfg.batch_size, n_train, cfg.seed)
            if ddp is None:
                batch = layout.collate([train_tokens[i] for i in idx], train_labels[idx]).to(device)
                logits = class_logits(model, batch, verbalizer, prompt)
                loss = torch.nn.functional.cross_entropy(logits.float(), batch.labels)
                batch_loss = loss.detach()
            else:  # this process's part of the global batch; the logged loss is the global mean
                part = distributed.shard(idx)
                batch = layout.collate([train_tokens[i] for i in part], train_labels[part]).to(device)
                loss = ddp(batch, len(idx))
                batch_loss = distributed.all_reduce_sum(loss.detach()) / distributed.world_size()
            if not torch.isfinite(batch_loss):
                raise FloatingPointError(f"loss became {batch_loss.item()} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(prompt.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            state["step"] = step + 1
            state["train_seconds"] += time.perf_counter() - t0
            entry = {"step": step + 1, "loss": batch_loss.item()}
            at_eval = state["step"] % cfg.eval_every == 0 or state["step"] == cfg.steps
            if at_eval and evaluate_dev:
                acc = dev_eval()
                entry["dev_accuracy"] = acc
                if acc > state["best_dev"]:
                    state.update(best_dev=acc, best_step=state["step"], evals_since_best=0)
                    best_vectors = prompt.vectors.detach().clone()
                else:
                    state["evals_since_best"] += 1
                bar.set_postfix(loss=f"{entry['loss']:.3f}", dev=f"{acc:.3f}", best=f"{state['best_dev']:.3f}")
                state["history"].append(entry)
                step_start = None
                checkpoint()
                if cfg.patience and state["evals_since_best"] >= cfg.patience:
                    stopped_early = True
                    break
            else:
                state["history"].append(entry)
                step_start = None
                best = {"best": f"{max(state['best_dev'], 0):.3f}"} if evaluate_dev else {}
                bar.set_postfix(loss=f"{entry['loss']:.3f}", **best)
                if at_eval:  # without dev checks: still a resumable checkpoint
                    checkpoint()
            bar.update(1)
    except KeyboardInterrupt:
        checkpoint(step_start)
        log.warning("interrupted at step %d; rerun the same command to resume", state["step"])
        raise
    finally:
        bar.close()

    if not evaluate_dev:  # no model selection: the last step's prompt
        best_vectors = prompt.vectors.detach().clone()
        state["best_step"] = state["step"]
    prompt.vectors.data.copy_(best_vectors)
    if distributed.is_main():
        prompt.save(out / PROMPT_FILE)
    metrics = {"dev_accuracy": state["best_dev"] if evaluate_dev else None, "best_step": state["best_step"],
               "steps_run": state["step"], "stopped_early": stopped_early,
               "majority_accuracy": majority_accuracy(data, "test", train=task)}
    timings = {"train_seconds": state["train_seconds"],
               "seconds_per_step": state["train_seconds"] / max(1, state["step"])}
    if evaluate_test:
        t0 = time.perf_counter()
        metrics["test_accuracy"] = evaluate(
            model, data, "test", verbalizer, prompt, batch_size=cfg.eval_batch_size,
            max_input_tokens=cfg.max_input_tokens, padding_side=cfg.padding_side,
            progress=progress, desc="test (prompted)")["accuracy"]
        metrics["zero_shot_accuracy"] = evaluate(
            model, data, "test", verbalizer, None, batch_size=cfg.eval_batch_size,
            max_input_tokens=cfg.max_input_tokens, padding_side=cfg.padding_side,
            progress=progress, desc="test (zero-shot)")["accuracy"]
        timings["test_eval_seconds"] = time.perf_counter() - t0
    info.update(status="done", metrics=metrics, timings=timings, history=state["history"])
    if distributed.is_main():
        atomic_json(out / RUN_JSON, info)
        (out / CHECKPOINT).unlink(missing_ok=True)
        (out / LEGACY_CHECKPOINT).unlink(missing_ok=True)
    distributed.barrier()  # the others read the run back once rank 0 has written it
    log.info("tuned %s on %s: dev %s test %s", spec.name, task.spec.name, metrics["dev_accuracy"],
             metrics.get("test_accuracy"))
    return Run.load(out)


def tune_trials(model, task: Task, out: str | Path, seeds: Sequence[int],
                config: TuneConfig | None = None, progress: bool = True) -> list[Run]:
    """Several prompts (trials) per task, one subdirectory `seed{S}` each."""
    cfg = config or TuneConfig()
    runs = []
    for s in seeds:
        runs.append(tune(model, task, Path(out) / f"seed{s}",
                         TuneConfig.from_dict({**asdict(cfg), "seed": s}), progress=progress))
    return runs
