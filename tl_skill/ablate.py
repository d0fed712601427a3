"""Perturbing neurons, and the skill-vs-random ablation experiment (SPEC §6).

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
chosen. `tuning.evaluate` visits a split in one fixed order (sorted by length,
whatever the batch size) and resets the numbering at every batch to the
batch's global position in that order, so `j` is the example's global number
under `torchrun` too: accuracies are the same for any number of processes.

    with perturb(model, mask, mode="noise", std=0.1, seed=0):
        logits = model(tokens)

or pass `Perturbation(...).fwd_hooks()` as `extra_hooks` to `tuning.evaluate`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from . import compat
from .models import model_spec
from .neurons import SkillNeurons, check_neurons_for_run, random_mask_like
from .tasks import subsample
from .files import atomic_json
from .tuning import Run, evaluate, majority_accuracy

log = logging.getLogger(__name__)

MODES = ("noise", "zero", "mean")
ABLATION_JSON = "ablation.json"
ABLATION_PNG = "ablation.png"
DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2)

PerturbFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


class AblationError(ValueError):
    """Bad perturbation or ablation-experiment arguments, or an ablation directory that does not match."""


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
                raise AblationError(f"a neuron mask must be boolean (or 0/1), got dtype {mask.dtype}")
            mask = mask.bool()
        hint = "" if rows is not None else (
            "; a mask from SkillNeurons.select has one row per SkillNeurons.layers: pass skill=<SkillNeurons>")
        rows = list(range(n_layers)) if rows is None else [int(r) for r in rows]
        if mask.ndim != 2 or mask.shape != (len(rows), d_mlp):
            raise AblationError(f"neuron mask has shape {tuple(mask.shape)}, expected ({len(rows)}, {d_mlp}){hint}")
        bad = [r for r in rows if not 0 <= r < n_layers]
        if bad:
            raise AblationError(f"mask rows map to layers {bad}, out of range: the model has {n_layers} layers")
        mask = mask.cpu()
        out = {}
        for r, layer in enumerate(rows):
            idx = torch.nonzero(mask[r]).flatten()
            if len(idx):
                out[layer] = torch.unique(torch.cat([out[layer], idx])) if layer in out else idx
        return out
    try:
        pairs = [(int(l), int(i)) for l, i in neurons]
    except (TypeError, ValueError) as exc:
        raise AblationError("neurons must be a boolean mask [layers, d_mlp] or a list of (layer, neuron) "
                            f"pairs, got {type(neurons).__name__}") from exc
    bad = [(l, i) for l, i in pairs if not (0 <= l < n_layers and 0 <= i < d_mlp)]
    if bad:
        raise AblationError(f"neurons {bad[:5]} out of range: the model has {n_layers} layers of {d_mlp} neurons")
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
        raise AblationError(f"{what} must have shape ({n_layers}, {d_mlp}) (one row per model layer), "
                            f"got {tuple(values.shape)}")
    return {l: values[l] for l in range(n_layers)}


def _from_skill(x: torch.Tensor, skill: SkillNeurons) -> dict[int, torch.Tensor]:
    """{real layer: [d_mlp]} from a SkillNeurons tensor [runs, rows, positions, d_mlp], averaged over runs and positions."""
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
        baseline, neuron_std: [n_layers, d_mlp] tensors indexed by real layer.
    """

    def __init__(self, model, neurons, mode: str | PerturbFn = "noise", *, std: float = 0.1,
                 relative: bool = False, seed: int = 0, layers: Iterable[int] | None = None,
                 skill: SkillNeurons | None = None, baseline: torch.Tensor | None = None,
                 neuron_std: torch.Tensor | None = None):
        spec = model_spec(model)
        self.model = model
        self.n_layers, self.d_mlp = spec.n_layers, spec.d_mlp
        if not callable(mode) and mode not in MODES:
            raise AblationError(f"unknown perturbation mode {mode!r}; choose one of {MODES} or pass a function")
        if mode == "noise" and not (np.isfinite(std) and std >= 0):
            raise AblationError(f"noise std must be finite and >= 0, got {std}")
        if skill is not None and skill.d_mlp != spec.d_mlp:
            raise AblationError(f"skill neurons have d_mlp={skill.d_mlp} but the model has {spec.d_mlp}")
        self.mode = mode
        self.std = float(std)
        self.relative = bool(relative)
        self.seed = int(seed)
        index = neuron_index(neurons, spec.n_layers, spec.d_mlp, skill.layers if skill is not None else None)
        if layers is not None:
            keep = sorted(set(int(l) for l in layers))
            bad = [l for l in keep if not 0 <= l < spec.n_layers]
            if bad:
                raise AblationError(f"layers {bad} out of range: the model has {spec.n_layers} layers")
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
        missing = [n for n in (compat.mlp_post_hook(l) for l in index) if n not in model.hook_dict]
        if missing:
            raise AblationError(f"the model has no hook point {missing[0]!r}")
        self._device_cache: dict[tuple, torch.Tensor] = {}
        self._noise: dict[int, torch.Tensor] = {}
        self._next_example = 0

    def _stats(self, given, skill, attr: str, need: str) -> dict[int, torch.Tensor]:
        if given is not None:
            per_layer = _per_layer(given, self.n_layers, self.d_mlp, attr)
        elif skill is not None:
            per_layer = _from_skill(getattr(skill, attr), skill)
        else:
            raise AblationError(f"{need}: pass skill=<SkillNeurons> or {'baseline' if attr == 'baseline' else 'neuron_std'}=")
        lacking = [l for l in self.index if l not in per_layer]
        if lacking:
            raise AblationError(f"no {attr} for layers {lacking}: the skill neurons cover layers {sorted(per_layer)}")
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
            z = torch.from_numpy(np.random.default_rng([self.seed, int(j)]).standard_normal(
                (self.n_layers, self.d_mlp)))
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

        name = compat.mlp_post_hook(layer)

        def hook(act: Float[torch.Tensor, "batch pos d_mlp"], hook) -> torch.Tensor:
            compat.check_hook_width(act, self.d_mlp, name, AblationError)
            if first:
                self._start_batch(act.shape[0])
            idx = self._on("idx", layer, act.device, torch.long)
            out = act.clone()
            if self.mode == "zero":
                out[..., idx] = 0
            elif self.mode == "mean":
                out[..., idx] = self._on("target", layer, act.device, act.dtype)
            elif self.mode == "noise":
                noise = self._noise[layer].to(device=act.device, dtype=act.dtype)
                out[..., idx] = act[..., idx] + noise[:, None, :]
            else:
                new = self.mode(act[..., idx], layer, idx)
                if tuple(new.shape) != tuple(act[..., idx].shape):
                    raise AblationError(f"the perturbation function returned shape {tuple(new.shape)} "
                                        f"for activations of shape {tuple(act[..., idx].shape)}")
                out[..., idx] = new.to(act.dtype)
            return out

        return hook

    def fwd_hooks(self) -> list[tuple[str, Callable]]:
        """`(hook name, function)` pairs, for `model.hooks(fwd_hooks=...)` or `extra_hooks=`.

        The first hook carries `start_batch(n)` (= `reset`): `tuning.evaluate` calls it with
        each batch's global example number, so noise is a function of (seed, example) under
        any batch size and any number of processes.
        """
        hooks = [(compat.mlp_post_hook(l), self._hook_for(l)) for l in sorted(self.index)]
        if hooks:
            hooks[0][1].start_batch = self.reset
        return hooks

    @contextlib.contextmanager
    def attached(self) -> Iterator["Perturbation"]:
        with self.model.hooks(fwd_hooks=self.fwd_hooks()):
            yield self


