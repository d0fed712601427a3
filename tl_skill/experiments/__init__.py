"""Experiments: plans of keyed conditions run by one runner, with result objects (`save`/`load`).

- `runner`: `Condition`, `EvalSet`, `run_conditions`, `evaluation_task` (the one subset rule);
- `results`: the `Result` base of the frozen result dataclasses;
- `ablation`: skill vs random perturbation and the one verdict rule (`verdict`);
- `pruning`, `transfer` (with the multi-task `study`), `origin`, `dashboard`, `demo`.

Every writing function claims its output directory first (`files.claim_dir`).
"""

from .ablation import AblationResult, Verdict, ablation_experiment, verdict
from .dashboard import DashboardResult, dashboard_data
from .demo import DemoConfig, DemoResult, run_demo
from .origin import OriginResult, origin_study
from .pruning import PruneResult, prune_experiment
from .results import Result
from .runner import Condition, ConditionResult, EvalSet, evaluation_task, run_conditions
from .transfer import StudyResult, TransferResult, run_transfer, study, transfer_from_dirs

__all__ = [
    "AblationResult", "Condition", "DashboardResult", "dashboard_data", "ConditionResult", "DemoConfig", "DemoResult", "EvalSet", "OriginResult",
    "PruneResult", "Result", "StudyResult", "TransferResult", "Verdict", "ablation_experiment", "evaluation_task",
    "origin_study", "prune_experiment", "run_conditions", "run_demo", "run_transfer", "study",
    "transfer_from_dirs", "verdict",
]
