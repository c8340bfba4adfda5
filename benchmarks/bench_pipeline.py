"""Benchmark the core pipeline on the reference model (Qwen2.5-Coder-0.5B-Instruct).

Prints one JSON object: per-stage wall time, tokens per second of activation
collection, peak memory, and the quality figures before and after, on the
project's shared evaluation prompts (harmful_val.json, first 100 of harmless_val.json).

    python benchmarks/bench_pipeline.py [--out DIR] [--prompts ../shared/data/prompts] [RunConfig flags as key=value]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from abliterate import RunConfig, run
from abliterate.measure.stats import Rate
from abliterate.model import packaged as reference

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default=str(ROOT.parent / "shared" / "data" / "prompts"))
    parser.add_argument("--out", help="keep the abliterated model here (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="RunConfig fields, e.g. projected=true n_train=64")
    args = parser.parse_args()

    cfg = RunConfig(eval_harmful=f"{args.prompts}/harmful_val.json", eval_harmless=f"{args.prompts}/harmless_val.json",
                    n_eval_harmless=100, force=True)
    for item in args.overrides:
        key, _, value = item.partition("=")
        current = getattr(cfg, key)
        cast = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(current, bool) else type(current or "")
        cfg = replace(cfg, **{key: cast(value) if value != "None" else None})

    t0 = time.perf_counter()
    model_dir = reference.hf_dir(progress=lambda m: print(m, file=sys.stderr))
    prepare = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "out"
        t0 = time.perf_counter()
        result = run(str(model_dir), out, cfg)
        total = time.perf_counter() - t0
    before, after = result.before.metrics, result.after.metrics
    tokens = result.direction.meta.get("activation_tokens", 0)
    report = {
        "model": reference.QWEN_CODER_05B.name,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(cfg).items() if k in ("n_train", "n_select", "positions", "projected",
                                                                 "max_new_tokens", "kl_tokens", "batch_size")},
        "prepare_s": round(prepare, 1),
        "stages_s": {k: round(v, 1) for k, v in result.timings.items()},
        "total_s": round(total, 1),
        "activation_tokens": tokens,
        "activation_tokens_per_s": round(tokens / result.timings["activations"], 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "direction": {"layer": result.direction.layer, "position": result.direction.position,
                      "projected": result.direction.projected},
        "refusals_before": str(Rate(before.refusals, before.n_harmful)),
        "refusals_after": str(Rate(after.refusals, after.n_harmful)),
        "refusal_reduction": round(1 - after.refusals / max(before.refusals, 1), 3),
        "over_refusals_before": str(Rate(before.over_refusals, before.n_harmless)),
        "over_refusals_after": str(Rate(after.over_refusals, after.n_harmless)),
        "kl_first_token": round(after.kl_first, 4),
        "kl_16_tokens": round(after.kl_continuation, 4),
        # everything the manifest records, each rate with n and 95% interval: the paired changes, capability
        # (retention, lost and gained, per group), and long answers or the judge when asked
        "metrics": result.manifest["metrics"], "capability": result.manifest.get("capability"),
    }
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
