"""Plain Hugging Face models from a bridge, behind `compat` (reach these as `compat.<name>`).

`unwrapped` / `plain_hf_copy`: the Hugging Face model without the bridge's wrappers (pruning, exports).

`plain_view`: the same Hugging Face class rebuilt around the bridge's *own* parameter and buffer
tensors (nothing copied), for passes nobody listens to: the prefix cache's input pass and a tuning
step's prompt pass (`tuning.prefix`). The bridge reconstructs attention around every Hugging Face module
and fires its hook points; with no hook attached that work changes nothing, and the plain classes
run the same arithmetic faster (SmolLM2-135M's cached tuning step: 15% less time). A view is
used only where it is exact:

- the family is one whose view was tested against the bridge (`PLAIN_FAMILIES`);
- nobody listens: no hook on any hook point, no forward or backward hook on any module other than
  TransformerLens's own, no global module hook;
- every tensor of the bridge's Hugging Face model has its place in the view, and on a short probe
  the view's logits equal the bridge's (checked once per model; the view is rebuilt when the
  model's modules or tensors change, e.g. after `.to()`).

Rows of the input pass are packed into few long rows (a block-diagonal causal mask, position ids
per row), so no compute goes to padding; their keys/values are then laid out as the left-padded
batch the prompt pass continues.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

import torch

from tl_skill.compat.core import (
    WRAPPER,
    HookedRootModule,
    hf_model_of,
    hf_param_name,
    is_bridge,
    is_masked_lm,
    label_logits,
    notice,
)

# Hugging Face `model_type`s whose view is tested against the bridge (tests/test_prefix.py). Not GPT-2:
# its bridge computes with its own split copies of the fused QKV weights, which the view would not
# follow after an in-place edit.
PLAIN_FAMILIES = frozenset({"llama", "gemma2", "gemma3_text"})
# Rows of the input pass go into packed rows of about this many tokens at most (or the longest row):
# attention over a packed row costs its length squared, an extra pass ~0.05 s (SmolLM2, 2 CPU cores:
# 512 was about the fastest of 128-768 for batches of 16 and 32 rows).
PACK_TOKENS = 512

_VIEWS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[Any, torch.nn.Module | None]] = weakref.WeakKeyDictionary()


def unwrapped(module: Any) -> Any:
    """`module` with every bridge wrapper replaced, in place, by the Hugging Face module it wraps.

    Building a bridge also gives a bias-free unembedding a zero `bias` buffer; that is undone too.
    """
    while WRAPPER in module._modules:
        module = module._modules[WRAPPER]
    if isinstance(module, torch.nn.Linear) and "bias" in module._buffers:
        del module._buffers["bias"]
        module.register_parameter("bias", None)
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = unwrapped(child)
    return module


def plain_hf_copy(hf: Any, share_tensors: bool) -> Any:
    """An unwrapped copy of a (bridged) Hugging Face model; with `share_tensors` only the modules are copied."""
    # Copy the module tree with the tensors shared, then (if asked) clone only the
    # tensors the unwrapped model uses: bridge-only copies (split QKV) are never copied.
    memo: dict[int, Any] = {id(t): t for t in [*hf.parameters(), *hf.buffers()]}
    # The bridge caches tensors of the last forward pass on its modules (e.g. the
    # attention pattern); after a pass with grad they are graph nodes, which
    # deepcopy refuses. They are caches: copy them detached.
    for module in hf.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach()
    clean = unwrapped(copy.deepcopy(hf, memo))
    if share_tensors:
        return clean
    clones: dict[int, torch.Tensor] = {}  # by identity, so tied weights stay tied
    for module in clean.modules():
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is None:
                    continue
                if id(t) not in clones:
                    c = t.detach().clone()
                    clones[id(t)] = (
                        torch.nn.Parameter(c, requires_grad=False) if isinstance(t, torch.nn.Parameter) else c
                    )
                store[key] = clones[id(t)]
    return clean


# ----------------------------------------------------------------------------- the shared-tensor view
def _wiring(fn) -> bool:
    """A hook that is the libraries' own wiring: TransformerLens's, or transformers' output capturing (which
    `run_with_cache` installs for good and which records only while a forward asks for those outputs)."""
    module = str(getattr(fn, "__module__", "") or "")
    return module.startswith("transformer_lens") or module == "transformers.utils.output_capturing"


def _listener(model: HookedRootModule) -> str | None:
    """What could hear a pass of `model` (None: nothing): a hook on a hook point (anyone's), one on another
    module that is not the libraries' own wiring, or a global module hook."""
    nn_module = torch.nn.modules.module
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    ):
        if getattr(nn_module, name, None):
            return f"a global module hook ({name.strip('_')})"
    hook_points = {id(hp) for hp in model.hook_dict.values()}
    for name, m in model.named_modules():
        stores = [m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, getattr(m, "_backward_pre_hooks", {})]
        if id(m) in hook_points:
            if any(stores):
                return f"a hook on hook point {name}"
        elif any(not _wiring(fn) for store in stores for fn in store.values()):
            return f"a hook on module {name}"
    return None


