"""Certify a model for tl_skill: its neuron basis and everything else tl_skill relies on (`certify`).

The neuron-basis checks are `tl_skill.basis`'s (the hook is the input of the MLP's output projection,
at input and prompt positions, with either padding, and editing it is editing that input). The rest:

- `placement`: where the soft prompt goes and where the prediction is read (causal: after the input,
  at the prompt's last position; masked: `[CLS] [MASK] prompt input`), on a real batch;
- `special_prefix`: the special tokens every row starts with (BOS handling; informational);
- `label_logits`: the label-word logits tl_skill computes from the unembedding's input (final
  norm, soft-capping, scaling, tied embeddings) equal the full forward pass's logits;
- `prefix_cache`: a causal model's cached input pass followed by the prompt pass gives the full
  pass's logits (n/a for masked LMs and models without a usable cache);
- `plain_view`: where tl_skill runs passes nobody listens to through the plain Hugging Face view,
  the view's logits equal the bridge's (n/a where it is not used);
- `pruning`: a model sliced to half its neurons gives the logits of the original with the other
  half zeroed (n/a without a bridge).

`certify(model)` returns a `Certification` (a table of check x result x failed layers, `to_dataframe`,
HTML in a notebook); `tl-skill certify MODEL` prints it.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Any

import torch

from tl_skill import compat
from tl_skill.basis import PROBE_TEXTS, Check, neuron_basis
from tl_skill.compat import HookedRootModule
from tl_skill.display import html_facts, html_table, repr_line
from tl_skill.errors import CertificationError, PruneError, TLSkillError
from tl_skill.models import model_spec
from tl_skill.perturb import perturbed
from tl_skill.prune import slice_neurons
from tl_skill.tuning.prefix import class_logits_cached, use_prefix_cache
from tl_skill.tuning.prompt import SoftPrompt, Verbalizer, class_logits, layout_for

CHECKS = (
    "hook_exists",
    "hook_fires",
    "equals_projection_input",
    "perturbation_equivalent",
    "placement",
    "special_prefix",
    "label_logits",
    "prefix_cache",
    "plain_view",
    "pruning",
)
PROMPT_LENGTH = 4


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclasses.dataclass(frozen=True, repr=False)
class Certification:
    """The outcome of `certify`: one `Check` per entry of `CHECKS` (passed, failed, or n/a)."""

    model: str
    architecture: str
    family: str
    n_layers: int
    d_mlp: int
    checks: list[Check]
    versions: dict[str, str]

    @property
    def passed(self) -> bool:
        """No check failed (n/a checks do not count)."""
        return all(c.passed is not False for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.passed is False]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "checks": [c.to_dict() for c in self.checks], "passed": self.passed}

    def to_dataframe(self) -> Any:
        """One row per check: `check`, `result` (pass / FAIL / n/a), `failed_layers`, `detail`."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "check": c.name,
                    "result": _result(c.passed),
                    "failed_layers": ",".join(map(str, c.failed_layers)),
                    "detail": c.detail,
                }
                for c in self.checks
            ]
        )

    def table(self) -> str:
        """The text table `tl-skill certify` prints."""
        head = (
            f"{self.model}: {self.architecture} ({self.family}), {self.n_layers} layers x {self.d_mlp} neurons; "
            + ", ".join(f"{k} {v}" for k, v in self.versions.items())
        )
        width = max(len(c) for c in CHECKS)
        lines = [head, f"{'check':<{width}}  {'result':<6}  {'failed layers':<13}  detail"]
        for c in self.checks:
            layers = ",".join(map(str, c.failed_layers))
            layers = layers if len(layers) <= 13 else layers[:10] + "..."
            lines.append(f"{c.name:<{width}}  {_result(c.passed):<6}  {layers:<13}  {c.detail}")
        verdict = "certified" if self.passed else f"NOT certified: {', '.join(self.failed)} failed"
        lines.append(verdict)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return repr_line("Certification", {"model": self.model, "passed": self.passed, "failed": len(self.failed)})

    def _repr_html_(self) -> str:
        facts = {"architecture": self.architecture, "family": self.family, "certified": self.passed}
        return html_facts(f"Certification of {self.model}", facts) + html_table(self.to_dataframe(), max_rows=20)


