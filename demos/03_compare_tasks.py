"""Compare the skill neurons of three tasks: are two sentiment tasks closer than sentiment vs topic?

python demos/03_compare_tasks.py            # SmolLM2-135M, ~5 min on 2 CPU cores
python demos/03_compare_tasks.py --fast     # tiny random model, under a minute
"""

import argparse
import itertools
import tempfile

import tl_skill
from tl_skill.indicators import neuron_similarity, prompt_similarity
from tl_skill.tuning.runs import TuneConfig

parser = argparse.ArgumentParser()
parser.add_argument("--fast", action="store_true", help="tiny model and tiny data (for tests)")
args = parser.parse_args()

model = tl_skill.load_model("tiny-gpt2" if args.fast else "smollm2-135m", device="cpu")
names = ["rotten_tomatoes", "word_sentiment", "bbc_news:sport-vs-business"]
cfg = TuneConfig(
    prompt_length=4 if args.fast else 8,
    steps=8 if args.fast else 50,
    eval_every=8 if args.fast else 25,
    max_train_examples=160 if args.fast else 1500,
    max_dev_examples=40 if args.fast else 150,
    max_test_examples=40 if args.fast else 150,
    max_input_tokens=64,
)
out = tempfile.mkdtemp(prefix="tl_skill_demo3_")

neurons, prompts = {}, {}
for name in names:
    run = tl_skill.tune(
        model,
        tl_skill.load_task(name),
        f"{out}/{name.replace(':', '_')}",
        cfg,
        progress=not args.fast,
        evaluate_test=False,
    )
    neurons[name] = tl_skill.find_skill_neurons(
        model,
        [run],
        max_train_examples=200 if args.fast else 600,
        max_eval_examples=80 if args.fast else 300,
        progress=not args.fast,
    )
    prompts[name] = run.prompt
    print(
        f"{name:<28} dev accuracy {run.metrics['dev_accuracy']:.3f}  "
        f"best predictivity {neurons[name].best_predictivity:.3f}"
    )

print(f"\n{'task A':<28} {'task B':<28} {'spearman':>8} {'top-2% jaccard':>14} {'prompt cos':>10}")
for a, b in itertools.combinations(names, 2):
    sim = neuron_similarity(neurons[a], neurons[b])
    cos = prompt_similarity([prompts[a]], [prompts[b]])["prompt_cosine"]
    print(f"{a:<28} {b:<28} {sim['neuron_spearman']:>8.3f} {sim['neuron_topk_jaccard']:>14.3f} {cos:>10.3f}")
