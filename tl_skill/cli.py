"""`tl-skill` command line: argument parsing only; the library does the work."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

from .cli_args import (FRACTION, LABEL_WORDS_HELP, NON_NEGATIVE, POSITIVE, POSITIVE_FLOAT, common_options,
                       correlation_table, emit, finish, format_neurons_table, layer_spec, list_of, load_model_for,
                       parse_layers, subparser, units_spec)
from .cli_views import add_dashboard, add_demo, add_export

COMMANDS: dict[str, Callable] = {}


# --------------------------------------------------------------------------- tune
def _add_tune(sub):
    p = subparser("tune", sub, "prompt-tune a frozen model on a task (SPEC §1)", """
        tl-skill tune --model smollm2-135m --task rotten_tomatoes --out runs/rt/seed0
        tl-skill tune --model tiny-gpt2 --task csv:my.csv --label-words bad,good --out runs/my --steps 50
        tl-skill tune --model smollm2-135m --task rotten_tomatoes --out runs/rt --seeds 0,1,2
    """)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="rotten_tomatoes")
    p.add_argument("--out", required=True, help="run directory (rerun the same command to resume)")
    p.add_argument("--label-words", default=None, help=LABEL_WORDS_HELP)
    p.add_argument("--task-seed", type=NON_NEGATIVE, default=0, help="train/dev/test split seed")
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="prompt initialisation and data order")
    p.add_argument("--seeds", type=list_of(NON_NEGATIVE), default=None,
                   help="several trials: comma-separated seeds, one subdirectory each")
    p.add_argument("--prompt-length", type=POSITIVE, default=16)
    p.add_argument("--steps", type=POSITIVE, default=300)
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=3e-3)
    p.add_argument("--eval-every", type=POSITIVE, default=50)
    p.add_argument("--patience", type=NON_NEGATIVE, default=0,
                   help="evaluations without improvement before stopping (0: never)")
    p.add_argument("--padding-side", choices=["left", "right"], default=None)
    p.add_argument("--max-train-examples", type=POSITIVE, default=None)
    p.add_argument("--max-dev-examples", type=POSITIVE, default=300)
    p.add_argument("--max-test-examples", type=POSITIVE, default=1000)
    p.add_argument("--max-input-tokens", type=POSITIVE, default=96)
    p.add_argument("--json", action="store_true", help="print run.json's metrics as JSON")
    common_options(p)
    p.set_defaults(func=cmd_tune)


def cmd_tune(args):
    from .tasks import load_task
    from .tuning import TuneConfig, claim_run_dir, tune

    task = load_task(args.task, seed=args.task_seed, label_words=args.label_words)
    cfg = dict(prompt_length=args.prompt_length, steps=args.steps, lr=args.lr, eval_every=args.eval_every,
               patience=args.patience, task_seed=args.task_seed, padding_side=args.padding_side,
               max_train_examples=args.max_train_examples, max_dev_examples=args.max_dev_examples,
               max_test_examples=args.max_test_examples, max_input_tokens=args.max_input_tokens)
    if args.batch_size:
        cfg["batch_size"] = args.batch_size
    seeds = args.seeds or [args.seed]
    outs = {s: Path(args.out) / f"seed{s}" if args.seeds else Path(args.out) for s in seeds}
    for s in seeds:  # every directory is checked before the model loads
        claim_run_dir(outs[s], args.model, task, TuneConfig(seed=s, **cfg), write=False)
    model = load_model_for(args, args.model)
    results = {}
    for s in seeds:
        out = outs[s]
        run = tune(model, task, out, TuneConfig(seed=s, **cfg), progress=not args.quiet)
        results[str(out)] = run.metrics
    lines = [f"{out}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in m.items()) for out, m in results.items()]
    emit(results, args.json, "\n".join(lines))


# ------------------------------------------------------------------------ evaluate
def _add_evaluate(sub):
    p = subparser("evaluate", sub, "accuracy of a tuned prompt on a split", """
        tl-skill evaluate runs/rt/seed0 --split test
        tl-skill evaluate runs/rt/seed0 --split dev --json
    """)
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--max-examples", type=POSITIVE, default=None)
    finish(p, cmd_evaluate)


def cmd_evaluate(args):
    from .tasks import subsample
    from .tuning import Run, evaluate, majority_accuracy

    run = Run.load(args.run_dir)
    model = load_model_for(args, run.model_name)
    task = subsample(run.load_task(), {args.split: args.max_examples}, seed=run.info["task_seed"])
    cfg = run.config
    res = evaluate(model, task, args.split, run.verbalizer(model), run.prompt.to(next(model.parameters()).device),
                   batch_size=args.batch_size or cfg.eval_batch_size, max_input_tokens=cfg.max_input_tokens,
                   padding_side=cfg.padding_side, progress=not args.quiet)
    out = {"run": args.run_dir, "split": args.split, "accuracy": res["accuracy"], "n": res["n"],
           "majority_accuracy": majority_accuracy(task, args.split)}
    emit(out, args.json, f"{args.split} accuracy {res['accuracy']:.4f} on {res['n']} examples "
                          f"(majority {out['majority_accuracy']:.4f})")


# ---------------------------------------------------------------------------- find
def _add_find(sub):
    p = subparser("find", sub, "find skill neurons: predictivity of every neuron (SPEC §2-§5)", """
        tl-skill find runs/rt/seed0 --out neurons/rt
        tl-skill find runs/rt/seed0 runs/rt/seed1 --out neurons/rt --top 20 --json
    """)
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
    p.add_argument("--confirm-split", default="auto", choices=["auto", "dev", "test", "none"],
                   help="held-out split counted with the same baselines (auto: test when selecting on dev)")
    p.add_argument("--control", default=None, choices=["shuffled"],
                   help="also count with the evaluation labels shuffled, in the same pass")
    p.add_argument("--control-seed", type=NON_NEGATIVE, default=0)
    p.add_argument("--fdr", type=FRACTION, default=0.05, help="false discovery rate for the significance count")
    p.add_argument("--units", type=units_spec, default="mlp",
                   help="mlp (neurons, default), resid, attn (per-head dims) or sae:PATH (a SAELens directory)")
    finish(p, cmd_find)


def _n_layers(run) -> int | None:
    return (run.info.get("model_spec") or {}).get("n_layers")


def cmd_find(args):
    from .find import load_or_find
    from .tuning import Run

    runs = [Run.load(d) for d in args.run_dirs]
    # the directory is claimed before the model loads: other runs or settings are refused at once
    sn = load_or_find(
        lambda: load_model_for(args, runs[0].model_name), runs, args.out, split=args.split,
        layers=parse_layers(args.layers, _n_layers(runs[0])), positions=args.positions,
        batch_size=args.batch_size or 32, max_train_examples=args.max_train_examples or None,
        max_eval_examples=args.max_eval_examples, multiclass=args.multiclass, aggregate_runs=args.aggregate_runs,
        progress=not args.quiet, confirm_split=None if args.confirm_split == "none" else args.confirm_split,
        control=args.control, control_seed=args.control_seed,
        **({} if args.units == "mlp" else {"units": args.units}))
    emit(sn.summary(args.top), args.json, format_neurons_table(sn, args.top, args.fdr) + f"\nsaved to {args.out}")


# -------------------------------------------------------------------------- ablate
def _add_ablate(sub):
    p = subparser("ablate", sub, "perturb skill neurons vs random neurons and measure accuracy (SPEC §6)", """
        tl-skill ablate runs/rt/seed0 --neurons neurons/rt --out ablation/rt
        tl-skill ablate runs/rt/seed0 --neurons neurons/rt --out ablation/rt-zero --mode zero --fractions 0.01,0.1
        tl-skill ablate runs/rt/seed0 --neurons neurons/rt --out ablation/rt-rel --relative --std 1.0
    """)
    p.add_argument("run_dir")
    p.add_argument("--neurons", required=True, help="directory written by `tl-skill find`")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="noise", choices=["noise", "zero", "mean"])
    p.add_argument("--fractions", type=list_of(FRACTION), default=[0.01, 0.02, 0.05, 0.1, 0.2],
                   help="comma-separated, per layer, each in (0, 1] (default: 0.01,0.02,0.05,0.1,0.2)")
    p.add_argument("--seeds", type=POSITIVE, default=3, help="random-neuron control seeds")
    p.add_argument("--std", type=POSITIVE_FLOAT, default=0.1,
                   help="noise std (absolute, or x neuron std with --relative)")
    p.add_argument("--relative", action="store_true", help="noise std relative to each neuron's std")
    p.add_argument("--layers", type=layer_spec, default=None, help="perturb only these layers, e.g. 10-29")
    p.add_argument("--max-examples", type=NON_NEGATIVE, default=300,
                   help="test examples (0: the run's whole test set)")
    p.add_argument("--units", type=units_spec, default=None,
                   help="units to perturb (default: those the neurons were found on; sae:NEWPATH if the SAE moved)")
    finish(p, cmd_ablate)


def _run_neurons_model(args):
    """What `ablate` and `prune` start from: the run, its skill neurons, a model loader, and the
    options they share (layers, batch size, progress)."""
    from .neurons import SkillNeurons
    from .tuning import Run

    run = Run.load(args.run_dir)
    shared = dict(layers=parse_layers(args.layers, _n_layers(run)), batch_size=args.batch_size or 32,
                  progress=not args.quiet, max_examples=args.max_examples or None)
    return run, SkillNeurons.load(args.neurons), (lambda: load_model_for(args, run.model_name)), shared


def cmd_ablate(args):
    from .experiments.ablation import ablation_experiment

    run, sn, loader, shared = _run_neurons_model(args)
    res = ablation_experiment(loader, run, sn, args.out, mode=args.mode, fractions=args.fractions, seeds=args.seeds,
                              std=args.std, relative=args.relative, units=args.units, **shared)

    lines = [f"{'fraction':>8} {'clean':>7} {'skill':>7} {'random':>15} {'skill-random [95% CI]':>26} "
             f"{'McNemar p':>12}"]
    for r in res["rows"]:
        pr = r["paired"]
        lines.append(f"{r['fraction']:>8.0%} {r['clean_accuracy']:>7.3f} {r['skill_accuracy']:>7.3f} "
                     f"{r['random_accuracy']:>7.3f} ± {r['random_accuracy_std']:.3f} "
                     f"{pr['difference']:>+8.3f} [{pr['ci_low']:+.3f}, {pr['ci_high']:+.3f}] "
                     f"{'/'.join(f'{p:.2g}' for p in pr['mcnemar_p']):>12}")
    lines.append(res.verdict().sentence)
    emit(res.to_dict(), args.json, "\n".join(lines) + f"\nsaved to {args.out}")


# --------------------------------------------------------------------------- prune
def _add_prune(sub):
    p = subparser("prune", sub, "prune a model to its skill neurons and measure size, speed, accuracy (SPEC §7)", """
        tl-skill prune runs/rt/seed0 --neurons neurons/rt --out pruned/rt
        tl-skill prune runs/rt/seed0 --neurons neurons/rt --out pruned/rt --keep 0.05 --layers 8-29 --retune-steps 100
    """)
    p.add_argument("run_dir")
    p.add_argument("--neurons", required=True, help="directory written by `tl-skill find`")
    p.add_argument("--out", required=True)
    p.add_argument("--keep", type=FRACTION, default=0.02, help="fraction of neurons kept in each pruned layer")
    p.add_argument("--layers", type=layer_spec, default=None, help="layers to prune (default: the top 75%%)")
    p.add_argument("--retune-steps", type=NON_NEGATIVE, default=0, help="re-tune the prompt on the pruned model")
    p.add_argument("--max-examples", type=NON_NEGATIVE, default=None,
                   help="test examples (default, or 0: the run's test set)")
    p.add_argument("--timing-repeats", type=POSITIVE, default=5)
    finish(p, cmd_prune)


def cmd_prune(args):
    from .experiments.pruning import prune_experiment

    run, sn, loader, shared = _run_neurons_model(args)
    res = prune_experiment(loader, run, sn, args.out, keep=args.keep, retune_steps=args.retune_steps,
                           timing_repeats=args.timing_repeats, **shared)
    text = (f"parameters {res['params_before']:,} -> {res['params_after']:,} "
            f"({res['params_after'] / res['params_before']:.1%}); speedup {res['speedup']:.2f}x\n"
            f"accuracy {res['accuracy_before']:.4f} -> {res['accuracy_after']:.4f}"
            + (f" (re-tuned {res['accuracy_retuned']:.4f})" if res.get("accuracy_retuned") is not None else "")
            + f"\nsaved to {args.out}")
    emit(res.to_dict(), args.json, text)


# ------------------------------------------------------------------ transfer, study
def _add_transfer(sub):
    p = subparser("transfer", sub, "task similarity and prompt transferability from skill neurons (SPEC §8)", """
        tl-skill transfer neurons/rt neurons/ws neurons/bbc --out transfer/
        tl-skill transfer neurons/rt neurons/ws --runs runs/rt/seed0 runs/ws/seed0 --out transfer/ --transfer-steps 0
    """)
    p.add_argument("neurons_dirs", nargs="+", help="one `tl-skill find` directory per task")
    p.add_argument("--runs", nargs="*", default=None, help="run directories (default: those each neurons dir used)")
    p.add_argument("--out", required=True)
    p.add_argument("--transfer-steps", type=NON_NEGATIVE, default=10,
                   help="K steps of tuning from the source prompt (0: skip)")
    p.add_argument("--init-trials", type=POSITIVE, default=1)
    p.add_argument("--top-fraction", type=FRACTION, default=0.02,
                   help="per-layer top fraction for the overlap indicator")
    p.add_argument("--max-eval-examples", type=POSITIVE, default=300)
    p.add_argument("--units", type=units_spec, default=None,
                   help="units of the activation indicators (default: those the neurons were found on)")
    p.add_argument("--no-figures", action="store_true")
    finish(p, cmd_transfer)


def cmd_transfer(args):
    from .experiments.transfer import transfer_from_dirs

    res = transfer_from_dirs(None, args.neurons_dirs, args.runs or None, args.out, device=args.device,
                             dtype=args.dtype, transfer_steps=args.transfer_steps, init_trials=args.init_trials,
                             top_fraction=args.top_fraction, max_eval_examples=args.max_eval_examples,
                             batch_size=args.batch_size, figures=not args.no_figures, progress=not args.quiet,
                             units=args.units)
    emit(res.to_dict(), args.json, correlation_table(res) + f"\nsaved to {args.out}")


def _add_study(sub):
    p = subparser("study", sub, "multi-task study: tune, find, transfer, indicators (SPEC §8-§9)", """
        tl-skill study --tasks rotten_tomatoes,word_sentiment,subjectivity,bbc_news:sport-vs-business,bbc_news:tech-vs-politics --out study/
        tl-skill study --model tiny-gpt2 --tasks rotten_tomatoes,word_sentiment --seeds 2 --steps 20 --out tiny_study/
    """)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument("--seeds", type=POSITIVE, default=1, help="prompts (trials) per task")
    p.add_argument("--out", required=True)
    p.add_argument("--prompt-length", type=POSITIVE, default=8)
    p.add_argument("--steps", type=POSITIVE, default=100)
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=3e-3)
    p.add_argument("--max-dev-examples", type=POSITIVE, default=200)
    p.add_argument("--max-test-examples", type=POSITIVE, default=300)
    p.add_argument("--find-train-examples", type=POSITIVE, default=500)
    p.add_argument("--find-eval-examples", type=POSITIVE, default=300)
    p.add_argument("--transfer-steps", type=NON_NEGATIVE, default=10,
                   help="K steps of tuning from the source prompt (0: skip)")
    p.add_argument("--max-eval-examples", type=POSITIVE, default=200, help="test examples per transfer evaluation")
    p.add_argument("--units", type=units_spec, default="mlp",
                   help="units to find and compare: mlp (default), resid, attn or sae:PATH")
    finish(p, cmd_study)


def cmd_study(args):
    from .experiments.transfer import study
    from .tuning import TuneConfig

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    cfg = TuneConfig(prompt_length=args.prompt_length, steps=args.steps, lr=args.lr,
                     eval_every=max(1, args.steps // 2), max_dev_examples=args.max_dev_examples,
                     max_test_examples=args.max_test_examples,
                     **({"batch_size": args.batch_size} if args.batch_size else {}))
    res = study(args.model, tasks, args.out, seeds=tuple(range(args.seeds)), tune_config=cfg,
                find_kwargs={"max_train_examples": args.find_train_examples,
                             "max_eval_examples": args.find_eval_examples,
                             **({} if args.units == "mlp" else {"units": args.units})},
                transfer_steps=args.transfer_steps, progress=not args.quiet, device=args.device, dtype=args.dtype,
                max_eval_examples=args.max_eval_examples)
    emit(res.to_dict(), args.json, correlation_table(res) + f"\nsaved to {args.out}")


# -------------------------------------------------------------------------- origin
def _add_origin(sub):
    p = subparser("origin", sub, "where skill neurons come from: random weights, LoRA, BitFit, label words (SPEC §9)", """
        tl-skill origin --model smollm2-135m --task rotten_tomatoes --out origin/rt --run runs/rt/seed0 --neurons neurons/rt
        tl-skill origin --model tiny-gpt2 --task rotten_tomatoes --out origin/tiny --steps 20 --parts lora,bitfit
    """)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="rotten_tomatoes")
    p.add_argument("--out", required=True)
    p.add_argument("--run", default=None, help="reuse this prompt-tuning run (else one is tuned)")
    p.add_argument("--neurons", default=None, help="reuse these skill neurons (else they are found)")
    p.add_argument("--parts", default="random_weights,lora,bitfit,label_words")
    p.add_argument("--steps", type=POSITIVE, default=200, help="training steps of LoRA and BitFit")
    p.add_argument("--prompt-steps", type=NON_NEGATIVE, default=150,
                   help="tuning steps of the random-weights and label-word prompts (0: the source run's)")
    p.add_argument("--lora-lr", type=POSITIVE_FLOAT, default=1e-3)
    p.add_argument("--bitfit-lr", type=POSITIVE_FLOAT, default=1e-3)
    p.add_argument("--lora-rank", type=POSITIVE, default=8)
    p.add_argument("--fractions", type=list_of(FRACTION), default=[0.01, 0.05, 0.1, 0.2],
                   help="comma-separated, per layer, each in (0, 1] (default: 0.01,0.05,0.1,0.2)")
    p.add_argument("--seeds", type=POSITIVE, default=2)
    p.add_argument("--mode", default="noise", choices=["noise", "zero", "mean"])
    p.add_argument("--std", type=POSITIVE_FLOAT, default=0.1)
    p.add_argument("--relative", action="store_true")
    p.add_argument("--alt-label-words", default=None, help="e.g. bad,good")
    p.add_argument("--max-test-examples", type=NON_NEGATIVE, default=300,
                   help="test examples per evaluation (perturbation, extra prompts); 0: the run's cap")
    p.add_argument("--find-train-examples", type=POSITIVE, default=2000)
    p.add_argument("--find-eval-examples", type=POSITIVE, default=None)
    finish(p, cmd_origin)


def cmd_origin(args):
    from .experiments.origin import origin_study

    res = origin_study(
        args.model, args.task, args.out, run_dir=args.run, neurons_dir=args.neurons,
        parts=tuple(x.strip() for x in args.parts.split(",") if x.strip()), steps=args.steps,
        lora_lr=args.lora_lr, bitfit_lr=args.bitfit_lr, lora_rank=args.lora_rank,
        fractions=tuple(args.fractions), seeds=args.seeds, mode=args.mode,
        std=args.std, relative=args.relative,
        alt_label_words=args.alt_label_words.split(",") if args.alt_label_words else None,
        max_test_examples=args.max_test_examples or None, prompt_steps=args.prompt_steps or None,
        find_train_examples=args.find_train_examples,
        find_eval_examples=args.find_eval_examples, batch_size=args.batch_size or 32,
        device=args.device, dtype=args.dtype, progress=not args.quiet)
    lines = [f"{part:<15} {'holds' if sec.get('claim_holds') else 'does not hold'}: {sec.get('statement')}"
             for part, sec in res.parts().items() if "statement" in sec]
    emit(res.to_dict(), args.json, "\n".join(lines) + f"\nsaved to {args.out}")


# ---------------------------------------------------------------------------- main
ADDERS = [add_demo, _add_tune, _add_evaluate, _add_find, _add_ablate, _add_prune, _add_transfer, _add_study, _add_origin,
          add_dashboard, add_export]  # demo, dashboard and export: cli_views


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tl-skill",
        description="Skill neurons (Wang et al., EMNLP 2022) in TransformerLens models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in ADDERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .distributed import DistributedError, init_distributed

    try:  # under torchrun: join the process group; each process gets its own device
        group = init_distributed(getattr(args, "device", None))
    except DistributedError as exc:
        print(f"tl-skill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if group.enabled:
        args.device = group.device
        if not group.is_main:
            args.quiet = True  # progress bars and info logs from rank 0 only
    level = logging.DEBUG if args.verbose else (logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "transformer_lens", "datasets", "root"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from .perturb import PerturbationError
    from .models import ModelLoadError
    from .neurons import NeuronsError
    from .prompt import VerbalizerError
    from .prune import PruneError
    from .record import RecordingError
    from .tasks import TaskError
    from .tuning import RunError

    from .prefix import use_prefix_cache

    try:
        with use_prefix_cache(not getattr(args, "no_prefix_cache", False)):
            args.func(args)
    except (PerturbationError, PruneError, ModelLoadError, TaskError, VerbalizerError, RunError, NeuronsError, RecordingError,
            ValueError, OSError) as exc:
        print(f"tl-skill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tl-skill {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
