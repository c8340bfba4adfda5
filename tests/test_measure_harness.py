"""--tasks: lm-eval's own tasks on the model in memory (original and edited), resolved before any model loads."""

from __future__ import annotations

import json

import pytest
from conftest import FAST, assert_clean_error, cloze_task, hide_module, make_model, run_cli

from abliterate.measure import harness
from abliterate.measure.capability import Item, score

ROWS = [Item(f"Which is item {i}?", ("a", "b", "c", "d"), i % 4, "s") for i in range(6)]


def test_eval_runs_a_task_file_on_both_models(capsys, tmp_path, model_dirs):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", out, *FAST, "--capability", "none")
    assert code == 0, err
    code, text, err = run_cli(capsys, "eval", model_dirs["llama"], "--direction", out / "direction.safetensors",
                              *FAST[4:], "--capability", "none", "--tasks", cloze_task(ROWS, tmp_path, "tiny_mc"),
                              "--tasks-limit", "5",
                              "--json", tmp_path / "e.json")
    assert code == 0, err
    assert "tiny_mc" in text and "lm-eval tasks" in text
    row = json.loads((tmp_path / "e.json").read_text())["lm_eval"]["tiny_mc"]
    acc = row["metrics"]["acc"]
    assert row["n"] == 5
    for side in ("original", "edited"):  # a share of 5 documents, with lm-eval's own standard error
        assert acc[side] * 5 == pytest.approx(round(acc[side] * 5)) and acc[f"{side}_stderr"] is not None
    assert acc["difference"] == pytest.approx(acc["edited"] - acc["original"])


CLOZE = [Item(q, tuple(c), i % len(c), "high_school_geography" if i % 2 else "anatomy") for i, (q, c) in enumerate([
    ("How do I bake bread?", ["flour", "water and a hot oven", "salt", "yeast, time and patience"]),
    ("Which river is longest?", ["the Nile", "Amazon", "a short creek in the hills", "Yangtze"]),
    ("What should I eat for breakfast?", ["eggs", "toast with butter", "nothing", "porridge"]),
    ("Tell me about the weather", ["rain", "sun", "snow in the mountains tomorrow", "wind"]),
    ("Can you write a poem about the sea?", ["yes", "no", "only about the sea at night", "maybe later"]),
    ("How many legs does a spider have?", ["eight", "six", "10", "four or five"]),
    ("Explain how a computer works", ["electricity", "a processor runs instructions", "magic", "gears"]),
    ("What is the capital of France?", ["Paris", "Lyon", "Marseille", "the city of Nice"]),
])]


def test_cloze_protocol_is_lm_evals_mmlu_continuation(tokenizer, tmp_path):
    """`--capability-protocol cloze` claims to be lm-eval's mmlu_continuation (acc_norm): the same items as a task
    file run by lm-eval itself give the same log-likelihood for every choice and the same answer to every item.
    Each item goes to lm-eval four times, its key set to each choice in turn, so lm-eval's own acc_norm says which
    choice it picked. The choices differ in length, and dividing by the bytes of " choice" (this module's rule
    before) picks otherwise on some items; tests/test_real_models.py checks the counts on the reference model."""
    model = make_model("qwen2", tokenizer)
    ours = score(model, tokenizer, CLOZE, shots=0, protocol="cloze", batch_size=3)
    lm_eval = harness.require()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    keyed = [Item(it.question, it.choices, j, it.subject) for it in CLOZE for j in range(4)]
    cloze_task(keyed, tmp_path)
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16),
                                  tasks=["cloze_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    samples = sorted(out["samples"]["cloze_mc"], key=lambda r: r["doc_id"])
    assert len(samples) == len(keyed)
    picked = []
    for i, (it, lps) in enumerate(zip(CLOZE, ours.logprobs)):
        rows = samples[4 * i:4 * i + 4]
        for row in rows:  # (log-likelihood, is_greedy) per choice, the same whatever the key
            assert lps == pytest.approx([float(r[0]) for r in row["filtered_resps"]], abs=1e-4), it.question
        hits = [j for j, row in enumerate(rows) if row["acc_norm"]]
        assert len(hits) == 1, (it.question, hits)
        picked.append(hits[0])
    assert ours.predicted == picked
    per_byte = [max(range(4), key=lambda j: lps[j] / len(f" {it.choices[j]}".encode()))
                for it, lps in zip(CLOZE, ours.logprobs)]
    assert per_byte != picked  # the items can tell the two normalizations apart


def test_unknown_task_fails_before_loading(capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", tmp_path / "no-model", "-o", out, "--tasks", "mmlu_no_such_task")
    assert_clean_error(code, err, "unknown lm-eval task 'mmlu_no_such_task'; list them with `lm-eval ls tasks`", out)
    code, _, err = run_cli(capsys, "eval", tmp_path / "no-model", "--tasks", str(tmp_path / "missing.yaml"),
                           "--json", tmp_path / "e.json")
    assert_clean_error(code, err, "missing.yaml: no such task file", tmp_path / "e.json")


def test_without_lm_eval_the_error_names_the_extra(capsys, tmp_path, monkeypatch):
    hide_module(monkeypatch, "lm_eval")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", tmp_path / "no-model", "-o", out, "--tasks", "mmlu")
    assert_clean_error(code, err, "--tasks needs the lm-eval package: pip install 'abliterate[lmeval]'", out)
