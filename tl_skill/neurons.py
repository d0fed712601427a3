"""Predictivity, multi-class decomposition and skill-neuron selection (method §3-§5).

Neuron (l, t, i) predicts the positive class when its activation at prompt
position t is strictly above its train-split mean (the baseline); its
accuracy on the dev split is `acc`, its predictivity `max(acc, 1 - acc)`
(a reliably *lower* neuron is just as predictive). A neuron's predictivity is
the max over prompt positions, then the mean (or min) over runs of the task.
A constant neuron is never above its baseline, so it always predicts the
negative class and its predictivity is the majority rate, as method §3 asks;
such neurons are also flagged in `SkillNeurons.constant`.

Recording runs into these statistics is `tl_skill.find` (`find_skill_neurons`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import einops
import numpy as np
import torch
from jaxtyping import Float

from tl_skill import distributed
from tl_skill.display import html_bars, html_facts, html_table, repr_line
from tl_skill.files import (
    FileFormatError,
    atomic_json,
    atomic_tensors,
    check_str_list,
    check_types,
    read_json,
    read_tensors,
)
from tl_skill.predictivity import (
    NeuronsError,
    Subtask,
    accuracy_of_counts,
    predictivity_of,
)
from tl_skill.stats import benjamini_hochberg, hypergeom_p_values, trial_stability
from tl_skill.tuning.runs import Run

log = logging.getLogger(__name__)

PREDICTIVITY_FILE = "predictivity.safetensors"
NEURONS_JSON = "neurons.json"
# how `SkillNeurons.select` ranks a multi-class task's units
SELECTIONS = ("score", "round_robin")


@dataclass(repr=False)
class SkillNeurons:
    """Predictivity of every neuron of a model for a task, over one or more runs (trials)."""

    model: str
    task: str
    runs: list[str]
    label_names: list[str]
    label_words: list[str]
    subtasks: list[Subtask]
    layers: list[int]
    positions: str
    accuracy: torch.Tensor  # [R, S, L, T, D]
    baseline: torch.Tensor  # [R, L, T, D] float64
    std: torch.Tensor  # [R, L, T, D]
    constant: torch.Tensor  # [R, L, T, D] bool
    run_metrics: list[dict[str, Any]] = field(default_factory=list)
    aggregate_runs: str = "mean"
    aggregate_subtasks: str = "max"
    meta: dict[str, Any] = field(default_factory=dict)
    # Recorded counts per pass ("eval": the selection split, "confirm": held out, "control":
    # shuffled labels): counts["eval.pos_above"] [R, S, L, T, D] and class_counts["eval"] =
    # {"n_pos": [S], "n_neg": [S]}. Empty for results saved before the statistics existed.
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    class_counts: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    @property
    def units(self) -> str:
        """The unit source the activations were read from ("mlp", "resid", "attn", "sae:PATH"; `tl_skill.units`)."""
        return self.meta.get("units", "mlp")

    # --- statistics (method §3b; see tl_skill.stats) ---------------------------
    def has_counts(self, which: str = "eval") -> bool:
        return f"{which}.pos_above" in self.counts

    def _need(self, which: str) -> None:
        if not self.has_counts(which):
            what = {
                "eval": "the evaluation counts (found before this version: run find again)",
                "confirm": "a held-out split (find with confirm_split='test')",
                "control": "the shuffled-label control (find with control='shuffled')",
            }[which]
            raise NeuronsError(f"these skill neurons lack {what}")

    def position_p_values(self, which: str = "eval", alternative: str = "two-sided") -> torch.Tensor:
        """Exact p-value of every (run, subtask, layer, position, neuron) [R, S, L, T, D]."""
        self._need(which)
        pos, neg = self.counts[f"{which}.pos_above"], self.counts[f"{which}.neg_above"]
        cc = self.class_counts[which]
        return torch.stack(
            [
                hypergeom_p_values(pos[:, j], neg[:, j], cc["n_pos"][j], cc["n_neg"][j], alternative)
                for j in range(pos.shape[1])
            ],
            1,
        )

    def p_value(self, which: str = "eval") -> Float[torch.Tensor, "l d"]:
        """Per neuron: Bonferroni over subtasks and positions of the smallest p, then the largest over runs."""
        p = self.position_p_values(which)
        R, S, L, T, D = p.shape
        per_run = (p.amin(dim=(1, 3)) * (S * T)).clamp(max=1.0)
        return per_run.amax(0)

    def q_value(self, method: str = "bh", which: str = "eval") -> Float[torch.Tensor, "l d"]:
        return benjamini_hochberg(self.p_value(which), method)

    def significant(self, q: float = 0.05, method: str = "bh") -> torch.Tensor:
        """Boolean mask [L, D] of neurons whose FDR q-value is at most `q`."""
        return self.q_value(method) <= q

    def _confirm_rule(self):
        """Per run, the (subtask, position) and direction each neuron's rule takes on the selection split."""
        acc = einops.rearrange(self.accuracy, "r s l t d -> r l d (s t)")
        best = predictivity_of(acc).argmax(-1, keepdim=True)
        up = torch.gather(acc, 3, best)[..., 0] >= 0.5
        return best, up

    def heldout_predictivity(self) -> Float[torch.Tensor, "l d"]:
        """Accuracy on the held-out split of each neuron's rule as chosen on the selection split.

        Position, subtask and direction are taken from the selection split (per run), so the
        held-out figure is not inflated by choosing on the data it is measured on; mean (or min)
        over runs as for `predictivity`.
        """
        self._need("confirm")
        cc = self.class_counts["confirm"]
        held = accuracy_of_counts(
            self.counts["confirm.pos_above"], self.counts["confirm.neg_above"], cc["n_pos"], cc["n_neg"]
        )
        best, up = self._confirm_rule()
        chosen = torch.gather(einops.rearrange(held, "r s l t d -> r l d (s t)"), 3, best)[..., 0]
        return self._runs_agg(torch.where(up, chosen, 1 - chosen))

    def heldout_p_value(self) -> Float[torch.Tensor, "l d"]:
        """One-sided exact p-value on the held-out split of each neuron's selected rule (largest over runs)."""
        greater = einops.rearrange(self.position_p_values("confirm", "greater"), "r s l t d -> r l d (s t)")
        less = einops.rearrange(self.position_p_values("confirm", "less"), "r s l t d -> r l d (s t)")
        best, up = self._confirm_rule()
        p = torch.where(up, torch.gather(greater, 3, best)[..., 0], torch.gather(less, 3, best)[..., 0])
        return p.amax(0)

    def control_summary(self, q: float = 0.05) -> dict[str, Any]:
        """The shuffled-label control: what chance alone gives with the same neurons and counts."""
        p_pos = self.position_p_values("control")
        p = (p_pos.amin(dim=(1, 3)) * (p_pos.shape[1] * p_pos.shape[3])).clamp(max=1.0).amax(0)
        cc = self.class_counts["control"]
        acc = accuracy_of_counts(
            self.counts["control.pos_above"], self.counts["control.neg_above"], cc["n_pos"], cc["n_neg"]
        )
        pred = self._runs_agg(predictivity_of(acc).amax(3).amax(1))
        return {
            "kind": "shuffled",
            "seed": self.meta.get("control_seed"),
            "fraction_position_p_below_0.05": float((p_pos < 0.05).double().mean()),
            "n_significant": int((benjamini_hochberg(p) <= q).sum()),
            "best_predictivity": float(pred.max()),
            "mean_predictivity": float(pred.mean()),
        }

    def stability(self, fraction: float = 0.01) -> dict[str, Any]:
        """Agreement between the trials (runs), see `stats.trial_stability`."""
        per_run = predictivity_of(self.accuracy).amax(3)  # [R, S, L, D]
        per_run = per_run.amax(1) if self.aggregate_subtasks == "max" else per_run.mean(1)
        return trial_stability(per_run, fraction)

    @property
    def n_trials(self) -> int:
        """How many runs (trials, prompts) the statistics cover."""
        return self.accuracy.shape[0]

    def trial(self, k: int) -> SkillNeurons:
        """The skill neurons of run (trial) `k` alone, as if found from that prompt only."""
        if not -self.n_trials <= k < self.n_trials:
            raise NeuronsError(f"trial {k} is out of range: these skill neurons cover {self.n_trials} run(s)")
        k %= self.n_trials
        one = slice(k, k + 1)
        return replace(
            self,
            runs=self.runs[one],
            accuracy=self.accuracy[one],
            baseline=self.baseline[one],
            std=self.std[one],
            constant=self.constant[one],
            run_metrics=self.run_metrics[one],
            counts={name: c[one] for name, c in self.counts.items()},
        )

    def statistics(self, q: float = 0.05, top: int = 20) -> dict[str, Any]:
        """Everything a reviewer asks for, as plain numbers (what neurons.json and the CLI show)."""
        out: dict[str, Any] = {}
        if not self.has_counts("eval"):
            return out
        sig = self.significant(q)
        out["fdr_q"] = q
        out["n_significant"] = int(sig.sum())
        out["significant_per_layer"] = {str(l): int(c) for l, c in zip(self.layers, sig.sum(1).tolist())}
        out["n_significant_by"] = int(self.significant(q, "by").sum())
        pv, qv = self.p_value(), self.q_value()
        held = self.heldout_predictivity() if self.has_counts("confirm") else None
        held_p = self.heldout_p_value() if held is not None else None
        rows = []

        for row in self.top(top):
            l, i = self.layers.index(row["layer"]), row["neuron"]
            rows.append(
                {
                    "layer": row["layer"],
                    "neuron": i,
                    "predictivity": row["predictivity"],
                    "p_value": float(pv[l, i]),
                    "q_value": float(qv[l, i]),
                    **(
                        {"heldout_predictivity": float(held[l, i]), "heldout_p_value": float(held_p[l, i])}
                        if held is not None and held_p is not None
                        else {}
                    ),
                }
            )
        out["top"] = rows
        if held is not None:
            out["confirm_split"] = self.meta.get("confirm_split")
            mask = self._top1pct_mask()
            out["heldout_best_of_selected"] = float(held[mask].max())
            out["heldout_top1pct_mean"] = float(held[mask].mean())
            out["selection_top1pct_mean"] = float(self.predictivity[mask].mean())
            best = self.top(1)[0]
            out["heldout_of_best"] = float(held[self.layers.index(best["layer"]), best["neuron"]])
        if self.has_counts("control"):
            out["control"] = self.control_summary(q)
        if self.accuracy.shape[0] >= 2:
            out["stability"] = self.stability()
        return out

    # --- derived views -------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.accuracy.shape[2]

    @property
    def d_mlp(self) -> int:
        return self.accuracy.shape[-1]

    def _runs_agg(self, x: torch.Tensor) -> torch.Tensor:
        return _aggregate(x, self.aggregate_runs, ("mean", "min"), "run")

    @property
    def per_position(self) -> Float[torch.Tensor, "r l t d"]:
        """Predictivity per run and prompt position (multi-class: over subtasks as configured)."""
        p = predictivity_of(self.accuracy)
        return p.amax(1) if self.aggregate_subtasks == "max" else p.mean(1)

    @property
    def per_subtask(self) -> Float[torch.Tensor, "s l d"]:
        return self._runs_agg(predictivity_of(self.accuracy).amax(3))

    @property
    def predictivity(self) -> Float[torch.Tensor, "l d"]:
        return _aggregate(self.per_subtask, self.aggregate_subtasks, ("max", "mean"), "subtask")

    @property
    def best_predictivity(self) -> float:
        return float(self.predictivity.max())

    def best_position(self) -> torch.Tensor:
        """Prompt position at which each neuron is most predictive (first run, best subtask)."""
        return predictivity_of(self.accuracy[0]).amax(0).argmax(1)

    def direction(self) -> torch.Tensor:
        """+1 where being above baseline means the positive class (first run, best subtask/position)."""
        acc = einops.rearrange(self.accuracy[0], "s l t d -> l d (s t)")
        best = predictivity_of(acc).argmax(-1)
        chosen = torch.gather(acc, 2, best[..., None])[..., 0]
        return torch.where(chosen >= 0.5, 1, -1)

    # --- selection -------------------------------------------------------
    def select(
        self, fraction: float | None = None, k: int | None = None, per_layer: bool = True, multiclass: str = "score"
    ) -> torch.Tensor:
        """Boolean mask [n_layers, d_mlp] of skill neurons.

        Args:
            fraction: keep int(fraction * d_mlp) per layer (per_layer) or of all neurons.
            k: keep k per layer (per_layer) or k overall.
            per_layer: rank within each layer, as the reference does; else globally.
            multiclass: "score" ranks by the aggregated predictivity; "round_robin"
                takes the next best neuron of each subtask in turn (the reference).
        """
        if (fraction is None) == (k is None):
            raise NeuronsError("give exactly one of fraction or k")
        L, D = self.n_layers, self.d_mlp
        if fraction is not None:
            if not 0 <= fraction <= 1:
                raise NeuronsError(f"fraction must be in [0, 1], got {fraction}")
            k = int(fraction * (D if per_layer else L * D))
        assert k is not None
        if k < 0 or k > (D if per_layer else L * D):
            raise NeuronsError(f"k={k} out of range")
        if multiclass not in SELECTIONS:
            raise NeuronsError(f"unknown multiclass selection {multiclass!r}; choose one of {SELECTIONS}")
        scores = [self.predictivity] if multiclass == "score" else list(self.per_subtask)
        mask = torch.zeros(L, D, dtype=torch.bool)
        groups = [[l] for l in range(L)] if per_layer else [list(range(L))]
        for group in groups:
            orders = [_rank(s[group].reshape(-1)) for s in scores]
            chosen: list[int] = []
            seen: set[int] = set()
            pointers = [0] * len(orders)
            while len(chosen) < k:
                for j, order in enumerate(orders):
                    while pointers[j] < len(order) and order[pointers[j]] in seen:
                        pointers[j] += 1
                    if pointers[j] < len(order) and len(chosen) < k:
                        seen.add(order[pointers[j]])
                        chosen.append(order[pointers[j]])
            for flat in chosen:
                li, i = divmod(flat, D)
                mask[group[li], i] = True
        return mask

    def random_like(self, mask: torch.Tensor, seed: int) -> torch.Tensor:
        """Random neurons with the same per-layer counts as `mask`."""
        return random_mask_like(mask, seed)

    @staticmethod
    def layer_counts(mask: torch.Tensor) -> list[int]:
        return mask.sum(1).tolist()

    def top(self, k: int = 20) -> list[dict[str, Any]]:
        pred = self.predictivity
        order = _rank(pred.reshape(-1))[:k]
        pos, direc = self.best_position(), self.direction()
        out = []
        for flat in order:
            l, i = divmod(int(flat), self.d_mlp)
            out.append(
                {
                    "layer": self.layers[l],
                    "neuron": i,
                    "predictivity": float(pred[l, i]),
                    "position": int(pos[l, i]),
                    "direction": int(direc[l, i]),
                    "constant": bool(self.constant[0, l, :, i].all()),
                }
            )
        return out

    # --- by name: model layer numbers, never row indices -------------------------
    def row_of(self, layer: int) -> int:
        """The row of model layer `layer` in the [.., L, ..] tensors, which hold only `self.layers`."""
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise NeuronsError(f"layer must be an integer, got {layer!r}")
        if int(layer) not in self.layers:
            raise NeuronsError(f"layer {layer} was not recorded; these skill neurons have layers {self.layers}")
        return self.layers.index(int(layer))

    def _check_neuron(self, neuron: int) -> int:
        if isinstance(neuron, bool) or not isinstance(neuron, (int, np.integer)) or not 0 <= neuron < self.d_mlp:
            raise NeuronsError(f"neuron must be an integer in [0, {self.d_mlp}), got {neuron!r}")
        return int(neuron)

    def predictivity_at(self, layer: int, neuron: int) -> float:
        """Predictivity of neuron `neuron` of model layer `layer` (the aggregate over runs, subtasks, positions)."""
        return float(self.predictivity[self.row_of(layer), self._check_neuron(neuron)])

    def baseline_at(self, layer: int, position: int, neuron: int, run: int = 0) -> float:
        """The neuron's baseline (train-split mean activation) at prompt position `position` in run `run`."""
        R, _, T, _ = self.baseline.shape
        if not 0 <= run < R:
            raise NeuronsError(f"run must be in [0, {R}), got {run}")
        if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or not 0 <= position < T:
            raise NeuronsError(f"position must be an integer in [0, {T}), got {position!r}")
        return float(self.baseline[run, self.row_of(layer), int(position), self._check_neuron(neuron)])

    def mask_of(self, neurons: Any) -> torch.Tensor:
        """A selection mask [rows, d_mlp] (as `select` returns) from (layer, neuron) pairs or `table()` rows."""
        mask = torch.zeros(self.n_layers, self.d_mlp, dtype=torch.bool)
        pairs = zip(neurons["layer"], neurons["neuron"]) if hasattr(neurons, "columns") else neurons
        for layer, neuron in pairs:
            mask[self.row_of(int(layer)), self._check_neuron(int(neuron))] = True
        return mask

    # --- tables -----------------------------------------------------------------
    DATAFRAME_COLUMNS = (
        "layer",
        "neuron",
        "position",
        "direction",
        "predictivity",
        "p_value",
        "q_value",
        "significant",
        "heldout_predictivity",
        "heldout_p_value",
        "constant",
    )

    def to_dataframe(self, q: float = 0.05) -> Any:
        """Every neuron, most predictive first: one row per (layer, neuron), with every statistic the CLI prints.

        Columns (`DATAFRAME_COLUMNS`): `layer` (the model's layer number), `neuron`, `position` (best prompt
        position), `direction` (+1: above baseline means the positive class), `predictivity`, `p_value`
        (exact, Bonferroni over positions and subtasks), `q_value` (Benjamini-Hochberg), `significant`
        (`q_value <= q`), `heldout_predictivity` / `heldout_p_value` (the rule chosen on the selection split,
        measured on the held-out split), `constant`; then `predictivity[<subtask>]` per subtask of a
        multi-class task. Statistics the result lacks (found without counts or a held-out split) are NaN.
        """
        import pandas as pd

        pred = self.predictivity
        L, D = pred.shape
        nan = np.full(L * D, np.nan)
        flat = lambda t: t.reshape(-1).double().numpy()
        has = self.has_counts("eval")
        held = self.has_counts("confirm")
        qv = flat(self.q_value()) if has else nan
        frame = pd.DataFrame(
            {
                "layer": np.repeat(np.asarray(self.layers), D),
                "neuron": np.tile(np.arange(D), L),
                "position": self.best_position().reshape(-1).numpy(),
                "direction": self.direction().reshape(-1).numpy(),
                "predictivity": pred.reshape(-1).numpy(),
                "p_value": flat(self.p_value()) if has else nan,
                "q_value": qv,
                "significant": qv <= q if has else np.zeros(L * D, dtype=bool),
                "heldout_predictivity": flat(self.heldout_predictivity()) if held else nan,
                "heldout_p_value": flat(self.heldout_p_value()) if held else nan,
                "constant": self.constant[0].all(1).reshape(-1).numpy(),
            }
        )
        for s, sub in enumerate(self.subtasks if len(self.subtasks) > 1 else []):
            frame[f"predictivity[{sub.name}]"] = self.per_subtask[s].reshape(-1).numpy()
        order = _rank(pred.reshape(-1))  # the order of `top` and `select`: ties by index
        return frame.iloc[order].reset_index(drop=True)

    def table(self, k: int = 20, q: float = 0.05) -> Any:
        """The `k` most predictive neurons with their statistics (the head of `to_dataframe`)."""
        return self.to_dataframe(q).head(k)

    # --- display ----------------------------------------------------------------
    def __repr__(self) -> str:
        best = self.top(1)[0]
        facts: dict[str, Any] = {
            "model": self.model,
            "task": self.task,
            "runs": len(self.runs),
            "layers": f"{len(self.layers)} ({self.layers[0]}..{self.layers[-1]})",
            "neurons_per_layer": self.d_mlp,
            "units": self.units,
            "best": f"L{best['layer']} N{best['neuron']}: {best['predictivity']:.4f}",
        }
        if self.has_counts("eval"):
            facts["significant"] = int(self.significant().sum())
        return repr_line("SkillNeurons", facts)

    def _repr_html_(self) -> str:
        facts: dict[str, Any] = {
            "model": self.model,
            "task": self.task,
            "runs": len(self.runs),
            "units": self.units,
            "neurons per layer": self.d_mlp,
            "prompt dev accuracy": self.prompt_accuracy(),
        }
        if self.has_counts("eval"):
            facts["FDR-significant (q <= 0.05)"] = int(self.significant().sum())
        best = self.predictivity.amax(1).tolist()
        return (
            html_facts("Skill neurons", facts)
            + html_bars([f"L{l}" for l in self.layers], best, "best predictivity per layer (0.5 to 1)")
            + html_table(self.table(10), caption="most predictive neurons")
        )

    def prompt_accuracy(self, key: str = "dev_accuracy") -> float | None:
        vals = [float(m[key]) for m in self.run_metrics if m.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    def _top1pct_mask(self) -> torch.Tensor:
        return self.select(fraction=0.01) if self.d_mlp >= 100 else self.select(k=1)

    def summary(self, k: int = 10) -> dict[str, Any]:
        mask = self._top1pct_mask()
        return {
            "model": self.model,
            "task": self.task,
            "runs": self.runs,
            "best_predictivity": self.best_predictivity,
            "prompt_dev_accuracy": self.prompt_accuracy("dev_accuracy"),
            "prompt_test_accuracy": self.prompt_accuracy("test_accuracy"),
            "top1pct_mean_predictivity": float(self.predictivity[mask].mean()),
            "mean_predictivity": float(self.predictivity.mean()),
            "layer_best": [float(x) for x in self.predictivity.amax(1)],
            "n_constant": int(self.constant[0].all(1).sum()),
            "top": self.top(k),
            "statistics": self.statistics(top=k),
        }

    # --- persistence -----------------------------------------------------
    def save(self, path: str | Path) -> Path:

        path = Path(path)
        if not distributed.is_main():  # under torchrun rank 0 writes; the others wait for it
            distributed.barrier()
            return path
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            "predictivity": self.predictivity.float().contiguous(),
            "per_position": self.per_position.float().contiguous(),
            "per_subtask": self.per_subtask.float().contiguous(),
            "accuracy": self.accuracy.double().contiguous(),
            "baseline": self.baseline.double().contiguous(),
            "std": self.std.float().contiguous(),
            "constant": self.constant.to(torch.uint8).contiguous(),
            **{f"counts.{k}": v.to(torch.int32).contiguous() for k, v in self.counts.items()},
        }
        atomic_tensors(path / PREDICTIVITY_FILE, tensors)
        info = {
            "model": self.model,
            "task": self.task,
            "runs": self.runs,
            "label_names": self.label_names,
            "label_words": self.label_words,
            "subtasks": [s.to_dict() for s in self.subtasks],
            "layers": self.layers,
            "positions": self.positions,
            "aggregate_runs": self.aggregate_runs,
            "aggregate_subtasks": self.aggregate_subtasks,
            "run_metrics": self.run_metrics,
            "meta": self.meta,
            "class_counts": self.class_counts,
            **{k: v for k, v in self.summary(k=100).items() if k not in ("model", "task", "runs")},
        }
        atomic_json(path / NEURONS_JSON, info)
        distributed.barrier()
        return path

    @classmethod
    def load(cls, path: str | Path) -> SkillNeurons:
        path = Path(path)
        missing = [f for f in (PREDICTIVITY_FILE, NEURONS_JSON) if not (path / f).exists()]
        if missing:
            raise NeuronsError(f"{path} holds no skill neurons: missing {', '.join(missing)}")
        where = path / NEURONS_JSON
        try:
            info = read_json(
                where,
                "skill-neurons file",
                {
                    "model": str,
                    "task": str,
                    "runs": list,
                    "label_names": list,
                    "label_words": list,
                    "subtasks": list,
                    "layers": list,
                    "positions": str,
                    "aggregate_runs": str,
                    "aggregate_subtasks": str,
                },
            )
            for key in ("runs", "label_names", "label_words"):
                check_str_list(info, key, f"skill-neurons file {where}")
            for sub in info["subtasks"]:
                if not isinstance(sub, dict):
                    raise FileFormatError(f"skill-neurons file {where}: each subtask must be an object")
                check_types(sub, {"name": str, "positive": list, "negative": list}, f"skill-neurons file {where}")
            if not all(isinstance(l, int) and not isinstance(l, bool) for l in info["layers"]):
                raise FileFormatError(f"skill-neurons file {where}: 'layers' must be a list of integers")
            t = read_tensors(path / PREDICTIVITY_FILE, "predictivity file", ["accuracy", "baseline", "std", "constant"])
        except FileFormatError as exc:
            raise NeuronsError(str(exc)) from None
        R, S, L = (t["accuracy"].shape + (0, 0, 0))[:3] if t["accuracy"].ndim == 5 else (-1, -1, -1)
        if (
            R < 1
            or len(info["subtasks"]) != S
            or len(info["layers"]) != L
            or t["baseline"].shape != (R, *t["accuracy"].shape[2:])
        ):
            raise NeuronsError(
                f"predictivity file {path / PREDICTIVITY_FILE}: tensor shapes (accuracy "
                f"{tuple(t['accuracy'].shape)}, baseline {tuple(t['baseline'].shape)}) do not fit {where} "
                f"({len(info['subtasks'])} subtask(s), {len(info['layers'])} layer(s))"
            )
        for name in ("accuracy", "baseline", "std"):
            bad = ~torch.isfinite(t[name].double())
            if bool(bad.any()):
                raise NeuronsError(
                    f"predictivity file {path / PREDICTIVITY_FILE}: {int(bad.sum())} {name} value(s) are NaN or "
                    "infinite; perturbation and pruning would carry them into the model. Find the neurons again"
                )
        return cls(
            model=info["model"],
            task=info["task"],
            runs=info["runs"],
            label_names=info["label_names"],
            label_words=info["label_words"],
            subtasks=[Subtask(s["name"], tuple(s["positive"]), tuple(s["negative"])) for s in info["subtasks"]],
            layers=info["layers"],
            positions=info["positions"],
            accuracy=t["accuracy"],
            baseline=t["baseline"],
            std=t["std"],
            constant=t["constant"].bool(),
            run_metrics=info.get("run_metrics", []),
            aggregate_runs=info["aggregate_runs"],
            aggregate_subtasks=info["aggregate_subtasks"],
            meta=info.get("meta", {}),
            counts={k[len("counts.") :]: v.long() for k, v in t.items() if k.startswith("counts.")},
            class_counts=info.get("class_counts", {}),
        )


