"""Prefix-cached verbalizer logits for causal layouts (`input + prompt`).

The input tokens come before the prompt, so their keys and values do not
depend on it: the input part runs once without grad and leaves its per-layer
keys/values in a cache; only the P prompt positions run (with grad, when
tuning), attending to that cache. Position ids follow the attention mask, so
left- and right-padded batches give the positions of the full pass; forward
hooks see the input positions during the first pass and the prompt positions
during the second (a perturbation "at every position" still applies
everywhere). Bridges continue a Hugging Face cache, TransformerLens 3.x's
HookedTransformer its `HookedTransformerKeyValueCache` (both behind `compat`);
for masked LMs `class_logits_cached` is `class_logits`.

The cached path is the default where it saves time (causal LMs on a bridge or a TL 3.x
HookedTransformer; prompt tuning, evaluation of a prompt without hooks, several prompts or trials
on the same examples); a single prompt under hooks and a single trial's recording take the full
pass unless asked (`tuning.loop.evaluate`, `find.record_runs`).
`use_prefix_cache(False)` (the CLI's `--no-prefix-cache`) turns it off for a process or a
`with` block; functions that take `prefix_cache=` follow that default when it is None.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float

from tl_skill import compat
from tl_skill.compat import HookedRootModule
from tl_skill.tuning.prompt import Batch, SoftPrompt, Verbalizer, batch_starters, class_logits

_DEFAULT = {"on": True}


class use_prefix_cache(contextlib.ContextDecorator):
    """Turn the prefix-cached path on or off: for the process (`use_prefix_cache(False)`), or inside
    `with use_prefix_cache(False): ...` (restored on leaving)."""

    def __init__(self, on: bool = True):
        self.on, self._before = bool(on), _DEFAULT["on"]
        _DEFAULT["on"] = self.on

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        _DEFAULT["on"] = self._before


def prefix_cache_default() -> bool:
    """Whether the prefix-cached path is on by default (`use_prefix_cache`)."""
    return _DEFAULT["on"]


def resolve_prefix_cache(flag: bool | None) -> bool:
    return prefix_cache_default() if flag is None else bool(flag)


def split_batch(batch: Batch, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, Batch]:
    """(input ids left-padded [B, L], their mask, the prompt chunk as a Batch) of a causal-layout batch.

    The chunk's `attention_mask` covers the cached input and the P prompt positions [B, L + P];
    its prompt starts at 0 and its prediction position is P - 1 (both within the chunk).
    """
    B = batch.input_ids.shape[0]
    P = batch.prompt_length
    device = batch.input_ids.device
    # every real token before the prompt: the input and any special prefix (a <bos>)
    rows = [
        batch.input_ids[r, : int(batch.prompt_start[r])][batch.attention_mask[r, : int(batch.prompt_start[r])] > 0]
        for r in range(B)
    ]
    L = max(1, max(len(x) for x in rows))
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, L), dtype=torch.long, device=device)
    for r, x in enumerate(rows):
        if len(x):
            ids[r, L - len(x) :] = x
            mask[r, L - len(x) :] = 1
    chunk = Batch(
        torch.full((B, P), pad_id, dtype=torch.long, device=device),
        torch.cat([mask, torch.ones(B, P, dtype=torch.long, device=device)], 1),
        torch.full((B,), P - 1, dtype=torch.long, device=device),
        torch.zeros(B, dtype=torch.long, device=device),
        P,
        batch.labels,
    )
    return ids, mask, chunk


def usable_for(model: HookedRootModule, batch: Batch) -> bool:
    """Whether `batch` (a causal layout) on `model` can take the cached path."""
    return compat.prefix_cache_supported(model) and batch.input_start is not None


_usable = usable_for


def _starters(hooks) -> list:
    # hooks that number examples (noise) hear the batch's position before each pass: both passes
    # of a batch get the same draws
    return batch_starters(hooks)


# Rows of one input pass are grouped by length so that little of the pass is spent on padding; a
# group costs its rows x its longest row in tokens, plus this many tokens' worth for the extra pass
# (a pass reads every weight once: on SmolLM2-135M on 2 CPU cores ~0.07 s, ~100 tokens' compute).
GROUP_OVERHEAD_TOKENS = 100


def length_groups(lengths: Sequence[int], overhead: int | None = None) -> list[list[int]]:
    """Row indices grouped by length: contiguous runs of the rows sorted by length that minimise
    sum(len(group) * longest row in it + overhead) (dynamic programming over the sorted lengths;
    `overhead` defaults to `GROUP_OVERHEAD_TOKENS`)."""
    overhead = GROUP_OVERHEAD_TOKENS if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda r: (lengths[r], r))
    ls = [max(1, int(lengths[r])) for r in order]
    n = len(ls)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            c = best[i] + (j - i) * ls[j - 1] + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    return groups[::-1]


def _run_input(model: HookedRootModule, ids, mask, hooks, stop_at):
    cache = compat.new_kv_cache(model, ids.shape[0])

    def stop(resid, hook):
        raise compat.StopForward

    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks) + ([(stop_at, stop)] if stop_at else [])):
        try:
            compat.forward_with_cache(model, ids, mask, cache)
        except compat.StopForward:
            pass
    return cache


def _input_pass(model: HookedRootModule, ids: torch.Tensor, mask: torch.Tensor, hooks, starters, first_example: int):
    """Run the input part once (no grad) and return the cache of its keys/values; the logits are not needed.

    With no hook attached anywhere (a tuning step, a clean evaluation) the input runs without
    padding (`input_pass_through`): the same keys and values, to float rounding. Any hook keeps the
    one pass over the whole batch, so hooks see the batch as it is.
    """
    for start in starters:
        start(first_example)
    if hooks or compat.has_forward_hooks(model):
        return _run_input(model, ids, mask, hooks, compat.final_resid_hook(model))
    # nobody listens past the last layer's keys/values: the rest of that layer is not needed
    return input_pass_through(model, ids, mask, int(model.cfg.n_layers) - 1)


def input_pass_through(model: HookedRootModule, ids: torch.Tensor, mask: torch.Tensor, last_layer: int) -> Any:
    """The input part's cache up to `last_layer`'s keys/values (enough for prompt passes that stop
    there, e.g. recording layers <= `last_layer`); nothing may listen (no hooks).

    On a bridge whose plain Hugging Face view is exact (`compat.plain_view`) the rows run packed
    through the view; otherwise rows of similar length run together (`length_groups`) and their
    caches are merged."""
    view = compat.plain_view(model)
    if view is not None:
        cache = compat.plain_input_cache(model, view, ids, mask, last_layer)
        if cache is not None:
            return cache
    stop_at = compat.last_kv_hook(model, last_layer)
    if compat.has_forward_hooks(model):
        return _run_input(model, ids, mask, (), compat.final_resid_hook(model))
    lengths = mask.sum(1).tolist()
    groups = length_groups(lengths)
    if len(groups) == 1:
        return _run_input(model, ids, mask, (), stop_at)
    L = ids.shape[1]
    parts = []
    for g in groups:
        rows = torch.tensor(g, device=ids.device)
        n = max(1, max(int(lengths[r]) for r in g))
        parts.append((_run_input(model, ids[rows][:, L - n :], mask[rows][:, L - n :], (), stop_at), rows))
    return compat.merge_kv_caches(model, parts, ids.shape[0], L, mask)


def prompt_pass_for_hooks(model: HookedRootModule, chunk: Batch, cache, prompt: SoftPrompt) -> None:
    """The P prompt positions against `cache`, for the hooks attached (a recorder); no logits.
    A hook may end the pass early with `compat.StopForward`."""
    with torch.no_grad(), prompt.applied(model, chunk):
        try:
            compat.forward_with_cache(model, chunk.input_ids, chunk.attention_mask, cache)
        except compat.StopForward:
            pass


def _prompt_pass(
    model: HookedRootModule,
    chunk: Batch,
    cache,
    prompt: SoftPrompt,
    verbalizer: Verbalizer,
    hooks,
    starters,
    first_example: int,
) -> torch.Tensor:
    """The P prompt positions against `cache`: the label words' logits at the last one."""
    for start in starters:
        start(first_example)
    view = None if hooks else compat.plain_view(model)
    if view is not None:  # nobody listens: the plain Hugging Face classes, the same numbers
        return compat.plain_prompt_logits(
            model, view, prompt.vectors, chunk.attention_mask, cache, verbalizer.token_ids
        )
    fast = compat.UNEMBED_IN_HOOK in model.hook_dict
    grabbed: dict[str, torch.Tensor] = {}

    def take(resid, hook):
        grabbed["h"] = resid[:, -1]
        raise compat.StopForward

    logits = None
    with (
        prompt.applied(model, chunk),
        model.hooks(fwd_hooks=list(hooks) + ([(compat.UNEMBED_IN_HOOK, take)] if fast else [])),
    ):
        try:
            logits = compat.forward_with_cache(model, chunk.input_ids, chunk.attention_mask, cache)
        except compat.StopForward:
            pass
    if fast:
        return compat.label_logits(model, grabbed["h"], verbalizer.token_ids)
    assert logits is not None  # no hook stopped the pass
    return verbalizer.class_logits(logits, chunk.pred_pos)


