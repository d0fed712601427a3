"""Model variants for the origin study (method §9): a random-weights copy, LoRA, BitFit.

Tuned copies are separate models: the model passed in is never changed. A
copy is a plain Hugging Face model rebuilt from the bridge's weights and
wrapped in a new bridge. LoRA goes into that bridge's q/k/v/o linear modules,
not into the Hugging Face model before bridging: for GPT-2 the bridge splits
the fused `c_attn` into its own q/k/v modules, so an adapter on `c_attn`
would never run. LoRA adapts the attention projections only; BitFit trains
the bias terms outside the MLP (attention and normalisation) — the MLP
biases are neuron weights and stay frozen, unlike the original BitFit —
and, where the architecture has no such biases (Llama, SmolLM2), the
normalisation weights instead. Training is `tuning.loop.train_loop`, as for prompts.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tl_skill import compat
from tl_skill.compat import HookedRootModule
from tl_skill.data.tasks import Task
from tl_skill.errors import UnsupportedModelError, VariantError
from tl_skill.files import atomic_tensors
from tl_skill.models import model_spec
from tl_skill.tuning.loop import LoopConfig, remove_checkpoint, train_loop
from tl_skill.tuning.prompt import Verbalizer

TRAINED_FILE = "trained.safetensors"
BITFIT_BIASES = "bias terms outside the MLP (attention and normalisation biases)"
BITFIT_NORMS = (
    "normalisation weights: the architecture has no bias terms outside the MLP "
    "(fallback for BitFit; the MLP stays frozen)"
)


# ----------------------------------------------------------------------------- model copies
def _freeze(module: torch.nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def clean_hf_copy(model: HookedRootModule, random_seed: int | None = None) -> Any:
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
        # Without the bridge's wrapper segments the names are the HF model's
        # (plus bridge-only aliases, dropped).
        weights = {}
        for key, value in hf.state_dict().items():
            name = compat.hf_param_name(key)
            if name in want and name not in weights:
                weights[name] = value.detach().clone()
        missing = sorted(want - set(weights))
        if missing:
            raise VariantError(
                f"cannot copy {type(hf).__name__}: no bridge weights for {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}"
            )
        fresh.load_state_dict(weights, strict=True)
    fresh = fresh.to(device=compat.model_device(model), dtype=compat.model_dtype(model)).eval()
    _freeze(fresh)
    return fresh


def _wrap(hf: torch.nn.Module, source, name: str):
    spec = model_spec(source)
    bridge = compat.build_bridge(hf, source.tokenizer, spec.name, device=str(compat.model_device(source)))
    bridge.eval()
    _freeze(bridge)
    setattr(bridge, "_tl_skill_spec", dataclasses.replace(spec, name=name))  # noqa: B010 - a plain attribute
    setattr(bridge, compat.PREFIX_ATTR, tuple(compat.model_prefix_ids(source)))
    return bridge


def random_weights_model(model: HookedRootModule, seed: int = 1) -> HookedRootModule:
    """The random-weights control: `model`'s architecture and tokenizer, freshly initialised weights.

    Its `ModelSpec` is `model`'s with the name `<name>-random`.
    """
    fresh = clean_hf_copy(model, random_seed=seed)
    src = compat.hf_model_of(model).get_input_embeddings().weight
    if torch.equal(fresh.get_input_embeddings().weight.detach().cpu(), src.detach().cpu()):
        raise VariantError(
            f"the random initialisation with seed {seed} equals {model_spec(model).name!r}'s own "
            "weights (a randomly initialised model itself); choose another seed"
        )
    return _wrap(fresh, model, f"{model_spec(model).name}-random")


def copy_model(model: HookedRootModule, suffix: str) -> HookedRootModule:
    """An independent copy of `model` (same weights, same tokenizer), named `<name>+<suffix>`."""
    return _wrap(clean_hf_copy(model), model, f"{model_spec(model).name}+{suffix}")


# ----------------------------------------------------------------------------- parameter groups
def mlp_parameters(model: HookedRootModule) -> dict[str, torch.nn.Parameter]:
    """The neurons' weights: every parameter of the MLP projections (`blocks.{l}.mlp.{gate,in,out}.<name>`).

    Taken from the bridge's `gate`/`in`/`out` projections rather than from the
    whole MLP component: for BERT that component wraps the entire layer,
    attention included.
    """
    out: dict[str, torch.nn.Parameter] = {}
    for l, block in enumerate(model.blocks):
        kids = compat.mlp_projections(block)
        if not kids:
            out.update(compat.named_hf_parameters(f"blocks.{l}.mlp", block.mlp))
        for c, module in kids.items():
            out.update(compat.named_hf_parameters(f"blocks.{l}.mlp.{c}", module))
    return out


def _probe_ids(model: HookedRootModule) -> torch.Tensor:
    ids = model.tokenizer("The film was good, and the acting fine.", add_special_tokens=False)["input_ids"]
    return torch.tensor([ids or [0]], device=compat.model_device(model))


def in_forward_path(model: HookedRootModule, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
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


def add_lora(
    model: HookedRootModule, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, seed: int = 0
) -> dict[str, torch.nn.Parameter]:
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
        raise VariantError("LoRA needs the peft library: pip install peft (or tl-skill[peft])") from exc
    if rank < 1:
        raise VariantError(f"LoRA rank must be >= 1, got {rank}")
    hf = compat.hf_model_of(model)
    module_names = {id(m): n for n, m in hf.named_modules()}
    targets = []
    for l, block in enumerate(model.blocks):
        try:
            projections = compat.attention_projections(block)
        except UnsupportedModelError as exc:
            raise VariantError(f"block {l}: {exc}; LoRA has nothing to adapt") from None
        for c, component in projections.items():
            inner = compat.hf_module(component)
            if id(inner) not in module_names:
                raise VariantError(f"blocks.{l}.attn.{c} is not a module of the Hugging Face model")
            targets.append(module_names[id(inner)])
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # peft scales by alpha / r: any number works
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # GPT-2's Conv1D: PEFT sets it itself
        inject_adapter_in_model(config, hf)
    _freeze(model)
    params: dict[str, torch.nn.Parameter] = {}
    for l, block in enumerate(model.blocks):
        params.update(
            {n: p for n, p in compat.named_hf_parameters(f"blocks.{l}.attn", block.attn).items() if ".lora_" in n}
        )
    used = in_forward_path(model, params)
    if len(used) != len(params):
        raise VariantError(
            f"LoRA parameters {sorted(set(params) - set(used))[:4]} are not used by the bridge's forward pass"
        )
    return params


def bitfit_parameters(model: HookedRootModule) -> tuple[dict[str, torch.nn.Parameter], str]:
    """What BitFit trains here, and a label saying what it is.

    The bias terms outside the MLP (attention and normalisation) that the
    forward pass uses; where there are none (Llama-style models), the
    normalisation weights. MLP parameters (the neurons' weights) are never included.
    """
    mlp = {id(p) for p in mlp_parameters(model).values()}
    groups: list[tuple[str, torch.nn.Module, bool]] = []  # (prefix, module, is_norm)
    for l, block in enumerate(model.blocks):
        groups.append((f"blocks.{l}.attn", block.attn, False))
        groups += [(f"blocks.{l}.{ln}", module, True) for ln, module in compat.block_norms(block)]
    groups += [(top, module, True) for top, module in compat.model_norms(model)]
    biases: dict[str, torch.nn.Parameter] = {}
    norm_weights: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for prefix, module, is_norm in groups:
        for name, p in compat.named_hf_parameters(prefix, module).items():
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
        raise VariantError(
            f"{model_spec(model).name} has neither bias terms nor normalisation weights "
            "outside the MLP: BitFit has nothing to train"
        )
    return used, BITFIT_NORMS


def mlp_unchanged(model: HookedRootModule, reference) -> bool:
    """Whether every MLP parameter of `model` is bit-identical to `reference`'s."""
    a, b = mlp_parameters(model), mlp_parameters(reference)
    if set(a) != set(b):
        return False
    return all(torch.equal(a[n].detach().cpu(), b[n].detach().cpu()) for n in a)


# ----------------------------------------------------------------------------- training
@dataclass
class FinetuneConfig(LoopConfig):
    """Settings for tuning chosen parameters without a prompt (LoRA, BitFit): the loop's, other defaults."""

    steps: int = 200
    lr: float = 1e-3

    def __post_init__(self):
        self._check(VariantError, "fine-tuning")


def finetune(
    model: HookedRootModule,
    task: Task,
    params: dict[str, torch.nn.Parameter],
    config: FinetuneConfig | None = None,
    progress: bool = True,
    desc: str = "finetune",
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Train only `params` of `model` on `task` in the zero-shot layout (no prompt).

    The same loop as prompt tuning (`tuning.loop.train_loop`): input as for zero-shot
    evaluation, prediction at the last position (the mask for a masked LM),
    cross-entropy over the verbalizer logits, AdamW with a linear schedule and
    warm-up, dev evaluations keeping the best parameters, and with `out` the
    same checkpoints and exact resume. Every parameter is frozen again on
    return, also after an error.
    """
    cfg = config or FinetuneConfig()
    verbalizer = Verbalizer(model.tokenizer, task.spec.label_words)
    t0 = time.perf_counter()
    state = train_loop(
        model, task, verbalizer, params, cfg, prompt=None, out=Path(out) if out else None, progress=progress, desc=desc
    )
    if out is not None:
        remove_checkpoint(Path(out))
    return {
        "steps_run": state["step"],
        "best_step": state["best_step"],
        "dev_accuracy": state["best_dev"],
        "history": state["history"],
        "train_seconds": time.perf_counter() - t0,
        "n_trainable_tensors": len(params),
        "n_trainable_parameters": int(sum(p.numel() for p in params.values())),
    }


def save_trained(params: dict[str, torch.nn.Parameter], path: str | Path) -> None:
    # Clones: split views (GPT-2's q/k/v biases) share storage, which safetensors refuses.
    atomic_tensors(path, {n: p.detach().cpu().clone() for n, p in params.items()})


def load_trained(params: dict[str, torch.nn.Parameter], path: str | Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(path))
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved))[:3], sorted(set(saved) - set(params))[:3]
        raise VariantError(
            f"{path} holds other parameters than the model's trainable ones (missing {missing}, extra {extra})"
        )
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape:
                raise VariantError(f"{path}: {n} has shape {tuple(saved[n].shape)}, the model's {tuple(p.shape)}")
            p.copy_(saved[n].to(device=p.device, dtype=p.dtype))