@contextlib.contextmanager
def perturb(model, neurons, mode: str | PerturbFn = "noise", **kwargs) -> Iterator[Perturbation]:
    """Context in which `model` runs with `neurons` perturbed; see `Perturbation` for the arguments.

    The hooks are removed on leaving, also after an exception, and compose with
    any other hooks added inside or outside the context.
    """
    pert = Perturbation(model, neurons, mode, **kwargs)
    with pert.attached():
        yield pert


# ----------------------------------------------------------------------------- experiment
def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _mode_name(mode) -> str:
    return mode if isinstance(mode, str) else f"fn:{getattr(mode, '__qualname__', type(mode).__name__)}"


def _key(kind: str, fraction: float | None = None, seed: int | None = None) -> str:
    return kind if kind == "clean" else f"{kind}|{fraction!r}|{seed}"


PAIRED_TEST = ("paired bootstrap over test examples and random seeds (2,000 replicates): 95% CI of "
               "skill minus random accuracy; exact McNemar test of skill vs each random seed")


def _correct(e: dict) -> list[int]:
    return [int(c) for c in e["correct"]]


def paired_comparison(skill: Sequence[int], randoms: Sequence[Sequence[int]], seed: int = 0) -> dict[str, Any]:
    """Skill vs random perturbation on the same examples: bootstrap CI and McNemar p-values (see PAIRED_TEST)."""
    from .stats import mcnemar_exact, paired_bootstrap

    boot = paired_bootstrap(skill, randoms, seed=seed)
    return {**boot, "mcnemar_p": [mcnemar_exact(skill, r)["p_value"] for r in randoms],
            "skill_hurts_more": boot["ci_high"] < 0, "test": PAIRED_TEST}


