"""Does the frozen neurons' constant explain the pruning collapse? A one-off probe (method §7).

`tl-skill prune` freezes every removed neuron at its baseline: the train mean at
the prompt positions (method §7), at every position. This probe prunes the same
neurons twice, once with that baseline and once with each neuron's mean over all
positions (input and prompt, padding excluded) of `--n-train` train examples, and
compares test accuracy on `--n-test` examples.

    python benchmarks/prune_baseline_probe.py RUN_DIR NEURONS_DIR --keep 0.02 --layers 8-29 --out probe.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from tl_skill import compat, load_model
from tl_skill.data.tasks import Task, column, label_array, subsample
from tl_skill.files import atomic_text
from tl_skill.neurons import SkillNeurons
from tl_skill.prune import prune_model
from tl_skill.tuning.prompt import class_logits, layout_for
from tl_skill.tuning.runs import Run, evaluate


def all_position_means(model, run: Run, task: Task, n_train: int, batch_size: int = 32) -> torch.Tensor:
    """[n_layers, d_mlp] mean of every neuron over all non-padding positions, prompt applied."""
    cfg = run.config
    train = subsample(task, {"train": n_train}, seed=cfg.task_seed)["train"]
    layout = layout_for(model, cfg.prompt_length, cfg.max_input_tokens, cfg.padding_side)
    tokens, labels = layout.tokenize(column(train, "text")), label_array(train)
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    sums = torch.zeros(n_layers, d_mlp, dtype=torch.float64)
    count = 0
    verbalizer = run.verbalizer(model)
    device = compat.model_device(model)
    prompt = run.prompt.to(device)
    mask: dict[str, torch.Tensor] = {}

    def adder(layer):
        def hook(act, hook):
            sums[layer] += (act.double() * mask["m"][..., None]).sum((0, 1)).cpu()

        return hook

    hooks = [(compat.mlp_post_hook(layer), adder(layer)) for layer in range(n_layers)]
    with torch.no_grad():
        for i in range(0, len(tokens), batch_size):
            batch = layout.collate(tokens[i : i + batch_size], labels[i : i + batch_size]).to(device)
            mask["m"] = batch.attention_mask.double()
            count += int(batch.attention_mask.sum())
            class_logits(model, batch, verbalizer, prompt, extra_hooks=hooks)
    return sums / count


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("neurons_dir")
    ap.add_argument("--keep", type=float, default=0.02)
    ap.add_argument("--layers", default="8-29", help="first-last layer pruned")
    ap.add_argument("--n-train", type=int, default=256)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run, sn = Run.load(args.run_dir), SkillNeurons.load(args.neurons_dir)
    model = load_model(run.model_name)
    first, last = (int(x) for x in args.layers.split("-"))
    layers = list(range(first, last + 1))
    t0 = time.perf_counter()
    task = run.load_task()
    means = all_position_means(model, run, task, args.n_train)
    cfg = run.config
    test = subsample(task, {"test": args.n_test}, seed=cfg.task_seed)
    kw = dict(batch_size=32, max_input_tokens=cfg.max_input_tokens, padding_side=cfg.padding_side)
    verbalizer = run.verbalizer(model)
    result = {
        "run": args.run_dir,
        "neurons": args.neurons_dir,
        "keep": args.keep,
        "layers": layers,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "unpruned": evaluate(model, test, "test", verbalizer, run.prompt, **kw)["accuracy"],
    }
    other = copy.copy(sn)
    rows = torch.stack([means[layer] for layer in sn.layers]).to(sn.baseline.dtype)
    other.baseline = rows[None, :, None, :].expand_as(sn.baseline).clone()  # same mean over subtasks and positions
    for name, neurons in [("prompt_position_baseline", sn), ("all_position_mean", other)]:
        pruned = prune_model(model, neurons, keep=args.keep, layers=layers)
        result[name] = evaluate(pruned, test, "test", verbalizer, run.prompt, **kw)["accuracy"]
    result["seconds"] = time.perf_counter() - t0
    print(json.dumps(result, indent=1))
    if args.out:
        atomic_text(args.out, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
