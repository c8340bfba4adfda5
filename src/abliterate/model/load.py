"""Load a model and its tokenizer from a hub id, a local directory or a GGUF file."""

from __future__ import annotations

import functools
import logging
import os
import pickle
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import AbliterateError

GGUF_MAGIC = b"GGUF"
# "owner/name" or "name": anything else that does not exist on disk is a missing path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

log = logging.getLogger(__name__)


@functools.cache
def _libc():
    """The C library when it is glibc (malloc_trim is glibc's), else None."""
    import ctypes
    import ctypes.util
    import platform

    name = ctypes.util.find_library("c")
    if not name or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def resident_bytes() -> int | None:
    """This process's resident set now (Linux's /proc/self/statm), None where the system does not say."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def trim_heap() -> bool:
    """Give the heap's free pages back to the system (glibc's malloc_trim). False where there is no glibc.

    Why a streamed pass needs it: blocks' weights and batches' temporaries are freed one after another, glibc
    keeps freed memory in the heap, fragmented, and raises its mmap threshold as large blocks are freed, so the
    resident set grows far past what is live (measured: 1807 MB against 825 MB with trimming, reference model,
    `directions --max-memory 512MB`). Trimming costs the next allocations their page faults, so the stream
    trims only when the resident set passes its budget (`StreamedModel._after_block`)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


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


DTYPES = ("float32", "bfloat16", "float16")
# How many missing or unexpected tensor names an error shows; the rest are counted.
SHOW_KEYS = 4


def check_device(text: str | None) -> None:
    """Raise unless `text` names a device this machine has: cpu, cuda, cuda:N, mps (None: the best available)."""
    if text is None:
        return
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise AbliterateError(f"--device {text!r} is not a device; use cuda, cuda:N, mps or cpu "
                              f"(or leave it out for the best available)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AbliterateError(f"--device {text} needs CUDA, which this machine (or this torch build) does not "
                                  f"have; use --device cpu, or leave --device out")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise AbliterateError(f"--device {text}: this machine has {count} CUDA device(s), numbered from 0; "
                                  f"use --device cuda:0")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise AbliterateError(f"--device {text} needs Apple's MPS, which this machine does not have; "
                                  f"use --device cpu, or leave --device out")


def check_dtype(text: str | None) -> None:
    """Raise unless `text` is auto (or None), float32, bfloat16 or float16: the dtypes the edits are checked in."""
    if text is None or text == "auto" or text in DTYPES:
        return
    raise AbliterateError(f"--dtype {text!r} is not supported; use float32, bfloat16, float16 or auto")


def pick_device(device: str | None = None) -> torch.device:
    if device:
        check_device(device)
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
        check_dtype(dtype)
        return getattr(torch, dtype)
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
        raise AbliterateError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); give a .gguf "
                              f"file, a model directory or a hub id")
    try:

        reader = gguf.GGUFReader(str(path))
        for t in reader.tensors:  # the reader maps lazily: touch each tensor's end
            if t.data_offset + t.n_bytes > os.path.getsize(path):
                raise ValueError(f"tensor {t.name} runs past the end of the file")
    except AbliterateError:
        raise
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors, ...
        raise AbliterateError(f"{path} is a corrupt or truncated GGUF file ({e}); re-download or re-export it") from e


def check_finite(source: str, model: nn.Module) -> None:
    """Raise when a floating-point parameter holds nan or inf: such a model only ever answers garbage.

    A sum per tensor (nan and inf survive it; no full-size temporary): about 0.3 s for 0.5B weights on a
    CPU. Only a tensor whose sum is not finite is looked at element by element, so an overflowing sum of
    finite weights is no false alarm.
    """
    bad = [name for name, p in model.named_parameters() if not finite(p)]
    if bad:
        half = next(p.dtype for p in model.parameters()) == torch.float16
        raise AbliterateError(
            f"the weights of {source} hold nan or inf in {_count(len(bad), 'tensor')} ({_names(bad)}); "
            + ("float16 cannot hold some of them: use --dtype bfloat16 or float32" if half else
               "the checkpoint is damaged: re-download or re-save the model")
        )


