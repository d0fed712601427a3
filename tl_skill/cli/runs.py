"""`tl-skill tune`, `evaluate` and `find`: the method's first steps (argument parsing only)."""

from __future__ import annotations

from pathlib import Path

from tl_skill.cli.options import (
    FRACTION,
    LABEL_WORDS_HELP,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_FLOAT,
    SEED,
    common_options,
    emit,
    finish,
    layer_spec,
    list_of,
    load_model_for,
    parse_layers,
    run_layers,
    subparser,
    units_spec,
)
from tl_skill.cli.tables import format_neurons_table
from tl_skill.data.sources import load_task
from tl_skill.data.tasks import subsample
from tl_skill.errors import TLSkillError
from tl_skill.find import load_or_find
from tl_skill.tuning.runs import Run, TuneConfig, claim_run_dir, evaluate, majority_accuracy, tune


# --------------------------------------------------------------------------- tune
def add_tune(sub) -> None:
    p = subparser(
        "tune",
        sub,
        "prompt-tune a frozen model on a task (method §1)",
        """
        tl-skill tune --model smollm2-135m --task rotten_tomatoes --out runs/rt/seed0
        tl-skill tune --model smollm2-135m --task rotten_tomatoes --out runs/rt --seeds 0,1,2   # trials
        tl-skill tune --model smollm2-135m --task word_sentiment --out runs/ws/seed0 --steps 100
        tl-skill tune --model smollm2-135m --task csv:my.csv --label-words bad,good --out runs/my --steps 50
    """,
    )
    p.add_argument("--model", required=True, help="smollm2-135m, gemma3-270m, tiny-*, a model directory or a hub id")
    p.add_argument("--task", default="rotten_tomatoes")
    p.add_argument("--out", required=True, help="run directory (rerun the same command to resume)")
    p.add_argument("--label-words", default=None, help=LABEL_WORDS_HELP)
    p.add_argument("--task-seed", type=SEED, default=0, help="train/dev/test split seed")
    p.add_argument("--seed", type=SEED, default=None, help="prompt initialisation and data order (default 0)")
    p.add_argument(
        "--seeds",
        type=list_of(SEED),
        default=None,
        help="several trials: comma-separated seeds, one subdirectory each",
    )
    p.add_argument("--prompt-length", type=POSITIVE, default=16)
    p.add_argument("--steps", type=POSITIVE, default=300)
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=3e-3)
    p.add_argument("--eval-every", type=POSITIVE, default=50)
    p.add_argument(
        "--patience", type=NON_NEGATIVE, default=0, help="evaluations without improvement before stopping (0: never)"
    )
    p.add_argument("--padding-side", choices=["left", "right"], default=None)
    p.add_argument("--max-train-examples", type=POSITIVE, default=None)
    p.add_argument("--max-dev-examples", type=POSITIVE, default=300)
    p.add_argument("--max-test-examples", type=POSITIVE, default=1000)
    p.add_argument("--max-input-tokens", type=POSITIVE, default=96)
    p.add_argument("--json", action="store_true", help="print run.json's metrics as JSON")
    common_options(p)
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> None:
    task = load_task(args.task, seed=args.task_seed, label_words=args.label_words)
    cfg = dict(
        prompt_length=args.prompt_length,
        steps=args.steps,
        lr=args.lr,
        eval_every=args.eval_every,
        patience=args.patience,
        task_seed=args.task_seed,
        padding_side=args.padding_side,
        max_train_examples=args.max_train_examples,
        max_dev_examples=args.max_dev_examples,
        max_test_examples=args.max_test_examples,
        max_input_tokens=args.max_input_tokens,
    )
    if args.batch_size:
        cfg["batch_size"] = args.batch_size
    if args.seeds and args.seed is not None:
        raise TLSkillError("give --seed (one run) or --seeds (several trials), not both")
    seeds = args.seeds or [args.seed or 0]
    outs = {s: Path(args.out) / f"seed{s}" if args.seeds else Path(args.out) for s in seeds}
    for s in seeds:  # every directory is checked before the model loads
        claim_run_dir(outs[s], args.model, task, TuneConfig(seed=s, **cfg), write=False)
    model = load_model_for(args, args.model)
    results = {}
    for s in seeds:
        out = outs[s]
        run = tune(model, task, out, TuneConfig(seed=s, **cfg), progress=not args.quiet)
        results[str(out)] = run.metrics
    lines = [
        f"{out}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
        for out, m in results.items()
    ]
    emit(results, args.json, "\n".join(lines))


