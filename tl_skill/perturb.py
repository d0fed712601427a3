"""Perturbing neurons: the hooks behind the ablation experiment (method §6).

A `Perturbation` is a set of forward hooks on `blocks.{l}.mlp.hook_post` that
changes chosen neurons at every sequence position (prompt and input; padding
too, which no real position attends to):

- `noise`: add Gaussian noise, std 0.1 by default (or `std` times each
  neuron's own std with `relative=True`), one draw per example and neuron,
  the same draw at every position;
- `zero`: set to 0;
- `mean`: set to the neuron's baseline (train mean, averaged over prompt
  positions and runs);
- a function `fn(x, layer, neurons) -> x'` of the chosen activations
  `x` [batch, pos, k] of one layer, `neurons` their indices [k].

Noise draws. Example `j` is the j-th example (batch row) the model processes
since the perturbation was made (or `reset`). Its noise is a fixed function of
`(seed, j)`: a standard normal [n_layers, d_mlp] from
`numpy.random.default_rng([seed, j])`, of which each chosen neuron takes its
entry. So the draws do not depend on batch size or on which other neurons are
chosen. `evaluate` visits a split in one fixed order (sorted by length,
whatever the batch size) and resets the numbering at every batch to the
batch's global position in that order, so `j` is the example's global number
under `torchrun` too: accuracies are the same for any number of processes.

    with perturbed(model, mask, mode="noise", std=0.1, seed=0):
        logits = model(tokens)

or pass `Perturbation(...).fwd_hooks()` as `extra_hooks` to `evaluate`; the experiment
runner (`tl_skill.experiments`) builds them from a condition's definition.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from tl_skill import compat
from tl_skill.compat import HookedRootModule
from tl_skill.errors import PerturbationError
from tl_skill.models import model_spec
from tl_skill.neurons import SkillNeurons
from tl_skill.tuning.prompt import NumberedHook
from tl_skill.units import UnitSource, check_source, unit_source

log = logging.getLogger(__name__)

MODES = ("noise", "zero", "mean")

PerturbFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- neuron sets
def neuron_index(neurons, n_layers: int, d_mlp: int, rows: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """Chosen neurons as {real layer: sorted neuron indices (int64)}, empty layers left out.

    Args:
        neurons: a boolean mask [rows, d_mlp] (as `SkillNeurons.select` gives), or an
            iterable of `(layer, neuron)` pairs with real layer indices.
        rows: the real layer of each mask row (`SkillNeurons.layers`); default: row l is
            layer l, and the mask must then have one row per layer of the model.
    """
    if isinstance(neurons, (torch.Tensor, np.ndarray)):
        mask = torch.as_tensor(neurons)
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
                raise PerturbationError(f"a neuron mask must be boolean (or 0/1), got dtype {mask.dtype}")
            mask = mask.bool()
        hint = (
            ""
            if rows is not None
            else ("; a mask from SkillNeurons.select has one row per SkillNeurons.layers: pass skill=<SkillNeurons>")
        )
        rows = list(range(n_layers)) if rows is None else [int(r) for r in rows]
        if mask.ndim != 2 or mask.shape != (len(rows), d_mlp):
            raise PerturbationError(f"neuron mask has shape {tuple(mask.shape)}, expected ({len(rows)}, {d_mlp}){hint}")
        bad = [r for r in rows if not 0 <= r < n_layers]
        if bad:
            raise PerturbationError(f"mask rows map to layers {bad}, out of range: the model has {n_layers} layers")
        mask = mask.cpu()
        out: dict[int, torch.Tensor] = {}
        for r, layer in enumerate(rows):
            idx = torch.nonzero(mask[r]).flatten()
            if len(idx):
                out[layer] = torch.unique(torch.cat([out[layer], idx])) if layer in out else idx
        return out
    try:
        pairs = [(int(l), int(i)) for l, i in neurons]
    except (TypeError, ValueError) as exc:
        raise PerturbationError(
            "neurons must be a boolean mask [layers, d_mlp] or a list of (layer, neuron) "
            f"pairs, got {type(neurons).__name__}"
        ) from exc
    bad_pairs = [(l, i) for l, i in pairs if not (0 <= l < n_layers and 0 <= i < d_mlp)]
    if bad_pairs:
        raise PerturbationError(
            f"neurons {bad_pairs[:5]} out of range: the model has {n_layers} layers of {d_mlp} neurons"
        )
    by_layer: dict[int, set[int]] = {}
    for l, i in pairs:
        by_layer.setdefault(l, set()).add(i)
    return {l: torch.tensor(sorted(s), dtype=torch.long) for l, s in sorted(by_layer.items())}


def index_to_mask(index: dict[int, torch.Tensor], n_layers: int, d_mlp: int) -> torch.Tensor:
    """Boolean mask [n_layers, d_mlp] of a `neuron_index`."""
    mask = torch.zeros(n_layers, d_mlp, dtype=torch.bool)
    for l, idx in index.items():
        mask[l, idx] = True
    return mask


def _per_layer(values: torch.Tensor, n_layers: int, d_mlp: int, what: str) -> dict[int, torch.Tensor]:
    """{real layer: [d_mlp] values} from a tensor [n_layers, d_mlp] indexed by real layer."""
    values = torch.as_tensor(values)
    if values.shape != (n_layers, d_mlp):
        raise PerturbationError(
            f"{what} must have shape ({n_layers}, {d_mlp}) (one row per model layer), got {tuple(values.shape)}"
        )
    return {l: values[l] for l in range(n_layers)}


def _from_skill(x: torch.Tensor, skill: SkillNeurons) -> dict[int, torch.Tensor]:
    """{real layer: [d_mlp]} of a SkillNeurons tensor [runs, rows, positions, d_mlp], averaged over runs, positions."""
    mean = x.double().mean(dim=(0, 2))
    return {layer: mean[r] for r, layer in enumerate(skill.layers)}


# ----------------------------------------------------------------------------- perturbation
class Perturbation:
    """Forward hooks that perturb chosen neurons at every position (see the module docstring).

    Args:
        model: any TransformerLens model with `blocks.{l}.mlp.hook_post` hook points.
        neurons: boolean mask or `(layer, neuron)` pairs (see `neuron_index`).
        mode: "noise", "zero", "mean", or a function `fn(x [batch, pos, k], layer, neurons [k]) -> x'`.
        std: noise std; absolute, or a multiple of each neuron's std with `relative`.
        relative: scale the noise by each neuron's std (from `neuron_std` or `skill`).
        seed: noise seed.
        layers: perturb only these (real) layers; default all layers holding chosen neurons.
        skill: `SkillNeurons` whose `layers` map the mask rows to real layers and whose
            baseline (mode "mean") and std (`relative`) are used, averaged over runs and
            prompt positions, unless `baseline` / `neuron_std` are given.
        baseline: [n_layers, d_mlp] baselines indexed by real layer (mode "mean").
        neuron_std: [n_layers, d_mlp] stds indexed by real layer (`relative`).
        units: the unit source (default: the skill neurons', else MLP neurons).
    """

    def __init__(
        self,
        model: HookedRootModule,
        neurons: torch.Tensor | Iterable[tuple[int, int]],
        mode: str | PerturbFn = "noise",
        *,
        std: float = 0.1,
        relative: bool = False,
        seed: int = 0,
        layers: Iterable[int] | None = None,
        skill: SkillNeurons | None = None,
        baseline: torch.Tensor | None = None,
        neuron_std: torch.Tensor | None = None,
        units: str | UnitSource | None = None,
    ):
        spec = model_spec(model)
        if not isinstance(units, UnitSource):  # a source resolved by the caller was checked there
            units = unit_source(model, units if units is not None else (skill.units if skill is not None else None))
            check_source(model, units, PerturbationError)
        self.units = units
        self.model = model
        self.n_layers, self.d_mlp = spec.n_layers, self.units.width
        if not callable(mode) and mode not in MODES:
            raise PerturbationError(f"unknown perturbation mode {mode!r}; choose one of {MODES} or pass a function")
        if mode == "noise" and not (np.isfinite(std) and std >= 0):
            raise PerturbationError(f"noise std must be finite and >= 0, got {std}")
        if skill is not None and skill.d_mlp != self.d_mlp:
            raise PerturbationError(
                f"skill neurons have {skill.d_mlp} units per layer but the {self.units.name!r} "
                f"units of the model have {self.d_mlp}"
            )
        self.mode = mode
        self.std = float(std)
        self.relative = bool(relative)
        self.seed = int(seed)
        rows = (
            skill.layers
            if skill is not None
            else (list(self.units.layers) if len(self.units.layers) < spec.n_layers else None)
        )  # an SAE's one layer
        index = neuron_index(neurons, spec.n_layers, self.d_mlp, rows)
        if layers is not None:
            keep = sorted({int(l) for l in layers})
            bad = [l for l in keep if not 0 <= l < spec.n_layers]
            if bad:
                raise PerturbationError(f"layers {bad} out of range: the model has {spec.n_layers} layers")
            index = {l: idx for l, idx in index.items() if l in keep}
        self.index = index
        self.scale: dict[int, torch.Tensor] = {}  # noise std per chosen neuron
        self.target: dict[int, torch.Tensor] = {}  # mean mode: the baseline per chosen neuron
        if mode == "mean":
            self.target = self._stats(baseline, skill, "baseline", "mode 'mean' needs a baseline")
        if mode == "noise":
            if relative:
                sd = self._stats(neuron_std, skill, "std", "relative noise needs each neuron's std")
                self.scale = {l: self.std * s for l, s in sd.items()}
            else:
                self.scale = {l: torch.full((len(idx),), self.std, dtype=torch.float64) for l, idx in index.items()}
        outside = [l for l in index if l not in self.units.layers]
        if outside:
            raise PerturbationError(
                f"layers {outside} have no {self.units.name!r} units (they exist at layers {list(self.units.layers)})"
            )
        self._device_cache: dict[tuple, torch.Tensor] = {}
        self._noise: dict[int, torch.Tensor] = {}
        self._next_example = 0

    def _stats(self, given, skill, attr: str, need: str) -> dict[int, torch.Tensor]:
        if given is not None:
            per_layer = _per_layer(given, self.n_layers, self.d_mlp, attr)
        elif skill is not None:
            per_layer = _from_skill(getattr(skill, attr), skill)
        else:
            raise PerturbationError(
                f"{need}: pass skill=<SkillNeurons> or {'baseline' if attr == 'baseline' else 'neuron_std'}="
            )
        lacking = [l for l in self.index if l not in per_layer]
        if lacking:
            raise PerturbationError(
                f"no {attr} for layers {lacking}: the skill neurons cover layers {sorted(per_layer)}"
            )
        return {l: per_layer[l].double()[idx] for l, idx in self.index.items()}

    # --- state ---------------------------------------------------------------
    @property
    def n_neurons(self) -> int:
        return sum(len(idx) for idx in self.index.values())

    @property
    def layers(self) -> list[int]:
        return sorted(self.index)

    def mask(self) -> torch.Tensor:
        """Boolean mask [n_layers, d_mlp] of the perturbed neurons."""
        return index_to_mask(self.index, self.n_layers, self.d_mlp)

    def reset(self, start: int = 0) -> None:
        """Number the next example processed `start` (noise draws restart)."""
        self._next_example = int(start)

    def draws(self, examples: Sequence[int]) -> dict[int, Float[torch.Tensor, "batch k"]]:
        """Standard-normal draws of the chosen neurons for the given example numbers (float64)."""
        out = {l: torch.empty(len(examples), len(idx), dtype=torch.float64) for l, idx in self.index.items()}
        for row, j in enumerate(examples):
            z = torch.from_numpy(
                np.random.default_rng([self.seed, int(j)]).standard_normal((self.n_layers, self.d_mlp))
            )
            for l, idx in self.index.items():
                out[l][row] = z[l, idx]
        return out

    def _on(self, key: str, layer: int, device, dtype) -> torch.Tensor:
        ck = (key, layer, str(device), dtype)
        if ck not in self._device_cache:
            src = {"idx": self.index, "scale": self.scale, "target": self.target}[key]
            self._device_cache[ck] = src[layer].to(device=device, dtype=dtype)
        return self._device_cache[ck]

    # --- hooks ---------------------------------------------------------------
    def _start_batch(self, batch_size: int) -> None:
        examples = range(self._next_example, self._next_example + batch_size)
        self._next_example += batch_size
        if self.mode == "noise":
            self._noise = {l: d * self.scale[l] for l, d in self.draws(examples).items()}

    def _hook_for(self, layer: int) -> Callable:
        first = layer == min(self.index)

        name = self.units.hook(layer)

        def hook(act: Float[torch.Tensor, "batch pos d_mlp"], hook) -> torch.Tensor:
            if self.units.name == "mlp":
                compat.check_hook_width(act, self.d_mlp, name, PerturbationError)
            else:
                self.units.check(act, name, PerturbationError)
            if first:
                self._start_batch(act.shape[0])
            idx = self._on("idx", layer, act.device, torch.long)
            change: Callable[[torch.Tensor], torch.Tensor]
            if self.mode == "zero":
                change = torch.zeros_like
            elif self.mode == "mean":
                target = self._on("target", layer, act.device, act.dtype)
                change = lambda u: target.expand_as(u)
            elif self.mode == "noise":
                noise = self._noise[layer].to(device=act.device, dtype=act.dtype)
                change = lambda u: u + noise[:, None, :]
            else:
                change = functools.partial(self._call_mode, layer=layer, idx=idx)
            return self.units.apply(act, idx, change)

        return hook

    def _call_mode(self, u: torch.Tensor, layer: int, idx: torch.Tensor) -> torch.Tensor:
        assert callable(self.mode)
        new = self.mode(u, layer, idx)
        if tuple(new.shape) != tuple(u.shape):
            raise PerturbationError(
                f"the perturbation function returned shape {tuple(new.shape)} for activations of shape {tuple(u.shape)}"
            )
        return new

    def fwd_hooks(self) -> list[tuple[str | Callable, Callable]]:
        """`(hook name, function)` pairs, for `model.hooks(fwd_hooks=...)` or `extra_hooks=`.

        The first hook is a `NumberedHook` whose `start_batch(n)` is `reset`: `evaluate` calls it with
        each batch's global example number, so noise is a function of (seed, example) under
        any batch size and any number of processes.
        """
        hooks: list[tuple[str | Callable, Callable]] = [
            (self.units.hook(l), self._hook_for(l)) for l in sorted(self.index)
        ]
        if hooks:
            hooks[0] = (hooks[0][0], NumberedHook(hooks[0][1], self.reset))
        return hooks

    @contextlib.contextmanager
    def attached(self) -> Iterator[Perturbation]:
        with self.model.hooks(fwd_hooks=self.fwd_hooks()):
            yield self


@contextlib.contextmanager
def perturbed(model: HookedRootModule, neurons, mode: str | PerturbFn = "noise", **kwargs) -> Iterator[Perturbation]:
    """Context in which `model` runs with `neurons` perturbed; see `Perturbation` for the arguments.

    The hooks are removed on leaving, also after an exception, and compose with
    any other hooks added inside or outside the context.
    """
    pert = Perturbation(model, neurons, mode, **kwargs)
    with pert.attached():
        yield pert


def perturb(model: HookedRootModule, neurons, mode: str | PerturbFn = "noise", **kwargs) -> Any:
    """Deprecated name of `perturbed` (kept for one release: `tl_skill.perturb` is this module)."""
    warnings.warn(
        "tl_skill.perturb.perturb is deprecated; use tl_skill.perturbed (the same context manager)",
        DeprecationWarning,
        stacklevel=2,
    )
    return perturbed(model, neurons, mode, **kwargs)
