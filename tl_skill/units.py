"""Units beyond MLP neurons: where a unit's activation is read, how wide the axis is, how it is written.

A `UnitSource` names a hook point per layer, the width of its unit axis, an optional encoder applied
inside the hook, and how a change of some units is written back into the activation:

- `mlp` (default): `blocks.{l}.mlp.hook_post`, d_mlp neurons;
- `resid`: `blocks.{l}.hook_resid_post`, d_model directions (the standard basis);
- `attn`: `blocks.{l}.attn.hook_z` [pos, head, d_head], flattened to n_heads x d_head units
  (`head_scores` gives a head-level view: a head's score = max or mean over its dims);
- `sae:PATH`: the latents of a sparse autoencoder in SAELens' directory format (`cfg.json` with
  `hook_name`, `d_in`, `d_sae`, `architecture`; `sae_weights.safetensors` with `W_enc`, `b_enc`,
  `W_dec`, `b_dec`, and `threshold` for JumpReLU), read without the `sae-lens` package, at the one
  layer its hook belongs to. Latents are computed inside the hook; changing latents changes the
  activation by the change of their decoder contribution, keeping the SAE's reconstruction error
  (SAELens' error-term convention), so with no latent changed the model is unchanged.

Every source checks the hook's width against its own when a hook runs, naming both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tl_skill import compat
from tl_skill.basis import require_neuron_basis
from tl_skill.compat import HookedRootModule
from tl_skill.errors import UnitError
from tl_skill.files import FileFormatError, read_tensors
from tl_skill.models import model_spec

BUILTIN = ("mlp", "resid", "attn")
SAE_CONFIG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
SAE_ARCHITECTURES = ("standard", "relu", "jumprelu", "topk")


@dataclass(frozen=True)
class SAE:
    """Encoder and decoder of a sparse autoencoder on one hook point (float32, CPU until used)."""

    hook_name: str
    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    architecture: str = "standard"
    threshold: torch.Tensor | None = None  # JumpReLU [d_sae]
    k: int | None = None  # TopK
    apply_b_dec_to_input: bool = True

    def __post_init__(self) -> None:
        if self.architecture == "jumprelu" and self.threshold is None:
            raise UnitError("a JumpReLU SAE needs its threshold")
        if self.architecture == "topk" and (self.k is None or not 1 <= int(self.k) <= self.d_sae):
            raise UnitError(f"a TopK SAE needs 1 <= k <= d_sae ({self.d_sae}), got k={self.k}")

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        W, b = self.W_enc.to(x), self.b_enc.to(x)
        pre = (x - self.b_dec.to(x) if self.apply_b_dec_to_input else x) @ W + b
        if self.architecture == "jumprelu" and self.threshold is not None:
            return pre * (pre > self.threshold.to(x))
        if self.architecture == "topk" and self.k is not None:
            vals, idx = torch.relu(pre).topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, vals)
        return torch.relu(pre)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec.to(z) + self.b_dec.to(z)

    @classmethod
    def load(cls, path: str | Path) -> SAE:
        """Read a SAELens-format directory (no `sae-lens` needed), refusing missing or mis-shaped parts."""
        path = Path(path)
        if not (path / SAE_CONFIG).exists() or not (path / SAE_WEIGHTS).exists():
            raise UnitError(f"{path} is not a SAELens directory: it needs {SAE_CONFIG} and {SAE_WEIGHTS}")
        try:
            cfg = json.loads((path / SAE_CONFIG).read_text())
        except json.JSONDecodeError as exc:
            raise UnitError(f"{path / SAE_CONFIG} is not JSON ({exc})") from None
        missing = [k for k in ("hook_name", "d_in", "d_sae") if k not in cfg]
        if missing:
            raise UnitError(f"{path / SAE_CONFIG} lacks {', '.join(missing)}")
        arch = str(cfg.get("architecture", "standard")).lower()
        if arch not in SAE_ARCHITECTURES:
            raise UnitError(f"{path / SAE_CONFIG}: architecture {arch!r} is not one of {SAE_ARCHITECTURES}")
        try:
            t = read_tensors(path / SAE_WEIGHTS, "SAE weights", ["W_enc", "b_enc", "W_dec", "b_dec"])
        except FileFormatError as exc:
            raise UnitError(str(exc)) from None
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
        want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        for name, shape in want.items():
            if tuple(t[name].shape) != shape:
                raise UnitError(
                    f"{path / SAE_WEIGHTS}: {name} has shape {tuple(t[name].shape)}, but cfg.json's "
                    f"d_in={d_in}, d_sae={d_sae} need {shape}"
                )
        threshold = t.get("threshold")
        if arch == "jumprelu" and threshold is None:
            raise UnitError(f"{path / SAE_WEIGHTS}: a JumpReLU SAE needs 'threshold'")
        k = cfg.get("k") or (cfg.get("architecture_kwargs") or {}).get("k")
        if arch == "topk" and not k:
            raise UnitError(f"{path / SAE_CONFIG}: a TopK SAE needs 'k'")
        try:
            return cls(
                str(cfg["hook_name"]),
                W_enc=t["W_enc"].float(),
                b_enc=t["b_enc"].float(),
                W_dec=t["W_dec"].float(),
                b_dec=t["b_dec"].float(),
                architecture="standard" if arch == "relu" else arch,
                threshold=None if threshold is None else threshold.float(),
                k=int(k) if k else None,
                apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
            )
        except UnitError as exc:
            raise UnitError(f"{path}: {exc}") from None

    @classmethod
    def from_sae_lens(cls, sae) -> SAE:
        """A `sae_lens.SAE` object (when that package is installed)."""
        cfg = sae.cfg
        arch = str(
            getattr(cfg, "architecture", lambda: "standard")()
            if callable(getattr(cfg, "architecture", None))
            else getattr(cfg, "architecture", "standard")
        ).lower()
        meta = getattr(cfg, "metadata", None)
        hook = getattr(cfg, "hook_name", None) or getattr(meta, "hook_name", None)
        threshold = getattr(sae, "threshold", None)
        return cls(
            str(hook),
            sae.W_enc.detach().float().cpu(),
            sae.b_enc.detach().float().cpu(),
            sae.W_dec.detach().float().cpu(),
            sae.b_dec.detach().float().cpu(),
            architecture="standard" if arch == "relu" else arch,
            threshold=None if threshold is None else threshold.detach().float().cpu(),
            k=getattr(cfg, "k", None),
            apply_b_dec_to_input=bool(getattr(cfg, "apply_b_dec_to_input", True)),
        )


@dataclass(frozen=True)
class UnitSource:
    """One kind of unit on a model: its hook per layer, its width, its encoder and its write-back."""

    name: str  # "mlp", "resid", "attn", "sae:PATH"
    template: str  # hook name with {l}
    width: int
    layers: tuple[int, ...]  # the layers that have such units
    shape: tuple[int, ...]  # trailing shape of the hook's activation
    sae: SAE | None = field(default=None, repr=False)

    def hook(self, layer: int) -> str:
        return self.template.format(l=layer)

    def check(self, act: torch.Tensor, name: str, error: type[Exception] = UnitError) -> None:
        if tuple(act.shape[-len(self.shape) :]) != self.shape:
            raise error(
                f"hook point {name} has trailing shape {tuple(act.shape[2:])}, but the {self.name!r} units expect "
                f"{self.shape} ({self.width} units): it does not hold what this unit source reads (a pruned model, "
                "a mixture-of-experts block, or an SAE trained for another hook or width)"
            )

    def flat(self, act: torch.Tensor) -> torch.Tensor:
        """[batch, pos, *shape] -> [batch, pos, n] (attention heads merged)."""
        return act.flatten(-2) if len(self.shape) == 2 else act

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Unit values of flattened activations (the SAE's latents; the activation itself otherwise)."""
        return self.sae.encode(x.float()).to(x.dtype) if self.sae is not None else x

    def apply(self, act: torch.Tensor, idx: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`act` with units `idx` changed from `u` to `fn(u)` ([batch, pos, k] -> same)."""
        if self.sae is None:
            out = self.flat(act).clone()
            out[..., idx] = fn(out[..., idx]).to(act.dtype)
            return out.view(act.shape)
        z = self.sae.encode(act.float())[..., idx]
        delta = (fn(z.to(act.dtype)).float() - z) @ self.sae.W_dec[idx.cpu()].to(z)
        return act + delta.to(act.dtype)  # the reconstruction error is kept: only the change is added

    def to_dict(self) -> dict:
        return {"units": self.name, "hook": self.template, "width": self.width, "layers": list(self.layers)}


def _sae_layer(hook_name: str) -> int:
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    if not m:
        raise UnitError(f"the SAE's hook {hook_name!r} is not a per-layer hook (blocks.<layer>.…)")
    return int(m.group(1))


def unit_source(model: HookedRootModule, units: str | UnitSource | SAE | None = "mlp") -> UnitSource:
    """The `UnitSource` called `units` on `model`: "mlp", "resid", "attn", "sae:PATH", an `SAE` or a `sae_lens.SAE`."""
    if isinstance(units, UnitSource):
        return units
    spec = model_spec(model)
    layers = tuple(range(spec.n_layers))
    if units is None or units == "mlp":
        return UnitSource("mlp", "blocks.{l}.mlp.hook_post", spec.d_mlp, layers, (spec.d_mlp,))
    if units == "resid":
        return UnitSource("resid", "blocks.{l}.hook_resid_post", spec.d_model, layers, (spec.d_model,))
    if units == "attn":
        h, d = int(model.cfg.n_heads), int(model.cfg.d_head)
        return UnitSource("attn", "blocks.{l}.attn.hook_z", h * d, layers, (h, d))
    if isinstance(units, str) and units.startswith("sae:"):
        sae, name = SAE.load(units[4:]), units
    elif isinstance(units, SAE):
        sae, name = units, f"sae:{units.hook_name}"
    elif type(units).__name__ == "SAE" and hasattr(units, "W_enc"):
        sae = SAE.from_sae_lens(units)
        name = f"sae:{sae.hook_name}"
    else:
        raise UnitError(f"unknown unit source {units!r}; choose one of {BUILTIN} or sae:PATH")
    layer = _sae_layer(sae.hook_name)
    if not 0 <= layer < spec.n_layers:
        raise UnitError(f"the SAE's hook {sae.hook_name} is at layer {layer}, but the model has {spec.n_layers}")
    if sae.hook_name not in model.hook_dict:
        raise UnitError(f"the model has no hook point {sae.hook_name!r} (the SAE's hook_name)")
    template = sae.hook_name.replace(f"blocks.{layer}.", "blocks.{l}.", 1)
    return UnitSource(name, template, sae.d_sae, (layer,), (sae.d_in,), sae)


def unit_kind(name: str) -> str:
    """ "mlp", "resid", "attn" or "sae" (any SAE path)."""
    return "sae" if name.startswith("sae:") else name


def check_same_units(found: str, units, error: type[Exception] = UnitError) -> None:
    """Refuse, without a model, a requested unit source of another kind than the one skill units were found on."""
    if units is None:
        return
    name = units if isinstance(units, str) else getattr(units, "name", None) or f"sae:{units.hook_name}"
    if unit_kind(name) != unit_kind(found):
        raise error(
            f"the skill neurons were found on {found!r} units; units {name!r} are other units "
            "(find them again with those units)"
        )


def source_for_neurons(
    model: HookedRootModule, neurons, units: str | UnitSource | SAE | None = None, error: type[Exception] = UnitError
) -> UnitSource:
    """The unit source to perturb or trace skill units with, checked against the units they were found on.

    `units=None` takes the source recorded with the skill neurons (`SkillNeurons.units`).
    Another source is accepted only when it is the same kind of unit of the same width at
    the same layers (an SAE directory that moved: `sae:NEWPATH`); anything else would
    perturb or trace other units than those that were scored, and is refused naming both.
    """
    found = neurons.units
    try:
        source = unit_source(model, found if units is None else units)
    except UnitError as exc:
        if units is None and unit_kind(found) == "sae":
            raise error(
                f"the skill units were found with {found!r}, which cannot be read now ({exc}); "
                "if the SAE moved, pass its new directory as units='sae:NEWPATH' (--units)"
            ) from None
        raise error(str(exc)) from None
    check_same_units(found, source.name, error)
    if source.width != neurons.d_mlp:
        raise error(
            f"the skill neurons have {neurons.d_mlp} units per layer but the model's "
            f"{source.name!r} units are {source.width} wide"
        )
    outside = [l for l in neurons.layers if l not in source.layers]
    if outside:
        raise error(
            f"the skill neurons cover layers {list(neurons.layers)}, but {source.name!r} units exist "
            f"at layers {list(source.layers)}"
        )
    check_source(model, source, error)
    return source


def check_source(model: HookedRootModule, source: UnitSource, error: type[Exception] = UnitError) -> None:
    """Refuse, before any work, a source the model cannot give (MoE blocks for `mlp`; missing hooks)."""
    if source.name == "mlp":
        compat.check_neuron_axis(model, error)
        require_neuron_basis(model, "reading MLP neurons", error)
    missing = [source.hook(l) for l in source.layers if source.hook(l) not in model.hook_dict]
    if missing:
        raise error(f"the model has no hook point {missing[0]!r} (units {source.name!r})")


def head_scores(values: torch.Tensor, n_heads: int, how: str = "max") -> torch.Tensor:
    """Head-level view of per-dimension attention-unit scores [..., n_heads * d_head] -> [..., n_heads]."""
    if values.shape[-1] % n_heads:
        raise UnitError(f"{values.shape[-1]} attention units do not split into {n_heads} heads")
    v = values.reshape(*values.shape[:-1], n_heads, values.shape[-1] // n_heads)
    if how == "max":
        return v.max(-1).values
    if how == "mean":
        return v.mean(-1)
    raise UnitError(f"head score must be 'max' or 'mean', got {how!r}")


_DIRECT_HOOKS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_mlp_out",
    "hook_attn_out",
    "mlp.hook_out",
    "attn.hook_out",
)


def output_norm(model: HookedRootModule, source: UnitSource, layer: int) -> dict | None:
    """The normalisation between a unit's output and the residual stream (`compat.post_norm`: Gemma 2/3's and
    OLMo 2's post-MLP / post-attention norms), or None where its output joins the stream as is."""
    kind = _norm_kind(source)
    if kind is None or not compat.is_bridge(model):  # output_direction is None on a HookedTransformer's post-norms
        return None
    return compat.post_norm(model, layer, kind)


def _norm_kind(source: UnitSource) -> str | None:
    tail = source.template.replace("blocks.{l}.", "", 1)
    if source.name == "mlp" or (source.sae is not None and tail == "mlp.hook_post"):
        return "mlp"
    return "attn" if source.name == "attn" else None


def through_output_norm(direction: torch.Tensor, norm: dict | None) -> torch.Tensor:
    """`direction` (float64) as it reaches the residual stream through `norm` (`output_norm`), its scale held:
    centred if the norm centres, times its gain; the caller divides by the norm's scale at each position."""
    v = direction.detach().double().cpu()
    if norm is None:
        return v
    if norm["centre"]:
        v = v - v.mean()
    return v * norm["gain"].detach().double().cpu()


def output_direction(model: HookedRootModule, source: UnitSource, layer: int, unit: int) -> torch.Tensor | None:
    """The vector [d_model] that one unit of activation adds on its direct path, or None.

    `mlp`: the neuron's `W_out` row; `attn`: the `W_O` row of its (head, dim); `resid`: the basis
    vector; an SAE latent: its decoder row, through `W_out` when the SAE reads `mlp.hook_post`,
    as is when it reads the residual stream or a block output. None for an SAE on another hook
    (no direct path is defined there, so dashboards leave the direct effect out). Where the block
    normalises its MLP's or attention's output before the residual stream (`output_norm`), this is the
    vector before that norm: `through_output_norm` takes it through; on a `HookedTransformer` with such
    norms, None.
    """
    kind = _norm_kind(source)
    if kind is not None and not compat.is_bridge(model) and compat.has_post_norm(model, layer, kind):
        return None
    if source.name == "mlp":
        return compat.mlp_out_vectors(model, layer)[unit]
    if source.name == "attn":
        return compat.attn_out_vectors(model, layer)[unit]
    if source.name == "resid":
        v = torch.zeros(source.width)
        v[unit] = 1.0
        return v
    tail = source.template.replace("blocks.{l}.", "", 1)
    if source.sae is None:
        raise UnitError(f"unit source {source.name!r} has no output direction")
    row = source.sae.W_dec[unit]
    if tail == "mlp.hook_post":
        return row.to(compat.mlp_out_vectors(model, layer)) @ compat.mlp_out_vectors(model, layer)
    if tail in _DIRECT_HOOKS:
        return row
    return None
