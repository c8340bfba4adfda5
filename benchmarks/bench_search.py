"""Benchmark `run --search` on the reference model (Qwen2.5-Coder-0.5B-Instruct), to compare with Heretic.

The setting of issue 3 (Heretic's): directions from 128 + 128 prompts of the shared train files,
evaluation on harmful_val.json (39) and the first 100 of harmless_val.json with 32-token answers, and
Heretic's system prompt "You are a helpful assistant.". Heretic scores its trials on those evaluation
prompts (its front is in-sample): `search_on=eval` does the same; the default (`held-out`) scores
trials on 48 + 48 other prompts of the train files.
Prints one JSON object: refusals, KL (first token and 16 tokens), wall time, trials,
peak memory, the chosen parameters and the Pareto front.

    python benchmarks/bench_search.py [--prompts DIR] [--options LIST] [RunConfig fields as key=value]

--options is the search's option list (see `abliterate run --help`, --search-options),
e.g. "-row" to measure the search without row norm preservation.
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

from abliterate import RunConfig
from abliterate.commands.run import run
from abliterate.measure.stats import Rate
from abliterate.model import packaged as reference

ROOT = Path(__file__).resolve().parents[1]


# Heretic's default system prompt, under which the Heretic figures were measured: with it
# the reference model refuses 11/39 of harmful_val (the figure Heretic printed for the original);
# with the template's own ("You are Qwen, created by Alibaba Cloud...") it refuses 21/39.
HERETIC_SYSTEM_PROMPT = "You are a helpful assistant."


def make_config(prompts: str, options: str, overrides: list[str]) -> RunConfig:
    p = prompts
    cfg = RunConfig(harmful=f"{p}/harmful_train.json", harmless=f"{p}/harmless_train.json",
                    eval_harmful=f"{p}/harmful_val.json", eval_harmless=f"{p}/harmless_val.json",
                    n_eval_harmless=100, search=True, search_options=options, force=True,
                    system_prompt=HERETIC_SYSTEM_PROMPT, pick="rule")
    for item in overrides:
        key, _, value = item.partition("=")
        current = getattr(cfg, key)
        cast = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(current, bool) else type(current or "")
        if key in ("time_budget", "max_kl"):
            cast = float
        cfg = replace(cfg, **{key: cast(value) if value != "None" else None})
    return cfg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default=str(ROOT.parent / "shared" / "data" / "prompts"))
    parser.add_argument("--options", default="default", help="search options (default: the defaults)")
    parser.add_argument("overrides", nargs="*", help="RunConfig fields, e.g. trials=40 time_budget=900 "
                        "system_prompt=None (the template's own) study=FILE (kept for bench_options.py)")
    args = parser.parse_args()
    cfg = make_config(args.prompts, args.options, args.overrides)

    model_dir = reference.hf_dir(progress=lambda m: print(m, file=sys.stderr))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = run(str(model_dir), None, replace(cfg, study=cfg.study or str(Path(tmp) / "study")))
        total = time.perf_counter() - t0
    before, after, s = result.before.metrics, result.after.metrics, result.search
    report = {
        "model": reference.QWEN_CODER_05B.name,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "options": args.options,
        "system_prompt": cfg.system_prompt,
        "search_on": cfg.search_on,
        "max_kl": cfg.max_kl,
        "refusals_before": str(Rate(before.refusals, before.n_harmful)),
        "refusals": str(Rate(after.refusals, after.n_harmful)),
        "over_refusals": str(Rate(after.over_refusals, after.n_harmless)),
        # everything the manifest records, each rate with n and 95% interval, and the chosen edit's capability
        "metrics": result.manifest["metrics"], "capability": result.manifest.get("capability"),
        "kl_first_token": round(after.kl_first, 4),
        "kl_16_tokens": round(after.kl_continuation, 4),
        "wall_s": round(total, 1),
        "wall_min": round(total / 60, 2),
        "stages_s": {k: round(v, 1) for k, v in result.timings.items()},
        "trials": len(s.trials),
        "s_per_trial": round(result.timings["search"] / max(len(s.trials), 1), 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "search_prompts": {"harmful": s.n_harmful, "harmless": s.n_harmless,
                           "original_refusals": s.baseline_refusals},
        "chosen": s.chosen.params | {"refusals_est": round(s.chosen.refusals_est, 2), "kl_est": round(s.chosen.kl, 4),
                                     "refusals_counted": s.chosen.refusals},
        "rule": s.rule,
        "front": [{"trial": t.number, "refusals_est": round(t.refusals_est, 2), "kl": round(t.kl, 4),
                   "refusals_counted": t.refusals, "params": t.params} for t in s.front],
    }
    print(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
