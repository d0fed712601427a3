"""Where skill neurons come from (SPEC §9): pre-training controls and other tuning methods.

`origin_study` runs four parts on one model and task and writes `origin.json`
(one section per part, each with its numbers, a `claim_holds` boolean and a
one-line `statement`) and figures:

- `random_weights`: the same architecture with randomly initialised weights
  (same shapes, same tokenizer) is prompt-tuned and probed like the
  pretrained model. The paper's claim: its neurons are far less predictive.
- `lora` and `bitfit`: the model is tuned without a prompt (input, prediction
  at the last position, cross-entropy over the verbalizer logits) by methods
  that keep every MLP weight frozen, and the prompt-tuning skill neurons are
  then perturbed in the tuned model, against random neurons. The claim: the
  skill neurons found with prompt tuning matter for these models too.
  LoRA adapts the attention projections (q, k, v, o) only. BitFit trains the
  bias terms outside the MLP (attention and normalisation); the MLP biases
  are neuron weights and stay frozen, unlike the original BitFit. Where the
  architecture has no such biases (Llama, SmolLM2) the normalisation weights
  are trained instead, and the section says so.
- `label_words`: a second prompt tuned with other label words (" bad"/" good"
  instead of " negative"/" positive"); its predictivity is compared with the
  original's over all neurons. The claim: skill neurons do not depend on the
  label words.

Tuned copies are separate models: the model passed in is never changed. A
copy is a plain Hugging Face model rebuilt from the bridge's weights and
wrapped in a new bridge. LoRA goes into that bridge's q/k/v/o linear modules,
not into the Hugging Face model before bridging: for GPT-2 the bridge splits
the fused `c_attn` into its own q/k/v modules, so an adapter on `c_attn`
would never run.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import compat, distributed
from .ablate import MODES, Perturbation, _digest
from .models import load_model, model_spec
from .neurons import SkillNeurons, load_or_find, random_mask_like
from .prompt import Verbalizer, class_logits, layout_for
from .tasks import Task, load_task, subsample
from .transfer import _jsonable, spearman
from .files import atomic_json
from .tuning import (Run, TuneConfig, _batch_indices, _lr_factor, check_training_settings, evaluate,
                     majority_accuracy, tune)

log = logging.getLogger(__name__)

PARTS = ("random_weights", "lora", "bitfit", "label_words")
ORIGIN_JSON = "origin.json"
TRAINED_FILE = "trained.safetensors"
FIG_RANDOM = "predictivity_random_vs_pretrained.png"
FIG_LABEL_WORDS = "predictivity_label_words.png"
DEFAULT_FRACTIONS = (0.01, 0.05, 0.1, 0.2)
BITFIT_BIASES = "bias terms outside the MLP (attention and normalisation biases)"
BITFIT_NORMS = ("normalisation weights: the architecture has no bias terms outside the MLP "
                "(fallback for BitFit; the MLP stays frozen)")
_ALT_WORDS = {"negative": "bad", "positive": "good", "bad": "negative", "good": "positive",
              "objective": "fact", "subjective": "opinion", "no": "false", "yes": "true"}


class OriginError(ValueError):
    """Bad origin-study arguments, or an output directory that holds another study."""


# ----------------------------------------------------------------------------- model copies
def _strip(name: str) -> str:
    """A bridge parameter path without its wrapper segments (`a._original_component.b` -> `a.b`)."""
    parts = [p for p in name.split(".") if p != "_original_component"]
    return ".".join(parts)


def _freeze(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def clean_hf_copy(model, random_seed: int | None = None) -> torch.nn.Module:
    """A plain Hugging Face model (no bridge wrappers) of the same architecture as `model`'s.

    With `random_seed=None` it holds copies of `model`'s weights; otherwise it
    keeps the architecture's own random initialisation drawn with that seed.
    On `model`'s device and dtype, in eval mode, frozen.
    """
    hf = compat.hf_model_of(model)
    config = copy.deepcopy(hf.config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if random_seed is None else int(random_seed))
        fresh = type(hf)(config)
    if random_seed is None:
        want = set(fresh.state_dict())
        # The bridge nests each HF module under `_original_component`: stripping
        # those segments gives the HF names back (plus bridge-only aliases, dropped).
        weights = {}
        for key, value in hf.state_dict().items():
            name = _strip(key)
            if name in want and name not in weights:
                weights[name] = value.detach().clone()
        missing = sorted(want - set(weights))
        if missing:
            raise OriginError(f"cannot copy {type(hf).__name__}: no bridge weights for {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}")
        fresh.load_state_dict(weights, strict=True)
    fresh = fresh.to(device=compat.model_device(model), dtype=compat.model_dtype(model)).eval()
    _freeze(fresh)
    return fresh


def _wrap(hf: torch.nn.Module, source, name: str):
    spec = model_spec(source)
    bridge = compat.build_bridge(hf, source.tokenizer, spec.name, device=str(compat.model_device(source)))
    bridge.eval()
    _freeze(bridge)
    bridge._tl_skill_spec = dataclasses.replace(spec, name=name)
    return bridge


def random_weights_model(model, seed: int = 1):
    """The random-weights control: `model`'s architecture and tokenizer, freshly initialised weights.

    Its `ModelSpec` is `model`'s with the name `<name>-random`.
    """
    fresh = clean_hf_copy(model, random_seed=seed)
    src = compat.hf_model_of(model).get_input_embeddings().weight
    if torch.equal(fresh.get_input_embeddings().weight.detach().cpu(), src.detach().cpu()):
        raise OriginError(f"the random initialisation with seed {seed} equals {model_spec(model).name!r}'s own "
                          "weights (a randomly initialised model itself); choose another seed")
    return _wrap(fresh, model, f"{model_spec(model).name}-random")


def copy_model(model, suffix: str):
    """An independent copy of `model` (same weights, same tokenizer), named `<name>+<suffix>`."""
    return _wrap(clean_hf_copy(model), model, f"{model_spec(model).name}+{suffix}")


# ----------------------------------------------------------------------------- parameter groups
def _named(prefix: str, module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {f"{prefix}.{_strip(n)}": p for n, p in module.named_parameters()}


def mlp_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The neurons' weights: every parameter of the MLP projections (`blocks.{l}.mlp.{gate,in,out}.<name>`).

    Taken from the bridge's `gate`/`in`/`out` projections rather than from the
    whole MLP component: for BERT that component wraps the entire layer,
    attention included.
    """
    out: dict[str, torch.nn.Parameter] = {}
    for l, block in enumerate(model.blocks):
        kids = {c: block.mlp._modules.get(c) for c in ("gate", "in", "out")}
        kids = {c: m for c, m in kids.items() if m is not None}
        if not kids:
            out.update(_named(f"blocks.{l}.mlp", block.mlp))
        for c, module in kids.items():
            out.update(_named(f"blocks.{l}.mlp.{c}", module))
    return out


