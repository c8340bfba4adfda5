"""Does the instrument catch a broken model? A deliberately damaged edit on the reference model, measured by the
marker counter and by the capability check.

The damage: a random unit direction (seed 0) ablated with weight W (default 4) from every residual writer and the
embeddings, by hooks: each writer's component along it becomes (1 - W) times itself at every layer. Printed as
one JSON object: refusals on held-out harmful prompts (markers) before and after, first-token KL, the quick
capability check (the packaged 114 MMLU questions, zero-shot cloze) before and after, paired (retention, lost,
gained, McNemar p), and a few damaged answers to read. A broken edit that the markers call a success (few
refusals) must show a capability drop outside the paired interval.

    python benchmarks/bench_damaged.py [--weight 4] [--protocol cloze] [--n-harmful 16]
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
from abliterate.measure import capability
from abliterate.measure.evaluation import evaluate
from abliterate.model import packaged as reference
from abliterate.model.arch import resolve
from abliterate.model.load import load_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT.parent / "shared" / "data" / "prompts"


def damage(layout, weight: float, seed: int = 0) -> Ablation:
    """A random unit direction removed `weight` times from every writer and the embeddings."""
    r = torch.nn.functional.normalize(torch.randn(layout.hidden_size, generator=torch.Generator().manual_seed(seed)),
                                      dim=0).unsqueeze(0)  # (1, H)
    n = layout.n_layers
    return Ablation(r.expand(n, -1, -1).contiguous(), torch.full((n,), weight), torch.full((n,), weight), r.clone(),
                    embed=weight)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight", type=float, default=4.0)
    parser.add_argument("--protocol", choices=["cloze", "letter"], default="cloze")
    parser.add_argument("--n-harmful", type=int, default=16)
    args = parser.parse_args()
    t0 = time.perf_counter()
    loaded = load_model(str(reference.hf_dir(progress=lambda m: print(m, file=sys.stderr))))
    model, tok = loaded.model, loaded.tokenizer
    layout = resolve(model)
    items, dev = capability.quick_items()
    shots = 5 if args.protocol == "letter" else 0
    kw = {"shots": shots, "dev_items": dev if shots else None, "protocol": args.protocol, "batch_size": 8}
    harmful = load_prompts(str(PROMPTS / "harmful_val.json")).head(args.n_harmful)
    harmless = load_prompts(str(PROMPTS / "harmless_val.json")).head(8)
    fmt = ChatFormat()
    texts = fmt.render_all(tok, harmful.prompts), fmt.render_all(tok, harmless.prompts)
    ev = {"harmful_prompts": list(harmful.prompts), "harmless_prompts": list(harmless.prompts), "max_new_tokens": 32,
          "kl_tokens": 8, "batch_size": 16}
    before_cap = capability.score(model, tok, items, **kw)
    before = evaluate(model, tok, *texts, **ev)
    with ablating(model, damage(layout, args.weight), layout):
        after_cap = capability.score(model, tok, items, **kw)
        after = evaluate(model, tok, *texts, reference=before, **ev)
    r = capability.compare(before_cap, after_cap)
    print(json.dumps({
        "model": reference.QWEN_CODER_05B.name, "damage": f"random unit direction, weight {args.weight}, every writer",
        "refusals": {"original": str(before.metrics.rates["refusals"]), "damaged": str(after.metrics.rates["refusals"])},
        "kl_first": after.metrics.kl_first,
        "capability": {"protocol": args.protocol, "shots": shots, "original": str(r.before), "damaged": str(r.after),
                       "seconds": [round(before_cap.seconds, 1), round(after_cap.seconds, 1)],
                       "tokens": before_cap.tokens, **r.to_dict(indices=False)},
        "damaged_answers": [t[:160] for t in after.harmful.text[:4]] + [t[:160] for t in after.harmless.text[:2]],
        "total_s": round(time.perf_counter() - t0, 1)}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
