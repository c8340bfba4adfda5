"""Write the packaged quick-check sample: a stratified sample of MMLU's test split and the dev exemplars of its
subjects (src/abliterate/data/mmlu_quick.jsonl, mmlu_quick_dev.jsonl), from ../shared/data/capability.

    python benchmarks/make_mmlu_quick.py [--n 114] [--data ../shared/data/capability]

The same `stratified` sample (seed 0) as `--capability mmlu_test.jsonl:N`, so the quick check is reproducible
from the full file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from abliterate.measure.capability import QUICK_N, read_items, stratified

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "capability"))
    parser.add_argument("--n", type=int, default=QUICK_N)
    args = parser.parse_args()
    items = stratified(read_items(Path(args.data) / "mmlu_test.jsonl"), args.n, 0)
    subjects = {it.subject for it in items}
    dev = [it for it in read_items(Path(args.data) / "mmlu_dev.jsonl") if it.subject in subjects]
    out = ROOT / "src" / "abliterate" / "data"
    for name, rows in (("mmlu_quick.jsonl", items), ("mmlu_quick_dev.jsonl", dev)):
        lines = [json.dumps({"subject": it.subject, "question": it.question, "choices": list(it.choices),
                             "answer": it.answer}, ensure_ascii=False) for it in rows]
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{out / name}: {len(rows)} items, {len({it.subject for it in rows})} subjects")


if __name__ == "__main__":
    main()
