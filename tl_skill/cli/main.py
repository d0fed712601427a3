"""`tl-skill`: the parser of every command and `main`, which runs one and turns errors into one line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from tl_skill.cli.causal import add_attribute, add_steer
from tl_skill.cli.experiments import add_ablate, add_origin, add_prune, add_study, add_transfer
from tl_skill.cli.runs import add_evaluate, add_find, add_tune
from tl_skill.cli.views import add_certify, add_dashboard, add_demo, add_export
from tl_skill.distributed import DistributedError, init_distributed
from tl_skill.errors import TLSkillError
from tl_skill.files import rollback_claims
from tl_skill.tuning.prefix import use_prefix_cache

# ---------------------------------------------------------------------------- main
ADDERS = [
    add_demo,
    add_tune,
    add_evaluate,
    add_find,
    add_ablate,
    add_prune,
    add_transfer,
    add_study,
    add_origin,
    add_attribute,
    add_steer,
    add_dashboard,
    add_export,
    add_certify,
]


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
    """Run one `tl-skill` command; 0 on success, 2 (one line on stderr) on bad input, 130 on Ctrl-C."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # under torchrun: join the process group; each process gets its own device
        group = init_distributed(getattr(args, "device", None))
    except DistributedError as exc:
        print(f"tl-skill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if group.enabled:
        args.device = group.device
        if not group.is_main:
            args.quiet = True  # progress bars and info logs from rank 0 only
    configure_logging(debug=args.verbose, quiet=getattr(args, "quiet", False))
    try:
        with use_prefix_cache(not getattr(args, "no_prefix_cache", False)), rollback_claims():
            args.func(args)
    except (TLSkillError, OSError) as exc:
        print(f"tl-skill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tl-skill {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


# third-party loggers whose info and warnings are not about the user's command
QUIET_LIBRARIES = ("transformers", "transformer_lens", "datasets", "huggingface_hub", "urllib3", "filelock")


def configure_logging(debug: bool = False, quiet: bool = False) -> None:
    """tl_skill's messages at INFO (WARNING with `-q`, DEBUG with `-v`); other libraries' only at ERROR."""
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("tl_skill").setLevel(level)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
