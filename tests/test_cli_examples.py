"""Every `--help` example runs as written, in the order the commands are listed, on a tiny model.

The examples name the bundled SmolLM2; here it is replaced by `tiny-llama` (same family, random weights),
so the chain of examples — tune, evaluate, find, ablate, prune, transfer, study, origin, dashboard,
export — runs in about a minute. Each example's directory must be fresh or hold the same settings: an
example that reused another's `--out` with other settings would be refused, and this test fails.
"""

from __future__ import annotations

import csv
import shlex

import pytest

from tl_skill.cli import build_parser, main

ORDER = [
    "tune",
    "evaluate",
    "find",
    "ablate",
    "prune",
    "transfer",
    "study",
    "origin",
    "attribute",
    "steer",
    "dashboard",
    "export",
    "certify",
]


def examples(command: str) -> list[list[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    epilog = sub.choices[command].epilog or ""
    out = []
    for line in epilog.splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("tl-skill "):
            out.append(shlex.split(line)[1:])
    return out


def test_every_command_has_examples():
    for command in ORDER + ["demo"]:
        assert examples(command), command


@pytest.mark.slow
def test_help_examples_run_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("my.csv", "w", newline="") as f:  # the file the csv example names
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(60):
            w.writerow([f"this film is {'good' if i % 2 else 'bad'} number {i}", "good" if i % 2 else "bad"])
    ran = []
    for command in ORDER:
        for argv in examples(command):
            argv = ["tiny-llama" if a == "smollm2-135m" else a for a in argv]
            code = main([*argv, "-q"])
            assert code == 0, f"`tl-skill {' '.join(argv)}` failed (after {ran})"
            ran.append(" ".join(argv[:2]))
    assert len(ran) >= 20
