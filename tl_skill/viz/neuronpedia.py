"""Neuronpedia export of skill neurons: the layout of Neuronpedia's own exporter, for a self-hosted instance.

`export_neuronpedia(dashboard, out)` writes, for each layer holding selected
neurons, `out/<model>/<layer>-<source set>/features/batch-0.jsonl.gz` and
`activations/batch-0.jsonl.gz`: one JSON object per line with the fields
Neuronpedia's `Feature` and `Activation` records have (those its
convert-to-export utility writes). The mapping:

- a feature is one MLP neuron: `layer` = the source id `<layer>-<source set>`,
  `index` = the neuron's index, `hookName` = `blocks.<l>.mlp.hook_post`;
- `freq_hist_data_bar_*`: the histogram of the neuron's activation at its best
  prompt position over the dashboard's test examples; `frac_nonzero`: the
  share of those examples above the neuron's baseline (skill neurons are dense:
  this replaces an SAE latent's firing rate);
- `pos_str`/`neg_str` and `logits_hist_data_bar_*`: the logit lens of the
  neuron's output direction through the final norm's gain (per unit activation);
- an activation record per top and bottom example: its tokens (prompt positions
  written `⟨P1⟩`...), the neuron's value at every position, `maxValue`,
  `maxValueTokenIndex`, `minValue`; `qualifyingTokenIndex` is the best prompt
  position, where predictivity is measured.

Limits: no steering vector (`hasVector` false), no correlated neurons, no
explanations; Neuronpedia expects a model id it knows (pass `model_id`);
`creatorId` is a placeholder to be replaced by the importing instance's user.
"""

from __future__ import annotations

import gzip
import json
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tl_skill.errors import OutputDirError
from tl_skill.files import atomic_bytes, claim_dir, jsonable, path_component, rolls_back_claims

FEATURE_FIELDS = (
    "modelId",
    "layer",
    "index",
    "creatorId",
    "createdAt",
    "maxActApprox",
    "hasVector",
    "vector",
    "vectorLabel",
    "vectorDefaultSteerStrength",
    "hookName",
    "topkCosSimIndices",
    "topkCosSimValues",
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_pearson",
    "correlated_neurons_l1",
    "correlated_features_indices",
    "correlated_features_pearson",
    "correlated_features_l1",
    "neg_str",
    "neg_values",
    "pos_str",
    "pos_values",
    "frac_nonzero",
    "freq_hist_data_bar_heights",
    "freq_hist_data_bar_values",
    "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values",
    "decoder_weights_dist",
)
ACTIVATION_FIELDS = (
    "id",
    "tokens",
    "index",
    "layer",
    "modelId",
    "maxValue",
    "maxValueTokenIndex",
    "minValue",
    "values",
    "creatorId",
    "dataSource",
    "dataIndex",
    "dfaValues",
    "dfaTargetIndex",
    "dfaMaxValue",
    "createdAt",
    "lossValues",
    "logitContributions",
    "binMin",
    "binMax",
    "binContains",
    "qualifyingTokenIndex",
)


def _write_gz_jsonl(path: Path, records: list[dict[str, Any]], root: Path) -> Path:
    text = "".join(json.dumps(jsonable(r), allow_nan=False) + "\n" for r in records)
    return atomic_bytes(path, gzip.compress(text.encode(), compresslevel=5), root=root)


def claim_export_dir(out: str | Path, model_id: str, source_set: str) -> Path:
    """Accept `out` for this export (new, empty, or the same export) or refuse it, before any work."""
    return claim_dir(out, "neuronpedia-export", {"model_id": model_id, "source_set": source_set})


def check_name(name: str, what: str) -> str:
    """`name`, refused unless it is one plain file-name component (it names a directory of the export)."""
    if path_component(name) != name:
        raise OutputDirError(
            f"the {what} {name!r} must be a plain name (letters, digits, '.', '_', '+', '-'; "
            f"not starting with '.'), since it names a directory of the export: e.g. "
            f"{path_component(name)!r}"
        )
    return name


def default_model_id(model: str) -> str:
    """The export's model id from tl_skill's model name: its last path component, made a plain name
    (`/models/my-llama` -> `my-llama`, `org/model` -> `model`)."""
    return path_component(str(model).rstrip("/\\").replace("\\", "/").split("/")[-1])


def default_source_set(units: str) -> str:
    """`tlskill-mlp`, `tlskill-resid`, `tlskill-attn` or `tlskill-sae`: the source set named after the units."""
    return "tlskill-" + ("sae" if units.startswith("sae:") else units)


