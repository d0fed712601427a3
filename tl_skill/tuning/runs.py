"""Prompt tuning of a frozen model (method §1), run directories and resume.

A run directory holds:
- `prompt.safetensors`: tensor `prompt`, shape [P, d_model], the best prompt by dev accuracy;
- `run.json`: model, task, seeds, label words, settings, metrics, timings;
- `experiment.json`: the settings that decide the run (`files.claim_dir`);
- `checkpoint.safetensors` while it runs (see `train`): an interrupted run resumes and
  ends with the same history and prompt as an uninterrupted one.

The loop itself is `tuning.loop.train_loop`, shared with LoRA/BitFit fine-tuning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from tl_skill import compat, distributed
from tl_skill.basis import require_neuron_basis
from tl_skill.compat import HookedRootModule
from tl_skill.data.sources import load_task
from tl_skill.data.tasks import Task, load_examples, save_examples, subsample
from tl_skill.display import html_facts, html_table, repr_line
from tl_skill.errors import RunError, TaskError
from tl_skill.files import (
    FileFormatError,
    OutputDirError,
    atomic_json,
    check_str_list,
    check_types,
    claim_dir,
    read_json,
    rolls_back_claims,
    tensor_digest,
)
from tl_skill.models import model_spec
from tl_skill.tuning.loop import (
    LoopConfig,
    TrainingError,
    evaluate,
    majority_accuracy,
    remove_checkpoint,
    train_loop,
)
from tl_skill.tuning.parallel import prompt_data_parallel
from tl_skill.tuning.prefix import use_prefix_cache
from tl_skill.tuning.prompt import SoftPrompt, Verbalizer, layout_for

log = logging.getLogger(__name__)

RUN_JSON = "run.json"
PROMPT_FILE = "prompt.safetensors"
TASK_FILE = "task.json"  # the examples of a task no name can rebuild (built in memory, or subsampled)


@dataclass
class TuneConfig(LoopConfig):
    """Prompt-tuning settings (the loop's, plus the prompt and the data). Defaults measured on SmolLM2-135M."""

    prompt_length: int = 16
    task_seed: int = 0  # train/dev/test split
    max_train_examples: int | None = None
    max_dev_examples: int | None = 300
    max_test_examples: int | None = 1000
    init_text: str | None = None

    def __post_init__(self):
        optional = lambda v: v is None or v >= 1
        self._check(
            TrainingError,
            "tuning",
            prompt_length=self.prompt_length >= 1,
            task_seed=self.task_seed >= 0,
            max_train_examples=optional(self.max_train_examples),
            max_dev_examples=optional(self.max_dev_examples),
            max_test_examples=optional(self.max_test_examples),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TuneConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _pick(task: Task, cfg: TuneConfig) -> Task:
    return subsample(
        task,
        {"train": cfg.max_train_examples, "dev": cfg.max_dev_examples, "test": cfg.max_test_examples},
        seed=cfg.task_seed,
    )


@dataclass(repr=False)
class Run:
    """A prompt-tuning run read back from its directory (or a prompt held in memory: `Run.in_memory`)."""

    path: Path
    info: dict[str, Any]
    prompt: SoftPrompt
    task: Task | None = field(default=None, repr=False)  # in memory: the task itself

    @classmethod
    def in_memory(
        cls,
        prompt: SoftPrompt,
        task: Task,
        model_name: str,
        config: TuneConfig | None = None,
        name: str = "in-memory prompt",
    ) -> Run:
        """A prompt that lives in memory, probed like a run: no directory, `task` as given.

        `config` supplies the layout (max input tokens, padding side) and the evaluation caps;
        default `TuneConfig()` with the prompt's length.
        """
        if not isinstance(prompt, SoftPrompt):
            raise RunError(f"expected a SoftPrompt, got {type(prompt).__name__}")
        if not isinstance(task, Task):
            raise RunError(f"an in-memory prompt needs the Task it is for, got {type(task).__name__}")
        cfg = config or TuneConfig(prompt_length=prompt.length)
        if cfg.prompt_length != prompt.length:
            raise RunError(f"the config's prompt length {cfg.prompt_length} is not the prompt's {prompt.length}")
        info = {
            "model": model_name,
            "task": task.name,
            "task_seed": task.spec.seed,
            "label_words": list(task.spec.label_words),
            "config": asdict(cfg),
            "metrics": {},
            "in_memory": True,
        }
        return cls(Path(f"<{name}>"), info, prompt, task)

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """Read a finished run directory, refusing (with the file's name) anything missing, corrupt, mistyped or
        unfinished. The path is kept absolute, so result files that name the run work from anywhere."""
        given = Path(path)
        path = given.expanduser().resolve()
        if path.is_file():
            raise RunError(f"{given} is a file, not a run directory")
        if not path.is_dir():
            raise RunError(
                f"run directory not found: {given}" + ("" if given.is_absolute() else f" (from {Path.cwd()})")
            )
        missing = [f for f in (RUN_JSON, PROMPT_FILE) if not (path / f).exists()]
        if missing:
            raise RunError(f"{path} is not a finished run: missing {', '.join(missing)}")
        where = path / RUN_JSON
        try:
            info = read_json(
                where, "run file", {"model": str, "task": str, "task_seed": int, "label_words": list, "config": dict}
            )
            check_str_list(info, "label_words", f"run file {where}")
            if "task_spec" in info:
                check_types(info, {"task_spec": dict}, f"run file {where}")
                check_types(
                    info["task_spec"], {"label_names": list, "label_words": list}, f"run file {where}: task_spec"
                )
        except FileFormatError as exc:
            raise RunError(str(exc)) from None
        try:
            config = TuneConfig.from_dict(info["config"])
        except (TypeError, ValueError) as exc:
            raise RunError(f"run file {where}: 'config' is not a valid tuning config ({exc})") from None
        status = info.get("status", "done")  # runs of tl_skill 0.1 record none
        if status != "done":
            raise RunError(
                f"{given} is not a finished run ({where} says status {status!r}: it was stopped while tuning or "
                "saving); rerun its `tl-skill tune` command to finish it"
            )
        prompt = SoftPrompt.load(path / PROMPT_FILE)
        if prompt.length != config.prompt_length:
            raise RunError(
                f"{path / PROMPT_FILE} holds {prompt.length} prompt vectors, but {where} says prompt_length "
                f"{config.prompt_length}: the files do not belong together"
            )
        width = (info.get("model_spec") or {}).get("d_model")
        if isinstance(width, int) and prompt.vectors.shape[1] != width:
            raise RunError(
                f"{path / PROMPT_FILE} holds a prompt of width {prompt.vectors.shape[1]}, but "
                f"{where} says the model's d_model is {width}"
            )
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
        if self.task is not None:
            return self.task
        if "task_file" in self.info:
            record = self.info["task_file"]
            if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
                raise RunError(f"{self.path / RUN_JSON}: 'task_file' must be {{'path': ..., 'sha256': ...}}")
            where = self.path / TASK_FILE
            if not where.is_file():
                raise RunError(
                    f"{self.path} was tuned on a task built in memory or cut down ({self.task_name!r}), whose "
                    f"examples it keeps in {TASK_FILE}; that file is missing"
                )
            try:
                task = load_examples(where, record["sha256"])
            except TaskError as exc:
                raise RunError(str(exc)) from None
            if task.name != self.task_name or list(task.label_words) != list(self.info["label_words"]):
                raise RunError(
                    f"{self.path / RUN_JSON} names task {self.task_name!r} with label words "
                    f"{self.info['label_words']}, but {where} holds {task.name!r} with {list(task.label_words)}: "
                    "the files do not belong together"
                )
            return task
        spec = self.info.get("task_spec") or {}
        words: Any = self.info["label_words"]
        if list(spec.get("label_words", [])) == list(words) and len(spec.get("label_names", [])) == len(words):
            words = dict(zip(spec["label_names"], words))  # the exact class order of the run
        if self.task_name.startswith(("csv:", "jsonl:")):
            digest = spec.get("digest")
            if not digest:
                raise RunError(
                    f"{self.path / RUN_JSON} names the data file {self.task_name.split(':', 1)[1]} "
                    "but records no sha256 of it, so a changed or substituted file could not be "
                    "told apart; tune the run again with this version of tl_skill"
                )
            log.info(
                "run %s reads its data from %s (named in its run.json)", self.path, self.task_name.split(":", 1)[1]
            )
            return load_task(self.task_name, seed=self.info["task_seed"], label_words=words, digest=digest)
        return load_task(self.task_name, seed=self.info["task_seed"], label_words=words)

    def verbalizer(self, model: HookedRootModule) -> Verbalizer:
        return Verbalizer(model.tokenizer, self.info["label_words"])

    @property
    def special_prefix(self) -> list[int] | None:
        """The special tokens every row of the run started with (None: a run that did not record them)."""
        ids = self.info.get("special_prefix")
        return [int(i) for i in ids] if isinstance(ids, list) else None

    def check_prefix(self, model: HookedRootModule, error: type[Exception] = RunError) -> None:
        """Refuse `model` when its rows would start with other special tokens than the run's did: the prompt
        would sit after other inputs than it was tuned on (e.g. a bridge booted with BOS turned on)."""
        want = self.special_prefix
        have = compat.model_prefix_ids(model)
        if want is not None and have != want:
            show = lambda ids: model.tokenizer.convert_ids_to_tokens(ids) if ids else "nothing"
            raise error(
                f"run {self.path} was tuned with rows starting with {show(want)}, but this model's rows start "
                f"with {show(have)}; call tl_skill.compat.set_special_prefix(model, {want}) first"
            )

    def to_dataframe(self) -> Any:
        """The training history: one row per step (`step`, `loss`, and `dev_accuracy` where evaluated)."""
        import pandas as pd

        return pd.DataFrame(self.info.get("history", []))

    def _facts(self) -> dict[str, Any]:
        m = self.metrics
        facts: dict[str, Any] = {"model": self.model_name, "task": self.task_name}
        facts["prompt"] = f"{self.prompt.length} x {self.prompt.vectors.shape[1]}"
        for key in ("dev_accuracy", "test_accuracy", "zero_shot_accuracy", "majority_accuracy"):
            if m.get(key) is not None:
                facts[key.replace("_accuracy", "")] = float(m[key])
        return facts

    def __repr__(self) -> str:
        return repr_line("Run", self._facts(), lead=str(self.path))

    def _repr_html_(self) -> str:
        out = html_facts(f"Prompt-tuning run {self.path}", self._facts())
        history = self.to_dataframe()
        if "dev_accuracy" in history:
            dev = history.dropna(subset=["dev_accuracy"])
            if len(dev):
                out += html_table(dev[["step", "loss", "dev_accuracy"]], max_rows=20, caption="dev evaluations")
        return out


def _legacy_identity(out: Path) -> dict[str, Any] | None:
    """The identity of a run directory written before experiment.json existed (its run.json)."""
    if not (out / RUN_JSON).exists():
        return None
    try:
        prev = read_json(out / RUN_JSON, "run file")
    except FileFormatError as exc:
        raise RunError(f"{exc}; use another --out or delete it") from None
    keys = ("model", "task", "task_seed", "label_words", "config", "task_digest", "task_examples")
    return {k: prev[k] for k in keys if k in prev}


def run_identity(model_name: str, task: Task, cfg: TuneConfig, init_prompt: SoftPrompt | None = None) -> dict:
    """Every setting that decides a tuning run (its directory's identity)."""
    identity = {
        "model": model_name,
        "task": task.spec.name,
        "task_seed": task.spec.seed,
        "label_words": list(task.spec.label_words),
        "config": asdict(cfg),
    }
    if task.spec.digest:  # a user data file: resuming on changed data would mix two tasks
        identity["task_digest"] = task.spec.digest
    if task.spec.examples:  # examples built in memory or cut down: the examples themselves decide
        identity["task_examples"] = task.spec.examples
    if init_prompt is not None:
        if init_prompt.length != cfg.prompt_length:
            raise RunError(
                f"init_prompt has length {init_prompt.length}, the config asks for prompt_length={cfg.prompt_length}"
            )
        identity["init_prompt"] = tensor_digest(init_prompt.vectors)
    return identity


def claim_run_dir(
    out: str | Path,
    model_name: str,
    task: Task,
    cfg: TuneConfig,
    init_prompt: SoftPrompt | None = None,
    write: bool = True,
) -> dict:
    """Accept `out` for this run (new, empty, or the same run) or refuse it (`files.claim_dir`); its identity."""
    identity = run_identity(model_name, task, cfg, init_prompt)
    try:
        claim_dir(out, "tune", identity, legacy=_legacy_identity, write=write)
    except OutputDirError as exc:
        raise RunError(str(exc)) from None
    return identity


@rolls_back_claims
def tune(
    model: HookedRootModule,
    task: Task,
    out: str | Path,
    config: TuneConfig | None = None,
    progress: bool = True,
    evaluate_test: bool = True,
    init_prompt: SoftPrompt | None = None,
    evaluate_dev: bool = True,
    prefix_cache: bool | None = None,
) -> Run:
    """Prompt-tune `model` (kept frozen) on `task`; results and checkpoints go to `out`.

    Any `HookedRootModule` works, also one whose parameters require grad (a
    freshly booted bridge): they are frozen while tuning and restored after.

    `init_prompt` (length `config.prompt_length`) replaces the random start,
    e.g. another task's prompt for prompt transfer (method §8).

    `evaluate_dev=False` skips the dev evaluations (no model selection): the
    saved prompt is the last step's and `dev_accuracy` is None. Short tunings
    whose only dev check would be at their last step (the transfer study's)
    get the same prompt for less work.

    For a causal LM each step computes the input positions once without grad and only the prompt
    positions with grad (`tuning.loop.train_loop`; the same loss and gradient, to float rounding);
    `prefix_cache=False` (or `tuning.prefix.use_prefix_cache(False)`) runs the full pass instead.

    Reruns with the same directory resume from the last checkpoint, or return
    the finished run at once; a directory holding anything else is refused
    before any work (`files.claim_dir`).
    """
    if prefix_cache is not None:  # for the steps and the dev and test evaluations alike
        with use_prefix_cache(prefix_cache):
            return tune(model, task, out, config, progress, evaluate_test, init_prompt, evaluate_dev)
    cfg = config or TuneConfig()
    out = Path(out)
    spec = model_spec(model)
    if not compat.mixture_of_experts(model):  # MoE blocks have no neuron basis, and tuning needs none
        require_neuron_basis(model, "prompt tuning", RunError)
    compat.say_fast_path(model)
    compat.say_training_mode(model)
    verbalizer = Verbalizer(model.tokenizer, task.spec.label_words)
    if verbalizer.multi_token_words:
        log.warning(
            "label word(s) %s are several tokens long for this tokenizer: each class is scored by its word's first "
            "token (run.json records the token counts); choose one-token words to score whole words",
            verbalizer.multi_token_words,
        )
    layout_for(model, cfg.prompt_length, cfg.max_input_tokens, cfg.padding_side).check_fits(
        compat.context_length(model)
    )  # before the directory is claimed: a refused run leaves nothing
    identity = claim_run_dir(out, spec.name, task, cfg, init_prompt)
    if (out / RUN_JSON).exists() and (out / PROMPT_FILE).exists():
        prev = read_json(out / RUN_JSON, "run file")
        if prev.get("status") == "done":
            log.info("run in %s is already finished; reusing it", out)
            return Run.load(out)

    data = _pick(task, cfg)
    device = compat.model_device(model)
    if init_prompt is not None:
        prompt = SoftPrompt(init_prompt.vectors.detach().cpu())
    elif cfg.init_text:
        prompt = SoftPrompt.from_text(model, cfg.init_text, cfg.prompt_length)
    else:
        prompt = SoftPrompt.from_vocab(model, cfg.prompt_length, seed=cfg.seed)
    prompt = prompt.to(device)
    # Under torchrun: rank 0 writes the files; the prompt's gradient is averaged over processes.
    ddp = prompt_data_parallel(model, verbalizer, prompt, cfg.batch_size)

    info = {
        **identity,
        "model_spec": spec.to_dict(),
        "task_spec": data.spec.to_dict(),
        "prompt_length": cfg.prompt_length,
        "verbalizer": verbalizer.to_dict(),
        "special_prefix": compat.model_prefix_ids(model),
        "status": "running",
        "torch": torch.__version__,
        "transformer_lens": compat.TL_VERSION,
    }
    if task.spec.examples:
        # No name rebuilds these examples: the run keeps them, so find, ablate, dashboards and
        # every CLI command see the very task it was tuned on.
        info["task_file"] = {"path": TASK_FILE, "sha256": task.spec.examples}
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if task.spec.examples:
            save_examples(task, out / TASK_FILE)
        atomic_json(out / RUN_JSON, info)
    try:
        state = train_loop(
            model,
            data,
            verbalizer,
            {"prompt": prompt.vectors},
            cfg,
            prompt=prompt,
            out=out,
            evaluate_dev=evaluate_dev,
            progress=progress,
            desc=f"tune {task.spec.name}",
            ddp=ddp,
        )
    except TrainingError as exc:
        raise RunError(str(exc)) from None
    if distributed.is_main():
        prompt.save(out / PROMPT_FILE)
    metrics = {
        "dev_accuracy": state["best_dev"] if evaluate_dev else None,
        "best_step": state["best_step"],
        "steps_run": state["step"],
        "stopped_early": state["stopped_early"],
        "majority_accuracy": majority_accuracy(data, "test", train=task),
    }
    timings = {
        "train_seconds": state["train_seconds"],
        "seconds_per_step": state["train_seconds"] / max(1, state["step"]),
    }
    if evaluate_test:
        t0 = time.perf_counter()
        metrics["test_accuracy"] = evaluate(
            model,
            data,
            "test",
            verbalizer,
            prompt,
            batch_size=cfg.eval_batch_size,
            max_input_tokens=cfg.max_input_tokens,
            padding_side=cfg.padding_side,
            progress=progress,
            desc="test (prompted)",
        )["accuracy"]
        metrics["zero_shot_accuracy"] = evaluate(
            model,
            data,
            "test",
            verbalizer,
            None,
            batch_size=cfg.eval_batch_size,
            max_input_tokens=cfg.max_input_tokens,
            padding_side=cfg.padding_side,
            progress=progress,
            desc="test (zero-shot)",
        )["accuracy"]
        timings["test_eval_seconds"] = time.perf_counter() - t0
    info.update(status="done", metrics=metrics, timings=timings, history=state["history"])
    if compat.model_notices(model):  # what differs from a model of load_model, as logged
        info["notices"] = compat.model_notices(model)
    if distributed.is_main():
        atomic_json(out / RUN_JSON, info)
    remove_checkpoint(out)
    distributed.barrier()  # the others read the run back once rank 0 has written it
    log.info(
        "tuned %s on %s: dev %s test %s",
        spec.name,
        task.spec.name,
        metrics["dev_accuracy"],
        metrics.get("test_accuracy"),
    )
    return Run.load(out)


def tune_trials(
    model: HookedRootModule,
    task: Task,
    out: str | Path,
    seeds: Sequence[int],
    config: TuneConfig | None = None,
    progress: bool = True,
) -> list[Run]:
    """Several prompts (trials) per task, one subdirectory `seed{S}` each."""
    cfg = config or TuneConfig()
    runs = []
    for s in seeds:
        runs.append(
            tune(
                model, task, Path(out) / f"seed{s}", TuneConfig.from_dict({**asdict(cfg), "seed": s}), progress=progress
            )
        )
    return runs
