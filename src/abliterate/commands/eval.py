"""`abliterate eval` (refusals, over-refusals and KL in transformers) and `abliterate verify-gguf` (the same in
llama.cpp itself).

eval:        1. prompts, checked against the fit and select sets the edit's manifest recorded  2. load the
             original (or use hooks)  3. evaluate it  4. evaluate the edited model
verify-gguf: 1. prompts  2. the GGUF's tokenizer and template  3. answers and next-token logits in llama.cpp
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import AutoTokenizer

from ..config import EvalOptions, RunConfig, VerifyOptions
from ..edit.project import ablated
from ..errors import AbliterateError
from ..export.files import (
    DIRECTION,
    MANIFEST,
    companion,
    read_manifest,
    to_json,
    write_file,
)
from ..export.llamacpp import read_control_vector
from ..export.outputs import is_gguf
from ..find.directions import Direction
from ..find.prompts import PromptSet
from ..find.splits import check_overlap, overlap, recorded
from ..measure import harness, llamacpp, long
from ..measure.capability import compare
from ..measure.evaluation import changes
from ..model.load import check_gguf
from ..show.tables import (
    capability_table,
    judge_table,
    long_table,
    metrics_table,
    samples_text,
)
from .options import CAPABILITY, EVAL, JUDGE, LONG, MAPPED, MODEL, add_options, run_config
from .steps import (
    capability_items,
    capability_record,
    chat_format,
    eval_sets,
    harness_tasks,
    load,
    load_judge,
    long_prompts,
    run_capability,
    run_eval,
    run_harness,
    run_judge,
    run_long,
    warn_overlap,
)

log = logging.getLogger(__name__)


def edit_manifests(model: str, direction: str | None) -> list[Path]:
    """The manifests that describe the edit under evaluation: MODEL's own when it is an abliterate output
    (manifest.json inside it, or NAME.manifest.json beside NAME.gguf), and the one beside a --direction file
    (a run's direction.safetensors, or NAME.direction.safetensors beside a GGUF output)."""
    m = Path(model).expanduser()
    paths = [m / MANIFEST if m.is_dir() else companion(m, MANIFEST) if is_gguf(m) else None]
    if direction:
        d = Path(direction).expanduser()
        paths.append(d.with_name(d.name[: -len(DIRECTION)] + MANIFEST) if d.name.endswith(DIRECTION) else None)
    return list(dict.fromkeys(p for p in paths if p is not None and p.is_file()))


def report_overlap(cfg, model: str, direction: str | None, harmful: PromptSet, harmless: PromptSet) -> dict:
    """Step 1's check, before any model loads: the report prompts against the fit and select fingerprints the
    edit's manifests recorded; an overlap is refused unless --allow-overlap, and then said loudly. For the JSON:
    which manifests were read and the overlap (None: no manifest recorded the sets, nothing to check)."""
    fit, select, sources, found = set(), set(), [], []
    for path in edit_manifests(model, direction):
        try:
            rec = recorded(read_manifest(path, ("run", "apply", "induce", "steer", "adapter")), path)
        except AbliterateError as e:
            if not cfg.allow_overlap:
                raise AbliterateError(f"{e}; an edit's manifest is read to check that the evaluation prompts are "
                                      f"held out: fix or remove it, or pass --allow-overlap to skip the check") from e
            log.warning("warning: %s; the overlap with its prompts is not checked (--allow-overlap)", e)
            continue
        if rec is None:  # a manifest from before splits were recorded, or of an edit without prompt sets
            continue
        fit |= rec[0]
        select |= rec[1]
        sources.append(f"{rec[2]}, recorded in {path}")
        found.append(str(path))
    if not found:
        return {"manifests": [], "overlap": None}
    ov = check_overlap(overlap(harmful.prompts + harmless.prompts, fit, select), allow=cfg.allow_overlap,
                       report=f"--eval-harmful {cfg.eval_harmful}, --eval-harmless {cfg.eval_harmless}",
                       against="; ".join(sources))
    warn_overlap(ov)
    return {"manifests": found, "n_report": ov.n_report, **ov.to_dict()}


def cmd_eval(args) -> int:

    cfg = run_config(args)
    harmful, harmless = eval_sets(cfg)
    cap = capability_items(cfg)
    if cap is not None and cap.quick and not (args.original or args.direction):
        cap = None  # the quick check by default compares two models; a --capability FILE is also scored alone
    cap_before = cap_after = None
    tasks = harness_tasks(cfg)
    tasks_before = tasks_after = None
    long_sets = long_prompts(cfg, harmful, harmless)
    long_before = long_after = None
    if args.direction and args.original:
        raise AbliterateError("give --direction (hooks on MODEL) or --original (compare two models), not both")
    splits = report_overlap(cfg, args.model, args.direction, harmful, harmless)
    note = splits.get("overlap_note")
    direction = Direction.load(args.direction) if args.direction else None
    judge = load_judge(cfg)  # before the models: a --judge that cannot load stops here, with nothing written
    before = None
    if args.original:
        orig, _ = load(args.original, cfg)
        before = run_eval(orig, cfg, harmful, harmless)
        cap_before = run_capability(orig, cfg, cap) if cap else None
        tasks_before = run_harness(orig, cfg, tasks) if tasks else None
        long_before = run_long(orig, cfg, long_sets) if long_sets else None
        del orig
    loaded, layout = load(args.model, cfg)
    if direction is not None:
        direction.check_model(layout.hidden_size, layout.n_layers)
        before = run_eval(loaded, cfg, harmful, harmless)
        cap_before = run_capability(loaded, cfg, cap) if cap else None
        tasks_before = run_harness(loaded, cfg, tasks) if tasks else None
        long_before = run_long(loaded, cfg, long_sets) if long_sets else None
        with ablated(loaded.model, direction, layout):
            after = run_eval(loaded, cfg, harmful, harmless, reference=before)
            cap_after = run_capability(loaded, cfg, cap) if cap else None
            tasks_after = run_harness(loaded, cfg, tasks) if tasks else None
            long_after = run_long(loaded, cfg, long_sets) if long_sets else None
    else:
        after = run_eval(loaded, cfg, harmful, harmless, reference=before)
        cap_after = run_capability(loaded, cfg, cap) if cap else None
        tasks_after = run_harness(loaded, cfg, tasks) if tasks else None
        long_after = run_long(loaded, cfg, long_sets) if long_sets else None
    report = {"model": args.model, "after": after.metrics.to_dict(), "splits": splits}
    if before is not None:
        report["before"] = before.metrics.to_dict()
        change = changes(before, after)
        report["change"] = {k: p.to_dict() for k, p in change.items()}
        print(metrics_table(before.metrics, after.metrics, change, note))
        print(samples_text(before, after))
    else:
        m = after.metrics
        print(f"refusals {m.rates['refusals']}, over-refusals {m.rates['over_refusals']}" + (f" {note}: in-sample, "
              f"not held out" if note else ""))
    if cap_before is not None:
        retention = compare(cap_before, cap_after)
        report["capability"] = {**capability_record(cap, cap_before), **retention.to_dict()}
        print(capability_table(retention))
    elif cap_after is not None:
        report["capability"] = {"accuracy": cap_after.accuracy.to_dict()}
        print(f"capability ({len(cap_after.items)} items): {cap_after.accuracy}")
    effects = None
    if tasks_after is not None:
        report["lm_eval"] = harness.compare(tasks_before, tasks_after)
        print(harness.table(report["lm_eval"]))
    if long_after is not None:  # without an original: the edited model's own figures
        effects = long.compare(long_sets, long_after, long_before, tokens=cfg.long_tokens, head=cfg.max_new_tokens)
        report["long"] = effects.to_dict()
        print(long_table(effects))
    if judge is not None:
        del loaded
        judged = run_judge(judge, cfg, after, before, effects)
        report["judge"] = judged.to_dict()
        print(judge_table(judged))
    if args.json:
        write_file(args.json, to_json(report))
    return 0


def cmd_verify_gguf(args) -> int:

    cfg = run_config(args)
    llamacpp.require()
    harmful, harmless = eval_sets(cfg)
    path = Path(args.model)
    for p in (path, Path(args.original) if args.original else None):
        if p is not None and not p.is_file():
            raise AbliterateError(f"{p} does not exist; give a .gguf file")
        if p is not None:
            check_gguf(p)

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    fmt = chat_format(cfg)
    cvec = None
    if args.control_vector:
        _, cvec = read_control_vector(args.control_vector)
        cvec = {layer: v.numpy() for layer, v in cvec.items()}
    after, before, answers = llamacpp.evaluate(
        path, args.original, fmt.render_all(tok, harmful.prompts), fmt.render_all(tok, harmless.prompts),
        max_new_tokens=cfg.max_new_tokens, control_vector=cvec, control_scale=args.control_scale, lora=args.lora)
    if before is not None:
        print(metrics_table(before, after))
    else:
        print(f"refusals {after.rates['refusals']}, over-refusals {after.rates['over_refusals']}")
    if args.json:
        report = {"model": args.model, "original": args.original, "engine": "llama.cpp",
                  "after": after.to_dict(), "before": before.to_dict() if before else None, "answers": answers}
        write_file(args.json, json.dumps(report, indent=2))
    return 0


def mount(sub) -> None:
    p = sub.add_parser("eval", help="refusals, over-refusals and KL of a model, alone or against another",
                       description="Example: abliterate eval ./out --original ./model")
    add_options(p, EvalOptions)
    add_options(p, RunConfig, MODEL + MAPPED + EVAL + CAPABILITY + LONG + JUDGE + ("force", "allow_overlap"))
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("verify-gguf", help="refusals, over-refusals and KL of a GGUF, run in llama.cpp itself",
                       description="Needs llama-cpp-python (pip install 'abliterate[llama]'). Example: "
                       "abliterate verify-gguf out.gguf --original model.gguf; with a control vector: "
                       "abliterate verify-gguf model.gguf --original model.gguf --control-vector cv.gguf "
                       "--control-scale -1")
    add_options(p, VerifyOptions)
    add_options(p, RunConfig, EVAL + ("force",))
    p.set_defaults(func=cmd_verify_gguf)
