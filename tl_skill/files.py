"""Reading and writing the files tl_skill keeps: every error names the file and what is wrong.

Loaders read JSON and safetensors through `read_json` / `read_tensors`, which
turn a missing, truncated, garbage or wrongly typed file into one
`FileFormatError` naming the path. Writers check their output directory with
`check_output_dir` before any long work and write through `atomic_json` (a
temporary file renamed into place), so a refused or interrupted command never
leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch

from tl_skill import distributed
from tl_skill.errors import FileFormatError, OutputDirError, TLSkillError

P = ParamSpec("P")
R = TypeVar("R")


def package_version() -> str:
    """tl_skill's version as installed (`importlib.metadata`), recorded in every result directory."""
    try:
        return importlib.metadata.version("tl-skill")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def check_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Refuse an output directory that cannot be created or written, before any work.

    Nothing is created: the nearest existing ancestor is probed with a
    temporary file that is removed at once.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{option} {path} is a file, not a directory")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputDirError(f"{option} {path}: {probe} is a file, so the directory cannot be created")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        where = "" if probe == path else f" (in {probe})"
        raise OutputDirError(f"{option} {path} is not writable{where}: {exc.strerror or exc}") from exc
    return path


def temp_path(path: str | Path) -> Path:
    """A temporary name beside `path`, unique to this process, to write into and rename.

    Unique per process so that two processes writing the same file (torchrun
    ranks, two commands on one directory) never rename each other's file away.
    """
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _file_mode() -> int:
    """The mode a plainly created file gets (0666 less the umask): tensors and JSON alike."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def check_inside(root: str | Path, path: str | Path, option: str = "--out") -> Path:
    """`path`, refused unless it resolves inside `root` (a name from a run or an option cannot lead out)."""
    # the file's own name is not followed: a link planted there is replaced by atomic writes, never written through
    root_r, path_r = Path(root).resolve(), Path(path).parent.resolve() / Path(path).name
    if path_r != root_r and root_r not in path_r.parents:
        raise OutputDirError(f"{path} would be written outside {option} {root}; refused")
    return Path(path)


_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def path_component(name: str) -> str:
    """`name` as one file-name component: any run of other characters than letters, digits and `._+-`
    becomes `_`, and leading dots go (`../../x` -> `_x`; `/models/my-llama` -> `_models_my-llama`)."""
    out = _UNSAFE.sub("_", str(name)).lstrip(".")
    return out or "_"


def atomic_write(path: str | Path, write: Callable[[Path], Any], root: str | Path | None = None) -> Path:
    """Write a file through `write(temporary path)`, then rename it into place.

    A reader never sees half a file; a symbolic link planted at `path` is replaced, never written
    through; the file gets the plain mode (tensors too); the temporary file is removed if writing
    fails. With `root`, `path` must resolve inside it.
    """
    path = Path(path)
    if root is not None:
        check_inside(root, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)  # never write through a link left at the temporary name
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_text(path: str | Path, text: str, root: str | Path | None = None) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), root)


def atomic_bytes(path: str | Path, data: bytes, root: str | Path | None = None) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), root)


def atomic_tensors(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    root: str | Path | None = None,
) -> Path:
    """A safetensors file, written atomically (`atomic_write`), tensors made contiguous on the CPU."""
    from safetensors.torch import save_file

    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=metadata), root)


def json_text(obj: Any) -> str:
    """JSON of `obj` with non-finite numbers as null (never the bare `NaN`/`Infinity` tokens)."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False)


def atomic_json(path: str | Path, obj: Any, root: str | Path | None = None) -> Path:
    """Write JSON to `path` atomically; non-finite numbers are written as null."""
    return atomic_text(path, json_text(obj), root)


def jsonable(obj: Any) -> Any:
    """`obj` with numpy scalars, tuples and paths made plain JSON values; non-finite floats become None."""
    import math

    import numpy as np

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (np.floating, np.integer)):
        return jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def tensor_digest(t: torch.Tensor) -> str:
    """A short content hash of a tensor's float32 values (prompts, predictivity maps, masks)."""
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