@rolls_back_claims
def export_neuronpedia(
    dashboard,
    out: str | Path,
    model_id: str | None = None,
    source_set: str | None = None,
    creator_id: str = "tl-skill-export",
    bins: int = 30,
) -> list[Path]:
    """Write `dashboard`'s units (a `DashboardResult`) in Neuronpedia's export layout; returns the files.

    `source_set` defaults to `default_source_set` of the dashboard's units (`tlskill-mlp` for neurons).
    A unit without a direct path to the logits (an SAE on another hook) gets empty logit-lens lists.
    """
    model_id = check_name(model_id, "model id") if model_id else default_model_id(dashboard.model)
    source_set = (
        check_name(source_set, "source set")
        if source_set
        else default_source_set(dashboard.settings.get("units", "mlp"))
    )
    out = claim_export_dir(out, model_id, source_set)
    created = datetime.now(timezone.utc).isoformat()
    by_layer: dict[int, tuple[list, list]] = {}
    for k, row in enumerate(dashboard.neurons):
        source = f"{row['layer']}-{source_set}"
        values = dashboard.activations[:, k].numpy().astype(float)
        heights, edges = np.histogram(values, bins)
        examples = row["examples"]["top"] + row["examples"]["bottom"]
        lens = row["logit_lens"] or {
            "neg_str": [],
            "neg_values": [],
            "pos_str": [],
            "pos_values": [],
            "hist_heights": [],
            "hist_values": [],
        }
        feature = {
            "modelId": model_id,
            "layer": source,
            "index": str(row["neuron"]),
            "creatorId": creator_id,
            "createdAt": created,
            "maxActApprox": float(values.max()),
            "hasVector": False,
            "vector": [],
            "vectorLabel": None,
            "vectorDefaultSteerStrength": None,
            "hookName": row["hook_name"],
            "topkCosSimIndices": [],
            "topkCosSimValues": [],
            "neuron_alignment_indices": [],
            "neuron_alignment_values": [],
            "neuron_alignment_l1": [],
            "correlated_neurons_indices": [],
            "correlated_neurons_pearson": [],
            "correlated_neurons_l1": [],
            "correlated_features_indices": [],
            "correlated_features_pearson": [],
            "correlated_features_l1": [],
            "neg_str": lens["neg_str"],
            "neg_values": lens["neg_values"],
            "pos_str": lens["pos_str"],
            "pos_values": lens["pos_values"],
            "frac_nonzero": float((values > row["baseline"]).mean()),
            "freq_hist_data_bar_heights": heights.astype(float).tolist(),
            "freq_hist_data_bar_values": ((edges[:-1] + edges[1:]) / 2).tolist(),
            "logits_hist_data_bar_heights": [float(h) for h in lens["hist_heights"]],
            "logits_hist_data_bar_values": lens["hist_values"],
            "decoder_weights_dist": [],
        }
        acts = []
        for ex in examples:
            vals = ex["values"]
            p, tokens = 0, []
            for tok, is_prompt in zip(ex["tokens"], ex["is_prompt"]):
                if is_prompt:
                    p += 1
                tokens.append(f"⟨P{p}⟩" if is_prompt else tok)
            prompt_at = [t for t, is_prompt in enumerate(ex["is_prompt"]) if is_prompt]
            acts.append(
                {
                    "id": uuid.uuid5(uuid.NAMESPACE_URL, f"{model_id}/{source}/{row['neuron']}/{ex['index']}").hex,
                    "tokens": tokens,
                    "index": str(row["neuron"]),
                    "layer": source,
                    "modelId": model_id,
                    "maxValue": float(max(vals)),
                    "maxValueTokenIndex": int(np.argmax(vals)),
                    "minValue": float(min(vals)),
                    "values": [float(v) for v in vals],
                    "creatorId": creator_id,
                    "dataSource": dashboard.task,
                    "dataIndex": str(ex["index"]),
                    "dfaValues": [],
                    "dfaTargetIndex": None,
                    "dfaMaxValue": None,
                    "createdAt": created,
                    "lossValues": [],
                    "logitContributions": None,
                    "binMin": None,
                    "binMax": None,
                    "binContains": None,
                    "qualifyingTokenIndex": prompt_at[row["position"]],
                }
            )
        feats, activations = by_layer.setdefault(row["layer"], ([], []))
        feats.append(feature)
        activations.extend(acts)
    files = []
    for layer, (feats, activations) in sorted(by_layer.items()):
        base = out / model_id / f"{layer}-{source_set}"
        files.append(_write_gz_jsonl(base / "features" / "batch-0.jsonl.gz", feats, out))
        files.append(_write_gz_jsonl(base / "activations" / "batch-0.jsonl.gz", activations, out))
    return files
