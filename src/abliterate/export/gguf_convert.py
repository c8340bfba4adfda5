"""A Hugging Face model (ours, edited, or anyone's) as a new GGUF file: weights, hyperparameters and tokenizer.

For the families llama.cpp runs as `llama` (Llama, Mistral), `qwen2`, `qwen3`, `gemma2`
and `gemma3` (text, or the language model of image-text Gemma 3). Written with the `gguf`
package; the facts of the layout are the format's, stated where they are used:

- tensor names come from the gguf package's own map of Hugging Face names;
- llama.cpp's `llama` rotates query/key pairs that are adjacent (GPT-J style), while
  Hugging Face's Llama rotates the two halves of each head, so Q and K rows (and
  their biases) are reordered per head; the NeoX-style families are not;
- Gemma's RMSNorm scales by 1 + w, and GGUF stores 1 + w;
- a tied output head is left out: llama.cpp falls back to `token_embd`;
- the tokenizer is the one transformers actually runs: byte-level BPE (tokens,
  merges and the pre-tokenizer's name) or SentencePiece-style (tokens, scores, types).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import AbliterateError
from ..model.arch import SPECS, resolve
from .files import atomic_path
from .gguf_copy import flush, gguf_names, quantize, writable_types

# The model types this writer knows; their llama.cpp names are arch.py's ArchSpec.gguf_arch.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3")
_GEMMA = {"gemma2", "gemma3"}

# Pre-tokenizer regular expressions as Hugging Face tokenizers write them, and the name
# llama.cpp gives the same splitting (`tokenizer.ggml.pre`).
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_QWEN2_RE: "qwen2", _LLAMA3_RE: "llama-bpe", _GPT2_RE: "gpt-2"}

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, or an error naming what we saw."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex in _SPLIT_PRE:
            return _SPLIT_PRE[regex]
    raise AbliterateError(
        f"this tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one abliterate can name for llama.cpp "
        f"(known: GPT-2, SmolLM, Qwen2, Llama 3). Write the model as a Hugging Face directory and convert it with "
        f"llama.cpp's convert_hf_to_gguf.py")


def _added(tokenizer) -> dict[int, bool]:
    """id -> special, for the tokenizer's added tokens."""
    return {i: t.special for i, t in tokenizer.added_tokens_decoder.items()}


