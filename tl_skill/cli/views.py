"""`tl-skill demo`, `dashboard`, `export` and `certify`: the commands that write views of results and models."""

from __future__ import annotations

from pathlib import Path

from tl_skill import distributed
from tl_skill.certification import certify
from tl_skill.cli.options import (
    NON_NEGATIVE,
    POSITIVE,
    common_options,
    emit,
    finish,
    load_model_for,
    subparser,
    units_spec,
)
from tl_skill.errors import CertificationError
from tl_skill.experiments.dashboard import dashboard_data
from tl_skill.neurons import SkillNeurons
from tl_skill.pipelines import DemoConfig, run_demo
from tl_skill.tuning.runs import Run
from tl_skill.viz.dashboard import unit_label, write_dashboard
from tl_skill.viz.neuronpedia import (
    check_name,
    claim_export_dir,
    default_model_id,
    default_source_set,
    export_neuronpedia,
)


# ----------------------------------------------------------------------- dashboards
def add_dashboard(sub) -> None:
    p = subparser(
        "dashboard",
        sub,
        "one static HTML page per top skill neuron, and an index",
        """
        tl-skill dashboard neurons/rt --run runs/rt/seed0 --out dashboard/rt
        tl-skill dashboard neurons/rt --run runs/rt/seed0 --out dashboard/rt-40 --top 40 --ablation ablation/rt
    """,
    )
    _dashboard_options(p)
    p.add_argument("--ablation", default=None, help="an ablation directory of the same run: its group effect")
    p.add_argument(
        "--attribution",
        default=None,
        help="an attribution directory of the same run (`tl-skill attribute`): attribution and patched effects",
    )
    p.set_defaults(func=cmd_dashboard)


def _dashboard_options(p) -> None:
    p.add_argument("neurons_dir", help="directory written by `tl-skill find`")
    p.add_argument("--run", required=True, help="the run whose prompt and test examples are used")
    p.add_argument("--out", required=True)
    p.add_argument("--top", type=POSITIVE, default=20, help="neurons, best predictivity first")
    p.add_argument("--max-examples", type=NON_NEGATIVE, default=200, help="test examples (0: the run's test set)")
    p.add_argument("--examples", type=POSITIVE, default=10, help="top and bottom examples shown per neuron")
    p.add_argument(
        "--ablation-mode",
        default="mean",
        choices=["mean", "zero"],
        help="how the single-neuron ablation removes the neuron",
    )
    p.add_argument(
        "--units",
        type=units_spec,
        default=None,
        help="units to trace (default: those the neurons were found on; sae:NEWPATH if the SAE moved)",
    )
    common_options(p)


def _dashboard(args, out):
    run = Run.load(args.run)
    return dashboard_data(
        lambda: load_model_for(args, run.model_name, run),
        run,
        SkillNeurons.load(args.neurons_dir),
        out,
        top=args.top,
        max_examples=args.max_examples or None,
        n_examples=args.examples,
        ablation_mode=args.ablation_mode,
        ablation=getattr(args, "ablation", None),
        attribution=getattr(args, "attribution", None),
        batch_size=args.batch_size or 32,
        progress=not args.quiet,
        units=args.units,
    )


def cmd_dashboard(args) -> None:
    res = _dashboard(args, args.out)
    index = write_dashboard(res, args.out)
    lines = [f"{'unit':>12} {'predictivity':>12} {'held-out':>9} {'alone':>7}"]
    lines += [
        f"{unit_label(r):>12} {r['predictivity']:>12.4f} "
        f"{(r['heldout_predictivity'] if r['heldout_predictivity'] is not None else float('nan')):>9.4f} "
        f"{r['ablation_delta']:>+7.3f}"
        for r in res.neurons
    ]
    emit({"index": str(index), "neurons": len(res.neurons)}, False, "\n".join(lines) + f"\nopen {index}")


def add_export(sub) -> None:
    p = subparser(
        "export",
        sub,
        "export skill neurons for other tools (neuronpedia: its export layout)",
        """
        tl-skill export neuronpedia neurons/rt --run runs/rt/seed0 --out np_export/
    """,
    )
    p.add_argument("format", choices=["neuronpedia"])
    _dashboard_options(p)
    p.add_argument("--model-id", default=None, help="Neuronpedia's id of the model (default: tl_skill's name)")
    p.add_argument(
        "--source-set",
        default=None,
        help="Neuronpedia source set name, the layer is prepended (default: tlskill-<units>)",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    if args.source_set is None:
        args.source_set = default_source_set(args.units or SkillNeurons.load(args.neurons_dir).units)
    check_name(args.source_set, "source set")
    args.model_id = (
        check_name(args.model_id, "model id") if args.model_id else default_model_id(Run.load(args.run).model_name)
    )
    claim_export_dir(args.out, args.model_id, args.source_set)
    res = _dashboard(args, Path(args.out) / "dashboard")  # the data, saved (and resumable) beside the export
    files = export_neuronpedia(res, args.out, model_id=args.model_id, source_set=args.source_set)
    emit({"files": [str(f) for f in files]}, False, "\n".join(str(f) for f in files))


# ---------------------------------------------------------------------------- demo
def add_demo(sub) -> None:
    p = subparser(
        "demo",
        sub,
        "the whole pipeline on one task, ending in report.html / report.md",
        """
        tl-skill demo                       # SmolLM2-135M on rotten_tomatoes, ~6 min on 2 CPU cores
        tl-skill demo --quick --out quick   # ~3 min, small subsets
        tl-skill demo --model tiny-gpt2 --task bbc_news:sport-vs-business --out tiny
    """,
    )
    p.add_argument("--out", default="tl_skill_demo", help="output directory (rerun to continue after Ctrl-C)")
    p.add_argument("--model", default="smollm2-135m", help="default: smollm2-135m (bundled)")
    p.add_argument("--task", default="rotten_tomatoes")
    p.add_argument("--quick", action="store_true", help="small subsets and a short tuning run (~3 min)")
    common_options(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> None:
    import time

    from tqdm.auto import tqdm

    kw = dict(model=args.model, task=args.task)
    if args.batch_size:
        kw["batch_size"] = args.batch_size
    cfg = DemoConfig.quick_config(**kw) if args.quick else DemoConfig(**kw)
    t0 = time.perf_counter()

    def on_phase(name, seconds, summary):
        if distributed.is_main():  # one line per phase, not one per torchrun process
            # tqdm.write: on its own line even while a progress bar is drawn
            tqdm.write(f"[{time.perf_counter() - t0:6.0f}s] {name:<26} {seconds:6.1f}s  {summary}")

    path = run_demo(args.out, cfg, device=args.device, dtype=args.dtype, progress=not args.quiet, on_phase=on_phase)
    if distributed.is_main():
        print(f"report: {path}")


# ----------------------------------------------------------------------- certify
def add_certify(sub) -> None:
    p = subparser(
        "certify",
        sub,
        "check that the model's neuron hooks are its neuron basis, and everything else tl_skill relies on",
        """
        tl-skill certify smollm2-135m
        tl-skill certify tiny-qwen2 --json
        tl-skill certify tiny-mistral --allow-uncertified   # a local model directory works the same way
    """,
    )
    p.add_argument("model", help="smollm2-135m, gemma3-270m, tiny-*, a local Hugging Face model directory or a hub id")
    finish(p, cmd_certify)


def cmd_certify(args) -> None:
    model = load_model_for(args, args.model)
    result = certify(model)
    emit(result.to_dict(), args.json, result.table())
    if not result.passed:
        raise CertificationError(f"{result.model} is not certified: check(s) {', '.join(result.failed)} failed")
