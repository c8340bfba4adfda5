"""Every file abliterate writes: its name, the one check of where it may go, the one atomic write, and manifests.

An output is built under a temporary name next to its destination and renamed into place
when complete, so a crash or a kill leaves the previous output (or nothing), never half of one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers

from .. import __version__
from ..errors import AbliterateError

# Inside an output directory; beside a GGUF output as NAME.<file> (see `companion`).
MANIFEST = "manifest.json"
DIRECTION = "direction.safetensors"
ABLATION = "ablation.safetensors"
METRICS = "metrics.json"
GENERATIONS = "generations.json"
REPORT = "report.html"
CONTROL_VECTOR = "control_vector.gguf"
MODELFILE = "Modelfile"  # NAME.Modelfile beside NAME.gguf
STUDY = ".study"  # a search's journal: OUTPUT.study beside the output


def finalist_file(number: int) -> str:
    """Where a searched run keeps a finalist's edit, relative to its manifest."""
    return f"finalists/trial-{number}.{ABLATION}"


def companion(gguf: str | Path, name: str) -> Path:
    """NAME.<name> beside NAME.gguf: a GGUF output's direction, manifest, report, Modelfile."""
    gguf = Path(gguf)
    return gguf.with_name(f"{gguf.stem}.{name}")


def check_output(out: str | Path, *, inputs: tuple[Path, ...] = (), force: bool = False,
                 kind: str = "dir") -> Path:
    """The one rule for a path abliterate will write; call it before long work. Returns the resolved path.

    Never the input itself, inside an input directory, or a folder that contains an input;
    a directory output (`kind="dir"`) must be empty or missing, a file output must not
    exist, unless `force`.
    """
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if out == src:
            raise AbliterateError(f"output {out} is the input model itself; choose another output path")
        if src.is_dir() and src in out.parents:
            raise AbliterateError(f"output {out} is inside the input model directory {src}; choose another path")
        if out in src.parents and (kind == "dir" or out.is_dir()):
            raise AbliterateError(f"output {out} contains the input model {src}; choose another path")
    if kind == "dir":
        if out.exists() and not out.is_dir():
            raise AbliterateError(f"output {out} exists and is not a directory; remove it or choose another path")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise AbliterateError(f"output directory {out} is not empty; pass --force to replace it")
    else:
        if out.is_dir():
            raise AbliterateError(f"output {out} is a directory; give a file name")
        if out.exists() and not force:
            raise AbliterateError(f"output {out} exists; pass --force to replace it")
    return out


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` if the block completes, else it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_file(path: str | Path, data: bytes | str) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")
    return Path(path)


def write_dir_atomic(out: Path, fill, force: bool = False) -> Path:
    """Build a directory with `fill(tmp_dir)` next to `out`, then move it into place.

    A crash leaves the old output (or nothing), never a half-written one.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary directory
    try:
        fill(tmp)
        if out.exists():
            if not force and any(out.iterdir()):
                raise AbliterateError(f"output directory {out} is not empty; pass --force to replace it")
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------- manifests


def versions() -> dict:
    return {"abliterate": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def manifest(kind: str, model: str, **fields) -> dict:
    """A manifest: what made this output (`kind`: abliterate.run, .apply, .induce, .steer, .adapter), from what
    model, the command's own facts, and the versions of the tools."""
    return {"kind": f"abliterate.{kind}", "model": model, **fields, "versions": versions()}


def to_json(data) -> str:
    return json.dumps(data, indent=2, default=str)


def read_manifest(path: Path, kinds: tuple[str, ...]) -> dict:
    """A manifest of one of `kinds` (e.g. ("run", "apply")), or an error naming what the file is."""
    try:
        data = json.loads(path.read_text())
        kind = data["kind"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AbliterateError(f"{path} is not an abliterate manifest ({e}); give the manifest.json of a run") from e
    if kind not in tuple(f"abliterate.{k}" for k in kinds):
        raise AbliterateError(f"{path} is a {kind} manifest; this takes the manifest of "
                              f"{' or '.join(f'`{k}`' for k in kinds)}")
    return data
