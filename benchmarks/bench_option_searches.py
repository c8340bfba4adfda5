"""Each search option measured with and without it: one search of equal length per option set.

The setting is bench_search.py's (issue 3, Heretic's protocol: trials scored on the evaluation
prompts, its system prompt). The model, the activations and the original's answers are made once;
then one search of `--trials` trials (sampler seed `--sampler-seed`) runs for the default options, for the defaults
without each default option, and for the defaults plus each other option. Every search starts from
the same seed points (plain abliteration, and the plain edit at half weight at three depths; they
differ between option sets only where an option changes them, e.g. no embeddings without `embed`).

For each option set it prints the best refusals (counted in the trials' short answers) at
first-token KL <= each cap, over all trials and over the sampled ones only (the seeds left out: what
the sampler found with the option), the lowest KL at <= each refusal count, how many trials used each
option and the front (refusals, KL, trial, the options its point uses). One line of JSON per
option set as it finishes (stderr), then the whole table (stdout).

An option that is a choice (per_layer, projected, row, column) may go untried in a short search: the
seeds do not use it and the sampler, fitted on them, rarely picks it. '!name' runs the defaults with
that option applied in every trial (the seeds included), which measures it directly:

    python benchmarks/bench_option_searches.py [--trials 16] [--only default,-embed,+row,!row] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from abliterate.commands.run import search_setup
from abliterate.commands.steps import Timer, load
from abliterate.model import packaged as reference
from abliterate.search.space import DEFAULT_OPTIONS, OPTIONS, Params, parse_options
from abliterate.search.study import run_search

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_options import switched_off  # noqa: E402
from bench_search import ROOT, make_config  # noqa: E402

KL_CAPS = (0.01, 0.02, 0.0375, 0.075)
REFUSAL_CAPS = (3, 5, 7)


CHOICES = ("per_layer", "projected", "row", "column")  # options the sampler picks as a choice, not a number


def option_sets() -> list[str]:
    """'default', then '-x' for each default option and '+x' for each other one, then each choice forced."""
    return (["default"] + [("-" if o in DEFAULT_OPTIONS else "+") + o for o in OPTIONS]
            + ["!" + o for o in CHOICES if o not in DEFAULT_OPTIONS])


FORCED = {"per_layer": ("per_layer", True), "projected": ("projected", True), "row": ("norm", "row"),
          "column": ("norm", "column"), "subspace": ("k", 3), "position": ("position", -2)}


class Forced:
    """A direction source whose edits always use one option (the '!name' option sets)."""

    def __init__(self, source, option: str):
        self.source, (self.field, self.value) = source, FORCED[option]
        self.n_positions = source.n_positions

    def ablation(self, p: Params):
        q = Params.from_flat(p.flat())
        setattr(q, self.field, self.value)
        return self.source.ablation(q)


def searched(option_set: str) -> tuple[str, ...]:
    if option_set.startswith("!"):
        if option_set[1:] not in FORCED:
            raise SystemExit(f"{option_set}: only {', '.join(FORCED)} can be forced")
        return parse_options("default")
    return parse_options(option_set)


def uses(t, option: str) -> bool:
    return switched_off(Params.from_flat(t.params), option) is not None


def summary(trials, n_seeds: int) -> dict:
    counted = [(int(t.refusals_est), t.kl, t.number) for t in trials]

    def best(rows, cap):
        ok = [r for r, kl, _ in rows if kl <= cap]
        return min(ok) if ok else None

    def lowest_kl(cap):
        ok = [kl for r, kl, _ in counted if r <= cap]
        return round(min(ok), 4) if ok else None

    sampled = [c for c in counted if c[2] >= n_seeds]
    return {"best_refusals_at_kl": {str(c): best(counted, c) for c in KL_CAPS},
            "sampled_best_refusals_at_kl": {str(c): best(sampled, c) for c in KL_CAPS},
            "lowest_kl_at_refusals": {str(c): lowest_kl(c) for c in REFUSAL_CAPS}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default=str(ROOT.parent / "shared" / "data" / "prompts"))
    parser.add_argument("--trials", type=int, default=16, help="trials per search (default: 16)")
    parser.add_argument("--sampler-seed", type=int, default=0, help="the sampler's seed (default: 0); other "
                        "seeds show how much one search's result varies")
    parser.add_argument("--only", default="", help="comma list of option sets to run (default: all of them)")
    parser.add_argument("overrides", nargs="*", help="RunConfig fields, as for bench_search.py")
    args = parser.parse_args()
    sets = [s for s in args.only.split(",") if s] or option_sets()
    for s in sets:
        searched(s)  # a bad name fails here, before the model loads
    # 'all' options so that the activations keep every position (the position option needs them)
    cfg = make_config(args.prompts, "all", ["search_on=eval", "max_kl=0.0375", *args.overrides])

    t0 = time.perf_counter()
    model_dir = reference.hf_dir(progress=lambda m: print(m, file=sys.stderr))
    timer = Timer()
    with timer("load"):
        loaded, layout = load(str(model_dir), cfg)
    setup = search_setup(loaded, cfg, timer)
    n_seeds = len(Params.seeds(layout.n_layers))
    rows = []
    for s in sets:
        start = time.perf_counter()
        source = Forced(setup.source, s[1:]) if s.startswith("!") else setup.source
        result = run_search(loaded.model, layout, source, setup.probe, trials=args.trials,
                            time_budget=None, options=searched(s), finalists=1, slack=cfg.slack, max_kl=cfg.max_kl,
                            seed=args.sampler_seed,
                            max_new_tokens=cfg.max_new_tokens)
        chosen = result.chosen
        row = {"options": s, "searched": list(searched(s)), "trials": len(result.trials),
               **summary(result.trials, n_seeds),
               "chosen": {"trial": chosen.number, "refusals_short": int(chosen.refusals_est),
                          "refusals_full": chosen.refusals, "kl": round(chosen.kl, 4)},
               "trials_using": {o: sum(uses(t, o) for t in result.trials) for o in searched(s)},
               "front": [[int(t.refusals_est), round(t.kl, 4), t.number, [o for o in OPTIONS if uses(t, o)]]
                         for t in result.front],
               "wall_s": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"model": reference.QWEN_CODER_05B.name, "trials_per_search": args.trials,
                      "sampler_seed": args.sampler_seed, "seed_trials": n_seeds, "max_kl": cfg.max_kl,
                      "search_prompts": {"harmful": len(setup.probe.harmful), "harmless": len(setup.probe.harmless),
                                         "original_refusals": setup.probe.baseline_refusals},
                      "set_up_s": {k: round(v, 1) for k, v in timer.stages.items()},
                      "option_sets": rows, "wall_min": round((time.perf_counter() - t0) / 60, 2)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
