"""Files for llama.cpp, Ollama and LM Studio: control vectors, and edited copies of GGUF models.

Written with the `gguf` package (the reference reader and writer of the format).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .arch import Layout
from .errors import AbliterateError

CONTROL_VECTOR_ARCH = "controlvector"


def _tmp_next_to(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _finish(writer, tmp: Path, path: Path) -> Path:
    """Write everything the GGUF writer holds to `tmp`, then move it onto `path` (nothing half-written)."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=True)
        writer.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def control_vector_layer(layer: int, n_layers: int) -> int:
    """The control-vector index llama.cpp uses for an addition entering our `layer`.

    llama.cpp adds vector N to the output of block N (Hugging Face's hidden_states[N + 1]),
    which is the input of block N + 1. Its control-vector buffer starts at block 1
    (llama_set_adapter_cvec: "an n_embd x n_layers buffer starting from layer 1"), so our
    layers 2 .. n_layers - 1 can be expressed, as N = layer - 1.
    """
    if not 2 <= layer < n_layers:
        raise AbliterateError(
            f"layer {layer} cannot be a llama.cpp control vector: llama.cpp adds vectors after blocks "
            f"1..{n_layers - 1}, which are the inputs of layers 2..{n_layers - 1}. Steer at layer 2 or later"
        )
    return layer - 1


def write_control_vector(path: str | Path, vectors: dict[int, torch.Tensor], layout: Layout) -> Path:
    """Write `vectors` (our layer -> vector added at that layer's input) as a llama.cpp control vector GGUF.

    At scale 1 (`--control-vector FILE`), llama.cpp then adds exactly what `steer.steered`
    adds; `--control-vector-scaled FILE -1` subtracts it.
    """
    import gguf

    path = Path(path)
    if path.suffix != ".gguf":
        raise AbliterateError(f"control vector path {path} should end in .gguf")
    if layout.spec.gguf_arch is None:
        raise AbliterateError("this architecture has no llama.cpp name in arch.py (ArchSpec.gguf_arch); set it "
                              "with --arch-spec")
    index = {control_vector_layer(layer, layout.n_layers): v for layer, v in vectors.items()}
    for n, v in index.items():
        if v.shape != (layout.hidden_size,) or not torch.isfinite(v).all():
            raise AbliterateError(f"control vector for block {n} must be {layout.hidden_size} finite numbers")
    tmp = _tmp_next_to(path)
    writer = gguf.GGUFWriter(tmp, CONTROL_VECTOR_ARCH)
    writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", layout.spec.gguf_arch)
    writer.add_uint32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(index))
    for n in sorted(index):
        writer.add_tensor(f"direction.{n}", index[n].detach().float().cpu().numpy().astype(np.float32))
    return _finish(writer, tmp, path)


def read_control_vector(path: str | Path) -> tuple[str, dict[int, torch.Tensor]]:
    """(model hint, {our layer: vector}) from a llama.cpp control vector, ours or anyone's."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # not GGUF, truncated
        raise AbliterateError(f"{path} is not a readable GGUF file ({e})") from e
    arch = reader.fields.get("general.architecture")
    if arch is None or bytes(arch.parts[-1]).decode() != CONTROL_VECTOR_ARCH:
        raise AbliterateError(f"{path} is a GGUF file but not a control vector (general.architecture)")
    hint = reader.fields.get(f"{CONTROL_VECTOR_ARCH}.model_hint")
    out = {}
    for t in reader.tensors:
        if t.name.startswith("direction."):
            out[int(t.name.split(".")[1]) + 1] = torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(-1)
    return (bytes(hint.parts[-1]).decode() if hint else ""), out


# Types the `gguf` package quantizes itself; the others go through ggml (llama-cpp-python), if present.
def _python_quantizable() -> set:
    from gguf import GGMLQuantizationType as T

    return {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}


def quantize(values: np.ndarray, qtype) -> np.ndarray:
    """`values` (float32, rows x row length) in GGUF type `qtype`: the gguf package, else ggml through ctypes."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    if qtype == T.F32:
        return values.astype(np.float32)
    if qtype == T.F16:
        return values.astype(np.float16)
    if qtype in _python_quantizable():
        return quants.quantize(values, qtype)
    from . import ggml

    return ggml.quantize(values, qtype)