EXPERIMENT_JSON = "experiment.json"


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))
        return out
    return [] if old == new else [f"{where or 'value'} ({_short(old)} there, {_short(new)} here)"]


def _short(x: Any) -> str:
    text = json.dumps(x)
    return text if len(text) <= 40 else text[:37] + "..."


def claim_dir(
    out: str | Path,
    kind: str,
    identity: Mapping[str, Any],
    *,
    option: str = "--out",
    legacy: Any = None,
    write: bool = True,
) -> Path:
    """Make `out` the directory of one `kind` of result with these settings, or refuse it, before any work.

    The one rule of every writing command: `out/experiment.json` records the kind and
    the identity (every setting that decides the results). A directory holding
    another kind, or the same kind with other settings, is refused with the
    differing settings named; the same settings resume. A non-empty directory
    without `experiment.json` is refused too, unless `legacy(out)` (results written
    by an older tl_skill) returns their identity, which must then agree on the
    settings it has. Hidden files are ignored.
    """
    path = check_output_dir(out, option)
    if not distributed.is_main():  # rank 0 decides (and raises, ending the process group)
        return path
    want = json.loads(json.dumps(jsonable(dict(identity))))
    record = path / EXPERIMENT_JSON
    if record.exists():
        prev = read_json(record, "experiment file", {"kind": str, "identity": dict})
        if prev["kind"] != kind:
            raise OutputDirError(
                f"{option} {path} holds a {prev['kind']} result, not a {kind}: use another directory or delete it"
            )
        diff = _differences(prev["identity"], want)
        if diff:
            raise OutputDirError(
                f"{option} {path} holds a {kind} with other settings: "
                f"{'; '.join(diff[:4])}{' ...' if len(diff) > 4 else ''}. "
                "Use another directory or delete it"
            )
        return path
    if path.is_dir() and any(not p.name.startswith(".") for p in path.iterdir()):
        old = legacy(path) if legacy is not None else None
        if old is None:
            raise OutputDirError(
                f"{option} {path} is not empty and holds no tl_skill {kind} "
                f"(no {EXPERIMENT_JSON}): use a new or empty directory"
            )
        old = json.loads(json.dumps(jsonable(dict(old))))
        diff = _differences({k: v for k, v in old.items() if k in want}, {k: want[k] for k in old if k in want})
        if diff:
            raise OutputDirError(
                f"{option} {path} holds a {kind} of an older tl_skill with other settings: "
                f"{'; '.join(diff[:4])}. Use another directory or delete it"
            )
    if write:
        existed = path.is_dir()
        before = {p.name for p in path.iterdir()} if existed else set()
        path.mkdir(parents=True, exist_ok=True)
        atomic_json(record, {"kind": kind, "identity": want, "tl_skill": package_version()})
        if _CLAIM_SCOPES:
            _CLAIM_SCOPES[-1].append((path, existed, before))
    return path


_CLAIM_SCOPES: list[list[tuple[Path, bool, set[str]]]] = []


@contextlib.contextmanager
def rollback_claims() -> Iterator[None]:
    """Undo the directory claims made inside the block when it ends with an error about the input
    (`TLSkillError`) before anything else was written there: a refused command leaves no `experiment.json`
    that would block the corrected command. Directories with other files (work to resume) are kept."""
    scope: list[tuple[Path, bool, set[str]]] = []
    _CLAIM_SCOPES.append(scope)
    try:
        yield
    except TLSkillError:
        for path, existed, before in reversed(scope):
            added = {p.name for p in path.iterdir()} - before if path.is_dir() else set()
            if added <= {EXPERIMENT_JSON}:
                (path / EXPERIMENT_JSON).unlink(missing_ok=True)
                if not existed and not any(path.iterdir()):
                    path.rmdir()
        raise
    finally:
        _CLAIM_SCOPES.pop()


def rolls_back_claims(fn: Callable[P, R]) -> Callable[P, R]:
    """Run `fn` inside `rollback_claims()` (for the library's writing entry points)."""

    @functools.wraps(fn)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        with rollback_claims():
            return fn(*args, **kwargs)

    return wrapped