def _fingerprint(hf: Any) -> tuple:
    mods = tuple((id(m), "forward" in vars(m)) for m in hf.modules())
    named = [*hf.named_parameters(remove_duplicate=False), *hf.named_buffers(remove_duplicate=False)]
    tensors = tuple((id(t), t.data_ptr(), t.dtype, t.device, tuple(t.shape)) for _, t in named)
    return mods, tensors


def _build_view(hf: Any) -> Any | None:
    """`type(hf)` built on the meta device, then given `hf`'s parameters and buffers (the same objects)."""
    try:
        with torch.device("meta"):
            view = type(hf)(copy.deepcopy(hf.config))
    except Exception:
        return None
    params = {hf_param_name(n): p for n, p in hf.named_parameters(remove_duplicate=False)}
    buffers = {hf_param_name(n): b for n, b in hf.named_buffers(remove_duplicate=False)}
    used: set[int] = set()
    for mod_name, mod in view.named_modules():
        for store, source in ((mod._parameters, params), (mod._buffers, buffers)):
            for key, t in list(store.items()):
                if t is None:
                    continue
                got = source.get(f"{mod_name}.{key}" if mod_name else key)
                if got is None or tuple(got.shape) != tuple(t.shape):
                    return None
                store[key] = got
                used.add(id(got))
    if any(id(p) not in used for p in hf.parameters()):  # weights the plain class has no place for
        return None
    return view.eval()


def _agrees(model: HookedRootModule, view: Any) -> bool:
    """The view's logits equal the bridge's on a short probe (float tolerance of the model's dtype)."""
    vocab = int(view.config.vocab_size)
    device = next(view.parameters()).device
    ids = (torch.arange(5, device=device)[None] * 7 + 3) % vocab
    try:
        with torch.no_grad():
            want = model(ids, return_type="logits").float()
            got = view(input_ids=ids).logits.float()
    except Exception:
        return False
    tol = 1e-4 if next(view.parameters()).dtype == torch.float32 else 3e-2
    return got.shape == want.shape and bool(((got - want).abs().max() <= tol * max(1.0, want.abs().max())).item())


def plain_view(model: HookedRootModule) -> Any | None:
    """The plain Hugging Face view of bridge `model` (module docstring), or None where it would not be exact."""
    if not is_bridge(model):
        return None
    hf = hf_model_of(model)
    if (
        getattr(hf.config, "model_type", None) not in PLAIN_FAMILIES
        or is_masked_lm(hf)
        or getattr(model, "compatibility_mode", False)
    ):
        return None
    if _listener(model) is not None:
        return None
    fingerprint = _fingerprint(hf)
    hit = _VIEWS.get(model)
    if hit is not None and hit[0] == fingerprint:
        return hit[1]
    view = _build_view(hf)
    if view is not None and not _agrees(model, view):
        view = None
    _VIEWS[model] = (fingerprint, view)
    return view


