"""Step 1 of the method: prompt tuning a frozen model (`docs/method.md` §1).

- `prompt`: the soft prompt (a hook on the word embeddings), the verbalizer, where prompt and input
  go in a row (`Layout`, `Batch`), and the label-word logits of a batch (`class_logits`);
- `prefix`: the prefix cache (the input once, only the prompt positions against its keys/values);
- `loop`: the one training loop (prompt tuning here, LoRA/BitFit in `tl_skill.variants`) and
  `evaluate`;
- `parallel`: the prompt's loss under `torchrun` (DistributedDataParallel);
- `runs`: `tune` and the run directory it writes (`Run`, `TuneConfig`).
"""

from tl_skill.tuning.loop import evaluate, majority_accuracy
from tl_skill.tuning.prefix import use_prefix_cache
from tl_skill.tuning.prompt import Batch, Layout, SoftPrompt, Verbalizer, class_logits, layout_for
from tl_skill.tuning.runs import Run, TuneConfig, tune, tune_trials

__all__ = [
    "Batch",
    "Layout",
    "Run",
    "SoftPrompt",
    "TuneConfig",
    "Verbalizer",
    "class_logits",
    "evaluate",
    "layout_for",
    "majority_accuracy",
    "tune",
    "tune_trials",
    "use_prefix_cache",
]
