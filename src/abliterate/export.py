"""Write results where people use models: a Hugging Face directory, atomically, with a manifest."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from .errors import AbliterateError
from .models import Loaded


def check_output(out: str | Path, loaded_dir: Path | None, gguf_file: Path | None = None, force: bool = False) -> Path:
    """Refuse outputs that would touch the input model or clobber a directory. Call before long work."""
    out = Path(out).expanduser().resolve()
    if gguf_file is not None and out == gguf_file:
        raise AbliterateError(f"output {out} is the input model file; choose another output path")
    if loaded_dir is not None and gguf_file is None and (out == loaded_dir or loaded_dir in out.parents):
        raise AbliterateError(f"output {out} is inside the input model directory {loaded_dir}; choose another path")
    if loaded_dir is not None and gguf_file is None and out in loaded_dir.parents:
        raise AbliterateError(f"output {out} contains the input model directory {loaded_dir}; choose another path")
    if out.exists() and not out.is_dir():
        raise AbliterateError(f"output {out} exists and is not a directory; remove it or choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AbliterateError(f"output directory {out} is not empty; pass --force to replace it")
    return out


def versions() -> dict:
    import transformers

    from . import __version__

    return {"abliterate": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


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


def save_model(loaded: Loaded, out: str | Path, *, manifest: dict, extra=None, shard_size: str = "2GB",
               force: bool = False) -> Path:
    """Save model, tokenizer (with chat template), generation config and `manifest.json` to `out`.

    `extra(tmp_dir)` may add files (the direction, metrics) inside the same atomic write.
    """
    out = check_output(out, loaded.local_dir, loaded.gguf_file, force)

    def fill(tmp: Path) -> None:
        loaded.model.save_pretrained(tmp, max_shard_size=shard_size)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        if extra is not None:
            extra(tmp)

    return write_dir_atomic(out, fill, force)
