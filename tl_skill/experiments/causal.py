"""From predictive to causal: attribution verified by patching, direct effects, the predictive-vs-causal report,
and steering (method, "Beyond the paper").

`attribution_experiment` runs `attribution.attribute` on the evaluation examples (the run's test set, as the
ablation experiment) and on dev, then:

- **verification**: for the top-k units by |attribution| and the top-k by predictivity, the true effect of
  mean-ablating each unit alone (every position, `perturb.Perturbation` mode "mean") on the margin m, on the
  same examples; Spearman correlation and sign agreement of attribution vs true effect, and the units whose
  true effect is large but whose attribution is small (attribution patching's false negatives: |true| in
  the top quarter of the verified units and |attribution| under half of |true|);
- **direct effect** of the same mean-ablation through the unit's output direction alone, the final
  normalisation's scale held (as the dashboards compute it), on m;
- **evidence**: per layer, Spearman of predictivity vs |attribution|; the overlap of the top 1% by each
  against chance; the 2x2 counts of units that are predictive (FDR-significant predictivity) and/or causal
  (|attribution| at or above the dev split's top-1% threshold on dev, and again on the evaluation
  examples with the same sign).

`steering_experiment` clamps the top units (per-layer fractions, as the ablation experiment selects) towards
another class's conditional mean — `a + s * (mean_c - a)` for strength s — at each unit's selected prompt
position (or every prompt position, or every position), and counts predictions that flip to class c, over
every example whose unperturbed prediction is not c and every class c; against as many random units per
layer (several seeds), with the ablation's paired test (`ablation.paired_comparison`: bootstrap CI of
skill minus random flip rate, McNemar per seed). Conditions go through `experiments.runner`, so reruns
resume.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tl_skill import compat, distributed
from tl_skill.attribution import Attribution, attribute, examples_of, margins, unit_baselines
from tl_skill.compat import HookedRootModule
from tl_skill.errors import AttributionError, TLSkillError
from tl_skill.experiments.ablation import paired_comparison
from tl_skill.experiments.results import RunResult
from tl_skill.experiments.runner import Condition, EvalSet, ModelOrLoader, resolve_model, run_conditions
from tl_skill.files import claim_dir, json_text, rolls_back_claims, tensor_digest
from tl_skill.models import model_spec
from tl_skill.neurons import SkillNeurons, check_neurons_for_run, random_mask_like
from tl_skill.perturb import Perturbation
from tl_skill.record import MomentStats, Recorder
from tl_skill.stats import spearman
from tl_skill.tuning.prefix import use_prefix_cache
from tl_skill.tuning.prompt import Verbalizer, class_logits, iterate_batches, layout_for
from tl_skill.tuning.runs import Run
from tl_skill.units import output_direction, output_norm, through_output_norm, unit_source

log = logging.getLogger(__name__)

ATTRIBUTION_JSON = "attribution.json"
STEERING_JSON = "steering.json"
POSITIONS = ("selected", "prompt", "all")


# ----------------------------------------------------------------------------- attribution, verified
@dataclasses.dataclass(frozen=True, repr=False)
class AttributionResult(RunResult):
    """What `attribution_experiment` found; saved as `attribution.json` + `attribution.safetensors`."""

    FILE = ATTRIBUTION_JSON

    split: str
    n_examples: int
    units: str
    layers: list[int]
    label_names: list[str]
    mean_margin: float
    verified: list[dict[str, Any]]
    agreement: dict[str, Any]
    evidence: dict[str, Any]
    attribution: torch.Tensor  # [L, D] mean total attribution on the evaluation examples
    abs_attribution: torch.Tensor  # [L, D] mean |attribution|
    prompt_attribution: torch.Tensor  # [L, P, D]
    dev_attribution: torch.Tensor  # [L, D] the same on dev (the causal threshold's split)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    wall_seconds: float = 0.0

    COLUMNS = (
        "layer",
        "unit",
        "picked_by",
        "predictivity",
        "attribution",
        "true_effect",
        "direct_effect",
        "abs_attribution",
    )

    def to_dataframe(self) -> Any:
        """One row per verified unit (`COLUMNS`): chosen by attribution and/or predictivity, its mean attribution,
        the true effect of mean-ablating it alone on the margin, its direct effect; largest |true effect| first."""
        import pandas as pd

        frame = pd.DataFrame(self.verified, columns=list(self.COLUMNS))
        return frame.iloc[np.argsort(-frame["true_effect"].abs().to_numpy(), kind="stable")].reset_index(drop=True)

    def facts(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "task": self.task,
            "examples": self.n_examples,
            "spearman": self.agreement.get("spearman"),
            "sign_agreement": self.agreement.get("sign_agreement"),
        }

    def at(self, layer: int, unit: int) -> float:
        return float(self.attribution[self.layers.index(layer), unit])


def _margins_under(
    model: HookedRootModule, run: Run, data, split: str, hooks: Sequence, labels_other: torch.Tensor | None, bs: int
) -> torch.Tensor:
    """Margin of every example of `split` (in the split's stable order) with `hooks` attached; with
    `labels_other`, m = logit(true) - logit(that class) instead of the best other class."""
    cfg = run.config
    layout = layout_for(model, run.prompt.length, cfg.max_input_tokens, cfg.padding_side)
    verbalizer = Verbalizer(model.tokenizer, run.info["label_words"])
    device = compat.model_device(model)
    prompt = run.prompt.to(device)
    out = torch.zeros(len(data[split]), dtype=torch.float64)
    with torch.no_grad():
        for idx, batch in iterate_batches(layout, data, split, bs):
            batch = batch.to(device)
            assert batch.labels is not None
            logits = class_logits(model, batch, verbalizer, prompt, hooks).double()
            if labels_other is None:
                m = margins(logits, batch.labels)
            else:
                other = labels_other[torch.as_tensor(idx)].to(logits.device)
                m = logits.gather(1, batch.labels[:, None])[:, 0] - logits.gather(1, other[:, None])[:, 0]
            out[torch.as_tensor(idx)] = m.cpu()
    return out


def _clean_others(model: HookedRootModule, run: Run, data, split: str, bs: int) -> torch.Tensor:
    """Per example, the best other class under the unperturbed prompted model (what m compares with)."""
    cfg = run.config
    layout = layout_for(model, run.prompt.length, cfg.max_input_tokens, cfg.padding_side)
    verbalizer = Verbalizer(model.tokenizer, run.info["label_words"])
    device = compat.model_device(model)
    others = torch.zeros(len(data[split]), dtype=torch.long)
    with torch.no_grad():
        for idx, batch in iterate_batches(layout, data, split, bs):
            batch = batch.to(device)
            assert batch.labels is not None
            logits = class_logits(model, batch, verbalizer, run.prompt.to(device)).double()
            logits.scatter_(1, batch.labels[:, None], float("-inf"))
            others[torch.as_tensor(idx)] = logits.argmax(1).cpu()
    return others


def _direct_effects(
    model: HookedRootModule,
    run: Run,
    neurons: SkillNeurons,
    data,
    split: str,
    units: list[tuple[int, int]],
    others: torch.Tensor,
    bs: int,
) -> dict[tuple[int, int], float | None]:
    """Mean over examples of the direct effect on m of moving each unit to its baseline at the prediction
    position: (b - a) * (row(true) - row(other)) . (direction * gain) / scale, the scale held (where the block
    normalises the unit's output first, `units.output_norm`, through that norm too, its scale held)."""
    source = unit_source(model, neurons.units)
    base = unit_baselines(neurons)
    centre, gain, eps = compat.final_norm(model)
    W, _ = compat.unembedding(model)
    verbalizer = Verbalizer(model.tokenizer, run.info["label_words"])
    rows = W[verbalizer.token_ids.to(W.device)].detach().double().cpu()  # [C, d_model]
    per_unit: dict[tuple[int, int], torch.Tensor | None] = {}
    post = {l: output_norm(model, source, l) for l, _ in units}
    posts = {l: norm for l, norm in post.items() if norm is not None}
    for l, i in units:
        d = output_direction(model, source, l, i)
        if d is None:
            per_unit[(l, i)] = None
            continue
        v = through_output_norm(d, post[l])
        if centre:
            v = v - v.mean()
        per_unit[(l, i)] = rows @ (v * gain.detach().double().cpu())  # [C]
    layers = sorted({l for l, _ in units})
    cfg = run.config
    layout = layout_for(model, run.prompt.length, cfg.max_input_tokens, cfg.padding_side)
    device = compat.model_device(model)
    sums = dict.fromkeys(units, 0.0)
    grabbed: dict[str, torch.Tensor] = {}
    norm_hook = (
        "ln_final.hook_in"
        if "ln_final.hook_in" in model.hook_dict
        else f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    )

    def grab(name: str):
        def fn(x: torch.Tensor, hook: Any) -> None:
            grabbed[name] = x.detach()

        return fn

    hooks = [(source.hook(l), grab(f"u{l}")) for l in layers] + [(norm_hook, grab("norm"))]
    hooks += [(norm["hook"], grab(f"post{l}")) for l, norm in posts.items()]
    with torch.no_grad():
        for idx, batch in iterate_batches(layout, data, split, bs):
            batch = batch.to(device)
            assert batch.labels is not None
            class_logits(model, batch, verbalizer, run.prompt.to(device), hooks)
            r = torch.arange(batch.input_ids.shape[0], device=device)
            pred = batch.pred_pos.to(device)
            scale = compat.norm_scale(grabbed["norm"][r, pred], centre, eps).cpu()
            post_scale = {l: norm["scale"](grabbed[f"post{l}"][r, pred]).cpu() for l, norm in posts.items()}
            labels = batch.labels.cpu()
            other = others[torch.as_tensor(idx)]
            for l, i in units:
                pu = per_unit[(l, i)]
                if pu is None:
                    continue
                a = source.flat(grabbed[f"u{l}"])[r, pred, i].double().cpu()
                b = float(base[neurons.layers.index(l), i])
                s = scale * post_scale[l] if l in post_scale else scale
                sums[(l, i)] += float(((b - a) * (pu[labels] - pu[other]) / s).sum())
    n = len(data[split])
    return {u: (None if per_unit[u] is None else sums[u] / n) for u in units}


def _agreement(verified: list[dict[str, Any]]) -> dict[str, Any]:
    attr = np.array([v["attribution"] for v in verified])
    true = np.array([v["true_effect"] for v in verified])
    out: dict[str, Any] = {"n_units": len(verified)}
    if len(verified) >= 3 and np.ptp(attr) > 0 and np.ptp(true) > 0:
        out["spearman"] = spearman(attr, true)
        out["pearson"] = float(np.corrcoef(attr, true)[0, 1])
    else:
        out["spearman"] = out["pearson"] = None
    moved = np.abs(true) > 0
    out["sign_agreement"] = float(np.mean(np.sign(attr[moved]) == np.sign(true[moved]))) if moved.any() else None
    big = np.abs(true) >= np.quantile(np.abs(true), 0.75) if len(true) else np.zeros(0, bool)
    fn = [v for v, b in zip(verified, big) if b and abs(v["attribution"]) < abs(v["true_effect"]) / 2]
    out["false_negatives"] = [{k: v[k] for k in ("layer", "unit", "attribution", "true_effect")} for v in fn]
    out["rule_false_negative"] = "|true effect| in the top quarter of the verified units and |attribution| < |true| / 2"
    return out


def compare_evidence(
    neurons: SkillNeurons, attribution: Attribution, dev: Attribution | None = None, q: float = 0.05, top: float = 0.01
) -> dict[str, Any]:
    """Where predictive and causal rankings agree (module docstring, "evidence")."""
    rows = [neurons.layers.index(l) for l in attribution.layers]
    pred = neurons.predictivity[rows].double()
    score = attribution.mean.abs()
    per_layer = {}
    for r, l in enumerate(attribution.layers):
        a, p = score[r].numpy(), pred[r].numpy()
        per_layer[str(l)] = spearman(p, a) if np.ptp(a) > 0 and np.ptp(p) > 0 else None
    N = score.numel()
    k = max(1, int(round(top * N)))
    top_pred = set(torch.argsort(pred.reshape(-1), descending=True, stable=True)[:k].tolist())
    top_attr = set(torch.argsort(score.reshape(-1), descending=True, stable=True)[:k].tolist())
    overlap = len(top_pred & top_attr)
    out: dict[str, Any] = {
        "spearman_per_layer": per_layer,
        "top_fraction": top,
        "top_k": k,
        "top_overlap": overlap,
        "top_overlap_chance": k * k / N,
        "top_overlap_ratio": overlap / (k * k / N),
    }
    if dev is not None and neurons.has_counts("eval"):
        sig = neurons.significant(q)[rows]
        d = dev.mean
        tau = float(torch.sort(d.abs().reshape(-1), descending=True).values[k - 1])
        causal = (d.abs() >= tau) & (attribution.mean.abs() >= tau) & (torch.sign(d) == torch.sign(attribution.mean))
        out["causal_rule"] = (
            f"|attribution| >= {tau:.3g} (the top {top:.0%} on dev) on dev and on the evaluation examples, same sign"
        )
        out["counts"] = {
            "predictive_and_causal": int((sig & causal).sum()),
            "predictive_only": int((sig & ~causal).sum()),
            "causal_only": int((~sig & causal).sum()),
            "neither": int((~sig & ~causal).sum()),
        }
        n_sig, n_causal = int(sig.sum()), int(causal.sum())
        out["counts"]["expected_both_if_independent"] = n_sig * n_causal / N
    return out


@rolls_back_claims
def attribution_experiment(
    model: ModelOrLoader,
    run: Run | str | Path,
    neurons: SkillNeurons | str | Path,
    out: str | Path | None = None,
    *,
    k: int = 20,
    max_examples: int | None = None,
    dev_examples: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> AttributionResult:
    """Attribution on the run's test examples, verified by patching, with direct effects and the comparison with
    predictivity (module docstring). `max_examples` caps the test examples (as in `ablation_experiment`),
    `dev_examples` the dev examples of the causal threshold; `k` units are verified per ranking."""
    t0 = time.perf_counter()
    neurons = neurons if isinstance(neurons, SkillNeurons) else SkillNeurons.load(neurons)
    run = run if isinstance(run, Run) else Run.load(run)
    if not isinstance(k, int) or k < 1:
        raise AttributionError(f"k must be >= 1, got {k!r}")
    check_neurons_for_run(run, neurons, None, AttributionError)
    identity = {
        "run": str(run.path),
        "run_prompt": tensor_digest(run.prompt.vectors),
        "neurons": list(neurons.runs),
        "units": neurons.units,
        "k": k,
        "test_examples": max_examples,
        "dev_examples": dev_examples,
    }
    if out is not None:
        out = claim_dir(out, "attribution", identity)
        done = _finished_attribution(out, identity)
        if done is not None:
            return done
    model = resolve_model(model)
    check_neurons_for_run(run, neurons, model_spec(model).name, AttributionError)
    task = run.load_task()
    test = attribute(model, run, neurons, "test", max_examples, batch_size=batch_size, task=task, progress=progress)
    dev = attribute(model, run, neurons, "dev", dev_examples, batch_size=batch_size, task=task, progress=progress)
    data = examples_of(run, "test", max_examples, task)
    D = neurons.d_mlp
    by_attr = test.top(k)
    order = torch.argsort(neurons.predictivity.reshape(-1), descending=True, stable=True)[:k].tolist()
    by_pred = [(neurons.layers[int(f) // D], int(f) % D) for f in order]
    units = list(dict.fromkeys(by_attr + by_pred))
    others = _clean_others(model, run, data, "test", batch_size)
    clean = _margins_under(model, run, data, "test", (), others, batch_size)
    bar = tqdm(total=len(units), desc="attribution: patch each unit", disable=not progress, unit="unit")
    verified: list[dict[str, Any]] = []
    for l, i in units:
        hooks = Perturbation(model, [(l, i)], "mean", skill=neurons).fwd_hooks()
        patched = _margins_under(model, run, data, "test", hooks, others, batch_size)
        verified.append(
            {
                "layer": l,
                "unit": i,
                "picked_by": "both"
                if (l, i) in by_attr and (l, i) in by_pred
                else ("attribution" if (l, i) in by_attr else "predictivity"),
                "predictivity": neurons.predictivity_at(l, i),
                "attribution": test.at(l, i),
                "abs_attribution": float(test.mean_abs[test.row_of(l), i]),
                "true_effect": float((patched - clean).mean()),
            }
        )
        bar.update(1)
    bar.close()
    direct = _direct_effects(model, run, neurons, data, "test", units, others, batch_size)
    for v in verified:
        v["direct_effect"] = direct[(v["layer"], v["unit"])]
    result = AttributionResult(
        model=test.model,
        task=test.task,
        run=str(run.path),
        split="test",
        n_examples=test.n,
        units=test.units,
        layers=test.layers,
        label_names=test.label_names,
        mean_margin=test.margin,
        verified=verified,
        agreement=_agreement(verified),
        evidence=compare_evidence(neurons, test, dev),
        attribution=test.mean.float(),
        abs_attribution=test.mean_abs.float(),
        prompt_attribution=test.per_prompt_position.float(),
        dev_attribution=dev.mean.float(),
        settings={**identity, "batch_size": batch_size, "n_dev": dev.n},
        wall_seconds=time.perf_counter() - t0,
    )
    if out is not None and distributed.is_main():
        result.save(out)
    return result


def _finished_attribution(out: Path, identity: dict[str, Any]) -> AttributionResult | None:
    """The result a finished run of the same settings left in `out` (claim_dir checked the settings), or None
    when there is none or it cannot be read (then it is computed again, with a warning)."""
    if not (out / ATTRIBUTION_JSON).exists():
        return None
    try:
        done = AttributionResult.load(out)
    except (TLSkillError, OSError) as e:
        log.warning("%s: not reusable (%s); computing it again", out / ATTRIBUTION_JSON, e)
        return None
    if json_text({k: done.settings.get(k) for k in identity}) != json_text(identity):
        log.warning("%s: written with other settings; computing it again", out / ATTRIBUTION_JSON)
        return None
    log.info("%s: finished with these settings; reusing it", out / ATTRIBUTION_JSON)
    return done


# ----------------------------------------------------------------------------- steering
@dataclasses.dataclass(frozen=True, repr=False)
class SteeringResult(RunResult):
    """What `steering_experiment` measured; saved as `steering.json`."""

    FILE = STEERING_JSON

    positions: str
    fractions: list[float]
    strengths: list[float]
    seeds: list[int]
    n_examples: int
    n_pairs: int  # (example, target class) pairs whose unperturbed prediction is not the target
    clean_accuracy: float
    rows: list[dict[str, Any]]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    wall_seconds: float = 0.0

    COLUMNS = (
        "fraction",
        "strength",
        "n_units",
        "skill_flip_rate",
        "random_flip_rate",
        "random_flip_rate_std",
        "difference",
        "ci_low",
        "ci_high",
        "mcnemar_p_max",
        "skill_flips_more",
    )

    def to_dataframe(self) -> Any:
        """One row per (fraction, strength) (`COLUMNS`): the share of (example, target class) pairs whose
        prediction flips to the target, skill vs random units, and the paired test."""
        import pandas as pd

        out = []
        for r in self.rows:
            p = r["paired"]
            out.append(
                {
                    **{c: r[c] for c in self.COLUMNS[:6]},
                    "difference": p["difference"],
                    "ci_low": p["ci_low"],
                    "ci_high": p["ci_high"],
                    "mcnemar_p_max": max(p["mcnemar_p"]),
                    "skill_flips_more": p["ci_low"] > 0,
                }
            )
        return pd.DataFrame(out, columns=list(self.COLUMNS))

    def _strength(self, strength: float | None) -> float:
        """`strength`, or by default 1 (the class mean itself) where it was run, else the first one run."""
        if strength is not None:
            return strength
        return 1.0 if 1.0 in self.strengths else self.strengths[0]

    def half_flip_fraction(self, strength: float | None = None) -> float | None:
        """The smallest fraction at which steering the skill units flips at least half the pairs (None: never,
        or that strength was not run). `strength`: default 1, or the first one run."""
        s = self._strength(strength)
        hits = [r["fraction"] for r in self.rows if r["strength"] == s and r["skill_flip_rate"] >= 0.5]
        return min(hits) if hits else None

    def verdict(self, strength: float | None = None) -> str:
        """Whether skill units flip more predictions than random ones at every fraction ("holds"), at some
        ("partly") or at none ("does not hold"); "not run" for a strength that was not run."""
        rows = [r for r in self.rows if r["strength"] == self._strength(strength)]
        if not rows:
            return "not run"
        more = [r["fraction"] for r in rows if r["paired"]["ci_low"] > 0]
        return "holds" if len(more) == len(rows) else ("partly" if more else "does not hold")

    def facts(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "task": self.task,
            "positions": self.positions,
            "strength": self._strength(None),
            "verdict": self.verdict(),
            "half_flip_fraction": self.half_flip_fraction(),
        }


def _paired_flips(skill: Sequence[int], randoms: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The ablation's paired test on flip indicators: here more is stronger, so the flag is
    `skill_flips_more` (the CI of skill minus random flip rate lies above 0), not the ablation's
    `skill_hurts_more`."""
    p = paired_comparison(skill, randoms)
    p.pop("skill_hurts_more")
    return {**p, "skill_flips_more": p["ci_low"] > 0}


def class_means(
    model: HookedRootModule, run: Run, neurons: SkillNeurons, max_examples: int | None = None, batch_size: int = 16
) -> torch.Tensor:
    """[C, rows, P, D]: each class's mean activation of every unit at each prompt position, on the train split
    (at most `max_examples`, default as many as the neurons' baselines came from), with the run's prompt:
    exact sums, as the baselines."""
    if max_examples is None:
        max_examples = neurons.meta.get("max_train_examples")  # the examples the baselines came from
    data = examples_of(run, "train", max_examples)
    cfg = run.config
    layout = layout_for(model, run.prompt.length, cfg.max_input_tokens, cfg.padding_side)
    source = unit_source(model, neurons.units)
    n_classes = len(run.info["label_words"])
    stats = MomentStats(n_classes, len(neurons.layers), run.prompt.length, source.width)
    rec = Recorder(model, stats, layers=neurons.layers, positions="prompt", units=source)
    device = compat.model_device(model)
    with rec.attached():
        for _, batch in iterate_batches(layout, data, "train", batch_size, shard=True):
            rec.run(batch.to(device), run.prompt.to(device))
    distributed.reduce_stats(stats)
    return torch.stack([stats.mean([c]) for c in range(n_classes)])


def _steering_hooks(
    model: HookedRootModule,
    neurons: SkillNeurons,
    mask: torch.Tensor,
    target_means: torch.Tensor,
    strength: float,
    positions: str,
    prompt_length: int,
    offset: int | None,
) -> list[tuple[str, Any]]:
    """Hooks moving the masked units towards `target_means` [rows, P, D]: a + s (mean - a)."""
    source = unit_source(model, neurons.units)
    best = neurons.best_position()  # [rows, D]
    hooks = []
    for r, l in enumerate(neurons.layers):
        idx = torch.nonzero(mask[r]).flatten()
        if not len(idx):
            continue
        mu = target_means[r][:, idx]  # [P, k]
        t_sel = best[r, idx]

        def fn(act: torch.Tensor, hook: Any, idx=idx, mu=mu, t_sel=t_sel) -> torch.Tensor:
            flat = source.flat(act).clone()
            T = flat.shape[1]
            start = T - prompt_length if offset is None else offset
            m = mu.to(flat)
            ix = idx.to(flat.device)
            if positions == "all":
                a = flat[..., ix]
                flat[..., ix] = a + strength * (m.mean(0) - a)
            elif positions == "prompt":
                a = flat[:, start : start + prompt_length][..., ix]
                flat[:, start : start + prompt_length, ix] = a + strength * (m - a)
            else:
                pos = (start + t_sel).to(flat.device)
                a = flat[:, pos, ix]
                flat[:, pos, ix] = a + strength * (m[t_sel.to(m.device), torch.arange(len(ix), device=m.device)] - a)
            return flat.reshape(act.shape)

        hooks.append((source.hook(l), fn))
    return hooks


@rolls_back_claims
def steering_experiment(
    model: ModelOrLoader,
    run: Run | str | Path,
    neurons: SkillNeurons | str | Path,
    out: str | Path | None = None,
    *,
    fractions: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2),
    strengths: Sequence[float] = (0.5, 1.0),
    seeds: int | Sequence[int] = 3,
    positions: str = "selected",
    max_examples: int | None = None,
    train_examples: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> SteeringResult:
    """Steer with skill units vs random units and count flipped predictions (module docstring).

    Args:
        fractions: units per layer (as `SkillNeurons.select(fraction, per_layer=True)`).
        strengths: s in a + s (mean_c - a); 1 sets the unit to class c's mean.
        positions: "selected" (each unit's best prompt position), "prompt" (every prompt position) or
            "all" (every position, towards the mean over prompt positions).
        max_examples: test examples (the run's own test set, as `ablation_experiment`);
        train_examples: train examples of the class means (default the run's train cap).
    """
    t0 = time.perf_counter()
    neurons = neurons if isinstance(neurons, SkillNeurons) else SkillNeurons.load(neurons)
    run = run if isinstance(run, Run) else Run.load(run)
    check_neurons_for_run(run, neurons, None, AttributionError)
    if positions not in POSITIONS:
        raise AttributionError(f"positions must be one of {POSITIONS}, got {positions!r}")
    fr = sorted({float(f) for f in fractions})
    if not fr or any(not 0 < f <= 1 for f in fr):
        raise AttributionError(f"fractions must be in (0, 1], got {list(fractions)}")
    st = sorted({float(s) for s in strengths})
    if not st or any(not (math.isfinite(s) and s > 0) for s in st):
        raise AttributionError(f"strengths must be finite and > 0, got {list(strengths)}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise AttributionError(f"need at least one seed and no repeats, got {seeds!r}")
    masks = {f: neurons.select(fraction=f, per_layer=True) for f in fr}
    empty = [f for f, m in masks.items() if not m.any()]
    if empty:
        raise AttributionError(f"fractions {empty} select no unit of the {neurons.d_mlp} per layer")
    causal = run.info.get("model_spec", {}).get("family", "causal") == "causal"
    if run.config.padding_side == "right" and positions != "all" and causal:
        raise AttributionError("steering at prompt positions needs the default left padding of causal rows")
    identity = {
        "run": str(run.path),
        "run_prompt": tensor_digest(run.prompt.vectors),
        "neurons": list(neurons.runs),
        "units": neurons.units,
        "positions": positions,
        "test_examples": max_examples,
        "train_examples": train_examples,
    }
    if out is not None:
        out = claim_dir(out, "steering", identity)
    model = resolve_model(model)
    check_neurons_for_run(run, neurons, model_spec(model).name, AttributionError)
    means = class_means(model, run, neurons, train_examples, batch_size)
    es = EvalSet.of_run(run, model, max_examples)
    layout = layout_for(model, run.prompt.length)
    offset = None if causal else layout.offset
    C = means.shape[0]
    conditions = [Condition("clean", {"steering": None}, run.prompt)]
    for c in range(C):
        for f in fr:
            for s in st:
                for kind, seed in [("skill", seed_list[0])] + [("random", x) for x in seed_list]:
                    mask = masks[f] if kind == "skill" else random_mask_like(masks[f], seed)

                    def hooks(m, mask=mask, c=c, s=s):
                        return _steering_hooks(m, neurons, mask, means[c], s, positions, run.prompt.length, offset)

                    definition = {
                        "steering": {
                            "target": c,
                            "fraction": f,
                            "strength": s,
                            "kind": kind,
                            "seed": seed,
                            "positions": positions,
                            "units": tensor_digest(mask),
                            "means": tensor_digest(means[c].float()),
                        }
                    }
                    conditions.append(Condition(f"{kind}|{c}|{f!r}|{s!r}|{seed}", definition, run.prompt, hooks))
    with use_prefix_cache(False):  # the hooks find prompt positions in the full rows
        results = run_conditions(
            conditions,
            {"model": model},
            {"test": es},
            out=out,
            variants={"model": model_spec(model).name},
            batch_size=batch_size,
            progress=progress,
            desc=f"steer {run.task_name}",
        )
    clean = np.array(results["clean"].predictions)
    eligible = [(c, np.flatnonzero(clean != c)) for c in range(C)]

    def flips(kind: str, f: float, s: float, seed: int) -> list[int]:
        out_: list[int] = []
        for c, idx in eligible:
            pred = np.array(results[f"{kind}|{c}|{f!r}|{s!r}|{seed}"].predictions)
            out_ += [int(v) for v in (pred[idx] == c)]
        return out_

    rows = []
    for f in fr:
        for s in st:
            skill = flips("skill", f, s, seed_list[0])
            rand = [flips("random", f, s, x) for x in seed_list]
            rates = [float(np.mean(r)) for r in rand]
            rows.append(
                {
                    "fraction": f,
                    "strength": s,
                    "n_units": int(masks[f].sum()),
                    "skill_flip_rate": float(np.mean(skill)),
                    "random_flip_rate": float(np.mean(rates)),
                    "random_flip_rate_std": float(np.std(rates)),
                    "random_flip_rates": rates,
                    "paired": _paired_flips(skill, rand),
                }
            )
    result = SteeringResult(
        model=neurons.model,
        task=run.task_name,
        run=str(run.path),
        positions=positions,
        fractions=fr,
        strengths=st,
        seeds=seed_list,
        n_examples=len(clean),
        n_pairs=int(sum(len(i) for _, i in eligible)),
        clean_accuracy=results["clean"].accuracy,
        rows=rows,
        settings={**identity, "fractions": fr, "strengths": st, "seeds": seed_list, "batch_size": batch_size},
        wall_seconds=time.perf_counter() - t0,
    )
    if out is not None and distributed.is_main():
        result.save(out)
    return result
