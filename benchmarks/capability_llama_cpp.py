"""Is the reference model at chance on MMLU, or is our reading of it? The same items, scored twice.

The reference model scores at chance on MMLU in transformers (docs/measure.md). That model is the packaged
GGUF dequantized by transformers' GGUF loader. This script scores the same stratified MMLU items with the
same prompts and token ids in llama.cpp, on the GGUF file itself (its own quantized kernels), and in
transformers (`abliterate.measure.capability.score`, the code every evaluation runs). Prints one JSON object:
each accuracy with its Wilson 95% interval, how often the two pick the same choice, the largest difference
of a choice's log-likelihood, and how each spreads its answers over A-D.

If llama.cpp is above chance where transformers is not, the loader is at fault; if both are at chance and
agree item by item, the checkpoint is.

    python benchmarks/capability_llama_cpp.py [--n 200] [--shots 5] [--protocol letter] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from abliterate import RunConfig
from abliterate.commands.steps import load
from abliterate.measure.capability import Scores, choice_sequences, read_items, score, stratified
from abliterate.measure.stats import Rate
from abliterate.model import packaged as reference

ROOT = Path(__file__).resolve().parents[1]


def llama_cpp_scores(gguf: Path, tokenizer, items, dev, shots: int, protocol: str, threads: int) -> Scores:
    """`score`'s choice rule on llama.cpp: every `choice_sequences` sequence evaluated with the longest prefix
    shared with the previous one kept in llama.cpp's cache, the log-softmax of its last positions read back."""
    import llama_cpp

    t0 = time.perf_counter()
    seqs, where = choice_sequences(tokenizer, items, shots=shots, dev_items=dev, protocol=protocol)
    keep = max(len(c) for scored in where.values() for _, _, c in scored)
    n_ctx = max(map(len, seqs)) + 8
    # One continuation token (the letters): only the last position's logits, as llama.cpp computes by default;
    # logits for every position cost a head pass and a 600 kB copy per token.
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, logits_all=keep > 1, n_threads=threads,
                          verbose=False)
    logprobs = [[0.0] * len(it.choices) for it in items]
    tokens, previous = 0, []
    for k, seq in enumerate(seqs):
        shared = 0
        for a, b in zip(previous, seq[:len(seq) - keep]):
            if a != b:
                break
            shared += 1
        llm.n_tokens = shared  # eval() drops the cache from here on
        llm.eval(seq[shared:])
        tokens += len(seq) - shared
        previous = seq
        if keep > 1:
            logits = torch.from_numpy(np.array(llm.scores[len(seq) - keep:len(seq)], dtype=np.float64))
        else:
            last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            logits = torch.from_numpy(last.astype(np.float64))[None]
        logp = torch.log_softmax(logits, -1)
        for i, j, c in where[k]:
            rows = logp[keep - len(c):]
            logprobs[i][j] = float(rows[torch.arange(len(c)), torch.tensor(c)].sum())
        if k % 50 == 0:
            print(f"llama.cpp: {k}/{len(seqs)} sequences, {tokens} tokens, {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
    predicted = []
    for it, lps in zip(items, logprobs):
        if protocol == "cloze":  # acc_norm, as `score`: per byte of the choice's text
            lps = [lp / max(1, len(f" {t}".encode())) for lp, t in zip(lps, it.choices)]
        predicted.append(max(range(len(lps)), key=lps.__getitem__))
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
    parser.add_argument("--protocol", choices=["letter", "cloze"], default="letter")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    items = stratified(read_items(Path(args.data) / "mmlu_test.jsonl"), args.n, args.seed)
    dev = read_items(Path(args.data) / "mmlu_dev.jsonl")
    gguf = reference.fetch(progress=lambda m: print(m, file=sys.stderr))
    loaded, _ = load(str(reference.hf_dir(progress=lambda m: print(m, file=sys.stderr))), RunConfig(device="cpu"))
    tok = loaded.tokenizer
    lcpp = llama_cpp_scores(gguf, tok, items, dev, args.shots, args.protocol, args.threads)
    print(f"llama.cpp: {lcpp.accuracy} in {lcpp.seconds:.0f} s", file=sys.stderr)
    hf = score(loaded.model, tok, items, shots=args.shots, dev_items=dev, protocol=args.protocol, desc="transformers")
    print(f"transformers: {hf.accuracy} in {hf.seconds:.0f} s", file=sys.stderr)
    same = sum(a == b for a, b in zip(hf.predicted, lcpp.predicted))
    diff = max(abs(a - b) for x, y in zip(hf.logprobs, lcpp.logprobs) for a, b in zip(x, y))
    report = {
        "what": "MMLU on the reference model's GGUF in llama.cpp and in transformers (dequantized), same items, "
                "prompts and token ids",
        "model": reference.QWEN_CODER_05B.name, "gguf": gguf.name, "n": len(items), "seed": args.seed,
        "shots": args.shots, "protocol": args.protocol, "threads": args.threads,
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
