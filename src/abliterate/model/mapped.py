"""A model spread over the GPUs, the CPU and the disk by accelerate's device maps (`--device-map`).

transformers loads it (`from_pretrained(device_map=..., max_memory=..., offload_folder=...)`) and accelerate's hooks
move each block's inputs to the block's device, and an offloaded block's weights in for its forward pass: a GPU too
small for the model holds what fits, the CPU the next part, the disk the rest; several GPUs share it out. The
weights of an offloaded block are on the meta device between passes, so abliterate edits such a model by hooks
(`edit.weighted.ablating`, the same edit as the bake, on the activations) and bakes the output shard by shard from
the source's files (`export.streamed.save_streamed`).
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from collections import Counter

import torch
from torch import nn

from ..errors import AbliterateError

# accelerate's strategies: auto (fill the first GPU, then the next, then CPU, then disk); balanced (the same share on
# every GPU); balanced_low_0 (less on GPU 0, which generate's logits use); sequential (auto without the balance)
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_memory(text: str) -> dict:
    """accelerate's `max_memory` from "0=20GB,1=20GB,cpu=64GB": GPU numbers (or cuda:N) and cpu, each with a size."""
    from .streamed import parse_memory

    out: dict = {}
    for part in str(text).split(","):
        key, eq, size = part.strip().partition("=")
        key = key.strip().lower()
        m = re.fullmatch(r"(?:cuda:)?(\d+)", key)
        if not eq or not (m or key in ("cpu", "mps")):
            raise AbliterateError(f"--device-memory {text!r}: {part.strip()!r} is not DEVICE=SIZE; write e.g. "
                                  f"0=20GB,1=20GB,cpu=64GB (GPU numbers, cuda:N, mps or cpu)")
        out[int(m.group(1)) if m else key] = parse_memory(size, f"--device-memory {key}=")
    return out


def check_device_map(device_map: str | None, device_memory: str | None = None, device: str | None = None) -> None:
    """Raise on a --device-map accelerate does not have, --device-memory without it, or naming GPUs this machine
    lacks, and on --device beside it (the map places every module)."""
    if device_map is None:
        if device_memory is not None:
            raise AbliterateError("--device-memory sets the budgets of --device-map; add --device-map auto, or "
                                  "leave out --device-memory")
        return
    if device_map not in DEVICE_MAPS:
        raise AbliterateError(f"--device-map {device_map!r} is not one of accelerate's: {', '.join(DEVICE_MAPS)}")
    if device is not None:
        raise AbliterateError(f"--device {device} and --device-map {device_map} both place the model; give one "
                              f"(--device-map puts every module on a GPU, the CPU or the disk itself)")
    if device_memory is not None:
        budgets = parse_device_memory(device_memory)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        bad = [k for k in budgets if isinstance(k, int) and k >= count]
        if bad:
            raise AbliterateError(f"--device-memory names GPU {bad[0]}, but this machine has {count} CUDA device(s)"
                                  + (", numbered from 0" if count else "") + "; give cpu=SIZE and GPUs it has")


def load_kwargs(device_map: str, device_memory: str | None) -> dict:
    """from_pretrained's arguments for `device_map`: the map, the budgets, and a temporary offload folder for what
    fits no device (removed when the process ends)."""
    folder = tempfile.mkdtemp(prefix="abliterate-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    kw = {"device_map": device_map, "offload_folder": folder}
    if device_memory is not None:
        kw["max_memory"] = parse_device_memory(device_memory)
    return kw


def is_mapped(model: nn.Module) -> bool:
    """True when accelerate placed `model` by a device map (its modules carry accelerate's hooks)."""
    return bool(getattr(model, "hf_device_map", None)) and len(set(map(str, model.hf_device_map.values()))) > 1 \
        or any(hasattr(m, "_hf_hook") for m in model.modules())


def where(model: nn.Module) -> str:
    """Which device holds how many of `model`'s top-level entries of its map: "cuda:0 14, cpu 10, disk 4"."""
    placed = getattr(model, "hf_device_map", None) or {}
    counts = Counter(f"cuda:{d}" if isinstance(d, int) else str(d) for d in placed.values())
    return ", ".join(f"{d} {n}" for d, n in counts.most_common()) or "one device"


def offloaded(model: nn.Module) -> list[str]:
    """Names of `model`'s parameters that are on the meta device between passes (offloaded to the CPU or disk)."""
    return [n for n, p in model.named_parameters() if p.is_meta]
