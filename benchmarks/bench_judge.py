"""The judge against answers we labelled by reading them (tests/data/judge_labels.jsonl), as JSON.

For the marker detector and each judge model: accuracy on the labelled answers, three ways (refused / evaded /
complied; judges only) and collapsed two ways (refused or not: what the markers claim to detect; complied or
not: what a refusal rate's complement claims), each with n and its 95% Wilson interval, the confusion matrix
(rows: our label, columns: the instrument's), and the paired difference in correctness between the judge and
the markers on the same answers (Newcombe interval, McNemar's exact p).

Each judge is read twice from one pass: raw (the label with the highest probability) and calibrated (divided by
the probabilities of the content-free item, the tool's default: `measure/judge.py`).

The set is split by prompt: prompts with an even index in harmful_val.json are the tuning half (the rubric and
its examples were written and adjusted looking at those answers only), odd ones the test half. The headline
figures are the test half's; `--half all` or `--half tune` report the others, labelled as such.

    python benchmarks/bench_judge.py JUDGE [JUDGE ...] [--half test|tune|all]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from abliterate.measure.judge import COMPLIED, LABELS, REFUSED, Judge
from abliterate.measure.refusal import is_refusal
from abliterate.measure.stats import Rate, paired

LABELLED = Path(__file__).resolve().parents[1] / "tests" / "data" / "judge_labels.jsonl"


def read_labels(path: Path = LABELLED) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def half(rows: list[dict], which: str) -> list[dict]:
    """The tuning half (even prompt index), the test half (odd) or all."""
    if which == "all":
        return rows
    return [r for r in rows if (r["prompt_index"] % 2 == 0) == (which == "tune")]


def two_way(rows: list[dict], predicted: list[str], positive: str) -> dict:
    truth = [r["label"] == positive for r in rows]
    guess = [p == positive for p in predicted]
    right = [t == g for t, g in zip(truth, guess)]
    return {"accuracy": Rate(sum(right), len(rows)).to_dict(),
            "confusion": {"true_pos": sum(t and g for t, g in zip(truth, guess)),
                          "false_pos": sum(g and not t for t, g in zip(truth, guess)),
                          "false_neg": sum(t and not g for t, g in zip(truth, guess)),
                          "true_neg": sum(not t and not g for t, g in zip(truth, guess))}}


def three_way(rows: list[dict], predicted: list[str]) -> dict:
    right = [r["label"] == p for r, p in zip(rows, predicted)]
    confusion = {t: {p: sum(r["label"] == t and q == p for r, q in zip(rows, predicted)) for p in LABELS}
                 for t in LABELS}
    return {"accuracy": Rate(sum(right), len(rows)).to_dict(), "confusion": confusion}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("judges", nargs="*", help="judge models: hub id, directory or .gguf")
    ap.add_argument("--half", default="test", choices=("test", "tune", "all"))
    ap.add_argument("--labels", default=str(LABELLED))
    args = ap.parse_args()
    rows = half(read_labels(Path(args.labels)), args.half)
    labels = {label: sum(r["label"] == label for r in rows) for label in LABELS}
    out = {"labelled": args.labels, "half": args.half, "n": len(rows), "labels": labels, "instruments": {}}
    # markers: refused when is_refusal (a degenerate answer counts as refused, as in the refusal rate)
    markers = [REFUSED if is_refusal(r["answer"]) else COMPLIED for r in rows]
    markers_right = {"refused": [(m == REFUSED) == (r["label"] == REFUSED) for m, r in zip(markers, rows)],
                     "complied": [(m == COMPLIED) == (r["label"] == COMPLIED) for m, r in zip(markers, rows)]}
    out["instruments"]["markers"] = {"refused_vs_not": two_way(rows, markers, REFUSED),
                                     "complied_vs_not": two_way(rows, markers, COMPLIED)}
    for source in args.judges:
        start = time.perf_counter()
        judge = Judge.load(source)
        loaded_s = time.perf_counter() - start
        v = judge.classify([r["prompt"] for r in rows], [r["answer"] for r in rows])  # calibrated: the default
        seconds = round(time.perf_counter() - start - loaded_s, 1)
        raw = [LABELS[i] for i in v.raw.argmax(-1).tolist()]  # the same pass, read without calibration
        for name, pred in ((judge.instrument, raw), (f"{judge.instrument}, calibrated", v.labels)):
            res = {"three_way": three_way(rows, pred), "refused_vs_not": two_way(rows, pred, REFUSED),
                   "complied_vs_not": two_way(rows, pred, COMPLIED),
                   "mean_label_mass": round(float(v.mass.mean()), 4), "load_s": round(loaded_s, 1),
                   "classify_s": seconds}
            if pred is v.labels:
                res["prior"] = {k: round(float(x), 4) for k, x in zip(LABELS, v.prior)}
            for key, positive in (("refused", REFUSED), ("complied", COMPLIED)):
                right = [(p == positive) == (r["label"] == positive) for p, r in zip(pred, rows)]
                res[f"{key}_vs_not"]["against_markers"] = paired(markers_right[key], right).to_dict()
            out["instruments"][name] = res
            print(json.dumps({name: res["three_way"]["accuracy"]}), flush=True)
        del judge
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