def _probe_ids(model) -> torch.Tensor:
    ids = model.tokenizer("The film was good, and the acting fine.", add_special_tokens=False)["input_ids"]
    return torch.tensor([ids or [0]], device=compat.model_device(model))


def in_forward_path(model, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """The subset of `params` that one forward pass of `model` actually uses (they receive a gradient)."""
    if not params:
        return {}
    saved = {id(p): p.requires_grad for p in model.parameters()}
    try:
        _freeze(model)
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        ids = _probe_ids(model)
        with torch.enable_grad():
            logits = compat.forward(model, ids, torch.ones_like(ids))
            logits.float().pow(2).mean().backward()
        used = {n: p for n, p in params.items() if p.grad is not None}
    finally:
        for p in params.values():
            p.grad = None
        for p in model.parameters():
            p.requires_grad_(saved.get(id(p), False))
    return used


def add_lora(model, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             seed: int = 0) -> dict[str, torch.nn.Parameter]:
    """Add LoRA adapters (PEFT) to the attention projections of `model`, in place.

    The adapters go into the bridge's q, k, v and o linear modules of every
    block (q/k/v from a fused projection where the bridge splits one), so they
    run in the bridge's forward pass. Every other parameter stays frozen; the
    LoRA matrices start with B = 0, so the model's output is unchanged until
    trained.

    Returns:
        The LoRA parameters by name (`blocks.{l}.attn.<...>.lora_A.default.weight`).
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:
        raise OriginError("LoRA needs the peft library: pip install peft (or tl-skill[peft])") from exc
    if rank < 1:
        raise OriginError(f"LoRA rank must be >= 1, got {rank}")
    hf = compat.hf_model_of(model)
    module_names = {id(m): n for n, m in hf.named_modules()}
    targets = []
    for l, block in enumerate(model.blocks):
        kids = block.attn._modules
        names = [c for c in ("q", "k", "v", "o") if kids.get(c) is not None]
        if not any(c in names for c in ("q", "k", "v")) and kids.get("qkv") is not None:
            names = ["qkv"] + names
        if not names:
            raise OriginError(f"block {l}'s attention has no q/k/v/o projection to adapt "
                              f"(children: {sorted(k for k in kids if not k.startswith('hook'))})")
        for c in names:
            inner = getattr(kids[c], "_original_component", kids[c])
            if id(inner) not in module_names:
                raise OriginError(f"blocks.{l}.attn.{c} is not a module of the Hugging Face model")
            targets.append(module_names[id(inner)])
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # GPT-2's Conv1D: PEFT sets it itself
        inject_adapter_in_model(config, hf)
    _freeze(model)
    params: dict[str, torch.nn.Parameter] = {}
    for l, block in enumerate(model.blocks):
        params.update({n: p for n, p in _named(f"blocks.{l}.attn", block.attn).items() if ".lora_" in n})
    used = in_forward_path(model, params)
    if len(used) != len(params):
        raise OriginError(f"LoRA parameters {sorted(set(params) - set(used))[:4]} are not used by the "
                          "bridge's forward pass")
    return params


def bitfit_parameters(model) -> tuple[dict[str, torch.nn.Parameter], str]:
    """What BitFit trains here, and a label saying what it is.

    The bias terms outside the MLP (attention and normalisation) that the
    forward pass uses; where there are none (Llama-style models), the
    normalisation weights. MLP parameters (the neurons' weights) are never included.
    """
    mlp = {id(p) for p in mlp_parameters(model).values()}
    groups: list[tuple[str, torch.nn.Module, bool]] = []  # (prefix, module, is_norm)
    for l, block in enumerate(model.blocks):
        groups.append((f"blocks.{l}.attn", block.attn, False))
        for ln in ("ln1", "ln2"):
            if block._modules.get(ln) is not None:
                groups.append((f"blocks.{l}.{ln}", block._modules[ln], True))
    for top in ("embed_ln", "ln_final"):
        if model._modules.get(top) is not None:
            groups.append((top, model._modules[top], True))
    biases: dict[str, torch.nn.Parameter] = {}
    norm_weights: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for prefix, module, is_norm in groups:
        for name, p in _named(prefix, module).items():
            if id(p) in seen or id(p) in mlp:
                continue
            seen.add(id(p))
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "bias":
                biases[name] = p
            elif is_norm and leaf == "weight":
                norm_weights[name] = p
    # Bridges may keep an unused fused copy next to the split q/k/v (GPT-2's c_attn): drop it.
    used = in_forward_path(model, biases)
    if used:
        return used, BITFIT_BIASES
    used = in_forward_path(model, norm_weights)
    if not used:
        raise OriginError(f"{model_spec(model).name} has neither bias terms nor normalisation weights "
                          "outside the MLP: BitFit has nothing to train")
    return used, BITFIT_NORMS


def _snapshot(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def mlp_unchanged(model, reference) -> bool:
    """Whether every MLP parameter of `model` is bit-identical to `reference`'s."""
    a, b = mlp_parameters(model), mlp_parameters(reference)
    if set(a) != set(b):
        return False
    return all(torch.equal(a[n].detach().cpu(), b[n].detach().cpu()) for n in a)


# ----------------------------------------------------------------------------- training
@dataclass
class FinetuneConfig:
    """Settings for tuning chosen parameters without a prompt (LoRA, BitFit)."""

    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    max_grad_norm: float = 1.0
    eval_every: int = 50
    seed: int = 0
    max_input_tokens: int = 96
    padding_side: str | None = None
    eval_batch_size: int = 32

    def __post_init__(self):
        check_training_settings(self, OriginError, "fine-tuning")


def finetune(model, task: Task, params: dict[str, torch.nn.Parameter], config: FinetuneConfig | None = None,
             progress: bool = True, desc: str = "finetune") -> dict[str, Any]:
    """Train only `params` of `model` on `task` in the zero-shot layout (no prompt).

    Input as for zero-shot evaluation, prediction at the last position (the
    mask for a masked LM), cross-entropy over the verbalizer logits, AdamW with
    a linear schedule and warm-up. The parameters at the best dev evaluation
    are kept. Every parameter is frozen again on return, also after an error.
    """
    cfg = config or FinetuneConfig()
    if not params:
        raise OriginError("no parameters to train")
    owned = {id(p) for p in model.parameters()}
    foreign = [n for n, p in params.items() if id(p) not in owned]
    if foreign:
        raise OriginError(f"parameters {foreign[:3]} do not belong to the model")
    verbalizer = Verbalizer(model.tokenizer, task.spec.label_words)
    layout = layout_for(model, 0, cfg.max_input_tokens, cfg.padding_side)
    device = compat.model_device(model)
    train = task["train"]
    tb = train["text_b"] if "text_b" in train.column_names else None
    tokens = layout.tokenize(train["text"], tb)
    labels = np.asarray(train["label"])
    plist = list(params.values())
    opt = torch.optim.AdamW(plist, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup_fraction * cfg.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps, warmup))
    best, best_dev, best_step, history = _snapshot(params), -1.0, -1, []
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc=desc, disable=not progress, unit="step")
    try:
        _freeze(model)
        for p in plist:
            p.requires_grad_(True)
        for step in range(cfg.steps):
            idx = _batch_indices(step, cfg.batch_size, len(tokens), cfg.seed)
            batch = layout.collate([tokens[i] for i in idx], labels[idx]).to(device)
            logits = class_logits(model, batch, verbalizer, None)
            loss = torch.nn.functional.cross_entropy(logits.float(), batch.labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} at step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plist, cfg.max_grad_norm)
            opt.step()
            sched.step()
            entry = {"step": step + 1, "loss": loss.item()}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                acc = evaluate(model, task, "dev", verbalizer, None, batch_size=cfg.eval_batch_size,
                               max_input_tokens=cfg.max_input_tokens, padding_side=cfg.padding_side)["accuracy"]
                entry["dev_accuracy"] = acc
                if acc > best_dev:
                    best, best_dev, best_step = _snapshot(params), acc, step + 1
                bar.set_postfix(loss=f"{entry['loss']:.3f}", dev=f"{acc:.3f}")
            history.append(entry)
            bar.update(1)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(best[n])
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)
        _freeze(model)
    return {"steps_run": cfg.steps, "best_step": best_step, "dev_accuracy": best_dev, "history": history,
            "train_seconds": time.perf_counter() - t0, "n_trainable_tensors": len(params),
            "n_trainable_parameters": int(sum(p.numel() for p in plist))}


