"""Is `blocks.{l}.mlp.hook_post` the neuron basis? Checked against the Hugging Face module's own computation.

A skill neuron is one coordinate of the input of an MLP's output projection (`down_proj`, `c_proj`,
`fc2`, `dense_4h_to_h`, ...): what multiplies the projection's weights. TransformerLens names a hook
point `mlp.hook_post` for it, but on some architectures that hook is missing, of another width,
taken before a transform, or does not fire. The checks here compare the hook with the projection's
input, read by a forward pre-hook on the projection module itself (found from the module's structure,
`compat.mlp_output_projection`), on a probe batch:

- `hook_exists`: every layer has the hook point;
- `hook_fires`: it fires on a forward pass, with one value per neuron (the projection's input width);
- `equals_projection_input`: its values equal the projection's input at every real position, with
  left and with right padding, and where a soft prompt overwrites embeddings (prompt positions);
- `perturbation_equivalent`: adding to a neuron through the hook changes the logits exactly as adding
  to the projection's input does.

`require_neuron_basis(model)` runs them once per model (a few forward passes on a short probe) and
refuses a model that fails, naming the check, unless `allow_uncertified(model)` was called: `tune`,
`find`, `ablate` and `prune` call it before any work. A HookedTransformer (TransformerLens 3.x) has no
Hugging Face module; there the projection is its `W_out`, and the checks compare `hook_post @ W_out +
b_out` with `hook_mlp_out`. `tl_skill.certify` adds the checks of everything else tl_skill relies on.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any

import torch

from tl_skill import compat
from tl_skill.compat import HookedRootModule
from tl_skill.errors import CertificationError

log = logging.getLogger(__name__)

BASIS_CHECKS = ("hook_exists", "hook_fires", "equals_projection_input", "perturbation_equivalent")
PROBE_TEXTS = ("The quick brown fox jumps over the lazy dog near the river bank.", "A short one.")
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}  # relative to the largest value compared


@dataclasses.dataclass(frozen=True)
class Check:
    """One check's outcome: `passed` is True, False, or None where it does not apply to the model."""

    name: str
    passed: bool | None
    detail: str
    failed_layers: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "failed_layers": list(self.failed_layers)}


def _tol(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, 3e-2)


