"""lm-eval tasks (`--tasks mmlu,gsm8k,...`): the standard harness numbers, on the model in memory.

Optional ([lmeval] extra). The tasks run through lm-eval's own API (`lm_eval.simple_evaluate` on an
`HFLM` wrapping the loaded model and tokenizer), so an edit applied by hooks is measured as it is and nothing
lm-eval does for its tasks (prompts, few-shot sampling, metrics, standard errors) is redone here. A task is a
registered name (`lm-eval ls tasks`) or the path of a task YAML file, which may read local data
(`dataset_path: json`, `dataset_kwargs: {data_files: ...}`): hub datasets need a network.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import AbliterateError

log = logging.getLogger(__name__)

INSTALL = "pip install 'abliterate[lmeval]'"
LIST = "list them with `lm-eval ls tasks`, or give the path of a task YAML file"


def require():
    """lm_eval, or an error naming the extra to install."""
    try:
        import lm_eval
    except ImportError:
        raise AbliterateError(f"--tasks needs the lm-eval package: {INSTALL}") from None
    return lm_eval


class _TagsAsText(yaml.SafeLoader):
    """Safe YAML that reads lm-eval's own tags (`!function utils.process_docs`) as their text."""


_TagsAsText.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_scalar(node)
                                  if isinstance(node, yaml.ScalarNode) else None)


def task_yaml(path: Path) -> dict:
    """A task file's top-level keys, to read its `task:` name (lm-eval itself loads it to run it)."""
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_TagsAsText)  # a SafeLoader subclass


@dataclass
class Tasks:
    """What --tasks asks, resolved before any model loads: task names and the folders of YAML files given."""

    names: list[str]
    include: list[str]
    spec: str
    manager: object = None  # lm_eval.tasks.TaskManager, indexed once (it reads every task YAML: seconds)


def resolve(spec: str) -> Tasks:
    """Task names and YAML paths of `--tasks a,b,...`; an unknown name is refused here, naming how to list."""
    require()
    from lm_eval.tasks import TaskManager

    parts = [p.strip() for p in spec.split(",")]
    if not all(parts):
        raise AbliterateError(f"--tasks {spec!r}: an empty task name; give names separated by commas ({LIST})")
    names, include = [], []
    for part in parts:
        path = Path(part).expanduser()
        if part.endswith((".yaml", ".yml")):
            if not path.is_file():
                raise AbliterateError(f"--tasks: {part}: no such task file; {LIST}")
            try:
                cfg = task_yaml(path)
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise AbliterateError(f"--tasks: {part}: not a task YAML lm-eval can read ({e}); fix the file") from e
            if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str):
                raise AbliterateError(f"--tasks: {part}: has no 'task: NAME'; name the task in the file")
            names.append(cfg["task"])
            include.append(str(path.resolve().parent))
        else:
            names.append(part)
    include = list(dict.fromkeys(include))
    manager = TaskManager(include_path=include or None, verbosity="ERROR")
    unknown = [n for n in names if n not in set(manager.all_tasks)]
    if unknown:
        raise AbliterateError(f"--tasks: unknown lm-eval task {unknown[0]!r}; {LIST}")
    return Tasks(names, include, spec, manager)


def run_tasks(model, tokenizer, tasks: Tasks, *, batch_size: int = 8, limit: int | None = None) -> dict:
    """Each task's metrics with their standard errors, as lm-eval reports them: {task: {metric: value, n}}."""
    lm_eval = require()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks.names, task_manager=tasks.manager, limit=limit,
                                  log_samples=False, bootstrap_iters=1000, verbosity="ERROR")
    results = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):  # "acc,none", "acc_stderr,none"
                continue
            name = key.split(",")[0]
            row[name] = None if isinstance(value, float) and not math.isfinite(value) else value
        row["n"] = out.get("n-samples", {}).get(task, {}).get("effective")
        results[task] = row
    return results


def compare(before: dict | None, after: dict) -> dict:
    """Per task and metric: the original's value and stderr, the edited model's, and the difference."""
    table = {}
    for task, row in after.items():
        metrics = {}
        for name, value in row.items():
            if name == "n" or name.endswith("_stderr"):
                continue
            entry = {"edited": value, "edited_stderr": row.get(f"{name}_stderr")}
            if before is not None and task in before:
                b = before[task]
                entry.update(original=b.get(name), original_stderr=b.get(f"{name}_stderr"))
                if isinstance(b.get(name), (int, float)) and isinstance(value, (int, float)):
                    entry["difference"] = value - b[name]
            metrics[name] = entry
        table[task] = {"n": row.get("n"), "metrics": metrics}
    return table


def table(rows: dict) -> str:
    """The terminal's lines: task, metric, original +- stderr, edited +- stderr."""
    def cell(v, se):
        return "-" if v is None else f"{v:.4f}" + (f" +- {se:.4f}" if isinstance(se, (int, float)) else "")

    lines = ["lm-eval tasks (value +- lm-eval's stderr)"]
    for task, t in rows.items():
        for name, m in t["metrics"].items():
            orig = cell(m.get("original"), m.get("original_stderr")) if "original" in m else ""
            lines.append(f"  {task:<24} {name:<10} n {t['n']}  original {orig:<22} edited "
                         f"{cell(m['edited'], m['edited_stderr'])}")
    return "\n".join(lines)
