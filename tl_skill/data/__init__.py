"""Classification tasks: the types and split rule (`tasks`), where examples come from (`sources`).

`load_task(name)` reads a bundled task, a csv/jsonl file or a Hugging Face dataset; every task is a
`Task` with train/dev/test splits and label words.
"""

from tl_skill.data.sources import load_task
from tl_skill.data.tasks import BUNDLED_TASKS, SPLITS, Task, TaskError, TaskSpec, subsample

__all__ = ["BUNDLED_TASKS", "SPLITS", "Task", "TaskError", "TaskSpec", "load_task", "subsample"]