def _close(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    """Whether `a` equals `b` to float rounding, and the largest difference relative to their scale."""
    a, b = a.double(), b.double()
    scale = max(1.0, float(b.abs().max()))
    diff = float((a - b).abs().max()) / scale if a.numel() else 0.0
    return diff <= 0.0 or diff <= _tol(torch.float32) * 10, diff


def probe_batch(model: HookedRootModule, padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Two texts of different lengths, padded on `padding_side`: (input ids, attention mask) [2, T]."""
    tok = model.tokenizer
    rows = [tok(t)["input_ids"][:24] for t in PROBE_TEXTS]
    T = max(len(r) for r in rows)
    pad = compat.pad_token_id(model)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        where = slice(T - len(r), T) if padding_side == "left" else slice(0, len(r))
        ids[i, where] = torch.tensor(r)
        mask[i, where] = 1
    device = compat.model_device(model)
    return ids.to(device), mask.to(device)


def _prompt_writer(model: HookedRootModule, mask: torch.Tensor, seed: int = 0):
    """A hook on the embedding output writing random vectors over two real positions of each row (what a soft
    prompt does), and those positions as a mask [2, T]."""
    written = torch.zeros_like(mask, dtype=torch.bool)
    for i in range(mask.shape[0]):
        real = torch.nonzero(mask[i]).flatten()
        written[i, real[-2:]] = True
    gen = torch.Generator().manual_seed(seed)

    def write(x: torch.Tensor, hook: Any) -> torch.Tensor:
        x = x.clone()
        noise = torch.randn(int(written.sum()), x.shape[-1], generator=gen).to(x)
        x[written.to(x.device)] = noise * float(x.std())
        return x

    return (compat.embed_hook(model), write), written


def _capture(model: HookedRootModule, ids, mask, extra_hooks=()) -> tuple[dict[int, torch.Tensor], dict[int, Any]]:
    """(hook_post value per layer, projection input per layer) of one forward pass."""
    L = int(model.cfg.n_layers)
    post: dict[int, torch.Tensor] = {}
    proj: dict[int, Any] = {}

    def keep(layer: int):
        def fn(x: torch.Tensor, hook: Any) -> torch.Tensor:
            post[layer] = x.detach().clone()
            return x

        return fn

    names = [(compat.mlp_post_hook(l), keep(l)) for l in range(L) if compat.mlp_post_hook(l) in model.hook_dict]
    handles = []
    try:
        for l in range(L):
            handles.append(compat.capture_projection_input(model, l, lambda x, l=l: proj.__setitem__(l, x)))
        with torch.no_grad(), model.hooks(fwd_hooks=[*extra_hooks, *names]):
            compat.forward(model, ids, mask)
    finally:
        for h in handles:
            if h is not None:
                h.remove()
    return post, proj


def _compare(
    model: HookedRootModule, post: dict[int, torch.Tensor], proj: dict[int, Any], mask: torch.Tensor, L: int
) -> list[int]:
    """Layers whose hook value differs from the projection's input at some real position."""
    bad = []
    real = mask.bool()
    for l in range(L):
        a, b = post.get(l), proj.get(l)
        if a is None or b is None:
            bad.append(l)
            continue
        if b.dim() == 2 and a.dim() == 3:  # a projection applied to flattened [batch * pos, d] rows (OPT)
            b = b.reshape(*a.shape[:-1], b.shape[-1])
        a = compat.projection_compared(model, l, a)
        if a.shape != b.shape or not _close(a[real.to(a.device)], b[real.to(b.device)])[0]:
            bad.append(l)
    return bad


def basis_checks(model: HookedRootModule) -> list[Check]:
    """The four neuron-basis checks of the module docstring, in order (later ones skipped once one fails)."""
    L = int(model.cfg.n_layers)
    missing = [l for l in range(L) if compat.mlp_post_hook(l) not in model.hook_dict]
    checks = [
        Check(
            "hook_exists",
            not missing,
            f"blocks.{{l}}.mlp.hook_post missing in layers {missing}" if missing else f"all {L} layers",
            tuple(missing),
        )
    ]
    if compat.mixture_of_experts(model):
        checks.append(
            Check(
                "hook_fires",
                False,
                "mixture-of-experts MLP blocks: the router sends each token to some experts, so there is no "
                "single MLP whose neurons every token has; mlp.hook_post holds the block output",
                tuple(range(L)),
            )
        )
        return checks
    if missing:
        return checks
    try:
        widths = [compat.projection_width(model, l) for l in range(L)]
    except CertificationError as exc:
        return checks + [Check("hook_fires", False, str(exc), tuple(range(L)))]
    ids, mask = probe_batch(model, "left")
    post, proj = _capture(model, ids, mask)
    silent = [l for l in range(L) if l not in post]
    wrong = [l for l in range(L) if l in post and post[l].shape[-1] != widths[l]]
    fires = not silent and not wrong
    detail = (
        f"fires with {widths[0]} values per position (the output projection's input width)"
        if fires
        else (f"does not fire in layers {silent}" if silent else "")
        + (
            f"; width {post[wrong[0]].shape[-1]} in layers {wrong}, the output projection takes {widths[wrong[0]]}"
            if wrong
            else ""
        )
    )
    checks.append(Check("hook_fires", fires, detail.strip("; "), tuple(sorted(set(silent + wrong)))))
    if not fires:
        return checks
    bad = set(_compare(model, post, proj, mask, L))
    ids_r, mask_r = probe_batch(model, "right")
    bad |= set(_compare(model, *_capture(model, ids_r, mask_r), mask_r, L))
    writer, _ = _prompt_writer(model, mask)
    bad |= set(_compare(model, *_capture(model, ids, mask, [writer]), mask, L))
    checks.append(
        Check(
            "equals_projection_input",
            not bad,
            "equal at input and prompt positions, left and right padding"
            if not bad
            else f"differs from the output projection's input in layers {sorted(bad)}",
            tuple(sorted(bad)),
        )
    )
    if bad:
        return checks
    checks.append(_perturbation_check(model, ids, mask, L))
    return checks


def _perturbation_check(model: HookedRootModule, ids: torch.Tensor, mask: torch.Tensor, L: int) -> Check:
    """Adding 1 to one neuron of every layer through the hook vs through the projection's input."""
    neuron = [(7 * l + 3) % compat.projection_width(model, l) for l in range(L)]

    def add_post(l: int):
        def fn(x: torch.Tensor, hook: Any) -> torch.Tensor:
            x = x.clone()
            x[..., neuron[l]] += 1.0
            return x

        return fn

    with torch.no_grad():
        clean = compat.forward(model, ids, mask)
        with model.hooks(fwd_hooks=[(compat.mlp_post_hook(l), add_post(l)) for l in range(L)]):
            via_hook = compat.forward(model, ids, mask)
        handles = [compat.edit_projection_input(model, l, neuron[l], 1.0) for l in range(L)]
        try:
            via_proj = compat.forward(model, ids, mask)
        finally:
            for h in handles:
                h.remove()
    real = mask.bool()
    same, diff = _close(via_hook[real], via_proj[real])
    moved = float((via_hook[real] - clean[real]).abs().max())
    ok = same and moved > 0
    return Check(
        "perturbation_equivalent",
        ok,
        f"logits equal to {diff:.1e} (relative); the edit moves them by {moved:.3g}"
        if ok
        else f"logits differ by {diff:.2e} (relative)" + ("" if moved > 0 else "; the hook's edit changes nothing"),
        () if ok else tuple(range(L)),
    )


# ----------------------------------------------------------------------------- the gate
_RESULTS: weakref.WeakKeyDictionary[torch.nn.Module, list[Check]] = weakref.WeakKeyDictionary()
_ALLOWED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def allow_uncertified(model: HookedRootModule) -> None:
    """Let `tune`, `find`, `ablate` and `prune` work on `model` although its neuron basis fails a check
    (what they read as neurons may then be another tensor: your responsibility)."""
    _ALLOWED.add(model)


def neuron_basis(model: HookedRootModule) -> list[Check]:
    """The basis checks of `model`, run once per model and remembered beside it (a weak reference)."""
    found = _RESULTS.get(model)
    if found is None:
        # the probe passes neither hear nor feed anyone's hooks, and no dropout makes them random
        with compat.hooks_paused(model), compat.eval_mode(model):
            found = basis_checks(model)
        _RESULTS[model] = found
    return found


def require_neuron_basis(model: HookedRootModule, what: str, error: type[Exception] = CertificationError) -> None:
    """Refuse `what` (e.g. "finding skill neurons") on a model whose neuron basis fails a check."""
    failed = [c for c in neuron_basis(model) if c.passed is False]
    if not failed:
        return
    c = failed[0]
    name = getattr(model.cfg, "model_name", None) or type(model).__name__
    if model in _ALLOWED:
        compat.notice(model, "uncertified", f"{what} on {name} although check {c.name!r} failed ({c.detail})")
        return
    raise error(
        f"{what} refused: {name} fails the neuron-basis check {c.name!r} ({c.detail}), so "
        "blocks.{l}.mlp.hook_post is not the input of the MLP's output projection here. `tl-skill certify` "
        "shows every check; tl_skill.basis.allow_uncertified(model) (CLI: --allow-uncertified) proceeds anyway"
    )


def forget(model: HookedRootModule) -> None:
    """Drop the remembered checks of `model` (after changing its hooks or modules)."""
    _RESULTS.pop(model, None)
