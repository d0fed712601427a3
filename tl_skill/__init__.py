"""tl_skill: skill neurons (Wang et al., EMNLP 2022) for TransformerLens models."""

__version__ = "0.2.0"

from .experiments import (AblationResult, OriginResult, PruneResult, StudyResult, TransferResult,  # noqa: E402
                          ablation_experiment, origin_study, prune_experiment, run_demo, study, transfer_from_dirs)
from .find import find_skill_neurons, load_or_find, trace_activations  # noqa: E402
from .models import ModelSpec, load_model, model_spec  # noqa: E402
from .neurons import SkillNeurons, Subtask, make_subtasks, random_mask_like  # noqa: E402
from .perturb import Perturbation, perturb  # noqa: E402
from .prompt import Batch, Layout, SoftPrompt, Verbalizer, class_logits, layout_for  # noqa: E402
from .prune import load_pruned, prune  # noqa: E402
from .record import MomentStats, Recorder, ThresholdStats  # noqa: E402
from .tasks import Task, TaskSpec, load_task, subsample  # noqa: E402
from .train import evaluate  # noqa: E402
from .tuning import Run, TuneConfig, tune, tune_trials  # noqa: E402

__all__ = [
    "AblationResult", "OriginResult", "PruneResult", "StudyResult", "TransferResult", "ablation_experiment",
    "origin_study", "prune_experiment", "run_demo", "study", "transfer_from_dirs",
    "Perturbation", "perturb", "load_pruned", "prune", "find_skill_neurons", "load_or_find", "trace_activations",
    "Batch", "Layout", "ModelSpec", "MomentStats", "Recorder", "Run", "SkillNeurons", "SoftPrompt",
    "Subtask", "Task", "TaskSpec", "ThresholdStats", "TuneConfig", "Verbalizer", "class_logits",
    "evaluate", "layout_for", "load_model", "load_task", "make_subtasks",
    "model_spec", "random_mask_like", "subsample", "tune", "tune_trials",
]
