"""tl_skill: skill neurons (Wang et al., EMNLP 2022) for TransformerLens models."""

from .ablate import Perturbation, ablation_experiment, perturb
from .models import ModelSpec, load_model, model_spec
from .neurons import SkillNeurons, Subtask, find_skill_neurons, make_subtasks, random_mask_like
from .prune import load_pruned, prune, prune_experiment
from .prompt import Batch, Layout, SoftPrompt, Verbalizer, class_logits, layout_for
from .record import MomentStats, Recorder, ThresholdStats
from .tasks import Task, TaskSpec, load_task, subsample
from .tuning import Run, TuneConfig, evaluate, tune, tune_trials

__version__ = "0.1.0"

__all__ = [
    "Perturbation", "ablation_experiment", "perturb", "load_pruned", "prune", "prune_experiment",
    "Batch", "Layout", "ModelSpec", "MomentStats", "Recorder", "Run", "SkillNeurons", "SoftPrompt",
    "Subtask", "Task", "TaskSpec", "ThresholdStats", "TuneConfig", "Verbalizer", "class_logits",
    "evaluate", "find_skill_neurons", "layout_for", "load_model", "load_task", "make_subtasks",
    "model_spec", "random_mask_like", "subsample", "tune", "tune_trials",
]
