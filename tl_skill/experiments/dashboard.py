"""Neuron dashboards: what each selected skill neuron does (the data; `tl_skill.viz.dashboard` draws it).

For the top skill neurons of a task, on the run's test examples (the runner's
`evaluation_task`), `dashboard_data` measures in one pass over the examples:

- each neuron's activation at its best prompt position on every example, by
  class, with its baseline, predictivity, p/q-values and held-out predictivity;
- the top- and bottom-activating examples with their label and the prompted
  model's prediction, and the neuron's activation at every position of those
  examples (input tokens and prompt positions);
- its direct effect on the label words: its output direction `W_out[i]`
  through the final normalisation with the scale frozen at each example's
  prediction position (TransformerLens' direct-logit-attribution convention:
  LayerNorm centres the direction, RMSNorm does not) onto the label words'
  unembedding rows: the logit of each label word per unit of activation at the
  prediction position, averaged over examples, and the mean contribution there;
- the accuracy change when this neuron alone is mean-ablated (or zeroed): one
  runner condition per neuron, beside the group effect of the ablation experiment.

`DashboardResult` holds all of it (`save`/`load`); the HTML is only drawn from it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tl_skill import compat, distributed
from tl_skill.compat import HookedRootModule
from tl_skill.errors import DashboardError, FileFormatError
from tl_skill.experiments.ablation import AblationResult
from tl_skill.experiments.causal import AttributionResult
from tl_skill.experiments.results import RunResult, scalars
from tl_skill.experiments.runner import Condition, EvalSet, ModelOrLoader, resolve_model, run_conditions
from tl_skill.files import claim_dir, rolls_back_claims, tensor_digest
from tl_skill.models import model_spec
from tl_skill.neurons import SkillNeurons, check_neurons_for_run
from tl_skill.perturb import Perturbation
from tl_skill.tuning.prompt import class_logits, iterate_batches, layout_for
from tl_skill.tuning.runs import Run
from tl_skill.units import (
    UnitSource,
    check_same_units,
    output_direction,
    output_norm,
    source_for_neurons,
    through_output_norm,
    unit_source,
)

log = logging.getLogger(__name__)

DASHBOARD_JSON = "dashboard.json"
ABLATION_MODES = ("mean", "zero")


@dataclasses.dataclass(frozen=True, repr=False)
class DashboardResult(RunResult):
    """Everything a neuron dashboard shows; saved as `dashboard.json` + `dashboard.safetensors`.

    `activations[e, k]` is neuron k's activation at its best prompt position on example e
    (the eval set's order), `labels[e]` / `predictions[e]` its class and the prompted model's.
    """

    FILE = DASHBOARD_JSON

    label_names: list[str]
    label_words: list[str]
    neurons: list[dict[str, Any]]
    activations: torch.Tensor
    labels: torch.Tensor
    predictions: torch.Tensor
    clean_accuracy: float
    ablation_mode: str = "mean"
    n_examples: int = 0
    group_effect: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __eq__(self, other) -> bool:
        if not isinstance(other, DashboardResult):
            return NotImplemented
        return self.to_dict() == other.to_dict() and all(
            torch.equal(getattr(self, n), getattr(other, n)) for n in ("activations", "labels", "predictions")
        )

    __hash__ = None  # type: ignore[assignment]

    def to_dataframe(self) -> Any:
        """One row per neuron shown: its plain entries — `layer`, `neuron`, `position`, `predictivity`,
        `direction`, `baseline`, `p_value`, `q_value`, `heldout_predictivity`, `hook_name`, `units`,
        `activation_at_prediction_mean`, `ablated_accuracy`, `ablation_delta` (ablated minus clean accuracy),
        `ablation_changed` (examples whose correctness flips) — then `direct_effect[<label>]`, the mean
        direct effect on each label word's logit."""
        import pandas as pd

        rows = []
        for n in self.neurons:
            row = scalars(n)
            for name, value in zip(self.label_names, n.get("direct_effect_mean") or []):
                row[f"direct_effect[{name}]"] = value
            rows.append(row)
        return pd.DataFrame(rows)

    def facts(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "task": self.task,
            "neurons": len(self.neurons),
            "examples": self.n_examples,
            "clean_accuracy": self.clean_accuracy,
        }


def _causal_of(attribution: AttributionResult | None, layer: int, unit: int) -> dict[str, Any]:
    """A neuron's attribution and, where it was verified, its patched and direct effect on the margin."""
    if attribution is None or layer not in attribution.layers:
        return {}
    verified = {(v["layer"], v["unit"]): v for v in attribution.verified}.get((layer, unit), {})
    return {
        "attribution": attribution.at(layer, unit),
        "patched_effect": verified.get("true_effect"),
        "direct_effect_on_margin": verified.get("direct_effect"),
    }


def _tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(t)]) for t in ids]


