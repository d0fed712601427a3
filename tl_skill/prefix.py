"""Prefix-cached verbalizer logits for causal layouts (`input + prompt`).

The input tokens come before the prompt, so their keys and values do not
depend on it: the input part runs once without grad and leaves its per-layer
keys/values in a cache; only the P prompt positions run (with grad, when
tuning), attending to that cache. Position ids follow the attention mask, so
left- and right-padded batches give the positions of the full pass; forward
hooks see the input positions during the first pass and the prompt positions
during the second (a perturbation "at every position" still applies
everywhere). Where the model cannot continue from a cache (masked LMs,
HookedTransformer), `class_logits_cached` is `class_logits`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from jaxtyping import Float

from . import compat
from .prompt import Batch, SoftPrompt, Verbalizer, class_logits


def split_batch(batch: Batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, Batch]:
    """(input ids left-padded [B, L], their mask, the prompt chunk as a Batch) of a causal-layout batch.

    The chunk's `attention_mask` covers the cached input and the P prompt positions [B, L + P];
    its prompt starts at 0 and its prediction position is P - 1 (both within the chunk).
    """
    B = batch.input_ids.shape[0]
    P = batch.prompt_length
    device = batch.input_ids.device
    # every real token before the prompt: the input and any special prefix (a <bos>)
    rows = [batch.input_ids[r, :int(batch.prompt_start[r])][batch.attention_mask[r, :int(batch.prompt_start[r])] > 0]
            for r in range(B)]
    L = max(1, max(len(x) for x in rows))
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, L), dtype=torch.long, device=device)
    for r, x in enumerate(rows):
        if len(x):
            ids[r, L - len(x):] = x
            mask[r, L - len(x):] = 1
    chunk = Batch(torch.full((B, P), pad_id, dtype=torch.long, device=device),
                  torch.cat([mask, torch.ones(B, P, dtype=torch.long, device=device)], 1),
                  torch.full((B,), P - 1, dtype=torch.long, device=device),
                  torch.zeros(B, dtype=torch.long, device=device), P, batch.labels)
    return ids, mask, chunk


def class_logits_cached(model, batch: Batch, verbalizer: Verbalizer, prompt: SoftPrompt | None,
                        extra_hooks: Sequence = ()) -> Float[torch.Tensor, "batch n_classes"]:
    """`prompt.class_logits` through a cached input pass (module docstring): the same numbers."""
    if (prompt is None or not compat.prefix_cache_supported(model) or batch.input_start is None
            or compat.UNEMBED_IN_HOOK not in model.hook_dict):
        return class_logits(model, batch, verbalizer, prompt, extra_hooks)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    ids, mask, chunk = split_batch(batch, pad)
    cache = compat.new_kv_cache()
    hooks = list(extra_hooks)
    # hooks that number examples (noise) hear the batch's position before each pass: both passes
    # of a batch get the same draws
    starters = [fn.start_batch for _, fn in hooks if callable(getattr(fn, "start_batch", None))]
    for start in starters:
        start(batch.first_example)

    def stop(resid, hook):  # the input pass needs the keys/values of every layer, not the logits
        raise compat.StopForward

    with torch.no_grad(), model.hooks(fwd_hooks=hooks + [(compat.UNEMBED_IN_HOOK, stop)]):
        try:
            compat.forward_with_cache(model, ids, mask, cache)
        except compat.StopForward:
            pass
    grabbed: dict[str, torch.Tensor] = {}

    def take(resid, hook):
        grabbed["h"] = resid[:, -1]
        raise compat.StopForward

    for start in starters:
        start(batch.first_example)

    with prompt.applied(model, chunk), model.hooks(fwd_hooks=hooks + [(compat.UNEMBED_IN_HOOK, take)]):
        try:
            compat.forward_with_cache(model, chunk.input_ids, chunk.attention_mask, cache)
        except compat.StopForward:
            pass
    return compat.label_logits(model, grabbed["h"], verbalizer.token_ids)


@torch.no_grad()
def class_logits_many(model, batch: Batch, verbalizer: Verbalizer, prompts: Sequence[SoftPrompt],
                      extra_hooks: Sequence = ()) -> Float[torch.Tensor, "prompts batch n_classes"]:
    """Verbalizer logits of `batch` under each of `prompts`: one input pass, then one prompt pass each.

    Every prompt continues its own copy of the input's cache; the numbers are those of
    `class_logits` with that prompt (the full pass wherever the cache cannot be used, or the
    prompts' lengths differ from the batch's layout).
    """
    if (not prompts or any(p.length != batch.prompt_length for p in prompts) or not compat.prefix_cache_supported(model)
            or batch.input_start is None or compat.UNEMBED_IN_HOOK not in model.hook_dict):
        return torch.stack([class_logits(model, batch, verbalizer, p, extra_hooks) for p in prompts])
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    ids, mask, chunk = split_batch(batch, pad)
    hooks = list(extra_hooks)
    starters = [fn.start_batch for _, fn in hooks if callable(getattr(fn, "start_batch", None))]
    cache = compat.new_kv_cache()
    for start in starters:
        start(batch.first_example)

    def stop(resid, hook):
        raise compat.StopForward

    with model.hooks(fwd_hooks=hooks + [(compat.UNEMBED_IN_HOOK, stop)]):
        try:
            compat.forward_with_cache(model, ids, mask, cache)
        except compat.StopForward:
            pass
    out = []
    for prompt in prompts:
        grabbed: dict[str, torch.Tensor] = {}

        def take(resid, hook):
            grabbed["h"] = resid[:, -1]
            raise compat.StopForward

        for start in starters:
            start(batch.first_example)
        with prompt.applied(model, chunk), model.hooks(fwd_hooks=hooks + [(compat.UNEMBED_IN_HOOK, take)]):
            try:
                compat.forward_with_cache(model, chunk.input_ids, chunk.attention_mask, compat.copy_kv_cache(cache))
            except compat.StopForward:
                pass
        out.append(compat.label_logits(model, grabbed["h"], verbalizer.token_ids))
    return torch.stack(out)