@torch.no_grad()
def finite(t: torch.Tensor) -> bool:
    """False when floating-point `t` holds nan or inf (a tensor on the meta device has no values: True)."""
    if not t.is_floating_point() or t.device.type == "meta" or not t.numel():
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def _local_weights(path: Path) -> tuple[list[Path], list[Path]]:
    return sorted(path.glob("*.safetensors")), sorted(path.glob("*.bin"))


def check_safetensors(path: Path) -> None:
    """Fail early, in one line, on a file that is not a complete safetensors file.

    `safe_open` reads only the header (and maps the rest), so this costs milliseconds even for
    gigabytes: it checks the header's JSON, every tensor's dtype, shape and byte range, and that
    the ranges cover the file exactly (a truncated download fails here).
    """
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError (header too small/large, bad JSON, not fully covered), OSError, ...
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AbliterateError(f"{path} is truncated or not a safetensors file ({why}); re-download or re-save it") \
            from e


class _NoLoadReport(logging.Filter):
    """Holds back transformers' MISSING/UNEXPECTED table: `load_model` turns the same facts into one error.

    The table is kept: when transformers raises anyway (a CONVERSION error, say) and its message points
    at "the above report", `load_model` logs it after all."""

    def __init__(self):
        super().__init__()
        self.held: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record whose arguments do not format: not ours to judge
            return True
        if "LOAD REPORT" in message:
            self.held.append(message)
            return False
        return True


@contextmanager
def _quiet_load_report():
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _NoLoadReport()
    logger.addFilter(quiet)
    try:
        yield quiet
    except BaseException:
        for message in quiet.held:
            log.warning("%s", message)
        raise
    finally:
        logger.removeFilter(quiet)


def _tied(config) -> bool:
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    return any(getattr(c, "tie_word_embeddings", False) for c in configs)


def _names(keys, show: int = SHOW_KEYS) -> str:
    keys = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in keys)
    more = f" and {len(keys) - show} more" if len(keys) > show else ""
    return ", ".join(keys[:show]) + more


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def check_loading_info(source: str, model: nn.Module, info: dict, gguf: bool = False) -> None:
    """Raise when the checkpoint did not fill the model: missing tensors would be random weights.

    Allowed: `lm_head.weight` absent when the config ties it to the embeddings (transformers ties
    it after loading). For a GGUF, only missing tensors count: llama.cpp files carry extras that
    transformers derives from the config instead (`rope_freqs.weight`, for one).
    """
    missing = [k for k in info.get("missing_keys", ())
               if not (str(k).split(".")[-2:] == ["lm_head", "weight"] and _tied(model.config))]
    unexpected = [] if gguf else list(info.get("unexpected_keys", ()))
    mismatched = list(info.get("mismatched_keys", ()))
    if not (missing or unexpected or mismatched):
        return
    total = len(model.state_dict())
    parts = []
    if missing:
        parts.append(f"lacks {len(missing)} of the model's {total} tensors ({_names(missing)})")
    if mismatched:
        shapes = "; ".join(f"{k}: {tuple(a)} in the file, {tuple(b)} in the model"
                           for k, a, b in sorted(mismatched, key=str)[:SHOW_KEYS])
        parts.append(f"has {_count(len(mismatched), 'tensor')} of the wrong shape ({shapes})")
    if unexpected:
        parts.append(f"has {_count(len(unexpected), 'tensor')} the model does not use ({_names(unexpected)})")
    raise AbliterateError(
        f"the checkpoint of {source} " + " and ".join(parts) + "; a model loaded from it would have random "
        "weights. Re-download or re-save the model, and check that its config.json belongs to these weights"
    )