# ------------------------------------------------------------------------ evaluate
def add_evaluate(sub) -> None:
    p = subparser(
        "evaluate",
        sub,
        "accuracy of a tuned prompt on a split",
        """
        tl-skill evaluate runs/rt/seed0 --split test
        tl-skill evaluate runs/rt/seed0 --split dev --json
    """,
    )
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--max-examples", type=POSITIVE, default=None)
    finish(p, cmd_evaluate)


def cmd_evaluate(args) -> None:
    run = Run.load(args.run_dir)
    model = load_model_for(args, run.model_name, run)
    task = subsample(run.load_task(), {args.split: args.max_examples}, seed=run.info["task_seed"])
    cfg = run.config
    res = evaluate(
        model,
        task,
        args.split,
        run.verbalizer(model),
        run.prompt.to(next(model.parameters()).device),
        batch_size=args.batch_size or cfg.eval_batch_size,
        max_input_tokens=cfg.max_input_tokens,
        padding_side=cfg.padding_side,
        progress=not args.quiet,
    )
    out = {
        "run": args.run_dir,
        "split": args.split,
        "accuracy": res["accuracy"],
        "n": res["n"],
        "majority_accuracy": majority_accuracy(task, args.split),
    }
    emit(
        out,
        args.json,
        f"{args.split} accuracy {res['accuracy']:.4f} on {res['n']} examples (majority {out['majority_accuracy']:.4f})",
    )


# ---------------------------------------------------------------------------- find
def add_find(sub) -> None:
    p = subparser(
        "find",
        sub,
        "find skill neurons: predictivity of every neuron (method §2-§5)",
        """
        tl-skill find runs/rt/seed0 --out neurons/rt
        tl-skill find runs/rt/seed0 runs/rt/seed1 runs/rt/seed2 --out neurons/rt3 --top 20 --json   # trials
        tl-skill find runs/ws/seed0 --out neurons/ws
    """,
    )
    p.add_argument("run_dirs", nargs="+", help="one or more runs (trials) of the same model and task")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="dev", choices=["dev", "test"])
    p.add_argument("--top", type=POSITIVE, default=20)
    p.add_argument("--positions", default="prompt", choices=["prompt", "last", "mean"])
    p.add_argument("--layers", type=layer_spec, default=None, help="e.g. 0-11 or 3,5,7 (default: all)")
    p.add_argument("--max-train-examples", type=NON_NEGATIVE, default=2000, help="examples for the baseline (0: all)")
    p.add_argument("--max-eval-examples", type=POSITIVE, default=None)
    p.add_argument("--multiclass", default="ovr", choices=["ovr", "pairwise"])
    p.add_argument("--aggregate-runs", default="mean", choices=["mean", "min"])
    p.add_argument(
        "--aggregate-subtasks",
        default="max",
        choices=["max", "mean"],
        help="a multi-class task's score of a neuron from its binary subtasks' predictivities (default: max)",
    )
    p.add_argument(
        "--confirm-split",
        default="auto",
        choices=["auto", "dev", "test", "none"],
        help="held-out split counted with the same baselines (auto: test when selecting on dev)",
    )
    p.add_argument(
        "--control",
        default=None,
        choices=["shuffled"],
        help="also count with the evaluation labels shuffled, in the same pass",
    )
    p.add_argument("--control-seed", type=SEED, default=0)
    p.add_argument("--fdr", type=FRACTION, default=0.05, help="false discovery rate for the significance count")
    p.add_argument(
        "--units",
        type=units_spec,
        default="mlp",
        help="mlp (neurons, default), resid, attn (per-head dims) or sae:PATH (a SAELens directory)",
    )
    finish(p, cmd_find)


def cmd_find(args) -> None:
    runs = [Run.load(d) for d in args.run_dirs]
    # the directory is claimed before the model loads: other runs or settings are refused at once
    sn = load_or_find(
        lambda: load_model_for(args, runs[0].model_name, runs[0]),
        runs,
        args.out,
        split=args.split,
        layers=parse_layers(args.layers, run_layers(runs[0])),
        positions=args.positions,
        batch_size=args.batch_size or 32,
        max_train_examples=args.max_train_examples or None,
        max_eval_examples=args.max_eval_examples,
        multiclass=args.multiclass,
        aggregate_runs=args.aggregate_runs,
        aggregate_subtasks=args.aggregate_subtasks,
        progress=not args.quiet,
        confirm_split=None if args.confirm_split == "none" else args.confirm_split,
        control=args.control,
        control_seed=args.control_seed,
        **({} if args.units == "mlp" else {"units": args.units}),
    )
    emit(sn.summary(args.top), args.json, format_neurons_table(sn, args.top, args.fdr) + f"\nsaved to {args.out}")
