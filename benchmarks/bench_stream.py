"""Benchmark `directions` streamed one block at a time against `directions` in memory: peak memory, wall time
per stage, forward tokens per second, the same direction; and an extrapolation to 8B and 70B.

Each run is a child process (this script with --child) that reports its own peak resident set
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`), imports apart, and the wall time of each stage (load,
activations, selection); so does a child that only imports abliterate (the floor: Python, torch,
transformers). The streamed child also times one read of every block from the shards (the part of its
time that grows with the weights, not with the prompts). The parent prints one JSON object: the three runs,
whether the two directions agree (layer, cosine), and `extrapolated`: the budget formula of
`model/streamed.py` (`Budget.needed`) evaluated for Llama-3-8B and Llama-3-70B shapes in bfloat16, and times
scaled from this run's measured per-parameter costs. The extrapolation is arithmetic, not a measurement.

    python benchmarks/bench_stream.py MODEL_DIR [--reshard 100MB] [--max-memory 512MB] [--n-train 128]
                                      [--device-memory cpu=1500MB]  # also accelerate's offload of the same stage
    python benchmarks/bench_stream.py MODEL_DIR --run [--n-train 32 --n-select 8 --n-eval 16] ...

With --run it measures the whole `abliterate run` instead (in memory, and `--stream --max-memory`, capability off
in both): peak memory, wall time per stage, the chosen layer, the evaluation figures, and the baked tensors
compared bit for bit. With --run --memory-limit SIZE the streamed run happens on a machine of SIZE (a Linux
memory cgroup, no swap: `small_machine.py`; needs root), and the in-memory run is tried there too, which the
kernel should kill.

MODEL_DIR is a local Hugging Face directory of safetensors weights; --reshard SIZE first copies it in shards
of at most SIZE (a block must be readable without mapping one multi-GB file).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

MB = 2**20


def run_child(argv: list[str]) -> dict:
    """`run-memory|run-stream SRC OUT N_TRAIN N_SELECT MAX_MEMORY N_EVAL`: the whole `abliterate run` (capability
    off in both: the streamed run does not measure it), its stages, chosen layer and figures."""
    from abliterate import RunConfig
    from abliterate.commands.run import run

    mode, src, out, n_train, n_select, max_memory, n_eval = argv
    stream = mode == "run-stream"
    cfg = RunConfig(n_train=int(n_train), n_select=int(n_select), n_eval_harmful=int(n_eval),
                    n_eval_harmless=int(n_eval), capability="none", device="cpu", stream=stream,
                    max_memory=max_memory if stream else None)
    result = run(src, out, cfg)
    m = result.manifest["metrics"]
    return {"stages_s": {k: round(v, 2) for k, v in result.timings.items()}, "peak_rss_mb_after": result.peaks_mb,
            "layer": result.direction.layer,
            "paths": result.paths, "metrics": {side: m[side] for side in ("before", "after")}}


def child(argv: list[str]) -> int:
    """One measured run: `idle`, `memory|stream SRC OUT N_TRAIN N_SELECT MAX_MEMORY`, or `run_child`'s."""
    start = time.perf_counter()
    import torch

    from abliterate import RunConfig
    from abliterate.commands.steps import Timer, find_direction, load, open_streamed

    imported = time.perf_counter()
    info: dict = {}
    if argv[0].startswith("run-"):
        info = run_child(argv)
    elif argv != ["idle"]:
        mode, src, out, n_train, n_select, max_memory = argv
        if mode == "mapped":  # accelerate's offload; max_memory is then --device-memory
            cfg = RunConfig(n_train=int(n_train), n_select=int(n_select), device_map="auto", device_memory=max_memory)
        else:
            cfg = RunConfig(n_train=int(n_train), n_select=int(n_select), device="cpu", stream=mode == "stream",
                            max_memory=max_memory if mode == "stream" else None)
        timer = Timer()
        with timer("load"):
            sm = open_streamed(src, cfg)
            loaded, layout = (sm.loaded, sm.layout) if sm else load(src, cfg)
        direction, cands, sel = find_direction(loaded, layout, cfg, timer, streamed=sm)
        direction.save(out, cands)
        tokens = cands.meta["activation_tokens"]
        info = {"stages_s": {k: round(v, 2) for k, v in timer.stages.items()}, "activation_tokens": tokens,
                "forward_tokens_per_s": round(tokens / timer.stages["activations"], 1), "layer": direction.layer,
                "params": sum(p.numel() for p in loaded.model.parameters()),
                "candidates": len(sel.scores), "induce_checks": sum(s.induce is not None for s in sel.scores)}
        if sm is not None:
            t = time.perf_counter()
            with torch.inference_mode():
                for i in range(len(sm.blocks)):
                    with sm._materialized(i):
                        pass
            b = sm.budget
            info |= {"read_all_blocks_s": round(time.perf_counter() - t, 2),
                     "blocks_bytes": sum(sm.block_bytes(i) for i in range(len(sm.blocks))),
                     "budget_parts_mb": {"block": round(b.block / MB, 1), "fixed": round(b.fixed / MB, 1),
                                         "head": round(b.head / MB, 1)}}
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux reports KiB
    print(json.dumps({"import_s": round(imported - start, 2), "run_s": round(done - imported, 2),
                      "peak_rss_mb": round(peak, 1), **info}))
    return 0


