"""Pruned models: keep only the skill neurons of the upper layers (method §7).

In each chosen layer only the top `keep` fraction of neurons (by predictivity,
ranked within the layer) remain. Every other neuron is frozen at its baseline
activation (train mean, averaged over runs and prompt positions: the value the
`mean` ablation uses) and folded into the output bias,

    b_out += W_out[removed]ᵀ · baseline[removed]

(only the removed neurons: the reference also added the kept ones, a bug).
`W_in` / `W_gate` rows, `b_in` and `W_out` columns are sliced to the kept
neurons, so the pruned model is smaller and faster. Architectures without an
output bias (Llama's `down_proj`) get one.

The pruned model is a `TransformerBridge` over a modified copy of the Hugging
Face model. Its pruned layers have MLPs of the kept width: hook
`blocks.{l}.mlp.hook_post` has that many columns there (neuron j of the
pruned layer is neuron `kept[l][j]` of the original), while
`model_spec(model).d_mlp` stays the original width. Code that assumes
`d_mlp` columns in every layer (recorders, perturbations) therefore works on
the unpruned layers only; `pruning_of(model)` gives the kept neurons.

A pruned-model directory holds `pruned.safetensors` (the whole Hugging Face
state dict), `kept_neurons.json` (kept indices per layer, model spec, dtype),
`config.json` and, for models that are not bundled, `tokenizer/`;
`load_pruned(dir)` rebuilds the model from them. `experiments.pruning.prune_experiment`
adds `prune.json` (sizes, accuracies, timings).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from tl_skill import compat
from tl_skill.basis import require_neuron_basis
from tl_skill.compat import HookedRootModule
from tl_skill.errors import CertificationError, PruneError
from tl_skill.files import atomic_json, atomic_write, temp_path
from tl_skill.models import KNOWN_MODELS, ModelSpec, load_model, model_spec, resolve_device
from tl_skill.neurons import SkillNeurons

log = logging.getLogger(__name__)

PRUNE_JSON = "prune.json"
PRUNED_WEIGHTS = "pruned.safetensors"
KEPT_JSON = "kept_neurons.json"
HF_CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"
DEFAULT_LAYER_FRACTION = 0.75  # the reference pruned the top 9 of 12 layers


@dataclass(frozen=True)
class Pruning:
    """Which neurons a pruned model kept: {real layer: ascending original indices}."""

    keep: float
    d_mlp: int
    kept: dict[int, tuple[int, ...]]
    mlp_paths: dict[int, str] = field(default_factory=dict)  # each layer's MLP module in the Hugging Face model

    @property
    def layers(self) -> list[int]:
        return sorted(self.kept)

    def to_dict(self) -> dict[str, Any]:
        return {
            "keep": self.keep,
            "d_mlp": self.d_mlp,
            "layers": self.layers,
            "kept": {str(l): list(self.kept[l]) for l in self.layers},
            "mlp_paths": {str(l): p for l, p in sorted(self.mlp_paths.items())},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pruning:
        return cls(
            float(d["keep"]),
            int(d["d_mlp"]),
            {int(l): tuple(int(i) for i in idx) for l, idx in d["kept"].items()},
            {int(l): str(p) for l, p in (d.get("mlp_paths") or {}).items()},
        )


# Where files saved before `mlp_paths` was recorded keep each layer's MLP (the families pruning had then).
_LEGACY_MLP_PATHS = (
    "transformer.h.{l}.mlp",
    "model.layers.{l}.mlp",
    "bert.encoder.layer.{l}",
    "roberta.encoder.layer.{l}",
)


def _legacy_mlp_path(hf: Any, layer: int) -> str:
    for template in _LEGACY_MLP_PATHS:
        path = template.format(l=layer)
        try:
            hf.get_submodule(path)
            return path
        except AttributeError:
            continue
    raise PruneError(f"cannot find layer {layer}'s MLP in {type(hf).__name__}; prune the model again")


def pruning_of(model: HookedRootModule) -> Pruning | None:
    """The `Pruning` of a model made by `prune` or `load_pruned`; None for an unpruned model."""
    return getattr(model, "_tl_skill_pruning", None)


# ----------------------------------------------------------------------------- HF module surgery
@dataclass
class _MLP:
    """The neuron-facing linear maps of one layer: (parent module, attribute) pairs."""

    ins: list[tuple[nn.Module, str, int]]  # W_in and W_gate: k rows per neuron (k blocks of d_mlp; fused: k = 2)
    out: tuple[nn.Module, str]  # W_out: one output vector per neuron


def _mlp_of(hf: Any, path: str, d_model: int, d_mlp: int) -> _MLP:
    """The maps of the MLP at `path` of `hf`, found from its structure (`compat.mlp_linear_maps`)."""
    mlp = hf.get_submodule(path)
    try:
        ins, out = compat.mlp_linear_maps(mlp, d_model, d_mlp)
    except CertificationError as exc:
        raise PruneError(f"pruning cannot slice {type(mlp).__name__} ({path}): {exc}") from None

    def split(name: str) -> tuple[nn.Module, str]:
        parent, _, attr = name.rpartition(".")
        return (mlp.get_submodule(parent) if parent else mlp), attr

    return _MLP([(*split(n), k) for n, k in ins], split(out))


def _is_conv1d(m: Any) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def _check_linear(m: Any, where: str) -> None:
    if not (_is_conv1d(m) or isinstance(m, nn.Linear)):
        raise PruneError(f"{where} is a {type(m).__name__}; pruning handles nn.Linear and Conv1D only")


def _neuron_count(m: Any, side: str) -> int:
    """Neurons a map produces (`side="in"`) or consumes (`side="out"`)."""
    if _is_conv1d(m):
        return m.nf if side == "in" else m.nx
    return m.out_features if side == "in" else m.in_features


def _slice_in(m: Any, kept: torch.Tensor, blocks: int = 1, d_mlp: int = 0) -> None:
    """Keep only the output units `kept` of W_in / W_gate (and b_in); of each of `blocks` blocks of `d_mlp`."""
    if blocks > 1:
        kept = torch.cat([kept + j * d_mlp for j in range(blocks)])
    dim = 1 if _is_conv1d(m) else 0  # Conv1D stores [d_model, d_mlp], Linear [d_mlp, d_model]
    m.weight = nn.Parameter(m.weight.detach().index_select(dim, kept).clone(), requires_grad=False)
    if m.bias is not None:
        m.bias = nn.Parameter(m.bias.detach()[kept].clone(), requires_grad=False)
    if _is_conv1d(m):
        m.nf = len(kept)
    else:
        m.out_features = len(kept)


def _out_vectors(m: Any) -> torch.Tensor:
    """W_out as [d_mlp, d_model]: neuron i adds `activation_i * row i` to the residual stream."""
    return m.weight.detach() if _is_conv1d(m) else m.weight.detach().T


def _slice_out(m: Any, kept: torch.Tensor, fold: torch.Tensor) -> None:
    """Keep only the input units `kept` of W_out and add `fold` [d_model] to its bias (created if absent)."""
    dim = 0 if _is_conv1d(m) else 1
    w = m.weight.detach()
    bias = (
        m.bias.detach().double()
        if m.bias is not None
        else torch.zeros(fold.shape, dtype=torch.float64, device=w.device)
    )
    m.weight = nn.Parameter(w.index_select(dim, kept).clone(), requires_grad=False)
    m.bias = nn.Parameter((bias + fold.to(bias.device)).to(w.dtype), requires_grad=False)
    if _is_conv1d(m):
        m.nx = len(kept)
    else:
        m.in_features = len(kept)


def _prune_layer(hf: Any, mlp: _MLP, layer: int, kept: torch.Tensor, baseline: torch.Tensor | None) -> None:
    """Slice layer `layer` to `kept`; removed neurons frozen at `baseline` [d_mlp] (None: fold nothing)."""
    out_parent, out_attr = mlp.out
    out = getattr(out_parent, out_attr)
    _check_linear(out, f"layer {layer}'s {out_attr}")
    for parent, attr, _ in mlp.ins:
        _check_linear(getattr(parent, attr), f"layer {layer}'s {attr}")
    vectors = _out_vectors(out)
    d_mlp = vectors.shape[0]
    kept = kept.to(device=vectors.device, dtype=torch.long)
    if baseline is None:
        fold = torch.zeros(vectors.shape[1], dtype=torch.float64, device=vectors.device)
    else:
        removed = torch.ones(d_mlp, dtype=torch.bool, device=vectors.device)
        removed[kept] = False
        b = baseline.to(device=vectors.device, dtype=torch.float64)
        fold = b[removed] @ vectors[removed].double()
    for parent, attr, blocks in mlp.ins:
        _slice_in(getattr(parent, attr), kept, blocks, d_mlp)
    _slice_out(out, kept, fold)


def count_parameters(model: HookedRootModule) -> int:
    """Parameters of the Hugging Face model under a bridge (shared tensors counted once).

    Counted on the unwrapped model: some bridge components (GPT-2's joint QKV
    attention) hold split copies of weights that the model itself does not have.
    """
    return sum(p.numel() for p in compat.plain_hf_copy(compat.hf_model_of(model), share_tensors=True).parameters())


# ----------------------------------------------------------------------------- prune
def default_layers(layers: Sequence[int], fraction: float = DEFAULT_LAYER_FRACTION) -> list[int]:
    """The top `fraction` of `layers` (at least one): the top 9 of 12 for the default 0.75."""
    layers = sorted(layers)
    n = max(1, int(fraction * len(layers)))
    return layers[len(layers) - n :]


def check_mlp_units(neurons: SkillNeurons) -> None:
    """Pruning removes MLP neurons: refuse skill units of any other source (resid, attn, SAE latents)."""
    if neurons.units != "mlp":
        raise PruneError(
            f"pruning removes MLP neurons, but these skill units are {neurons.units!r} units; "
            "find skill neurons with units='mlp' (the default) to prune"
        )


def check_prune_arguments(
    model: HookedRootModule, neurons: SkillNeurons, keep: float, layers: Sequence[int] | None
) -> list[int]:
    check_mlp_units(neurons)
    if not compat.is_bridge(model):
        raise PruneError(
            f"pruning edits the Hugging Face model under a TransformerBridge; {type(model).__name__} has "
            "none. On TransformerLens 3.x load the model with load_model(name, kind='bridge')"
        )
    compat.check_neuron_axis(model, PruneError)
    require_neuron_basis(model, "pruning", PruneError)
    spec = model_spec(model)
    if not isinstance(keep, (int, float)) or not 0 < keep <= 1 or not math.isfinite(keep):
        raise PruneError(f"keep must be a fraction in (0, 1], got {keep!r}")
    if pruning_of(model) is not None:
        raise PruneError("the model is already pruned; prune the original model")
    if neurons.model != spec.name:
        raise PruneError(f"the skill neurons were found on {neurons.model!r} but the model is {spec.name!r}")
    if neurons.d_mlp != spec.d_mlp or neurons.baseline.shape[-1] != spec.d_mlp:
        raise PruneError(f"the skill neurons have d_mlp={neurons.d_mlp} but the model has {spec.d_mlp}")
    if layers is None:
        chosen = default_layers(neurons.layers)
    else:
        chosen = sorted({int(l) for l in layers})
        if not chosen:
            raise PruneError("no layers to prune")
        bad = [l for l in chosen if not 0 <= l < spec.n_layers]
        if bad:
            raise PruneError(f"layers {bad} out of range: the model has {spec.n_layers} layers (0-{spec.n_layers - 1})")
        missing = [l for l in chosen if l not in neurons.layers]
        if missing:
            raise PruneError(
                f"layers {missing} have no skill-neuron predictivity: the neurons cover layers {neurons.layers}"
            )
    if int(keep * spec.d_mlp) < 1:
        raise PruneError(f"keep={keep} keeps no neuron of the {spec.d_mlp} per layer; raise keep")
    return chosen


def prune_model(
    model: HookedRootModule, neurons: SkillNeurons | str | Path, keep: float = 0.02, layers: Sequence[int] | None = None
) -> HookedRootModule:
    """A pruned copy of `model` keeping the top `keep` skill neurons of each of `layers`.

    Args:
        model: a `TransformerBridge` from `load_model` (left unchanged).
        neurons: the task's `SkillNeurons` (or their directory), found on this model.
        keep: fraction of each layer's neurons kept, ranked within the layer by
            predictivity (`int(keep * d_mlp)` neurons per layer).
        layers: real layer indices to prune; default the top 75% of the layers the
            neurons cover (all layers, normally).

    Returns:
        A new `TransformerBridge`; `pruning_of(result)` lists the kept neurons.
    """
    if not isinstance(neurons, SkillNeurons):
        neurons = SkillNeurons.load(neurons)
    chosen = check_prune_arguments(model, neurons, keep, layers)
    spec = model_spec(model)
    mask = neurons.select(fraction=keep, per_layer=True)  # rows follow neurons.layers
    baseline = neurons.baseline.double().mean(dim=(0, 2))  # [rows, d_mlp]
    kept_idx = {layer: torch.nonzero(mask[neurons.layers.index(layer)]).flatten() for layer in chosen}
    pruned = slice_neurons(model, kept_idx, {l: baseline[neurons.layers.index(l)] for l in chosen})
    kept = {layer: tuple(idx.tolist()) for layer, idx in kept_idx.items()}
    paths = {layer: compat.mlp_module_path(model, layer) for layer in chosen}
    cast(Any, pruned)._tl_skill_pruning = Pruning(float(keep), spec.d_mlp, kept, paths)
    log.info(
        "pruned %s: layers %s keep %d of %d neurons each; %d -> %d parameters",
        spec.name,
        chosen,
        len(next(iter(kept.values()))),
        spec.d_mlp,
        count_parameters(model),
        count_parameters(pruned),
    )
    return pruned


def slice_neurons(
    model: HookedRootModule,
    kept: dict[int, torch.Tensor],
    baseline: dict[int, torch.Tensor] | None = None,
) -> HookedRootModule:
    """A copy of bridge `model` whose layers keep only neurons `kept[layer]`; a removed neuron is frozen at
    `baseline[layer][i]` (folded into the output projection's bias), or at zero without `baseline`.

    The MLP's maps are found from each layer's module structure (`compat.mlp_linear_maps`), so every family
    with separate in/gate/out maps can be sliced; `model` is left unchanged.
    """
    spec = model_spec(model)
    hf_orig = compat.hf_model_of(model)
    paths = {layer: compat.mlp_module_path(model, layer) for layer in kept}
    hf = compat.plain_hf_copy(hf_orig, share_tensors=False)
    width = {layer: compat.projection_width(model, layer) for layer in kept}
    for layer, idx in kept.items():
        mlp = _mlp_of(hf, paths[layer], spec.d_model, width[layer])
        _prune_layer(hf, mlp, layer, idx, None if baseline is None else baseline[layer])
    return _bridge(hf, model.tokenizer, spec, compat.model_device(model), compat.model_prefix_ids(model))


def _bridge(hf: Any, tokenizer, spec: ModelSpec, device, prefix_ids) -> Any:
    """A frozen, eval-mode bridge over `hf` that keeps `hf`'s attention implementation and layout prefix."""
    attn = getattr(hf.config, "_attn_implementation", None)
    hf.eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    bridge = compat.build_bridge(hf, tokenizer, spec.name, device=str(device))
    setattr(bridge, compat.PREFIX_ATTR, tuple(prefix_ids))
    if (
        attn is not None
        and getattr(hf.config, "_attn_implementation", None) != attn
        and hasattr(hf, "set_attn_implementation")
    ):
        hf.set_attn_implementation(attn)  # the bridge forces eager on pre-loaded models
    bridge.eval()
    for p in bridge.parameters():
        p.requires_grad_(False)
    setattr(bridge, "_tl_skill_spec", spec)  # noqa: B010 - a plain attribute
    return bridge


# ----------------------------------------------------------------------------- save / load
def save_pruned(model: HookedRootModule, out: str | Path) -> Path:
    """Write a pruned model's weights, kept neurons and config to `out` (see the module docstring)."""
    from safetensors.torch import save_model

    pruning = pruning_of(model)
    if pruning is None:
        raise PruneError("the model is not pruned (it was not made by prune or load_pruned)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spec = model_spec(model)
    hf = compat.plain_hf_copy(compat.hf_model_of(model), share_tensors=True)
    atomic_write(out / PRUNED_WEIGHTS, lambda tmp: save_model(hf, str(tmp)))
    atomic_write(out / HF_CONFIG, lambda tmp: hf.config.to_json_file(str(tmp)))
    bundled = spec.name in KNOWN_MODELS
    if not bundled:  # a directory of files: written beside, then renamed into place
        tmp_dir = temp_path(out / TOKENIZER_DIR)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        model.tokenizer.save_pretrained(str(tmp_dir))
        shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
        tmp_dir.rename(out / TOKENIZER_DIR)
    atomic_json(
        out / KEPT_JSON,
        {
            **pruning.to_dict(),
            "model_spec": spec.to_dict(),
            "bundled": bundled,
            "dtype": str(compat.model_dtype(hf)).removeprefix("torch."),
            "hf_class": type(hf).__name__,
            "prefix_ids": compat.model_prefix_ids(model),
        },
    )
    return out


def _fresh_hf(path: Path, info: dict[str, Any]):
    """The original architecture with untrained weights and its tokenizer, from a saved config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(path))
    archs = getattr(config, "architectures", None) or [info.get("hf_class", "")]
    auto = AutoModelForMaskedLM if any(a.endswith("ForMaskedLM") for a in archs) else AutoModelForCausalLM
    hf = auto.from_config(config, attn_implementation=getattr(config, "_attn_implementation", None) or "eager")
    tok_dir = path / TOKENIZER_DIR
    if not tok_dir.is_dir():
        raise PruneError(f"{path} has no {TOKENIZER_DIR}/ to rebuild {info['model_spec']['name']!r} from")
    return hf, AutoTokenizer.from_pretrained(str(tok_dir))


def load_pruned(path: str | Path, device: str | torch.device | None = None) -> HookedRootModule:
    """Rebuild a pruned model saved by `save_pruned` (or `prune_experiment`).

    The original architecture comes from `load_model(name)` for bundled models,
    else from the saved Hugging Face config and tokenizer; its modules are
    sliced to the saved kept neurons and the saved weights loaded over them.
    """
    from safetensors.torch import load_model as load_weights

    path = Path(path)
    missing = [f for f in (PRUNED_WEIGHTS, KEPT_JSON) if not (path / f).exists()]
    if missing:
        raise PruneError(f"{path} holds no pruned model: missing {', '.join(missing)}")
    info = json.loads((path / KEPT_JSON).read_text())
    pruning = Pruning.from_dict(info)
    spec = ModelSpec(**info["model_spec"])
    dev = resolve_device(device)
    if info.get("bundled") and spec.name in KNOWN_MODELS:
        base = load_model(spec.name, device="cpu", dtype=info.get("dtype"), kind="bridge")
        hf, tokenizer = compat.unwrapped(compat.hf_model_of(base)), base.tokenizer
        prefix = compat.model_prefix_ids(base)
        del base
    else:
        hf, tokenizer = _fresh_hf(path, info)
        # saved by 0.2.0 without it: the saved tokenizer is the bridge's (BOS on); 0.2.0 put no prefix
        prefix = info.get("prefix_ids", [])
    for layer in pruning.layers:
        where = pruning.mlp_paths.get(layer) or _legacy_mlp_path(hf, layer)
        mlp = _mlp_of(hf, where, spec.d_model, pruning.d_mlp)
        _prune_layer(hf, mlp, layer, torch.tensor(pruning.kept[layer], dtype=torch.long), None)
    try:
        load_weights(hf, str(path / PRUNED_WEIGHTS), strict=True)
    except RuntimeError as exc:
        raise PruneError(f"the weights in {path / PRUNED_WEIGHTS} do not fit the rebuilt model: {exc}") from exc
    hf = hf.to(dev)
    model = _bridge(hf, tokenizer, spec, dev, prefix)
    model._tl_skill_pruning = pruning
    return model


def prune(
    model: HookedRootModule, neurons: SkillNeurons | str | Path, keep: float = 0.02, layers: Sequence[int] | None = None
) -> HookedRootModule:
    """Deprecated name of `prune_model` (kept for one release: `tl_skill.prune` is this module)."""
    warnings.warn("tl_skill.prune.prune is deprecated; use tl_skill.prune_model", DeprecationWarning, stacklevel=2)
    return prune_model(model, neurons, keep, layers)
