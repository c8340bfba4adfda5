"""Benchmark `apply --stream` against `apply` in memory on one model: peak memory, wall time, the same bits.

Each bake runs in a child process (this script with --child), which reports its own peak resident
set (`resource.getrusage(RUSAGE_SELF).ru_maxrss`) and wall time, imports apart; so does a child
that only imports abliterate (the floor every command pays: Python, torch, transformers). The
parent prints one JSON object with the three, the checkpoint's sizes the memory formula uses
(largest shard, largest edited tensor in float32, all weights), and whether the two outputs hold
the same tensors, byte for byte (compared tensor by tensor).

    python benchmarks/bench_stream_bake.py MODEL_DIR [--reshard 100MB] [--direction FILE] [--dtype D] [--out DIR]

MODEL_DIR is a local Hugging Face directory of safetensors weights. --reshard SIZE first copies it
in shards of at most SIZE (tensor by tensor, never the whole model in memory). The streamed bake
reads and writes a block of rows at a time, so a single-file model needs no reshard
(benchmarks/results/stream-bake-single-file-reference.json: 906 MB peak on one 2.4 GB file).
Without --direction: a random unit direction at the middle layer (memory and time do not depend on
which one).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 2**20


def child(argv: list[str]) -> int:
    """One measured run in this process: `idle` (imports only) or an `apply` command line."""
    start = time.perf_counter()
    from abliterate.cli import main

    imported = time.perf_counter()
    code = 0 if argv == ["idle"] else main(["-q", *argv])
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux reports KiB
    print(json.dumps({"code": code, "import_s": round(imported - start, 2), "run_s": round(done - imported, 2),
                      "peak_rss_mb": round(peak, 1)}))
    return code


def measure(argv: list[str], script: str = __file__, box=None) -> dict:
    """Run `script --child ARGV` in a fresh process (so its peak RSS is its own) and read its JSON line. With `box`
    (small_machine.Limited) the child runs under its memory limit, and a child the OOM killer stopped is reported
    (`killed`, the cgroup's figures), not raised."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--child", *argv], capture_output=True, text=True, check=False,
                          preexec_fn=box.enter if box else None)
    limit = {"memory_limit": box.report()} if box else {}
    if box and proc.returncode != 0 and limit["memory_limit"]["oom_kills"]:
        return {"killed": True, "returncode": proc.returncode, "wall_s": round(time.perf_counter() - start, 1),
                **limit}
    if proc.returncode != 0:
        raise SystemExit(f"child {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), **limit}


def reshard(src: Path, dst: Path, size: int) -> Path:
    """A copy of `src` in shards of at most `size` bytes (a larger tensor alone), one shard in memory at a time."""
    from safetensors.torch import save_file

    from abliterate.export.streamed import INDEX, Checkpoint

    ckpt = Checkpoint.open(src)
    groups, used = [[]], 0
    for name in ckpt.where:
        nbytes = ckpt.dtypes[name].itemsize * math.prod(ckpt.shapes[name])
        if groups[-1] and used + nbytes > size:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    dst.mkdir(parents=True)
    for p in src.iterdir():  # config, tokenizer, generation config
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != INDEX:
            shutil.copy(p, dst / p.name)
    weight_map = {}
    for i, names in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(dict(zip(names, ckpt.read(names))), str(dst / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return dst


def same_tensors(a: Path, b: Path) -> tuple[bool, int]:
    """Whether directories `a` and `b` hold the same tensor names with the same dtypes, shapes and bytes; and how
    many tensors `a` has. Tensor by tensor, so that it fits where the models do."""
    import torch

    from abliterate.export.streamed import Checkpoint

    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    if ca.where.keys() != cb.where.keys():
        return False, len(ca.where)
    for name in ca.where:
        x, y = ca.read([name])[0], cb.read([name])[0]
        if x.dtype != y.dtype or x.shape != y.shape or \
                not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False, len(ca.where)
    return True, len(ca.where)


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="local Hugging Face directory of safetensors weights")
    parser.add_argument("--reshard", help="first copy the model in shards of at most this size (e.g. 100MB)")
    parser.add_argument("--direction", help="direction file (default: a random one at the middle layer)")
    parser.add_argument("--dtype", default="auto", help="--dtype for both bakes (default: auto)")
    parser.add_argument("--out", help="keep the outputs here (default: a temporary directory, removed)")
    args = parser.parse_args()

    import torch

    from abliterate import Direction, RunConfig
    from abliterate.edit.project import plain
    from abliterate.edit.weighted import edited_names
    from abliterate.export.hf import check_size
    from abliterate.export.streamed import Checkpoint, open_skeleton

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    src = Path(args.model).expanduser().resolve()
    if args.reshard:
        src = reshard(src, work / "input", check_size(args.reshard))
    skel = open_skeleton(src, RunConfig(dtype=args.dtype, device="cpu"))
    if args.direction:
        direction_file = Path(args.direction)
        direction = Direction.load(direction_file)
    else:
        g = torch.Generator().manual_seed(0)
        v = torch.nn.functional.normalize(torch.randn(skel.layout.hidden_size, generator=g), dim=0)
        direction = Direction(v, layer=skel.layout.n_layers // 2)
        direction_file = direction.save(work / "direction.safetensors")
    edited = set(edited_names(plain(direction, skel.layout.n_layers), skel.layout))
    writers = [w for b in skel.layout.blocks for w in b.attn + b.mlp] + skel.layout.embeddings
    largest_edit = max(w.param.numel() * 4 for w in writers if w.name in edited)
    ckpt = Checkpoint.open(src)
    shard_bytes = [(src / s).stat().st_size for s in ckpt.shards]
    del skel

    common = ["--direction", str(direction_file), "--dtype", args.dtype, "--device", "cpu", "--force"]
    idle = measure(["idle"])
    memory = measure(["apply", str(src), *common, "-o", str(work / "memory")])
    streamed = measure(["apply", str(src), *common, "-o", str(work / "streamed"), "--stream"])
    same, n = same_tensors(work / "memory", work / "streamed")
    print(json.dumps({
        "model": str(args.model), "input": str(src), "dtype": args.dtype, "shards": len(ckpt.shards),
        "largest_shard_mb": round(max(shard_bytes) / MB, 1), "weights_mb": round(sum(shard_bytes) / MB, 1),
        "largest_edited_tensor_f32_mb": round(largest_edit / MB, 1),
        "imports_only": idle, "in_memory": memory, "streamed": streamed,
        "identical_tensors": same, "tensors": n,
    }, indent=2))
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