def _result(passed: bool | None) -> str:
    return "n/a" if passed is None else ("pass" if passed else "FAIL")


def _same(a: torch.Tensor, b: torch.Tensor, tol: float) -> tuple[bool, float]:
    a, b = a.double(), b.double()
    diff = float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
    return diff <= tol, diff


def _tolerance(model: HookedRootModule) -> float:
    return 1e-4 if compat.model_dtype(model) in (torch.float32, torch.float64) else 3e-2


def _batch_and_prompt(model: HookedRootModule):
    layout = layout_for(model, PROMPT_LENGTH)
    batch = layout.encode(list(PROBE_TEXTS))
    gen = torch.Generator().manual_seed(0)
    d_model = int(model.cfg.d_model)
    prompt = SoftPrompt(torch.randn(PROMPT_LENGTH, d_model, generator=gen) * 0.02)
    return layout, batch, prompt.to(compat.model_device(model))


def _verbalizer(model: HookedRootModule) -> Verbalizer:
    return Verbalizer(model.tokenizer, [" the", " a"])


def _placement(model: HookedRootModule, layout, batch) -> Check:
    family = model_spec(model).family
    starts, preds = batch.prompt_start.tolist(), batch.pred_pos.tolist()
    if family == "causal":
        ok = all(p == s + PROMPT_LENGTH - 1 for s, p in zip(starts, preds))
        detail = "causal: the prompt follows the input; the prediction is read at its last position"
    else:
        mask_id = model.tokenizer.mask_token_id
        ok = mask_id is not None and all(int(batch.input_ids[i, p]) == mask_id for i, p in enumerate(preds))
        detail = "masked: [CLS] [MASK] prompt input [SEP]; the prediction is read at [MASK]"
    return Check("placement", ok, detail if ok else f"prompt or prediction position wrong ({family} layout)")


def _special_prefix(model: HookedRootModule) -> Check:
    ids = compat.model_prefix_ids(model)
    shown = model.tokenizer.convert_ids_to_tokens(ids) if ids else "nothing"
    return Check("special_prefix", True, f"rows start with {shown} (as the tokenizer adds before a text)")


def _label_logits(model: HookedRootModule, batch, prompt, verbalizer) -> Check:
    with torch.no_grad():
        fast = class_logits(model, batch, verbalizer, prompt)
        with prompt.applied(model, batch):
            full = compat.forward(model, batch.input_ids, batch.attention_mask)
    rows = torch.arange(full.shape[0], device=full.device)
    want = full[rows, batch.pred_pos.to(full.device)][:, verbalizer.token_ids.to(full.device)]
    ok, diff = _same(fast, want, _tolerance(model))
    how = "read from the unembedding's input" if compat.UNEMBED_IN_HOOK in model.hook_dict else "full logits"
    return Check(
        "label_logits",
        ok,
        f"label-word logits ({how}) equal the full forward pass's to {diff:.1e}"
        if ok
        else f"label-word logits differ from the full forward pass's by {diff:.2e} (relative)",
    )


def _prefix_cache(model: HookedRootModule, batch, prompt, verbalizer) -> Check:
    if model_spec(model).family != "causal" or not compat.prefix_cache_supported(model):
        return Check("prefix_cache", None, "not used (masked LM, or no key/value cache)")
    with torch.no_grad():
        full = class_logits(model, batch, verbalizer, prompt)
        with use_prefix_cache(True):
            cached = class_logits_cached(model, batch, verbalizer, prompt)
    ok, diff = _same(cached, full, _tolerance(model))
    return Check(
        "prefix_cache",
        ok,
        f"cached input pass + prompt pass equal the full pass to {diff:.1e}"
        if ok
        else f"the cached pass differs from the full pass by {diff:.2e}; tune with prefix_cache=False",
    )


