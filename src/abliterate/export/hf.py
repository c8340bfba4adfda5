"""Write results where people use models: a Hugging Face directory, atomically, with a manifest."""

from __future__ import annotations

from pathlib import Path

from transformers.utils.hub import convert_file_size_to_int

from ..errors import AbliterateError
from ..model.load import Loaded
from .files import MANIFEST, check_output, to_json, write_dir_atomic


def check_size(text: str) -> int:
    """A shard size as transformers reads it ('2GB', '500MB'), or an error naming the value."""
    try:
        size = convert_file_size_to_int(text)
    except (ValueError, TypeError) as e:
        raise AbliterateError(f"--shard-size {text!r} is not a size; write a number and a unit, e.g. 2GB or 500MB") from e
    if size <= 0:
        raise AbliterateError(f"--shard-size {text!r} must be more than 0 bytes, e.g. 2GB")
    return size


def save_model(loaded: Loaded, out: str | Path, *, manifest: dict, extra=None, shard_size: str,
               force: bool = False) -> Path:
    """Save model, tokenizer (with chat template), generation config and `manifest.json` to `out`.

    `extra(tmp_dir)` may add files (the direction, metrics) inside the same atomic write.
    """
    out = check_output(out, inputs=loaded.inputs, force=force)

    def fill(tmp: Path) -> None:
        loaded.model.save_pretrained(tmp, max_shard_size=shard_size)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(to_json(manifest))
        if extra is not None:
            extra(tmp)

    return write_dir_atomic(out, fill, force)
