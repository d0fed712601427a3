"""The `tl-skill` command line: one module per group of commands, parsing arguments only.

- `runs`: tune, evaluate, find; `experiments`: ablate, prune, transfer, study, origin;
  `views`: dashboard, export, demo;
- `options`: option types checked while parsing, the options every command shares;
- `tables`: the text tables commands print; `main`: the parser and `main()`.
"""

from tl_skill.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
