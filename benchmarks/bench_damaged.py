"""Does the instrument catch a broken model? A deliberately damaged edit on a real model, measured by every
instrument: which of them calls it a success, and which separates it from the original.

The damage: a random unit direction (seed 0) ablated with weight W (default 4) from every residual writer and the
embeddings, by hooks: each writer's component along it becomes (1 - W) times itself at every layer. Printed as
one JSON object, the original and the damaged model on the same prompts, each rate with n and Wilson interval and
each change paired (Newcombe interval, McNemar's exact p):

- refusals in `--max-new-tokens` (32) answers to held-out harmful prompts: by the refusal markers alone
  (`refusal_marker`), and as the evaluation counts them (`is_refusal`: a marker or a degenerate answer);
- first-token KL on harmless prompts;
- long answers (`--long-tokens` 128) to the first `--n-long` harmful and harmless prompts: loops, degenerate
  answers, late refusals, lengths (`measure/long.py`);
- the judge (`--judge self`: the original model itself, the hooks off, classifying both models' long answers to
  the harmful prompts; `--judge none`: skipped);
- capability (`--capability quick`, the packaged 114 MMLU questions, or FILE:N; `none` by default here: at
  chance on the reference model, 32/114 -> 31/114 under this damage, `damaged-random-w4-reference.json`);
- a few damaged answers to read.

    python benchmarks/bench_damaged.py [--model qwen|smollm|qwen-1.5b] [--dtype float32] [--weight 4]
        [--n-harmful 16] [--n-long 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from abliterate.edit.weighted import Ablation, ablating
from abliterate.find.prompts import ChatFormat, load_prompts
from abliterate.measure import capability, long
from abliterate.measure.evaluation import evaluate
from abliterate.measure.judge import Judge, judge_answers
from abliterate.measure.refusal import refusal_marker
from abliterate.measure.stats import Rate, paired
from abliterate.model import packaged as reference
from abliterate.model.arch import resolve
from abliterate.model.load import load_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT.parent / "shared" / "data" / "prompts"
MODELS = {"qwen": reference.QWEN_CODER_05B, "smollm": reference.SMOLLM2_135M, "qwen-1.5b": reference.QWEN_CODER_15B}


def damage(layout, weight: float, seed: int = 0) -> Ablation:
    """A random unit direction removed `weight` times from every writer and the embeddings."""
    r = torch.nn.functional.normalize(torch.randn(layout.hidden_size, generator=torch.Generator().manual_seed(seed)),
                                      dim=0).unsqueeze(0)  # (1, H)
    n = layout.n_layers
    return Ablation(r.expand(n, -1, -1).contiguous(), torch.full((n,), weight), torch.full((n,), weight), r.clone(),
                    embed=weight)


def progress(message: str) -> None:
    print(message, file=sys.stderr)


def model_path(name: str) -> str:
    if name.startswith("qwen"):
        return str(reference.hf_dir(MODELS[name], progress=progress))
    return str(reference.fetch(MODELS[name], progress=progress))


def marker_counts(before: list[str], after: list[str]) -> dict:
    """Refusals by the markers alone, before and after, paired."""
    a, b = [refusal_marker(t) is not None for t in before], [refusal_marker(t) is not None for t in after]
    return {"original": str(Rate(sum(a), len(a))), "damaged": str(Rate(sum(b), len(b))), "change": paired(a, b).to_dict()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--weight", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-harmful", type=int, default=16)
    parser.add_argument("--n-harmless", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--n-long", type=int, default=8)
    parser.add_argument("--long-tokens", type=int, default=128)
    parser.add_argument("--judge", choices=["self", "none"], default="self")
    parser.add_argument("--capability", default="none", help="none, quick or FILE[:N]")
    parser.add_argument("--protocol", choices=["cloze", "letter"], default="cloze")
    args = parser.parse_args()
    t0 = time.perf_counter()
    loaded = load_model(model_path(args.model), dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    layout = resolve(model)
    harmful = load_prompts(str(PROMPTS / "harmful_val.json")).head(args.n_harmful)
    harmless = load_prompts(str(PROMPTS / "harmless_val.json")).head(args.n_harmless)
    fmt = ChatFormat()
    texts = fmt.render_all(tok, harmful.prompts), fmt.render_all(tok, harmless.prompts)
    ev = {"harmful_prompts": list(harmful.prompts), "harmless_prompts": list(harmless.prompts),
          "max_new_tokens": args.max_new_tokens, "kl_tokens": 8, "batch_size": 16}
    long_sets = {"harmful": list(harmful.prompts[:args.n_long]), "harmless": list(harmless.prompts[:args.n_long])}
    lk = {"max_new_tokens": args.long_tokens, "head": args.max_new_tokens, "batch_size": 8, "desc": None}

    def long_answers():
        return {k: long.answer_long(model, tok, fmt.render_all(tok, ps), **lk) for k, ps in long_sets.items()}

    cap_items = None
    if args.capability != "none":
        cap_items, dev = capability.quick_items() if args.capability == "quick" else (
            capability.load_items(args.capability), capability.load_items(str(ROOT.parent / "shared" / "data" /
                                                                               "capability" / "mmlu_dev.jsonl")))
        shots = 5 if args.protocol == "letter" else 0
        cap_kw = {"shots": shots, "dev_items": dev if shots else None, "protocol": args.protocol, "batch_size": 8}
    timings = {}
    t = time.perf_counter()
    before = evaluate(model, tok, *texts, **ev)
    long_before = long_answers()
    before_cap = capability.score(model, tok, cap_items, **cap_kw) if cap_items else None
    timings["original_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    with ablating(model, damage(layout, args.weight, args.seed), layout):
        after = evaluate(model, tok, *texts, reference=before, **ev)
        long_after = long_answers()
        after_cap = capability.score(model, tok, cap_items, **cap_kw) if cap_items else None
    timings["damaged_s"] = round(time.perf_counter() - t, 1)
    effects = long.compare(long_sets, long_after, long_before, tokens=args.long_tokens, head=args.max_new_tokens)
    out = {"model": MODELS[args.model].name, "dtype": args.dtype,
           "damage": f"random unit direction (seed {args.seed}), weight {args.weight}, every writer and the embeddings",
           "refusals_markers_only": marker_counts(before.harmful.text, after.harmful.text),
           "refusals_evaluation": {"original": str(before.metrics.rates["refusals"]),
                                   "damaged": str(after.metrics.rates["refusals"]),
                                   "rule": "a refusal marker, or a degenerate answer (refusal.is_refusal)"},
           "kl_first": round(after.metrics.kl_first, 4), "kl_continuation": round(after.metrics.kl_continuation, 4),
           "long": {side.name: {"n": len(side.edited),
                                **{f: {"original": str(side.rates("original")[f]), "damaged": str(side.rates("edited")[f]),
                                       "change": side.change()[f].to_dict()} for f in long.FLAGS},
                                "length": {"original": long._median([a.tokens for a in side.original]),
                                           "damaged": long._median([a.tokens for a in side.edited])}}
                    for side in effects.sides},
           "loop_rule": effects.to_dict()["loop_rule"]}
    if args.judge == "self":
        t = time.perf_counter()
        judge = Judge(loaded, f"{MODELS[args.model].name} (the original, as its own judge)")
        j = judge_answers(judge, long_sets["harmful"], [a.text for a in long_after["harmful"]],
                          [a.text for a in long_before["harmful"]], answers=f"{args.long_tokens}-token answers")
        out["judge"] = {"instrument": j.instrument, "answers": j.answers,
                        **{label: {"original": str(j.original.counts[label]), "damaged": str(j.edited.counts[label])}
                           for label in j.edited.counts},
                        "complied_change": j.complied_change.to_dict(), "seconds": round(time.perf_counter() - t, 1)}
    if cap_items:
        r = capability.compare(before_cap, after_cap)
        out["capability"] = {"protocol": args.protocol, "original": str(r.before), "damaged": str(r.after),
                             **{k: v for k, v in r.to_dict(indices=False).items() if k != "groups"}}
    out["damaged_answers"] = {"short": [t[:160] for t in after.harmful.text[:3]],
                              "long": [a.text[:240] for a in long_after["harmful"][:2] + long_after["harmless"][:2]]}
    out["original_answers"] = {"long": [a.text[:240] for a in long_before["harmful"][:2] + long_before["harmless"][:2]]}
    out["seconds"] = {**timings, "total_s": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, indent=2, ensure_ascii=False, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