def say_fast_path(model: HookedRootModule) -> None:
    """Before tuning or recording: say once (`notice`) when a bridge whose family has a plain view cannot use
    it, and why (someone's hook, or a view that would not be exact); nothing for other models."""
    if not is_bridge(model):
        return
    hf = hf_model_of(model)
    if getattr(hf.config, "model_type", None) not in PLAIN_FAMILIES or is_masked_lm(hf):
        return
    listener = _listener(model)
    if listener is not None:
        notice(
            model,
            "fast_path",
            f"passes nobody listens to run through the bridge, not its faster plain view: {listener} is "
            "attached. Results are the same, only slower; remove it to speed them up (model.reset_hooks() removes "
            "the hooks on hook points)",
        )
    elif plain_view(model) is None:
        notice(
            model,
            "fast_path",
            "passes nobody listens to run through the bridge: its plain view could not be built or did not "
            "match the bridge's logits. Results are the same, only slower",
        )


def _attention(view: Any, device: torch.device, grad: bool) -> str:
    # SDPA's backward is ~10x slower than eager on CPUs; SDPA ignores attention-logit soft-capping
    if getattr(view.config, "attn_logit_softcapping", None) or (grad and device.type == "cpu"):
        return "eager"
    return "sdpa"


class _PassDone(Exception):
    """Ends a view's pass once the cache holds what is needed."""


def _stop_pass(module, args):
    raise _PassDone


def _mlp_of(base: Any, n_layers: int, layer: int) -> torch.nn.Module | None:
    """The MLP of decoder layer `layer` of a view's base model (`layers` / GPT-2's `h`), or None."""
    for name in ("layers", "h"):
        layers = base._modules.get(name)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) == n_layers:
            mlp = getattr(layers[layer], "mlp", None)
            return mlp if isinstance(mlp, torch.nn.Module) else None
    return None


def _packed_masks(view: Any, lengths: list[int], sdpa: bool, dtype: torch.dtype, device):
    """Block-diagonal causal masks [1, 1, n, n] of rows of `lengths` laid end to end: one, or one per
    attention type where the family has sliding-window layers (a dict, as those models accept)."""
    seg = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(lengths)])
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])
    allowed = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])

    def as_mask(a):
        if sdpa:
            return a[None, None]
        return torch.zeros(a.shape, dtype=dtype, device=device).masked_fill(~a, torch.finfo(dtype).min)[None, None]

    types = set(getattr(view.config, "layer_types", None) or ())
    window = getattr(view.config, "sliding_window", None)
    if "sliding_attention" in types and window:
        masks = {t: as_mask(allowed) for t in types}
        masks["sliding_attention"] = as_mask(allowed & (pos[:, None] - pos[None, :] < int(window)))
        return masks, pos[None]
    return as_mask(allowed), pos[None]


def base_forward(base: Any, cache, **kwargs) -> Any:
    """One pass of a view's base model (the decoder without its head) reading and extending `cache`
    (`cache=` on transformers releases that renamed `past_key_values`)."""
    import inspect

    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return base(**{name: cache}, use_cache=True, **kwargs)