def save_trained(params: dict[str, torch.nn.Parameter], path: str | Path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # Clones: split views (GPT-2's q/k/v biases) share storage, which safetensors refuses.
    save_file({n: p.detach().cpu().clone().contiguous() for n, p in params.items()}, str(tmp))
    tmp.replace(path)


def load_trained(params: dict[str, torch.nn.Parameter], path: str | Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved))[:3], sorted(set(saved) - set(params))[:3]
        raise OriginError(f"{path} holds other parameters than the model's trainable ones "
                          f"(missing {missing}, extra {extra})")
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape:
                raise OriginError(f"{path}: {n} has shape {tuple(saved[n].shape)}, the model's {tuple(p.shape)}")
            p.copy_(saved[n].to(device=p.device, dtype=p.dtype))


# ----------------------------------------------------------------------------- perturbation
def _eval_key(kind: str, fraction: float | None = None, seed: int | None = None) -> str:
    return kind if kind == "clean" else f"{kind}|{fraction!r}|{seed}"


def perturbation_rows(evals: dict[str, dict], fractions: Sequence[float], seeds: Sequence[int],
                      counts: dict[float, list[int]], mode: str) -> list[dict[str, Any]]:
    """One row per fraction (the layout of `ablate.ablation_experiment`'s rows)."""
    clean = evals.get("clean", {}).get("accuracy")
    rows = []
    for f in fractions:
        skill = evals.get(_eval_key("skill", f, seeds[0]), {}).get("accuracy")
        rand = [evals[k]["accuracy"] for k in (_eval_key("random", f, s) for s in seeds) if k in evals]
        rows.append({"mode": mode, "fraction": f, "n_neurons": int(sum(counts[f])), "layer_counts": counts[f],
                     "clean_accuracy": clean, "skill_accuracy": skill,
                     "random_accuracy": float(np.mean(rand)) if rand else None,
                     "random_accuracy_std": float(np.std(rand)) if rand else None, "random_accuracies": rand})
    return rows


