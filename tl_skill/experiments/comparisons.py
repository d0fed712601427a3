"""Comparing predictivity maps [layers, d_mlp]: a summary of one, the rank correlation and top-neuron
overlap of two (the origin study's controls)."""

from __future__ import annotations

from typing import Any

import torch

from tl_skill.errors import ComparisonError
from tl_skill.indicators import spearman
from tl_skill.neurons import SkillNeurons


def top_per_layer(d_mlp: int, fraction: float) -> int:
    """How many neurons per layer the top `fraction` is: at least one."""
    return max(1, int(fraction * d_mlp))


def predictivity_summary(sn: SkillNeurons, fraction: float = 0.01) -> dict[str, Any]:
    """Best neuron, mean of the per-layer top `fraction` (at least one per layer), mean of all."""
    pred = sn.predictivity
    mask = sn.select(k=top_per_layer(sn.d_mlp, fraction), per_layer=True)
    return {
        "best_predictivity": float(pred.max()),
        "top_mean_predictivity": float(pred[mask].mean()),
        "top_fraction": fraction,
        "top_per_layer": top_per_layer(sn.d_mlp, fraction),
        "mean_predictivity": float(pred.mean()),
        "runs": len(sn.runs),
        "prompt_dev_accuracy": sn.prompt_accuracy("dev_accuracy"),
        "prompt_test_accuracy": sn.prompt_accuracy("test_accuracy"),
    }


def compare_predictivity(
    a: SkillNeurons | torch.Tensor, b: SkillNeurons | torch.Tensor, fraction: float = 0.01
) -> dict[str, Any]:
    """Spearman correlation of two predictivity maps over all neurons, and the overlap of their skill neurons.

    The skill neurons are the top `max(1, int(fraction * d_mlp))` of each layer;
    `top_overlap` = |A and B| / |A|, `chance_overlap` its expectation for two
    random sets of that size.
    """
    pa = a.predictivity if isinstance(a, SkillNeurons) else torch.as_tensor(a)
    pb = b.predictivity if isinstance(b, SkillNeurons) else torch.as_tensor(b)
    if pa.shape != pb.shape or pa.ndim != 2:
        raise ComparisonError(f"predictivity maps of shapes {tuple(pa.shape)} and {tuple(pb.shape)} cannot be compared")
    k = top_per_layer(pa.shape[1], fraction)
    ma, mb = top_mask(pa, k), top_mask(pb, k)
    return {
        "spearman": spearman(pa.reshape(-1).numpy(), pb.reshape(-1).numpy()),
        "top_overlap": float((ma & mb).sum()) / float(ma.sum()),
        "chance_overlap": k / pa.shape[1],
        "top_fraction": fraction,
        "top_per_layer": k,
        "n_neurons": int(pa.numel()),
    }


def top_mask(pred: torch.Tensor, k: int) -> torch.Tensor:
    """Top k of each row; ties broken by index (as `SkillNeurons.select`)."""
    mask = torch.zeros(pred.shape, dtype=torch.bool)
    for l in range(pred.shape[0]):
        order = torch.sort(-pred[l].double(), stable=True).indices[:k]
        mask[l, order] = True
    return mask