# Shapes of the models extrapolated to (their config.json): hidden, intermediate, blocks, heads, kv heads, vocab
SHAPES = {"Llama-3-8B": (4096, 14336, 32, 32, 8, 128256), "Llama-3-70B": (8192, 28672, 80, 64, 8, 128256)}


def extrapolate(streamed: dict, memory: dict, n_train: int, tokens: int, batch: int = 32, width: int = 64) -> dict:
    """The streamed budget (Budget.needed's formula) and times for SHAPES in bfloat16, from this run's costs:
    compute time per parameter-token (the in-memory forward), read time per byte (one read of every block)."""
    from abliterate.model.streamed import Budget

    compute_s = memory["stages_s"]["activations"] / (memory["params"] * memory["activation_tokens"])
    read_s_per_byte = streamed["read_all_blocks_s"] / streamed["blocks_bytes"]
    out = {"assumed": f"bfloat16 weights, {n_train}+{n_train} prompts, {tokens} prompt tokens in all, batches of "
                      f"{batch} x {width} tokens; compute scaled by parameters x tokens from this machine's "
                      f"in-memory forward; block reads by bytes from this run's reads"}
    for name, (h, inter, layers, heads, kv, vocab) in SHAPES.items():
        head_dim = h // heads
        block = 2 * h * h + 2 * h * kv * head_dim + 3 * h * inter  # q, o; k, v; gate, up, down
        params = layers * block + 2 * vocab * h
        b = Budget(block=2 * block, fixed=2 * (2 * layers + 1) * h, head=2 * block + 2 * 64 * vocab * 4,
                   per_token=2 * h, work_per_token=(3 * inter + 6 * h) * 2, score_per_entry=2 * heads * 2)
        need = b.needed(tokens, batch * width, width)
        act_s = compute_s * params * tokens + read_s_per_byte * 2 * block * layers
        out[name] = {"params_b": round(params / 1e9, 2), "block_mb": round(2 * block / MB), "weights_gb":
                     round(2 * params / 2**30, 1), "streamed_budget_gb": round(need / 2**30, 2),
                     "activations_s": round(act_s), "of_which_block_reads_s": round(read_s_per_byte * 2 * block * layers),
                     "memory_gb_per_b_params": round(need / 2**30 / (params / 1e9), 3)}
    return out


def same_tensors(a: Path, b: Path) -> dict:
    """The safetensors of two model directories compared tensor by tensor (bit for bit), one tensor at a time."""
    from safetensors import safe_open

    def names(root: Path) -> dict:
        out = {}
        for f in root.glob("*.safetensors"):
            if f.name != "direction.safetensors":
                with safe_open(str(f), "pt") as g:
                    out.update(dict.fromkeys(g.keys(), f))
        return out

    na, nb = names(a), names(b)
    differ = []
    for n in sorted(set(na) & set(nb)):
        with safe_open(str(na[n]), "pt") as f, safe_open(str(nb[n]), "pt") as g:
            x, y = f.get_tensor(n), g.get_tensor(n)
            if x.dtype != y.dtype or x.shape != y.shape or not bool((x.view(-1).view(torch_uint(x)) ==
                                                                    y.view(-1).view(torch_uint(y))).all()):
                differ.append(n)
    return {"tensors": len(set(na) | set(nb)), "only_in_one": sorted(set(na) ^ set(nb)), "differ": differ}


def torch_uint(t):
    import torch

    return {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]


def same_metrics(a, b, tol: float = 1e-6) -> dict:
    """Counts equal and every float within `tol` (the streamed KL sums in another order: ~1e-8 apart)."""
    worst, same = 0.0, True

    def walk(x, y):
        nonlocal worst, same
        if isinstance(x, dict) and isinstance(y, dict) and x.keys() == y.keys():
            for k in x:
                walk(x[k], y[k])
        elif isinstance(x, float) and isinstance(y, float):
            worst = max(worst, abs(x - y))
        elif x != y:
            same = False
    walk(a, b)
    return {"same_metrics": same and worst <= tol, "metrics_max_abs_diff": worst}