def perturbation_curve(model, task: Task, neurons: SkillNeurons, verbalizer: Verbalizer, *,
                       fractions: Sequence[float] = DEFAULT_FRACTIONS, seeds: Sequence[int] = (0, 1),
                       mode: str = "noise", std: float = 0.1, relative: bool = False, per_layer: bool = True,
                       split: str = "test", batch_size: int = 32, max_input_tokens: int = 96,
                       padding_side: str | None = None, done: dict[str, dict] | None = None,
                       on_eval: Callable[[dict[str, dict]], None] | None = None, progress: bool = True,
                       desc: str = "perturb") -> dict[str, dict]:
    """Accuracy of `model` without a prompt, with `neurons`' skill neurons vs random neurons perturbed.

    For each fraction f: the top `int(f * d_mlp)` skill neurons per layer
    (mask and noise seed `seeds[0]`), and as many random neurons per layer once
    per seed; plus the unperturbed model ("clean"). `done` holds evaluations
    already made (skipped); `on_eval(evals)` is called after each new one.

    Returns:
        All evaluations by key ("clean", "skill|f|seed", "random|f|seed").
    """
    evals = dict(done or {})
    plan = [("clean", None, None)] + [(kind, f, s) for f in fractions
                                      for kind, s in [("skill", seeds[0])] + [("random", s) for s in seeds]]
    masks = {f: neurons.select(fraction=f, per_layer=per_layer) for f in fractions}
    todo = [p for p in plan if _eval_key(*p) not in evals]
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc=desc, disable=not progress, unit="eval")
    try:
        for kind, f, s in todo:
            t0 = time.perf_counter()
            hooks: list = []
            if kind != "clean":
                mask = masks[f] if kind == "skill" else random_mask_like(masks[f], s)
                hooks = Perturbation(model, mask, mode, std=std, relative=relative, seed=s, skill=neurons).fwd_hooks()
            acc = evaluate(model, task, split, verbalizer, None, batch_size=batch_size,
                           max_input_tokens=max_input_tokens, extra_hooks=hooks, padding_side=padding_side)["accuracy"]
            key = _eval_key(kind, f, s)
            evals[key] = {"key": key, "kind": kind, "fraction": f, "seed": s, "accuracy": acc,
                          "seconds": time.perf_counter() - t0}
            if on_eval is not None:
                on_eval(evals)
            bar.update(1)
    finally:
        bar.close()
    return evals


def perturbation_verdict(rows: list[dict], clean: float, majority: float) -> tuple[bool, bool, float]:
    """(claim_holds, conclusive, mean accuracy gap random - skill).

    The claim holds when the tuned model beats the majority class (else the
    test says nothing), perturbing skill neurons costs more accuracy than
    perturbing random ones on average over the fractions, and at the largest
    fraction the skill-neuron accuracy is below the random-neuron mean.
    """
    gaps = [r["random_accuracy"] - r["skill_accuracy"] for r in rows
            if r["random_accuracy"] is not None and r["skill_accuracy"] is not None]
    gap = float(np.mean(gaps)) if gaps else float("nan")
    conclusive = clean > majority and bool(gaps)
    last = rows[-1] if rows else {}
    holds = bool(conclusive and gap > 0 and last.get("skill_accuracy") is not None
                 and last["skill_accuracy"] < last["random_accuracy"])
    return holds, conclusive, gap


# ----------------------------------------------------------------------------- comparisons
def _top_k(d_mlp: int, fraction: float) -> int:
    return max(1, int(fraction * d_mlp))


def predictivity_summary(sn: SkillNeurons, fraction: float = 0.01) -> dict[str, Any]:
    """Best neuron, mean of the per-layer top `fraction` (at least one per layer), mean of all."""
    pred = sn.predictivity
    mask = sn.select(k=_top_k(sn.d_mlp, fraction), per_layer=True)
    return {"best_predictivity": float(pred.max()), "top_mean_predictivity": float(pred[mask].mean()),
            "top_fraction": fraction, "top_per_layer": _top_k(sn.d_mlp, fraction),
            "mean_predictivity": float(pred.mean()), "runs": len(sn.runs),
            "prompt_dev_accuracy": sn.prompt_accuracy("dev_accuracy"),
            "prompt_test_accuracy": sn.prompt_accuracy("test_accuracy")}


def compare_predictivity(a: SkillNeurons | torch.Tensor, b: SkillNeurons | torch.Tensor,
                         fraction: float = 0.01) -> dict[str, Any]:
    """Spearman correlation of two predictivity maps over all neurons, and the overlap of their skill neurons.

    The skill neurons are the top `max(1, int(fraction * d_mlp))` of each layer;
    `top_overlap` = |A and B| / |A|, `chance_overlap` its expectation for two
    random sets of that size.
    """
    pa = a.predictivity if isinstance(a, SkillNeurons) else torch.as_tensor(a)
    pb = b.predictivity if isinstance(b, SkillNeurons) else torch.as_tensor(b)
    if pa.shape != pb.shape or pa.ndim != 2:
        raise OriginError(f"predictivity maps of shapes {tuple(pa.shape)} and {tuple(pb.shape)} cannot be compared")
    k = _top_k(pa.shape[1], fraction)
    ma, mb = _top_mask(pa, k), _top_mask(pb, k)
    return {"spearman": spearman(pa.reshape(-1).numpy(), pb.reshape(-1).numpy()),
            "top_overlap": float((ma & mb).sum()) / float(ma.sum()), "chance_overlap": k / pa.shape[1],
            "top_fraction": fraction, "top_per_layer": k, "n_neurons": int(pa.numel())}


