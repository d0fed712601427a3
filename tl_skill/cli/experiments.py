"""`tl-skill ablate`, `prune`, `transfer`, `study` and `origin`: the experiments (argument parsing only)."""

from __future__ import annotations

from pathlib import Path

from tl_skill.cli.options import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_FLOAT,
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
from tl_skill.cli.tables import correlation_table, evidence_table
from tl_skill.distributed import is_main
from tl_skill.errors import TLSkillError
from tl_skill.experiments.ablation import ABLATION_PNG, ablation_experiment
from tl_skill.experiments.origin import origin_study
from tl_skill.experiments.pruning import prune_experiment
from tl_skill.experiments.transfer import TransferResult, study, transfer_from_dirs
from tl_skill.neurons import SELECTIONS, SkillNeurons
from tl_skill.tuning.runs import Run, TuneConfig
from tl_skill.viz.plots import plot_ablation, plot_origin_figures, plot_transfer_figures


# -------------------------------------------------------------------------- ablate
def add_ablate(sub) -> None:
    p = subparser(
        "ablate",
        sub,
        "perturb skill neurons vs random neurons and measure accuracy (method §6)",
        """
        tl-skill ablate runs/rt/seed0 --neurons neurons/rt --out ablation/rt
        tl-skill ablate runs/rt/seed0 --neurons neurons/rt --out ablation/rt-zero --mode zero --fractions 0.01,0.1
        tl-skill ablate runs/rt/seed0 --neurons neurons/rt --out ablation/rt-rel --relative --std 1.0
    """,
    )
    p.add_argument("run_dir")
    p.add_argument("--neurons", required=True, help="directory written by `tl-skill find`")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="noise", choices=["noise", "zero", "mean"])
    p.add_argument(
        "--fractions",
        type=list_of(FRACTION),
        default=[0.01, 0.02, 0.05, 0.1, 0.2],
        help="comma-separated, per layer, each in (0, 1] (default: 0.01,0.02,0.05,0.1,0.2)",
    )
    p.add_argument("--seeds", type=POSITIVE, default=3, help="random-neuron control seeds")
    p.add_argument(
        "--std", type=POSITIVE_FLOAT, default=0.1, help="noise std (absolute, or x neuron std with --relative)"
    )
    p.add_argument("--relative", action="store_true", help="noise std relative to each neuron's std")
    p.add_argument("--layers", type=layer_spec, default=None, help="perturb only these layers, e.g. 10-29")
    p.add_argument(
        "--selection",
        default="score",
        choices=list(SELECTIONS),
        help="multi-class tasks: rank by the aggregated predictivity (score, default) or take the next best unit "
        "of each subtask in turn (round_robin, the reference's rule)",
    )
    p.add_argument("--max-examples", type=NON_NEGATIVE, default=300, help="test examples (0: the run's whole test set)")
    p.add_argument(
        "--units",
        type=units_spec,
        default=None,
        help="units to perturb (default: those the neurons were found on; sae:NEWPATH if the SAE moved)",
    )
    finish(p, cmd_ablate)


def _run_neurons_model(args):
    """What `ablate` and `prune` start from: the run, its skill neurons, a model loader, and the
    options they share (layers, batch size, progress)."""
    run = Run.load(args.run_dir)
    shared = dict(
        layers=parse_layers(args.layers, run_layers(run)),
        batch_size=args.batch_size or 32,
        progress=not args.quiet,
        max_examples=args.max_examples or None,
    )
    return run, SkillNeurons.load(args.neurons), (lambda: load_model_for(args, run.model_name, run)), shared


