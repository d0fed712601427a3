"""Every error tl_skill raises on bad input derives from `TLSkillError` (a `ValueError`).

The command line catches `TLSkillError` and prints its message on one line; in Python, catch
`TLSkillError` for any of them or the step's own class below. Each message names the option,
file or argument at fault and what would be accepted.
"""

from __future__ import annotations


class TLSkillError(ValueError):
    """Base of every tl_skill error about its input: arguments, files, models, runs."""


# --- infrastructure
class FileFormatError(TLSkillError):
    """A file that is missing, unreadable or does not hold what it should."""


class OutputDirError(TLSkillError):
    """An output path that cannot be written (a file, a read-only place, another result)."""


class DistributedError(TLSkillError):
    """A distributed launch that cannot work: missing torchrun variables, no backend for the device."""


class DeviceError(TLSkillError):
    """A device or dtype tl_skill cannot run on, or one this machine does not have."""


class StatsError(TLSkillError):
    """Arguments a statistical test cannot take (mismatched lengths, unknown methods)."""


class UnsupportedModelError(TLSkillError):
    """A model class, architecture or TransformerLens version that cannot do what was asked."""


# --- data and models
class TaskError(TLSkillError):
    """A task that cannot be loaded or is not a usable classification task."""


class ModelLoadError(TLSkillError):
    """A model name or directory that cannot be loaded."""


# --- prompt tuning
class PromptError(TLSkillError):
    """A soft prompt, prompt layout or input length that cannot work with this model."""


class VerbalizerError(TLSkillError):
    """Label words that cannot serve as a verbalizer for this tokenizer."""


class TrainingError(TLSkillError):
    """Impossible training settings, or a checkpoint that cannot be resumed from."""


class RunError(TLSkillError):
    """A run directory that is missing, incomplete or inconsistent."""


# --- units, recording, predictivity
class UnitError(TLSkillError):
    """An unknown unit source, an unreadable SAE, or a hook whose width is not the source's."""


class RecordingError(TLSkillError):
    """Bad recorder input: unknown layers or positions, NaN or overflowing activations."""


class NeuronsError(TLSkillError):
    """Inconsistent runs, bad selection arguments or unreadable results."""


class CertificationError(TLSkillError):
    """A model whose neuron hook fails a certification check (see `tl_skill.certify`)."""


# --- interventions and applications
class PerturbationError(TLSkillError):
    """Bad perturbation arguments (neurons, mode, std, statistics) or a hook of the wrong width."""


class AttributionError(TLSkillError):
    """Bad attribution or steering arguments."""


class PruneError(TLSkillError):
    """Bad pruning arguments, an unsupported architecture or an unreadable pruned-model directory."""


class TransferError(TLSkillError):
    """Task sets that cannot be compared (other models, units, or too few tasks)."""


class VariantError(TLSkillError):
    """A model variant (random weights, LoRA, BitFit) that cannot be built for this model."""


# --- experiments
class AblationError(PerturbationError):
    """Bad ablation-experiment settings, or neurons that do not belong to the run."""


class ExperimentError(TLSkillError):
    """An experiment plan that cannot run (repeated condition names, missing models or data)."""


class OriginError(TLSkillError):
    """Bad origin-study settings."""


class ComparisonError(TLSkillError):
    """Predictivity maps that cannot be compared."""


class DashboardError(TLSkillError):
    """Bad dashboard settings or results of another run."""


__all__ = [
    "AblationError",
    "AttributionError",
    "CertificationError",
    "ComparisonError",
    "DashboardError",
    "DeviceError",
    "DistributedError",
    "ExperimentError",
    "FileFormatError",
    "ModelLoadError",
    "NeuronsError",
    "OriginError",
    "OutputDirError",
    "PerturbationError",
    "PromptError",
    "PruneError",
    "RecordingError",
    "RunError",
    "StatsError",
    "TLSkillError",
    "TaskError",
    "TrainingError",
    "TransferError",
    "UnitError",
    "UnsupportedModelError",
    "VariantError",
    "VerbalizerError",
]