def load_model(
    source: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    device_memory: str | None = None,
) -> Loaded:
    """Load `source`: a Hugging Face id, a local model directory, or a `.gguf` file.

    GGUF weights are dequantized by transformers. Pickle (`.bin`) weights can run
    code when loaded, so they are refused unless `allow_pickle`. With `device_map` (accelerate's: auto, balanced,
    ...), transformers spreads the model over the GPUs, the CPU and the disk (`model.mapped`).
    """

    source = str(source)
    path = Path(source).expanduser()
    dev = pick_device(device)
    torch_dtype = pick_dtype(dev, dtype)
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    gguf_file = None
    local_dir = None
    weights: list[Path] = []  # pickle files, named when they fail to load
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise AbliterateError(
                f"{source} is a file but not a .gguf; pass a model directory, a hub id or a .gguf file"
            )
        check_gguf(path)
        if device_map is not None:
            raise AbliterateError(f"--device-map loads safetensors weights block by block; {source} is a GGUF, which "
                                  f"transformers dequantizes whole: convert it first (abliterate convert {source} "
                                  f"-o DIR), or leave out --device-map")
        gguf_file = path.resolve()
        local_dir = gguf_file.parent
        load_from, kwargs["gguf_file"] = str(local_dir), gguf_file.name
    elif path.is_dir():
        local_dir = path.resolve()
        if not (path / "config.json").is_file():
            raise AbliterateError(f"{source} has no config.json, so it is not a Hugging Face model directory; "
                                  f"give the directory that holds config.json and the weights")
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
        for file in safetensors:
            check_safetensors(file)
        if not safetensors:
            weights = pickles
        load_from = str(path)
    elif not HUB_ID.fullmatch(source) or source.lower().endswith(".gguf"):
        raise AbliterateError(f"model path {source} does not exist; give a hub id (owner/name), a model "
                              f"directory or a .gguf file")
    else:
        load_from = source
    if gguf_file is None:
        kwargs["use_safetensors"] = None if allow_pickle else True
    if device_map is not None:
        from .mapped import load_kwargs

        kwargs.update(load_kwargs(device_map, device_memory))
    try:
        tokenizer = load_tokenizer(load_from, trust_remote_code, gguf_file=kwargs.get("gguf_file"))
        # ignore_mismatched_sizes: wrong shapes come back in the loading info, and check_loading_info
        # names them, instead of a RuntimeError that points at a table we do not print.
        with _quiet_load_report():
            model, info = AutoModelForCausalLM.from_pretrained(load_from, output_loading_info=True,
                                                               ignore_mismatched_sizes=True, **kwargs)
    except AbliterateError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if weights:  # a pickle checkpoint (--allow-pickle) that does not unpickle
            names = weights[0] if len(weights) == 1 else f"the pickle weights of {source}"
            why = first.split(". ")[0][:120] if str(e).strip() else "the file ends early"
            raise AbliterateError(f"could not load {names} ({type(e).__name__}: {why}); it is corrupt or holds "
                                  f"more than tensors: re-download it, or re-save it as safetensors") from e
        raise AbliterateError(f"could not load model {source} ({first[:300]}); check that it is a complete model "
                              f"directory, .gguf file or hub id (a hub id needs the network or the cache)") from e
    check_loading_info(source, model, info, gguf=gguf_file is not None)
    check_finite(source, model)
    if gguf_file is not None:
        # transformers marks GGUF-loaded models as quantized and refuses to save them;
        # the weights are already dequantized, so the marker is only in the way.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False
    if device_map is None:
        model.to(dev)
    model.eval().requires_grad_(False)
    return Loaded(model, tokenizer, source, local_dir, gguf_file)


def load_tokenizer(source: str, trust_remote_code: bool = False, gguf_file: str | None = None):
    """The tokenizer as abliterate uses it (and saves it with an edited model): padding on the left, and a pad
    token (the end-of-sequence one) where the model has none."""
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