def plain_input_cache(model: torch.nn.Module, view: Any, ids: torch.Tensor, mask: torch.Tensor, last_layer: int) -> Any:
    """The input part's keys/values through `view`, layers 0..`last_layer`, as a left-padded cache
    [batch, kv heads, L, d_head] (zeros at padding) for `ids`/`mask` [batch, L] (left-padded).

    Rows are packed (module docstring) into as few rows of about equal length as `PACK_TOKENS` allows. None when no row
    has a token (the caller takes the bridge's path)."""
    from transformers import DynamicCache

    B, L = ids.shape
    lengths = [int(n) for n in mask.sum(1).tolist()]
    # as few packs as PACK_TOKENS allows, of about equal size (attention costs a pack's length squared)
    total = sum(lengths)
    limit = max(max(lengths), -(-total // max(1, -(-total // PACK_TOKENS))))
    packs: list[list[int]] = []
    size = 0
    for r in range(B):
        if lengths[r] == 0:
            continue
        if not packs or size + lengths[r] > limit:
            packs.append([])
            size = 0
        packs[-1].append(r)
        size += lengths[r]
    if not packs:
        return None
    base = view.base_model
    view.config._attn_implementation = _attention(view, ids.device, grad=False)
    sdpa = view.config._attn_implementation == "sdpa"
    dtype = next(view.parameters()).dtype
    keys: list[list[torch.Tensor]] = []
    values: list[list[torch.Tensor]] = []
    # `last_layer` has put its keys/values in the cache before its MLP: the pass ends there
    stop = _mlp_of(base, int(view.config.num_hidden_layers), last_layer)
    handle = stop.register_forward_pre_hook(_stop_pass) if stop is not None else None
    try:
        for rows in packs:
            lens = [lengths[r] for r in rows]
            tokens = torch.cat([ids[r, L - lengths[r] :] for r in rows])[None]
            attn, pos = _packed_masks(view, lens, sdpa, dtype, ids.device)
            cache: Any = DynamicCache()
            try:
                with torch.no_grad():
                    base_forward(base, cache, input_ids=tokens, attention_mask=attn, position_ids=pos)
            except _PassDone:
                pass
            keys.append([layer.keys[0] for layer in cache.layers[: last_layer + 1]])
            values.append([layer.values[0] for layer in cache.layers[: last_layer + 1]])
    finally:
        if handle is not None:
            handle.remove()
    # each row's keys/values to the last positions of its row, zeros at the padding before them:
    # one gather per layer from the packed rows laid end to end, plus a zero column
    total = sum(lengths)
    index = torch.full((B, L), total, dtype=torch.long, device=ids.device)
    s = 0
    for rows in packs:
        for r in rows:
            index[r, L - lengths[r] :] = torch.arange(s, s + lengths[r], device=ids.device)
            s += lengths[r]
    out = DynamicCache()
    for i in range(len(keys[0]) if keys else 0):
        kv = []
        for source in (keys, values):
            flat = torch.cat([part[i] for part in source], 1)  # [heads, total, d]
            flat = torch.cat([flat, flat.new_zeros(flat.shape[0], 1, flat.shape[2])], 1)
            kv.append(flat[:, index].transpose(0, 1).contiguous())  # [batch, heads, L, d]
        out.update(kv[0], kv[1], i)
    return out


def plain_prompt_logits(
    model: HookedRootModule,
    view: Any,
    vectors: torch.Tensor,
    attention_mask: torch.Tensor,
    cache,
    token_ids: torch.Tensor,
) -> torch.Tensor:
    """Label-word logits at the last of P prompt positions run through `view` against `cache`.

    `vectors` [P, d_model]: the prompt, written where the bridge's `embed.hook_out` would carry it;
    `attention_mask` [batch, L + P]: the cached input's mask, then the prompt's ones."""
    P = vectors.shape[0]
    B = attention_mask.shape[0]
    dtype = next(view.parameters()).dtype
    view.config._attn_implementation = _attention(view, attention_mask.device, grad=torch.is_grad_enabled())
    positions = attention_mask[:, :-P].sum(1, keepdim=True) + torch.arange(P, device=attention_mask.device)[None]
    x = vectors.to(device=attention_mask.device, dtype=dtype)[None].expand(B, -1, -1)
    out = base_forward(view.base_model, cache, inputs_embeds=x, attention_mask=attention_mask, position_ids=positions)
    return label_logits(model, out.last_hidden_state[:, -1], token_ids)
