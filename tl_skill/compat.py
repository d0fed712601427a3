"""Every TransformerLens-version detail lives here.

The rest of tl_skill talks to `HookedRootModule` hook points by name and to the
helpers below; it never asks which TransformerLens it runs on.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import torch

try:  # TransformerLens >= 3 keeps it here
    from transformer_lens.hook_points import HookedRootModule, HookPoint
except ImportError:  # pragma: no cover - very old releases
    from transformer_lens.HookedRootModule import HookedRootModule  # type: ignore
    from transformer_lens.hook_points import HookPoint  # type: ignore

TL_VERSION: str = importlib.metadata.version("transformer-lens")
TL_MAJOR: int = int(TL_VERSION.split(".")[0])
HAS_BRIDGE: bool = TL_MAJOR >= 4

EMBED_HOOK = "hook_embed"


def mlp_post_hook(layer: int) -> str:
    """Name of the hook point holding the MLP hidden activation (the neurons) of `layer`."""
    return f"blocks.{layer}.mlp.hook_post"


def build_bridge(hf_model: Any, tokenizer: Any, name: str, device: str | None = None):
    """Wrap a Hugging Face model (already loaded) in a TransformerBridge."""
    if not HAS_BRIDGE:  # pragma: no cover - exercised only with TransformerLens 3.x
        raise RuntimeError(
            f"transformer-lens {TL_VERSION} has no TransformerBridge; tl_skill needs 4.x for "
            "Hugging Face models"
        )
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, device=device
    )


def hf_model_of(model: HookedRootModule) -> torch.nn.Module:
    """The Hugging Face model under a bridge."""
    hf = getattr(model, "original_model", None)
    if hf is None:
        raise TypeError(
            f"{type(model).__name__} wraps no Hugging Face model; this operation needs a "
            "TransformerBridge"
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


def forward(model: HookedRootModule, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Run the model on token ids with an attention mask; returns logits [batch, pos, vocab].

    The bridge derives position ids from the mask (left padding keeps real
    positions at 0, 1, 2, ...).
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
