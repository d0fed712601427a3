"""Hook-point recorders that reduce neuron activations to statistics inside the hook (method §2).

Nothing per example is kept: a split of any size costs
O(n_layers x positions x d_mlp) memory. Sums are exact (integer fixed point
plus a float64 remainder), so baselines and counts do not depend on batch
order or on how the data is sharded over processes (the standard deviation,
from plain float64 sums of squares, agrees to rounding). Note that the model
itself can shift an activation by ~1e-7 when an example is padded differently,
so batches of mixed lengths agree to that tolerance, not bit for bit.

Two passes make predictivity (method §3):
1. `MomentStats` on train: per-class exact sums (-> baselines), sums of
   squares (-> std), min and max (-> constant neurons);
2. `ThresholdStats` on dev: per class, how many examples are above each
   baseline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float

from tl_skill import compat
from tl_skill.compat import HookedRootModule
from tl_skill.errors import RecordingError
from tl_skill.models import model_spec
from tl_skill.tuning.prompt import Batch, SoftPrompt, maybe_applied
from tl_skill.units import BUILTIN, UnitSource, check_source, unit_source

POSITION_MODES = ("prompt", "last", "mean")
_S1 = 2.0**24
_S2 = 2.0**48
_MAX_ABS = 2.0**28  # beyond this the fixed-point split would lose exactness


def exact_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split float values into (int64 multiples of 2^-24, int64 multiples of 2^-48, float64 rest).

    Each step is exact in float64, so summing the parts separately (integers
    are associative) gives a total independent of summation order.
    """
    x64 = x.double()
    q1 = torch.round(x64 * _S1)
    rem = x64 - q1 / _S1
    q2 = torch.round(rem * _S2)
    rest = rem - q2 / _S2
    return q1.long(), q2.long(), rest


