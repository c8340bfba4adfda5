"""What the default edit costs in knowledge: MMLU accuracy of the reference model before and after.

The original (Qwen2.5-Coder-0.5B-Instruct) and the default run's edit (the direction `abliterate directions`
finds with a default RunConfig, applied by hooks, which are tested equal to baked weights) answer the same
stratified sample of MMLU test items, few-shot, by log-likelihood of the answer letter
(`abliterate.measure.capability`). Prints one JSON object: each accuracy with its Wilson 95% interval, retention
(edited / original) with its Bonett-Price interval, items lost and gained, the paired difference with
Newcombe's interval and the exact McNemar p, the same per MMLU group, wall time and tokens per second.

    python benchmarks/bench_capability.py [--n 1000] [--shots 5] [--data ../shared/data/capability]
    python benchmarks/bench_capability.py --model qwen-1.5b --dtype bfloat16 [--manifest RUN/manifest.json]

`--model qwen-1.5b` scores the packaged Qwen2.5-Coder-1.5B-Instruct, on which MMLU resolves; `--manifest` scores
a run's saved edit (a searched run's chosen one) instead of the default run's direction.

On a shared CPU, score the two models in two single-threaded processes (`--part original`, `--part edited`,
each printing its part as JSON) and join them with `--combine ORIGINAL.json EDITED.json`. A part whose
process was stopped early (its predictions so far dumped from the live process) has null predictions for
the subjects it did not reach; the comparison is then on the items both parts answered and says so
("incomplete"). The report keeps each model's per-item answers, so a new edit of the same model, dtype and
sample is compared with an earlier original by `--combine REPORT.json EDITED.json` (a later file's parts
replace an earlier one's). With the letter protocol the reference model is at chance: 1-shot 215/764 (28%; 95% CI 25-31%), 95% of its
answers A or C; 5-shot 57/200 (28%; 95% CI 23-35%), 111/200 C (docs/measure.md). `--protocol cloze`
scores each choice's own text instead (lm-eval's mmlu_continuation).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from abliterate import RunConfig
from abliterate.commands.steps import find_direction, load
from abliterate.edit.project import ablated
from abliterate.edit.weighted import ablating
from abliterate.export.outputs import read_edit
from abliterate.measure.capability import (
    Scores,
    question_text,
    read_items,
    score,
    stratified,
)
from abliterate.measure.capability import compare as compare_scores
from abliterate.model import packaged as reference

ROOT = Path(__file__).resolve().parents[1]
# the reference model is at chance on MMLU; the packaged 1.5B Qwen2.5-Coder is not (docs/measure.md)
MODELS = {"reference": reference.QWEN_CODER_05B, "qwen-1.5b": reference.QWEN_CODER_15B}


def joint_tokenization_agrees(tokenizer, items) -> float:
    """Share of items whose question + ' A' tokenizes the same jointly as in pieces (as `score` runs it)."""
    enc = lambda t: tokenizer(t, add_special_tokens=False).input_ids
    same = sum(enc(question_text(it) + " A") == enc(question_text(it)) + enc(" A") for it in items)
    return same / len(items)


def _summary(s: Scores) -> dict:
    return {"accuracy": s.accuracy.to_dict(), "accuracy_text": str(s.accuracy), "seconds": round(s.seconds, 1),
            "tokens": s.tokens, "tokens_per_s": round(s.tokens / s.seconds, 1) if s.seconds else None}


def score_resumable(model, tok, items, kw, desc: str, checkpoint: Path | None, tag: str = "") -> Scores:
    """`score`, subject by subject when `checkpoint` is given: each finished subject's answers, tokens and seconds
    are written to that JSON file (atomically, by rename) and a rerun with the same file skips them, so a part cut
    off after hours keeps what it scored. The checkpoint names its sample and `tag` (model, dtype, protocol, edit);
    one of another sample or tag is refused."""
    if checkpoint is None:
        return score(model, tok, items, desc=desc, **kw)
    key = [[it.subject, it.question[:80]] for it in items]
    state = json.loads(checkpoint.read_text()) if checkpoint.exists() else {"tag": tag, "items": key, "subjects": {}}
    if (state["tag"], state["items"]) != (tag, key):
        raise SystemExit(f"{checkpoint} holds answers of another sample or model ({state['tag']}; here {tag}): "
                         f"give a new --checkpoint file")
    by_subject: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_subject.setdefault(it.subject, []).append(i)
    for subject, idx in by_subject.items():
        if subject in state["subjects"]:
            continue
        got = score(model, tok, [items[i] for i in idx], **kw)
        state["subjects"][subject] = {"predicted": got.predicted, "tokens": got.tokens, "seconds": got.seconds}
        tmp = checkpoint.with_name(checkpoint.name + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(checkpoint)
        print(f"{desc}: {len(state['subjects'])}/{len(by_subject)} subjects ({subject}) in {got.seconds:.0f} s",
              file=sys.stderr)
    predicted = [None] * len(items)
    for subject, idx in by_subject.items():
        for i, p in zip(idx, state["subjects"][subject]["predicted"]):
            predicted[i] = p
    done = state["subjects"].values()
    return Scores(list(items), predicted, [], kw["shots"], sum(d["tokens"] for d in done),
                  sum(d["seconds"] for d in done))


def run_part(part: str, args, items, dev) -> dict:
    """Score the original or the edit (the default run's direction, by hooks) in this process."""
    t0, started = time.perf_counter(), time.time()
    packaged = MODELS[args.model]
    model_dir = reference.hf_dir(packaged, progress=lambda m: print(m, file=sys.stderr))
    cfg = RunConfig(dtype=args.dtype)
    loaded, layout = load(str(model_dir), cfg)
    model, tok = loaded.model, loaded.tokenizer
    out = {"model": packaged.name, "device": str(next(model.parameters()).device),
           "dtype": str(next(model.parameters()).dtype), "threads": torch.get_num_threads(),
           "letter_tokens": {x: tok(f" {x}", add_special_tokens=False).input_ids for x in "ABCD"},
           "joint_tokenization_agrees": joint_tokenization_agrees(tok, items),
           "prepare_s": round(time.perf_counter() - t0, 1)}
    kw = {"shots": args.shots, "dev_items": dev, "batch_size": args.batch_size, "protocol": args.protocol}
    tag = f"{args.model} {args.dtype} {args.protocol} {args.shots}-shot"
    if part in ("both", "original"):
        print(f"scoring the original on {len(items)} items, {args.shots}-shot", file=sys.stderr)
        before = score_resumable(model, tok, items, kw, "original",
                                 args.checkpoint and Path(f"{args.checkpoint}.original"), tag)
        out["original"] = {**_summary(before), "predicted": before.predicted}
        print(f"original: {before.accuracy} in {before.seconds:.0f} s", file=sys.stderr)
    if part in ("both", "edited"):
        t0 = time.perf_counter()
        if args.manifest:  # a run's edit (a searched run's chosen one), by hooks
            direction, ablation, _ = read_edit(Path(args.manifest))
            edit = ablating(model, ablation, layout) if ablation else ablated(model, direction, layout)
            out["edit"] = {"manifest": str(args.manifest), "weighted": ablation is not None}
        else:  # the default run's edit
            direction, _, _ = find_direction(loaded, layout, cfg)
            edit = ablated(model, direction, layout)
        out["direction"] = {"layer": direction.layer, "position": direction.position,
                            "projected": direction.projected, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"direction at layer {direction.layer}; scoring the edit", file=sys.stderr)
        with edit:
            after = score_resumable(model, tok, items, kw, "edited",
                                    args.checkpoint and Path(f"{args.checkpoint}.edited"),
                                    f"{tag} edit {args.manifest or 'default run'}")
        out["edited"] = {**_summary(after), "predicted": after.predicted}
        print(f"edited: {after.accuracy} in {after.seconds:.0f} s", file=sys.stderr)
    out[f"{part}_clock"] = [started, time.time()]  # wall clock of this process, to time parts run in parallel
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "capability"))
    parser.add_argument("--model", choices=sorted(MODELS), default="reference",
                        help="a packaged model: the 0.5B reference, or Qwen2.5-Coder-1.5B-Instruct")
    parser.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    parser.add_argument("--n", type=int, default=1000, help="stratified sample of MMLU test items")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--protocol", choices=["letter", "cloze"], default="letter",
                        help="letter: ' A'..' D' after 'Answer:' (lm-eval's mmlu); cloze: each choice's text per byte "
                             "(lm-eval's mmlu_continuation, acc_norm)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--part", choices=["both", "original", "edited"], default="both",
                        help="score one model only and print its part (run two processes on a shared machine, "
                             "then --combine)")
    parser.add_argument("--manifest", help="score this run's edit (its manifest.json; a searched run's chosen "
                        "edit) instead of the default run's direction")
    parser.add_argument("--checkpoint", metavar="FILE", help="keep each scored subject in FILE.original / FILE.edited "
                        "and skip those already there when rerun (a long part cut off resumes)")
    parser.add_argument("--combine", nargs="+", metavar="PART.json", help="build the report from saved parts")
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    items = stratified(read_items(Path(args.data) / "mmlu_test.jsonl"), args.n, args.seed)
    dev = read_items(Path(args.data) / "mmlu_dev.jsonl")
    if args.combine:
        parts = [json.loads(Path(p).read_text()) for p in args.combine]
    else:
        parts = [run_part(args.part, args, items, dev)]
        if args.part != "both":
            print(json.dumps({"part": args.part, "model_choice": args.model, "dtype_choice": args.dtype, "n": args.n,
                              "seed": args.seed, "shots": args.shots, "protocol": args.protocol,
                              **parts[0]}))
            return 0
    merged = {k: v for p in parts for k, v in p.items()}
    for p in parts:  # parts of one report: same model and dtype, same sample, same protocol
        assert all(p.get(k, getattr(args, k)) == getattr(args, k) for k in ("n", "seed", "shots", "protocol")), p.keys()
        assert (p.get("model_choice", args.model), p.get("dtype_choice", args.dtype)) == (args.model, args.dtype), \
            f"a part of {p.get('model_choice')} in {p.get('dtype_choice')}: give the same --model and --dtype"
    report = {k: v for k, v in merged.items() if k not in ("part", "original", "edited")}
    report.update(
        protocol=f"MMLU, lm-eval format, {args.shots}-shot (dev exemplars of the same subject), plain text, " + (
            "argmax log-likelihood of ' A'..' D' after 'Answer:'" if args.protocol == "letter" else
            "argmax log-likelihood per byte of ' <choice>' after 'Question: ...\nAnswer:' (mmlu_continuation)"),
        n=len(items), seed=args.seed, shots=args.shots)
    # the per-item answers stay in the report (0-3, None where a part stopped early): a later edit of the same
    # model, dtype and sample can then be compared with this original without scoring it again (--combine)
    preds = {name: merged[name]["predicted"] for name in ("original", "edited")}
    # A part cut short (its predictions dumped from the running process) has None for the subjects it did
    # not reach: the comparison is then on the items both parts answered, and says so.
    done = [i for i in range(len(items)) if all(preds[k][i] is not None for k in preds)]
    if len(done) < len(items):
        report["incomplete"] = {"items_compared": len(done), "subjects_compared": len({items[i].subject for i in done}),
                                "missing": {k: sum(p is None for p in v) for k, v in preds.items()}}
    scores = {}
    for name in ("original", "edited"):
        part = merged[name]
        scores[name] = Scores([items[i] for i in done], [preds[name][i] for i in done], [], args.shots,
                              part.get("tokens", 0), part.get("seconds", 0.0))
        if len(done) < len(items):
            part["accuracy_compared_items"] = scores[name].accuracy.to_dict()
        # a model that always picks one letter scores near chance for that reason alone: show the spread
        part["predicted_letters"] = {"ABCD"[j]: scores[name].predicted.count(j) for j in range(4)}
        report[name] = part
    r = compare_scores(scores["original"], scores["edited"])
    report["answer_letters"] = {"ABCD"[j]: sum(items[i].answer == j for i in done) for j in range(4)}
    report["comparison"] = r.to_dict()
    for key in ("lost_items", "gained_items"):  # indices into the whole sample, also when only part was compared
        report["comparison"][key] = [done[i] for i in report["comparison"][key]]
    report["comparison_text"] = {"original": str(r.before), "edited": str(r.after), "change": str(r.change),
                                 "retention": "{:.3f} (95% CI {:.3f}-{:.3f})".format(r.retention,
                                                                                   *r.retention_interval)}
    clocks = [v for k, v in merged.items() if k.endswith("_clock")]
    report["wall_s"] = round(max(c[1] for c in clocks) - min(c[0] for c in clocks), 1)  # first start to last end
    report["compute_s"] = round(sum(merged[k]["seconds"] for k in ("original", "edited"))
                                + merged["direction"]["seconds"], 1)  # scoring and direction, summed over parts
    report = {k: v for k, v in report.items() if not k.endswith("_clock")}
    if not args.combine:
        report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        report["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