def _top_mask(pred: torch.Tensor, k: int) -> torch.Tensor:
    """Top k of each row; ties broken by index (as `SkillNeurons.select`)."""
    mask = torch.zeros(pred.shape, dtype=torch.bool)
    for l in range(pred.shape[0]):
        order = torch.sort(-pred[l].double(), stable=True).indices[:k]
        mask[l, order] = True
    return mask


def default_alt_label_words(label_words: Sequence[str]) -> list[str]:
    """Other label words for the label-word control: " bad"/" good" for " negative"/" positive", ..."""
    plain = [w.strip().lower() for w in label_words]
    if all(w in _ALT_WORDS for w in plain):
        return [" " + _ALT_WORDS[w] for w in plain]
    if len(plain) == 2:
        return [" no", " yes"]
    raise OriginError(f"no default alternative for the label words {list(label_words)}; "
                      "give alt_label_words (one word per class)")


# ----------------------------------------------------------------------------- the study
def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"


def _free_memory() -> None:
    """Give back the memory of a model copy the caller has just dropped."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _read_previous(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OriginError(f"{path} is not readable JSON ({exc}); delete it to start over") from exc


def _check_settings(path: Path, old: dict | None, new: dict, skip: Sequence[str] = ()) -> None:
    """Refuse to mix a study with one of other settings in the same directory."""
    if not old:
        return
    # The alternative label words only matter to the runs that use them.
    clash = [k for k in new if k not in skip and old.get(k) != new[k]
             and not (k == "alt_label_words" and (new[k] is None or old.get(k) is None))]
    if clash:
        raise OriginError(f"{path} holds a study with different {', '.join(clash)}; "
                          "use another --out or delete it")


def origin_study(
    model_name: str, task_name: str | None, out: str | Path, *, run_dir: str | Path | None = None,
    neurons_dir: str | Path | None = None, parts: Iterable[str] = PARTS, model=None,
    tune_config: TuneConfig | None = None, steps: int = 200, lora_lr: float = 1e-3, bitfit_lr: float = 1e-3,
    lora_rank: int = 8, lora_alpha: float = 16.0, train_batch_size: int = 16, eval_every: int = 50,
    fractions: Sequence[float] = DEFAULT_FRACTIONS, seeds: int | Sequence[int] = 2, mode: str = "noise",
    std: float = 0.1, relative: bool = False, max_test_examples: int | None = 300,
    prompt_steps: int | None = 150, alt_label_words: Sequence[str] | str | None = None, random_seed: int = 1,
    find_train_examples: int | None = 2000, find_eval_examples: int | None = None, top_fraction: float = 0.01,
    min_spearman: float = 0.5, min_overlap: float = 0.3, batch_size: int = 32,
    device: str | None = None, dtype: str | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Where skill neurons come from: the four parts of SPEC §9 on one model and task (module docstring).

    Args:
        model_name, task_name: what to study; with `run_dir`, they must match the run
            (`task_name=None` takes the run's task).
        out: output directory. `origin.json` is rewritten after every part (and
            every perturbation evaluation); a rerun with the same settings skips
            finished parts and evaluations, and resumes interrupted prompt tuning.
        run_dir: an existing prompt-tuning run (its prompt, task split and config are
            reused); default: tune one in `out/prompt` with `tune_config`.
        neurons_dir: its skill neurons; default: found in `out/neurons`. Without
            `run_dir`, the first run they were found from is used.
        parts: any of `PARTS`.
        model: an already loaded model named `model_name` (not changed).
        tune_config: prompt tuning when the study tunes (default `TuneConfig()`); the
            random-weights and label-word prompts use the source run's config, except
            `prompt_steps` and the test cap.
        prompt_steps: tuning steps of the random-weights and label-word prompts (None: the
            source run's). The default, 150, keeps the study within an hour on 2 CPU cores.
        steps, lora_lr, bitfit_lr, lora_rank, lora_alpha, train_batch_size, eval_every:
            LoRA and BitFit training (`FinetuneConfig`); the train/dev/test caps are the run's.
        fractions, seeds, mode, std, relative: the perturbation (as `ablate.ablation_experiment`),
            on at most `max_test_examples` test examples (None: the run's cap); the extra
            prompts are tested on as many.
        alt_label_words: the label-word control's words (default `default_alt_label_words`).
        random_seed: initialisation seed of the random-weights model.
        find_train_examples, find_eval_examples: `find_skill_neurons` caps for the neurons the
            study finds itself (given neurons keep their own).
        top_fraction: the per-layer top fraction compared (at least one neuron per layer).
        min_spearman, min_overlap: the label-word claim holds when Spearman >= min_spearman
            and the top overlap >= min_overlap.

    Returns:
        The contents of `origin.json`.
    """
    t_start = time.perf_counter()
    out = Path(out)
    parts = list(dict.fromkeys(parts))
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise OriginError(f"unknown part(s) {bad}; choose from {list(PARTS)}" if bad else "no part to run")
    fractions = sorted({float(f) for f in fractions})
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise OriginError(f"fractions must be in (0, 1], got {fractions}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise OriginError(f"need at least one seed and no repeats, got {seeds!r}")
    if mode not in MODES:
        raise OriginError(f"unknown perturbation mode {mode!r}; choose one of {MODES}")
    if mode == "noise" and not (math.isfinite(std) and std > 0):
        raise OriginError(f"noise std must be > 0, got {std}")
    if not 0 < top_fraction <= 1:
        raise OriginError(f"top_fraction must be in (0, 1], got {top_fraction}")
    if max_test_examples is not None and max_test_examples < 1:
        raise OriginError(f"max_test_examples must be >= 1, got {max_test_examples}")
    if prompt_steps is not None and prompt_steps < 1:
        raise OriginError(f"prompt_steps must be >= 1, got {prompt_steps}")
    ft = {"lora": FinetuneConfig(steps=steps, lr=lora_lr, batch_size=train_batch_size, eval_every=eval_every,
                                 eval_batch_size=batch_size),
          "bitfit": FinetuneConfig(steps=steps, lr=bitfit_lr, batch_size=train_batch_size, eval_every=eval_every,
                                   eval_batch_size=batch_size)}
    if "lora" in parts and lora_rank < 1:
        raise OriginError(f"LoRA rank must be >= 1, got {lora_rank}")

    # --- the source run and its skill neurons (validated before anything long)
    given_neurons = SkillNeurons.load(neurons_dir) if neurons_dir is not None else None
    if run_dir is None and given_neurons is not None:
        run_dir = given_neurons.runs[0]
    run = Run.load(run_dir) if run_dir is not None else None
    if run is not None:
        if run.model_name != model_name:
            raise OriginError(f"the run {run.path} was tuned on {run.model_name!r}, not {model_name!r}")
        if task_name is not None and run.task_name != task_name:
            raise OriginError(f"the run {run.path} is for task {run.task_name!r}, not {task_name!r}")
        task_name = run.task_name
    if task_name is None:
        raise OriginError("give a task name (or a run directory)")
    if given_neurons is not None:
        if given_neurons.model != model_name or given_neurons.task != task_name:
            raise OriginError(f"the skill neurons in {neurons_dir} are for {given_neurons.model!r} / "
                              f"{given_neurons.task!r}, not {model_name!r} / {task_name!r}")
        if run is not None and list(given_neurons.label_words) != list(run.info["label_words"]):
            raise OriginError(f"label words differ: run {run.info['label_words']}, "
                              f"skill neurons {given_neurons.label_words}")
    if run is not None:
        task = run.load_task()
    else:
        task = load_task(task_name, seed=(tune_config or TuneConfig()).task_seed)
    alt_words = None
    if "label_words" in parts:
        if isinstance(alt_label_words, str):
            alt_label_words = alt_label_words.split(",")
        alt_words = ([w if w.startswith(" ") else " " + w for w in alt_label_words] if alt_label_words
                     else default_alt_label_words(task.spec.label_words))
        if len(alt_words) != task.spec.n_classes:
            raise OriginError(f"{len(alt_words)} alternative label words {alt_words} for "
                              f"{task.spec.n_classes} classes")
        if [w.strip().lower() for w in alt_words] == [w.strip().lower() for w in task.spec.label_words]:
            raise OriginError(f"the alternative label words {alt_words} are the task's own")
    cfg = run.config if run is not None else (tune_config or TuneConfig())
    test_cap = max_test_examples if max_test_examples is not None else cfg.max_test_examples
    if test_cap is not None and cfg.max_test_examples is not None:
        test_cap = min(test_cap, cfg.max_test_examples)
    control_steps = prompt_steps or cfg.steps
    control_cfg = dataclasses.replace(cfg, steps=control_steps, eval_every=min(cfg.eval_every, control_steps),
                                      max_test_examples=test_cap)
    settings = _jsonable({
        "model": model_name, "task": task_name, "task_seed": task.spec.seed,
        "label_words": list(task.spec.label_words), "run_prompt": None, "neurons": None, "steps": steps,
        "lora_lr": lora_lr, "bitfit_lr": bitfit_lr, "lora_rank": lora_rank, "lora_alpha": lora_alpha,
        "train_batch_size": train_batch_size, "eval_every": eval_every, "fractions": fractions,
        "seeds": seed_list, "mode": mode, "std": std if mode == "noise" else None,
        "relative": relative if mode == "noise" else None, "test_examples": test_cap,
        "alt_label_words": alt_words, "prompt_steps": control_steps, "random_seed": random_seed,
        "top_fraction": top_fraction, "min_spearman": min_spearman, "min_overlap": min_overlap,
    })
    path = out / ORIGIN_JSON
    prev = _read_previous(path)
    _check_settings(path, prev.get("settings"), settings, skip=("run_prompt", "neurons"))  # before any long work

    if model is None:
        model = load_model(model_name, device=device, dtype=dtype)
    elif model_spec(model).name != model_name:
        raise OriginError(f"the model given is {model_spec(model).name!r}, not {model_name!r}")
    if alt_words is not None:
        Verbalizer(model.tokenizer, alt_words)  # refuses words whose first tokens clash
    out.mkdir(parents=True, exist_ok=True)

    if run is None:
        run = tune(model, task, out / "prompt", cfg, progress=progress)
    # the controls compare selection-split predictivity: no held-out pass (as in the published runs)
    find_kw = dict(max_train_examples=find_train_examples, max_eval_examples=find_eval_examples,
                   batch_size=batch_size, progress=progress, confirm_split=None)
    if given_neurons is not None:
        sn = given_neurons
        find_kw.update(max_train_examples=sn.meta.get("max_train_examples", find_train_examples),
                       max_eval_examples=sn.meta.get("n_eval", find_eval_examples),
                       multiclass=sn.meta.get("multiclass", "ovr"))
    else:
        sn = load_or_find(model, [run], out / "neurons", **find_kw)
    data = subsample(task, {"train": cfg.max_train_examples, "dev": cfg.max_dev_examples, "test": test_cap},
                     seed=cfg.task_seed)
    settings.update(run_prompt=_digest(run.prompt.vectors), neurons=_digest(sn.predictivity))
    _check_settings(path, prev.get("settings"), settings)
    if settings["alt_label_words"] is None and prev.get("settings"):
        settings["alt_label_words"] = prev["settings"].get("alt_label_words")
    state: dict[str, Any] = {p: prev[p] for p in PARTS if p in prev}

    pretrained = predictivity_summary(sn, top_fraction)

    def save(status: str = "running") -> dict[str, Any]:
        result = {
            "model": model_name, "task": task_name, "status": status, "settings": settings,
            "source": {"run": str(run.path), "neurons_dir": str(neurons_dir or out / "neurons"),
                       "neurons_runs": sn.runs,
                       "prompt_test_accuracy": run.metrics.get("test_accuracy"),
                       "zero_shot_accuracy": run.metrics.get("zero_shot_accuracy"),
                       "majority_accuracy": majority_accuracy(data, "test"), **pretrained},
            **{p: state[p] for p in PARTS if p in state},
            "wall_seconds": time.perf_counter() - t_start,
        }
        result = _jsonable(result)
        if distributed.is_main():
            atomic_json(path, result)
        return result

    save()
    for part in parts:
        if state.get(part, {}).get("status") == "done":
            log.info("origin study: %s already done; skipping", part)
            continue
        t0 = time.perf_counter()
        if part == "random_weights":
            state[part] = _random_weights_part(model, task, run, control_cfg, sn, out, pretrained, random_seed,
                                               top_fraction, find_kw, progress)
        elif part == "label_words":
            state[part] = _label_words_part(model, task_name, run, control_cfg, sn, out, alt_words, top_fraction,
                                            min_spearman, min_overlap, find_kw, progress)
        else:
            def on_update(section, part=part):
                state[part] = section
                save()

            state[part] = _tuning_part(part, model, data, run, sn, out, ft[part], lora_rank, lora_alpha,
                                       fractions, seed_list, mode, std, relative, batch_size,
                                       state.get(part, {}), on_update, progress)
        state[part]["seconds"] = state[part].get("seconds", 0.0) + time.perf_counter() - t0
        save()
        log.info("origin study: %s: %s", part, state[part]["statement"])
    return save("done" if all(state.get(p, {}).get("status") == "done" for p in PARTS) else "partial")


def _random_weights_part(model, task, run: Run, cfg: TuneConfig, sn: SkillNeurons, out: Path, pretrained: dict,
                         seed: int, top_fraction: float, find_kw: dict, progress: bool) -> dict[str, Any]:
    rand_model = random_weights_model(model, seed)
    rand_run = tune(rand_model, task, out / "random_weights" / "run", cfg, progress=progress)
    ndir = out / "random_weights" / "neurons"
    rand_sn = load_or_find(rand_model, [rand_run], ndir, layers=sn.layers, positions=sn.positions, **find_kw)
    del rand_model
    _free_memory()
    random = predictivity_summary(rand_sn, top_fraction)
    holds = (pretrained["best_predictivity"] > random["best_predictivity"]
             and pretrained["top_mean_predictivity"] > random["top_mean_predictivity"])
    if distributed.is_main():
        from .plots import plot_predictivity_histogram

        plot_predictivity_histogram(
            {"pretrained": sn.predictivity.reshape(-1).numpy(),
             "random weights": rand_sn.predictivity.reshape(-1).numpy()},
            out / FIG_RANDOM, f"{sn.model} / {sn.task}: neuron predictivity, pretrained vs random weights")
    verb = "more" if holds else "not more"
    statement = (f"Pretrained neurons are {verb} predictive than those of the same architecture with random weights: "
                 f"best {_fmt(pretrained['best_predictivity'])} vs {_fmt(random['best_predictivity'])}, "
                 f"top-{top_fraction:.0%} mean {_fmt(pretrained['top_mean_predictivity'])} vs "
                 f"{_fmt(random['top_mean_predictivity'])} (prompt test accuracy "
                 f"{_fmt(pretrained['prompt_test_accuracy'])} vs {_fmt(random['prompt_test_accuracy'])}).")
    return {"status": "done", "pretrained": pretrained, "random": random,
            "best_gap": pretrained["best_predictivity"] - random["best_predictivity"],
            "top_mean_gap": pretrained["top_mean_predictivity"] - random["top_mean_predictivity"],
            "random_seed": seed, "run": str(rand_run.path), "neurons_dir": str(ndir), "figure": FIG_RANDOM,
            "claim_holds": bool(holds), "statement": statement}


def _label_words_part(model, task_name: str, run: Run, cfg: TuneConfig, sn: SkillNeurons, out: Path,
                      alt_words: list[str], top_fraction: float, min_spearman: float, min_overlap: float,
                      find_kw: dict, progress: bool) -> dict[str, Any]:
    alt_task = load_task(task_name, seed=run.info["task_seed"], label_words=alt_words)
    base = out / "label_words"
    alt_run = tune(model, alt_task, base / "run", cfg, progress=progress)
    ndir = base / "neurons"
    alt_sn = load_or_find(model, [alt_run], ndir, layers=sn.layers, positions=sn.positions, **find_kw)
    cmp = compare_predictivity(sn, alt_sn, top_fraction)
    rho, overlap = cmp["spearman"], cmp["top_overlap"]
    holds = bool(math.isfinite(rho) and rho >= min_spearman and overlap >= min_overlap)
    fig = None
    if distributed.is_main():
        from .plots import plot_predictivity_scatter

        k = cmp["top_per_layer"]
        fig = plot_predictivity_scatter(
            sn.predictivity.reshape(-1).numpy(), alt_sn.predictivity.reshape(-1).numpy(), out / FIG_LABEL_WORDS,
            xlabel=f"predictivity with {'/'.join(w.strip() for w in sn.label_words)}",
            ylabel=f"predictivity with {'/'.join(w.strip() for w in alt_words)}",
            title=f"{sn.model} / {sn.task}: label words\n(Spearman {_fmt(rho)}, top overlap {_fmt(overlap)})",
            highlight=(_top_mask(sn.predictivity, k) | _top_mask(alt_sn.predictivity, k)).reshape(-1).numpy()).name
    statement = (f"With label words {'/'.join(w.strip() for w in alt_words)} instead of "
                 f"{'/'.join(w.strip() for w in sn.label_words)}, neuron predictivity has Spearman {_fmt(rho)} "
                 f"with the original and {overlap:.0%} of the top-{top_fraction:.0%} skill neurons are shared "
                 f"(chance {cmp['chance_overlap']:.0%}): skill neurons are "
                 f"{'insensitive' if holds else 'not shown to be insensitive'} to the label words "
                 f"(criterion: Spearman >= {min_spearman:g} and overlap >= {min_overlap:.0%}).")
    return {"status": "done", "original": list(sn.label_words), "alternative": list(alt_words), **cmp,
            "original_summary": predictivity_summary(sn, top_fraction),
            "alternative_summary": predictivity_summary(alt_sn, top_fraction),
            "run": str(alt_run.path), "neurons_dir": str(ndir), "figure": fig,
            "claim_holds": holds, "statement": statement}


def _tuning_part(method: str, model, data: Task, run: Run, sn: SkillNeurons, out: Path, ft: FinetuneConfig,
                 lora_rank: int, lora_alpha: float, fractions: list[float], seeds: list[int], mode: str,
                 std: float, relative: bool, batch_size: int, prev: dict, on_update: Callable[[dict], None],
                 progress: bool) -> dict[str, Any]:
    cfg = run.config
    ft = dataclasses.replace(ft, max_input_tokens=cfg.max_input_tokens, padding_side=cfg.padding_side)
    base = out / method
    tuned = copy_model(model, method)
    if method == "lora":
        params = add_lora(tuned, rank=lora_rank, alpha=lora_alpha, seed=ft.seed)
        trained = f"LoRA (rank {lora_rank}, alpha {lora_alpha:g}) on the attention projections q, k, v, o"
    else:
        params, trained = bitfit_parameters(tuned)
    verbalizer = Verbalizer(tuned.tokenizer, data.spec.label_words)
    eval_kw = dict(batch_size=batch_size, max_input_tokens=cfg.max_input_tokens, padding_side=cfg.padding_side)
    section = dict(prev) if prev.get("training") else {}
    if section and (base / TRAINED_FILE).exists():
        load_trained(params, base / TRAINED_FILE)
    else:
        before = evaluate(tuned, data, "test", verbalizer, None, **eval_kw)["accuracy"]
        info = finetune(tuned, data, params, ft, progress=progress, desc=f"{method} {data.name}")
        if distributed.is_main():
            save_trained(params, base / TRAINED_FILE)
        section = {"status": "trained", "trained": trained, "fallback": trained == BITFIT_NORMS,
                   "trainable_parameters": sorted(params), "training": {**info, "config": asdict(ft)},
                   "zero_shot_accuracy": before, "evaluations": []}
    unchanged = mlp_unchanged(tuned, model)
    if not unchanged:  # cannot happen unless the bridge shares storage in an unexpected way
        raise OriginError(f"{method} changed MLP weights; the comparison would be meaningless")
    counts = {f: [int(c) for c in sn.select(fraction=f).sum(1)] for f in fractions}
    majority = majority_accuracy(data, "test")

    def fill(evals: dict[str, dict], status: str) -> dict[str, Any]:
        rows = perturbation_rows(evals, fractions, seeds, counts, mode)
        clean = evals.get("clean", {}).get("accuracy")
        section.update(status=status, mlp_weights_unchanged=unchanged, clean_accuracy=clean,
                       majority_accuracy=majority, prompt_test_accuracy=run.metrics.get("test_accuracy"),
                       n_examples=len(data["test"]), rows=rows,
                       evaluations=sorted(evals.values(), key=lambda e: e["key"]))
        return section

    on_update(fill({e["key"]: e for e in section.get("evaluations", [])}, "trained"))
    evals = perturbation_curve(tuned, data, sn, verbalizer, fractions=fractions, seeds=seeds, mode=mode, std=std,
                               relative=relative, done={e["key"]: e for e in section.get("evaluations", [])},
                               on_eval=lambda ev: on_update(fill(ev, "trained")), progress=progress,
                               desc=f"perturb {method}", **eval_kw)
    del tuned
    _free_memory()
    fill(evals, "done")
    holds, conclusive, gap = perturbation_verdict(section["rows"], section["clean_accuracy"], majority)
    last = section["rows"][-1]
    what = "LoRA" if method == "lora" else f"BitFit ({'normalisation weights' if section['fallback'] else 'biases'})"
    if not conclusive:
        statement = (f"Inconclusive: the {what}-tuned model's test accuracy {_fmt(section['clean_accuracy'])} "
                     f"does not beat the majority class ({_fmt(majority)}).")
    else:
        statement = (f"In the {what}-tuned model (test accuracy {_fmt(section['clean_accuracy'])}), perturbing the "
                     f"prompt-tuning skill neurons {'hurts more' if holds else 'does not hurt more'} than random "
                     f"neurons: at {last['fraction']:.0%} per layer {_fmt(last['skill_accuracy'])} vs "
                     f"{_fmt(last['random_accuracy'])}, mean gap {gap:+.3f} over {len(fractions)} fractions.")
    figure = f"perturbation_{method}.png"
    if distributed.is_main():
        from .plots import plot_ablation

        plot_ablation({"rows": section["rows"], "model": f"{sn.model} ({what})", "task": sn.task,
                       "seeds": seeds, "n_examples": section["n_examples"], "majority_accuracy": majority,
                       "settings": {"std": std if mode == "noise" else None, "relative": relative, "per_layer": True}},
                      out / figure)
    section.update(conclusive=conclusive, mean_gap=gap, figure=figure, claim_holds=holds, statement=statement)
    return section
