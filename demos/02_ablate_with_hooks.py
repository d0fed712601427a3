"""Ablate skill neurons inside `model.hooks(...)`, next to an unrelated hook of your own.

    python demos/02_ablate_with_hooks.py            # SmolLM2-135M, ~4 min on 2 CPU cores
    python demos/02_ablate_with_hooks.py --fast     # tiny random model, seconds

The perturbation is a list of ordinary forward hooks, so it composes with
whatever else you hook: here a probe that records the residual-stream norm
at the prediction position of the last layer.
"""

import argparse
import tempfile

import torch

import tl_skill
from tl_skill.neurons import random_mask_like
from tl_skill.perturb import Perturbation
from tl_skill.tuning.runs import TuneConfig

parser = argparse.ArgumentParser()
parser.add_argument("--fast", action="store_true", help="tiny model and tiny data (for tests)")
args = parser.parse_args()

model = tl_skill.load_model("tiny-llama" if args.fast else "smollm2-135m", device="cpu")
task = tl_skill.data.subsample(tl_skill.load_task("rotten_tomatoes"), {"test": 60 if args.fast else 200})
cfg = TuneConfig(
    prompt_length=4 if args.fast else 8,
    steps=10 if args.fast else 60,
    eval_every=10 if args.fast else 30,
    max_train_examples=200 if args.fast else None,
    max_dev_examples=60 if args.fast else 150,
    max_test_examples=60 if args.fast else 200,
)
out = tempfile.mkdtemp(prefix="tl_skill_demo2_")
run = tl_skill.tune(model, task, f"{out}/run", cfg, progress=not args.fast)
neurons = tl_skill.find_skill_neurons(
    model,
    [run],
    max_train_examples=300 if args.fast else 1000,
    max_eval_examples=100 if args.fast else 400,
    progress=not args.fast,
)
skill = neurons.select(fraction=0.1)  # top 10% of every layer
control = random_mask_like(skill, seed=0)  # as many random neurons per layer

verbalizer = run.verbalizer(model)
layout = tl_skill.tuning.layout_for(model, run.prompt.length)
test = task["test"]
batch = layout.encode(test["text"], test["label"])
last = model.cfg.n_layers - 1
norms: dict[str, float] = {}


def accuracy(tag: str, perturbation: Perturbation | None) -> float:
    def resid_norm(resid, hook):  # an unrelated hook of "your" analysis
        norms[tag] = float(resid[torch.arange(resid.shape[0]), batch.pred_pos].norm(dim=-1).mean())

    hooks = [(f"blocks.{last}.hook_resid_post", resid_norm)]
    if perturbation is not None:
        hooks += perturbation.fwd_hooks()
    with torch.no_grad(), run.prompt.applied(model), model.hooks(fwd_hooks=hooks):
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    preds = verbalizer.class_logits(logits, batch.pred_pos).argmax(-1)
    return float((preds == batch.labels).float().mean())


results = {
    "clean": accuracy("clean", None),
    "skill neurons zeroed": accuracy("skill", Perturbation(model, skill, mode="zero", skill=neurons)),
    "random neurons zeroed": accuracy("random", Perturbation(model, control, mode="zero", skill=neurons)),
}
for (name, acc), tag in zip(results.items(), ["clean", "skill", "random"]):
    print(f"{name:<24} accuracy {acc:.3f}   |resid| at prediction {norms[tag]:.2f}")
