"""Attribution (forward + backward, reduced in the hooks) against one recording pass over the same examples.

    python benchmarks/bench_attribution.py                      # SmolLM2-135M, 128 test examples
    python benchmarks/bench_attribution.py --model tiny-llama   # seconds

One recording pass is what `find` does per split: `MomentStats` of every MLP neuron at the prompt positions
(`Recorder`, the prefix cache where the model has one). Attribution runs the full rows forward and back and
reduces `(baseline - a) * grad` at every position. Both use the same prompt, examples and batch size, in one
process, alternately, `--repeats` times; the ratio of the medians is written to `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tl_skill import load_model, load_task
from tl_skill.attribution import attribute
from tl_skill.data.tasks import subsample
from tl_skill.files import atomic_text
from tl_skill.find import find_skill_neurons
from tl_skill.record import MomentStats, Recorder
from tl_skill.tuning import TuneConfig, layout_for, tune
from tl_skill.tuning.prompt import iterate_batches


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--examples", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--prompt-length", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_attribution.json"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = load_model(args.model, device="cpu")
    n = args.examples
    task = subsample(load_task("rotten_tomatoes"), {"train": n, "dev": 16, "test": n})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TuneConfig(prompt_length=args.prompt_length, steps=1, eval_every=1, batch_size=4)
        run = tune(model, task, Path(tmp) / "run", cfg, progress=False, evaluate_test=False)
        sn = find_skill_neurons(model, [run], max_train_examples=16, max_eval_examples=16, progress=False)
        layout = layout_for(model, args.prompt_length, cfg.max_input_tokens)

        def record() -> None:
            stats = MomentStats(2, int(model.cfg.n_layers), args.prompt_length, sn.d_mlp)
            rec = Recorder(model, stats, positions="prompt")
            with rec.attached():
                for _, batch in iterate_batches(layout, task, "test", args.batch_size):
                    rec.run(batch, run.prompt)

        def attrib() -> None:
            attribute(model, run, sn, "test", batch_size=args.batch_size, task=task, progress=False)

        times: dict[str, list[float]] = {"record": [], "attribute": []}
        for _ in range(args.repeats):
            for name, fn in (("record", record), ("attribute", attrib)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "model": args.model,
        "examples": n,
        "batch_size": args.batch_size,
        "prompt_length": args.prompt_length,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "seconds": times,
        "median_seconds": med,
        "ratio_attribute_to_record": med["attribute"] / med["record"],
        "command": "python benchmarks/bench_attribution.py " + " ".join(argv or sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_text(args.out, json.dumps(out, indent=2) + "\n")
    print(
        f"record {med['record']:.2f}s, attribute {med['attribute']:.2f}s: ratio {out['ratio_attribute_to_record']:.2f}"
    )
    return out


if __name__ == "__main__":
    main()
