"""`tl-skill` command line: argument parsing only; the library does the work."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Callable, Sequence

from .cli_args import (FRACTION, LABEL_WORDS_HELP, NON_NEGATIVE, POSITIVE, POSITIVE_FLOAT,
                       correlation_table, device_spec, format_neurons_table, layer_spec, list_of, parse_layers)

COMMANDS: dict[str, Callable] = {}


def _common(p: argparse.ArgumentParser, model: bool = True) -> None:
    g = p.add_argument_group("device and precision (the same for every command)")
    g.add_argument("--device", default=None, type=device_spec,
                   help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (statistics stay float64/int64 whatever this is)")
    g.add_argument("--batch-size", type=POSITIVE, default=None, help="examples per forward pass")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")


def _parser(name: str, sub, help: str, examples: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help,
                       epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    return p


def _emit(obj, as_json: bool, text: str) -> None:
    from .distributed import is_main

    if not is_main():  # under torchrun only rank 0 prints
        return
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(text)


def _load(args, name: str):
    from .models import load_model

    return load_model(name, device=args.device, dtype=args.dtype)


# --------------------------------------------------------------------------- tune
def _add_tune(sub):
    p = _parser("tune", sub, "prompt-tune a frozen model on a task (SPEC §1)", """
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
    _common(p)
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
    model = _load(args, args.model)
    results = {}
    for s in seeds:
        out = outs[s]
        run = tune(model, task, out, TuneConfig(seed=s, **cfg), progress=not args.quiet)
        results[str(out)] = run.metrics
    lines = [f"{out}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in m.items()) for out, m in results.items()]
    _emit(results, args.json, "\n".join(lines))


# ------------------------------------------------------------------------ evaluate
def _add_evaluate(sub):
    p = _parser("evaluate", sub, "accuracy of a tuned prompt on a split", """
        tl-skill evaluate runs/rt/seed0 --split test
        tl-skill evaluate runs/rt/seed0 --split dev --json
    """)
    p.add_argument("run_dir")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"])
    p.add_argument("--max-examples", type=POSITIVE, default=None)
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args):
    from .tasks import subsample
    from .tuning import Run, evaluate, majority_accuracy

    run = Run.load(args.run_dir)
    model = _load(args, run.model_name)
    task = subsample(run.load_task(), {args.split: args.max_examples}, seed=run.info["task_seed"])
    cfg = run.config
    res = evaluate(model, task, args.split, run.verbalizer(model), run.prompt.to(next(model.parameters()).device),
                   batch_size=args.batch_size or cfg.eval_batch_size, max_input_tokens=cfg.max_input_tokens,
                   padding_side=cfg.padding_side, progress=not args.quiet)
    out = {"run": args.run_dir, "split": args.split, "accuracy": res["accuracy"], "n": res["n"],
           "majority_accuracy": majority_accuracy(task, args.split)}
    _emit(out, args.json, f"{args.split} accuracy {res['accuracy']:.4f} on {res['n']} examples "
                          f"(majority {out['majority_accuracy']:.4f})")


# ---------------------------------------------------------------------------- find
def _add_find(sub):
    p = _parser("find", sub, "find skill neurons: predictivity of every neuron (SPEC §2-§5)", """
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
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_find)


def _n_layers(run) -> int | None:
    return (run.info.get("model_spec") or {}).get("n_layers")


def cmd_find(args):
    from .find import load_or_find
    from .tuning import Run

    runs = [Run.load(d) for d in args.run_dirs]
    # the directory is claimed before the model loads: other runs or settings are refused at once
    sn = load_or_find(
        lambda: _load(args, runs[0].model_name), runs, args.out, split=args.split,
        layers=parse_layers(args.layers, _n_layers(runs[0])), positions=args.positions,
        batch_size=args.batch_size or 32, max_train_examples=args.max_train_examples or None,
        max_eval_examples=args.max_eval_examples, multiclass=args.multiclass, aggregate_runs=args.aggregate_runs,
        progress=not args.quiet, confirm_split=None if args.confirm_split == "none" else args.confirm_split,
        control=args.control, control_seed=args.control_seed)
    _emit(sn.summary(args.top), args.json, format_neurons_table(sn, args.top, args.fdr) + f"\nsaved to {args.out}")


# -------------------------------------------------------------------------- ablate
def _add_ablate(sub):
    p = _parser("ablate", sub, "perturb skill neurons vs random neurons and measure accuracy (SPEC §6)", """
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
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_ablate)