def tokenizer_fields(tokenizer, n_vocab: int) -> dict:
    """Everything llama.cpp needs to tokenize as `tokenizer` does, as GGUF key -> value."""
    state = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else None
    if state is None:
        raise AbliterateError("writing a GGUF needs a fast (tokenizers) tokenizer; this model has "
                              f"{type(tokenizer).__name__}")
    model = state["model"]
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab:
        raise AbliterateError(f"the tokenizer has {len(vocab)} tokens but the embedding only {n_vocab} rows")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i], types[i] = text, NORMAL
    added = _added(tokenizer)
    for i, special in added.items():
        types[i] = CONTROL if special else USER_DEFINED
    out = {"tokenizer.ggml.tokens": tokens}
    byte_level = "ByteLevel" in json.dumps(state.get("pre_tokenizer")) or "ByteLevel" in json.dumps(state["decoder"])
    if model["type"] == "BPE" and byte_level:
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        out |= {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_name(state.get("pre_tokenizer")),
                "tokenizer.ggml.merges": merges}
    elif model["type"] in ("BPE", "Unigram") and model.get("byte_fallback"):
        # SentencePiece-style: llama.cpp merges by score, highest first; BPE vocabularies
        # from SentencePiece are in merge order, so score = -(id - first normal id), as
        # SentencePiece's own GGUF conversions have it; control tokens -1000, bytes 0.
        scores = [-1000.0] * n_vocab
        if model["type"] == "Unigram":
            for i, (_, score) in enumerate(model["vocab"]):
                scores[i] = float(score)
        first = None
        for i in range(n_vocab):
            if types[i] == NORMAL and tokens[i].startswith("<0x") and len(tokens[i]) == 6:
                types[i], scores[i] = BYTE, 0.0
            elif types[i] == NORMAL and model["type"] == "BPE":
                first = i if first is None else first
                scores[i] = -float(i - first)
        probe = tokenizer.tokenize("Hello")
        out |= {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.add_space_prefix": bool(probe) and probe[0].startswith("\u2581")}
    else:
        raise AbliterateError(f"tokenizer model {model['type']} (byte fallback {model.get('byte_fallback')}) is "
                              f"neither byte-level BPE nor SentencePiece-style; llama.cpp's converter is needed")
    out["tokenizer.ggml.token_type"] = types
    probe = tokenizer("a")["input_ids"]
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        i = getattr(tokenizer, f"{name}_token_id", None)
        if i is not None:
            out[f"tokenizer.ggml.{key}_token_id"] = int(i)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    out["tokenizer.ggml.add_bos_token"] = bos is not None and probe[:1] == [bos]
    out["tokenizer.ggml.add_eos_token"] = eos is not None and len(probe) > 1 and probe[-1] == eos
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        out["tokenizer.chat_template"] = template
    return out


def _rope_theta(config, kind: str = "full_attention") -> float | None:
    rope = getattr(config, "rope_parameters", None) or {}
    rope = rope.get(kind, rope)
    return rope.get("rope_theta", getattr(config, "rope_theta", None))


def _rope_fields(config, arch: str) -> tuple[dict, np.ndarray | None]:
    """Rope keys, and for Llama 3.1-style scaling the per-frequency factors llama.cpp reads from `rope_freqs`."""
    rope = getattr(config, "rope_parameters", None) or {}
    if arch == "gemma3":
        out = {"rope.freq_base": _rope_theta(config), "rope.freq_base_swa": _rope_theta(config, "sliding_attention")}
        rope = rope.get("full_attention", {})
    else:
        out = {"rope.freq_base": _rope_theta(config)}
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return out, None
    if kind == "linear":
        return out | {"rope.scaling.type": "linear", "rope.scaling.factor": float(rope["factor"])}, None
    if kind == "yarn":
        return out | {"rope.scaling.type": "yarn", "rope.scaling.factor": float(rope["factor"]),
                      "rope.scaling.original_context_length": int(rope["original_max_position_embeddings"])}, None
    if kind == "llama3":
        # Llama 3.1's frequency-dependent scaling: long wavelengths divided by `factor`, short ones
        # kept, a smooth blend between; llama.cpp multiplies each wavelength by rope_freqs[i].
        dim = _head_dim(config)
        base = _rope_theta(config)
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        factors = []
        for i in range(0, dim, 2):
            wavelen = 2 * math.pi * base ** (i / dim)
            if wavelen < old / high:
                factors.append(1.0)
            elif wavelen > old / low:
                factors.append(float(rope["factor"]))
            else:
                smooth = (old / wavelen - low) / (high - low)
                factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
        return out, np.array(factors, dtype=np.float32)
    raise AbliterateError(f"rope scaling {kind!r} has no GGUF form in abliterate; use llama.cpp's converter")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def hparams(config, arch: str) -> tuple[dict, np.ndarray | None]:
    """`arch.*` keys (without the prefix) for a text config, and the rope_freqs tensor if any."""
    kv = {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
          "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
          "attention.head_count": config.num_attention_heads,
          "attention.head_count_kv": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
          "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
          "attention.key_length": _head_dim(config), "attention.value_length": _head_dim(config)}
    if arch == "llama":
        kv |= {"vocab_size": config.vocab_size, "rope.dimension_count": _head_dim(config)}
    if arch in _GEMMA:
        kv["attention.sliding_window"] = config.sliding_window
    if arch == "gemma2":
        kv |= {"attn_logit_softcapping": float(config.attn_logit_softcapping),
               "final_logit_softcapping": float(config.final_logit_softcapping)}
    if arch == "gemma3" and getattr(config, "final_logit_softcapping", None):
        kv["final_logit_softcapping"] = float(config.final_logit_softcapping)
    rope, freqs = _rope_fields(config, arch)
    return kv | {k: v for k, v in rope.items() if v is not None}, freqs


def _rotate_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a Q or K projection from halves-per-head order (Hugging Face) to adjacent pairs (llama.cpp)."""
    head = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _tensor_type(value: np.ndarray, qtype, gguf):
    """The type a tensor is written in: 1-D tensors and the rope factors stay F32; others `qtype` if it fits."""
    T = gguf.GGMLQuantizationType
    if value.ndim < 2 or qtype in (T.F32, T.F16, T.BF16):
        return T.F32 if value.ndim < 2 else qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if value.shape[-1] % block == 0 else T.F16  # rows that do not fill whole blocks


def check_convertible(model: torch.nn.Module) -> str:
    """The llama.cpp architecture a model is written as, or an error naming the supported ones."""

    mtype = getattr(model.config, "model_type", "")
    if mtype not in SUPPORTED:
        raise AbliterateError(f"writing {mtype or type(model).__name__} as GGUF is not supported; supported model "
                              f"types: {', '.join(SUPPORTED)}. Save a Hugging Face directory instead (-o DIR)")
    return SPECS[mtype].gguf_arch


def write_gguf(model: torch.nn.Module, tokenizer, out: str | Path, *, qtype: str, name: str | None = None,
               force: bool = False) -> dict:
    """Write `model` and `tokenizer` as one GGUF file at `out` (atomically). Returns a summary."""


    arch = check_convertible(model)
    out = Path(out).expanduser().resolve()
    if out.suffix != ".gguf":
        raise AbliterateError(f"GGUF output {out} should end in .gguf")
    if out.exists() and not force:
        raise AbliterateError(f"output {out} exists; pass --force to replace it")
    try:
        wanted = gguf.GGMLQuantizationType[qtype.upper()]
    except KeyError:
        raise AbliterateError(f"unknown GGUF type {qtype!r}; writable here: {writable_types()}") from None
    if wanted.name not in writable_types():
        raise AbliterateError(f"GGUF type {wanted.name} cannot be written here; writable: {writable_types()}")
    layout = resolve(model)
    params = {n: p for n, p in model.state_dict().items() if "rotary_emb" not in n}
    config = model.config.get_text_config()
    if model.config.model_type == "gemma3":
        # Image-text Gemma 3: the language model alone, as llama.cpp takes it (the vision tower
        # and projector go into a separate mmproj file, which this writer does not make).
        prefix = "model.language_model."
        params = {"model." + n.removeprefix(prefix): p for n, p in params.items() if n.startswith(prefix)} | (
            {"lm_head.weight": params["lm_head.weight"]} if "lm_head.weight" in params else {})
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        params.pop("lm_head.weight", None)  # tied: llama.cpp reads token_embd for the output
    names = gguf_names(layout, arch, list(params))
    kv, rope_freqs = hparams(config, arch)
    n_heads, n_kv = kv["attention.head_count"], kv["attention.head_count_kv"]
    fields = tokenizer_fields(tokenizer, params["model.embed_tokens.weight"].shape[0])

    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name or getattr(config, "_name_or_path", "") or "model")
        for key, value in kv.items():
            _add(writer, f"{arch}.{key}", value, gguf)
        for key, value in fields.items():
            _add(writer, key, value, gguf)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{wanted.name}", None) or getattr(gguf.LlamaFileType, "ALL_F32")
        writer.add_file_type(file_type)
        summary = {"arch": arch, "types": {}}
        if rope_freqs is not None:
            writer.add_tensor("rope_freqs.weight", rope_freqs)
            summary["types"]["rope_freqs.weight"] = "F32"
        for hf_name, value in tqdm(params.items(), desc="GGUF tensors", leave=False, unit="tensor"):
            value = value.detach().float().cpu()
            target = names[hf_name]
            if arch == "llama" and ".self_attn.q_proj." in hf_name:
                value = _rotate_pairs(value, n_heads)
            elif arch == "llama" and ".self_attn.k_proj." in hf_name:
                value = _rotate_pairs(value, n_kv)
            if layout.spec.norm_offset and "norm" in hf_name and value.ndim == 1:
                value = value + layout.spec.norm_offset  # Gemma's RMSNorm scale is 1 + w; GGUF stores it whole
            data = value.numpy()
            t = _tensor_type(data, wanted, gguf)
            writer.add_tensor(target, quantize(np.ascontiguousarray(data.astype(np.float32)), t), raw_dtype=t)
            summary["types"][target] = t.name
        flush(writer)
    summary["path"] = str(out)
    return summary


def _add(writer, key: str, value, gguf) -> None:
    V = gguf.GGUFValueType
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif value and isinstance(value[0], str):
        writer.add_array(key, value)
    elif value and isinstance(value[0], float):
        writer.add_key_value(key, value, V.ARRAY, sub_type=V.FLOAT32)
    else:
        writer.add_key_value(key, value, V.ARRAY, sub_type=V.INT32)
