"""--tasks: lm-eval's own tasks on the model in memory (original and edited), resolved before any model loads."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
from conftest import FAST, assert_clean_error, run_cli

MMLU = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "capability"
ROWS = [{"subject": "s", "question": f"Which is item {i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4}
        for i in range(6)]


def task_file(tmp_path) -> Path:
    """A local multiple-choice task (hub datasets are unreachable offline): lm-eval reads the JSON lines itself."""
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    yaml = tmp_path / "tiny_mc.yaml"
    yaml.write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return yaml


def test_eval_runs_a_task_file_on_both_models(capsys, tmp_path, model_dirs):
    pytest.importorskip("lm_eval")
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "run", model_dirs["llama"], "-o", out, *FAST, "--capability", "none")
    assert code == 0, err
    code, text, err = run_cli(capsys, "eval", model_dirs["llama"], "--direction", out / "direction.safetensors",
                              *FAST[4:], "--capability", "none", "--tasks", task_file(tmp_path), "--tasks-limit", "5",
                              "--json", tmp_path / "e.json")
    assert code == 0, err
    assert "tiny_mc" in text and "lm-eval tasks" in text
    row = json.loads((tmp_path / "e.json").read_text())["lm_eval"]["tiny_mc"]
    acc = row["metrics"]["acc"]
    assert row["n"] == 5
    for side in ("original", "edited"):  # a share of 5 documents, with lm-eval's own standard error
        assert acc[side] * 5 == pytest.approx(round(acc[side] * 5)) and acc[f"{side}_stderr"] is not None
    assert acc["difference"] == pytest.approx(acc["edited"] - acc["original"])


def test_unknown_task_fails_before_loading(capsys, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", tmp_path / "no-model", "-o", out, "--tasks", "mmlu_no_such_task")
    assert_clean_error(code, err, "unknown lm-eval task 'mmlu_no_such_task'; list them with `lm-eval ls tasks`", out)
    code, _, err = run_cli(capsys, "eval", tmp_path / "no-model", "--tasks", str(tmp_path / "missing.yaml"),
                           "--json", tmp_path / "e.json")
    assert_clean_error(code, err, "missing.yaml: no such task file", tmp_path / "e.json")


def test_without_lm_eval_the_error_names_the_extra(capsys, tmp_path, monkeypatch):
    real = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "run", tmp_path / "no-model", "-o", out, "--tasks", "mmlu")
    assert_clean_error(code, err, "--tasks needs the lm-eval package: pip install 'abliterate[lmeval]'", out)