def cmd_ablate(args) -> None:
    run, sn, loader, shared = _run_neurons_model(args)
    res = ablation_experiment(
        loader,
        run,
        sn,
        args.out,
        mode=args.mode,
        fractions=args.fractions,
        seeds=args.seeds,
        std=args.std,
        relative=args.relative,
        units=args.units,
        selection=args.selection,
        **shared,
    )
    if is_main():
        plot_ablation(res, Path(args.out) / ABLATION_PNG)

    lines = [
        f"{'fraction':>8} {'clean':>7} {'skill':>7} {'random':>15} {'skill-random [95% CI]':>26} {'McNemar p':>12} "
        f"{'lost':>13}"
    ]
    for r in res["rows"]:
        pr = r["paired"]
        lines.append(
            f"{r['fraction']:>8.0%} {r['clean_accuracy']:>7.3f} {r['skill_accuracy']:>7.3f} "
            f"{r['random_accuracy']:>7.3f} ± {r['random_accuracy_std']:.3f} "
            f"{pr['difference']:>+8.3f} [{pr['ci_low']:+.3f}, {pr['ci_high']:+.3f}] "
            f"{'/'.join(f'{p:.2g}' for p in pr['mcnemar_p']):>12} "
            f"{_share(res.share_lost(r['skill_accuracy']))} / {_share(res.share_lost(r['random_accuracy']))}"
        )
    lines.append(res.verdict().sentence)
    if res.majority_accuracy is not None:
        lines.append(
            f"lost: the share of the above-chance accuracy lost, skill / random, (clean - perturbed) / (clean - "
            f"majority class {res.majority_accuracy:.3f})"
        )
    emit(res.to_dict(), args.json, "\n".join(lines) + f"\nsaved to {args.out}")


def _share(x: float | None) -> str:
    return "    -" if x is None else f"{x:>5.0%}"


# --------------------------------------------------------------------------- prune
def add_prune(sub) -> None:
    p = subparser(
        "prune",
        sub,
        "prune a model to its skill neurons and measure size, speed, accuracy (method §7)",
        """
        tl-skill prune runs/rt/seed0 --neurons neurons/rt --out pruned/rt
        tl-skill prune runs/rt/seed0 --neurons neurons/rt --out pruned/rt-k5 --keep 0.05 --retune-steps 100
    """,
    )
    p.add_argument("run_dir")
    p.add_argument("--neurons", required=True, help="directory written by `tl-skill find`")
    p.add_argument("--out", required=True)
    p.add_argument("--keep", type=FRACTION, default=0.02, help="fraction of neurons kept in each pruned layer")
    p.add_argument("--layers", type=layer_spec, default=None, help="layers to prune (default: the top 75%%)")
    p.add_argument("--retune-steps", type=NON_NEGATIVE, default=0, help="re-tune the prompt on the pruned model")
    p.add_argument(
        "--max-examples", type=NON_NEGATIVE, default=None, help="test examples (default, or 0: the run's test set)"
    )
    p.add_argument("--timing-repeats", type=POSITIVE, default=5)
    finish(p, cmd_prune)


def cmd_prune(args) -> None:
    run, sn, loader, shared = _run_neurons_model(args)
    res = prune_experiment(
        loader,
        run,
        sn,
        args.out,
        keep=args.keep,
        retune_steps=args.retune_steps,
        timing_repeats=args.timing_repeats,
        **shared,
    )
    text = (
        f"parameters {res['params_before']:,} -> {res['params_after']:,} "
        f"({res['params_after'] / res['params_before']:.1%}); speedup {res['speedup']:.2f}x\n"
        f"accuracy {res['accuracy_before']:.4f} -> {res['accuracy_after']:.4f}"
        + (f" (re-tuned {res['accuracy_retuned']:.4f})" if res.get("accuracy_retuned") is not None else "")
        + f"\nsaved to {args.out}"
    )
    emit(res.to_dict(), args.json, text)


