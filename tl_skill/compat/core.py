"""Every TransformerLens-version detail lives here.

The rest of tl_skill talks to `HookedRootModule` hook points by name and to the
helpers below; it never asks which TransformerLens it runs on.

Supported: TransformerLens 4.x (`TransformerBridge` over a Hugging Face model)
and 3.9 (`HookedTransformer` with the Hugging Face weights converted
unprocessed, or the bridge with `kind="bridge"`). What differs between the two
model classes, and is handled here: how a model is built (`build_model`),
the hook on the word embeddings where the soft prompt goes (`embed_hook`), the
unembedding (`unembedding`), gated MLPs (`gated_mlp`), and whether a Hugging
Face model sits underneath (`is_bridge`, `hf_model_of`; pruning needs one).
"""

from __future__ import annotations

import collections
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import tempfile
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from tl_skill.errors import CertificationError, UnsupportedModelError

try:  # its own module since TransformerLens 3.0 (the hook_points re-export was removed in 4.0)
    from transformer_lens.HookedRootModule import HookedRootModule as _HookedRootModule
except ImportError:  # pragma: no cover - releases before 3.0
    from transformer_lens.hook_points import HookedRootModule as _HookedRootModule  # type: ignore[no-redef]

if TYPE_CHECKING:

    class HookedRootModule(_HookedRootModule):
        """What type checkers see: TransformerLens models carry `cfg`, `tokenizer`, `blocks`, ... as attributes
        set at run time (torch's `Module.__getattr__` would type each as `Tensor | Module`)."""

        def __getattr__(self, name: str) -> Any: ...

else:
    HookedRootModule = _HookedRootModule