def _plain_view(model: HookedRootModule) -> Check:
    if not compat.is_bridge(model):
        return Check("plain_view", None, "not used (no bridge)")
    view = compat.plain_view(model)
    if view is None:
        return Check("plain_view", None, "not used for this family (passes go through the bridge)")
    ids = torch.tensor([[3, 5, 7, 11, 13]], device=compat.model_device(model)) % int(model.cfg.d_vocab)
    with torch.no_grad():
        want = model(ids, return_type="logits")
        got = view(input_ids=ids).logits
    ok, diff = _same(got, want, _tolerance(model))
    return Check("plain_view", ok, f"the plain view's logits equal the bridge's to {diff:.1e}")


def _pruning(model: HookedRootModule, batch) -> Check:
    if not compat.is_bridge(model):
        return Check("pruning", None, "not available (pruning edits the Hugging Face model under a bridge)")
    L = int(model.cfg.n_layers)
    widths = [compat.projection_width(model, l) for l in range(L)]
    kept = {l: torch.arange(0, widths[l], 2) for l in range(L)}
    try:
        sliced = slice_neurons(model, kept)
    except (PruneError, CertificationError) as exc:
        return Check("pruning", False, str(exc), tuple(range(L)))
    dropped = torch.ones(L, max(widths), dtype=torch.bool)
    for l in range(L):
        dropped[l, kept[l]] = False
        dropped[l, widths[l] :] = False
    ids, mask = batch.input_ids, batch.attention_mask
    with torch.no_grad():
        got = compat.forward(sliced, ids.to(compat.model_device(sliced)), mask.to(compat.model_device(sliced)))
        with perturbed(model, dropped, mode="zero"):
            want = compat.forward(model, ids, mask)
    real = mask.bool()
    ok, diff = _same(got[real.to(got.device)].to(want.device), want[real], _tolerance(model))
    return Check(
        "pruning",
        ok,
        f"sliced to half the neurons = the other half zeroed, to {diff:.1e}"
        if ok
        else f"the sliced model differs from zeroing by {diff:.2e}",
        () if ok else tuple(range(L)),
    )


def certify(model: HookedRootModule) -> Certification:
    """Check that tl_skill reads and edits the right tensors of `model` (module docstring); one `Check` each.

    The model is left unchanged (no hook of anyone fires during the probes, every hook of the checks is
    removed, the pruned copy discarded). Neuron-basis checks that fail make the later checks that need
    the basis n/a.
    """
    with compat.hooks_paused(model), compat.eval_mode(model):
        return _certify(model)


def _certify(model: HookedRootModule) -> Certification:
    spec = model_spec(model)
    checks: list[Check] = list(neuron_basis(model))
    basis_ok = all(c.passed is not False for c in checks)
    names = [c.name for c in checks]
    for name in ("hook_exists", "hook_fires", "equals_projection_input", "perturbation_equivalent"):
        if name not in names:
            checks.append(Check(name, None, "not run: an earlier neuron-basis check failed"))
    try:
        layout, batch, prompt = _batch_and_prompt(model)
        batch = batch.to(compat.model_device(model))
        verbalizer = _verbalizer(model)
        checks.append(_placement(model, layout, batch))
        checks.append(_special_prefix(model))
        checks.append(_label_logits(model, batch, prompt, verbalizer))
        checks.append(_prefix_cache(model, batch, prompt, verbalizer))
        checks.append(_plain_view(model))
    except TLSkillError as exc:
        checks.append(Check("placement", False, f"tl_skill cannot lay out a prompt for this model: {exc}"))
        batch = None
    if basis_ok and batch is not None and not compat.mixture_of_experts(model):
        checks.append(_pruning(model, batch))
    done = {c.name for c in checks}
    checks += [Check(n, None, "not run") for n in CHECKS if n not in done]
    order = {n: i for i, n in enumerate(CHECKS)}
    checks.sort(key=lambda c: order[c.name])
    return Certification(
        model=spec.name,
        architecture=spec.architecture,
        family=spec.family,
        n_layers=spec.n_layers,
        d_mlp=spec.d_mlp,
        checks=checks,
        versions={
            "transformer_lens": compat.TL_VERSION,
            "transformers": _version("transformers"),
            "torch": torch.__version__,
        },
    )