# ------------------------------------------------------------------ transfer, study
def add_transfer(sub) -> None:
    p = subparser(
        "transfer",
        sub,
        "task similarity and prompt transferability from skill neurons (method §8)",
        """
        tl-skill transfer neurons/rt neurons/ws --out transfer/
        tl-skill transfer neurons/rt neurons/ws --runs runs/rt/seed0 runs/ws/seed0 --transfer-steps 0 --out tr0/
    """,
    )
    p.add_argument("neurons_dirs", nargs="+", help="one `tl-skill find` directory per task")
    p.add_argument("--runs", nargs="*", default=None, help="run directories (default: those each neurons dir used)")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--transfer-steps", type=NON_NEGATIVE, default=10, help="K steps of tuning from the source prompt (0: skip)"
    )
    p.add_argument("--init-trials", type=POSITIVE, default=1)
    p.add_argument(
        "--top-fraction", type=FRACTION, default=0.02, help="per-layer top fraction for the overlap indicator"
    )
    p.add_argument("--max-eval-examples", type=POSITIVE, default=300)
    p.add_argument(
        "--units",
        type=units_spec,
        default=None,
        help="units of the activation indicators (default: those the neurons were found on)",
    )
    p.add_argument("--no-figures", action="store_true")
    finish(p, cmd_transfer)


def cmd_transfer(args) -> None:
    res = transfer_from_dirs(
        None,
        args.neurons_dirs,
        args.runs or None,
        args.out,
        device=args.device,
        dtype=args.dtype,
        transfer_steps=args.transfer_steps,
        init_trials=args.init_trials,
        top_fraction=args.top_fraction,
        max_eval_examples=args.max_eval_examples,
        batch_size=args.batch_size,
        progress=not args.quiet,
        units=args.units,
    )
    if not args.no_figures and is_main():
        plot_transfer_figures(res, Path(args.out) / "figures")
    emit(res.to_dict(), args.json, _tables(res) + f"\nsaved to {args.out}")


def add_study(sub) -> None:
    p = subparser(
        "study",
        sub,
        "multi-task study: tune, find, transfer, indicators (method §8-§9)",
        """
        tl-skill study --model smollm2-135m --tasks rotten_tomatoes,word_sentiment,subjectivity --out study/
        tl-skill study --model tiny-gpt2 --tasks rotten_tomatoes,word_sentiment --seeds 2 --steps 20 --out tiny_study/
    """,
    )
    p.add_argument("--model", required=True, help="smollm2-135m, gemma3-270m, tiny-*, a model directory or a hub id")
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
    p.add_argument(
        "--transfer-steps", type=NON_NEGATIVE, default=10, help="K steps of tuning from the source prompt (0: skip)"
    )
    p.add_argument("--max-eval-examples", type=POSITIVE, default=200, help="test examples per transfer evaluation")
    p.add_argument(
        "--units",
        type=units_spec,
        default="mlp",
        help="units to find and compare: mlp (default), resid, attn or sae:PATH",
    )
    finish(p, cmd_study)