def cmd_ablate(args):
    from .experiments.ablation import ablation_experiment
    from .neurons import SkillNeurons
    from .tuning import Run

    run = Run.load(args.run_dir)
    sn = SkillNeurons.load(args.neurons)
    res = ablation_experiment(
        lambda: _load(args, run.model_name), run, sn, args.out, mode=args.mode, fractions=args.fractions,
        seeds=args.seeds, std=args.std, relative=args.relative, layers=parse_layers(args.layers, _n_layers(run)),
        max_examples=args.max_examples or None, batch_size=args.batch_size or 32, progress=not args.quiet)

    lines = [f"{'fraction':>8} {'clean':>7} {'skill':>7} {'random':>15} {'skill-random [95% CI]':>26} "
             f"{'McNemar p':>12}"]
    for r in res["rows"]:
        pr = r["paired"]
        lines.append(f"{r['fraction']:>8.0%} {r['clean_accuracy']:>7.3f} {r['skill_accuracy']:>7.3f} "
                     f"{r['random_accuracy']:>7.3f} ± {r['random_accuracy_std']:.3f} "
                     f"{pr['difference']:>+8.3f} [{pr['ci_low']:+.3f}, {pr['ci_high']:+.3f}] "
                     f"{'/'.join(f'{p:.2g}' for p in pr['mcnemar_p']):>12}")
    lines.append(res.verdict().sentence)
    _emit(res.to_dict(), args.json, "\n".join(lines) + f"\nsaved to {args.out}")


# --------------------------------------------------------------------------- prune
def _add_prune(sub):
    p = _parser("prune", sub, "prune a model to its skill neurons and measure size, speed, accuracy (SPEC §7)", """
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
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_prune)


def cmd_prune(args):
    from .experiments.pruning import prune_experiment
    from .neurons import SkillNeurons
    from .tuning import Run

    run = Run.load(args.run_dir)
    sn = SkillNeurons.load(args.neurons)
    res = prune_experiment(lambda: _load(args, run.model_name), run, sn, args.out, keep=args.keep,
                           layers=parse_layers(args.layers, _n_layers(run)),
                           retune_steps=args.retune_steps, max_examples=args.max_examples or None,
                           batch_size=args.batch_size or 32, progress=not args.quiet,
                           timing_repeats=args.timing_repeats)
    text = (f"parameters {res['params_before']:,} -> {res['params_after']:,} "
            f"({res['params_after'] / res['params_before']:.1%}); speedup {res['speedup']:.2f}x\n"
            f"accuracy {res['accuracy_before']:.4f} -> {res['accuracy_after']:.4f}"
            + (f" (re-tuned {res['accuracy_retuned']:.4f})" if res.get("accuracy_retuned") is not None else "")
            + f"\nsaved to {args.out}")
    _emit(res.to_dict(), args.json, text)


# ------------------------------------------------------------------ transfer, study
def _add_transfer(sub):
    p = _parser("transfer", sub, "task similarity and prompt transferability from skill neurons (SPEC §8)", """
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
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_transfer)


def cmd_transfer(args):
    from .experiments.transfer import transfer_from_dirs

    res = transfer_from_dirs(None, args.neurons_dirs, args.runs or None, args.out, device=args.device,
                             dtype=args.dtype, transfer_steps=args.transfer_steps, init_trials=args.init_trials,
                             top_fraction=args.top_fraction, max_eval_examples=args.max_eval_examples,
                             batch_size=args.batch_size, figures=not args.no_figures, progress=not args.quiet)
    _emit(res.to_dict(), args.json, correlation_table(res) + f"\nsaved to {args.out}")


def _add_study(sub):
    p = _parser("study", sub, "multi-task study: tune, find, transfer, indicators (SPEC §8-§9)", """
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
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_study)


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
                             "max_eval_examples": args.find_eval_examples},
                transfer_steps=args.transfer_steps, progress=not args.quiet, device=args.device, dtype=args.dtype,
                max_eval_examples=args.max_eval_examples)
    _emit(res.to_dict(), args.json, correlation_table(res) + f"\nsaved to {args.out}")


# -------------------------------------------------------------------------- origin
def _add_origin(sub):
    p = _parser("origin", sub, "where skill neurons come from: random weights, LoRA, BitFit, label words (SPEC §9)", """
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
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_origin)


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
    _emit(res.to_dict(), args.json, "\n".join(lines) + f"\nsaved to {args.out}")


# ----------------------------------------------------------------------- dashboards
def _add_dashboard(sub):
    p = _parser("dashboard", sub, "one static HTML page per top skill neuron, and an index", """
        tl-skill dashboard neurons/rt --run runs/rt/seed0 --out dashboard/rt
        tl-skill dashboard neurons/rt --run runs/rt/seed0 --out dashboard/rt --top 40 --ablation ablation/rt
    """)
    _dashboard_options(p)
    p.add_argument("--ablation", default=None, help="an ablation directory of the same run: its group effect")
    p.set_defaults(func=cmd_dashboard)