def main_run(args, src: Path, work: Path, measure) -> int:
    """--run: `abliterate run` in memory and `run --stream --max-memory` end to end, compared."""
    tail = [args.n_train, args.n_select, args.max_memory, args.n_eval]
    idle = measure(["idle"])
    memory = measure(["run-memory", str(src), str(work / "run-memory"), *tail])
    limited = {}
    if args.memory_limit:  # the streamed run on a machine of that size; and the in-memory run there, to fail
        from small_machine import Limited

        from abliterate.export.hf import check_size

        size = check_size(args.memory_limit)
        with Limited(size) as box:
            streamed = measure(["run-stream", str(src), str(work / "run-stream"), *tail], box)
        with Limited(size) as box:
            limited = {"in_memory_under_the_limit": measure(["run-memory", str(src), str(work / "run-memory-limited"),
                                                             *tail], box)}
        shutil.rmtree(work / "run-memory-limited", ignore_errors=True)
    else:
        streamed = measure(["run-stream", str(src), str(work / "run-stream"), *tail])
    print(json.dumps({
        "model": str(args.model), "input": str(src),
        "weights_mb": round(sum(p.stat().st_size for p in src.glob("*.safetensors")) / MB, 1),
        "shards": len(list(src.glob("*.safetensors"))), "max_memory": args.max_memory,
        "prompts": {"n_train": args.n_train, "n_select": args.n_select, "n_eval_harmful": args.n_eval,
                    "n_eval_harmless": args.n_eval},
        "imports_only": idle, "in_memory": memory, "streamed": streamed,
        "peak_above_imports_mb": {"in_memory": round(memory["peak_rss_mb"] - idle["peak_rss_mb"], 1),
                                  "streamed": round(streamed["peak_rss_mb"] - idle["peak_rss_mb"], 1)},
        "same_layer": memory["layer"] == streamed["layer"], **same_metrics(memory["metrics"], streamed["metrics"]),
        "baked": same_tensors(work / "run-memory", work / "run-stream"), **limited,
    }, indent=2))
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="local Hugging Face directory of safetensors weights")
    parser.add_argument("--reshard", help="first copy the model in shards of at most this size (e.g. 100MB)")
    parser.add_argument("--max-memory", default="512MB", help="the streamed run's budget (default: 512MB)")
    parser.add_argument("--n-train", default="128", help="prompts of each set for the means (default: 128)")
    parser.add_argument("--n-select", default="16", help="held-out prompts of each set for selection (default: 16)")
    parser.add_argument("--out", help="keep the inputs and outputs here (default: a temporary directory, removed)")
    parser.add_argument("--run", action="store_true", help="measure the whole `abliterate run` instead, in memory "
                        "and with --stream --max-memory: peak memory, stages, layer, figures, baked tensors")
    parser.add_argument("--n-eval", default="16", help="--run: evaluation prompts of each set (default: 16)")
    parser.add_argument("--device-memory", help="also run `directions --device-map auto --device-memory` this "
                        "(accelerate's offload, e.g. cpu=1500MB) and compare its tokens/s and peak")
    parser.add_argument("--memory-limit", help="--run: run the streamed child, and the in-memory one a second time, "
                        "under a memory cgroup of this size (a machine that small; needs root), e.g. 2GB")
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from bench_stream_bake import measure as measure_in
    from bench_stream_bake import reshard

    from abliterate import Direction
    from abliterate.export.hf import check_size

    def measure(argv: list[str], box=None) -> dict:  # this script as the child
        return measure_in(argv, __file__, box)

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    src = Path(args.model).expanduser().resolve()
    if args.reshard:
        src = work / "input" if (work / "input").is_dir() else reshard(src, work / "input", check_size(args.reshard))
    if args.run:
        code = main_run(args, src, work, measure)
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)
        return code
    weights = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    common = [str(src)]
    tail = [args.n_train, args.n_select, args.max_memory]
    idle = measure(["idle"])
    memory = measure(["memory", *common, str(work / "memory.safetensors"), *tail])
    streamed = measure(["stream", *common, str(work / "stream.safetensors"), *tail])
    a, b = Direction.load(work / "memory.safetensors"), Direction.load(work / "stream.safetensors")
    mapped = {}
    if args.device_memory:  # accelerate's offload of the same stage, for its tokens/s and peak
        m = measure(["mapped", *common, str(work / "mapped.safetensors"), args.n_train, args.n_select,
                     args.device_memory])
        c = Direction.load(work / "mapped.safetensors")
        mapped = {"device_map_auto": {**m, "device_memory": args.device_memory},
                  "device_map_tokens_per_s_ratio": round(m["forward_tokens_per_s"] / memory["forward_tokens_per_s"], 3),
                  "device_map_same_layer": a.layer == c.layer,
                  "device_map_direction_cosine": float(torch.dot(a.vector, c.vector))}
    print(json.dumps({
        "model": str(args.model), "input": str(src), "weights_mb": round(weights / MB, 1),
        "shards": len(list(src.glob("*.safetensors"))), "max_memory": args.max_memory,
        "imports_only": idle, "in_memory": memory, "streamed": streamed,
        "peak_above_imports_mb": {"in_memory": round(memory["peak_rss_mb"] - idle["peak_rss_mb"], 1),
                                  "streamed": round(streamed["peak_rss_mb"] - idle["peak_rss_mb"], 1)},
        "streamed_tokens_per_s_ratio": round(streamed["forward_tokens_per_s"] / memory["forward_tokens_per_s"], 3),
        "same_layer": a.layer == b.layer, "direction_cosine": float(torch.dot(a.vector, b.vector)),
        "direction_max_abs_diff": float((a.vector - b.vector).abs().max()),
        "extrapolated": extrapolate(streamed, memory, int(args.n_train), memory["activation_tokens"]), **mapped,
    }, indent=2))
    if not args.out:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
