"""Load a model and its tokenizer from a hub id, a local directory or a GGUF file."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import AbliterateError

GGUF_MAGIC = b"GGUF"
# "owner/name" or "name": anything else that does not exist on disk is a missing path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class Loaded:
    """A model ready for abliterate: eval mode, gradients off, tokenizer padding on the left."""

    model: nn.Module
    tokenizer: object
    source: str  # what the user named
    local_dir: Path | None  # the directory the weights came from, if local
    gguf_file: Path | None = None

    @property
    def inputs(self) -> tuple[Path, ...]:
        """The user's files that no output may touch: the GGUF file, or the model directory."""
        return (self.gguf_file,) if self.gguf_file else (self.local_dir,) if self.local_dir else ()


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are slow or missing there); bf16 or fp16 on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype and dtype != "auto":
        try:
            value = getattr(torch, dtype)
        except AttributeError:
            value = None
        if not isinstance(value, torch.dtype):
            raise AbliterateError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
        return value
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def check_gguf(path: Path) -> None:
    """Fail early, in one line, on a file that is not a complete GGUF."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise AbliterateError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:

        reader = gguf.GGUFReader(str(path))
        for t in reader.tensors:  # the reader maps lazily: touch each tensor's end
            if t.data_offset + t.n_bytes > os.path.getsize(path):
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except AbliterateError:
        raise
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors, ...
        raise AbliterateError(f"{path} is a corrupt or truncated GGUF file ({e}); re-download or re-export it") from e


def _local_weights(path: Path) -> tuple[list[Path], list[Path]]:
    return sorted(path.glob("*.safetensors")), sorted(path.glob("*.bin"))


def load_model(
    source: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Loaded:
    """Load `source`: a Hugging Face id, a local model directory, or a `.gguf` file.

    GGUF weights are dequantized by transformers. Pickle (`.bin`) weights can run
    code when loaded, so they are refused unless `allow_pickle`.
    """

    source = str(source)
    path = Path(source).expanduser()
    dev = pick_device(device)
    torch_dtype = pick_dtype(dev, dtype)
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    gguf_file = None
    local_dir = None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise AbliterateError(
                f"{source} is a file but not a .gguf; pass a model directory, a hub id or a .gguf file"
            )
        check_gguf(path)
        gguf_file = path.resolve()
        local_dir = gguf_file.parent
        load_from, kwargs["gguf_file"] = str(local_dir), gguf_file.name
    elif path.is_dir():
        local_dir = path.resolve()
        if not (path / "config.json").is_file():
            raise AbliterateError(f"{source} has no config.json; it is not a Hugging Face model directory")
        safetensors, pickles = _local_weights(path)
        if not safetensors and not pickles:
            raise AbliterateError(
                f"{source} has no weights (*.safetensors); save the model there or point at the right directory"
            )
        if not safetensors and not allow_pickle:
            raise AbliterateError(
                f"{source} has only pickle weights (*.bin), which can run code when loaded; "
                f"convert them to safetensors or pass --allow-pickle if you trust the source"
            )
        load_from = str(path)
    elif not HUB_ID.fullmatch(source) or source.lower().endswith(".gguf"):
        raise AbliterateError(f"model path {source} does not exist")
    else:
        load_from = source
    if gguf_file is None:
        kwargs["use_safetensors"] = None if allow_pickle else True
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            load_from, trust_remote_code=trust_remote_code, gguf_file=kwargs.get("gguf_file")
        )
        model = AutoModelForCausalLM.from_pretrained(load_from, **kwargs)
    except AbliterateError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AbliterateError(f"could not load model {source}: {first}") from e
    if gguf_file is not None:
        # transformers marks GGUF-loaded models as quantized and refuses to save them;
        # the weights are already dequantized, so the marker is only in the way.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    model.to(dev).eval().requires_grad_(False)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Loaded(model, tokenizer, source, local_dir, gguf_file)