def _dashboard_options(p) -> None:
    p.add_argument("neurons_dir", help="directory written by `tl-skill find`")
    p.add_argument("--run", required=True, help="the run whose prompt and test examples are used")
    p.add_argument("--out", required=True)
    p.add_argument("--top", type=POSITIVE, default=20, help="neurons, best predictivity first")
    p.add_argument("--max-examples", type=NON_NEGATIVE, default=200, help="test examples (0: the run's test set)")
    p.add_argument("--examples", type=POSITIVE, default=10, help="top and bottom examples shown per neuron")
    p.add_argument("--ablation-mode", default="mean", choices=["mean", "zero"],
                   help="how the single-neuron ablation removes the neuron")
    _common(p)


def _dashboard(args, out):
    from .experiments.dashboard import dashboard_data
    from .neurons import SkillNeurons
    from .tuning import Run

    run = Run.load(args.run)
    return dashboard_data(lambda: _load(args, run.model_name), run, SkillNeurons.load(args.neurons_dir), out,
                          top=args.top, max_examples=args.max_examples or None, n_examples=args.examples,
                          ablation_mode=args.ablation_mode, ablation=getattr(args, "ablation", None),
                          batch_size=args.batch_size or 32, progress=not args.quiet)


def cmd_dashboard(args):
    from .dashboard_html import write_dashboard

    res = _dashboard(args, args.out)
    index = write_dashboard(res, args.out)
    lines = [f"{'neuron':>10} {'predictivity':>12} {'held-out':>9} {'alone':>7}"]
    lines += [f"{'L%d.%d' % (r['layer'], r['neuron']):>10} {r['predictivity']:>12.4f} "
              f"{(r['heldout_predictivity'] if r['heldout_predictivity'] is not None else float('nan')):>9.4f} "
              f"{r['ablation_delta']:>+7.3f}" for r in res.neurons]
    _emit({"index": str(index), "neurons": len(res.neurons)}, False, "\n".join(lines) + f"\nopen {index}")


def _add_export(sub):
    p = _parser("export", sub, "export skill neurons for other tools (neuronpedia: its export layout)", """
        tl-skill export neuronpedia neurons/rt --run runs/rt/seed0 --out np_export/
    """)
    p.add_argument("format", choices=["neuronpedia"])
    _dashboard_options(p)
    p.add_argument("--model-id", default=None, help="Neuronpedia's id of the model (default: tl_skill's name)")
    p.add_argument("--source-set", default="tlskill-mlp", help="Neuronpedia source set name (layer is prepended)")
    p.set_defaults(func=cmd_export)


def cmd_export(args):
    from .neuronpedia import claim_export_dir, export_neuronpedia
    from .tuning import Run

    claim_export_dir(args.out, args.model_id or Run.load(args.run).model_name, args.source_set)
    res = _dashboard(args, Path(args.out) / "dashboard")  # the data, saved (and resumable) beside the export
    files = export_neuronpedia(res, args.out, model_id=args.model_id, source_set=args.source_set)
    _emit({"files": [str(f) for f in files]}, False, "\n".join(str(f) for f in files))


# ---------------------------------------------------------------------------- demo
def _add_demo(sub):
    p = _parser("demo", sub, "the whole pipeline on one task, ending in report.html / report.md", """
        tl-skill demo                       # SmolLM2-135M on rotten_tomatoes, ~12 min on 2 CPU cores
        tl-skill demo --quick --out quick   # ~3 min, small subsets
        tl-skill demo --model tiny-gpt2 --task bbc_news:sport-vs-business --out tiny
    """)
    p.add_argument("--out", default="tl_skill_demo", help="output directory (rerun to continue after Ctrl-C)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="rotten_tomatoes")
    p.add_argument("--quick", action="store_true", help="small subsets and a short tuning run (~3 min)")
    _common(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args):
    import time

    from tqdm.auto import tqdm

    from . import distributed
    from .experiments.demo import DemoConfig, run_demo

    kw = dict(model=args.model, task=args.task)
    if args.batch_size:
        kw["batch_size"] = args.batch_size
    cfg = DemoConfig.quick_config(**kw) if args.quick else DemoConfig(**kw)
    t0 = time.perf_counter()

    def on_phase(name, seconds, summary):
        if distributed.is_main():  # one line per phase, not one per torchrun process
            # tqdm.write: on its own line even while a progress bar is drawn
            tqdm.write(f"[{time.perf_counter() - t0:6.0f}s] {name:<26} {seconds:6.1f}s  {summary}")

    path = run_demo(args.out, cfg, device=args.device, dtype=args.dtype, progress=not args.quiet,
                    on_phase=on_phase)
    if distributed.is_main():
        print(f"report: {path}")


# ---------------------------------------------------------------------------- main
ADDERS = [_add_demo, _add_tune, _add_evaluate, _add_find, _add_ablate, _add_prune, _add_transfer, _add_study, _add_origin,
          _add_dashboard, _add_export]


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

    try:
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