def direct_effect_per_unit(
    model: HookedRootModule,
    verbalizer,
    layer: int,
    neuron: int,
    scales: torch.Tensor,
    direction: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logit of each label word per unit of the neuron's activation at the prediction position, per example.

    Args:
        scales: the final normalisation's scale at each example's prediction position [N] (times the
            scale of the block's output norm there, where `direction` went through one).
        direction: the vector the unit adds to the residual stream per unit of activation
            (`units.output_direction`, through `units.through_output_norm` where the block normalises
            its output); default the MLP neuron's `W_out` row.

    Returns:
        [N, n_classes] (float64).
    """
    centre, gain, _ = compat.final_norm(model)
    v = (compat.mlp_out_vectors(model, layer)[neuron] if direction is None else direction).double().cpu()
    if centre:
        v = v - v.mean()
    W, _ = compat.unembedding(model)
    rows = W[verbalizer.token_ids.to(W.device)].detach().double().cpu()  # [C, d_model]
    per_unit = rows @ (v * gain.detach().double().cpu())  # [C]: before dividing by the scale
    return per_unit[None, :] / scales.double().cpu()[:, None]


def logit_lens(
    model: HookedRootModule, layer: int, neuron: int, k: int = 10, bins: int = 30, direction: torch.Tensor | None = None
) -> dict[str, Any]:
    """The tokens the neuron's output direction promotes and suppresses most (through the final norm's gain).

    Values are logits per unit of activation before the norm's scale (which divides them all alike).
    `direction`: the unit's residual-stream vector (default the MLP neuron's `W_out` row).
    """
    centre, gain, _ = compat.final_norm(model)
    v = (compat.mlp_out_vectors(model, layer)[neuron] if direction is None else direction).float()
    if centre:
        v = v - v.mean()
    W, _ = compat.unembedding(model)
    logits = (W.detach().float() @ (v.to(gain.device) * gain.float()).to(W.device)).cpu()
    order = torch.sort(logits, stable=True).indices
    pos, neg = order.flip(0)[:k].tolist(), order[:k].tolist()
    heights, edges = np.histogram(logits.numpy(), bins)
    return {
        "pos_str": _tokens(model.tokenizer, pos),
        "pos_values": [float(logits[i]) for i in pos],
        "neg_str": _tokens(model.tokenizer, neg),
        "neg_values": [float(logits[i]) for i in neg],
        "hist_heights": heights.tolist(),
        "hist_values": ((edges[:-1] + edges[1:]) / 2).tolist(),
    }


@torch.no_grad()
def _trace(
    model: HookedRootModule,
    es: EvalSet,
    prompt,
    chosen: list[tuple[int, int]],
    batch_size: int,
    progress: bool,
    source: UnitSource | None = None,
):
    """One pass: every chosen unit's activation at every position, prediction-position scales (of the final norm;
    of each chosen layer's output norm where the block has one, `units.output_norm`), predictions."""
    source = source or unit_source(model, "mlp")
    spec = model_spec(model)
    layout = layout_for(model, prompt.length, es.max_input_tokens, es.padding_side)
    centre, _, eps = compat.final_norm(model)
    n = len(es.task[es.split])
    by_layer: dict[int, list[int]] = {}
    for k, (l, _) in enumerate(chosen):
        by_layer.setdefault(l, []).append(k)
    seqs: list[dict | None] = [None] * n  # per example: token ids, prompt mask, [T, K] activations
    scales = torch.zeros(n, dtype=torch.float64)
    preds = np.zeros(n, dtype=np.int64)
    device = compat.model_device(model)
    grabbed: dict[str, torch.Tensor] = {}
    norms = {l: norm for l in by_layer if (norm := output_norm(model, source, l)) is not None}
    post_scales = {l: torch.zeros(n, dtype=torch.float64) for l in norms}

    def grab_layer(l):
        idx = torch.tensor([chosen[k][1] for k in by_layer[l]], device=device)

        def hook(act, hook):
            if source.name == "mlp":
                compat.check_hook_width(act, spec.d_mlp, compat.mlp_post_hook(l), DashboardError)
            else:
                source.check(act, source.hook(l), DashboardError)
            grabbed[f"units{l}"] = source.encode(source.flat(act.detach()))[..., idx].float().cpu()

        return hook

    def grab_norm(x, hook):
        grabbed["norm_in"] = x.detach()

    hooks = [(source.hook(l), grab_layer(l)) for l in sorted(by_layer)]
    norm_hook = (
        "ln_final.hook_in" if "ln_final.hook_in" in model.hook_dict else f"blocks.{spec.n_layers - 1}.hook_resid_post"
    )
    hooks.append((norm_hook, grab_norm))
    for l in post_scales:

        def grab_post(x, hook, l=l):
            grabbed[f"post{l}"] = x.detach()

        hooks.append((norms[l]["hook"], grab_post))
    bar = tqdm(total=n, desc="dashboard: trace", disable=not progress, leave=False, unit="ex")
    for idx, batch in iterate_batches(layout, es.task, es.split, batch_size):
        batch = batch.to(device)
        logits = class_logits(model, batch, es.verbalizer, prompt.to(device), hooks)
        preds[idx] = logits.argmax(-1).cpu().numpy()
        rows = torch.arange(len(idx), device=batch.pred_pos.device)
        scales[torch.as_tensor(idx)] = compat.norm_scale(grabbed["norm_in"][rows, batch.pred_pos], centre, eps).cpu()
        for l, ps in post_scales.items():
            ps[torch.as_tensor(idx)] = norms[l]["scale"](grabbed[f"post{l}"][rows, batch.pred_pos]).cpu()
        acts = torch.zeros(*batch.input_ids.shape, len(chosen))
        for l, ks in by_layer.items():
            acts[..., ks] = grabbed[f"units{l}"]
        is_prompt = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
        is_prompt[torch.arange(len(idx))[:, None], batch.prompt_positions().cpu()] = True
        mask = batch.attention_mask.bool().cpu()
        for r, e in enumerate(idx):
            keep = mask[r]
            seqs[int(e)] = {
                "ids": batch.input_ids[r].cpu()[keep].tolist(),
                "prompt": is_prompt[r][keep].tolist(),
                "acts": acts[r][keep],  # padding dropped: positions of the real sequence
                "pred_pos": int(batch.pred_pos[r]) - int((~keep[: int(batch.pred_pos[r])]).sum()),
            }
        bar.update(len(idx))
    bar.close()
    return seqs, scales, post_scales, preds