def read_json(
    path: str | Path, what: str = "file", required: Mapping[str, type | tuple[type, ...]] | None = None
) -> dict[str, Any]:
    """A JSON object from `path`; `required` maps keys to the type(s) their values must have."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileFormatError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"cannot read {what} {path}: {exc}") from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(
            f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); delete or restore it"
        ) from exc
    if not isinstance(obj, dict):
        raise FileFormatError(f"{what} {path} must hold a JSON object, found {type(obj).__name__}")
    check_types(obj, required or {}, f"{what} {path}")
    return obj


_TYPE_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true/false",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


def check_types(obj: Mapping[str, Any], required: Mapping[str, type | tuple[type, ...]], where: str) -> None:
    """Refuse missing keys and values of the wrong JSON type, naming `where` and the key."""
    missing = [k for k in required if k not in obj]
    if missing:
        raise FileFormatError(f"{where} lacks {', '.join(repr(k) for k in missing)}")
    for key, types in required.items():
        types = types if isinstance(types, tuple) else (types,)
        value = obj[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            want = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise FileFormatError(f"{where}: {key!r} must be {want}, found {json.dumps(value)[:60]}")


def check_str_list(obj: Mapping[str, Any], key: str, where: str) -> None:
    value = obj.get(key)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FileFormatError(f"{where}: {key!r} must be a list of strings, found {json.dumps(value)[:60]}")


def read_tensors(path: str | Path, what: str, required: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, refusing a truncated or garbage file and missing tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{what} {path} not found")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FileFormatError(
            f"{what} {path} is not a readable safetensors file ({exc}); it may be truncated: restore or recompute it"
        ) from exc
    lacking = [k for k in required if k not in tensors]
    if lacking:
        raise FileFormatError(f"{what} {path} lacks tensor(s) {lacking} (found {sorted(tensors)})")
    return tensors


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_HUB_STATE: dict[str, str | None] = {}


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached now (one short line), or None when it can.

    Answers within `timeout` seconds (a TCP connection to the hub's endpoint), so
    an offline machine hears "offline" at once instead of after ~30 s of retries.
    The answer is kept for the rest of the process.
    """
    if "answer" in _HUB_STATE:
        return _HUB_STATE["answer"]
    import socket
    import threading
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        answer: str | None = "HF_HUB_OFFLINE is set"
    else:
        from huggingface_hub import constants

        url = urlparse(constants.ENDPOINT)
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        result: dict[str, Any] = {}

        def probe():
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                result["ok"] = True
            except OSError as exc:
                result["error"] = exc

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout + 1)  # name resolution ignores the socket timeout
        if result.get("ok"):
            answer = None
        else:
            why = result.get("error")
            answer = f"the Hugging Face hub ({host}) cannot be reached: " + (
                (getattr(why, "strerror", None) or str(why)) if why else f"no answer within {timeout:g} s"
            )
    _HUB_STATE["answer"] = answer
    return answer


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):  # keys keep their types (optimizer states are keyed by int)
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__tuple__" if isinstance(obj, tuple) else "__list__": [_encode(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__list__" in obj:
            return [_decode(v, tensors) for v in obj["__list__"]]
        raise FileFormatError(f"unknown entry {sorted(obj)} in a state file")
    return obj


def save_state(path: str | Path, obj: Any) -> None:
    """Write nested dicts/lists of tensors and plain values (optimizer states, counters) without pickle.

    One safetensors file: the tensors, and the structure as JSON in its metadata;
    written to a temporary file and renamed, so a crash never leaves half a state.
    """

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, tensors)
    atomic_tensors(path, tensors, metadata={"tl_skill_state": json.dumps(structure)})


def load_state(path: str | Path, what: str = "state file", device: str | torch.device = "cpu") -> Any:
    """Read back what `save_state` wrote (no code is executed: tensors and JSON only)."""
    from safetensors import safe_open

    tensors = read_tensors(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        structure = json.loads(meta["tl_skill_state"])
        return _decode(structure, {k: v.to(device) for k, v in tensors.items()})
    except (KeyError, json.JSONDecodeError, TypeError) as exc:
        raise FileFormatError(f"{what} {path} does not hold a tl_skill state ({exc})") from exc
