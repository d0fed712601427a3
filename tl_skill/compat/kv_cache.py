"""Key/value caches behind `compat`: continuing a causal prefix on a bridge (a Hugging Face cache) or a
HookedTransformer (TransformerLens' own cache). Used by `tuning.prefix`; reach it as `compat.<name>`."""

from __future__ import annotations

import copy
import inspect
import weakref
from typing import Any

import torch

from tl_skill.compat.core import (
    HAS_HOOKED_TRANSFORMER,
    UNEMBED_IN_HOOK,
    HookedRootModule,
    eval_mode,
    hf_model_of,
    hooks_paused,
    is_bridge,
    is_masked_lm,
    model_device,
)


def prefix_cache_supported(model: HookedRootModule) -> bool:
    """Whether `model` can run a causal prefix once and continue from its keys/values: a bridge over a
    causal LM whose attention components update a Hugging Face cache, or a HookedTransformer (3.x)."""
    if not is_bridge(model):
        return HAS_HOOKED_TRANSFORMER and type(model).__name__ == "HookedTransformer"
    if is_masked_lm(hf_model_of(model)):
        return False
    attn = getattr(model.blocks[0], "attn", None)
    if not callable(getattr(attn, "_update_kv_cache", None)):
        return False
    known = _PROBED.get(model)
    if known is None:
        known = _cache_agrees(model)
        _PROBED[model] = known
    return known


_PROBED: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def _cache_agrees(model: HookedRootModule) -> bool:
    """Once per model: continuing a 3-token prefix's cache by 3 tokens gives the full pass's logits (some
    block wrappers, e.g. parallel attention/MLP blocks, cannot take a cache at all). No hook fires."""
    device = model_device(model)
    ids = ((torch.arange(6, device=device) * 7 + 3) % int(model.cfg.d_vocab))[None]
    mask = torch.ones_like(ids)
    try:
        with torch.no_grad(), hooks_paused(model), eval_mode(model):
            full = model(ids, attention_mask=mask, return_type="logits")
            cache = new_kv_cache(model, 1)
            forward_with_cache(model, ids[:, :3], mask[:, :3], cache)
            rest = forward_with_cache(model, ids[:, 3:], mask, cache)
    except Exception:  # the wrapper cannot take a cache: the full pass is used instead
        return False
    want = full[:, 3:].float()
    tol = 1e-4 if full.dtype in (torch.float32, torch.float64) else 3e-2
    return bool(((rest.float() - want).abs().max() <= tol * max(1.0, float(want.abs().max()))).item())


def new_kv_cache(model: HookedRootModule, batch_size: int) -> Any:
    """An empty key/value cache for `model`: Hugging Face's for a bridge, TransformerLens' for a HookedTransformer."""
    if is_bridge(model):
        from transformers import DynamicCache

        return DynamicCache()
    from transformer_lens import TransformerLensKeyValueCache  # HookedTransformerKeyValueCache in TL 2.x

    return TransformerLensKeyValueCache.init_cache(model.cfg, model_device(model), batch_size)


def forward_with_cache(
    model: HookedRootModule, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache
) -> torch.Tensor:
    """`forward` that reads and extends `cache` (attention over the cached positions, then the new ones).

    `attention_mask` covers the cached positions and the new ones. For a bridge the cache is handed
    over under the Hugging Face model's own name for it (`cache` on transformers 5.x) and as `layer_past`,
    the name TransformerLens 4.3's attention components read it by. A HookedTransformer's cache keeps the
    mask of the cached positions itself and takes the new positions' part.
    """
    if not is_bridge(model):
        return model(
            input_ids,
            attention_mask=attention_mask[:, -input_ids.shape[1] :],
            past_kv_cache=cache,
            return_type="logits",
        )
    # the Hugging Face model's own name for the cache (`cache` from transformers 5.x; `past_key_values` before)
    hf = hf_model_of(model)
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    return model(input_ids, attention_mask=attention_mask, layer_past=cache, return_type="logits", **{name: cache})


def merge_kv_caches(model: HookedRootModule, parts, batch_size: int, length: int, attention_mask: torch.Tensor) -> Any:
    """One cache of `batch_size` rows, left-padded to `length`, from caches of row groups.

    `parts`: (cache, rows) pairs, each cache holding `len(rows)` rows left-padded to its own length
    (at most `length`); their keys/values go to the last positions of those rows, zeros elsewhere
    (the padding, which `attention_mask` [batch_size, length] masks out).
    """

    def place(tensors, seq_dim):
        first = tensors[0][0]
        shape = list(first.shape)
        shape[0], shape[seq_dim] = batch_size, length
        out = first.new_zeros(shape)
        for t, rows in tensors:
            index = [rows.to(out.device)] + [slice(None)] * (seq_dim - 1) + [slice(length - t.shape[seq_dim], None)]
            out[tuple(index)] = t
        return out

    if is_bridge(model):
        from transformers import DynamicCache

        merged = DynamicCache()
        for i in range(len(parts[0][0].layers)):
            merged.update(
                place([(c.layers[i].keys, r) for c, r in parts], 2),
                place([(c.layers[i].values, r) for c, r in parts], 2),
                i,
            )
        return merged
    merged = new_kv_cache(model, batch_size)
    for i, entry in enumerate(merged.entries):  # TransformerLens: [batch, pos, heads, d_head]
        entry.past_keys = place([(c.entries[i].past_keys, r) for c, r in parts], 1)
        entry.past_values = place([(c.entries[i].past_values, r) for c, r in parts], 1)
    merged.previous_attention_mask = attention_mask.to(merged.previous_attention_mask)
    return merged


def has_forward_hooks(model: HookedRootModule) -> bool:
    """Whether any hook point of `model` has a forward hook attached (the user's, a recorder's, ...)."""
    return any(hp._forward_hooks for hp in model.hook_dict.values())


def copy_kv_cache(cache) -> Any:
    """An independent copy of a key/value cache (to continue it several ways)."""
    return copy.deepcopy(cache)


def final_resid_hook(model: HookedRootModule) -> str | None:
    """A hook point after every attention layer (where a pass that only fills a cache may stop), or None."""
    for name in (UNEMBED_IN_HOOK, "ln_final.hook_scale", "ln_final.hook_normalized"):
        if name in model.hook_dict:
            return name
    return None


def last_kv_hook(model: HookedRootModule, layer: int | None = None) -> str | None:
    """A hook point right after `layer` (default the last) has put its keys/values in the cache (its
    attention scores), where a pass that only fills a cache and has no hooks to serve may stop; else
    `final_resid_hook`."""
    layer = int(model.cfg.n_layers) - 1 if layer is None else int(layer)
    name = f"blocks.{layer}.attn.hook_attn_scores"
    return name if name in model.hook_dict else final_resid_hook(model)


def pad_token_id(model: HookedRootModule) -> int:
    pad = model.tokenizer.pad_token_id
    return int(pad) if pad is not None else 0