def exact_total(s1: torch.Tensor, s2: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """float64 value of s1 * 2^-24 + s2 * 2^-48 + rest (one rounding at the end, in practice)."""
    return s1.double() / _S1 + (s2.double() / _S2 + rest)


def _positions(batch: Batch, mode: str, act: torch.Tensor) -> Float[torch.Tensor, "batch t d_mlp"]:
    B = act.shape[0]
    rows = torch.arange(B, device=act.device)
    if mode in ("last", "mean") and (batch.input_start is None or batch.input_end is None):
        raise RecordingError(f"position mode {mode!r} needs a batch that marks its input tokens (Layout.collate)")
    if mode == "prompt":
        if batch.prompt_length == 0:
            raise RecordingError("position mode 'prompt' needs a soft prompt (prompt length 0)")
        if batch.uniform_prompt:
            s = int(batch.prompt_start[0])
            return act[:, s : s + batch.prompt_length]
        return act[rows[:, None], batch.prompt_positions().to(act.device)]
    start, end = batch.input_start, batch.input_end
    if mode == "last" and end is not None:
        return act[rows, (end - 1).to(act.device)][:, None]
    if mode == "mean" and start is not None and end is not None:
        pos = torch.arange(act.shape[1], device=act.device)
        inside = (pos[None] >= start[:, None].to(act.device)) & (pos[None] < end[:, None].to(act.device))
        w = inside.to(act.dtype)[..., None]
        return ((act * w).sum(1) / w.sum(1).clamp_min(1))[:, None]
    raise RecordingError(f"unknown position mode {mode!r}; choose one of {POSITION_MODES}")


class _Stats:
    """Sufficient statistics with `update` per layer and an `all_reduce` for torch.distributed."""

    sum_keys: tuple[str, ...] = ()
    min_keys: tuple[str, ...] = ()
    max_keys: tuple[str, ...] = ()

    def all_reduce(self, group=None) -> None:
        import torch.distributed as dist

        for k in self.sum_keys:
            dist.all_reduce(getattr(self, k), op=dist.ReduceOp.SUM, group=group)
        for k in self.min_keys:
            dist.all_reduce(getattr(self, k), op=dist.ReduceOp.MIN, group=group)
        for k in self.max_keys:
            dist.all_reduce(getattr(self, k), op=dist.ReduceOp.MAX, group=group)


class MomentStats(_Stats):
    """Per-class exact sums, sums of squares, min and max of activations [L, T, D]."""

    sum_keys = ("count", "s1", "s2", "rest", "sumsq")
    min_keys = ("min",)
    max_keys = ("max",)

    def __init__(self, n_classes: int, n_layers: int, n_pos: int, d_mlp: int, device="cpu"):
        shape = (n_classes, n_layers, n_pos, d_mlp)
        self.count = torch.zeros(n_classes, dtype=torch.long, device=device)
        self.s1 = torch.zeros(shape, dtype=torch.long, device=device)
        self.s2 = torch.zeros(shape, dtype=torch.long, device=device)
        self.rest = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(shape[1:], dtype=torch.float64, device=device)
        self.min = torch.full(shape[1:], float("inf"), dtype=torch.float64, device=device)
        self.max = torch.full(shape[1:], float("-inf"), dtype=torch.float64, device=device)

    def count_batch(self, labels: torch.Tensor) -> None:
        self.count += torch.bincount(labels.to(self.count.device), minlength=self.count.shape[0])

    def update(self, layer: int, x: torch.Tensor, labels: torch.Tensor) -> None:
        q1, q2, rest = exact_parts(x)
        lab = labels.to(x.device)
        self.s1[:, layer].index_add_(0, lab, q1)
        self.s2[:, layer].index_add_(0, lab, q2)
        self.rest[:, layer].index_add_(0, lab, rest)
        x64 = x.double()
        self.sumsq[layer] += (x64 * x64).sum(0)
        self.min[layer] = torch.minimum(self.min[layer], x64.amin(0))
        self.max[layer] = torch.maximum(self.max[layer], x64.amax(0))

    def class_sums(self) -> Float[torch.Tensor, "k l t d"]:
        return exact_total(self.s1, self.s2, self.rest)

    def mean(self, classes: Sequence[int] | None = None) -> Float[torch.Tensor, "l t d"]:
        """Mean over the examples of `classes` (default: all), from the exact sums."""
        idx = list(range(self.count.shape[0])) if classes is None else list(classes)
        n = int(self.count[idx].sum())
        if n == 0:
            raise RecordingError(f"no examples of classes {idx} were recorded")
        total = exact_total(self.s1[idx].sum(0), self.s2[idx].sum(0), self.rest[idx].sum(0))
        return total / n

    def std(self) -> Float[torch.Tensor, "l t d"]:
        n = int(self.count.sum())
        mean = self.mean()
        var = (self.sumsq / n - mean * mean).clamp_min(0)
        return var.sqrt()

    def constant(self) -> torch.Tensor:
        return self.min == self.max


class ThresholdStats(_Stats):
    """Per class, the number of examples whose activation is strictly above each threshold."""

    sum_keys = ("count", "above")
    min_keys = ("min",)
    max_keys = ("max",)

    def __init__(self, thresholds: Float[torch.Tensor, "b l t d"], n_classes: int):
        self.thresholds = thresholds.double()
        nb, L, T, D = self.thresholds.shape
        dev = self.thresholds.device
        self.count = torch.zeros(n_classes, dtype=torch.long, device=dev)
        self.above = torch.zeros((nb, n_classes, L, T, D), dtype=torch.long, device=dev)
        self.min = torch.full((L, T, D), float("inf"), dtype=torch.float64, device=dev)
        self.max = torch.full((L, T, D), float("-inf"), dtype=torch.float64, device=dev)

    def count_batch(self, labels: torch.Tensor) -> None:
        self.count += torch.bincount(labels.to(self.count.device), minlength=self.count.shape[0])

    def update(self, layer: int, x: torch.Tensor, labels: torch.Tensor) -> None:
        x64 = x.double()
        lab = labels.to(x.device)
        for b in range(self.thresholds.shape[0]):
            hit = (x64 > self.thresholds[b, layer]).long()
            self.above[b, :, layer].index_add_(0, lab, hit)
        self.min[layer] = torch.minimum(self.min[layer], x64.amin(0))
        self.max[layer] = torch.maximum(self.max[layer], x64.amax(0))


class LabelSets(_Stats):
    """Several statistics objects fed from one pass, each with its own column of labels.

    A batch whose labels are [batch, n] (e.g. true and shuffled labels) gives
    column j to `stats[j]`: the shuffled-label control costs no extra forward pass.
    """

    def __init__(self, stats: Sequence):
        self.stats = list(stats)

    def count_batch(self, labels: torch.Tensor) -> None:
        for j, s in enumerate(self.stats):
            s.count_batch(labels[:, j])

    def update(self, layer: int, x: torch.Tensor, labels: torch.Tensor) -> None:
        for j, s in enumerate(self.stats):
            s.update(layer, x, labels[:, j])

    def all_reduce(self, group=None) -> None:
        for s in self.stats:
            s.all_reduce(group)


class Recorder:
    """Hooks on `blocks.{l}.mlp.hook_post` (or another unit source's hooks, `units=`; see `tl_skill.units`)
    that feed a statistics object, batch by batch.

    Usable as a context manager over any `HookedRootModule`:

        rec = Recorder(model, stats, layers=None, positions="prompt")
        with rec.attached():
            for batch in batches:
                rec.run(batch, prompt)

    Hooks are keyed by the names registered here (inside a hook `hook.name`
    is the canonical name, not the alias). With `stop_early`, the forward
    pass ends after the last recorded layer.
    """

    def __init__(
        self,
        model: HookedRootModule,
        stats,
        layers: Sequence[int] | None = None,
        positions: str = "prompt",
        stop_early: bool = True,
        check_finite: bool = True,
        units: str | UnitSource | None = None,
    ):
        spec = model_spec(model)
        if not isinstance(units, UnitSource):  # a source resolved by the caller was checked there
            units = unit_source(model, units)
            check_source(model, units, RecordingError)
        self.units = units
        self.model = model
        self.layers = list(self.units.layers) if layers is None else sorted({int(l) for l in layers})
        bad = [l for l in self.layers if l not in self.units.layers]
        if bad or not self.layers:
            where = (
                f"the model has {spec.n_layers} layers"
                if self.units.name in BUILTIN
                else f"units {self.units.name!r} exist at layers {list(self.units.layers)}"
            )
            raise RecordingError(f"layers {bad or self.layers} out of range: {where}")
        if positions not in POSITION_MODES:
            raise RecordingError(f"unknown position mode {positions!r}; choose one of {POSITION_MODES}")
        self.stats = stats
        self.width = self.units.width
        self.positions = positions
        self.stop_early = stop_early
        self.check_finite = check_finite
        self._batch: Batch | None = None
        self.names = {self.units.hook(l): i for i, l in enumerate(self.layers)}
        missing = [n for n in self.names if n not in model.hook_dict]
        if missing:
            raise RecordingError(f"the model has no hook point {missing[0]!r}")

    def _hook_for(self, name: str) -> Callable:
        slot = self.names[name]
        last = slot == len(self.layers) - 1

        def hook(act, hook):
            if self.units.name == "mlp":
                compat.check_hook_width(act, self.width, name, RecordingError)
            else:
                self.units.check(act, name, RecordingError)
            batch = self._batch
            if batch is None:
                raise RecordingError(
                    "a Recorder needs the batch it records (its labels and prompt positions): inside "
                    "`with rec.attached():` call `rec.run(batch, prompt)` rather than the model itself"
                )
            x = self.units.encode(_positions(batch, self.positions, self.units.flat(act.detach())))
            if self.check_finite:
                if not torch.isfinite(x).all():
                    raise RecordingError(f"non-finite activation (NaN or inf) at {name}")
                if x.abs().max() >= _MAX_ABS:
                    raise RecordingError(f"activation magnitude >= 2^28 at {name}; cannot sum exactly")
            self.stats.update(slot, x, batch.labels)
            if last and self.stop_early:
                raise compat.StopForward

        return hook

    def fwd_hooks(self) -> list[tuple[str | Callable, Callable]]:
        return [(name, self._hook_for(name)) for name in self.names]

    @contextlib.contextmanager
    def attached(self) -> Iterator[Recorder]:
        with self.model.hooks(fwd_hooks=self.fwd_hooks()):
            yield self

    def run(self, batch: Batch, prompt: SoftPrompt | None = None, extra_hooks: Sequence = ()) -> None:
        """One forward pass over `batch` (hooks must be attached)."""
        if batch.labels is None:
            raise RecordingError("recording needs labelled batches")
        self._batch = batch
        self.stats.count_batch(batch.labels)
        try:
            with (
                maybe_applied(prompt, self.model, batch),
                self.model.hooks(fwd_hooks=list(extra_hooks)),
                torch.no_grad(),
            ):
                compat.forward(self.model, batch.input_ids, batch.attention_mask)
        except compat.StopForward:
            pass
        finally:
            self._batch = None

    def run_prompt_pass(self, chunk: Batch, prompt: SoftPrompt, cache, prompt_pass: Callable) -> None:
        """Record the prompt positions of a batch whose input is in `cache` (`find.record_runs`).

        `chunk` is the prompt part of the batch (`tuning.prefix.split_batch`): its P positions are all
        prompt positions, so the "prompt" position mode reads them all; the hooks are attached
        for this pass only (the input pass ran without them).
        """
        if chunk.labels is None:
            raise RecordingError("recording needs labelled batches")
        if self.positions != "prompt":
            raise RecordingError(f"a cached prompt pass records prompt positions only, not {self.positions!r}")
        self._batch = chunk
        self.stats.count_batch(chunk.labels)
        try:
            with self.attached():
                prompt_pass(self.model, chunk, cache, prompt)
        finally:
            self._batch = None


def n_positions(mode: str, prompt_length: int) -> int:
    return prompt_length if mode == "prompt" else 1


@dataclass
class TraceStats:
    """Activations of a few chosen neurons for every example (for histograms; O(N x few))."""

    neurons: list[tuple[int, int]]  # (layer, neuron)
    values: list[torch.Tensor]
    labels: list[torch.Tensor]

    def __init__(self, neurons: Sequence[tuple[int, int]], layers: Sequence[int]):
        self.neurons = [(int(l), int(i)) for l, i in neurons]
        self.slot_of = {l: s for s, l in enumerate(layers)}
        self.values, self.labels = [], []
        self._pending: dict[int, torch.Tensor] = {}

    def count_batch(self, labels: torch.Tensor) -> None:
        self.labels.append(labels.cpu())

    def update(self, slot: int, x: torch.Tensor, labels: torch.Tensor) -> None:
        # x: [B, T, D]; keep each chosen neuron's values at every recorded position.
        for j, (l, i) in enumerate(self.neurons):
            if self.slot_of.get(l) == slot:
                self._pending[j] = x[:, :, i].double().cpu()
        if len(self._pending) == len(self.neurons):
            self.values.append(torch.stack([self._pending[j] for j in range(len(self.neurons))], 1))
            self._pending = {}

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [N, n_neurons, T], labels [N])."""
        return torch.cat(self.values), torch.cat(self.labels)
