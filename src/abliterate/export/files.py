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
from safetensors import safe_open
from safetensors.torch import save_file

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
    if kind == "file" and not out.parent.is_dir():
        raise AbliterateError(f"cannot write {out}: the folder {out.parent} does not exist; create it first")
    _check_writable(out)
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


def _check_writable(out: Path) -> None:
    """Create (and remove) a temporary file where `out` will be built, so that a read-only place fails now,
    not after the work: permission bits alone do not tell (root ignores them, a read-only mount does not)."""
    folder = out.parent
    while not folder.exists():
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise AbliterateError(f"cannot write {out}: {folder} is not writable ({e.strerror}); choose another path") from e


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


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> Path:
    """An abliterate safetensors file (a direction, an ablation): tensors, and metadata values as JSON text."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in meta.items()})
    return path


# safetensors' dtype names (its format's header), for the torch dtypes a checkpoint may hold
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint64: "U64",
               torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8", torch.bool: "BOOL",
               torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}
# the order in which `save_file` lays tensors out, by dtype (its Rust enum's, last first), then by name
_LAYOUT = ["U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8",
           "BOOL"]


class TensorFileWriter:
    """One safetensors file written tensor by tensor, so that no more than one block of it is ever in memory.

    safetensors writes a file from a dict of every tensor in memory, and has no incremental writer: its header
    (every tensor's dtype, shape and byte range) comes before the data (safetensors/safetensors#291). Here all of
    that is known before any data is made (`entries`), so the header is written first, as `save_file` lays it
    out (the JSON padded with spaces to a multiple of 8 bytes; tensors by dtype, the largest first, then by
    name, so each starts aligned), and then each tensor's bytes, in `order`, in as many pieces as the caller
    likes. `close` checks that every byte was written; the file is then read back by safetensors' own check
    by whoever wrote it (`check_safetensors`)."""

    def __init__(self, path: Path, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        self.entries = entries
        self.order = sorted(entries, key=lambda n: (_LAYOUT.index(DTYPE_NAMES[entries[n][0]]), n))
        header: dict[str, object] = {"__metadata__": metadata}
        start = 0
        self.sizes: dict[str, int] = {}
        for name in self.order:
            dtype, shape = entries[name]
            self.sizes[name] = dtype.itemsize * int(torch.Size(shape).numel())
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [start, start + self.sizes[name]]}
            start += self.sizes[name]
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(path, "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self._next, self._left = 0, None
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._next < len(self.order) and not self.sizes[self.order[self._next]]:
            self._next += 1  # a tensor with no elements has no bytes to wait for

    def write(self, name: str, piece: torch.Tensor) -> None:
        """The next bytes of tensor `name`: `piece`, rows of it in order (all of it, for a 0-d tensor)."""
        if not self.sizes.get(name, 1):
            return
        if self._left is None:  # `name` starts
            assert name == self.order[self._next], f"{name} written before {self.order[self._next]}"
            self._left = self.sizes[name]
        assert name == self.order[self._next] and piece.dtype == self.entries[name][0], (name, piece.dtype)
        data = piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        assert len(data) <= self._left, f"{name}: more bytes than its shape holds"
        self.file.write(memoryview(data))
        self._left -= len(data)
        if not self._left:
            self._next, self._left = self._next + 1, None
            self._skip_empty()

    def close(self) -> None:
        self.file.close()
        missing = self.order[self._next:]
        assert not missing, f"not written: {missing[:3]}"

    def __enter__(self) -> TensorFileWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self.file.close()


def load_tensors(path: str | Path, key: str, names: tuple[str, ...], what: str) -> tuple[object, dict, dict]:
    """(the JSON value of metadata `key`, the tensors `names`, all metadata) of a file `save_tensors` wrote, or an
    error naming the file as not an abliterate `what` file."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            return json.loads(meta[key]), {k: f.get_tensor(k) for k in names}, meta
    except Exception as e:  # missing file, not safetensors, no metadata, a missing tensor: one message
        raise AbliterateError(f"{path} is not an abliterate {what} file ({e})") from e


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
