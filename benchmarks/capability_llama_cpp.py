"""Is the reference model at chance on MMLU, or is our reading of it? The same items, scored twice.

The reference model scores at chance on MMLU in transformers (docs/measure.md). That model is the packaged
GGUF dequantized by transformers' GGUF loader. This script scores the same stratified MMLU items with the
same prompts and token ids in llama.cpp, on the GGUF file itself (its own quantized kernels), and in
transformers (`abliterate.measure.capability.score`, the code every evaluation runs), by the letter protocol
(lm-eval's `mmlu`, the one an instruct model should answer). Prints one JSON object: each accuracy with its
Wilson 95% interval, how often the two pick the same choice, the largest difference of a choice's
log-likelihood, and how each spreads its answers over A-D.

If llama.cpp is above chance where transformers is not, the loader is at fault; if both are at chance and
agree item by item, the checkpoint is.

    python benchmarks/capability_llama_cpp.py [--n 200] [--shots 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from abliterate import RunConfig
from abliterate.commands.steps import load
from abliterate.measure import llamacpp
from abliterate.measure.capability import Scores, choice_sequences, read_items, score, stratified
from abliterate.measure.stats import Rate
from abliterate.model import packaged as reference

ROOT = Path(__file__).resolve().parents[1]


def llama_cpp_scores(gguf: Path, tokenizer, items, dev, shots: int) -> Scores:
    """`score`'s letter rule on llama.cpp (`measure.llamacpp`): every `choice_sequences` sequence (one per item:
    the letters are one token) evaluated with the prefix it shares with the previous one kept in llama.cpp's
    cache, and the letters' log-probabilities read from the last position."""
    t0 = time.perf_counter()
    seqs, where = choice_sequences(tokenizer, items, shots=shots, dev_items=dev, protocol="letter")
    assert all(len(c) == 1 for scored in where.values() for _, _, c in scored), "a letter of several tokens"
    llm = llamacpp.load(gguf, n_ctx=max(map(len, seqs)) + 8)
    logprobs = [[0.0] * len(it.choices) for it in items]
    tokens, previous = 0, []
    for k, seq in enumerate(seqs):
        shared = 0
        for a, b in zip(previous, seq[:-1]):  # at least the last token is evaluated again
            if a != b:
                break
            shared += 1
        llm.n_tokens = shared  # eval() drops the cache from here on
        llm.eval(seq[shared:])
        tokens += len(seq) - shared
        previous = seq
        logp = llamacpp.last_logprobs(llm)
        for i, j, c in where[k]:
            logprobs[i][j] = float(logp[c[0]])
        if k % 50 == 0:
            print(f"llama.cpp: {k}/{len(seqs)} sequences, {tokens} tokens, {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
    predicted = [max(range(len(lps)), key=lps.__getitem__) for lps in logprobs]
    return Scores(list(items), predicted, logprobs, shots, tokens, time.perf_counter() - t0)


def summary(s: Scores) -> dict:
    spread = Counter("ABCD"[p] for p in s.predicted)
    return {"accuracy": s.accuracy.to_dict(), "accuracy_text": str(s.accuracy), "answers": dict(sorted(spread.items())),
            "tokens": s.tokens, "seconds": round(s.seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "capability"))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", type=int, default=5)
    args = parser.parse_args()
    items = stratified(read_items(Path(args.data) / "mmlu_test.jsonl"), args.n, args.seed)
    dev = read_items(Path(args.data) / "mmlu_dev.jsonl")
    gguf = reference.fetch(progress=lambda m: print(m, file=sys.stderr))
    loaded, _ = load(str(reference.hf_dir(progress=lambda m: print(m, file=sys.stderr))), RunConfig(device="cpu"))
    tok = loaded.tokenizer
    lcpp = llama_cpp_scores(gguf, tok, items, dev, args.shots)
    print(f"llama.cpp: {lcpp.accuracy} in {lcpp.seconds:.0f} s", file=sys.stderr)
    hf = score(loaded.model, tok, items, shots=args.shots, dev_items=dev, protocol="letter", desc="transformers")
    print(f"transformers: {hf.accuracy} in {hf.seconds:.0f} s", file=sys.stderr)
    same = sum(a == b for a, b in zip(hf.predicted, lcpp.predicted))
    diff = max(abs(a - b) for x, y in zip(hf.logprobs, lcpp.logprobs) for a, b in zip(x, y))
    report = {
        "what": "MMLU on the reference model's GGUF in llama.cpp and in transformers (dequantized), same items, "
                "prompts and token ids",
        "model": reference.QWEN_CODER_05B.name, "gguf": gguf.name, "n": len(items), "seed": args.seed,
        "shots": args.shots, "protocol": "letter", "threads": torch.get_num_threads(),
        "answer_key": dict(sorted(Counter("ABCD"[it.answer] for it in items).items())),
        "chance": round(sum(1 / len(it.choices) for it in items) / len(items), 4),
        "llama_cpp": summary(lcpp), "transformers": summary(hf),
        "same_choice": Rate(same, len(items)).to_dict(), "same_choice_text": str(Rate(same, len(items))),
        "largest_logprob_difference": round(diff, 4),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