_AGGREGATES = {"mean": lambda x: x.mean(0), "min": lambda x: x.amin(0), "max": lambda x: x.amax(0)}


def _aggregate(x: torch.Tensor, how: str, allowed: tuple[str, ...], what: str) -> torch.Tensor:
    """`x` reduced over its first axis by `how` (one of `allowed`)."""
    if how not in allowed:
        raise NeuronsError(f"unknown {what} aggregation {how!r}; use {' or '.join(repr(a) for a in allowed)}")
    return _AGGREGATES[how](x)


def _rank(scores: torch.Tensor) -> list[int]:
    """Indices best first; ties broken by index so rankings are reproducible."""
    return torch.sort(-scores.double(), stable=True).indices.tolist()


def random_mask_like(mask: torch.Tensor, seed: int) -> torch.Tensor:
    """Random neurons with the same count in each layer as `mask`."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(mask, dtype=torch.bool)
    for l, n in enumerate(mask.sum(1).tolist()):
        out[l, torch.randperm(mask.shape[1], generator=gen)[:n]] = True
    return out


def check_neurons_for_run(
    run: Run, neurons: SkillNeurons, model_name: str | None = None, error: type[Exception] = NeuronsError
) -> None:
    """Refuse skill neurons of another model, task or label words than `run` (and the model)."""
    if run.model_name != neurons.model or (model_name is not None and model_name != run.model_name):
        raise error(
            f"model mismatch: the run was tuned on {run.model_name!r}, the skill neurons come from "
            f"{neurons.model!r}" + (f", the model is {model_name!r}" if model_name else "")
        )
    if run.task_name != neurons.task:
        raise error(f"task mismatch: the run is for {run.task_name!r}, the skill neurons for {neurons.task!r}")
    if list(run.info["label_words"]) != list(neurons.label_words):
        raise error(f"label words differ: run {run.info['label_words']}, skill neurons {neurons.label_words}")