def writable_types() -> list[str]:
    from gguf import GGMLQuantizationType as T

    from . import ggml

    names = {t.name for t in _python_quantizable()}
    if ggml.available():
        names |= {t.name for t in T if ggml.can_quantize(t)}
    return sorted(names)


def _contents(field):
    import gguf

    return field.contents() if field.types[0] != gguf.GGUFValueType.ARRAY or len(field.types) > 1 else []


def check_gguf_output(out: str | Path, source: Path, force: bool) -> Path:
    out = Path(out).expanduser().resolve()
    if out == source.resolve():
        raise AbliterateError(f"output {out} is the input model file; choose another output path")
    if out.exists() and not force:
        raise AbliterateError(f"output {out} exists; pass --force to replace it")
    if out.is_dir():
        raise AbliterateError(f"output {out} is a directory; give a file name ending in .gguf")
    return out


def gguf_names(layout: Layout, arch: str, edited: list[str]) -> dict[str, str]:
    """Hugging Face parameter name -> GGUF tensor name, for every edited parameter (the gguf package's map)."""
    import gguf

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
    import gguf

    out = check_gguf_output(out, source, force)
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

    tmp = _tmp_next_to(out)
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
    _finish(writer, tmp, out)
    summary["path"] = str(out)
    return summary


def _can_write(qtype) -> bool:
    from . import ggml

    return qtype in _python_quantizable() or ggml.can_quantize(qtype)


# End-of-turn markers of the common chat templates; those the model knows become Ollama stop parameters.
_STOPS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>", "<|end_of_text|>")


def write_modelfile(gguf_path: Path, tokenizer) -> Path:
    """An Ollama Modelfile next to `gguf_path` (NAME.Modelfile).

    No TEMPLATE line: Ollama takes the chat template from the GGUF's own
    `tokenizer.chat_template`, which we copied unchanged; stops are the template's
    end-of-turn tokens that this vocabulary has.
    """
    vocab = tokenizer.get_vocab()
    template = getattr(tokenizer, "chat_template", None) or ""
    stops = [s for s in _STOPS if s in vocab and (s in template or s == tokenizer.eos_token)]
    name = gguf_path.stem
    lines = [f"# Written by abliterate. Create the Ollama model with:  ollama create {name} -f {name}.Modelfile",
             "# The chat template is the GGUF file's own (tokenizer.chat_template), read by Ollama.",
             f"FROM ./{gguf_path.name}"]
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    path = gguf_path.with_name(f"{name}.Modelfile")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_lora_gguf(path: str | Path, layout: Layout, direction, base: str, force: bool = False) -> Path:
    """The edit as a llama.cpp LoRA adapter GGUF (`llama-cli -m model.gguf --lora NAME.gguf`).

    Rank one per writer, alpha 1 (scale 1), F32. For each matrix, `lora_a` holds u^T W
    (ggml shape [in, 1]) and `lora_b` holds -u ([1, out]). llama.cpp applies a
    `token_embd` LoRA to the looked-up rows with A and B flipped: there `lora_a` is
    E r ([1, vocab]) and `lora_b` is -r ([1, hidden]).
    """
    import gguf

    from .adapters import lora_factors

    path = Path(path)
    if path.exists() and not force:
        raise AbliterateError(f"output {path} exists; pass --force to replace it")
    if layout.spec.gguf_arch is None:
        raise AbliterateError("this architecture has no llama.cpp name (ArchSpec.gguf_arch); set it with --arch-spec")
    factors = lora_factors(layout, direction)
    names = gguf_names(layout, layout.spec.gguf_arch, [f"{name}.weight" for name in factors])
    tmp = _tmp_next_to(path)
    writer = gguf.GGUFWriter(tmp, layout.spec.gguf_arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("general.name", f"abliterate {base}")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 1.0)
    for name, (kind, a, b) in factors.items():
        target = names[f"{name}.weight"]
        if kind == "embedding":
            a, b = a.T, b  # (vocab, 1) and (hidden, 1): flipped, as llama.cpp reads token_embd LoRA
        writer.add_tensor(f"{target}.lora_a", a.contiguous().numpy().astype(np.float32))
        writer.add_tensor(f"{target}.lora_b", b.contiguous().numpy().astype(np.float32))
    return _finish(writer, tmp, path)
