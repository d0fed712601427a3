"""tl_skill: skill neurons (Wang et al., EMNLP 2022) for TransformerLens models.

The entry points, by step of the method (`docs/method.md`); everything else is reachable under its
module (`tl_skill.record`, `tl_skill.stats`, `tl_skill.experiments`, ...).
"""

import importlib.metadata as _metadata

# models and data
from tl_skill.attribution import attribute
from tl_skill.certification import certify
from tl_skill.data import Task, load_task
from tl_skill.errors import TLSkillError
from tl_skill.experiments import (
    AblationConfig,
    OriginConfig,
    ablation_experiment,
    dashboard_data,
    origin_study,
    prune_experiment,
    study,
    transfer_from_dirs,
)
from tl_skill.find import FindConfig, find_skill_neurons, load_or_find
from tl_skill.models import load_model, model_spec
from tl_skill.neurons import SkillNeurons
from tl_skill.perturb import Perturbation, perturbed
from tl_skill.pipelines import run_demo
from tl_skill.prune import load_pruned, prune_model
from tl_skill.record import Recorder
from tl_skill.tuning import Run, SoftPrompt, TuneConfig, evaluate, tune
from tl_skill.viz import export_neuronpedia, write_dashboard

try:
    __version__ = _metadata.version("tl-skill")
except _metadata.PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    # models and data
    "load_model",
    "model_spec",
    "load_task",
    "Task",
    # 1. prompt tuning
    "tune",
    "TuneConfig",
    "Run",
    "SoftPrompt",
    "evaluate",
    # 2-5. recording, predictivity, selection
    "find_skill_neurons",
    "load_or_find",
    "FindConfig",
    "SkillNeurons",
    "Recorder",
    # 6-7. perturbation and pruning
    "perturbed",
    "Perturbation",
    "prune_model",
    "load_pruned",
    # experiments
    "ablation_experiment",
    "AblationConfig",
    "prune_experiment",
    "study",
    "transfer_from_dirs",
    "origin_study",
    "OriginConfig",
    "dashboard_data",
    # views and pipelines
    "write_dashboard",
    "export_neuronpedia",
    "run_demo",
    "attribute",
    "certify",
    "TLSkillError",
    "__version__",
]
