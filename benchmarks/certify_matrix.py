"""The certified-architectures matrix: `certify` and a short tune -> find -> ablate -> prune on every tiny family.

    python benchmarks/certify_matrix.py                       # all tiny families (~3 min on 2 CPU cores)
    python benchmarks/certify_matrix.py --models tiny-qwen2   # some of them
    python benchmarks/certify_matrix.py --real                # also the bundled SmolLM2-135M and Gemma 3 270M

Writes `benchmarks/results/architectures.json` and the matrix of `docs/architectures.md` (between its
`<!-- matrix -->` markers). A family whose neuron basis fails is not run end to end: its refusal, with
the failed check, is what the matrix records. `tests/test_certify.py` checks the matrix in the docs
against a fresh certification of every family.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tl_skill import load_model, load_task
from tl_skill.certification import CHECKS, certify
from tl_skill.data.tasks import subsample
from tl_skill.errors import TLSkillError
from tl_skill.experiments.ablation import ablation_experiment
from tl_skill.files import atomic_text
from tl_skill.find import find_skill_neurons
from tl_skill.models import TINY_CONFIGS, TINY_MODELS
from tl_skill.prune import prune_model, pruning_of
from tl_skill.tuning import TuneConfig, tune

DOC = ROOT / "docs" / "architectures.md"
RESULT = ROOT / "benchmarks" / "results" / "architectures.json"
START, END = "<!-- matrix -->", "<!-- /matrix -->"
SHORT = {
    "hook_exists": "hook",
    "hook_fires": "fires",
    "equals_projection_input": "= W_out input",
    "perturbation_equivalent": "edit",
    "placement": "placement",
    "special_prefix": "prefix",
    "label_logits": "label logits",
    "prefix_cache": "cache",
    "plain_view": "plain view",
    "pruning": "pruning",
}


def end_to_end(model, name: str) -> dict:
    """A few steps of each stage; what each returned (or the refusal)."""
    task = subsample(load_task("rotten_tomatoes"), {"train": 24, "dev": 12, "test": 12})
    cfg = TuneConfig(prompt_length=2, steps=2, eval_every=2, batch_size=8, eval_batch_size=12)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run = tune(model, task, Path(tmp) / "run", cfg, progress=False)
            out["tune"] = f"dev {run.metrics['dev_accuracy']:.2f}"
            sn = find_skill_neurons(model, [run], max_train_examples=24, max_eval_examples=12, progress=False)
            out["find"] = f"best {sn.best_predictivity:.2f}"
            abl = ablation_experiment(model, run, sn, None, fractions=[0.1], seeds=1, progress=False)
            out["ablate"] = f"{abl.rows[0]['skill_accuracy']:.2f} vs clean {abl.rows[0]['clean_accuracy']:.2f}"
            pruned = prune_model(model, sn, keep=0.5)
            kept = pruning_of(pruned)
            assert kept is not None
            out["prune"] = f"{len(kept.kept[kept.layers[-1]])} of {kept.d_mlp} neurons kept"
        except TLSkillError as exc:
            out["refused"] = f"{type(exc).__name__}: {exc}"
    return out


def family_of(architecture: str) -> str:
    """`LlamaForCausalLM` -> `Llama`."""
    return re.sub(r"(ForCausalLM|ForMaskedLM|LMHeadModel)$", "", architecture)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(TINY_MODELS))
    parser.add_argument("--real", action="store_true", help="also smollm2-135m and gemma3-270m (certify only)")
    parser.add_argument("--no-end-to-end", action="store_true")
    parser.add_argument("--out", default=str(RESULT))
    parser.add_argument("--doc", default=str(DOC), help="the markdown file whose matrix is rewritten ('' for none)")
    parser.add_argument("--render", action="store_true", help="only rewrite the docs' matrix from --out")
    args = parser.parse_args(argv)
    if args.render:
        write_matrix(Path(args.doc), json.loads(Path(args.out).read_text())["rows"])
        return
    logging.disable(logging.WARNING)  # the tiny models' label words warn; the table says what matters
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _matrix(args)
    finally:
        logging.disable(logging.NOTSET)


def _matrix(args) -> None:
    names = [m for m in args.models.split(",") if m] + (["smollm2-135m", "gemma3-270m"] if args.real else [])
    rows = []
    for name in names:
        t0 = time.perf_counter()
        model = load_model(name, device="cpu")
        cert = certify(model)
        row = {**cert.to_dict(), "model": name}
        if not args.no_end_to_end and name in TINY_CONFIGS:
            row["end_to_end"] = end_to_end(model, name)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(
            f"{name:<18} {'certified' if cert.passed else 'NOT certified: ' + ', '.join(cert.failed)}"
            f"  {row.get('end_to_end', '')}  {row['seconds']:.1f}s",
            flush=True,
        )
    atomic_text(args.out, json.dumps({"rows": rows, "versions": rows[0]["versions"]}, indent=2) + "\n")
    if args.doc:
        write_matrix(Path(args.doc), rows)


def matrix_markdown(rows: list[dict]) -> str:
    head = "| model | family | " + " | ".join(SHORT[c] for c in CHECKS) + " | tune → find → ablate → prune |"
    lines = [head, "|" + "---|" * (len(CHECKS) + 3)]
    mark = {True: "✓", False: "✗", None: "n/a"}
    for r in rows:
        res = {c["name"]: c["passed"] for c in r["checks"]}
        e2e = r.get("end_to_end")
        if e2e is None:
            run = "certify only"
        elif "refused" in e2e:
            done = [k for k in ("tune", "find", "ablate", "prune") if k in e2e]
            failed = next((c for c in r["checks"] if c["passed"] is False), None)
            why = failed["detail"].split(":")[0] if failed else re.sub(r"\s+", " ", e2e["refused"])[:60]
            run = (f"{', '.join(done)} ✓; " if done else "") + f"the rest refused ({why})"
        else:
            run = "✓ all four"
        cells = " | ".join(mark[res.get(c)] for c in CHECKS)
        lines.append(f"| `{r['model']}` | {family_of(r['architecture'])} | {cells} | {run} |")
    v = rows[0]["versions"]
    lines.append("")
    lines.append(
        f"Generated by `python benchmarks/certify_matrix.py` with transformer-lens {v['transformer_lens']}, "
        f"transformers {v['transformers']}, torch {v['torch']} (JSON: `benchmarks/results/architectures.json`)."
    )
    return "\n".join(lines)


def write_matrix(doc: Path, rows: list[dict]) -> None:
    text = doc.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{doc} has no {START} ... {END} markers")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    atomic_text(doc, f"{before}{START}\n{matrix_markdown(rows)}\n{END}{after}")


if __name__ == "__main__":
    main()