def cmd_study(args) -> None:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    cfg = TuneConfig(
        prompt_length=args.prompt_length,
        steps=args.steps,
        lr=args.lr,
        eval_every=max(1, args.steps // 2),
        max_dev_examples=args.max_dev_examples,
        max_test_examples=args.max_test_examples,
        **({"batch_size": args.batch_size} if args.batch_size else {}),
    )
    res = study(
        args.model,
        tasks,
        args.out,
        seeds=tuple(range(args.seeds)),
        tune_config=cfg,
        find_kwargs={
            "max_train_examples": args.find_train_examples,
            "max_eval_examples": args.find_eval_examples,
            **({} if args.units == "mlp" else {"units": args.units}),
        },
        transfer_steps=args.transfer_steps,
        progress=not args.quiet,
        device=args.device,
        dtype=args.dtype,
        max_eval_examples=args.max_eval_examples,
    )
    transfer = TransferResult.load(args.out)
    if is_main():
        plot_transfer_figures(transfer, Path(args.out) / "figures")
    emit(res.to_dict(), args.json, _tables(transfer) + f"\nsaved to {args.out}")


def _tables(res: TransferResult) -> str:
    evidence = evidence_table(res)
    return correlation_table(res) + ("\n\n" + evidence if evidence else "")


# -------------------------------------------------------------------------- origin
def add_origin(sub) -> None:
    p = subparser(
        "origin",
        sub,
        "where skill neurons come from: random weights, LoRA, BitFit, label words (method §9)",
        """
        tl-skill origin --run runs/rt/seed0 --neurons neurons/rt --out origin/rt
        tl-skill origin --model tiny-gpt2 --task rotten_tomatoes --out origin/tiny --steps 20 --parts lora,bitfit
    """,
    )
    p.add_argument("--model", default=None, help="the model (default: the --run's)")
    p.add_argument("--task", default=None, help="the task (default: the --run's, else rotten_tomatoes)")
    p.add_argument("--out", required=True)
    p.add_argument("--run", default=None, help="reuse this prompt-tuning run (else one is tuned)")
    p.add_argument("--neurons", default=None, help="reuse these skill neurons (else they are found)")
    p.add_argument("--parts", default="random_weights,lora,bitfit,label_words")
    p.add_argument("--steps", type=POSITIVE, default=200, help="training steps of LoRA and BitFit")
    p.add_argument(
        "--prompt-steps",
        type=NON_NEGATIVE,
        default=150,
        help="tuning steps of the random-weights and label-word prompts (0: the source run's)",
    )
    p.add_argument("--lora-lr", type=POSITIVE_FLOAT, default=1e-3)
    p.add_argument("--bitfit-lr", type=POSITIVE_FLOAT, default=1e-3)
    p.add_argument("--lora-rank", type=POSITIVE, default=8)
    p.add_argument(
        "--fractions",
        type=list_of(FRACTION),
        default=[0.01, 0.05, 0.1, 0.2],
        help="comma-separated, per layer, each in (0, 1] (default: 0.01,0.05,0.1,0.2)",
    )
    p.add_argument("--seeds", type=POSITIVE, default=2)
    p.add_argument("--mode", default="noise", choices=["noise", "zero", "mean"])
    p.add_argument("--std", type=POSITIVE_FLOAT, default=0.1)
    p.add_argument("--relative", action="store_true")
    p.add_argument("--alt-label-words", default=None, help="e.g. bad,good")
    p.add_argument(
        "--max-test-examples",
        type=NON_NEGATIVE,
        default=300,
        help="test examples per evaluation (perturbation, extra prompts); 0: the run's cap",
    )
    p.add_argument("--find-train-examples", type=POSITIVE, default=2000)
    p.add_argument("--find-eval-examples", type=POSITIVE, default=None)
    finish(p, cmd_origin)


def cmd_origin(args) -> None:
    model, task = args.model, args.task
    if model is None or (task is None and args.run is None and args.neurons is None):
        source = Run.load(args.run) if args.run else SkillNeurons.load(args.neurons) if args.neurons else None
        if model is None:
            if source is None:
                raise TLSkillError("give --model (or --run / --neurons, whose model is then used)")
            model = source.model_name if isinstance(source, Run) else source.model
        task = task or (None if source is not None else "rotten_tomatoes")
    res = origin_study(
        model,
        task,
        args.out,
        run_dir=args.run,
        neurons_dir=args.neurons,
        parts=tuple(x.strip() for x in args.parts.split(",") if x.strip()),
        steps=args.steps,
        lora_lr=args.lora_lr,
        bitfit_lr=args.bitfit_lr,
        lora_rank=args.lora_rank,
        fractions=tuple(args.fractions),
        seeds=args.seeds,
        mode=args.mode,
        std=args.std,
        relative=args.relative,
        alt_label_words=args.alt_label_words.split(",") if args.alt_label_words else None,
        max_test_examples=args.max_test_examples or None,
        prompt_steps=args.prompt_steps or None,
        find_train_examples=args.find_train_examples,
        find_eval_examples=args.find_eval_examples,
        batch_size=args.batch_size or 32,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
    )
    if is_main():
        plot_origin_figures(res, args.out)
    lines = [
        f"{part:<15} {'holds' if sec.get('claim_holds') else 'does not hold'}: {sec.get('statement')}"
        for part, sec in res.parts().items()
        if "statement" in sec
    ]
    emit(res.to_dict(), args.json, "\n".join(lines) + f"\nsaved to {args.out}")
