"""Find skill neurons, then inspect the best one with plain TransformerLens tools.

    python demos/01_find_and_inspect.py                 # SmolLM2-135M, ~4 min on 2 CPU cores
    python demos/01_find_and_inspect.py --fast          # tiny random model, seconds

The soft prompt is a hook on the embedding output, so inside `prompt.applied(model)`
`run_with_cache` sees the prompted model like any other.
"""

import argparse
import tempfile

import torch

import tl_skill
from tl_skill.tuning.runs import TuneConfig

parser = argparse.ArgumentParser()
parser.add_argument("--fast", action="store_true", help="tiny model and tiny data (for tests)")
parser.add_argument("--out", default=None)
args = parser.parse_args()

model_name = "tiny-gpt2" if args.fast else "smollm2-135m"
model = tl_skill.load_model(model_name, device="cpu")
task = tl_skill.load_task("rotten_tomatoes")
cfg = TuneConfig(
    prompt_length=4 if args.fast else 8,
    steps=10 if args.fast else 60,
    eval_every=10 if args.fast else 30,
    max_train_examples=200 if args.fast else None,
    max_dev_examples=60 if args.fast else 150,
    max_test_examples=60 if args.fast else 200,
)
out = args.out or tempfile.mkdtemp(prefix="tl_skill_demo1_")

# 1. Prompt-tune (the backbone stays frozen) and find skill neurons.
run = tl_skill.tune(model, task, f"{out}/run", cfg, progress=not args.fast)
neurons = tl_skill.find_skill_neurons(
    model,
    [run],
    max_train_examples=300 if args.fast else 1000,
    max_eval_examples=100 if args.fast else 400,
    progress=not args.fast,
)
best = neurons.top(1)[0]
layer, idx, pos = best["layer"], best["neuron"], best["position"]
print(
    f"prompt dev accuracy {run.metrics['dev_accuracy']:.3f}; best neuron L{layer}.{idx} "
    f"(prompt position {pos}) predictivity {best['predictivity']:.3f}"
)

# 2. Inspect it with run_with_cache on two hand-written reviews.
texts = ["A warm, funny and beautifully acted film.", "A dull, lifeless mess that wastes its cast."]
layout = tl_skill.tuning.layout_for(model, run.prompt.length)
batch = layout.encode(texts)
with run.prompt.applied(model):
    _, cache = model.run_with_cache(
        batch.input_ids, attention_mask=batch.attention_mask, names_filter=f"blocks.{layer}.mlp.hook_post"
    )
acts = cache[f"blocks.{layer}.mlp.hook_post"][torch.arange(2), batch.prompt_start + pos, idx]
baseline = neurons.baseline_at(layer, pos, idx)
for text, a in zip(texts, acts.tolist()):
    side = "above" if a > baseline else "below"
    print(f"  {a:+.4f} ({side} baseline {baseline:+.4f})  {text}")
