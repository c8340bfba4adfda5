"""What each search option brings, measured on a finished study of bench_search.py.

For the study's best points (its finalists: the fewest refusals at first-token KL <= max_kl),
every option the point uses is switched off in turn (position -> last token, fractional ->
nearest whole layer, per_layer -> one direction, projected -> not, embed -> 0, row/column ->
no norm preservation, subspace -> k = 1, strength -> peaks capped at 1) and the point is scored
again on the same search prompts: refusals counted in 12-token answers and first-token KL.
An option helps a point when switching it off costs refusals or KL.

It also splits the study's trials by each option's value and gives the best refusals at
KL <= max_kl on each side (observational: the sampler chose where to look).

    python benchmarks/bench_search.py study=/tmp/s.study ...   # first, keeping its study
    python benchmarks/bench_options.py /tmp/s.study [same key=value overrides]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import optuna

from abliterate.commands.run import search_setup
from abliterate.commands.steps import Timer, load
from abliterate.edit.weighted import ablating
from abliterate.model import packaged as reference
from abliterate.search.probe import score
from abliterate.search.space import Params
from abliterate.search.study import (
    STUDY_NAME,
    completed_trials,
    journal_storage,
    pareto,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_search import ROOT, make_config  # noqa: E402


def switched_off(p: Params, option: str) -> Params | None:
    """The point without `option`, or None when the point does not use it."""
    q = Params.from_flat(p.flat())
    if option == "position" and p.position != -1:
        q.position = -1
    elif option == "fractional" and not p.per_layer and p.direction != round(p.direction):
        q.direction = float(round(p.direction))
    elif option == "per_layer" and p.per_layer:
        q.per_layer = False
    elif option == "projected" and p.projected:
        q.projected = False
    elif option == "embed" and p.embed > 0:
        q.embed = 0.0
    elif option in ("row", "column") and p.norm == option:
        q.norm = "none"
    elif option == "subspace" and p.k > 1:
        q.k = 1
    elif option == "strength" and max(p.attn.peak, p.mlp.peak) > 1:
        q.attn.peak, q.mlp.peak = min(p.attn.peak, 1.0), min(p.mlp.peak, 1.0)
    else:
        return None
    return q


def split_table(trials, options, max_kl: float) -> dict:
    """Best refusals (short answers) at KL <= max_kl among trials with each option used / not used."""
    def used(t, o) -> bool:
        return switched_off(Params.from_flat(t.params), o) is not None

    def best(ts):
        ok = [t.refusals_est for t in ts if t.kl <= max_kl]
        return {"trials": len(ts), "best_refusals_at_kl_cap": round(min(ok), 2) if ok else None}

    return {o: {"used": best([t for t in trials if used(t, o)]), "not_used": best([t for t in trials
                                                                                  if not used(t, o)])}
            for o in options}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="journal file of a finished bench_search.py study")
    parser.add_argument("--prompts", default=str(ROOT.parent / "shared" / "data" / "prompts"))
    parser.add_argument("--points", type=int, default=3, help="front points to test (default: 3)")
    parser.add_argument("overrides", nargs="*", help="the RunConfig fields the study was run with")
    args = parser.parse_intermixed_args()
    cfg = make_config(args.prompts, "default", args.overrides)
    max_kl = cfg.max_kl if cfg.max_kl is not None else float("inf")

    study = optuna.load_study(study_name=STUDY_NAME, storage=journal_storage(args.study))
    trials = completed_trials(study)
    points = [t for t in pareto(trials) if t.kl <= max_kl][: args.points]
    options = study.user_attrs["options"]
    t0 = time.perf_counter()
    model_dir = reference.hf_dir(progress=lambda m: print(m, file=sys.stderr))
    loaded, layout = load(str(model_dir), cfg)
    setup = search_setup(loaded, cfg, Timer())
    if setup.fingerprint != study.user_attrs["fingerprint"]:
        print("warning: the study was made with other prompts or settings than these overrides", file=sys.stderr)

    def measure(p: Params) -> dict:
        with ablating(loaded.model, setup.source.ablation(p), layout):
            s = score(loaded.model, setup.probe)
        return {"refusals": s.counted, "kl": round(s.kl, 4)}

    rows = []
    for t in points:
        p = Params.from_flat(t.params)
        base = measure(p)
        row = {"trial": t.number, "with_all": base, "off": {}}
        for o in options:
            q = switched_off(p, o)
            row["off"][o] = measure(q) if q is not None else "not used"
            print(f"trial {t.number} -{o}: {row['off'][o]} (with: {base})", file=sys.stderr)
        rows.append(row)
    print(json.dumps({"study": args.study, "trials": len(trials), "max_kl": cfg.max_kl,
                      "search_prompts": len(setup.probe.harmful), "points": rows,
                      "study_split": split_table(trials, options, max_kl),
                      "wall_s": round(time.perf_counter() - t0, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
