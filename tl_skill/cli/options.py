"""The command line's option types (checked while parsing) and its text tables.

Every numeric option is checked by argparse, which then names it: "argument
--batch-size: must be >= 1, got -3", before any work. The tables are what
`find` and `transfer`/`study` print.
"""

from __future__ import annotations

import argparse
import json
import re
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tl_skill import compat
from tl_skill.basis import allow_uncertified
from tl_skill.compat import HookedRootModule
from tl_skill.distributed import is_main
from tl_skill.errors import TLSkillError
from tl_skill.files import jsonable
from tl_skill.models import check_device_name, load_model
from tl_skill.units import BUILTIN, SAE_CONFIG, SAE_WEIGHTS

# ------------------------------------------------------------------ option types
# Every numeric option is checked while parsing: argparse then reports
# "argument --batch-size: must be >= 1, got -3", naming the option, before any work.
# Counts past these are typing slips, not settings (a run of 10^20 steps would train at lr ~ 0 for ever).
MAX_COUNT = 10**9
MAX_SEED = 2**32 - 1


def _int_min(lo: int, hi: int = MAX_COUNT) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        if value > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi:,}, got {value:,}")
        return value

    parse.__name__ = f"integer >= {lo}"
    return parse


POSITIVE = _int_min(1)
NON_NEGATIVE = _int_min(0)
SEED = _int_min(0, MAX_SEED)


def _float_in(lo: float, hi: float | None = None, lo_open: bool = True) -> Callable[[str], float]:
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        low_ok = value > lo if lo_open else value >= lo
        if not low_ok or (hi is not None and value > hi):
            span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]" if hi is not None else f"> {lo:g}"
            raise argparse.ArgumentTypeError(f"must be {'in ' if hi is not None else ''}{span}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


POSITIVE_FLOAT = _float_in(0.0)
FRACTION = _float_in(0.0, 1.0)


def list_of(item: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        parts = [x.strip() for x in text.split(",") if x.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        values = [item(x) for x in parts]
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"repeated values in {text!r}")
        return values

    parse.__name__ = "list"
    return parse


def layer_spec(text: str) -> list[int]:
    """`0-11`, `3,5,7` or `0-3,8`: layer indices (checked against the model once it is loaded)."""
    out: list[int] = []
    for part in [p.strip() for p in text.split(",")]:
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise argparse.ArgumentTypeError(f"expected layers like 0-11 or 3,5,7, got {text!r}")
        a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if b < a:
            raise argparse.ArgumentTypeError(f"empty layer range {part!r} in {text!r} (write low-high)")
        out.extend(range(a, b + 1))
    return sorted(set(out))


def device_spec(text: str) -> str:
    try:
        return check_device_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


LABEL_WORDS_HELP = (
    "one label word per class: w0,w1,... in class order, or NAME=WORD pairs (negative=bad,positive=good). "
    "Classes of a csv/jsonl file with text labels are numbered in the order of the NAME=WORD pairs when "
    "given, else in the order the labels first appear in the file; integer labels are their own numbers. "
    "run.json records the mapping (task_spec.label_names / label_words)"
)


def run_layers(run) -> int | None:
    """How many layers the model of `run` has, as its run.json records (None if it does not)."""
    return (run.info.get("model_spec") or {}).get("n_layers")


def parse_layers(layers: str | Sequence[int] | None, n_layers: int | None = None) -> list[int] | None:
    """Layers from `--layers` (text or the list `layer_spec` parsed), checked against the model."""
    if layers is None or layers == "":
        return None
    out = layer_spec(layers) if isinstance(layers, str) else sorted({int(l) for l in layers})
    if n_layers is not None:
        bad = [l for l in out if not 0 <= l < n_layers]
        if bad:
            raise TLSkillError(f"--layers {bad} out of range: the model has layers 0-{n_layers - 1}")
    return out


# ------------------------------------------------------------------ shared by the commands
def common_options(p: argparse.ArgumentParser, model: bool = True) -> None:
    g = p.add_argument_group("device and precision (the same for every command)")
    g.add_argument(
        "--device", default=None, type=device_spec, help="cpu, cuda, cuda:N or mps (default: cuda if available)"
    )
    g.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="model dtype (statistics stay float64/int64 whatever this is)",
    )
    g.add_argument("--batch-size", type=POSITIVE, default=None, help="examples per forward pass")
    g.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="run every forward pass over input and prompt (default for causal LMs: the input "
        "once, the prompt against its cached keys/values; the same numbers to float rounding)",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    g.add_argument(
        "--allow-uncertified",
        action="store_true",
        help="work on a model whose neuron hooks fail a check of `tl-skill certify` (at your own risk)",
    )


def finish(p: argparse.ArgumentParser, func, json: bool = True) -> None:
    """The end of every command's parser: `--json` (printing the result as JSON), the common options, `func`."""
    if json:
        p.add_argument("--json", action="store_true", help="print the result as JSON")
    common_options(p)
    p.set_defaults(func=func)


def subparser(name: str, sub, help: str, examples: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return p


def emit(obj, as_json: bool, text: str) -> None:
    if not is_main():  # under torchrun only rank 0 prints
        return
    if as_json:  # plain JSON: non-finite numbers as null, anything else JSON cannot hold as text
        print(json.dumps(jsonable(obj), indent=2, default=str, allow_nan=False))
    else:
        print(text)


def load_model_for(args, name: str, run: Any = None) -> HookedRootModule:
    """The model a command works on; for a run, with the special tokens the run's rows started with (a run
    tuned on a bridge you booted yourself may have had BOS turned on where `load_model` has none)."""
    model = load_model(name, device=args.device, dtype=args.dtype)
    if getattr(args, "allow_uncertified", False):
        allow_uncertified(model)
    if run is not None and run.special_prefix is not None:
        compat.set_special_prefix(model, run.special_prefix)
    return model


def units_spec(text: str) -> str:
    """`--units`: mlp, resid, attn or sae:PATH (a directory with cfg.json and sae_weights.safetensors)."""
    if text in BUILTIN:
        return text
    if text.startswith("sae:"):
        path = Path(text[4:])
        missing = [f for f in (SAE_CONFIG, SAE_WEIGHTS) if not (path / f).exists()]
        if missing:
            raise argparse.ArgumentTypeError(f"{path} is not a SAELens directory (missing {', '.join(missing)})")
        return f"sae:{path.resolve()}"
    raise argparse.ArgumentTypeError(f"unknown units {text!r}; choose one of {', '.join(BUILTIN)} or sae:PATH")