def check_ablation_of(ablation: AblationResult, run: Run, neurons: SkillNeurons) -> None:
    """Refuse an ablation result of another run (another prompt) or other skill neurons: its group
    effects would be shown as this run's."""
    settings = ablation.settings or {}
    prompt, found = settings.get("run_prompt"), settings.get("neurons")
    mine = tensor_digest(run.prompt.vectors)
    if (ablation.model, ablation.task) != (run.model_name, run.task_name) or (prompt is not None and prompt != mine):
        raise DashboardError(
            f"the ablation result is of another run (run {ablation.run}, prompt {prompt}) than {run.path} "
            f"(prompt {mine}): its group effects would be shown as this run's"
        )
    if found is not None and found != tensor_digest(neurons.predictivity):
        raise DashboardError("the ablation result perturbed other skill neurons than these (their digests differ)")


@rolls_back_claims
def dashboard_data(
    model: ModelOrLoader,
    run: Run | str | Path,
    neurons: SkillNeurons | str | Path,
    out: str | Path | None = None,
    top: int = 20,
    max_examples: int | None = 200,
    n_examples: int = 10,
    ablation_mode: str = "mean",
    ablation: AblationResult | str | Path | None = None,
    batch_size: int = 32,
    progress: bool = True,
    units: str | UnitSource | None = None,
    attribution: AttributionResult | str | Path | None = None,
) -> DashboardResult:
    """The data of the top `top` skill neurons' dashboards (module docstring).

    Args:
        model: the model, or a function returning it (called once `out` has been accepted).
        out: directory for `dashboard.json`/`.safetensors` and the single-neuron ablations
            (`conditions/`); refused before any work if it holds anything else.
        max_examples: test examples of the run (`experiments.runner.evaluation_task`).
        n_examples: top- and bottom-activating examples shown per neuron.
        ablation_mode: "mean" (the neuron's baseline) or "zero".
        ablation: the ablation experiment of the same run and neurons, for the group effect.
        units: the unit source to trace (default: the one the skill neurons were found on;
            another only for the same units, e.g. an SAE directory that moved).
        attribution: the attribution experiment of the same run (`experiments.causal`): each neuron's
            attribution, and its patched effect on the margin where it was verified.
    """
    run = run if isinstance(run, Run) else Run.load(run)
    neurons = neurons if isinstance(neurons, SkillNeurons) else SkillNeurons.load(neurons)
    check_neurons_for_run(run, neurons, None, DashboardError)
    check_same_units(neurons.units, units, DashboardError)
    if top < 1 or n_examples < 1 or batch_size < 1 or (max_examples is not None and max_examples < 1):
        raise DashboardError(
            f"top, n_examples, batch_size and max_examples must be >= 1 "
            f"(got {top}, {n_examples}, {batch_size}, {max_examples})"
        )
    if ablation_mode not in ABLATION_MODES:
        raise DashboardError(f"ablation_mode must be one of {ABLATION_MODES}, got {ablation_mode!r}")
    if ablation is not None and not isinstance(ablation, AblationResult):
        try:
            ablation = AblationResult.load(ablation)
        except FileFormatError as exc:
            raise DashboardError(f"--ablation: {exc}") from None
    if ablation is not None:
        check_ablation_of(ablation, run, neurons)
    if attribution is not None and not isinstance(attribution, AttributionResult):
        try:
            attribution = AttributionResult.load(attribution)
        except FileFormatError as exc:
            raise DashboardError(f"--attribution: {exc}") from None
    if attribution is not None and (
        attribution.run != str(run.path) or attribution.task != run.task_name or attribution.units != neurons.units
    ):
        raise DashboardError(
            f"the attribution is of run {attribution.run} ({attribution.task}, {attribution.units} units), not of "
            f"{run.path} ({run.task_name}, {neurons.units} units)"
        )
    identity = {
        "model": run.model_name,
        "task": run.task_name,
        "run_prompt": tensor_digest(run.prompt.vectors),
        "neurons": tensor_digest(neurons.predictivity),
        "top": top,
        "test_examples": max_examples,
        "n_examples": n_examples,
        "ablation_mode": ablation_mode,
        **({} if attribution is None else {"attribution": tensor_digest(attribution.attribution)}),
        **(
            {}
            if neurons.units == "mlp" and units in (None, "mlp")
            else {"units": units.name if isinstance(units, UnitSource) else (units or neurons.units)}
        ),
    }
    if out is not None:
        out = claim_dir(out, "dashboard", identity)
    model = resolve_model(model)
    spec = model_spec(model)
    check_neurons_for_run(run, neurons, spec.name, DashboardError)
    source = source_for_neurons(model, neurons, units, DashboardError)
    es = EvalSet.of_run(run, model, max_examples)
    labels = es.task.labels("test")
    chosen_rows = neurons.top(top)
    chosen = [(r["layer"], r["neuron"]) for r in chosen_rows]
    seqs, scales, post_scales, preds = _trace(model, es, run.prompt, chosen, batch_size, progress, source)
    n = len(seqs)
    # activation at the best prompt position: the prompt positions of each example, in order
    best = torch.zeros(n, len(chosen))
    for e, s in enumerate(seqs):
        where = [t for t, p in enumerate(s["prompt"]) if p]
        for k, r in enumerate(chosen_rows):
            best[e, k] = s["acts"][where[r["position"]], k]

    # single-neuron ablations (and the clean condition) through the runner
    conds = [Condition("clean", {"perturbation": None}, run.prompt)]
    for l, i in chosen:

        def hooks(m, l=l, i=i):
            return Perturbation(m, [(l, i)], ablation_mode, skill=neurons, units=source).fwd_hooks()

        conds.append(
            Condition(f"L{l}.{i}", {"perturbation": {"mode": ablation_mode, "neuron": [l, i]}}, run.prompt, hooks)
        )
    results = run_conditions(
        conds,
        {"model": model},
        {"test": es},
        out=out,
        variants={"model": spec.name},
        batch_size=batch_size,
        progress=progress,
        desc="dashboard: single-neuron ablations",
    )
    clean = results["clean"]

    p = neurons.p_value() if neurons.has_counts() else None
    q = neurons.q_value() if neurons.has_counts() else None
    held = neurons.heldout_predictivity() if neurons.has_counts("confirm") else None
    slot = {l: s for s, l in enumerate(neurons.layers)}
    rows_out = []
    for k, (r, (l, i)) in enumerate(zip(chosen_rows, chosen)):
        order = torch.sort(best[:, k].double(), stable=True).indices
        picks = {"top": order.flip(0)[:n_examples].tolist(), "bottom": order[:n_examples].tolist()}
        direction = output_direction(model, source, l, i)
        if direction is not None:  # through the block's output norm, if any, its scale held as the final norm's
            direction = through_output_norm(direction, output_norm(model, source, l))
        unit_scales = scales * post_scales[l] if l in post_scales else scales
        effect = (
            None if direction is None else direct_effect_per_unit(model, es.verbalizer, l, i, unit_scales, direction)
        )
        at_pred = torch.tensor([float(s["acts"][s["pred_pos"], k]) for s in seqs], dtype=torch.float64)
        abl = results[f"L{l}.{i}"]
        rows_out.append(
            {
                **r,
                "baseline": float(neurons.baseline[:, slot[l], r["position"], i].double().mean()),
                "p_value": None if p is None else float(p[slot[l], i]),
                "q_value": None if q is None else float(q[slot[l], i]),
                "heldout_predictivity": None if held is None else float(held[slot[l], i]),
                "hook_name": source.hook(l),
                "units": source.name,
                **(
                    {"head": i // int(model.cfg.d_head), "head_dim": i % int(model.cfg.d_head)}
                    if source.name == "attn"
                    else {}
                ),
                "direct_effect_per_unit": None if effect is None else effect.mean(0).tolist(),
                "direct_effect_mean": None if effect is None else (effect * at_pred[:, None]).mean(0).tolist(),
                "activation_at_prediction_mean": float(at_pred.mean()),
                "logit_lens": None if direction is None else logit_lens(model, l, i, direction=direction),
                **_causal_of(attribution, l, i),
                "ablated_accuracy": abl.accuracy,
                "ablation_delta": abl.accuracy - clean.accuracy,
                "ablation_changed": int(sum(a != b for a, b in zip(abl.correct, clean.correct))),
                "examples": {
                    side: [
                        {
                            "index": int(e),
                            "label": int(labels[e]),
                            "prediction": int(preds[e]),
                            "value": float(best[e, k]),
                            "tokens": _tokens(model.tokenizer, seqs[e]["ids"]),
                            "is_prompt": seqs[e]["prompt"],
                            "values": [float(v) for v in seqs[e]["acts"][:, k]],
                        }
                        for e in idx
                    ]
                    for side, idx in picks.items()
                },
            }
        )
    group = []
    if ablation is not None:
        group = [
            {
                "fraction": row["fraction"],
                "n_neurons": row["n_neurons"],
                "delta": None if row["skill_accuracy"] is None else row["skill_accuracy"] - row["clean_accuracy"],
                "random_delta": None
                if row["random_accuracy"] is None
                else row["random_accuracy"] - row["clean_accuracy"],
            }
            for row in ablation.rows
        ]
    result = DashboardResult(
        model=spec.name,
        task=run.task_name,
        run=str(run.path),
        label_names=list(neurons.label_names),
        label_words=list(neurons.label_words),
        neurons=rows_out,
        activations=best,
        labels=torch.tensor(np.asarray(labels), dtype=torch.long),
        predictions=torch.tensor(preds, dtype=torch.long),
        clean_accuracy=clean.accuracy,
        ablation_mode=ablation_mode,
        n_examples=n,
        group_effect=group,
        settings={**identity, "batch_size": batch_size},
    )
    result = DashboardResult(
        **{**result.to_dict(), "activations": best, "labels": result.labels, "predictions": result.predictions}
    )
    if out is not None and distributed.is_main():  # under torchrun rank 0 writes the result
        result.save(out)
    return result
