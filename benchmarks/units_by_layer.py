"""Predictivity by layer for several unit sources of one run (figure + JSON), from `tl-skill find --units` outputs.

    python benchmarks/units_by_layer.py mlp=neurons/rt resid=neurons/rt-resid attn=neurons/rt-attn \\
        --out benchmarks/results/units_by_layer.json --figure docs/figures/units_by_layer.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tl_skill.files import atomic_text
from tl_skill.neurons import SkillNeurons
from tl_skill.viz.plots import plot_units_by_layer


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+", help="NAME=NEURONS_DIR")
    p.add_argument("--out", required=True)
    p.add_argument("--figure", required=True)
    args = p.parse_args(argv)
    found = {}
    for item in args.sources:
        name, _, path = item.partition("=")
        if not path:
            p.error(f"{item!r} is not NAME=NEURONS_DIR")
        found[name] = SkillNeurons.load(path)
    out = {}
    for name, sn in found.items():
        pred = sn.predictivity
        k = max(1, pred.shape[1] // 100)
        best = pred.max(1).values
        out[name] = {
            "units": sn.units,
            "width": int(pred.shape[1]),
            "layers": list(sn.layers),
            "best_by_layer": best.tolist(),
            "top1pct_by_layer": pred.sort(1).values[:, -k:].mean(1).tolist(),
            "best": float(best.max()),
            "best_layer": int(sn.layers[int(best.argmax())]),
        }
    first = next(iter(found.values()))
    title = f"{first.model} / {first.task}: predictivity by unit source"
    plot_units_by_layer(found, args.figure, title)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_text(
        args.out,
        json.dumps({"model": first.model, "task": first.task, "sources": out, "command": " ".join(sys.argv)}, indent=1),
    )
    for name, r in out.items():
        print(f"{name:>6}: width {r['width']:5d}  best {r['best']:.3f} at layer {r['best_layer']}")


if __name__ == "__main__":
    main()
