"""Benchmark GGUF in, GGUF out on the reference model (Qwen2.5-Coder-0.5B-Instruct, mixed Q5_0/Q8_0/Q4_K/Q6_K).

Bakes a direction (a file from `abliterate directions`, or the direction at --layer
computed here) into the dequantized model, then writes the edited GGUF, and prints one
JSON object: wall time and memory of the write alone (Python-side allocations traced
by tracemalloc, and the process's resident set before and at its peak), the types
written, and the sizes of the largest edited tensor and of the file. Also the size of
the llama.cpp LoRA adapter of the same edit.

    python benchmarks/bench_gguf.py [--direction FILE] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path

import gguf

from abliterate import Direction, RunConfig
from abliterate.commands.steps import bake, compute_candidates, load, splits
from abliterate.export.gguf_copy import write_edited_gguf
from abliterate.export.llamacpp import write_lora_gguf
from abliterate.model import packaged as reference


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--direction", help="direction file (default: computed at --layer from 32 + 32 prompts)")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--out", help="keep the outputs here (default: a temporary directory)")
    args = parser.parse_args()

    src = reference.fetch(reference.QWEN_CODER_05B)
    cfg = RunConfig(n_train=32)
    loaded, layout = load(str(src), cfg)
    if args.direction:
        direction = Direction.load(args.direction)
    else:
        sp = splits(cfg)
        from abliterate.commands.steps import chat_format

        cands = compute_candidates(loaded, chat_format(cfg), sp.harmful_train, sp.harmless_train, cfg)
        direction = cands.direction(args.layer)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="bench-gguf-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    lora = write_lora_gguf(out_dir / "lora.gguf", layout, direction, base=str(src), force=True)
    edited = bake(loaded, layout, direction)

    rss_before = rss_mb()
    tracemalloc.start()
    start = time.perf_counter()
    summary = write_edited_gguf(src, out_dir / "abliterated.gguf", loaded.model, layout, edited, force=True)
    seconds = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    reader = gguf.GGUFReader(str(src))
    largest = max(t.n_bytes for t in reader.tensors if t.name in summary["edited"])
    print(json.dumps({
        "model": "Qwen2.5-Coder-0.5B-Instruct GGUF",
        "write_s": round(seconds, 2),
        "write_traced_peak_mb": round(traced_peak / 2**20, 1),
        "rss_before_write_mb": round(rss_before, 1),
        "process_peak_rss_mb": round(peak_rss, 1),
        "largest_edited_tensor_mb": round(largest / 2**20, 1),
        "file_mb": round((out_dir / "abliterated.gguf").stat().st_size / 2**20, 1),
        "edited": len(summary["edited"]), "types_written": sorted(set(summary["edited"].values())),
        "copied_byte_for_byte": summary["copied"],
        "lora_adapter_mb": round(lora.stat().st_size / 2**20, 2),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