def class_logits_cached(
    model: HookedRootModule, batch: Batch, verbalizer: Verbalizer, prompt: SoftPrompt | None, extra_hooks: Sequence = ()
) -> Float[torch.Tensor, "batch n_classes"]:
    """`tuning.prompt.class_logits` through a cached input pass (module docstring): the same numbers."""
    if prompt is None or not _usable(model, batch):
        return class_logits(model, batch, verbalizer, prompt, extra_hooks)
    ids, mask, chunk = split_batch(batch, compat.pad_token_id(model))
    hooks = list(extra_hooks)
    starters = _starters(hooks)
    cache = _input_pass(model, ids, mask, hooks, starters, batch.first_example)
    return _prompt_pass(model, chunk, cache, prompt, verbalizer, hooks, starters, batch.first_example)


@torch.no_grad()
def class_logits_many(
    model: HookedRootModule,
    batch: Batch,
    verbalizer: Verbalizer,
    prompts: Sequence[SoftPrompt],
    extra_hooks: Sequence = (),
) -> Float[torch.Tensor, "prompts batch n_classes"]:
    """Verbalizer logits of `batch` under each of `prompts`: one input pass, then one prompt pass each.

    Every prompt continues its own copy of the input's cache; the numbers are those of
    `class_logits` with that prompt (the full pass wherever the cache cannot be used, or the
    prompts' lengths differ from the batch's layout).
    """
    if not prompts or any(p.length != batch.prompt_length for p in prompts) or not _usable(model, batch):
        return torch.stack([class_logits(model, batch, verbalizer, p, extra_hooks) for p in prompts])
    ids, mask, chunk = split_batch(batch, compat.pad_token_id(model))
    hooks = list(extra_hooks)
    starters = _starters(hooks)
    cache = _input_pass(model, ids, mask, hooks, starters, batch.first_example)
    return torch.stack(
        [
            _prompt_pass(model, chunk, compat.copy_kv_cache(cache), p, verbalizer, hooks, starters, batch.first_example)
            for p in prompts
        ]
    )
