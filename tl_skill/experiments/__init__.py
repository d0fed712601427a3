"""Experiments: plans of keyed conditions run by one runner, each returning a result object (`save`/`load`).

- `runner`: `Condition`, `EvalSet`, `run_conditions`, `evaluation_task` (the one subset rule);
- `results`: the `Result` base of the frozen result dataclasses;
- `ablation`: skill vs random perturbation (`AblationConfig`) and the one verdict rule (`verdict`);
- `pruning`, `transfer` (with the multi-task `study`), `origin` (`OriginConfig`), `dashboard` (the
  data behind the neuron dashboards), `causal` (attribution verified by patching, steering), `demo`
  (the demo's settings and record).

Experiments never draw and never write HTML: `tl_skill.viz` makes views of their results. Every
writing function claims its output directory first (`files.claim_dir`).
"""

from tl_skill.experiments.ablation import AblationConfig, AblationResult, Verdict, ablation_experiment, verdict
from tl_skill.experiments.causal import (
    AttributionResult,
    SteeringResult,
    attribution_experiment,
    steering_experiment,
)
from tl_skill.experiments.dashboard import DashboardResult, dashboard_data
from tl_skill.experiments.demo import DemoConfig, DemoResult
from tl_skill.experiments.origin import OriginConfig, OriginResult, origin_study
from tl_skill.experiments.pruning import PruneResult, prune_experiment
from tl_skill.experiments.results import Result
from tl_skill.experiments.runner import Condition, ConditionResult, EvalSet, evaluation_task, run_conditions
from tl_skill.experiments.transfer import StudyResult, TransferResult, run_transfer, study, transfer_from_dirs

__all__ = [
    "AblationConfig",
    "AblationResult",
    "AttributionResult",
    "SteeringResult",
    "attribution_experiment",
    "steering_experiment",
    "Condition",
    "ConditionResult",
    "DashboardResult",
    "DemoConfig",
    "DemoResult",
    "EvalSet",
    "OriginConfig",
    "OriginResult",
    "PruneResult",
    "Result",
    "StudyResult",
    "TransferResult",
    "Verdict",
    "ablation_experiment",
    "dashboard_data",
    "evaluation_task",
    "origin_study",
    "prune_experiment",
    "run_conditions",
    "run_transfer",
    "study",
    "transfer_from_dirs",
    "verdict",
]
