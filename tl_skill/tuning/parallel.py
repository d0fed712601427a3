"""Prompt tuning under `torchrun`: the prompt's loss as a module DistributedDataParallel can wrap.

Each process computes its part of a global batch; DDP averages the prompt's gradient over processes,
so an update equals that of one process on the whole batch, up to float reduction order.
"""

from __future__ import annotations

import torch
from torch import nn

from tl_skill import distributed
from tl_skill.compat import HookedRootModule
from tl_skill.errors import DistributedError, TrainingError
from tl_skill.tuning.prefix import class_logits_cached, prefix_cache_default
from tl_skill.tuning.prompt import Batch, SoftPrompt, Verbalizer, class_logits


class PromptLoss(nn.Module):
    """Cross-entropy of the prompted frozen model, as a module whose only parameters are the prompt's.

    The frozen model is kept outside the module tree (a plain attribute), so
    DistributedDataParallel neither broadcasts nor synchronises its weights.
    The loss is this rank's sum scaled by world / global batch size: DDP
    averages gradients over ranks, which makes the update that of the mean
    over the global batch, as in one process.
    """

    def __init__(self, model: HookedRootModule, verbalizer: Verbalizer, prompt: SoftPrompt):
        super().__init__()
        self.prompt = prompt
        self.verbalizer = verbalizer
        object.__setattr__(self, "frozen_model", model)  # not a submodule

    def forward(self, batch: Batch, global_batch_size: int) -> torch.Tensor:
        forward = class_logits_cached if prefix_cache_default() else class_logits
        if batch.labels is None:
            raise TrainingError("a training batch needs labels")
        logits = forward(self.__dict__["frozen_model"], batch, self.verbalizer, self.prompt)
        total = nn.functional.cross_entropy(logits.float(), batch.labels, reduction="sum")
        return total * (distributed.world_size() / global_batch_size)


def prompt_data_parallel(
    model: HookedRootModule, verbalizer: Verbalizer, prompt: SoftPrompt, batch_size: int
) -> nn.Module | None:
    """A DDP-wrapped `PromptLoss` when distributed; None in a single process."""
    if not distributed.is_distributed():
        return None
    if batch_size < distributed.world_size():
        raise DistributedError(
            f"batch size {batch_size} is smaller than the {distributed.world_size()} processes: "
            "every process needs a part of each batch"
        )
    module = PromptLoss(model, verbalizer, prompt)
    dev = prompt.vectors.device
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)
