"""Files for llama.cpp and Ollama beside a model: control vectors, LoRA adapters as GGUF, Modelfiles."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import AbliterateError
from ..model.arch import Layout
from .files import atomic_path, write_file
from .gguf_copy import flush, gguf_names
from .peft import lora_factors

CONTROL_VECTOR_ARCH = "controlvector"


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
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, CONTROL_VECTOR_ARCH)
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", layout.spec.gguf_arch)
        writer.add_uint32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(index))
        for n in sorted(index):
            writer.add_tensor(f"direction.{n}", index[n].detach().float().cpu().numpy().astype(np.float32))
        flush(writer)
    return path


def read_control_vector(path: str | Path) -> tuple[str, dict[int, torch.Tensor]]:
    """(model hint, {our layer: vector}) from a llama.cpp control vector, ours or anyone's."""

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
    write_file(path, "\n".join(lines) + "\n")
    return path


def write_lora_gguf(path: str | Path, layout: Layout, direction, base: str, force: bool = False) -> Path:
    """The edit as a llama.cpp LoRA adapter GGUF (`llama-cli -m model.gguf --lora NAME.gguf`).

    Rank one per writer, alpha 1 (scale 1), F32. For each matrix, `lora_a` holds u^T W
    (ggml shape [in, 1]) and `lora_b` holds -u ([1, out]). llama.cpp applies a
    `token_embd` LoRA to the looked-up rows with A and B flipped: there `lora_a` is
    E r ([1, vocab]) and `lora_b` is -r ([1, hidden]).
    """


    path = Path(path)
    if path.exists() and not force:
        raise AbliterateError(f"output {path} exists; pass --force to replace it")
    if layout.spec.gguf_arch is None:
        raise AbliterateError("this architecture has no llama.cpp name (ArchSpec.gguf_arch); set it with --arch-spec")
    factors = lora_factors(layout, direction)
    names = gguf_names(layout, layout.spec.gguf_arch, [f"{name}.weight" for name in factors])
    with atomic_path(path) as tmp:
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
        flush(writer)
    return path
