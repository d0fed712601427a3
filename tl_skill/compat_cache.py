"""Key/value caches behind `compat`: continuing a causal prefix on a bridge (a Hugging Face cache) or a
HookedTransformer (TransformerLens' own cache). Used by `prefix.py`; reach it as `compat.<name>`."""

from __future__ import annotations

import torch

from .compat import HAS_HOOKED_TRANSFORMER, UNEMBED_IN_HOOK, HookedRootModule, is_masked_lm, hf_model_of, \
    is_bridge, model_device

def prefix_cache_supported(model: HookedRootModule) -> bool:
    """Whether `model` can run a causal prefix once and continue from its keys/values: a bridge over a
    causal LM whose attention components update a Hugging Face cache, or a HookedTransformer (3.x)."""
    if not is_bridge(model):
        return HAS_HOOKED_TRANSFORMER and type(model).__name__ == "HookedTransformer"
    if is_masked_lm(hf_model_of(model)):
        return False
    attn = getattr(model.blocks[0], "attn", None)
    return callable(getattr(attn, "_update_kv_cache", None))


def new_kv_cache(model: HookedRootModule, batch_size: int):
    """An empty key/value cache for `model`: Hugging Face's for a bridge, TransformerLens' for a HookedTransformer."""
    if is_bridge(model):
        from transformers import DynamicCache

        return DynamicCache()
    from transformer_lens import TransformerLensKeyValueCache  # HookedTransformerKeyValueCache in TL 2.x

    return TransformerLensKeyValueCache.init_cache(model.cfg, model_device(model), batch_size)


def forward_with_cache(model: HookedRootModule, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache):
    """`forward` that reads and extends `cache` (attention over the cached positions, then the new ones).

    `attention_mask` covers the cached positions and the new ones. For a bridge the cache is handed
    over under both names bridge attention components read it by: on transformers 5.x the model passes
    it down as `cache`, which TransformerLens 4.3's components do not look for, and `layer_past`, which
    they do. A HookedTransformer's cache keeps the mask of the cached positions itself and takes the new
    positions' part.
    """
    if not is_bridge(model):
        return model(input_ids, attention_mask=attention_mask[:, -input_ids.shape[1]:], past_kv_cache=cache,
                     return_type="logits")
    return model(input_ids, attention_mask=attention_mask, past_key_values=cache, layer_past=cache,
                 return_type="logits")


def copy_kv_cache(cache):
    """An independent copy of a key/value cache (to continue it several ways)."""
    import copy

    return copy.deepcopy(cache)


def final_resid_hook(model: HookedRootModule) -> str | None:
    """A hook point after every attention layer (where a pass that only fills a cache may stop), or None."""
    for name in (UNEMBED_IN_HOOK, "ln_final.hook_scale", "ln_final.hook_normalized"):
        if name in model.hook_dict:
            return name
    return None


def pad_token_id(model: HookedRootModule) -> int:
    pad = model.tokenizer.pad_token_id
    return int(pad) if pad is not None else 0