def _rows(mode: str, fractions: Sequence[float], seeds: Sequence[int], evals: dict[str, dict],
          counts: dict[float, list[int]]) -> list[dict[str, Any]]:
    clean = evals.get(_key("clean"), {}).get("accuracy")
    rows = []
    for f in fractions:
        skill_eval = evals.get(_key("skill", f, seeds[0]))
        skill = skill_eval["accuracy"] if skill_eval else None
        rand_evals = [evals[_key("random", f, s)] for s in seeds if _key("random", f, s) in evals]
        rand = [e["accuracy"] for e in rand_evals]
        paired = None
        if skill_eval and len(rand_evals) == len(seeds):
            paired = paired_comparison(_correct(skill_eval), [_correct(e) for e in rand_evals])
        rows.append({
            "mode": mode, "fraction": f, "n_neurons": int(sum(counts[f])), "layer_counts": counts[f],
            "clean_accuracy": clean, "skill_accuracy": skill,
            "random_accuracy": float(np.mean(rand)) if rand else None,
            "random_accuracy_std": float(np.std(rand)) if rand else None,
            "random_accuracies": rand, "paired": paired,
        })
    return rows


def ablation_experiment(
    model, run: Run | str | Path, neurons: SkillNeurons | str | Path, out: str | Path | None = None,
    mode: str | PerturbFn = "noise", fractions: Sequence[float] = DEFAULT_FRACTIONS, seeds: int | Sequence[int] = 3,
    std: float = 0.1, relative: bool = False, layers: Iterable[int] | None = None,
    max_examples: int | None = None, batch_size: int = 32, per_layer: bool = True, progress: bool = True,
) -> dict[str, Any]:
    """Test accuracy of the prompted model with skill neurons vs random neurons perturbed (SPEC §6).

    For each fraction f, the top `int(f * d_mlp)` skill neurons of each layer
    (`neurons.select(fraction=f, per_layer=per_layer)`, restricted to `layers`)
    are perturbed; the control perturbs the same number of random neurons per
    layer, once per seed (mask seed s, noise seed s). The skill neurons' noise
    uses the first seed. All conditions see the same test examples in the same
    order, so noise seed s gives the same draw to a neuron in every condition.

    Args:
        run: the prompt-tuning run whose prompt and task are used.
        neurons: skill neurons of the same model and task.
        out: directory for `ablation.json` (written after every evaluation; a rerun
            with the same settings skips what is done) and `ablation.png`.
        seeds: number of random-control seeds (0..n-1), or the seeds themselves.
        max_examples: test examples (default: the run's own test set).

    Returns:
        The contents of `ablation.json`: metadata and one row per fraction with
        `clean_accuracy`, `skill_accuracy`, `random_accuracy` (mean over seeds)
        and `random_accuracy_std` (population std over seeds).
    """
    t_start = time.perf_counter()
    run = run if isinstance(run, Run) else Run.load(run)
    neurons = neurons if isinstance(neurons, SkillNeurons) else SkillNeurons.load(neurons)
    spec = model_spec(model)
    # --- validate everything before any evaluation
    check_neurons_for_run(run, neurons, spec.name, AblationError)
    if neurons.d_mlp != spec.d_mlp:
        raise AblationError(f"skill neurons have d_mlp={neurons.d_mlp} but the model has {spec.d_mlp}")
    if not callable(mode) and mode not in MODES:
        raise AblationError(f"unknown perturbation mode {mode!r}; choose one of {MODES} or pass a function")
    fractions = [float(f) for f in fractions]
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise AblationError(f"fractions must be in (0, 1], got {fractions}")
    fractions = sorted(set(fractions))
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise AblationError(f"need at least one seed and no repeats, got {seeds!r}")
    if mode == "noise" and not (np.isfinite(std) and std > 0):
        raise AblationError(f"noise std must be > 0, got {std}")
    if batch_size < 1:
        raise AblationError(f"batch_size must be >= 1, got {batch_size}")
    if max_examples is not None and max_examples < 1:
        raise AblationError(f"max_examples must be >= 1, got {max_examples}")
    layer_list = list(neurons.layers) if layers is None else sorted(set(int(l) for l in layers))
    bad = [l for l in layer_list if l not in neurons.layers]
    if bad:
        raise AblationError(f"layers {bad} hold no skill neurons: the skill neurons cover layers {neurons.layers}")
    row_keep = torch.tensor([l in layer_list for l in neurons.layers])

    cfg = run.config
    cap = max_examples if max_examples is not None else cfg.max_test_examples
    task = subsample(run.load_task(), {"test": cap}, seed=cfg.task_seed)
    n_test = len(task["test"])
    labels = task.labels("test")
    majority = majority_accuracy(task, "test")
    device = compat.model_device(model)
    prompt = run.prompt.to(device)
    verbalizer = run.verbalizer(model)
    masks = {f: neurons.select(fraction=f, per_layer=per_layer) & row_keep[:, None] for f in fractions}
    counts = {f: [int(c) for c in m.sum(1)] for f, m in masks.items()}
    for f, m in masks.items():
        if not m.any():
            log.warning("fraction %g selects no neuron (d_mlp=%d): skill and random equal clean", f, spec.d_mlp)

    mode_name = _mode_name(mode)
    identity = {
        "model": spec.name, "task": run.task_name, "run_prompt": _digest(run.prompt.vectors),
        "neurons": _digest(neurons.predictivity), "neuron_layers": list(neurons.layers), "mode": mode_name,
        "std": float(std) if mode == "noise" else None, "relative": bool(relative) if mode == "noise" else None,
        "layers": layer_list, "per_layer": per_layer, "test_examples": cap, "task_seed": cfg.task_seed,
        "max_input_tokens": cfg.max_input_tokens, "padding_side": cfg.padding_side,
    }
    evals: dict[str, dict] = {}
    path = None
    if out is not None:
        out = Path(out)
        path = out / ABLATION_JSON
        if path.exists():
            try:
                prev = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise AblationError(f"{path} is not readable JSON ({exc}); delete it to start over") from exc
            clash = [k for k in identity if prev.get("settings", {}).get(k) != identity[k]]
            if clash:
                raise AblationError(f"{path} holds an ablation with different {', '.join(clash)}; "
                                    "use another --out or delete it")
            # evaluations saved without per-example results cannot enter the paired test: redo them
            evals = {e["key"]: e for e in prev.get("evaluations", []) if "correct" in e}
            log.info("resuming %s: %d evaluations done", path, len(evals))
        out.mkdir(parents=True, exist_ok=True)

    plan = [("clean", None, None)] + [
        (kind, f, s) for f in fractions
        for kind, s in [("skill", seed_list[0])] + [("random", s) for s in seed_list]]
    todo = [p for p in plan if _key(*p) not in evals]

    def result(status: str) -> dict[str, Any]:
        return {
            "model": spec.name, "task": run.task_name, "run": str(run.path), "neurons_runs": neurons.runs,
            "mode": mode_name, "fractions": fractions, "seeds": seed_list, "n_examples": n_test, "split": "test",
            "run_test_accuracy": run.metrics.get("test_accuracy"), "majority_accuracy": majority,
            "per_layer": per_layer, "status": status,
            "settings": {**identity, "batch_size": batch_size},
            "wall_seconds": time.perf_counter() - t_start,
            "eval_seconds": sum(e["seconds"] for e in evals.values()),
            "rows": _rows(mode_name, fractions, seed_list, evals, counts),
            "evaluations": sorted(evals.values(), key=lambda e: e["key"]),
        }

    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc=f"ablate {run.task_name} ({mode_name})",
               disable=not progress, unit="eval")
    try:
        for kind, f, s in todo:
            t0 = time.perf_counter()
            if kind == "clean":
                hooks: list = []
            else:
                mask = masks[f] if kind == "skill" else random_mask_like(masks[f], s)
                pert = Perturbation(model, mask, mode, std=std, relative=relative, seed=s, skill=neurons)
                hooks = pert.fwd_hooks()
            res = evaluate(model, task, "test", verbalizer, prompt, batch_size=batch_size,
                           max_input_tokens=cfg.max_input_tokens, extra_hooks=hooks,
                           padding_side=cfg.padding_side)
            evals[_key(kind, f, s)] = {"key": _key(kind, f, s), "kind": kind, "fraction": f, "seed": s,
                                       "accuracy": res["accuracy"], "seconds": time.perf_counter() - t0,
                                       # per test example (in test-split order), 1 = correct: for the paired test
                                       "correct": "".join("1" if c else "0" for c in res["predictions"] == labels)}
            if path is not None:
                atomic_json(path, result("running"))
            bar.set_postfix(last=f"{kind} {'' if f is None else f'{f:g} '}{res['accuracy']:.3f}")
            bar.update(1)
    finally:
        bar.close()
    final = result("done")
    if out is not None:
        atomic_json(path, final)
        from .plots import plot_ablation

        plot_ablation(final, out / ABLATION_PNG)
    return final
