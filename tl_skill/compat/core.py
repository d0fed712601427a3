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

import importlib.metadata
import importlib.util
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from tl_skill.errors import UnsupportedModelError

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


def model_prefix_ids(model: HookedRootModule) -> list[int]:
    """The special tokens a causal layout puts first for `model`.

    For a model from `load_model`: what its tokenizer adds as the model ships it (TransformerLens
    turns BOS on for every tokenizer that has one when it boots a bridge, which SmolLM2 never saw
    in front of a text). For a model you built yourself: what its tokenizer adds now.
    """
    stored = getattr(model, PREFIX_ATTR, None)
    return list(stored) if stored is not None else special_prefix(model.tokenizer)


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
    ln = hf_module(model.ln_final)
    weight = ln.weight.detach()
    eps = float(getattr(ln, "eps", getattr(ln, "variance_epsilon", 1e-5)))
    if isinstance(ln, torch.nn.LayerNorm):
        return True, weight, eps
    if "gemma" in type(ln).__name__.lower():
        return False, 1.0 + weight, eps
    return False, weight, eps


def final_logit_softcap(model: HookedRootModule) -> float | None:
    """The cap of a family's final-logit soft-capping (`cap * tanh(logits / cap)`, Gemma 2), or None."""
    if is_bridge(model):
        cap = getattr(hf_model_of(model).config, "final_logit_softcapping", None)
    else:
        cap = getattr(model.cfg, "output_logits_soft_cap", None)
    return float(cap) if cap is not None and cap > 0 else None


def label_logits(model: HookedRootModule, h: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The logits of `token_ids` from the unembedding's input `h` [batch, d_model]: the full logits' columns.

    Projects onto those rows only (and their bias), then applies the family's final-logit
    soft-capping where it has one, as the full forward pass does.
    """
    W, b = unembedding(model)
    rows = token_ids.to(W.device)
    out = h @ W[rows].to(h.dtype).T
    if b is not None:
        out = out + b[rows].to(h.dtype)
    cap = final_logit_softcap(model)
    return out if cap is None else cap * torch.tanh(out / cap)