TL_VERSION: str = importlib.metadata.version("transformer-lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])
# Late 3.x releases ship both model classes; 4.0 removed HookedTransformer.
HAS_BRIDGE: bool = importlib.util.find_spec("transformer_lens.model_bridge") is not None
HAS_HOOKED_TRANSFORMER: bool = importlib.util.find_spec("transformer_lens.HookedTransformer") is not None
MODEL_KINDS = ("bridge", "hooked")
# What `load_model` builds: on 3.x the HookedTransformer that code pinned to 3.x expects.
DEFAULT_KIND: str = "bridge" if TL_MAJOR >= 4 or not HAS_HOOKED_TRANSFORMER else "hooked"

log = logging.getLogger(__name__)

# The word-embedding output. Not the `hook_embed` alias: on BERT bridges that
# aliases `embed_ln.hook_out` (word + position + type embeddings after the
# LayerNorm), so a prompt written there would skip position embeddings and the
# LayerNorm, unlike `inputs_embeds` prompt tuning, and start at the wrong scale.
EMBED_HOOK = "embed.hook_out"
# HookedTransformer's word-embedding output (it adds positions after this hook).
HOOKED_EMBED_HOOK = "hook_embed"


def embed_hook(model: HookedRootModule) -> str:
    """The hook point on the word embeddings (before positions and any LayerNorm) of `model`."""
    return EMBED_HOOK if EMBED_HOOK in model.hook_dict else HOOKED_EMBED_HOOK


def is_bridge(model: HookedRootModule) -> bool:
    """True for a TransformerBridge (a Hugging Face model underneath), False for a HookedTransformer."""
    return getattr(model, "original_model", None) is not None


def gated_mlp(model: HookedRootModule) -> bool:
    """True when the neurons are a gated product act(x W_gate) * (x W_in) (Llama-style MLPs)."""
    if is_bridge(model):
        return "blocks.0.mlp.gate.hook_out" in model.hook_dict
    return bool(getattr(model.cfg, "gated_mlp", False))


def mlp_post_hook(layer: int) -> str:
    """Name of the hook point holding the MLP hidden activation (the neurons) of `layer`."""
    return f"blocks.{layer}.mlp.hook_post"


def is_masked_lm(hf_model: Any) -> bool:
    archs = list(getattr(hf_model.config, "architectures", None) or []) + [type(hf_model).__name__]
    return any(a.endswith("ForMaskedLM") for a in archs)


def check_kind(kind: str | None) -> None:
    """Refuse an unknown model kind, or one this TransformerLens lacks, before any loading."""
    if kind is not None and kind not in MODEL_KINDS:
        raise UnsupportedModelError(f"model kind must be one of {MODEL_KINDS}, got {kind!r}")
    if kind == "hooked" and not HAS_HOOKED_TRANSFORMER:
        raise UnsupportedModelError(
            f"transformer-lens {TL_VERSION} has no HookedTransformer (removed in 4.0); use kind='bridge'"
        )
    if kind == "bridge" and not HAS_BRIDGE:
        raise UnsupportedModelError(
            f"transformer-lens {TL_VERSION} has no TransformerBridge; use kind='hooked' or transformer-lens >= 3.9"
        )


def build_model(
    hf_model: Any, tokenizer: Any, name: str, device: str | None = None, kind: str | None = None
) -> HookedRootModule:
    """The TransformerLens model over a loaded Hugging Face model.

    Args:
        kind: "bridge" (TransformerBridge) or "hooked" (HookedTransformer, with the
            weights converted unprocessed); default `DEFAULT_KIND`: the bridge on
            TransformerLens 4.x, the HookedTransformer on 3.x. HookedTransformer is
            causal only, so masked LMs get a bridge when the default is asked for.
    """
    check_kind(kind)
    prefix = special_prefix(tokenizer)  # before TransformerLens switches BOS on
    model = _build_model(hf_model, tokenizer, name, device, kind)
    setattr(model, PREFIX_ATTR, tuple(prefix))
    return model


def _build_model(hf_model: Any, tokenizer: Any, name: str, device: str | None, kind: str | None):
    chosen = kind or DEFAULT_KIND
    if chosen == "hooked" and is_masked_lm(hf_model):
        if kind == "hooked" or not HAS_BRIDGE:
            raise UnsupportedModelError(
                f"{name!r} is a masked LM: HookedTransformer is causal only"
                + ("" if HAS_BRIDGE else f", and transformer-lens {TL_VERSION} has no TransformerBridge")
            )
        log.info("%s is a masked LM: using a TransformerBridge", name)
        chosen = "bridge"
    if chosen == "bridge":
        return build_bridge(hf_model, tokenizer, name, device=device)
    return build_hooked_transformer(hf_model, tokenizer, name, device=device)


def build_hooked_transformer(hf_model: Any, tokenizer: Any, name: str, device: str | None = None) -> HookedRootModule:
    """A HookedTransformer (TransformerLens 3.x) holding `hf_model`'s weights, unprocessed.

    No LayerNorm folding, weight centring or bias folding: every hook point holds
    what the Hugging Face model computes (to float rounding), so the neurons are
    those of the original model. `tokenizer` is attached as it is (TransformerLens
    would otherwise reload it with a BOS token, from the hub for hub models).
    """
    check_kind("hooked")
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading

    config = hf_model.config.to_dict()
    # TransformerLens reads the architecture name and GPT-2's `n_ctx` from the
    # config; configs built in code (the tiny models) lack both.
    config["architectures"] = config.get("architectures") or [type(hf_model).__name__]
    if "n_positions" in config:
        config.setdefault("n_ctx", config["n_positions"])
    dtype = model_dtype(hf_model)
    with tempfile.TemporaryDirectory(prefix="tl_skill_") as tmp:
        path = Path(tmp) / "hf_config"
        # TransformerLens takes any path containing these words for a model of that name.
        if any(word in str(path).lower() for word in ("llama", "gemma")):
            raise UnsupportedModelError(f"the temporary directory {path} must not contain 'llama' or 'gemma'")
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config, default=str))
        try:
            cfg_dict = loading.convert_hf_model_config(str(path))
        except (ValueError, KeyError, NotImplementedError) as exc:
            raise UnsupportedModelError(
                f"HookedTransformer cannot load {config['architectures'][0]} ({exc}); use kind='bridge'"
            ) from exc
        n_inner = getattr(hf_model.config, "n_inner", None)
        if n_inner:  # TransformerLens 3.x assumes GPT-2's d_mlp is 4 * d_model
            cfg_dict["d_mlp"] = int(n_inner)
        cfg_dict.update(
            model_name=name,
            tokenizer_name=None,
            init_weights=False,
            n_devices=1,
            device=str(device or model_device(hf_model)),
            dtype=dtype,
            default_prepend_bos=False,
            from_checkpoint=False,
        )
        cfg = HookedTransformerConfig.from_dict(cfg_dict)
        state_dict = loading.get_pretrained_state_dict(str(path), cfg, hf_model=hf_model, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "use TransformerBridge": that is the point
        model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.tokenizer = tokenizer
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
    return model.to(cfg.device, print_details=False)  # its default prints


def build_bridge(hf_model: Any, tokenizer: Any, name: str, device: str | None = None) -> HookedRootModule:
    """Wrap a Hugging Face model (already loaded) in a TransformerBridge."""
    check_kind("bridge")
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, device=device)
    return cast(HookedRootModule, bridge)  # a TransformerBridge is a HookedRootModule


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens `tokenizer` puts before a text (Gemma's `<bos>`; none for GPT-2 or SmolLM2).

    Read off the tokenizer's behaviour (its `add_bos_token` setting or post-processor). Special
    tokens it appends (an EOS) are left out: a causal layout puts the prompt after the input.
    """
    probe = "a b"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return [int(i) for i in full[:k]]
    return []


PREFIX_ATTR = "_tl_skill_prefix_ids"

# What tl_skill tells once per model about how it treats a model built outside `load_model`:
# {model: {topic: sentence}}, logged at INFO when first said and recorded in result files.
_NOTICES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, str]] = weakref.WeakKeyDictionary()


def notice(model: torch.nn.Module, topic: str, sentence: str) -> None:
    """Say `sentence` about `model` once (logging at INFO) and keep it for the result files (`model_notices`)."""
    said = _NOTICES.setdefault(model, {})
    if said.get(topic) != sentence:
        said[topic] = sentence
        log.info("%s", sentence)


def model_notices(model: torch.nn.Module) -> dict[str, str]:
    """What was said about `model` so far ({topic: sentence}): run.json and neurons.json record it."""
    return dict(_NOTICES.get(model, {}))


def say_training_mode(model: torch.nn.Module) -> None:
    """Say once (`notice`) when `model` is in training mode with active dropout: every pass is then random."""
    live = [m for m in model.modules() if m.training and isinstance(m, torch.nn.Dropout) and m.p > 0]
    if live:
        notice(
            model,
            "training_mode",
            f"the model is in training mode: {len(live)} dropout module(s) make every pass random; call "
            "model.eval() first (tl_skill.load_model returns models in eval mode)",
        )


def set_special_prefix(model: HookedRootModule, token_ids: list[int]) -> None:
    """Choose the special tokens every row starts with (before the text) for a model you built yourself,
    e.g. `[]` for none, as `load_model` does for tokenizers that add none as the model ships them."""
    if not all(isinstance(t, int) and 0 <= t < int(model.cfg.d_vocab) for t in token_ids):
        raise UnsupportedModelError(f"token ids must be integers in [0, {model.cfg.d_vocab}), got {token_ids}")
    setattr(model, PREFIX_ATTR, tuple(token_ids))


def model_prefix_ids(model: HookedRootModule) -> list[int]:
    """The special tokens a causal layout puts first for `model`.

    For a model from `load_model`: what its tokenizer adds as the model ships it (TransformerLens
    turns BOS on for every tokenizer that has one when it boots a bridge, which SmolLM2 never saw
    in front of a text). For a model you built yourself: what its tokenizer adds now.
    """
    stored = getattr(model, PREFIX_ATTR, None)
    if stored is not None:
        return list(stored)
    prefix = special_prefix(model.tokenizer)
    if prefix:
        shown = model.tokenizer.convert_ids_to_tokens(prefix)
        notice(
            model,
            "special_prefix",
            f"every row starts with {shown} (what this model's tokenizer puts before a text now; a "
            "TransformerBridge booted by TransformerLens turns BOS on for tokenizers that have one, where "
            "tl_skill.load_model keeps the tokenizer as the model ships it). To start rows with nothing: "
            "tl_skill.compat.set_special_prefix(model, [])",
        )
    return prefix


@torch.no_grad()
def embed_tokens(model: HookedRootModule, tokens: torch.Tensor) -> torch.Tensor:
    """What the word-embedding hook (`embed_hook`) sees for `tokens`, without running the model.

    On a bridge this calls the Hugging Face embedding module under the wrapper (with any scale it
    applies, as Gemma's does), so no hook point fires: the user's hooks see nothing.
    """
    module = model.embed
    while WRAPPER in module._modules:
        module = module._modules[WRAPPER]
    return module(tokens.to(model_device(model)))


def context_length(model: HookedRootModule) -> int | None:
    """How many positions the model takes (`cfg.n_ctx`), where it says."""
    n = getattr(getattr(model, "cfg", None), "n_ctx", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_hook_width(
    act: torch.Tensor, expected: int, name: str, error: type[Exception] = UnsupportedModelError
) -> None:
    """Refuse a hook point whose last axis is not the width the caller's units assume.

    On a pruned model `mlp.hook_post` has the kept width; on mixture-of-experts
    blocks some bridges alias it to the block output (d_model): a recorder or a
    perturbation would then read or edit the wrong columns.
    """
    if act.shape[-1] != expected:
        raise error(
            f"hook point {name} has width {act.shape[-1]}, but {expected} units (d_mlp) were expected: it "
            "does not hold one value per MLP neuron of this model (a pruned model, or an architecture whose "
            "mlp.hook_post is not the neuron axis, such as mixture-of-experts blocks)"
        )


def mixture_of_experts(model: HookedRootModule) -> bool:
    """True when the MLP blocks route tokens to experts (Mixtral, Qwen-MoE, ...): `mlp.hook_post` is no
    neuron axis there (bridges alias it to the block output)."""
    names = [n for n in model.hook_dict if n.startswith("blocks.0.mlp.")]
    return any(word in n for n in names for word in ("expert", "router"))


def check_neuron_axis(model: HookedRootModule, error: type[Exception] = UnsupportedModelError) -> None:
    """Refuse, before any work, a model whose MLP hook point does not hold one value per neuron."""
    if mixture_of_experts(model):
        raise error(
            f"{type(model).__name__} over {getattr(model.cfg, 'model_name', None) or 'this model'} has "
            "mixture-of-experts MLP blocks: blocks.{l}.mlp.hook_post holds the block output (width "
            f"{model.cfg.d_model}), not one value per neuron (d_mlp {model.cfg.d_mlp}), so MLP neurons cannot be "
            "recorded, perturbed or pruned; prompt tuning and evaluation still work"
        )


def hf_model_of(model: HookedRootModule) -> Any:
    """The Hugging Face model under a bridge."""
    hf = getattr(model, "original_model", None)
    if hf is None:
        raise TypeError(
            f"{type(model).__name__} wraps no Hugging Face model; this operation needs a "
            "TransformerBridge (on TransformerLens 3.x: load_model(name, kind='bridge'))"
        )
    return hf


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def forward(model: HookedRootModule, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Run the model on token ids with an attention mask; returns logits [batch, pos, vocab].

    Both the bridge and HookedTransformer derive position ids from the mask
    (left padding keeps real positions at 0, 1, 2, ...).
    """
    return model(input_ids, attention_mask=attention_mask, return_type="logits")


@contextlib.contextmanager
def hooks_paused(model: HookedRootModule) -> Iterator[None]:
    """Context in which no hook on any hook point of `model` fires (anyone's: the user's, a recorder's); they
    are all back, in order, on leaving. For tl_skill's own probe passes, which must neither disturb nor be
    disturbed by what listens to the model; hooks added inside are gone on leaving."""
    saved = []
    points = {id(hp): hp for hp in model.hook_dict.values()}  # a bridge lists a hook point under each alias
    for hp in points.values():
        saved.append((hp, hp._forward_hooks, hp._forward_pre_hooks, hp._backward_hooks))
        hp._forward_hooks, hp._forward_pre_hooks, hp._backward_hooks = (
            collections.OrderedDict(),
            collections.OrderedDict(),
            collections.OrderedDict(),
        )
    try:
        yield
    finally:
        for hp, fwd, pre, bwd in saved:
            hp._forward_hooks, hp._forward_pre_hooks, hp._backward_hooks = fwd, pre, bwd


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Context in which every module of `model` is in eval mode (no dropout); each module's own flag is back
    on leaving. For probe passes whose results must not be random."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def hook_names(model: HookedRootModule) -> set[str]:
    return set(model.hook_dict.keys())


UNEMBED_IN_HOOK = "unembed.hook_in"


class StopForward(Exception):
    """Raised inside a hook once everything needed has been seen: the rest of the model is skipped."""


def unembedding(model: HookedRootModule) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W [d_vocab, d_model], b [d_vocab] or None) of the final projection onto the vocabulary."""
    hf = getattr(model, "original_model", None)
    if hf is not None:
        out = hf.get_output_embeddings()
        return out.weight, getattr(out, "bias", None)
    return model.W_U.T, getattr(model, "b_U", None)


# ----------------------------------------------------------------------------- bridge internals
# A TransformerBridge swaps the Hugging Face model's submodules for components that
# hold the originals as `_original_component`; its blocks name their children
# `attn.{q,k,v,o,qkv}`, `mlp.{gate,in,out}`, `ln1`/`ln2`, and the model
# `embed_ln`/`ln_final`. Everything that relies on those names is here.
WRAPPER = "_original_component"
ATTN_PROJECTIONS = ("q", "k", "v", "o")
MLP_PROJECTIONS = ("gate", "in", "out")


def hf_param_name(name: str) -> str:
    """A bridge parameter path without its wrapper segments (`a._original_component.b` -> `a.b`)."""
    return ".".join(p for p in name.split(".") if p != WRAPPER)


def hf_module(component: Any) -> Any:
    """The Hugging Face module a bridge component wraps (the module itself when it wraps none)."""
    return getattr(component, WRAPPER, component)


def named_hf_parameters(prefix: str, module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """`module`'s parameters as `{prefix}.{name without wrapper segments}`."""
    return {f"{prefix}.{hf_param_name(n)}": p for n, p in module.named_parameters()}


def mlp_projections(block: Any) -> dict[str, torch.nn.Module]:
    """A bridge block's MLP projections `{gate, in, out}` that exist; {} if the MLP has no such children.

    For BERT the bridge's MLP component wraps the entire layer, attention included: only its
    projections hold the neurons' weights.
    """
    kids = block.mlp._modules
    return {c: kids[c] for c in MLP_PROJECTIONS if kids.get(c) is not None}


def _linear_dims(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a Linear-like leaf module (nn.Linear, GPT-2's Conv1D), else None."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or WRAPPER in module._modules:
        return None
    return (
        (int(w.shape[0]), int(w.shape[1])) if type(module).__name__ == "Conv1D" else (int(w.shape[1]), int(w.shape[0]))
    )


def mlp_output_projection(model: HookedRootModule, layer: int) -> tuple[str, torch.nn.Module]:
    """(path, module) of the Hugging Face module that projects layer `layer`'s MLP neurons back to the
    residual stream, found from the module's structure: the one Linear-like leaf under the bridge's MLP
    component that writes d_model values from another width (outside any attention submodule)."""
    if not is_bridge(model):
        raise CertificationError("a HookedTransformer has no Hugging Face output projection (its W_out is used)")
    d_model = int(model.cfg.d_model)
    mlp = hf_module(model.blocks[layer].mlp)
    found = []
    for name, mod in mlp.named_modules():
        dims = _linear_dims(mod)
        path = hf_param_name(name)
        if dims is None or dims[1] != d_model or dims[0] == d_model:
            continue
        if any(part in ("attention", "attn", "self_attn") for part in path.split(".")):
            continue
        found.append((path, mod))
    if not found and "out" in mlp_projections(model.blocks[layer]):
        # an MLP as wide as the residual stream (a pruned model, say): the bridge's own `out` component
        out = hf_module(mlp_projections(model.blocks[layer])["out"])
        found = [(name, mod) for name, mod in mlp.named_modules() if mod is out]
    if len(found) != 1:
        raise CertificationError(
            f"layer {layer}: cannot tell the MLP's output projection from the module structure "
            f"({len(found)} Linear modules write d_model={d_model} values from another width: "
            f"{[n for n, _ in found][:4]})"
        )
    return found[0]


def mlp_module_path(model: HookedRootModule, layer: int) -> str:
    """The dotted path, in the Hugging Face model (bridge wrappers left out), of the module the bridge's
    `blocks.{layer}.mlp` wraps (for BERT-style models, the whole layer)."""
    target = hf_module(model.blocks[layer].mlp)
    for name, mod in hf_model_of(model).named_modules():
        if mod is target:
            return hf_param_name(name)
    raise CertificationError(f"layer {layer}: the MLP module is not part of the Hugging Face model")


def mlp_linear_maps(mlp: torch.nn.Module, d_model: int, d_mlp: int) -> tuple[list[tuple[str, int]], str]:
    """(maps into the neurons, the output projection) of a Hugging Face MLP module, as dotted paths within it:
    Linear-like leaves reading d_model and writing k x d_mlp values (W_in, W_gate; k = 2 for a fused
    gate-and-up map, taken as k consecutive blocks of d_mlp), each with its k, and the one reading d_mlp and
    writing d_model values (W_out); attention submodules are left out. Found from the structure, not from
    names; `certification`'s pruning check confirms the reading on the model itself."""
    ins: list[tuple[str, int]] = []
    outs: list[str] = []
    for name, mod in mlp.named_modules():
        dims = _linear_dims(mod)
        if dims is None or any(p in ("attention", "attn", "self_attn") for p in hf_param_name(name).split(".")):
            continue
        if dims[0] == d_model and dims[1] % d_mlp == 0 and d_mlp != d_model:
            ins.append((name, dims[1] // d_mlp))
        elif dims == (d_mlp, d_model):
            outs.append(name)
    if len(outs) != 1 or not ins:
        raise CertificationError(
            f"cannot tell the MLP's maps from its structure: {len(ins)} into the {d_mlp} neurons, "
            f"{len(outs)} out of them ({outs[:3]})"
        )
    return ins, outs[0]


def projection_width(model: HookedRootModule, layer: int) -> int:
    """How many neurons layer `layer`'s MLP output projection reads (its input width)."""
    if not is_bridge(model):
        return int(model.blocks[layer].mlp.W_out.shape[0])
    dims = _linear_dims(mlp_output_projection(model, layer)[1])
    assert dims is not None
    return dims[0]


def capture_projection_input(model: HookedRootModule, layer: int, keep: Any) -> Any:
    """Call `keep(x)` with the input of layer `layer`'s MLP output projection on each forward; the handle.

    On a HookedTransformer, whose MLP multiplies by W_out as an operation, `x` is the MLP's output
    instead (`projection_compared` maps the neurons to it)."""
    if not is_bridge(model):
        point = model.blocks[layer].hook_mlp_out
        return point.register_forward_pre_hook(lambda mod, args: keep(args[0].detach().clone()))
    module = mlp_output_projection(model, layer)[1]
    return module.register_forward_pre_hook(lambda mod, args: keep(args[0].detach().clone()))


def projection_compared(model: HookedRootModule, layer: int, neurons: torch.Tensor) -> torch.Tensor:
    """What `capture_projection_input` sees when the neurons hold `neurons`: the same values on a bridge; on a
    HookedTransformer the MLP output they make, `neurons @ W_out + b_out`."""
    if is_bridge(model):
        return neurons
    mlp = model.blocks[layer].mlp
    out = neurons @ mlp.W_out.to(neurons.dtype)
    return out + mlp.b_out.to(neurons.dtype) if getattr(mlp, "b_out", None) is not None else out


def edit_projection_input(model: HookedRootModule, layer: int, neuron: int, delta: float) -> Any:
    """Add `delta` to neuron `neuron` of the input of layer `layer`'s output projection on each forward (a
    HookedTransformer: `delta * W_out[neuron]` to the MLP's output, the same change); the handle."""
    if not is_bridge(model):
        row = model.blocks[layer].mlp.W_out[neuron].detach()

        def add_out(mod, args):
            return (args[0] + delta * row.to(args[0]),)

        return model.blocks[layer].hook_mlp_out.register_forward_pre_hook(add_out)

    def add(mod, args):
        x = args[0].clone()
        x[..., neuron] += delta
        return (x, *args[1:])

    return mlp_output_projection(model, layer)[1].register_forward_pre_hook(add)


def attention_projections(block: Any) -> dict[str, torch.nn.Module]:
    """A bridge block's attention projections (`q`, `k`, `v`, `o`, or a fused `qkv` plus `o`)."""
    kids = block.attn._modules
    names = [c for c in ATTN_PROJECTIONS if kids.get(c) is not None]
    if not any(c in names for c in ("q", "k", "v")) and kids.get("qkv") is not None:
        names = ["qkv"] + names
    if not names:
        raise UnsupportedModelError(
            f"the attention has no q/k/v/o projection (children: {sorted(k for k in kids if not k.startswith('hook'))})"
        )
    return {c: kids[c] for c in names}


def block_norms(block: Any) -> list[tuple[str, torch.nn.Module]]:
    """A bridge block's normalisation components (`ln1`, `ln2`) that exist, by child name."""
    return [(ln, block._modules[ln]) for ln in ("ln1", "ln2") if block._modules.get(ln) is not None]


def model_norms(model: Any) -> list[tuple[str, torch.nn.Module]]:
    """A bridge's normalisation components outside the blocks (`embed_ln`, `ln_final`) that exist."""
    return [(top, model._modules[top]) for top in ("embed_ln", "ln_final") if model._modules.get(top) is not None]


# ----------------------------------------------------------------------------- weights read directly
def mlp_out_vectors(model: HookedRootModule, layer: int) -> torch.Tensor:
    """W_out of one layer as [d_mlp, d_model]: neuron i adds `activation_i * row i` to the residual stream."""
    if not is_bridge(model):
        return model.blocks[layer].mlp.W_out.detach()
    out = hf_module(mlp_projections(model.blocks[layer])["out"])
    if type(out).__name__ == "Conv1D":  # GPT-2 stores [d_mlp, d_model]
        return out.weight.detach()
    return out.weight.detach().T


def attn_out_vectors(model: HookedRootModule, layer: int) -> torch.Tensor:
    """W_O of one layer as [n_heads * d_head, d_model]: unit h * d_head + d of `attn.hook_z` adds `z * row`."""
    if not is_bridge(model):
        W = model.blocks[layer].attn.W_O.detach()  # [n_heads, d_head, d_model]
        return W.reshape(-1, W.shape[-1])
    out = hf_module(attention_projections(model.blocks[layer])["o"])
    if type(out).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        return out.weight.detach()
    return out.weight.detach().T


def final_norm(model: HookedRootModule) -> tuple[bool, torch.Tensor, float]:
    """(centres?, gain [d_model], eps) of the final normalisation: LayerNorm centres, RMSNorm does not.

    The normalised stream is `(x - centre) / sqrt(mean((x - centre)^2) + eps) * gain (+ bias)`.
    Gemma's RMSNorm multiplies by `1 + weight`.
    """
    if not is_bridge(model):
        kind = getattr(model.cfg, "normalization_type", "LN") or "LN"
        if kind not in ("LN", "RMS"):
            raise UnsupportedModelError(f"final normalisation {kind!r} (weights folded in) is not supported here")
        ln = model.ln_final
        return kind == "LN", ln.w.detach(), float(model.cfg.eps)
    return _hf_norm_params(hf_module(model.ln_final))


def _hf_norm_params(ln: Any) -> tuple[bool, torch.Tensor, float]:
    """(centres?, gain, eps) of a Hugging Face LayerNorm / RMSNorm module (Gemma's gain is `1 + weight`)."""
    weight = ln.weight.detach()
    eps = float(getattr(ln, "eps", getattr(ln, "variance_epsilon", 1e-5)))
    if isinstance(ln, torch.nn.LayerNorm):
        return True, weight, eps
    if "gemma" in type(ln).__name__.lower():
        return False, 1.0 + weight, eps
    return False, weight, eps


_POST_NORMS = {"mlp": "ln2_post", "attn": "ln1_post"}


def has_post_norm(model: HookedRootModule, layer: int, kind: str = "mlp") -> bool:
    """Whether the block normalises its MLP's (or attention's) output before the residual stream (`post_norm`)."""
    return getattr(model.blocks[layer], _POST_NORMS[kind], None) is not None


def post_norm(model: HookedRootModule, layer: int, kind: str = "mlp") -> dict[str, Any] | None:
    """The normalisation a block applies to its MLP's (`kind="mlp"`) or attention's (`"attn"`) output before
    adding it to the residual stream (Gemma 2/3, OLMo 2), or None where the output joins the stream as is.

    Returns {"centre": bool, "gain": [d_model], "hook": name, "scale": fn(hooked tensor [..., d]) -> [...]}:
    the hook on the norm's input and its scale at each position, for direct effects with the scale held,
    as the final norm's. Bridges only: a `HookedTransformer` with post-norms is refused (`has_post_norm`).
    """
    name = _POST_NORMS[kind]
    ln = getattr(model.blocks[layer], name, None)
    if ln is None:
        return None
    if not is_bridge(model):
        raise UnsupportedModelError(
            f"blocks.{layer}.{name}: direct paths through a HookedTransformer's post-norms are not supported "
            "(load the model as a TransformerBridge)"
        )
    centre, gain, eps = _hf_norm_params(hf_module(ln))
    return {
        "centre": centre,
        "gain": gain,
        "hook": f"blocks.{layer}.{name}.hook_in",
        "scale": lambda x: norm_scale(x, centre, eps),
    }


def final_logit_softcap(model: HookedRootModule) -> float | None:
    """The cap of a family's final-logit soft-capping (`cap * tanh(logits / cap)`, Gemma 2), or None."""
    if is_bridge(model):
        cap = getattr(hf_model_of(model).config, "final_logit_softcapping", None)
    else:
        cap = getattr(model.cfg, "output_logits_soft_cap", None)
    return float(cap) if cap is not None and cap > 0 else None


def final_logit_scale(model: HookedRootModule) -> float:
    """The factor a family multiplies its logits by after the unembedding (Cohere's `logit_scale`, Granite's
    1 / `logits_scaling`); 1 for the others and for a HookedTransformer."""
    if not is_bridge(model):
        return 1.0
    config = hf_model_of(model).config
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    scaling = getattr(config, "logits_scaling", None)
    return scale / float(scaling) if scaling else scale


def norm_scale(x: torch.Tensor, centre: bool, eps: float) -> torch.Tensor:
    """The final normalisation's scale of residual vectors `x` [..., d_model] (RMS, after centring for LayerNorm)."""
    x = x.double()
    if centre:
        x = x - x.mean(-1, keepdim=True)
    return torch.sqrt(x.pow(2).mean(-1) + eps)


def label_logits(model: HookedRootModule, h: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The logits of `token_ids` from the unembedding's input `h` [batch, d_model]: the full logits' columns.

    Projects onto those rows only (and their bias), then applies the family's logit scale and
    final-logit soft-capping where it has them, as the full forward pass does (`certify` checks this).
    """
    W, b = unembedding(model)
    rows = token_ids.to(W.device)
    out = h @ W[rows].to(h.dtype).T
    if b is not None:
        out = out + b[rows].to(h.dtype)
    scale = final_logit_scale(model)
    if scale != 1.0:
        out = out * scale
    cap = final_logit_softcap(model)
    return out if cap is None else cap * torch.tanh(out / cap)
