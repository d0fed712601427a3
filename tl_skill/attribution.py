"""Attribution of the prompted model's decision to every unit, in one backward pass per batch (method, "Beyond
the paper").

For each example the margin is m = logit(true class's word) - max over other classes of logit(word), at
the prediction position. For each unit i at each position t, the first-order effect of setting it to its
baseline b_i (the train-split mean predictivity uses, averaged over prompt positions and runs: the value
mean-ablation writes) is

    attr(i, t) = (b_i - a_i(t)) * dm / da_i(t)

(attribution patching, "AtP"). The gradient is taken through the frozen model: the embedding output is
made a leaf that requires grad, so every later activation carries a gradient, and each unit hook registers
a tensor hook that reduces `(b - a) * grad` as soon as the gradient arrives. Per unit it keeps, by class,
exact sums (the recorders' fixed-point split, `record.exact_parts`) of the total over real positions, of
its absolute value, and of each prompt position's term, plus the margin; nothing per example survives the
batch. Sums are exact, so results do not depend on batch order or on how examples are spread over
processes; like activations, the per-example terms move by float rounding when an example is padded to
another length.

`attribute` returns an `Attribution`; `experiments.causal` verifies it by real patching and adds the
direct effect, steering and the comparison with predictivity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from tl_skill import compat, distributed
from tl_skill.compat import HookedRootModule
from tl_skill.data.tasks import Task, subsample
from tl_skill.display import html_bars, html_facts, html_table, repr_line
from tl_skill.errors import AttributionError
from tl_skill.neurons import SkillNeurons, check_neurons_for_run
from tl_skill.record import exact_parts, exact_total
from tl_skill.tuning.prompt import Batch, Verbalizer, class_logits, iterate_batches, layout_for
from tl_skill.tuning.runs import Run
from tl_skill.units import UnitSource, check_source, unit_source

SPLITS = ("train", "dev", "test")


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """m = logit of the true class minus the largest logit of another class, per example [B]."""
    true = logits.gather(1, labels[:, None].to(logits.device))[:, 0]
    others = logits.clone()
    others.scatter_(1, labels[:, None].to(logits.device), float("-inf"))
    return true - others.amax(1)


class AttributionStats:
    """Per-class exact sums of per-example attributions: total over positions, its absolute value, each prompt
    position's term [C, L, (P,) D]; counts and margin sums per class."""

    sum_keys = ("count", "t1", "t2", "trest", "a1", "a2", "arest", "p1", "p2", "prest", "m1", "m2", "mrest")

    def __init__(self, n_classes: int, n_layers: int, n_pos: int, width: int, device: Any = "cpu"):
        shape, pshape = (n_classes, n_layers, width), (n_classes, n_layers, n_pos, width)
        self.count = torch.zeros(n_classes, dtype=torch.long, device=device)
        for prefix, shp in (("t", shape), ("a", shape), ("p", pshape), ("m", (n_classes,))):
            setattr(self, f"{prefix}1", torch.zeros(shp, dtype=torch.long, device=device))
            setattr(self, f"{prefix}2", torch.zeros(shp, dtype=torch.long, device=device))
            setattr(self, f"{prefix}rest", torch.zeros(shp, dtype=torch.float64, device=device))

    def _add(self, prefix: str, index: tuple, labels: torch.Tensor, x: torch.Tensor) -> None:
        for part, value in zip(("1", "2", "rest"), exact_parts(x)):
            getattr(self, prefix + part)[index].index_add_(0, labels, value.to(getattr(self, prefix + part).device))

    def update(self, layer: int, total: torch.Tensor, prompt: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(self.count.device)
        self._add("t", (slice(None), layer), labels, total)
        self._add("a", (slice(None), layer), labels, total.abs())
        self._add("p", (slice(None), layer), labels, prompt)

    def count_batch(self, labels: torch.Tensor, margin: torch.Tensor) -> None:
        labels = labels.to(self.count.device)
        self.count += torch.bincount(labels, minlength=self.count.shape[0])
        self._add("m", (slice(None),), labels, margin)

    def all_reduce(self) -> None:
        for key in self.sum_keys:
            setattr(self, key, distributed.all_reduce_sum(getattr(self, key)))

    def total(self, prefix: str) -> torch.Tensor:
        return exact_total(getattr(self, prefix + "1"), getattr(self, prefix + "2"), getattr(self, prefix + "rest"))


@dataclasses.dataclass(repr=False)
class Attribution:
    """Attribution of the margin to every unit (module docstring): means over the examples, by class.

    Tensors are indexed by row: row r is model layer `layers[r]` (use `at(layer, unit)` by name).
    """

    model: str
    task: str
    run: str
    split: str
    units: str
    layers: list[int]
    label_names: list[str]
    counts: list[int]
    by_class: torch.Tensor  # [C, L, D] mean total attribution over the class's examples
    abs_by_class: torch.Tensor  # [C, L, D] mean |total attribution|
    prompt_by_class: torch.Tensor  # [C, L, P, D] mean attribution at each prompt position
    margin_by_class: torch.Tensor  # [C] mean margin
    baseline: torch.Tensor  # [L, D] the baseline each unit is moved to

    @property
    def n(self) -> int:
        return int(sum(self.counts))

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.tensor(self.counts, dtype=torch.float64).reshape(-1, *([1] * (x.dim() - 1)))
        return (x * w).sum(0) / max(1, self.n)

    @property
    def mean(self) -> torch.Tensor:
        """[L, D]: mean over all examples of a unit's total attribution (its first-order mean-ablation effect on m)."""
        return self._pooled(self.by_class)

    @property
    def mean_abs(self) -> torch.Tensor:
        """[L, D]: mean over all examples of the absolute total attribution."""
        return self._pooled(self.abs_by_class)

    @property
    def per_prompt_position(self) -> torch.Tensor:
        """[L, P, D]: mean attribution at each prompt position."""
        return self._pooled(self.prompt_by_class)

    @property
    def margin(self) -> float:
        return float(self._pooled(self.margin_by_class))

    def row_of(self, layer: int) -> int:
        if layer not in self.layers:
            raise AttributionError(f"layer {layer} has no attribution; it covers layers {self.layers}")
        return self.layers.index(layer)

    def at(self, layer: int, unit: int) -> float:
        """Mean total attribution of unit `unit` of model layer `layer`."""
        return float(self.mean[self.row_of(layer), unit])

    def top(self, k: int = 20, by: str = "abs") -> list[tuple[int, int]]:
        """The k units (layer, unit) with the largest |mean attribution| (`by="abs"`) or mean |attribution|."""
        score = self.mean.abs() if by == "abs" else self.mean_abs
        order = torch.argsort(score.reshape(-1), descending=True, stable=True)[:k]
        D = score.shape[1]
        return [(self.layers[int(i) // D], int(i) % D) for i in order]

    def to_dataframe(self) -> Any:
        """One row per unit, largest |attribution| first: `layer`, `unit`, `attribution` (mean), `abs_attribution`
        (mean of the absolute value), then `attribution[<class>]` per class."""
        import numpy as np
        import pandas as pd

        L, D = self.mean.shape
        frame = pd.DataFrame(
            {
                "layer": np.repeat(np.asarray(self.layers), D),
                "unit": np.tile(np.arange(D), L),
                "attribution": self.mean.reshape(-1).numpy(),
                "abs_attribution": self.mean_abs.reshape(-1).numpy(),
            }
        )
        for c, name in enumerate(self.label_names):
            frame[f"attribution[{name}]"] = self.by_class[c].reshape(-1).numpy()
        order = np.argsort(-np.abs(frame["attribution"].to_numpy()), kind="stable")
        return frame.iloc[order].reset_index(drop=True)

    def __repr__(self) -> str:
        (l, i), *_ = self.top(1)
        facts = {"model": self.model, "task": self.task, "split": self.split, "examples": self.n}
        facts["top"] = f"L{l} U{i}: {self.at(l, i):+.4f}"
        return repr_line("Attribution", facts)

    def _repr_html_(self) -> str:
        facts = {"task": self.task, "split": self.split, "examples": self.n, "mean margin": self.margin}
        best = self.mean.abs().amax(1).tolist()
        top = max(best) if best else 1.0
        return (
            html_facts(f"Attribution of the margin: {self.model}", facts)
            + html_bars([f"L{l}" for l in self.layers], best, "largest |attribution| per layer", 0.0, top or 1.0)
            + html_table(self.to_dataframe().head(10), caption="largest |attribution|")
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "by_class": self.by_class,
            "abs_by_class": self.abs_by_class,
            "prompt_by_class": self.prompt_by_class,
            "margin_by_class": self.margin_by_class,
            "baseline": self.baseline,
        }


def unit_baselines(neurons: SkillNeurons) -> torch.Tensor:
    """[rows, D] the value mean-ablation writes: the baseline averaged over runs and prompt positions."""
    return neurons.baseline.double().mean(dim=(0, 2))


def examples_of(run: Run, split: str, max_examples: int | None, task: Task | None = None) -> Task:
    """The run's task cut to at most `max_examples` of `split` (default: the run's own cap for that split)."""
    if split not in SPLITS:
        raise AttributionError(f"split must be one of {SPLITS}, got {split!r}")
    cfg = run.config
    cap = {"train": cfg.max_train_examples, "dev": cfg.max_dev_examples, "test": cfg.max_test_examples}[split]
    caps = [c for c in (cap, max_examples) if c is not None]
    full = task if task is not None else run.load_task()
    return subsample(full, {split: min(caps) if caps else None}, seed=cfg.task_seed)


def attribute(
    model: HookedRootModule,
    run: Run,
    neurons: SkillNeurons,
    split: str = "test",
    max_examples: int | None = None,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    task: Task | None = None,
    progress: bool = True,
) -> Attribution:
    """Attribution of the margin to every unit of `neurons`' source (module docstring), on `split` of the run's task.

    Args:
        run: the prompt whose decision is attributed (its task, label words and layout).
        neurons: skill neurons of the same run's model and task: their baselines and unit source.
        split: the examples (`train`, `dev`, `test`); `max_examples` caps them (default the run's cap).
        layers: model layers to attribute (default all layers of `neurons`).
        task: the run's task when already loaded.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AttributionError(f"batch_size must be >= 1, got {batch_size!r}")
    check_neurons_for_run(run, neurons, None, AttributionError)
    run.check_prefix(model, AttributionError)
    source: UnitSource = unit_source(model, neurons.units)
    check_source(model, source, AttributionError)
    chosen = list(neurons.layers) if layers is None else sorted({int(l) for l in layers})
    missing = [l for l in chosen if l not in neurons.layers]
    if missing or not chosen:
        raise AttributionError(f"layers {missing or chosen} have no baselines: the neurons cover {neurons.layers}")
    data = examples_of(run, split, max_examples, task)
    base = unit_baselines(neurons)
    rows = {l: neurons.layers.index(l) for l in chosen}
    cfg = run.config
    layout = layout_for(model, run.prompt.length, cfg.max_input_tokens, cfg.padding_side)
    verbalizer = Verbalizer(model.tokenizer, run.info["label_words"])
    device = compat.model_device(model)
    prompt = run.prompt.to(device)
    n_classes = len(run.info["label_words"])
    stats = AttributionStats(n_classes, len(chosen), run.prompt.length, source.width)
    total = len(data[split])
    bar = tqdm(total=total, desc=f"attribute {data.name} ({split})", disable=not progress, unit="ex")
    for _, batch in iterate_batches(layout, data, split, batch_size, shard=True):
        _attribute_batch(model, batch.to(device), verbalizer, prompt, source, chosen, rows, base, stats)
        bar.update(batch.input_ids.shape[0])
    bar.close()
    distributed.reduce_stats(stats)  # exact sums: the same result for any number of processes
    counts = stats.count.clamp_min(1).double()
    return Attribution(
        model=neurons.model,
        task=neurons.task,
        run=str(run.path),
        split=split,
        units=neurons.units,
        layers=chosen,
        label_names=list(neurons.label_names),
        counts=stats.count.tolist(),
        by_class=stats.total("t") / counts[:, None, None],
        abs_by_class=stats.total("a") / counts[:, None, None],
        prompt_by_class=stats.total("p") / counts[:, None, None, None],
        margin_by_class=stats.total("m") / counts,
        baseline=torch.stack([base[rows[l]] for l in chosen]),
    )


def _attribute_batch(
    model: HookedRootModule,
    batch: Batch,
    verbalizer: Verbalizer,
    prompt,
    source: UnitSource,
    layers: list[int],
    rows: dict[int, int],
    base: torch.Tensor,
    stats: AttributionStats,
) -> None:
    assert batch.labels is not None
    labels = batch.labels
    real = batch.attention_mask.bool()
    prompt_pos = batch.prompt_positions().to(real.device)
    b_rows = torch.arange(real.shape[0], device=real.device)
    errors: list[BaseException] = []

    def reduce(slot: int, layer: int, act: torch.Tensor, grad: torch.Tensor) -> None:
        try:
            a = source.flat(act).double()
            g = source.flat(grad).double()
            b = base[rows[layer]].to(a.device)
            term = (b - a) * g * real[..., None].to(a.device)  # [B, T, D], pads contribute nothing
            stats.update(slot, term.sum(1), term[b_rows[:, None], prompt_pos], labels)
        except BaseException as exc:  # a tensor hook's error would be swallowed by autograd's message
            errors.append(exc)

    leaves: list[torch.Tensor] = []

    def leaf(x: torch.Tensor, hook: Any) -> torch.Tensor:
        leaves.append(x.detach().requires_grad_(True))
        return leaves[-1]

    def listener(slot: int, layer: int):
        def fn(act: torch.Tensor, hook: Any) -> torch.Tensor:
            if act.requires_grad:
                kept = act.detach()
                act.register_hook(lambda g: reduce(slot, layer, kept, g))
            return act

        return fn

    hooks = [(compat.embed_hook(model), leaf)]
    hooks += [(source.hook(l), listener(slot, l)) for slot, l in enumerate(layers)]
    with torch.enable_grad():
        logits = class_logits(model, batch, verbalizer, prompt, hooks)
        m = margins(logits.float(), batch.labels)
        # autograd.grad, not backward: no parameter's .grad is touched (a user's model may require grad)
        torch.autograd.grad(m.sum(), leaves)
    if errors:
        raise errors[0]
    stats.count_batch(labels, m.detach().double())
