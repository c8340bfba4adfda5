"""Files for llama.cpp, Ollama and LM Studio: control vectors, and edited copies of GGUF models.

Written with the `gguf` package (the reference reader and writer of the format).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, quants
from gguf import GGMLQuantizationType as T
from tqdm.auto import tqdm

from ..errors import AbliterateError
from ..model.arch import Layout
from . import ggml
from .files import atomic_path, check_output


def flush(writer) -> None:
    """Everything a gguf.GGUFWriter holds, written to its file: header, metadata, tensors."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


# Types the `gguf` package quantizes itself; the others go through ggml (llama-cpp-python), if present.
def _python_quantizable() -> set:

    return {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}


def quantize(values: np.ndarray, qtype) -> np.ndarray:
    """`values` (float32, rows x row length) in GGUF type `qtype`: the gguf package, else ggml through ctypes."""

    if qtype == T.F32:
        return values.astype(np.float32)
    if qtype == T.F16:
        return values.astype(np.float16)
    if qtype in _python_quantizable():
        return quants.quantize(values, qtype)

    return ggml.quantize(values, qtype)


def check_gguf_types(*names: str | None) -> None:
    """Each name is a GGUF tensor type (F16, Q8_0, Q4_K, ...), or None; else an error listing the writable ones."""
    for name in names:
        if name is not None and name.upper() not in GGMLQuantizationType.__members__:
            raise AbliterateError(f"unknown GGUF type {name!r}; writable here: {', '.join(writable_types())}")


def writable_types() -> list[str]:


    names = {t.name for t in _python_quantizable()}
    if ggml.available():
        names |= {t.name for t in T if ggml.can_quantize(t)}
    return sorted(names)


def _contents(field):

    return field.contents() if field.types[0] != gguf.GGUFValueType.ARRAY or len(field.types) > 1 else []


def gguf_names(layout: Layout, arch: str, edited: list[str]) -> dict[str, str]:
    """Hugging Face parameter name -> GGUF tensor name, for every edited parameter (the gguf package's map)."""

    try:
        arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    except StopIteration:
        raise AbliterateError(f"the gguf package does not know the architecture {arch!r}") from None
    names = gguf.get_tensor_name_map(arch_enum, layout.n_layers)
    out = {}
    for name in edited:
        base, _, suffix = name.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, suffix = name, ""
        mapped = names.get_name(base) or names.get_name(name)
        if mapped is None:
            raise AbliterateError(f"no GGUF tensor name for {name} ({arch}); this architecture cannot be written "
                                  f"back to GGUF yet")
        out[name] = f"{mapped}.{suffix or 'weight'}"
    return out


def write_edited_gguf(source: Path, out: str | Path, model: torch.nn.Module, layout: Layout, edited: list[str], *,
                      fallback_type: str | None = None, force: bool = False) -> dict:
    """Copy `source` to `out`, replacing only the tensors of `edited` parameters by the model's new values.

    Every metadata key and every other tensor is copied byte for byte (memory-mapped,
    tensor by tensor). Edited tensors are quantized back to their original type; where
    neither the gguf package nor ggml can write it, `fallback_type` is used or the
    write stops with the list of writable types. A tied output head (no `output.weight`)
    gets its own copy of the original embedding, so editing `token_embd` leaves the head
    alone as it does in the Hugging Face model. Returns a summary.
    """

    out = check_output(out, inputs=(source,), force=force, kind="file")
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    params = dict(model.named_parameters())
    by_gguf = {g: h for h, g in gguf_names(layout, arch, edited).items()}
    tensors = {t.name: t for t in reader.tensors}
    missing = sorted(set(by_gguf) - set(tensors))
    if missing:
        raise AbliterateError(f"{source} has no tensors {missing[:4]} that the edit changed; is it the same model?")
    fallback = None
    if fallback_type is not None:
        try:
            fallback = gguf.GGMLQuantizationType[fallback_type.upper()]
        except KeyError:
            raise AbliterateError(f"unknown GGUF type {fallback_type!r}; writable: {writable_types()}") from None

    # Decide every type before writing anything.
    plan = {}
    for name in by_gguf:
        qtype = tensors[name].tensor_type
        if not _can_write(qtype):
            if fallback is None or not _can_write(fallback):
                raise AbliterateError(
                    f"{name} is {qtype.name}, which neither the gguf package nor ggml (llama-cpp-python) can write "
                    f"here; install llama-cpp-python (pip install 'abliterate[llama]') or pass --gguf-fallback-type "
                    f"with one of {writable_types()}")
            qtype = fallback
        plan[name] = qtype

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, _contents(field), field.types[0], sub_type=sub)
        if "general.alignment" in reader.fields:
            writer.data_alignment = int(reader.fields["general.alignment"].contents())
        summary = {"edited": {}, "copied": 0, "added": []}
        tied_head = "token_embd.weight" in by_gguf and "output.weight" not in tensors
        for t in tqdm(reader.tensors, desc="GGUF tensors", leave=False, unit="tensor"):
            if t.name in by_gguf:
                value = params[by_gguf[t.name]].detach().float().cpu().numpy()
                expected = tuple(int(x) for x in reversed(t.shape))
                if value.shape != expected and value.ndim == 2 and value.T.shape == expected:
                    value = value.T  # Conv1D (GPT-2) stores (in, out); GGUF rows are outputs
                if value.shape != expected:
                    raise AbliterateError(f"{t.name}: the edited tensor has shape {value.shape}, the file {expected}")
                data = quantize(np.ascontiguousarray(value), plan[t.name])
                writer.add_tensor(t.name, data, raw_dtype=plan[t.name])
                summary["edited"][t.name] = plan[t.name].name
            else:
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
                summary["copied"] += 1
            if tied_head and t.name == "token_embd.weight":
                writer.add_tensor("output.weight", tensors["token_embd.weight"].data,
                                  raw_dtype=tensors["token_embd.weight"].tensor_type)
                summary["added"].append("output.weight")
        flush(writer)
    summary["path"] = str(out)
    return summary


def _can_write(qtype) -> bool:

    return qtype in _python_quantizable() or ggml.can_quantize(qtype)
